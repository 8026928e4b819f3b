//! `report.html`: one document, inline CSS and SVG, no scripts, no external resources.

use super::svg::{
    escape, palette, Bar, BarChart, BarSeries, FrontierChart, FrontierSeries, Heatmap, LegendEntry,
    LineChart, LineSeries, Scatter, ScatterPoint, NEGATIVE, POSITIVE,
};
use super::{
    duration, estimate_num, estimate_pct, pct, per_seed_text, rate_text, suite_label, Evaluation,
    Example, Explanations, FeatureCard, LossCurve, ReportInputs, SECTIONS,
};
use crate::eval::metrics::Rate;
use crate::eval::Metrics;
use crate::features::{LayerSelection, Selection};
use crate::subspace::SubspaceSummary;
use std::fmt::Write as _;

/// Features per layer drawn in the Δ chart.
const CHART_FEATURES: usize = 20;
/// Features per layer listed in the table.
const TABLE_FEATURES: usize = 10;

const CSS: &str = r#"
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d9dce1; --soft:#f5f6f8; --accent:#0072b2; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 8px; padding-bottom: 12px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 8px; }
h4 { font-size: 15px; margin: 0 0 6px; }
.sub { color: var(--muted); margin: 0; }
nav { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; }
nav a.missing { color: var(--muted); text-decoration: line-through; }
.notice { background: #fff8e1; border-left: 4px solid #e69f00; padding: 8px 12px; margin: 12px 0 0; }
.not-run { color: var(--muted); font-style: italic; background: var(--soft);
  border: 1px dashed var(--line); border-radius: 6px; padding: 10px 14px; }
.note { color: var(--muted); font-size: 13.5px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fafbfc; }
.wide { width: 100%; }
figure { margin: 8px 0 20px; }
svg.plot { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.card, .example { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: #fff; }
.stats { color: var(--muted); font-size: 13px; margin: 0 0 8px; }
.ctx { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px;
  white-space: pre-wrap; word-break: break-word; background: var(--soft); border-radius: 4px;
  padding: 6px 8px; margin: 0 0 6px; line-height: 1.7; }
.tok { border-radius: 2px; }
.tokens { margin: 4px 0 0; font-size: 13px; display: flex; flex-wrap: wrap; gap: 3px;
  align-items: baseline; }
.tokens code { background: var(--soft); border: 1px solid var(--line); border-radius: 3px;
  padding: 0 4px; white-space: pre; max-width: 100%; overflow: hidden; text-overflow: ellipsis; }
.lbl { color: var(--muted); }
.example { margin: 0 0 14px; }
.prompt { font-weight: 600; white-space: pre-wrap; word-break: break-word; margin: 0 0 8px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.resp { white-space: pre-wrap; word-break: break-word; font-size: 13.5px; background: var(--soft);
  border-radius: 4px; padding: 8px 10px; margin: 4px 0 0; }
.tag { display: inline-block; font-size: 12px; border-radius: 10px; padding: 0 8px; margin-left: 6px;
  border: 1px solid var(--line); color: var(--muted); }
.badge { display: inline-block; font-size: 12px; font-weight: 600; border-radius: 10px; padding: 0 8px; }
.refused { background: #e3f1e8; color: #1e6b3a; }
.complied { background: #fde7e4; color: #a12b1c; }
.up { color: #1e6b3a; } .down { color: #a12b1c; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line); padding-top: 8px; }
@media (max-width: 760px) { .pair { grid-template-columns: 1fr; } main { padding: 12px; } }
@media print {
  body { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  nav { display: none; }
  h2 { break-after: avoid; }
  figure, .card, .example, table { break-inside: avoid; }
  tbody tr:nth-child(even) td { background: none; }
}
"#;

/// Renders the whole report as one HTML document.
pub fn render_html(inputs: &ReportInputs<'_>) -> String {
    let name = escape(&inputs.run.name);
    let missing = inputs.missing();
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>SAILS report: {name}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
    );
    let _ = writeln!(s, "<header>\n<h1>SAILS report: {name}</h1>");
    let sub: Vec<String> = [
        inputs
            .run
            .model
            .as_ref()
            .map(|m| format!("model {}", escape(m))),
        inputs
            .run
            .preset
            .as_ref()
            .map(|p| format!("preset {}", escape(p))),
        inputs
            .run
            .created
            .as_ref()
            .map(|c| format!("created {}", escape(c))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !sub.is_empty() {
        let _ = writeln!(s, "<p class=\"sub\">{}</p>", sub.join(" · "));
    }
    s.push_str("<nav>");
    for (id, heading) in SECTIONS {
        let class = if missing.contains(&heading) {
            " class=\"missing\""
        } else {
            ""
        };
        let _ = write!(s, "<a href=\"#{id}\"{class}>{heading}</a>");
    }
    s.push_str("</nav>\n");
    if !missing.is_empty() {
        let _ = writeln!(
            s,
            "<p class=\"notice\">Not run or not given: {}.</p>",
            missing.join(", ")
        );
    }
    s.push_str("</header>\n");

    section(&mut s, 0, Some(run_section(inputs)));
    section(&mut s, 1, inputs.selection.map(features_section));
    section(&mut s, 2, inputs.subspace.map(subspace_section));
    section(&mut s, 3, inputs.explanations.as_ref().map(explain_section));
    section(&mut s, 4, inputs.training.as_deref().map(training_section));
    section(
        &mut s,
        5,
        inputs.evaluation.as_ref().map(evaluation_section),
    );
    section(&mut s, 6, inputs.examples.as_deref().map(examples_section));

    let _ = write!(
        s,
        "<footer>Written by sails {} · self-contained: no scripts, no external resources.</footer>\n\
         </main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    s
}

fn section(s: &mut String, i: usize, body: Option<String>) {
    let (id, heading) = SECTIONS[i];
    let _ = writeln!(s, "<section id=\"{id}\">\n<h2>{heading}</h2>");
    match body {
        Some(b) => s.push_str(&b),
        None => {
            let _ = writeln!(
                s,
                "<p class=\"not-run\">Not run: this run has no {} output.</p>",
                heading.to_lowercase()
            );
        }
    }
    s.push_str("</section>\n");
}

fn not_run(what: &str) -> String {
    format!("<p class=\"not-run\">Not run: {}.</p>\n", escape(what))
}

fn figure(svg: String, caption: &str) -> String {
    format!(
        "<figure>\n{svg}<figcaption>{}</figcaption>\n</figure>\n",
        escape(caption)
    )
}

/// The serde spelling of a config enum (`sails`, `mean`).
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn num_cell(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("<td class=\"num\">{v:.digits$}</td>")
    } else {
        "<td class=\"num\">–</td>".into()
    }
}

fn run_section(inputs: &ReportInputs<'_>) -> String {
    let run = &inputs.run;
    let mut s = String::new();
    s.push_str("<table>\n<tbody>\n");
    let mut row = |k: &str, v: Option<String>| {
        let v = v.unwrap_or_else(|| "<span class=\"lbl\">not recorded</span>".into());
        let _ = writeln!(s, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    row("Name", Some(escape(&run.name)));
    row("Model", run.model.as_deref().map(escape));
    row("Preset", run.preset.as_deref().map(escape));
    row("Created", run.created.as_deref().map(escape));
    row(
        "Manifest",
        run.manifest_path
            .as_ref()
            .map(|p| format!("<code>{}</code>", escape(&p.display().to_string()))),
    );
    row(
        "Versions",
        (!run.versions.is_empty()).then(|| {
            run.versions
                .iter()
                .map(|(k, v)| format!("{} {}", escape(k), escape(v)))
                .collect::<Vec<_>>()
                .join(", ")
        }),
    );
    s.push_str("</tbody>\n</table>\n<h3>Stages</h3>\n");
    if run.stages.is_empty() {
        s.push_str(&not_run("no stage timings were recorded"));
    } else {
        s.push_str("<table>\n<thead><tr><th>Stage</th><th class=\"num\">Wall time</th><th>Status</th></tr></thead>\n<tbody>\n");
        for st in &run.stages {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&st.stage),
                duration(st.seconds),
                if st.skipped {
                    "reused (skipped)"
                } else {
                    "ran"
                }
            );
        }
        let total: f64 = run.stages.iter().map(|s| s.seconds).sum();
        let _ = writeln!(
            s,
            "<tr><th>Total</th><th class=\"num\">{}</th><th></th></tr>\n</tbody>\n</table>",
            duration(total)
        );
    }
    s
}

/// Δ with its interval: the interval of `diff` flipped for features whose `diff` is negative.
fn delta_whisker(diff: f64, ci: [f64; 2]) -> Option<(f64, f64)> {
    if !(ci[0].is_finite() && ci[1].is_finite()) || (ci[0] == 0.0 && ci[1] == 0.0) {
        return None;
    }
    Some(if diff >= 0.0 {
        (ci[0], ci[1])
    } else {
        (-ci[1], -ci[0])
    })
}

pub(super) fn delta_chart(layer: &LayerSelection) -> String {
    let shown = &layer.features[..layer.features.len().min(CHART_FEATURES)];
    BarChart {
        title: format!("Top {} features by Δ at {}", shown.len(), layer.hook_name),
        y_label: "Δ = |mean harmful − mean harmless|".into(),
        categories: shown.iter().map(|f| format!("#{}", f.index)).collect(),
        series: vec![BarSeries {
            label: "Δ".into(),
            color: POSITIVE.into(),
            bars: shown
                .iter()
                .map(|f| {
                    Some(Bar {
                        value: f.delta,
                        whisker: delta_whisker(f.diff, f.diff_ci95),
                        color: Some(if f.diff >= 0.0 { POSITIVE } else { NEGATIVE }.into()),
                    })
                })
                .collect(),
        }],
        legend: vec![
            LegendEntry {
                label: "more active on harmful".into(),
                color: POSITIVE.into(),
                dashed: false,
            },
            LegendEntry {
                label: "more active on harmless".into(),
                color: NEGATIVE.into(),
                dashed: false,
            },
        ],
        y_range: None,
        percent: false,
    }
    .to_svg()
}

fn features_section(sel: &Selection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<p>Model <code>{}</code>; {} harmful and {} harmless prompts; pooling <b>{}</b>; top {} \
         features kept per layer; {} bootstrap resamples for the 95 % intervals (seed {}).</p>",
        escape(&sel.model),
        sel.harmful.count,
        sel.harmless.count,
        escape(&serde_name(&sel.config.pooling)),
        sel.config.top_k,
        sel.config.bootstrap,
        sel.config.seed
    );
    if sel.layers.is_empty() {
        s.push_str(&not_run("the selection holds no layers"));
    }
    for layer in &sel.layers {
        let robust = layer.features.iter().filter(|f| f.robust).count();
        let _ = writeln!(
            s,
            "<h3>{} <span class=\"tag\">{}</span></h3>\n<p class=\"note\">SAE <code>{}</code>, \
             d_sae {}; {} features kept, {} robust (interval excludes 0).</p>",
            escape(&layer.hook_name),
            escape(&layer.hook.to_string()),
            escape(&layer.sae),
            layer.d_sae,
            layer.features.len(),
            robust
        );
        if layer.features.is_empty() {
            s.push_str(&not_run("no features were kept at this layer"));
            continue;
        }
        s.push_str(&figure(
            delta_chart(layer),
            "Bars: Δ per feature (largest first); whiskers: bootstrap 95 % interval. Colour: the \
             prompt set on which the feature is more active.",
        ));
        s.push_str(
            "<table class=\"wide\">\n<thead><tr><th class=\"num\">Rank</th><th class=\"num\">Feature</th>\
             <th class=\"num\">Δ</th><th class=\"num\">Diff 95 % CI</th><th class=\"num\">Mean harmful</th>\
             <th class=\"num\">Mean harmless</th><th class=\"num\">Freq harmful</th>\
             <th class=\"num\">Freq harmless</th><th class=\"num\">Effect size d</th><th>Robust</th></tr></thead>\n<tbody>\n",
        );
        for f in layer.features.iter().take(TABLE_FEATURES) {
            let _ = writeln!(
                s,
                "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td>{}<td class=\"num\">[{:.3}, {:.3}]</td>{}{}<td class=\"num\">{}</td><td class=\"num\">{}</td>{}<td>{}</td></tr>",
                f.rank + 1,
                f.index,
                num_cell(f.delta, 3),
                f.diff_ci95[0],
                f.diff_ci95[1],
                num_cell(f.mean_harmful, 3),
                num_cell(f.mean_harmless, 3),
                pct(f.freq_harmful),
                pct(f.freq_harmless),
                num_cell(f.effect_size, 2),
                if f.robust { "yes" } else { "no" }
            );
        }
        s.push_str("</tbody>\n</table>\n");
    }
    s
}

fn subspace_section(sub: &SubspaceSummary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<p>Method <b>{}</b>, rank {}, τ = {}, d_model {}, seed {}. The basis lives in the raw \
         residual stream; the norm weight is {}folded in.</p>",
        escape(&serde_name(&sub.config.method)),
        sub.config.rank,
        sub.config.energy_frac,
        sub.d_model,
        sub.config.seed,
        if sub.norm_weight_folded { "" } else { "not " }
    );
    if sub.layers.is_empty() {
        return s + &not_run("the subspace holds no layers");
    }
    s.push_str(
        "<table>\n<thead><tr><th>Hook</th><th class=\"num\">Block</th><th class=\"num\">Rows used</th>\
         <th class=\"num\">Components for τ</th><th class=\"num\">Energy kept</th>\
         <th class=\"num\">Truncated</th><th class=\"num\">Padded</th><th class=\"num\">Padded (random)</th></tr></thead>\n<tbody>\n",
    );
    for l in &sub.layers {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&l.hook.to_string()),
            l.block_input,
            l.rows_used,
            l.components_for_tau,
            pct(l.energy_kept),
            l.truncated,
            l.padded,
            l.padded_random
        );
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

fn card_html(card: &FeatureCard) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<article class=\"card\">\n<h4>{} · feature #{}</h4>\n<p class=\"stats\">Δ = {:.3} · diff 95 % \
         CI [{:.3}, {:.3}] · fires on {} of harmful, {} of harmless prompts</p>",
        escape(&card.hook_name),
        card.index,
        card.delta,
        card.diff_ci95[0],
        card.diff_ci95[1],
        pct(card.freq_harmful),
        pct(card.freq_harmless)
    );
    let max = card
        .contexts
        .iter()
        .flat_map(|c| c.activations.iter())
        .copied()
        .filter(|a| a.is_finite())
        .fold(0f32, f32::max);
    if card.contexts.is_empty() {
        s.push_str("<p class=\"note\">No contexts recorded.</p>\n");
    }
    for ctx in &card.contexts {
        s.push_str("<div class=\"ctx\">");
        for (i, tok) in ctx.tokens.iter().enumerate() {
            let a = ctx.activations.get(i).copied().unwrap_or(0.0);
            let a = if a.is_finite() { a } else { 0.0 };
            let alpha = if max > 0.0 {
                (a.max(0.0) / max).min(1.0)
            } else {
                0.0
            };
            let _ = write!(
                s,
                "<span class=\"tok\" style=\"background:rgba(192,57,43,{alpha:.2})\" title=\"{a:.3}\">{}</span>",
                escape(tok)
            );
        }
        s.push_str("</div>\n");
    }
    let tokens = |label: &str, toks: &[String]| -> String {
        if toks.is_empty() {
            return String::new();
        }
        let list: Vec<String> = toks
            .iter()
            .map(|t| format!("<code>{}</code>", escape(t)))
            .collect();
        format!(
            "<p class=\"tokens\"><span class=\"lbl\">{label}</span> {}</p>\n",
            list.join("")
        )
    };
    s.push_str(&tokens("promotes", &card.promoted));
    s.push_str(&tokens("suppresses", &card.suppressed));
    s.push_str("</article>\n");
    s
}

fn explain_section(ex: &Explanations) -> String {
    let mut s = String::from("<h3>Feature cards</h3>\n");
    if ex.cards.is_empty() {
        s.push_str(&not_run("no feature cards were given"));
    } else {
        s.push_str("<p class=\"note\">Top-activating contexts; a token's shading is its activation over the card's largest. Promoted and suppressed tokens: the decoder direction read through the unembedding.</p>\n<div class=\"cards\">\n");
        for c in &ex.cards {
            s.push_str(&card_html(c));
        }
        s.push_str("</div>\n");
    }
    s.push_str("<h3>Where the update went</h3>\n");
    match &ex.attribution {
        None => s.push_str(&not_run("no attribution of the trained update was given")),
        Some(a) => {
            let svg = Heatmap {
                title: "Share of update energy inside the subspace".into(),
                rows: a.rows.clone(),
                columns: a.columns.clone(),
                values: a.values.clone(),
                color: (0, 114, 178),
            }
            .to_svg();
            s.push_str(&figure(
                svg,
                "Per layer and module: ‖P_U ΔW‖² / ‖ΔW‖² (1 = the whole update lies in the subspace); – where the module was not adapted.",
            ));
        }
    }
    s.push_str("<h3>Activation shift</h3>\n");
    if ex.shifts.is_empty() {
        s.push_str(&not_run("no before/after activations were given"));
    } else {
        s.push_str(
            "<table>\n<thead><tr><th>Hook</th><th class=\"num\">Feature</th><th class=\"num\">Harmful before</th>\
             <th class=\"num\">Harmful after</th><th class=\"num\">Harmless before</th><th class=\"num\">Harmless after</th></tr></thead>\n<tbody>\n",
        );
        for r in &ex.shifts {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td class=\"num\">{}</td>{}{}{}{}</tr>",
                escape(&r.hook_name),
                r.index,
                num_cell(r.harmful_before, 3),
                num_cell(r.harmful_after, 3),
                num_cell(r.harmless_before, 3),
                num_cell(r.harmless_after, 3)
            );
        }
        s.push_str("</tbody>\n</table>\n");
    }
    s
}

pub(super) fn loss_chart(curves: &[LossCurve]) -> String {
    let mut series = Vec::new();
    for (i, c) in curves.iter().enumerate() {
        let color = palette(i).to_string();
        series.push(LineSeries {
            label: format!("{} train", c.label),
            color: color.clone(),
            dashed: false,
            markers: false,
            points: c.train.iter().map(|&(x, y)| (x as f64, y)).collect(),
        });
        if !c.eval.is_empty() {
            series.push(LineSeries {
                label: format!("{} held-out", c.label),
                color,
                dashed: true,
                markers: true,
                points: c.eval.iter().map(|&(x, y)| (x as f64, y)).collect(),
            });
        }
    }
    LineChart {
        title: "Loss on response tokens".into(),
        x_label: "optimizer step".into(),
        y_label: "loss (nats/token)".into(),
        series,
    }
    .to_svg()
}

fn training_section(curves: &[LossCurve]) -> String {
    if curves.is_empty() {
        return not_run("no loss curves were given");
    }
    let mut s = figure(
        loss_chart(curves),
        "Solid: training loss; dashed with markers: held-out loss.",
    );
    s.push_str("<table>\n<thead><tr><th>Run</th><th class=\"num\">Steps</th><th class=\"num\">First train loss</th><th class=\"num\">Last train loss</th><th class=\"num\">Best held-out loss</th><th class=\"num\">Last held-out loss</th></tr></thead>\n<tbody>\n");
    for c in curves {
        let steps = c.train.iter().map(|p| p.0).max().unwrap_or(0);
        let best = c
            .eval
            .iter()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(f64::NAN, f64::min);
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td>{}{}{}{}</tr>",
            escape(&c.label),
            steps,
            num_cell(c.train.first().map_or(f64::NAN, |p| p.1), 4),
            num_cell(c.train.last().map_or(f64::NAN, |p| p.1), 4),
            num_cell(best, 4),
            num_cell(c.eval.last().map_or(f64::NAN, |p| p.1), 4)
        );
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

/// Suite names in display order: harmful, overrefusal, xstest-unsafe, then the rest.
pub(super) fn suite_order(eval: &Evaluation<'_>) -> Vec<String> {
    let mut names: Vec<String> = eval
        .base
        .iter()
        .chain(eval.aligned.iter())
        .flat_map(|m| m.suites.keys().cloned())
        .collect();
    names.sort_by_key(|n| {
        let rank = match n.as_str() {
            "harmful" => 0,
            "overrefusal" => 1,
            "xstest-unsafe" => 2,
            _ => 3,
        };
        (rank, n.clone())
    });
    names.dedup();
    names
}

fn suite_rate<'m>(m: Option<&'m Metrics>, suite: &str) -> Option<&'m Rate> {
    m.and_then(|m| m.suites.get(suite)).map(|s| &s.rate)
}

fn facts_rate(m: Option<&Metrics>) -> Option<&Rate> {
    m.and_then(|m| m.capability.as_ref())
        .map(|c| &c.facts_accuracy)
}

/// Percentage-point change, coloured by whether it is better (`higher_better`).
fn change_cell(
    base: Option<f64>,
    aligned: Option<f64>,
    higher_better: bool,
    points: bool,
) -> String {
    match (base, aligned) {
        (Some(b), Some(a)) if b.is_finite() && a.is_finite() => {
            let d = a - b;
            let class = if d == 0.0 {
                ""
            } else if (d > 0.0) == higher_better {
                " up"
            } else {
                " down"
            };
            let text = if points {
                format!("{:+.1} pts", 100.0 * d)
            } else {
                format!("{d:+.3}")
            };
            format!("<td class=\"num{class}\">{text}</td>")
        }
        _ => "<td class=\"num\">–</td>".into(),
    }
}

pub(super) fn before_after_chart(eval: &Evaluation<'_>) -> String {
    let mut categories: Vec<String> = Vec::new();
    let mut pairs: Vec<(Option<Rate>, Option<Rate>)> = Vec::new();
    for suite in suite_order(eval) {
        let metric = eval
            .base
            .or(eval.aligned)
            .and_then(|m| m.suites.get(&suite))
            .map_or(String::new(), |s| s.metric.clone());
        categories.push(suite_label(&suite, &metric));
        pairs.push((
            suite_rate(eval.base, &suite).copied(),
            suite_rate(eval.aligned, &suite).copied(),
        ));
    }
    if facts_rate(eval.base).is_some() || facts_rate(eval.aligned).is_some() {
        categories.push("Statement accuracy".into());
        pairs.push((
            facts_rate(eval.base).copied(),
            facts_rate(eval.aligned).copied(),
        ));
    }
    let bar = |r: &Option<Rate>| {
        r.filter(|r| r.n > 0).map(|r| Bar {
            value: r.rate,
            whisker: Some((r.lo, r.hi)),
            color: None,
        })
    };
    let series = vec![
        BarSeries {
            label: "base".into(),
            color: "#9aa0a6".into(),
            bars: pairs.iter().map(|p| bar(&p.0)).collect(),
        },
        BarSeries {
            label: "aligned".into(),
            color: "#0072b2".into(),
            bars: pairs.iter().map(|p| bar(&p.1)).collect(),
        },
    ];
    let legend = series
        .iter()
        .map(|s| LegendEntry {
            label: s.label.clone(),
            color: s.color.clone(),
            dashed: false,
        })
        .collect();
    BarChart {
        title: "Base versus aligned".into(),
        y_label: "rate".into(),
        categories,
        series,
        legend,
        y_range: Some((0.0, 1.0)),
        percent: true,
    }
    .to_svg()
}

pub(super) fn tradeoff_chart(eval: &Evaluation<'_>) -> String {
    let mut points = Vec::new();
    let mut push = |label: &str,
                    color: &str,
                    safety: Option<(f64, (f64, f64))>,
                    over: Option<(f64, (f64, f64))>| {
        if let (Some((sy, sye)), Some((ox, oxe))) = (safety, over) {
            points.push(ScatterPoint {
                label: label.to_string(),
                color: color.to_string(),
                x: ox,
                y: sy,
                x_err: Some(oxe),
                y_err: Some(sye),
            });
        }
    };
    let from_rate = |r: Option<&Rate>| r.filter(|r| r.n > 0).map(|r| (r.rate, (r.lo, r.hi)));
    push(
        "base",
        "#9aa0a6",
        from_rate(suite_rate(eval.base, "harmful")),
        from_rate(suite_rate(eval.base, "overrefusal")),
    );
    push(
        "aligned",
        "#0072b2",
        from_rate(suite_rate(eval.aligned, "harmful")),
        from_rate(suite_rate(eval.aligned, "overrefusal")),
    );
    for (i, m) in eval.methods.iter().enumerate() {
        let e = |e: &Option<super::Estimate>| {
            e.map(|e| (e.value, e.bounds().unwrap_or((e.value, e.value))))
        };
        push(&m.method, palette(i + 1), e(&m.safety), e(&m.over_refusal));
    }
    Scatter {
        title: "Safety versus over-refusal".into(),
        x_label: "over-refusal on XSTest safe prompts (lower is better)".into(),
        y_label: "safety rate (higher is better)".into(),
        x_range: None,
        y_range: None,
        percent: true,
        points,
    }
    .to_svg()
}

fn evaluation_section(eval: &Evaluation<'_>) -> String {
    let mut s = String::from("<h3>Base versus aligned</h3>\n");
    if eval.base.is_none() && eval.aligned.is_none() {
        s.push_str(&not_run(
            "neither the base nor the aligned model was evaluated",
        ));
    } else {
        s.push_str("<table>\n<thead><tr><th>Metric</th><th class=\"num\">Base</th><th class=\"num\">Aligned</th><th class=\"num\">Change</th></tr></thead>\n<tbody>\n");
        let rate_cell = |r: Option<&Rate>| {
            format!(
                "<td class=\"num\">{}</td>",
                r.map_or("not run".into(), rate_text)
            )
        };
        for suite in suite_order(eval) {
            let metric = eval
                .base
                .or(eval.aligned)
                .and_then(|m| m.suites.get(&suite))
                .map_or(String::new(), |s| s.metric.clone());
            let (b, a) = (
                suite_rate(eval.base, &suite),
                suite_rate(eval.aligned, &suite),
            );
            let _ = writeln!(
                s,
                "<tr><td>{}</td>{}{}{}</tr>",
                escape(&suite_label(&suite, &metric)),
                rate_cell(b),
                rate_cell(a),
                change_cell(
                    b.map(|r| r.rate),
                    a.map(|r| r.rate),
                    // Over-refusal, the built-in suite's or the user's benign prompts': lower is better.
                    !matches!(suite.as_str(), "overrefusal" | "user-benign"),
                    true
                )
            );
        }
        let (b, a) = (facts_rate(eval.base), facts_rate(eval.aligned));
        let _ = writeln!(
            s,
            "<tr><td>Statement accuracy</td>{}{}{}</tr>",
            rate_cell(b),
            rate_cell(a),
            change_cell(b.map(|r| r.rate), a.map(|r| r.rate), true, true)
        );
        let nll = |m: Option<&Metrics>| m.and_then(|m| m.capability.as_ref()).map(|c| c.alpaca_nll);
        let nll_cell = |v: Option<f64>| match v {
            Some(v) if v.is_finite() => format!("<td class=\"num\">{v:.3}</td>"),
            _ => "<td class=\"num\">not run</td>".into(),
        };
        let _ = writeln!(
            s,
            "<tr><td>Alpaca NLL (nats/token)</td>{}{}{}</tr>",
            nll_cell(nll(eval.base)),
            nll_cell(nll(eval.aligned)),
            change_cell(nll(eval.base), nll(eval.aligned), false, false)
        );
        let wall = |m: Option<&Metrics>| {
            m.and_then(|m| m.throughput.as_ref())
                .map_or("–".into(), |t| duration(t.seconds))
        };
        let _ = writeln!(
            s,
            "<tr><td>Generation wall time</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td></td></tr>",
            wall(eval.base),
            wall(eval.aligned)
        );
        let _ = writeln!(
            s,
            "<tr><td>Parameters trained</td><td class=\"num\">0 %</td><td class=\"num\">{}</td><td></td></tr>",
            eval.aligned_trained_share
                .map_or("–".into(), |v| format!("{:.3} %", 100.0 * v))
        );
        s.push_str("</tbody>\n</table>\n<p class=\"note\">Rates with Wilson 95 % intervals and counts. Safety rate: share of harmful prompts not complied with; over-refusal: share of XSTest's safe prompts refused.</p>\n");
        if let Some(note) = super::gate_note(eval.aligned) {
            let _ = writeln!(s, "<p class=\"note\">{}</p>", escape(&note));
        }
        s.push_str(&figure(
            before_after_chart(eval),
            "Whiskers: Wilson 95 % intervals.",
        ));
    }
    s.push_str("<h3>Under attack</h3>\n");
    if eval.attacks.is_empty() {
        s.push_str(&not_run(
            "the attack suite was not run (`[eval] attacks = true`, or `sails eval --suite attacks`)",
        ));
    } else {
        s.push_str("<table>\n<thead><tr><th>Attack</th><th class=\"num\">Base: success</th><th class=\"num\">Aligned: success</th><th class=\"num\">Change</th><th class=\"num\">McNemar p</th></tr></thead>\n<tbody>\n");
        for line in &eval.attacks {
            let cell = |r: &Option<Rate>| {
                format!(
                    "<td class=\"num\">{}</td>",
                    r.as_ref().map_or("not run".into(), rate_text)
                )
            };
            let _ = writeln!(
                s,
                "<tr><td>{}</td>{}{}{}<td class=\"num\">{}</td></tr>",
                escape(&line.attack),
                cell(&line.base),
                cell(&line.aligned),
                change_cell(
                    line.base.map(|r| r.rate),
                    line.aligned.map(|r| r.rate),
                    false,
                    true
                ),
                line.paired
                    .as_ref()
                    .map_or("–".into(), |d| format!("{:.2e}", d.mcnemar.p_value))
            );
        }
        s.push_str("</tbody>\n</table>\n<p class=\"note\">Attack success: share of the harmful behaviours whose reply is labelled complied, with Wilson 95 % intervals; McNemar's test pairs the base and the aligned reply to each behaviour under the same attack.</p>\n");
    }
    s.push_str("<h3>Methods compared</h3>\n");
    if eval.methods.is_empty() {
        s.push_str(&not_run("no method comparison was given"));
    } else {
        s.push_str("<table class=\"wide\">\n<thead><tr><th>Method</th><th class=\"num\">Seeds</th><th class=\"num\">Safety rate</th><th class=\"num\">Over-refusal</th><th class=\"num\">Broken by an attack</th><th class=\"num\">Statement accuracy</th><th class=\"num\">Alpaca NLL</th><th class=\"num\">Params trained</th><th class=\"num\">Wall time</th></tr></thead>\n<tbody>\n");
        for m in &eval.methods {
            let p = |e: &Option<super::Estimate>| e.as_ref().map_or("–".into(), estimate_pct);
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&m.method),
                m.seeds,
                p(&m.safety),
                p(&m.over_refusal),
                p(&m.attack_success),
                p(&m.facts_accuracy),
                m.alpaca_nll.as_ref().map_or("–".into(), estimate_num),
                m.trained_share.map_or("–".into(), |v| format!("{:.3} %", 100.0 * v)),
                m.wall_seconds.map_or("–".into(), duration)
            );
        }
        s.push_str("</tbody>\n</table>\n<p class=\"note\">Over seeds: mean ± standard deviation; a single run: value [95 % interval].</p>\n");
    }
    s.push_str(&figure(
        tradeoff_chart(eval),
        "Upper left is best. Error bars: 95 % intervals (base, aligned) or ± one standard deviation over seeds (methods).",
    ));
    if let Some(f) = &eval.frontier {
        s.push_str("<h3>Safety / over-refusal frontier</h3>\n");
        s.push_str(&figure(
            frontier_chart(f),
            "Each method's adapter evaluated at several scales of its update (×0 is the base model), joined in scale order. Large points: mean over seeds, bars: Wilson 95 % intervals of all seeds' prompts pooled; faint points: single seeds. Upper left is best: more safety at equal over-refusal.",
        ));
        if !f.tests.is_empty() {
            s.push_str("<table>\n<thead><tr><th>A − B</th><th class=\"num\">Δ(safety − over-refusal)</th><th class=\"num\">95 % interval</th><th class=\"num\">p</th><th class=\"num\">per seed</th><th class=\"num\">prompts</th></tr></thead>\n<tbody>\n");
            for t in &f.tests {
                let _ = writeln!(
                    s,
                    "<tr><td>{} − {}</td><td class=\"num\">{:+.3}</td><td class=\"num\">[{:+.3}, {:+.3}]</td><td class=\"num\">{:.4}</td><td class=\"num\">{}</td><td class=\"num\">{} + {}</td></tr>",
                    escape(&t.method_a),
                    escape(&t.method_b),
                    t.diff.diff,
                    t.diff.lo,
                    t.diff.hi,
                    t.diff.p_value,
                    per_seed_text(&t.per_seed),
                    t.diff.harmful_items,
                    t.diff.overrefusal_items
                );
            }
            let resamples = f.tests.first().map_or(0, |t| t.diff.resamples);
            let _ = writeln!(
                s,
                "</tbody>\n</table>\n<p class=\"note\">Difference in safety − over-refusal, averaged over the scales and seeds, on the same prompts (harmful + XSTest safe). p: sign-flip permutation test over prompts; interval: bootstrap over prompts within each suite ({resamples} resamples each, fixed seed). The adapters are taken as given; the per-seed column shows how much training seeds move the figure.</p>"
            );
        }
    }
    s
}

pub(super) fn frontier_chart(f: &super::Frontier) -> String {
    let series = f
        .methods
        .iter()
        .enumerate()
        .map(|(i, m)| FrontierSeries {
            label: m.method.clone(),
            color: palette(i + 1).into(),
            points: m
                .points
                .iter()
                .map(|p| ScatterPoint {
                    label: format!("×{}", p.scale),
                    color: palette(i + 1).into(),
                    x: p.over_refusal.value,
                    y: p.safety.value,
                    x_err: p.over_refusal.bounds(),
                    y_err: p.safety.bounds(),
                })
                .collect(),
            faint: m.points.iter().flat_map(|p| p.per_seed.clone()).collect(),
        })
        .collect();
    FrontierChart {
        title: "Safety versus over-refusal along the adapter scale".into(),
        x_label: "over-refusal on XSTest safe prompts (lower is better)".into(),
        y_label: "safety rate (higher is better)".into(),
        series,
    }
    .to_svg()
}

fn badge(refused: bool) -> &'static str {
    if refused {
        "<span class=\"badge refused\">refused</span>"
    } else {
        "<span class=\"badge complied\">complied</span>"
    }
}

fn examples_section(examples: &[Example]) -> String {
    if examples.is_empty() {
        return not_run("no example generations were given");
    }
    let mut s = String::new();
    for e in examples {
        let _ = writeln!(
            s,
            "<article class=\"example\">\n<p class=\"prompt\">{}<span class=\"tag\">{}</span></p>\n\
             <div class=\"pair\">\n<div><b>Base</b> {}<div class=\"resp\">{}</div></div>\n\
             <div><b>Aligned</b> {}<div class=\"resp\">{}</div></div>\n</div>\n</article>",
            escape(&e.prompt),
            escape(&e.suite),
            badge(e.base_refused),
            escape(&e.base_response),
            badge(e.aligned_refused),
            escape(&e.aligned_response)
        );
    }
    s
}
