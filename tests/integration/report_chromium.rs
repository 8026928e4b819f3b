//! The full synthetic report, opened in headless Chromium: the DOM holds every figure, table and
//! heading; the page renders to a non-trivial screenshot; nothing is fetched from anywhere.
//!
//! Needs Debian's `chromium`, which `scripts/test` installs; the test installs nothing itself, and
//! where the browser is missing it fails saying how to install it. Set `SAILS_REPORT_KEEP=<dir>` to keep the report and its
//! screenshot for a look.

use sails::report::demo::Demo;
use sails::report::SECTIONS;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BROWSER: &str = "chromium";

fn available() -> bool {
    Command::new(BROWSER)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails with the way to install `chromium` when it does not run.
fn ensure_chromium() {
    assert!(
        available(),
        "`{BROWSER} --version` does not run: install Debian's `{BROWSER}` (`sudo apt-get install -y \
         {BROWSER}`, or run the tests through `scripts/test`, which does) and rerun"
    );
}

/// What a Chromium run printed.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs headless Chromium on `url` with `extra` flags, killing it after `limit`. Both pipes are
/// drained on their own threads, so a large `--dump-dom` cannot fill a pipe and stall the browser.
fn chromium(profile: &Path, url: &str, extra: &[String], limit: Duration) -> Run {
    let mut child = Command::new(BROWSER)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("waiting on chromium") {
            Some(status) => break status,
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    Run {
        success: status.success(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Lines of Chromium's log saying a resource failed to load.
fn load_failures(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("Failed to load") || l.contains("net::ERR"))
        .collect()
}

/// Every `src=`/`href=` inside a tag of `html`. Text is escaped, so a literal `<` opens a tag.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for tag in html.split('<').skip(1) {
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        for attr in [" src=", " href=", " xlink:href="] {
            for (i, _) in tag.match_indices(attr) {
                let v = tag[i + attr.len()..].trim_start_matches(['"', '\'']);
                let end = v.find(['"', '\'', ' ']).unwrap_or(v.len());
                out.push(v[..end].to_string());
            }
        }
    }
    out
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn full_report_renders_in_headless_chromium() {
    ensure_chromium();
    let dir = tempfile::tempdir().expect("temp dir");
    let demo = Demo::new();
    let (html_path, md_path) =
        sails::report::write(&demo.inputs(), dir.path()).expect("report written");
    assert!(md_path.is_file());
    let html = std::fs::read_to_string(&html_path).expect("report readable");

    // self-contained: in-page anchors only, no scripts, no URLs in any tag
    for link in links(&html) {
        assert!(link.starts_with('#'), "external or file link {link:?}");
    }
    assert!(!html.contains("<script"), "the report carries a script");
    assert!(!html.contains("<link") && !html.contains("@import") && !html.contains("url("));

    let url = format!("file://{}", html_path.display());
    let profile = dir.path().join("profile");
    let limit = Duration::from_secs(90);
    let dom = chromium(&profile, &url, &["--dump-dom".into()], limit);
    let stderr = dom.stderr;
    assert!(dom.success, "chromium --dump-dom failed:\n{stderr}");
    let dom = dom.stdout;
    assert!(
        load_failures(&stderr).is_empty(),
        "{:?}",
        load_failures(&stderr)
    );

    // the parsed document, not just the file: figures, tables, headings, cards
    assert_eq!(dom.matches("<svg").count(), 8, "figures in the DOM");
    assert_eq!(dom.matches("</svg>").count(), 8);
    assert_eq!(dom.matches("viewBox=").count(), 8);
    assert_eq!(dom.matches("<table").count(), 12, "tables in the DOM");
    for (id, heading) in SECTIONS {
        assert!(dom.contains(&format!("<section id=\"{id}\">")), "{id}");
        assert!(dom.contains(&format!("<h2>{heading}</h2>")), "{heading}");
    }
    assert!(dom.contains("<h1>SAILS report: demo-gemma2 &lt;run&gt; &amp; co</h1>"));
    assert_eq!(dom.matches("class=\"card\"").count(), 4);
    // the hostile prompt stayed text: no script element was created from it
    assert!(!dom.contains("<script"), "a script element reached the DOM");
    assert!(!dom.contains("<img"), "an img element reached the DOM");
    assert!(dom.contains("&lt;script&gt;alert('x')&lt;/script&gt;"));

    let shot = dir.path().join("report.png");
    let out = chromium(
        &profile,
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,3000".into(),
            "--hide-scrollbars".into(),
        ],
        limit,
    );
    let stderr = out.stderr;
    assert!(out.success, "chromium --screenshot failed:\n{stderr}");
    assert!(
        load_failures(&stderr).is_empty(),
        "{:?}",
        load_failures(&stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(png_size(&png), (1200, 3000));
    // a blank 1200×3000 page compresses to a few KB; text, tables and charts to far more
    assert!(
        png.len() > 100_000,
        "screenshot only {} bytes: the page looks empty",
        png.len()
    );
    if let Some(keep) = std::env::var_os("SAILS_REPORT_KEEP") {
        let keep = Path::new(&keep);
        std::fs::create_dir_all(keep).expect("keep dir");
        for f in [&shot, &html_path, &md_path] {
            let name = f.file_name().expect("file name");
            std::fs::copy(f, keep.join(name)).expect("kept");
        }
    }
}
