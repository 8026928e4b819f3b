//! A full disk: `sails train` on a filesystem that fills up stops with an error naming the file
//! and the last complete checkpoint, leaves every complete checkpoint intact and no partial one,
//! and once space is freed `--resume` finishes with the adapter an uninterrupted run writes.
//!
//! The small filesystem is a tmpfs mounted in a private mount namespace (`unshare`, util-linux),
//! so the test needs no privileges and leaves no mount behind.

use std::path::Path;
use std::process::Command;

const CONFIG: &str = "lr_peak = 1e-3\nlr_min = 1e-4\nwarmup_steps = 1\nmax_steps = 5\n\
    batch_size = 2\nmax_seq_len = 256\neval_every = 100\ncheckpoint_every = 1\n";

/// Each checkpoint of a rank-4 q_proj adapter on the default model holds ~1.7 MB, so two fit in
/// 4 MiB and the third does not.
const SMALL_FS: &str = "4m";

fn write_inputs(dir: &Path) {
    let rows = [
        (
            "What is the capital of France?",
            "The capital of France is Paris.",
        ),
        ("Name a primary colour.", "Red is a primary colour."),
        (
            "How many legs does a spider have?",
            "A spider has eight legs.",
        ),
        (
            "Give me a synonym for happy.",
            "A synonym for happy is joyful.",
        ),
        ("What is 2 + 3?", "2 + 3 = 5."),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("train.toml"), CONFIG).unwrap();
}

fn train_args(host: &Path, out: &Path) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    [
        "train",
        "--data",
        &p(&host.join("data.jsonl")),
        "--config",
        &p(&host.join("train.toml")),
        "--rank",
        "4",
        "--targets",
        "q_proj",
        "--out",
        &p(out),
    ]
    .map(String::from)
    .to_vec()
}

fn shell_quote(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_same_files(a: &Path, b: &Path) {
    assert_eq!(
        file_names(a),
        file_names(b),
        "{} / {}",
        a.display(),
        b.display()
    );
    for name in file_names(a) {
        assert!(
            std::fs::read(a.join(&name)).unwrap() == std::fs::read(b.join(&name)).unwrap(),
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn a_full_disk_stops_training_cleanly_and_a_resume_after_freeing_space_finishes() {
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "this test needs `unshare -rm` (util-linux, user namespaces) to mount a small tmpfs"
    );
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path();
    write_inputs(host);
    let sails = env!("CARGO_BIN_EXE_sails");

    let reference = host.join("reference");
    let run = Command::new(sails)
        .args(train_args(host, &reference))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // In one private namespace: train on a 4 MiB tmpfs, copy what it left out, grow the
    // filesystem (space freed), resume, copy the result out.
    let small = host.join("small");
    std::fs::create_dir(&small).unwrap();
    let out = small.join("run");
    let first = shell_quote(&train_args(host, &out));
    let script = format!(
        "mount -t tmpfs -o size={SMALL_FS} sails-disk-full '{small}' || exit 90\n\
         '{sails}' {first} > '{host}/full.out' 2> '{host}/full.err'; echo $? > '{host}/full.rc'\n\
         cp -a '{out}' '{host}/after-full' || exit 91\n\
         mount -o remount,size=64m '{small}' || exit 92\n\
         '{sails}' {first} --resume > '{host}/resume.out' 2> '{host}/resume.err'; echo $? > '{host}/resume.rc'\n\
         cp -a '{out}' '{host}/after-resume' || exit 93\n",
        small = small.display(),
        out = out.display(),
        host = host.display(),
    );
    let status = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .status()
        .unwrap();
    assert!(status.success(), "the namespace script failed: {status}");

    let read = |name: &str| std::fs::read_to_string(host.join(name)).unwrap();
    let err = read("full.err");
    assert_eq!(read("full.rc").trim(), "2", "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let message = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    for part in [
        "step 3: the checkpoint could not be written",
        "No space left on device",
        "optimizer.safetensors",
        "last complete checkpoint:",
        "step-000002 (free space, then rerun with --resume)",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    // The OS error once, not repeated by every layer that passed it on.
    assert_eq!(
        message.matches("No space left on device").count(),
        1,
        "{message}"
    );

    let left = host.join("after-full/checkpoints");
    assert_eq!(
        file_names(&left),
        ["latest", "step-000001", "step-000002"],
        "a partial checkpoint was left behind"
    );
    assert_eq!(
        std::fs::read_to_string(left.join("latest")).unwrap(),
        "step-000002"
    );
    for step in ["step-000001", "step-000002"] {
        assert_same_files(&left.join(step), &reference.join("checkpoints").join(step));
    }

    assert_eq!(read("resume.rc").trim(), "0", "{}", read("resume.err"));
    let resumed = host.join("after-resume");
    assert_same_files(&resumed.join("adapter"), &reference.join("adapter"));
    assert_same_files(
        &resumed.join("checkpoints/step-000005"),
        &reference.join("checkpoints/step-000005"),
    );
}
