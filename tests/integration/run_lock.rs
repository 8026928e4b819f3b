//! One writer per run folder: a second `sails train`, `sails eval` or `sails align` on a folder in
//! use fails at once naming the holder, and a killed holder leaves the folder free.

use sails::manifest::{RunLock, LOCK_FILE};
use std::process::Command;
use std::time::{Duration, Instant};

fn sails() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sails"))
}

#[test]
fn a_folder_in_use_is_refused_by_every_writing_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let _held = RunLock::acquire(&out, "the test holding it").unwrap();
    let commands: [&[&str]; 3] = [
        &["eval", "--suite", "harmful", "--limit", "1", "--out"],
        &["train", "--data", "nowhere.jsonl", "--out"],
        &["align", "--preset", "quick", "--out"],
    ];
    for args in commands {
        let start = Instant::now();
        let run = sails().args(args).arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} ran on a locked folder");
        assert!(
            err.contains("is in use by another sails process")
                && err.contains(&format!("pid {}", std::process::id()))
                && err.contains("the test holding it"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // At once: before any model or data is loaded.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{args:?} took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn a_killed_holder_leaves_the_folder_free() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // An evaluation of the real model holds its folder for many seconds: take it, kill it hard.
    let mut child = sails()
        .args(["eval", "--suite", "harmful", "--limit", "4", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mine = format!("pid {}", child.id());
    let start = Instant::now();
    while !std::fs::read_to_string(out.join(LOCK_FILE)).is_ok_and(|t| t.contains(&mine)) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the child never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(RunLock::acquire(&out, "while it runs").is_err());
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child ended before the kill"
    );
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    let lock = RunLock::acquire(&out, "after the kill").unwrap();
    drop(lock);
}
