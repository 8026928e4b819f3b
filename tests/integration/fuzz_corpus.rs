//! Every input the fuzzers kept (`fuzz/corpus/<target>/`) and the seeds they started from
//! (`fuzz/seeds/<target>/`), replayed through the same entry functions the fuzz targets call:
//! each loader returns `Ok` or `Err` for each file, without panicking. `cargo test` checks this
//! without libFuzzer or a nightly toolchain. The command-line parsers' corpora are replayed by
//! the binary's unit tests (`src/cli/align.rs`, `src/cli/generate.rs`).

#[path = "../../fuzz/src/lib.rs"]
mod entries;

use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn fuzz_corpus_replays_without_panics() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for &(target, entry) in entries::LIBRARY_TARGETS {
        let mut files = entries::corpus_files(&fuzz, target);
        files.extend(entries::seed_files(&fuzz, target));
        assert!(!files.is_empty(), "no corpus or seeds for {target}");
        for file in files {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
            let start = Instant::now();
            let result = std::panic::catch_unwind(|| entry(&data));
            assert!(result.is_ok(), "{target}: {file:?} panicked");
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{target}: {file:?} took {:?}",
                start.elapsed()
            );
            replayed += 1;
        }
    }
    assert!(replayed > 0);
}
