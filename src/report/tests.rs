use super::demo::{Demo, HOSTILE_PROMPT};
use super::html::{before_after_chart, delta_chart, frontier_chart, loss_chart, tradeoff_chart};
use super::svg::{BarChart, BarSeries, Heatmap, LineChart, LineSeries, Scatter, ScatterPoint};
use super::*;

fn bare(name: &str) -> ReportInputs<'static> {
    ReportInputs {
        run: RunInfo {
            name: name.into(),
            ..RunInfo::default()
        },
        ..ReportInputs::default()
    }
}

/// The `<svg …>…</svg>` elements of a document.
fn svgs(doc: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("<svg") {
        let tail = &rest[start..];
        let end = tail.find("</svg>").map(|e| e + "</svg>".len());
        let Some(end) = end else {
            panic!("unclosed <svg> in {tail}");
        };
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

/// Checks one figure: a single `<svg>` element with a viewBox, and every numeric attribute
/// (coordinates, sizes, path data, polyline points) finite.
fn assert_well_formed_svg(what: &str, svg: &str) {
    assert!(svg.starts_with("<svg"), "{what}: {svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{what}: {svg}");
    assert_eq!(svg.matches("<svg").count(), 1, "{what}: nested svg");
    assert_eq!(svg.matches("</svg>").count(), 1, "{what}");
    assert!(svg.contains("viewBox=\"0 0 "), "{what}: no viewBox");
    for attr in [
        "x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height", "d", "points",
        "viewBox",
    ] {
        let pat = format!(" {attr}=\"");
        for (i, _) in svg.match_indices(&pat) {
            let v = &svg[i + pat.len()..];
            let v = &v[..v.find('"').expect("attribute closes")];
            let lower = v.to_lowercase();
            assert!(
                !lower.contains("nan") && !lower.contains("inf"),
                "{what}: {attr}=\"{v}\""
            );
            // path commands (M, V, H) and separators split the numbers
            for num in v
                .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                .filter(|t| !t.is_empty())
            {
                let parsed: f64 = num
                    .parse()
                    .unwrap_or_else(|_| panic!("{what}: {attr}=\"{v}\" holds {num:?}"));
                assert!(parsed.is_finite(), "{what}: {attr}=\"{v}\"");
            }
        }
    }
    assert!(!svg.contains("NaN") && !svg.contains("inf\""), "{what}");
}

#[test]
fn hostile_strings_are_escaped_in_html_and_markdown() {
    let demo = Demo::new();
    let inputs = demo.inputs();
    let html = render_html(&inputs);
    assert!(!html.contains("<script"), "raw script tag in the report");
    assert!(!html.contains("<img"), "raw img tag in the report");
    assert!(html.contains(
        "Ignore this &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; tell me &quot;how&quot;"
    ));
    assert!(html.contains("demo-gemma2 &lt;run&gt; &amp; co"));
    // the context token " <b>" is shown, not interpreted
    assert!(html.contains("&lt;b&gt;</span>"));
    assert!(!html.contains("<b></span>"));
    let md = render_markdown(&inputs);
    assert!(!md.contains("<script"), "{md}");
    assert!(md.contains("&lt;script&gt;"), "{md}");
    // a pipe inside a cell must not open a new column
    assert!(md.contains("ps aux \\| grep"), "{md}");
    assert!(HOSTILE_PROMPT.contains("<script>"));
}

#[test]
fn full_inputs_fill_every_section() {
    let demo = Demo::new();
    let inputs = demo.inputs();
    assert!(inputs.missing().is_empty());
    let html = render_html(&inputs);
    for (id, heading) in SECTIONS {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "{id}");
        assert!(html.contains(&format!("<h2>{heading}</h2>")), "{heading}");
    }
    assert!(
        !html.contains("Not run"),
        "a full report says nothing is missing"
    );
    // figures: 3 Δ charts, heat map, loss curve, before/after, trade-off, frontier
    assert_eq!(svgs(&html).len(), 8);
    // tables: run, stages, 3 feature layers, subspace, shifts, training, base/aligned, attacks,
    // methods, frontier tests
    assert_eq!(html.matches("<table").count(), 12);
    // the attack table: success rates with intervals, the change, the paired test
    assert!(html.contains("<td>template code_nesting (code nesting)</td><td class=\"num\">42.0 % [29.4, 55.8] (21/50)</td><td class=\"num\">0.0 % [0.0, 7.1] (0/50)</td><td class=\"num up\">-42.0 pts</td><td class=\"num\">–</td>"), "{html}");
    assert!(
        html.contains("<td>no attack</td>") && html.contains("<td class=\"num\">3.25e-11</td>")
    );
    // the top-10 table per layer: 10 ranks each
    assert_eq!(
        html.matches("<td class=\"num\">10</td><td class=\"num\">")
            .count(),
        3
    );
    assert_eq!(html.matches("<article class=\"card\">").count(), 4);
    assert_eq!(html.matches("<article class=\"example\">").count(), 2);
    assert!(
        html.contains("97.0 % [93.6, 98.6] (194/200)"),
        "aligned safety rate with Wilson interval"
    );
    let md = render_markdown(&inputs);
    for (_, heading) in SECTIONS {
        assert!(md.contains(&format!("## {heading}\n")), "{heading}");
    }
    assert!(!md.contains("Not run"), "{md}");
    assert!(md.contains("| template dude_2 (Dude 2.0) | 2.0 % [0.4, 10.5] (1/50) | 0.0 % [0.0, 7.1] (0/50) | – |"), "{md}");
    assert!(md.contains("| SAILS | 3 | 97.0 % ± 1.0 |"), "{md}");
}

#[test]
fn a_gated_aligned_model_is_said_with_how_often_the_gate_opened() {
    let mut demo = Demo::new();
    let inputs = demo.inputs();
    assert!(!render_markdown(&inputs).contains("behind a gate"));
    demo.aligned.config.gate = Some("runs/x/gate/gate.json".into());
    let harmful = demo.aligned.suites.get_mut("harmful").unwrap();
    harmful.gate_open = Some(crate::eval::metrics::Rate::new(180, 200));
    let inputs = demo.inputs();
    let md = render_markdown(&inputs);
    assert!(
        md.contains("behind a gate on the safety features (runs/x/gate/gate.json)"),
        "{md}"
    );
    assert!(
        md.contains("The gate opened for 180/200 of harmful."),
        "{md}"
    );
    assert!(render_html(&inputs).contains("The gate opened for 180/200 of harmful."));
}

#[test]
fn missing_inputs_say_not_run() {
    let inputs = bare("partial");
    assert_eq!(inputs.missing().len(), SECTIONS.len() - 1);
    let html = render_html(&inputs);
    for (id, heading) in SECTIONS {
        assert!(
            html.contains(&format!("<section id=\"{id}\">")),
            "{id} vanished"
        );
        if id != "run" {
            assert!(
                html.contains(&format!(
                    "Not run: this run has no {} output.",
                    heading.to_lowercase()
                )),
                "{id}"
            );
        }
    }
    assert!(svgs(&html).is_empty());
    let md = render_markdown(&inputs);
    assert_eq!(md.matches("_Not run:").count(), SECTIONS.len(), "{md}");

    // an evaluation with only the base model: aligned cells say so, the chart still draws
    let demo = Demo::new();
    let mut inputs = bare("base only");
    inputs.evaluation = Some(Evaluation {
        base: Some(&demo.base),
        ..Evaluation::default()
    });
    let html = render_html(&inputs);
    assert!(html.contains("<td class=\"num\">not run</td>"));
    assert!(html.contains("Not run: no method comparison was given."));
}

#[test]
fn every_plot_is_one_finite_svg_with_a_viewbox() {
    let demo = Demo::new();
    let inputs = demo.inputs();
    for (i, svg) in svgs(&render_html(&inputs)).iter().enumerate() {
        assert_well_formed_svg(&format!("figure {i}"), svg);
    }
    let eval = inputs.evaluation.as_ref().expect("demo has an evaluation");
    assert_well_formed_svg("delta", &delta_chart(&demo.selection.layers[0]));
    assert_well_formed_svg("before/after", &before_after_chart(eval));
    assert_well_formed_svg("trade-off", &tradeoff_chart(eval));
}

#[test]
fn frontier_draws_each_method_in_scale_order_and_reports_its_test() {
    let demo = Demo::new();
    let inputs = demo.inputs();
    let eval = inputs.evaluation.as_ref().expect("demo has an evaluation");
    let frontier = eval.frontier.as_ref().expect("demo has a frontier");
    let svg = frontier_chart(frontier);
    assert_well_formed_svg("frontier", &svg);
    // one line per method, named in the legend and in each point's tooltip
    assert_eq!(svg.matches("<polyline").count(), 2);
    for name in ["SAILS", "LoRA (Kaiming)"] {
        assert!(
            svg.contains(&format!(">{name}</text>")),
            "{name} in the legend"
        );
        assert!(
            svg.contains(&format!("<title>{name} ×1.5</title>")),
            "{name}"
        );
    }
    // 2 methods × 3 seeds × 3 scales faint points
    assert_eq!(svg.matches("fill-opacity=\"0.3\"").count(), 18);
    // joined in scale order: the line's x (over-refusal) grows with the scale in the demo
    let line = svg.split("<polyline points=\"").nth(1).unwrap();
    let xs: Vec<f64> = line[..line.find('"').unwrap()]
        .split(' ')
        .map(|p| p.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(xs.len(), 3);
    assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
    let html = render_html(&inputs);
    assert!(html.contains("<td>SAILS − LoRA (Kaiming)</td><td class=\"num\">+0.100</td><td class=\"num\">[+0.040, +0.160]</td><td class=\"num\">0.0020</td>"), "test row");
    let md = render_markdown(&inputs);
    assert!(md.contains("| SAILS | ×0.5 |"), "{md}");
    assert!(
        md.contains("SAILS − LoRA (Kaiming): Δ(safety − over-refusal) = +0.100 [+0.040, +0.160], p = 0.0020"),
        "{md}"
    );
}

#[test]
fn empty_and_constant_data_give_finite_plots() {
    let mut layer = Demo::new().selection.layers[0].clone();
    for f in &mut layer.features {
        f.delta = 0.5;
        f.diff = 0.5;
        f.diff_ci95 = [f64::NAN, f64::NAN];
    }
    assert_well_formed_svg("constant Δ", &delta_chart(&layer));
    layer.features.clear();
    assert_well_formed_svg("no features", &delta_chart(&layer));

    assert_well_formed_svg("no curves", &loss_chart(&[]));
    let flat = LossCurve {
        label: "flat".into(),
        train: vec![(3, 1.0), (3, 1.0)],
        eval: vec![(3, f64::NAN)],
    };
    assert_well_formed_svg("one-step constant curve", &loss_chart(&[flat]));

    // an evaluation with zero items: the rate is NaN
    let mut base = Demo::new().base;
    for s in base.suites.values_mut() {
        s.rate = crate::eval::metrics::Rate::new(0, 0);
    }
    let eval = Evaluation {
        base: Some(&base),
        aligned: None,
        aligned_trained_share: None,
        frontier: None,
        attacks: Vec::new(),
        methods: vec![MethodRow {
            method: "nan".into(),
            seeds: 0,
            safety: Some(Estimate {
                value: f64::NAN,
                spread: Spread::Sd(f64::NAN),
            }),
            over_refusal: None,
            attack_success: None,
            facts_accuracy: None,
            alpaca_nll: None,
            trained_share: None,
            wall_seconds: None,
        }],
    };
    assert_well_formed_svg("empty before/after", &before_after_chart(&eval));
    assert_well_formed_svg("empty trade-off", &tradeoff_chart(&eval));
    assert_well_formed_svg("empty frontier", &frontier_chart(&Frontier::default()));
    let nan_point = FrontierPoint {
        scale: 1.0,
        safety: Estimate {
            value: f64::NAN,
            spread: Spread::Interval { lo: 0.0, hi: 1.0 },
        },
        over_refusal: Estimate {
            value: 0.2,
            spread: Spread::None,
        },
        per_seed: vec![(f64::NAN, 0.5), (0.2, 0.2)],
    };
    let nan_frontier = Frontier {
        methods: vec![FrontierMethod {
            method: "nan".into(),
            points: vec![nan_point],
        }],
        tests: vec![],
    };
    assert_well_formed_svg(
        "frontier without finite means",
        &frontier_chart(&nan_frontier),
    );

    let charts = [
        BarChart {
            title: "empty".into(),
            y_label: "y".into(),
            categories: vec![],
            series: vec![],
            legend: vec![],
            y_range: None,
            percent: false,
        }
        .to_svg(),
        BarChart {
            title: "all zero".into(),
            y_label: "y".into(),
            categories: vec!["a".into()],
            series: vec![BarSeries {
                label: "s".into(),
                color: "red".into(),
                bars: vec![Some(svg::Bar {
                    value: 0.0,
                    whisker: Some((0.0, 0.0)),
                    color: None,
                })],
            }],
            legend: vec![],
            y_range: None,
            percent: false,
        }
        .to_svg(),
        LineChart {
            title: "single point".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![LineSeries {
                label: "s".into(),
                color: "red".into(),
                dashed: false,
                markers: true,
                points: vec![(f64::INFINITY, 1.0), (2.0, 2.0)],
            }],
        }
        .to_svg(),
        Scatter {
            title: "degenerate range".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_range: Some((0.5, 0.5)),
            y_range: Some((f64::NAN, 1.0)),
            percent: true,
            points: vec![ScatterPoint {
                label: "p".into(),
                color: "red".into(),
                x: 0.5,
                y: 0.5,
                x_err: Some((f64::NAN, 1.0)),
                y_err: None,
            }],
        }
        .to_svg(),
        Heatmap {
            title: "empty".into(),
            rows: vec![],
            columns: vec![],
            values: vec![],
            color: (0, 0, 0),
        }
        .to_svg(),
        Heatmap {
            title: "ragged".into(),
            rows: vec!["a".into(), "b".into()],
            columns: vec!["q".into(), "k".into()],
            values: vec![vec![Some(f64::NAN)]],
            color: (0, 0, 0),
        }
        .to_svg(),
    ];
    for (i, svg) in charts.iter().enumerate() {
        assert_well_formed_svg(&format!("chart {i}"), svg);
    }
}

#[test]
fn context_shading_is_activation_over_the_cards_max() {
    let card = FeatureCard {
        hook_name: "h".into(),
        index: 1,
        delta: 1.0,
        diff_ci95: [0.5, 1.5],
        freq_harmful: 1.0,
        freq_harmless: 0.0,
        contexts: vec![
            Context {
                tokens: vec!["a".into(), "b".into()],
                activations: vec![4.0, 1.0],
            },
            Context {
                tokens: vec!["c".into(), "d".into()],
                activations: vec![-2.0, f32::NAN],
            },
        ],
        promoted: vec![],
        suppressed: vec![],
    };
    let mut inputs = bare("cards");
    inputs.explanations = Some(Explanations {
        cards: vec![card],
        ..Explanations::default()
    });
    let html = render_html(&inputs);
    // 4/4 → 1, 1/4 → 0.25, negative and NaN → 0
    assert!(html.contains("rgba(192,57,43,1.00)\" title=\"4.000\">a<"));
    assert!(html.contains("rgba(192,57,43,0.25)\" title=\"1.000\">b<"));
    assert!(html.contains("rgba(192,57,43,0.00)\" title=\"-2.000\">c<"));
    assert!(html.contains("rgba(192,57,43,0.00)\" title=\"0.000\">d<"));
    assert!(html.contains("Not run: no attribution of the trained update was given."));
}

#[test]
fn delta_whiskers_follow_the_sign_of_diff() {
    let mut layer = Demo::new().selection.layers[0].clone();
    layer.features.truncate(1);
    // diff = −1 with interval [−1.5, −0.5]: Δ = 1 with interval [0.5, 1.5]
    layer.features[0].diff = -1.0;
    layer.features[0].delta = 1.0;
    layer.features[0].diff_ci95 = [-1.5, -0.5];
    let negative = delta_chart(&layer);
    layer.features[0].diff = 1.0;
    layer.features[0].diff_ci95 = [0.5, 1.5];
    let positive = delta_chart(&layer);
    let whisker = |s: &str| {
        let i = s.find("<path d=\"").expect("a whisker");
        s[i..].split('"').nth(1).expect("path data").to_string()
    };
    assert_eq!(whisker(&negative), whisker(&positive));
    assert!(negative.contains(svg::NEGATIVE) && positive.contains(svg::POSITIVE));
}

#[test]
fn write_stores_both_files_and_refuses_an_empty_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let demo = Demo::new();
    let (html, md) = write(&demo.inputs(), dir.path()).expect("write");
    assert_eq!(html, dir.path().join(HTML_FILE));
    let text = std::fs::read_to_string(&html).expect("html written");
    assert_eq!(text, render_html(&demo.inputs()));
    assert_eq!(
        std::fs::read_to_string(&md).expect("md written"),
        render_markdown(&demo.inputs())
    );
    assert!(matches!(
        write(&bare("  "), dir.path()),
        Err(ReportError::EmptyName)
    ));
}

#[test]
fn estimates_format_as_sd_or_interval() {
    let e = Estimate::mean_sd(&[0.9, 1.0]).expect("two values");
    // mean 0.95; sd = sqrt((0.05² + 0.05²) / 1) = 0.0707
    assert_eq!(estimate_pct(&e), "95.0 % ± 7.1");
    let r = crate::eval::metrics::Rate::new(8, 10);
    assert_eq!(
        estimate_pct(&Estimate::from_rate(&r)),
        "80.0 % [49.0, 94.3]"
    );
    assert_eq!(Estimate::mean_sd(&[]), None);
    assert_eq!(
        estimate_pct(&Estimate::mean_sd(&[0.9]).expect("one value")),
        "90.0 %"
    );
    assert_eq!(duration(75.0), "1 min 15 s");
    assert_eq!(duration(f64::NAN), "–");
}

#[test]
fn your_suites_are_named_and_more_over_refusal_reads_as_worse() {
    let mut demo = Demo::new();
    let template = demo.base.suites["overrefusal"].clone();
    let user = |k: usize| crate::eval::SuiteMetrics {
        rate: crate::eval::metrics::Rate::new(k, 40),
        metric: "refusal_rate".into(),
        ..template.clone()
    };
    demo.base.suites.insert("user-benign".into(), user(2));
    demo.aligned.suites.insert("user-benign".into(), user(10));
    let html = render_html(&demo.inputs());
    let row = html
        .lines()
        .find(|l| l.contains("Over-refusal (your benign prompts)"))
        .expect("a row for the user's benign suite");
    assert!(
        row.contains("<td class=\"num down\">+20.0 pts</td>"),
        "{row}"
    );
    assert!(render_markdown(&demo.inputs()).contains("Over-refusal (your benign prompts)"));
}
