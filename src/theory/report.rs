//! Writing the results: results.json (everything), results.md (tables) and SVG figures.

use std::fmt::Write as _;
use std::path::Path;

use super::experiment::{Record, Summary, Sweep, TheoryResults};
use super::methods::Method;
use super::plot::{palette, Chart, HLine, Series};
use super::TheoryError;

/// Files [`TheoryResults::save`] writes into its folder.
pub const FILES: [&str; 5] = [
    "results.json",
    "results.md",
    "error_vs_samples.svg",
    "error_vs_entanglement.svg",
    "error_vs_superposition.svg",
];

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then a rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TheoryError> {
    crate::model::write_atomic(path, bytes).map_err(|e| match e {
        crate::model::ModelError::Io { path, source } => TheoryError::Io { path, source },
        other => TheoryError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

fn method_color(m: Method) -> String {
    palette(Method::ALL.iter().position(|x| *x == m).unwrap_or(0))
}

fn methods_in(summaries: &[&Summary]) -> Vec<Method> {
    let mut ms: Vec<Method> = summaries.iter().map(|s| s.method).collect();
    ms.sort();
    ms.dedup();
    ms
}

fn fmt_x(sweep: Sweep, x: f64) -> String {
    match sweep {
        Sweep::Samples => format!("{x:.0}"),
        Sweep::Entanglement => format!("{x:.2}"),
        Sweep::Superposition => format!("{x:.1}"),
        Sweep::SaeQuality => format!("{x:.0}"),
    }
}

impl TheoryResults {
    /// Summaries of one sweep.
    pub fn sweep(&self, sweep: Sweep) -> Vec<&Summary> {
        self.summaries.iter().filter(|s| s.sweep == sweep).collect()
    }

    /// The summary at (sweep, x, method), if that point ran.
    pub fn at(&self, sweep: Sweep, x: f64, method: Method) -> Option<&Summary> {
        self.summaries
            .iter()
            .find(|s| s.sweep == sweep && s.x == x && s.method == method)
    }

    fn chart(&self, sweep: Sweep, title: &str, x_label: &str, log_x: bool) -> Chart {
        let sums = self.sweep(sweep);
        let mut series: Vec<Series> = methods_in(&sums)
            .into_iter()
            .map(|m| Series {
                label: m.name().to_string(),
                color: method_color(m),
                dashed: false,
                points: sums
                    .iter()
                    .filter(|s| s.method == m)
                    .map(|s| (s.x, s.mean, s.sd))
                    .collect(),
            })
            .collect();
        let floors: Vec<_> = self.floors.iter().filter(|f| f.sweep == sweep).collect();
        let xs: Vec<f64> = sums.iter().map(|s| s.x).collect();
        let (x_lo, x_hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        for m in [Method::MeanDiff, Method::ClassMeanDiff] {
            let fl: Vec<_> = floors.iter().filter(|f| f.method == m).collect();
            if fl.is_empty() || !x_lo.is_finite() {
                continue;
            }
            // The samples sweep has one floor (N → ∞), drawn across the whole x range.
            let points = if sweep == Sweep::Samples {
                vec![(x_lo, fl[0].mean, 0.0), (x_hi, fl[0].mean, 0.0)]
            } else {
                fl.iter().map(|f| (f.x, f.mean, 0.0)).collect()
            };
            series.push(Series {
                label: format!("{} (N→∞)", m.name()),
                color: method_color(m),
                dashed: true,
                points,
            });
        }
        Chart {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: "‖P_Û − P_U‖_F (mean ± sd over seeds)".to_string(),
            log_x,
            y_min: 0.0,
            y_max: self.max_error,
            series,
            hlines: vec![
                HLine {
                    y: self.paper_floor,
                    label: "√(r−1): paper's floor".into(),
                    color: "#555".into(),
                },
                HLine {
                    y: self.max_error,
                    label: "√(2r): orthogonal".into(),
                    color: "#999".into(),
                },
            ],
        }
    }

    /// The three figures, as (file name, SVG text).
    pub fn figures(&self) -> Vec<(&'static str, String)> {
        let g = &self.config.generator;
        let n_fixed = self.config.sweep.fixed_samples;
        vec![
            (
                "error_vs_samples.svg",
                self.chart(
                    Sweep::Samples,
                    &format!(
                        "Recovery error vs samples (d={}, n={}, r={}, ρ={})",
                        g.d, g.n, g.r, g.entanglement
                    ),
                    "samples N (log scale)",
                    true,
                )
                .to_svg(),
            ),
            (
                "error_vs_entanglement.svg",
                self.chart(
                    Sweep::Entanglement,
                    &format!("Recovery error vs entanglement ρ (N={n_fixed}, n={})", g.n),
                    "entanglement ρ",
                    false,
                )
                .to_svg(),
            ),
            (
                "error_vs_superposition.svg",
                self.chart(
                    Sweep::Superposition,
                    &format!(
                        "Recovery error vs superposition n/d (N={n_fixed}, d={}, ρ={})",
                        g.d, g.entanglement
                    ),
                    "superposition ratio n/d (log scale)",
                    true,
                )
                .to_svg(),
            ),
        ]
    }

    fn table(&self, out: &mut String, sweep: Sweep, x_name: &str) {
        let sums = self.sweep(sweep);
        if sums.is_empty() {
            let _ = writeln!(out, "(no points)\n");
            return;
        }
        let methods = methods_in(&sums);
        let floors: Vec<_> = self.floors.iter().filter(|f| f.sweep == sweep).collect();
        let floor_methods = [Method::MeanDiff, Method::ClassMeanDiff];
        let show_floor_cols = sweep != Sweep::Samples && !floors.is_empty();
        let _ = write!(out, "| {x_name} |");
        for m in &methods {
            let _ = write!(out, " {} |", m.name());
        }
        if show_floor_cols {
            for m in floor_methods {
                let _ = write!(out, " {} N→∞ |", m.name());
            }
        }
        let _ = writeln!(out);
        let cols = methods.len() + if show_floor_cols { 2 } else { 0 };
        let _ = writeln!(out, "|---|{}", "---:|".repeat(cols));
        let mut xs: Vec<f64> = sums.iter().map(|s| s.x).collect();
        xs.dedup();
        for x in xs {
            let _ = write!(out, "| {} |", fmt_x(sweep, x));
            for &m in &methods {
                match self.at(sweep, x, m) {
                    Some(s) => {
                        let _ = write!(out, " {:.3} ± {:.3} |", s.mean, s.sd);
                    }
                    None => out.push_str(" — |"),
                }
            }
            if show_floor_cols {
                for m in floor_methods {
                    match floors.iter().find(|f| f.x == x && f.method == m) {
                        Some(f) => {
                            let _ = write!(out, " {:.3} |", f.mean);
                        }
                        None => out.push_str(" — |"),
                    }
                }
            }
            let _ = writeln!(out);
        }
        if sweep == Sweep::Samples {
            for f in floors {
                let _ = writeln!(
                    out,
                    "\nPopulation (N→∞) error of {}: {:.3} ± {:.3} (closed-form class means).",
                    f.method.name(),
                    f.mean,
                    f.sd
                );
            }
        }
        let _ = writeln!(out);
    }

    fn sae_quality_table(&self, out: &mut String) {
        let recs: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.sweep == Sweep::SaeQuality)
            .collect();
        if recs.is_empty() {
            let _ = writeln!(out, "(no SAE-quality points ran)\n");
            return;
        }
        let _ = writeln!(
            out,
            "| variant | d_sae | error | FVU | best cos per safety concept | best cos of kept latents |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for s in self.sweep(Sweep::SaeQuality) {
            let rs: Vec<&&Record> = recs.iter().filter(|r| r.x == s.x).collect();
            let diag: Vec<_> = rs.iter().filter_map(|r| r.sae.as_ref()).collect();
            let avg = |f: &dyn Fn(&super::sae_method::SaeDiagnostics) -> f64| {
                diag.iter().map(|d| f(d)).sum::<f64>() / diag.len().max(1) as f64
            };
            let mean_of = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} ± {:.3} | {:.3} | {:.3} | {:.3} |",
                s.variant.as_deref().unwrap_or("?"),
                diag.first().map(|d| d.d_sae).unwrap_or(0),
                s.mean,
                s.sd,
                avg(&|d| d.fvu),
                avg(&|d| mean_of(&d.safety_best_cos)),
                avg(&|d| mean_of(&d.kept_best_cos)),
            );
        }
        let _ = writeln!(out);
    }

    /// The Markdown report: setting, metric, one table per sweep, failures.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let g = &c.generator;
        let mut out = String::new();
        let _ = writeln!(out, "# Safety-subspace recovery error\n");
        let _ = writeln!(
            out,
            "Setting: d = {}, n = {} concepts ({:?} geometry), safety rank r = {}, {} nuisance concepts per safety concept, entanglement ρ = {}, noise sd {}, {} seeds. Metric: ‖P_Û − P_U‖_F (0 = exact; √(2r) = {:.3} = orthogonal). The paper's stated floor for direct identification: √(r−1) = {:.3}.\n",
            g.d, g.n, g.geometry, g.r, g.nuisance_per_safety, g.entanglement, g.noise_sd, c.seeds,
            self.max_error, self.paper_floor
        );
        let _ = writeln!(
            out,
            "Cells: mean ± sd of the error over seeds. Run time {:.1} s.\n",
            self.elapsed_ms as f64 / 1000.0
        );
        let _ = writeln!(out, "## Error vs samples N (ρ = {})\n", g.entanglement);
        self.table(&mut out, Sweep::Samples, "N");
        let _ = writeln!(
            out,
            "## Error vs entanglement ρ (N = {})\n",
            c.sweep.fixed_samples
        );
        self.table(&mut out, Sweep::Entanglement, "ρ");
        let _ = writeln!(
            out,
            "## Error vs superposition n/d (N = {}, ρ = {})\n",
            c.sweep.fixed_samples, g.entanglement
        );
        self.table(&mut out, Sweep::Superposition, "n/d");
        let _ = writeln!(
            out,
            "## SAE quality (N = {}, ρ = {})\n",
            c.sweep.fixed_samples, g.entanglement
        );
        self.sae_quality_table(&mut out);
        if !self.failures.is_empty() {
            let _ = writeln!(
                out,
                "## Estimates that could not be made ({})\n",
                self.failures.len()
            );
            let mut msgs: Vec<String> = self
                .failures
                .iter()
                .map(|f| {
                    format!(
                        "- {} at {} x = {}: {}",
                        f.method.name(),
                        f.sweep.name(),
                        fmt_x(f.sweep, f.x),
                        f.message
                    )
                })
                .collect();
            msgs.dedup();
            for m in msgs.iter().take(20) {
                let _ = writeln!(out, "{m}");
            }
            if msgs.len() > 20 {
                let _ = writeln!(out, "- … {} more in results.json", msgs.len() - 20);
            }
        }
        out
    }

    /// Writes [`FILES`] into `dir` (created if missing), each atomically.
    pub fn save(&self, dir: &Path) -> Result<(), TheoryError> {
        std::fs::create_dir_all(dir).map_err(|source| TheoryError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let json = serde_json::to_string_pretty(self).map_err(|e| TheoryError::Serialize {
            what: "results.json",
            message: e.to_string(),
        })?;
        write_atomic(&dir.join("results.json"), json.as_bytes())?;
        write_atomic(&dir.join("results.md"), self.markdown().as_bytes())?;
        for (name, svg) in self.figures() {
            write_atomic(&dir.join(name), svg.as_bytes())?;
        }
        Ok(())
    }
}

/// What `sails theory --json` prints: the summaries and floors, without the raw records.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TheorySummary {
    /// Folder the results were written to.
    pub out_dir: std::path::PathBuf,
    pub paper_floor: f64,
    pub max_error: f64,
    pub summaries: Vec<Summary>,
    pub floors: Vec<super::experiment::PopulationFloor>,
    /// Estimates that could not be made (details in results.json).
    pub failures: usize,
    pub elapsed_ms: u64,
}

impl TheoryResults {
    pub fn summary(&self, out_dir: &Path) -> TheorySummary {
        TheorySummary {
            out_dir: out_dir.to_path_buf(),
            paper_floor: self.paper_floor,
            max_error: self.max_error,
            summaries: self.summaries.clone(),
            floors: self.floors.clone(),
            failures: self.failures.len(),
            elapsed_ms: self.elapsed_ms,
        }
    }
}
