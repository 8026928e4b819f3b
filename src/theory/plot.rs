//! A small hand-written SVG line chart: axes, ticks (linear or log x), legend, error bars,
//! dashed reference lines. Enough for the experiment's figures without a plotting crate.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// CSS colour.
    pub color: String,
    pub dashed: bool,
    /// (x, y, error-bar half-height); a half-height of 0 draws no bar.
    pub points: Vec<(f64, f64, f64)>,
}

/// A horizontal reference line across the plot.
#[derive(Debug, Clone)]
pub struct HLine {
    pub y: f64,
    pub label: String,
    pub color: String,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    /// y range; the x range follows the data.
    pub y_min: f64,
    pub y_max: f64,
    pub series: Vec<Series>,
    pub hlines: Vec<HLine>,
}

/// A colour per index that stays distinguishable for up to ten series.
pub fn palette(i: usize) -> String {
    const COLORS: [&str; 10] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    COLORS[i % COLORS.len()].to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// "Nice" linear ticks (1, 2, 5 × 10^k steps) covering [lo, hi].
pub fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Ticks at 1, 2, 5 × 10^k inside [lo, hi] (lo > 0).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut k = lo.log10().floor() as i32;
    while 10f64.powi(k) <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let t = m * 10f64.powi(k);
            if t >= lo * 0.9999 && t <= hi * 1.0001 {
                out.push(t);
            }
        }
        k += 1;
    }
    out
}

fn tick_label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-2) {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').to_string()
    }
}

impl Chart {
    /// Renders the chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let (w, h) = (760.0, 480.0);
        let (left, right, top, bottom) = (70.0, 230.0, 40.0, 60.0);
        let (pw, ph) = (w - left - right, h - top - bottom);
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| !self.log_x || *x > 0.0)
            .collect();
        let (mut x_lo, mut x_hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        if !x_lo.is_finite() {
            (x_lo, x_hi) = if self.log_x { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if x_hi <= x_lo {
            x_hi = if self.log_x { x_lo * 10.0 } else { x_lo + 1.0 };
        }
        let tx = |x: f64| -> f64 {
            let f = if self.log_x {
                (x.ln() - x_lo.ln()) / (x_hi.ln() - x_lo.ln())
            } else {
                (x - x_lo) / (x_hi - x_lo)
            };
            left + f * pw
        };
        let ty = |y: f64| -> f64 {
            let y = y.clamp(self.y_min, self.y_max);
            top + ph - (y - self.y_min) / (self.y_max - self.y_min) * ph
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            left + pw / 2.0,
            escape(&self.title)
        );
        // grid and ticks
        let x_ticks = if self.log_x {
            log_ticks(x_lo, x_hi)
        } else {
            linear_ticks(x_lo, x_hi, 6)
        };
        for t in x_ticks {
            let x = tx(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 16.0,
                tick_label(t)
            );
        }
        for t in linear_ticks(self.y_min, self.y_max, 6) {
            let y = ty(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                tick_label(t)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 18.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            escape(&self.y_label)
        );
        for l in &self.hlines {
            let y = ty(l.y);
            let _ = writeln!(
                s,
                r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" text-anchor="start" fill="{}">{}</text>"#,
                left + pw,
                l.color,
                left + 4.0,
                y - 4.0,
                l.color,
                escape(&l.label)
            );
        }
        for ser in &self.series {
            let pts: Vec<(f64, f64, f64)> = ser
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite() && (!self.log_x || p.0 > 0.0))
                .collect();
            let dash = if ser.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let path: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", tx(p.0), ty(p.1)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                ser.color
            );
            for &(x, y, e) in &pts {
                let (cx, cy) = (tx(x), ty(y));
                if e > 0.0 {
                    let (y0, y1) = (ty(y - e), ty(y + e));
                    let _ = writeln!(
                        s,
                        r#"<path d="M{cx:.1},{y0:.1}V{y1:.1}M{:.1},{y0:.1}H{:.1}M{:.1},{y1:.1}H{:.1}" stroke="{}" fill="none"/>"#,
                        cx - 4.0,
                        cx + 4.0,
                        cx - 4.0,
                        cx + 4.0,
                        ser.color
                    );
                }
                if !ser.dashed {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3" fill="{}"/>"#,
                        ser.color
                    );
                }
            }
        }
        // legend
        let lx = left + pw + 14.0;
        for (i, ser) in self.series.iter().enumerate() {
            let y = top + 10.0 + 20.0 * i as f64;
            let dash = if ser.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 24.0,
                ser.color,
                lx + 30.0,
                y + 4.0,
                escape(&ser.label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_cover_decades_with_1_2_5() {
        assert_eq!(
            log_ticks(100.0, 2000.0),
            vec![100.0, 200.0, 500.0, 1000.0, 2000.0]
        );
    }

    #[test]
    fn linear_ticks_use_nice_steps() {
        let got = linear_ticks(0.0, 1.0, 5);
        let want = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        assert_eq!(got.len(), want.len(), "{got:?}");
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12),
            "{got:?}"
        );
    }
}
