//! A run directory's `manifest.json`: every stage's input hashes, config, output hashes, timing.
//!
//! A stage is skipped when its inputs and config hash to what the manifest recorded and its
//! outputs still hash to what it wrote; anything else reruns it. The manifest is rewritten
//! atomically after every stage, so an interrupted run keeps every finished stage.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;
/// Stands for the run folder in the keys of inputs that live inside it.
const RUN_PREFIX: &str = "<run>";

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a run manifest: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: stage {stage} input is missing")]
    MissingInput { stage: String, path: PathBuf },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(
        "{dir} is in use by another sails process ({holder}); wait for it to finish or choose \
         another folder"
    )]
    InUse { dir: PathBuf, holder: String },
}

pub type Result<T> = std::result::Result<T, ManifestError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// sha256 of a file's bytes (streamed).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of a file, or of a folder's files (relative path and content hash of each, sorted;
/// names starting with `.` and temporary files are left out).
pub fn hash_path(path: &Path) -> Result<String> {
    if path.is_file() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for rel in files {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(hash_file(&path.join(&rel))?.as_bytes());
        h.update([b'\n']);
    }
    Ok(hex::encode(h.finalize()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name.ends_with(".tmp") {
            continue;
        }
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else {
            let rel = p.strip_prefix(root).unwrap_or(&p);
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// sha256 of a serialisable config (its compact JSON).
pub fn hash_json<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// An input's key in a stage record: `<run>/relative/path` inside the run folder, so a run folder
/// that is moved or copied still matches its own manifest; elsewhere the path as given.
fn input_key(run_dir: &Path, input: &Path) -> String {
    match input.strip_prefix(run_dir) {
        Ok(inside) => format!("{RUN_PREFIX}/{}", inside.display()),
        Err(_) => input.display().to_string(),
    }
}

/// What one stage consumed and produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRecord {
    /// Input path → sha256: `<run>/…` inside the run folder, else the path as given.
    pub inputs: BTreeMap<String, String>,
    /// The stage's effective config.
    pub config: serde_json::Value,
    pub config_sha256: String,
    /// Output path (relative to the run folder) → sha256.
    pub outputs: BTreeMap<String, String>,
    /// Wall time of the stage's last real run.
    pub seconds: f64,
    /// Unix time the stage last finished.
    pub finished_unix: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunManifest {
    pub format_version: u32,
    /// The whole effective run config.
    pub config: serde_json::Value,
    /// `sails` and candle versions, target, threads.
    pub versions: BTreeMap<String, String>,
    /// Stage name → record, in the order the stages ran.
    pub stages: Vec<(String, StageRecord)>,
    /// Per-invocation timings: stage, seconds, whether it was skipped.
    pub last_invocation: Vec<StageTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    pub skipped: bool,
}

/// The hashes a stage would record now.
pub struct StagePlan<'a> {
    pub name: &'a str,
    pub inputs: Vec<PathBuf>,
    pub config: serde_json::Value,
    /// Relative to the run folder.
    pub outputs: Vec<PathBuf>,
}

/// Whether a stage can be skipped, or why not.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    UpToDate,
    /// Never finished (first run, or interrupted): rerun, resuming whatever the stage keeps.
    NotDone,
    /// Finished before with other inputs or config: start it afresh.
    Stale(String),
    /// Finished with these inputs and config, but its outputs were edited or removed since: rerun
    /// it over what is there (an evaluation re-judges its saved responses instead of generating
    /// them again; training resumes from its last checkpoint).
    OutputsChanged(String),
}

impl RunManifest {
    pub fn new(config: serde_json::Value, versions: BTreeMap<String, String>) -> Self {
        RunManifest {
            format_version: FORMAT_VERSION,
            config,
            versions,
            stages: Vec::new(),
            last_invocation: Vec::new(),
        }
    }

    /// Loads `dir/manifest.json`, or `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut m: RunManifest =
            serde_json::from_str(&text).map_err(|e| ManifestError::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if m.format_version != FORMAT_VERSION {
            return Err(ManifestError::Format {
                path,
                message: format!("format_version {}", m.format_version),
            });
        }
        m.key_inputs_by_run(dir);
        Ok(Some(m))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ManifestError::Format {
            path: dir.join(MANIFEST_FILE),
            message: e.to_string(),
        })?;
        crate::model::write_atomic(&dir.join(MANIFEST_FILE), &bytes)?;
        Ok(())
    }

    /// Manifests written before inputs were keyed by `<run>/…` hold the full path of inputs inside
    /// the run folder; rekeying them on load keeps those runs fresh.
    fn key_inputs_by_run(&mut self, dir: &Path) {
        for (_, rec) in &mut self.stages {
            rec.inputs = std::mem::take(&mut rec.inputs)
                .into_iter()
                .map(|(key, hash)| (input_key(dir, Path::new(&key)), hash))
                .collect();
        }
    }

    pub fn record(&self, stage: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|(n, _)| n == stage).map(|(_, r)| r)
    }

    fn input_hashes(run_dir: &Path, plan: &StagePlan<'_>) -> Result<BTreeMap<String, String>> {
        plan.inputs
            .iter()
            .map(|p| {
                if !p.exists() {
                    return Err(ManifestError::MissingInput {
                        stage: plan.name.to_string(),
                        path: p.clone(),
                    });
                }
                Ok((input_key(run_dir, p), hash_path(p)?))
            })
            .collect()
    }

    /// Compares the stage's recorded hashes with the current ones.
    pub fn freshness(&self, run_dir: &Path, plan: &StagePlan<'_>) -> Result<Freshness> {
        let Some(rec) = self.record(plan.name) else {
            return Ok(Freshness::NotDone);
        };
        if rec.config_sha256 != hash_json(&plan.config) {
            return Ok(Freshness::Stale("its config changed".into()));
        }
        let inputs = Self::input_hashes(run_dir, plan)?;
        if inputs != rec.inputs {
            let changed: Vec<&String> = inputs
                .iter()
                .filter(|(k, v)| rec.inputs.get(*k) != Some(v))
                .map(|(k, _)| k)
                .collect();
            return Ok(Freshness::Stale(format!("inputs changed: {changed:?}")));
        }
        for out in &plan.outputs {
            let key = out.display().to_string();
            let path = run_dir.join(out);
            let now = if path.exists() {
                Some(hash_path(&path)?)
            } else {
                None
            };
            if now.as_ref() != rec.outputs.get(&key) {
                return Ok(Freshness::OutputsChanged(format!(
                    "output {key} changed or is missing"
                )));
            }
        }
        Ok(Freshness::UpToDate)
    }

    /// Records a finished stage (replacing an older record of it) and saves the manifest.
    pub fn finish(&mut self, run_dir: &Path, plan: &StagePlan<'_>, seconds: f64) -> Result<()> {
        let inputs = Self::input_hashes(run_dir, plan)?;
        let outputs = plan
            .outputs
            .iter()
            .map(|o| Ok((o.display().to_string(), hash_path(&run_dir.join(o))?)))
            .collect::<Result<_>>()?;
        let rec = StageRecord {
            inputs,
            config: plan.config.clone(),
            config_sha256: hash_json(&plan.config),
            outputs,
            seconds,
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        self.stages.retain(|(n, _)| n != plan.name);
        self.stages.push((plan.name.to_string(), rec));
        self.save(run_dir)
    }

    /// Forgets a stage (its outputs are about to be rebuilt from scratch).
    pub fn forget(&mut self, stage: &str) {
        self.stages.retain(|(n, _)| n != stage);
    }
}

/// The lock file in a run folder; it stays after the run (removing it would race a new holder).
pub const LOCK_FILE: &str = ".sails.lock";

/// One writer per run folder: an exclusive `flock` on `<dir>/.sails.lock`, held while this value
/// lives. The kernel drops it when the process exits or is killed, so a crash never leaves the
/// folder locked. The file names the holder (pid, command, start time) for the error a second
/// writer gets.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock on `dir` (created if missing) for `command`, or fails at once with
    /// [`ManifestError::InUse`] naming the holder.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self> {
        use std::io::{Seek, Write};
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        if !try_lock(&file).map_err(io(&path))? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(ManifestError::InUse {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "holder unknown".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let text = format!(
            "pid {}, `{command}`, since {started} (Unix seconds)",
            std::process::id()
        );
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(text.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(io(&path))?;
        Ok(Self { _file: file })
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: true when taken, false when another open file holds it.
#[cfg(unix)]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Elsewhere the standard library's advisory lock (the same semantics where the OS has them).
#[cfg(not(unix))]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_naming_the_holder_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = RunLock::acquire(&run, "sails train --out run").unwrap();
        let err = RunLock::acquire(&run, "sails eval --out run").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ManifestError::InUse { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id()))
                && text.contains("sails train --out run")
                && text.contains("in use"),
            "{text}"
        );
        drop(first);
        let again = RunLock::acquire(&run, "sails eval --out run").unwrap();
        drop(again);
        // The file stays and names the last holder.
        let left = std::fs::read_to_string(run.join(LOCK_FILE)).unwrap();
        assert!(left.contains("sails eval --out run"), "{left}");
    }

    fn plan<'a>(input: &Path, cfg: u32) -> StagePlan<'a> {
        StagePlan {
            name: "stage",
            inputs: vec![input.to_path_buf()],
            config: serde_json::json!({ "k": cfg }),
            outputs: vec![PathBuf::from("out")],
        }
    }

    #[test]
    fn a_stage_is_fresh_only_while_inputs_config_and_outputs_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let input = run.join("input.txt");
        std::fs::write(&input, "a").unwrap();
        std::fs::create_dir_all(run.join("out")).unwrap();
        std::fs::write(run.join("out/x.json"), "1").unwrap();
        let mut m = RunManifest::new(serde_json::json!({}), BTreeMap::new());
        assert_eq!(
            m.freshness(run, &plan(&input, 1)).unwrap(),
            Freshness::NotDone
        );
        m.finish(run, &plan(&input, 1), 1.5).unwrap();
        let m = RunManifest::load(run).unwrap().unwrap();
        assert_eq!(
            m.freshness(run, &plan(&input, 1)).unwrap(),
            Freshness::UpToDate
        );
        assert!(matches!(
            m.freshness(run, &plan(&input, 2)).unwrap(),
            Freshness::Stale(why) if why.contains("config")
        ));
        std::fs::write(&input, "b").unwrap();
        assert!(matches!(
            m.freshness(run, &plan(&input, 1)).unwrap(),
            Freshness::Stale(why) if why.contains("inputs")
        ));
        std::fs::write(&input, "a").unwrap();
        std::fs::write(run.join("out/x.json"), "2").unwrap();
        assert!(matches!(
            m.freshness(run, &plan(&input, 1)).unwrap(),
            Freshness::OutputsChanged(why) if why.contains("output")
        ));
        // the record holds every input's hash, keyed inside the run folder by `<run>/…`
        let rec = m.record("stage").unwrap();
        assert_eq!(rec.inputs["<run>/input.txt"], hash_file(&input).unwrap());
        assert_eq!(rec.inputs.len(), 1);
    }

    #[test]
    fn a_moved_run_folder_and_an_older_manifest_stay_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("model.bin");
        std::fs::write(&outside, "weights").unwrap();
        let plan_in = |run: &Path| StagePlan {
            name: "stage",
            inputs: vec![outside.clone(), run.join("features")],
            config: serde_json::json!({ "k": 1 }),
            outputs: vec![PathBuf::from("out")],
        };
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("features")).unwrap();
        std::fs::write(run.join("features/f.json"), "[1, 2]").unwrap();
        std::fs::create_dir_all(run.join("out")).unwrap();
        std::fs::write(run.join("out/x.json"), "1").unwrap();
        let mut m = RunManifest::new(serde_json::json!({}), BTreeMap::new());
        m.finish(&run, &plan_in(&run), 1.0).unwrap();
        let rec = m.record("stage").unwrap();
        assert_eq!(
            rec.inputs.keys().collect::<Vec<_>>(),
            [&outside.display().to_string(), "<run>/features"]
        );

        let moved = dir.path().join("moved");
        std::fs::rename(&run, &moved).unwrap();
        let m = RunManifest::load(&moved).unwrap().unwrap();
        assert_eq!(
            m.freshness(&moved, &plan_in(&moved)).unwrap(),
            Freshness::UpToDate
        );

        // a manifest that keyed the run's own inputs by their full path is rekeyed on load
        let text = std::fs::read_to_string(moved.join(MANIFEST_FILE)).unwrap();
        let full = moved.join("features").display().to_string();
        std::fs::write(
            moved.join(MANIFEST_FILE),
            text.replace("<run>/features", &full),
        )
        .unwrap();
        let m = RunManifest::load(&moved).unwrap().unwrap();
        assert_eq!(
            m.freshness(&moved, &plan_in(&moved)).unwrap(),
            Freshness::UpToDate
        );
        // and a changed input inside the moved folder is still seen
        std::fs::write(moved.join("features/f.json"), "[1, 3]").unwrap();
        assert!(matches!(
            m.freshness(&moved, &plan_in(&moved)).unwrap(),
            Freshness::Stale(why) if why.contains("<run>/features")
        ));
    }

    #[test]
    fn folder_hash_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a"), "1").unwrap();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/b"), "2").unwrap();
        let h1 = hash_path(d).unwrap();
        std::fs::write(d.join("x.tmp"), "ignored").unwrap();
        assert_eq!(hash_path(d).unwrap(), h1);
        std::fs::rename(d.join("sub/b"), d.join("sub/c")).unwrap();
        assert_ne!(hash_path(d).unwrap(), h1);
        // hand-computed: sha256("abc")
        std::fs::write(d.join("a"), "abc").unwrap();
        assert_eq!(
            hash_file(&d.join("a")).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
