//! Hand-written inline SVG figures: grouped bars with whiskers, lines, a scatter with error bars
//! and a heat map. Every figure is one `<svg>` element with a `viewBox`, sized by CSS, and every
//! coordinate it writes is finite: non-finite data are left out, and an empty or constant range is
//! widened before it is mapped.

use std::fmt::Write as _;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A colour per index, distinguishable for up to eight series (Okabe–Ito, colour-blind safe).
pub fn palette(i: usize) -> &'static str {
    const COLORS: [&str; 8] = [
        "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000",
    ];
    COLORS[i % COLORS.len()]
}

/// Colour of a positive (harmful-prompt) feature.
pub const POSITIVE: &str = "#c0392b";
/// Colour of a negative (harmless-prompt) feature.
pub const NEGATIVE: &str = "#2e6da4";

/// A coordinate as SVG text: one decimal, and 0 for anything non-finite (callers filter data
/// first; this is the last guard so that no `NaN` ever reaches the document).
fn c(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "0".into()
    }
}

/// Linear map from a data range onto a pixel range.
#[derive(Debug, Clone, Copy)]
struct Scale {
    d0: f64,
    d1: f64,
    r0: f64,
    r1: f64,
}

impl Scale {
    /// A degenerate or non-finite domain is widened so that the map stays finite.
    fn new(d0: f64, d1: f64, r0: f64, r1: f64) -> Self {
        let (mut d0, mut d1) = if d0.is_finite() && d1.is_finite() {
            (d0, d1)
        } else {
            (0.0, 1.0)
        };
        if d1 <= d0 {
            let pad = if d0 == 0.0 { 1.0 } else { d0.abs() * 0.1 };
            d0 -= pad;
            d1 += pad;
        }
        Scale { d0, d1, r0, r1 }
    }

    fn map(&self, v: f64) -> f64 {
        let v = v.clamp(self.d0, self.d1);
        self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)
    }
}

/// The finite (min, max) of some values, or None.
fn extent(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

/// "Nice" ticks (1, 2, 5 × 10^k steps) covering [lo, hi]; finite input only.
pub fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return if lo.is_finite() { vec![lo] } else { Vec::new() };
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Widens [lo, hi] a little and snaps it to ticks, so bars and points do not touch the frame.
fn nice_range(lo: f64, hi: f64, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (lo, hi);
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    let t = ticks(lo, hi, 5);
    let step = if t.len() >= 2 { t[1] - t[0] } else { hi - lo };
    let lo2 = if lo == 0.0 {
        0.0
    } else {
        (lo / step).floor() * step
    };
    let hi2 = if hi == 0.0 {
        0.0
    } else {
        (hi / step).ceil() * step
    };
    (lo2, hi2)
}

/// Plot area of a figure and its frame, axis titles and y grid.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    top: f64,
    pw: f64,
    ph: f64,
}

impl Frame {
    fn new(w: f64, h: f64, left: f64, right: f64, top: f64, bottom: f64) -> Self {
        Frame {
            w,
            h,
            left,
            top,
            pw: w - left - right,
            ph: h - top - bottom,
        }
    }

    fn open(&self, s: &mut String, title: &str, class: &str) {
        let _ = writeln!(
            s,
            r#"<svg class="plot {class}" width="{}" height="{}" viewBox="0 0 {} {}" role="img" aria-label="{}" font-family="system-ui, sans-serif" font-size="12">"#,
            c(self.w),
            c(self.h),
            c(self.w),
            c(self.h),
            escape(title)
        );
        let _ = writeln!(s, "<title>{}</title>", escape(title));
        let _ = writeln!(
            s,
            r##"<text x="{}" y="20" text-anchor="middle" font-size="14" font-weight="600" fill="#222">{}</text>"##,
            c(self.w / 2.0),
            escape(title)
        );
    }

    fn y_axis(&self, s: &mut String, y: &Scale, label: &str, percent: bool) {
        for t in ticks(y.d0, y.d1, 5) {
            let py = y.map(t);
            let text = if percent {
                format!("{}%", tick_label(100.0 * t))
            } else {
                tick_label(t)
            };
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e6e6e6"/><text x="{}" y="{}" text-anchor="end" fill="#444">{}</text>"##,
                c(self.left),
                c(py),
                c(self.left + self.pw),
                c(py),
                c(self.left - 6.0),
                c(py + 4.0),
                escape(&text)
            );
        }
        let cy = self.top + self.ph / 2.0;
        let _ = writeln!(
            s,
            r##"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})" fill="#222">{}</text>"##,
            c(cy),
            c(cy),
            escape(label)
        );
    }

    fn x_axis(&self, s: &mut String, x: &Scale, label: &str, percent: bool) {
        for t in ticks(x.d0, x.d1, 6) {
            let px = x.map(t);
            let text = if percent {
                format!("{}%", tick_label(100.0 * t))
            } else {
                tick_label(t)
            };
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#e6e6e6"/><text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
                c(px),
                c(self.top),
                c(px),
                c(self.top + self.ph),
                c(px),
                c(self.top + self.ph + 16.0),
                escape(&text)
            );
        }
        self.x_title(s, label);
    }

    fn x_title(&self, s: &mut String, label: &str) {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#222">{}</text>"##,
            c(self.left + self.pw / 2.0),
            c(self.h - 8.0),
            escape(label)
        );
    }

    fn border(&self, s: &mut String) {
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
            c(self.left),
            c(self.top),
            c(self.pw),
            c(self.ph)
        );
    }

    /// Legend in one row above the plot area, right-aligned.
    fn legend(&self, s: &mut String, entries: &[LegendEntry]) {
        let mut x = self.left + self.pw;
        for e in entries.iter().rev() {
            let width = 24.0 + 7.0 * e.label.chars().count() as f64;
            x -= width;
            let dash = if e.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="{}"{dash}/><text x="{}" y="{}" fill="#222">{}</text>"##,
                c(x),
                c(self.top - 8.0),
                c(x + 16.0),
                c(self.top - 8.0),
                escape(&e.color),
                if e.dashed { 2 } else { 6 },
                c(x + 20.0),
                c(self.top - 4.0),
                escape(&e.label)
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct LegendEntry {
    pub label: String,
    pub color: String,
    pub dashed: bool,
}

/// One bar: its height and an optional whisker (lo, hi) in data units.
#[derive(Debug, Clone)]
pub struct Bar {
    pub value: f64,
    pub whisker: Option<(f64, f64)>,
    /// Overrides the series colour (e.g. by sign).
    pub color: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BarSeries {
    pub label: String,
    pub color: String,
    /// One entry per category; None leaves a gap.
    pub bars: Vec<Option<Bar>>,
}

/// Bars grouped by category, one bar per series in each group.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
    pub legend: Vec<LegendEntry>,
    /// Fix the y range (e.g. 0..1 for rates); otherwise it follows the data and includes 0.
    pub y_range: Option<(f64, f64)>,
    /// Tick labels as percentages of 1.
    pub percent: bool,
}

impl BarChart {
    pub fn to_svg(&self) -> String {
        let n = self.categories.len().max(1);
        let rotate = n > 8;
        let bottom = if rotate { 70.0 } else { 50.0 };
        let longest = self
            .categories
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0) as f64;
        let bars_w = 34.0 * self.series.len().max(1) as f64 + 12.0;
        let group_w = if rotate {
            bars_w
        } else {
            bars_w.max(7.0 * longest + 16.0)
        };
        let frame = Frame::new(
            (80.0 + group_w * n as f64).clamp(420.0, 960.0),
            320.0,
            64.0,
            16.0,
            44.0,
            bottom,
        );
        let bars = self
            .series
            .iter()
            .flat_map(|s| s.bars.iter().flatten())
            .filter(|b| b.value.is_finite());
        let values = bars.flat_map(|b| {
            let (lo, hi) = b.whisker.unwrap_or((b.value, b.value));
            [b.value, lo, hi]
        });
        let (lo, hi) = match self.y_range {
            Some(r) => r,
            None => extent(values)
                .map(|(lo, hi)| nice_range(lo, hi, true))
                .unwrap_or((0.0, 1.0)),
        };
        let y = Scale::new(lo, hi, frame.top + frame.ph, frame.top);
        let mut s = String::new();
        frame.open(&mut s, &self.title, "bars");
        frame.y_axis(&mut s, &y, &self.y_label, self.percent);
        let group_w = frame.pw / n as f64;
        let k = self.series.len().max(1) as f64;
        let bar_w = (group_w * 0.8 / k).min(48.0);
        let zero = y.map(0.0_f64.clamp(y.d0, y.d1));
        for (ci, cat) in self.categories.iter().enumerate() {
            let gx = frame.left + group_w * (ci as f64 + 0.5);
            for (si, ser) in self.series.iter().enumerate() {
                let Some(Some(bar)) = ser.bars.get(ci) else {
                    continue;
                };
                if !bar.value.is_finite() {
                    continue;
                }
                let x = gx + (si as f64 - k / 2.0) * bar_w;
                let top = y.map(bar.value);
                let (y0, y1) = (top.min(zero), top.max(zero));
                let color = bar.color.as_deref().unwrap_or(&ser.color);
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}: {}</title></rect>"#,
                    c(x + 1.0),
                    c(y0),
                    c((bar_w - 2.0).max(1.0)),
                    c(y1 - y0),
                    escape(color),
                    escape(cat),
                    escape(&format!("{} = {:.4}", ser.label, bar.value))
                );
                if let Some((lo, hi)) = bar.whisker.filter(|(a, b)| a.is_finite() && b.is_finite())
                {
                    let mx = x + bar_w / 2.0;
                    let (wy0, wy1) = (y.map(lo), y.map(hi));
                    let cap = (bar_w / 4.0).min(5.0);
                    let _ = writeln!(
                        s,
                        r##"<path d="M{},{}V{}M{},{}H{}M{},{}H{}" stroke="#222" fill="none"/>"##,
                        c(mx),
                        c(wy0),
                        c(wy1),
                        c(mx - cap),
                        c(wy0),
                        c(mx + cap),
                        c(mx - cap),
                        c(wy1),
                        c(mx + cap)
                    );
                }
            }
            let ly = frame.top + frame.ph + 14.0;
            if rotate {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="end" transform="rotate(-45 {} {})" fill="#444" font-size="11">{}</text>"##,
                    c(gx),
                    c(ly),
                    c(gx),
                    c(ly),
                    escape(cat)
                );
            } else {
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
                    c(gx),
                    c(ly),
                    escape(cat)
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#555"/>"##,
            c(frame.left),
            c(zero),
            c(frame.left + frame.pw),
            c(zero)
        );
        frame.border(&mut s);
        frame.legend(&mut s, &self.legend);
        s.push_str("</svg>\n");
        s
    }
}

#[derive(Debug, Clone)]
pub struct LineSeries {
    pub label: String,
    pub color: String,
    pub dashed: bool,
    pub markers: bool,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<LineSeries>,
}

impl LineChart {
    pub fn to_svg(&self) -> String {
        let frame = Frame::new(760.0, 340.0, 64.0, 16.0, 44.0, 46.0);
        let pts = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|p| p.0.is_finite() && p.1.is_finite())
        };
        let (x0, x1) = extent(pts().map(|p| p.0)).unwrap_or((0.0, 1.0));
        let (y0, y1) = extent(pts().map(|p| p.1))
            .map(|(lo, hi)| nice_range(lo, hi, false))
            .unwrap_or((0.0, 1.0));
        let x = Scale::new(x0, x1, frame.left, frame.left + frame.pw);
        let y = Scale::new(y0, y1, frame.top + frame.ph, frame.top);
        let mut s = String::new();
        frame.open(&mut s, &self.title, "lines");
        frame.y_axis(&mut s, &y, &self.y_label, false);
        frame.x_axis(&mut s, &x, &self.x_label, false);
        for ser in &self.series {
            let p: Vec<(f64, f64)> = ser
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(a, b)| (x.map(a), y.map(b)))
                .collect();
            if p.is_empty() {
                continue;
            }
            let dash = if ser.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let path: Vec<String> = p
                .iter()
                .map(|(a, b)| format!("{},{}", c(*a), c(*b)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                escape(&ser.color)
            );
            if ser.markers {
                for (a, b) in &p {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{}" cy="{}" r="3" fill="{}"/>"#,
                        c(*a),
                        c(*b),
                        escape(&ser.color)
                    );
                }
            }
        }
        frame.border(&mut s);
        let legend: Vec<LegendEntry> = self
            .series
            .iter()
            .map(|s| LegendEntry {
                label: s.label.clone(),
                color: s.color.clone(),
                dashed: s.dashed,
            })
            .collect();
        frame.legend(&mut s, &legend);
        s.push_str("</svg>\n");
        s
    }
}

/// A labelled point with optional error bars (lo, hi) on each axis.
#[derive(Debug, Clone)]
pub struct ScatterPoint {
    pub label: String,
    pub color: String,
    pub x: f64,
    pub y: f64,
    pub x_err: Option<(f64, f64)>,
    pub y_err: Option<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Scatter {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Fixed ranges; None follows the data (error bars included).
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Tick labels as percentages of 1, and data ranges kept inside [0, 1].
    pub percent: bool,
    pub points: Vec<ScatterPoint>,
}

/// An axis range: `fixed`, else the data's, widened to ticks (and kept in [0, 1] for shares).
fn data_range(
    fixed: Option<(f64, f64)>,
    values: impl Iterator<Item = f64>,
    percent: bool,
) -> (f64, f64) {
    if let Some(r) = fixed {
        return r;
    }
    let (lo, hi) = extent(values)
        .map(|(lo, hi)| nice_range(lo, hi, false))
        .unwrap_or((0.0, 1.0));
    if percent {
        (lo.max(0.0), hi.min(1.0))
    } else {
        (lo, hi)
    }
}

/// A value and the ends of its error bar, for axis ranges that must include the bars.
fn spans(v: f64, e: Option<(f64, f64)>) -> [f64; 3] {
    let (a, b) = e.unwrap_or((v, v));
    [v, a, b]
}

/// Horizontal and vertical error bars with end caps at pixel point (px, py); bars with a
/// non-finite end are left out.
#[allow(clippy::too_many_arguments)]
fn error_bars(
    s: &mut String,
    x: &Scale,
    y: &Scale,
    (px, py): (f64, f64),
    x_err: Option<(f64, f64)>,
    y_err: Option<(f64, f64)>,
    color: &str,
    opacity: f64,
) {
    if let Some((lo, hi)) = x_err.filter(|(a, b)| a.is_finite() && b.is_finite()) {
        let _ = writeln!(
            s,
            r#"<path d="M{},{}H{}M{},{}V{}M{},{}V{}" stroke="{color}" stroke-opacity="{opacity}" fill="none"/>"#,
            c(x.map(lo)),
            c(py),
            c(x.map(hi)),
            c(x.map(lo)),
            c(py - 4.0),
            c(py + 4.0),
            c(x.map(hi)),
            c(py - 4.0),
            c(py + 4.0)
        );
    }
    if let Some((lo, hi)) = y_err.filter(|(a, b)| a.is_finite() && b.is_finite()) {
        let _ = writeln!(
            s,
            r#"<path d="M{},{}V{}M{},{}H{}M{},{}H{}" stroke="{color}" stroke-opacity="{opacity}" fill="none"/>"#,
            c(px),
            c(y.map(lo)),
            c(y.map(hi)),
            c(px - 4.0),
            c(y.map(lo)),
            c(px + 4.0),
            c(px - 4.0),
            c(y.map(hi)),
            c(px + 4.0)
        );
    }
}

impl Scatter {
    pub fn to_svg(&self) -> String {
        let longest = self
            .points
            .iter()
            .map(|p| p.label.chars().count())
            .max()
            .unwrap_or(0) as f64;
        let right = 40.0 + 7.0 * longest;
        let frame = Frame::new(480.0 + right, 400.0, 64.0, right, 44.0, 46.0);
        let shown: Vec<&ScatterPoint> = self
            .points
            .iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .collect();
        let (x0, x1) = data_range(
            self.x_range,
            shown.iter().flat_map(|p| spans(p.x, p.x_err)),
            self.percent,
        );
        let (y0, y1) = data_range(
            self.y_range,
            shown.iter().flat_map(|p| spans(p.y, p.y_err)),
            self.percent,
        );
        let x = Scale::new(x0, x1, frame.left, frame.left + frame.pw);
        let y = Scale::new(y0, y1, frame.top + frame.ph, frame.top);
        let mut s = String::new();
        frame.open(&mut s, &self.title, "scatter");
        frame.y_axis(&mut s, &y, &self.y_label, self.percent);
        frame.x_axis(&mut s, &x, &self.x_label, self.percent);
        for (i, p) in shown.iter().enumerate() {
            let (px, py) = (x.map(p.x), y.map(p.y));
            let color = escape(&p.color);
            error_bars(&mut s, &x, &y, (px, py), p.x_err, p.y_err, &color, 1.0);
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="5" fill="{color}" stroke="white"><title>{}</title></circle>"#,
                c(px),
                c(py),
                escape(&p.label)
            );
            // legend entry beside the plot: points may sit too close for labels at the points
            let ly = frame.top + 10.0 + 20.0 * i as f64;
            let lx = frame.left + frame.pw + 16.0;
            let _ = writeln!(
                s,
                r##"<circle cx="{}" cy="{}" r="5" fill="{color}"/><text x="{}" y="{}" fill="#222">{}</text>"##,
                c(lx),
                c(ly),
                c(lx + 10.0),
                c(ly + 4.0),
                escape(&p.label)
            );
        }
        frame.border(&mut s);
        s.push_str("</svg>\n");
        s
    }
}

/// One method's frontier: its points in scale order, joined by a line, each with error bars,
/// and fainter per-seed points behind them.
#[derive(Debug, Clone)]
pub struct FrontierSeries {
    pub label: String,
    pub color: String,
    /// Mean points in the order they are joined; `label` names the scale (`×0.5`).
    pub points: Vec<ScatterPoint>,
    /// Per-seed points (x, y), drawn faint.
    pub faint: Vec<(f64, f64)>,
}

/// Several frontiers in one plane, shares on both axes.
#[derive(Debug, Clone)]
pub struct FrontierChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<FrontierSeries>,
}

impl FrontierChart {
    pub fn to_svg(&self) -> String {
        let frame = Frame::new(760.0, 460.0, 64.0, 16.0, 44.0, 46.0);
        let finite = |x: f64, y: f64| x.is_finite() && y.is_finite();
        let mean_points = || {
            self.series
                .iter()
                .flat_map(|ser| ser.points.iter())
                .filter(|p| finite(p.x, p.y))
        };
        let faint = || {
            self.series
                .iter()
                .flat_map(|ser| ser.faint.iter())
                .filter(|p| finite(p.0, p.1))
        };
        let xs = mean_points()
            .flat_map(|p| spans(p.x, p.x_err))
            .chain(faint().map(|p| p.0));
        let (x0, x1) = data_range(None, xs, true);
        let ys = mean_points()
            .flat_map(|p| spans(p.y, p.y_err))
            .chain(faint().map(|p| p.1));
        let (y0, y1) = data_range(None, ys, true);
        let x = Scale::new(x0, x1, frame.left, frame.left + frame.pw);
        let y = Scale::new(y0, y1, frame.top + frame.ph, frame.top);
        let mut s = String::new();
        frame.open(&mut s, &self.title, "frontier");
        frame.y_axis(&mut s, &y, &self.y_label, true);
        frame.x_axis(&mut s, &x, &self.x_label, true);
        for ser in &self.series {
            let color = escape(&ser.color);
            for &(a, b) in ser.faint.iter().filter(|p| finite(p.0, p.1)) {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{}" cy="{}" r="3" fill="{color}" fill-opacity="0.3"/>"#,
                    c(x.map(a)),
                    c(y.map(b))
                );
            }
            let shown: Vec<&ScatterPoint> =
                ser.points.iter().filter(|p| finite(p.x, p.y)).collect();
            let path: Vec<String> = shown
                .iter()
                .map(|p| format!("{},{}", c(x.map(p.x)), c(y.map(p.y))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for p in shown {
                let (px, py) = (x.map(p.x), y.map(p.y));
                error_bars(&mut s, &x, &y, (px, py), p.x_err, p.y_err, &color, 0.5);
                let _ = writeln!(
                    s,
                    r##"<circle cx="{}" cy="{}" r="4" fill="{color}" stroke="white"><title>{} {}</title></circle><text x="{}" y="{}" font-size="10" fill="#444">{}</text>"##,
                    c(px),
                    c(py),
                    escape(&ser.label),
                    escape(&p.label),
                    c(px + 6.0),
                    c(py - 6.0),
                    escape(&p.label)
                );
            }
        }
        frame.border(&mut s);
        let legend: Vec<LegendEntry> = self
            .series
            .iter()
            .map(|ser| LegendEntry {
                label: ser.label.clone(),
                color: ser.color.clone(),
                dashed: false,
            })
            .collect();
        frame.legend(&mut s, &legend);
        s.push_str("</svg>\n");
        s
    }
}

/// Cells coloured white → `color` by value in [0, 1], each labelled with its value.
#[derive(Debug, Clone)]
pub struct Heatmap {
    pub title: String,
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    /// `values[row][column]`; None or non-finite leaves a grey cell.
    pub values: Vec<Vec<Option<f64>>>,
    pub color: (u8, u8, u8),
}

impl Heatmap {
    pub fn to_svg(&self) -> String {
        let (nr, nc) = (self.rows.len().max(1), self.columns.len().max(1));
        let cell_w = 64.0;
        let cell_h = 26.0;
        let left = 24.0
            + 7.0
                * self
                    .rows
                    .iter()
                    .map(|r| r.chars().count())
                    .max()
                    .unwrap_or(4) as f64;
        let width =
            (left + cell_w * nc as f64 + 16.0).max(8.0 * self.title.chars().count() as f64 + 40.0);
        let frame = Frame::new(
            width,
            44.0 + 22.0 + cell_h * nr as f64 + 12.0,
            left,
            16.0,
            66.0,
            12.0,
        );
        let mut s = String::new();
        frame.open(&mut s, &self.title, "heatmap");
        for (j, col) in self.columns.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#222">{}</text>"##,
                c(left + cell_w * (j as f64 + 0.5)),
                c(frame.top - 8.0),
                escape(col)
            );
        }
        let (r, g, b) = self.color;
        for (i, row) in self.rows.iter().enumerate() {
            let yy = frame.top + cell_h * i as f64;
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#222">{}</text>"##,
                c(left - 8.0),
                c(yy + cell_h / 2.0 + 4.0),
                escape(row)
            );
            for j in 0..self.columns.len() {
                let v = self
                    .values
                    .get(i)
                    .and_then(|r| r.get(j))
                    .copied()
                    .flatten()
                    .filter(|v| v.is_finite());
                let xx = left + cell_w * j as f64;
                let (fill, text, dark) = match v {
                    Some(v) => {
                        let t = v.clamp(0.0, 1.0);
                        let mix = |a: u8| (255.0 + (a as f64 - 255.0) * t).round() as u8;
                        (
                            format!("#{:02x}{:02x}{:02x}", mix(r), mix(g), mix(b)),
                            format!("{v:.2}"),
                            t > 0.55,
                        )
                    }
                    None => ("#eeeeee".to_string(), "–".to_string(), false),
                };
                let _ = writeln!(
                    s,
                    r##"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}" stroke="white"/><text x="{}" y="{}" text-anchor="middle" fill="{}" font-size="11">{}</text>"##,
                    c(xx),
                    c(yy),
                    c(cell_w),
                    c(cell_h),
                    c(xx + cell_w / 2.0),
                    c(yy + cell_h / 2.0 + 4.0),
                    if dark { "#fff" } else { "#222" },
                    escape(&text)
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn ticks_use_1_2_5_steps() {
        let got = ticks(0.0, 1.0, 5);
        let want = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(ticks(3.0, 3.0, 5), vec![3.0]);
        assert!(ticks(f64::NAN, 1.0, 5).is_empty());
    }

    #[test]
    fn degenerate_scale_stays_finite() {
        let s = Scale::new(2.0, 2.0, 0.0, 100.0);
        assert!(s.map(2.0).is_finite());
        assert!((s.map(2.0) - 50.0).abs() < 1e-9, "{}", s.map(2.0));
        let s = Scale::new(f64::NAN, f64::INFINITY, 0.0, 100.0);
        assert_eq!(s.map(0.5), 50.0);
    }
}
