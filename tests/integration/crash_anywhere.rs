//! Crash anywhere: `sails align --preset quick` (made small by a config file; every stage but
//! the gate's, whose validation evaluations are full-size by design and take minutes in a test
//! build) is killed outright (SIGKILL, no handler runs) at 30 seeded random moments, rerun after each
//! kill, and must end with the same artifacts, byte for byte, as a run never interrupted. After
//! every kill no stage of it is still running, and each artifact in the run folder is whole: what
//! a reader would take is either absent or complete (append-only JSONL logs may end in a torn line, which their readers drop).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const KILLS: usize = 30;
const SEED: u64 = 20_261_207;

/// The quick preset's every stage, each made a few seconds long.
const SMALL_QUICK: &str = r#"
feature_prompts = 12
explain_contexts = 1

[sae.train.store]
token_budget = 2000

[sae.train.corpus]
alpaca_max = 60

[sae.train.train]
d_sae = 256
k = 16
total_tokens = 16384
batch_size = 1024
checkpoint_every = 4
init_sample_tokens = 1024

[features]
top_k = 4
bootstrap = 20

[subspace]
rank = 4

[lora]
rank = 4

[data]
harmful = 8
max_edgy = 2

[train]
max_steps = 6
batch_size = 2
warmup_steps = 1
eval_every = 3
checkpoint_every = 2

[eval]
limit = 3
max_new_tokens = 8
batch_size = 12
"#;

fn align(run: &Path, config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sails"));
    c.args(["align", "--preset", "quick", "--no-gate", "--config"])
        .arg(config)
        .arg("--out")
        .arg(run)
        .stdout(Stdio::null())
        .stdin(Stdio::null());
    c
}

fn run_to_end(run: &Path, config: &Path) {
    let out = align(run, config).stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "align failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uniform in [0, 1), from a 64-bit LCG: the kill schedule is the same on every machine, in
/// units of that machine's own stage times.
fn uniform(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Every file under `dir` (relative path), the temp files of atomic writes (dot-named) left out.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Keys that record how fast or how long something ran, or that it was resumed.
const HISTORY: [&str; 6] = [
    "throughput",
    "seconds",
    "collect_seconds",
    "tokens_per_s",
    "prompts_per_s",
    "resumed_from",
];

fn without_history(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.retain(|k, _| !HISTORY.contains(&k.as_str()));
            o.values_mut().for_each(without_history);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_history),
        _ => {}
    }
}

/// What a run's result is: every artifact's bytes, less what records when, how long and how it
/// went (the manifest, the logs, the report pages that print timings, such fields of JSON).
fn artifacts(run: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for rel in files(run) {
        let name = rel.to_string_lossy().to_string();
        if name == "manifest.json"
            || name.starts_with("logs/")
            || name.ends_with(".html")
            || name.ends_with(".md")
        {
            continue;
        }
        let bytes = std::fs::read(run.join(&rel)).unwrap();
        let json = |text: &[u8]| {
            let mut v: serde_json::Value = serde_json::from_slice(text).unwrap();
            without_history(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let bytes = if name.ends_with(".json") {
            json(&bytes)
        } else if name.ends_with(".jsonl") {
            bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .flat_map(json)
                .collect()
        } else {
            bytes
        };
        out.insert(rel, hex::encode(Sha256::digest(&bytes)));
    }
    out
}

/// Each artifact present is whole: JSON parses, every line of a JSONL file parses but a torn
/// last one, safetensors files load.
fn assert_whole(run: &Path, after: &str) {
    for rel in files(run) {
        let path = run.join(&rel);
        let name = rel.to_string_lossy();
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".jsonl") {
            let text = String::from_utf8(bytes).unwrap();
            let complete = match text.rfind('\n') {
                Some(end) => &text[..end],
                None => "",
            };
            for (i, line) in complete.lines().enumerate() {
                assert!(
                    serde_json::from_str::<serde_json::Value>(line).is_ok(),
                    "{after}: {name} line {} is not JSON",
                    i + 1
                );
            }
        } else if name.ends_with(".json") {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
                "{after}: {name} is half-written"
            );
        } else if name.ends_with(".safetensors") {
            assert!(
                candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).is_ok(),
                "{after}: {name} is half-written"
            );
        }
    }
}

/// Processes whose command line names `run` (a stage `align` started writes there).
fn processes_in(run: &Path) -> Vec<String> {
    let needle = run.to_string_lossy().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push(cmdline);
        }
    }
    out
}

/// No stage outlives the killed `align`: the kernel ends each with it.
fn assert_no_orphans(run: &Path, after: &str) {
    let start = Instant::now();
    while !processes_in(run).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{after}: still running: {:?}",
            processes_in(run)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The reference run's stages in the order they ran, with their wall times (its manifest).
fn stage_times(run: &Path) -> Vec<(String, f64)> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let name = entry[0].as_str().unwrap().to_owned();
            (name, entry[1]["seconds"].as_f64().unwrap())
        })
        .collect()
}

/// A moment of the uninterrupted run: this share of the way through this stage.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
struct KillPoint {
    stage: usize,
    fraction: f64,
}

/// `KILLS` moments drawn uniformly over the reference run's timeline, in order. A moment's place
/// inside its stage is scaled into the stage's first 70 %, so that a rerun somewhat faster than
/// the reference (machines are shared) is still inside the stage when the kill comes.
fn kill_points(stages: &[(String, f64)], seed: u64) -> Vec<KillPoint> {
    let total: f64 = stages.iter().map(|(_, t)| t).sum();
    let mut state = seed;
    let mut points: Vec<KillPoint> = (0..KILLS)
        .map(|_| {
            let mut at = uniform(&mut state) * total;
            let mut stage = 0;
            while stage + 1 < stages.len() && at >= stages[stage].1 {
                at -= stages[stage].1;
                stage += 1;
            }
            KillPoint {
                stage,
                fraction: 0.7 * (at / stages[stage].1).min(1.0),
            }
        })
        .collect();
    points.sort_by(|a, b| a.partial_cmp(b).unwrap());
    points
}

/// How one attempt ended.
enum Attempt {
    /// Killed while working in this stage.
    Killed(String),
    /// It finished before the kill came.
    Finished,
}

/// Runs `align` until it starts a stage at or after `point`'s (it announces each on stderr as
/// `[stage] running`) and kills it outright (SIGKILL: no destructor, no handler) `point.fraction`
/// of that stage's reference time later. A resumed stage can be shorter than the reference's:
/// when the next stage starts first, the kill moves into it, at the same share.
fn kill_at(run: &Path, config: &Path, stages: &[(String, f64)], point: &KillPoint) -> Attempt {
    use std::io::BufRead;
    let mut child = align(run, config).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let index_of = |line: &str| {
        let name = line.strip_prefix('[')?.strip_suffix("] running")?;
        stages.iter().position(|(n, _)| n == name)
    };
    let mut log = Vec::new();
    let mut running: Option<(usize, Instant)> = None;
    loop {
        if let Some((stage, since)) = running {
            let due = since + Duration::from_secs_f64(point.fraction * stages[stage].1);
            if Instant::now() >= due {
                break;
            }
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(line) => {
                if let Some(i) = index_of(&line).filter(|&i| i >= point.stage) {
                    running = Some((i, Instant::now()));
                }
                log.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // stderr closed: the run ended by itself
                let status = child.wait().unwrap();
                assert!(
                    status.success(),
                    "aiming at {point:?}, the rerun failed ({status}): {}",
                    log.join("\n")
                );
                return Attempt::Finished;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    Attempt::Killed(stages[running.map_or(point.stage, |(i, _)| i)].0.clone())
}

#[test]
fn a_run_killed_anywhere_resumes_to_the_same_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("small-quick.toml");
    std::fs::write(&config, SMALL_QUICK).unwrap();

    // Both runs use one path (artifacts record paths), the reference moved aside once done.
    let run = tmp.path().join("run");
    run_to_end(&run, &config);
    let expected = artifacts(&run);
    std::fs::rename(&run, tmp.path().join("reference")).unwrap();
    assert!(
        expected.keys().any(|p| p.starts_with("eval-aligned")),
        "the small run reaches the last stages: {:?}",
        expected.keys().collect::<Vec<_>>()
    );

    // The killed run: stopped at each kill point of the reference timeline in turn, rerun
    // after each kill, then run to the end.
    let stages = stage_times(&tmp.path().join("reference"));
    let mut hit = BTreeMap::<String, usize>::new();
    let mut kills = 0;
    for point in kill_points(&stages, SEED) {
        let stage = match kill_at(&run, &config, &stages, &point) {
            Attempt::Killed(stage) => stage,
            Attempt::Finished => break,
        };
        kills += 1;
        *hit.entry(stage.clone()).or_default() += 1;
        let after = format!("after kill {kills} ({stage}, {point:?})");
        assert_no_orphans(&run, &after);
        assert_whole(&run, &after);
    }
    eprintln!("kills by stage: {hit:?}; uninterrupted: {stages:?}");
    run_to_end(&run, &config);
    let got = artifacts(&run);
    let differ: std::collections::BTreeSet<_> = expected
        .keys()
        .chain(got.keys())
        .filter(|k| expected.get(*k) != got.get(*k))
        .collect();
    if !differ.is_empty() {
        let kept = tmp.keep();
        panic!(
            "artifacts that differ from the uninterrupted run: {differ:?} (both runs kept in {})",
            kept.display()
        );
    }
    assert_eq!(
        kills, KILLS,
        "the run finished before its last kills: {hit:?}"
    );
    assert!(hit.len() >= 4, "the kills reach most stages: {hit:?}");
}
