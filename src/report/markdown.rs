//! `summary.md`: the headline numbers and tables, readable as plain text.

use super::html::suite_order;
use super::{
    duration, estimate_num, estimate_pct, pct, per_seed_text, rate_text, suite_label, ReportInputs,
    SECTIONS,
};
use std::fmt::Write as _;

/// Text safe inside a Markdown table cell or line: no line breaks, pipes escaped, and no raw
/// HTML (renderers would otherwise interpret it).
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '`' => out.push('\''),
            '\n' | '\r' | '\t' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

/// The first `n` characters of `s`, with an ellipsis when cut.
fn clip(s: &str, n: usize) -> String {
    let mut it = s.chars();
    let head: String = it.by_ref().take(n).collect();
    if it.next().is_some() {
        head + "…"
    } else {
        head
    }
}

fn heading(s: &mut String, i: usize) {
    let _ = writeln!(s, "\n## {}\n", SECTIONS[i].1);
}

fn not_run(s: &mut String, what: &str) {
    let _ = writeln!(s, "_Not run: {what}._");
}

/// Renders the summary as Markdown.
pub fn render_markdown(inputs: &ReportInputs<'_>) -> String {
    let run = &inputs.run;
    let mut s = format!("# SAILS report: {}\n\n", md(&run.name));
    for (k, v) in [
        ("Model", &run.model),
        ("Preset", &run.preset),
        ("Created", &run.created),
    ] {
        if let Some(v) = v {
            let _ = writeln!(s, "- {k}: {}", md(v));
        }
    }
    if let Some(p) = &run.manifest_path {
        let _ = writeln!(s, "- Manifest: {}", md(&p.display().to_string()));
    }
    if !run.versions.is_empty() {
        let v: Vec<String> = run
            .versions
            .iter()
            .map(|(k, v)| format!("{} {}", md(k), md(v)))
            .collect();
        let _ = writeln!(s, "- Versions: {}", v.join(", "));
    }
    let missing = inputs.missing();
    if !missing.is_empty() {
        let _ = writeln!(s, "- Not run or not given: {}", missing.join(", "));
    }

    heading(&mut s, 0);
    if run.stages.is_empty() {
        not_run(&mut s, "no stage timings were recorded");
    } else {
        s.push_str("| Stage | Wall time | Status |\n|---|---:|---|\n");
        for st in &run.stages {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                md(&st.stage),
                duration(st.seconds),
                if st.skipped { "reused" } else { "ran" }
            );
        }
    }

    heading(&mut s, 1);
    match inputs.selection {
        None => not_run(&mut s, "no feature selection"),
        Some(sel) => {
            let _ = writeln!(
                s,
                "{} harmful and {} harmless prompts; top {} per layer.",
                sel.harmful.count, sel.harmless.count, sel.config.top_k
            );
            for layer in &sel.layers {
                let _ = writeln!(
                    s,
                    "\n### {}\n\n| Rank | Feature | Δ | Diff 95 % CI | Freq harmful | Freq harmless | d | Robust |\n|---:|---:|---:|---:|---:|---:|---:|---|",
                    md(&layer.hook_name)
                );
                for f in layer.features.iter().take(10) {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.3} | [{:.3}, {:.3}] | {} | {} | {:.2} | {} |",
                        f.rank + 1,
                        f.index,
                        f.delta,
                        f.diff_ci95[0],
                        f.diff_ci95[1],
                        pct(f.freq_harmful),
                        pct(f.freq_harmless),
                        f.effect_size,
                        if f.robust { "yes" } else { "no" }
                    );
                }
            }
        }
    }

    heading(&mut s, 2);
    match inputs.subspace {
        None => not_run(&mut s, "no subspace"),
        Some(sub) => {
            let _ = writeln!(
                s,
                "Rank {}, τ = {}.\n\n| Hook | Rows used | Components for τ | Energy kept | Truncated | Padded |\n|---|---:|---:|---:|---:|---:|",
                sub.config.rank, sub.config.energy_frac
            );
            for l in &sub.layers {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    l.hook,
                    l.rows_used,
                    l.components_for_tau,
                    pct(l.energy_kept),
                    l.truncated,
                    l.padded + l.padded_random
                );
            }
        }
    }

    heading(&mut s, 3);
    match &inputs.explanations {
        None => not_run(&mut s, "no explanations"),
        Some(ex) => {
            let _ = writeln!(
                s,
                "{} feature cards, {} activation shifts; attribution {}.",
                ex.cards.len(),
                ex.shifts.len(),
                if ex.attribution.is_some() {
                    "in the HTML report"
                } else {
                    "not run"
                }
            );
            for c in &ex.cards {
                let promoted: Vec<String> = c.promoted.iter().take(8).map(|t| md(t)).collect();
                let _ = writeln!(
                    s,
                    "- {} #{}: Δ {:.3}; promotes {}",
                    md(&c.hook_name),
                    c.index,
                    c.delta,
                    if promoted.is_empty() {
                        "–".to_string()
                    } else {
                        promoted.join(", ")
                    }
                );
            }
        }
    }

    heading(&mut s, 4);
    match inputs.training.as_deref() {
        None | Some([]) => not_run(&mut s, "no loss curves"),
        Some(curves) => {
            s.push_str(
                "| Run | Steps | Last train loss | Last held-out loss |\n|---|---:|---:|---:|\n",
            );
            for c in curves {
                let last =
                    |v: &[(u64, f64)]| v.last().map_or("–".into(), |p| format!("{:.4}", p.1));
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    md(&c.label),
                    c.train.iter().map(|p| p.0).max().unwrap_or(0),
                    last(&c.train),
                    last(&c.eval)
                );
            }
        }
    }

    heading(&mut s, 5);
    match &inputs.evaluation {
        None => not_run(&mut s, "no evaluation"),
        Some(eval) => {
            if eval.base.is_some() || eval.aligned.is_some() {
                s.push_str("| Metric | Base | Aligned |\n|---|---:|---:|\n");
                for suite in suite_order(eval) {
                    let get = |m: Option<&crate::eval::Metrics>| {
                        m.and_then(|m| m.suites.get(&suite))
                            .map_or("not run".into(), |x| rate_text(&x.rate))
                    };
                    let metric = eval
                        .base
                        .or(eval.aligned)
                        .and_then(|m| m.suites.get(&suite))
                        .map_or(String::new(), |x| x.metric.clone());
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} |",
                        md(&suite_label(&suite, &metric)),
                        get(eval.base),
                        get(eval.aligned)
                    );
                }
                let facts = |m: Option<&crate::eval::Metrics>| {
                    m.and_then(|m| m.capability.as_ref())
                        .map_or("not run".into(), |c| rate_text(&c.facts_accuracy))
                };
                let nll = |m: Option<&crate::eval::Metrics>| {
                    m.and_then(|m| m.capability.as_ref())
                        .map_or("not run".into(), |c| format!("{:.3}", c.alpaca_nll))
                };
                let _ = writeln!(
                    s,
                    "| Statement accuracy | {} | {} |",
                    facts(eval.base),
                    facts(eval.aligned)
                );
                let _ = writeln!(
                    s,
                    "| Alpaca NLL | {} | {} |",
                    nll(eval.base),
                    nll(eval.aligned)
                );
                if let Some(note) = super::gate_note(eval.aligned) {
                    let _ = writeln!(s, "\n{note}");
                }
            } else {
                not_run(
                    &mut s,
                    "neither the base nor the aligned model was evaluated",
                );
            }
            if !eval.attacks.is_empty() {
                s.push_str(
                    "\n| Attack: success | Base | Aligned | McNemar p |\n|---|---:|---:|---:|\n",
                );
                for line in &eval.attacks {
                    let rate = |r: &Option<crate::eval::metrics::Rate>| {
                        r.as_ref().map_or("not run".into(), rate_text)
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} |",
                        md(&line.attack),
                        rate(&line.base),
                        rate(&line.aligned),
                        line.paired
                            .as_ref()
                            .map_or("–".into(), |d| format!("{:.2e}", d.mcnemar.p_value))
                    );
                }
            }
            if !eval.methods.is_empty() {
                s.push_str("\n| Method | Seeds | Safety rate | Over-refusal | Broken by an attack | Statement accuracy | Alpaca NLL | Params trained |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
                for m in &eval.methods {
                    let p =
                        |e: &Option<super::Estimate>| e.as_ref().map_or("–".into(), estimate_pct);
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        md(&m.method),
                        m.seeds,
                        p(&m.safety),
                        p(&m.over_refusal),
                        p(&m.attack_success),
                        p(&m.facts_accuracy),
                        m.alpaca_nll.as_ref().map_or("–".into(), estimate_num),
                        m.trained_share
                            .map_or("–".into(), |v| format!("{:.3} %", 100.0 * v))
                    );
                }
            }
            if let Some(f) = &eval.frontier {
                s.push_str("\nFrontier (adapter scale; mean over seeds [pooled Wilson 95 %]):\n\n| Method | Scale | Safety rate | Over-refusal |\n|---|---:|---:|---:|\n");
                for m in &f.methods {
                    for p in &m.points {
                        let _ = writeln!(
                            s,
                            "| {} | ×{} | {} | {} |",
                            md(&m.method),
                            p.scale,
                            estimate_pct(&p.safety),
                            estimate_pct(&p.over_refusal)
                        );
                    }
                }
                for t in &f.tests {
                    let _ = writeln!(
                        s,
                        "\n{} − {}: Δ(safety − over-refusal) = {:+.3} [{:+.3}, {:+.3}], p = {:.4} \
                         (sign-flip over {} + {} prompts); per seed {}.",
                        md(&t.method_a),
                        md(&t.method_b),
                        t.diff.diff,
                        t.diff.lo,
                        t.diff.hi,
                        t.diff.p_value,
                        t.diff.harmful_items,
                        t.diff.overrefusal_items,
                        per_seed_text(&t.per_seed)
                    );
                }
            }
        }
    }

    heading(&mut s, 6);
    match inputs.examples.as_deref() {
        None | Some([]) => not_run(&mut s, "no example generations"),
        Some(examples) => {
            s.push_str("| Suite | Prompt | Base | Aligned |\n|---|---|---|---|\n");
            let verdict = |r: bool| if r { "refused" } else { "complied" };
            for e in examples {
                let _ = writeln!(
                    s,
                    "| {} | {} | {}: {} | {}: {} |",
                    md(&e.suite),
                    md(&clip(&e.prompt, 120)),
                    verdict(e.base_refused),
                    md(&clip(&e.base_response, 100)),
                    verdict(e.aligned_refused),
                    md(&clip(&e.aligned_response, 100))
                );
            }
        }
    }
    s.push_str("\nFigures, feature cards and full responses: report.html.\n");
    s
}
