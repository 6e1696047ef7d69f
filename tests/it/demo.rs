//! `examples/demo.sh`, the README's first command: it runs the bundled pre-fork server under
//! `shmetrics run` and prints a banner, or fails loudly (a message on stderr, a non-zero status).
//!
//! The script builds in release mode by default, which takes minutes here; these tests run it
//! with the binaries this test run built (`DEMO_BUILD=0` and the test's cargo target directory and
//! profile, or `SHMETRICS_BIN`/`SERVER_BIN`) and `DEMO_SECONDS=1`.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::util;

/// The test's cargo target directory and the cargo profile of its binaries.
fn target_and_profile() -> (PathBuf, &'static str) {
    let bin = util::shmetrics_bin();
    let profile_dir = bin.parent().expect("profile dir");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some("release") => "release",
        other => panic!("unexpected profile directory {other:?}"),
    };
    (profile_dir.parent().expect("target dir").to_path_buf(), profile)
}

/// A free 127.0.0.1 port whose next port is free too (`run` puts its monitor port there).
fn free_pair() -> u16 {
    util::wait_for(Duration::from_secs(5), "two free consecutive ports", || {
        let a = TcpListener::bind("127.0.0.1:0").ok()?;
        let p = a.local_addr().ok()?.port();
        let _b = TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
        Some(p)
    })
}

/// Runs `bash examples/demo.sh` with `DEMO_SECONDS=1`, `WORKERS=2`, the given addresses and
/// environment: status, stdout, stderr.
fn demo(app: u16, metrics: u16, env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("examples/demo.sh"))
        .env("DEMO_SECONDS", "1")
        .env("WORKERS", "2")
        .env("APP", format!("127.0.0.1:{app}"))
        .env("METRICS", format!("127.0.0.1:{metrics}"))
        .env("NO_COLOR", "1")
        .env_remove("SHMETRICS_BIN")
        .env_remove("SERVER_BIN")
        .env_remove("DEMO_BUILD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("bash");
    let (mut out, mut err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut proc = util::Proc { child };
    let status = proc.wait_timeout(Duration::from_secs(60));
    (status, out_t.join().expect("stdout"), err_t.join().expect("stderr"))
}

/// The banner and the merged request count it shows: the start-up check and 300 requests.
fn assert_banner(out: &str, err: &str, app: u16, metrics: u16) {
    assert!(out.contains("shmetrics is aggregating 2 pre-fork workers"), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("  application:  http://127.0.0.1:{app}/\n")), "{out}");
    assert!(out.contains(&format!("  metrics:      curl http://127.0.0.1:{metrics}/metrics\n")), "{out}");
    let requests: f64 = out
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 301.0, "{out}");
    assert!(!err.contains("demo.sh: error"), "{err}");
}

#[test]
fn demo_runs_from_the_cargo_target_directory() {
    // A target directory of its own (not `target/`), holding links to this run's two binaries
    // where cargo would put them.
    let (_, profile) = target_and_profile();
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let target = tempfile::tempdir().expect("tempdir");
    let examples = target.path().join(profile_dir).join("examples");
    std::fs::create_dir_all(&examples).expect("mkdir");
    let shmetrics = target.path().join(profile_dir).join("shmetrics");
    let server = examples.join("prefork_server");
    std::os::unix::fs::symlink(util::shmetrics_bin(), &shmetrics).expect("symlink");
    std::os::unix::fs::symlink(util::example_bin("prefork_server"), &server).expect("symlink");
    let (app, metrics) = (util::free_port(), free_pair());
    let env = [
        ("CARGO_TARGET_DIR", target.path().to_str().expect("utf-8")),
        ("PROFILE", profile),
        ("DEMO_BUILD", "0"),
    ];
    let (st, out, err) = demo(app, metrics, &env);
    assert_eq!(st.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_banner(&out, &err, app, metrics);
    // The server came from CARGO_TARGET_DIR, found through cargo metadata.
    assert!(err.contains(&format!("for {} (pid", server.display())), "{err}");
}

#[test]
fn demo_runs_given_binaries() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let (app, metrics) = (util::free_port(), free_pair());
    let shmetrics = util::shmetrics_bin();
    let server = util::example_bin("prefork_server");
    let env = [
        ("SHMETRICS_BIN", shmetrics.to_str().expect("utf-8")),
        ("SERVER_BIN", server.to_str().expect("utf-8")),
        // Not used when both binaries are given (nothing is built or looked up there).
        ("CARGO_TARGET_DIR", elsewhere.path().to_str().expect("utf-8")),
    ];
    let (st, out, err) = demo(app, metrics, &env);
    assert_eq!(st.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_banner(&out, &err, app, metrics);
    assert_eq!(util::ls(elsewhere.path()), Vec::<String>::new());
}

#[test]
fn demo_fails_loudly() {
    let (target, profile) = target_and_profile();
    let target = target.to_str().expect("utf-8");
    let ok_env = [("CARGO_TARGET_DIR", target), ("PROFILE", profile), ("DEMO_BUILD", "0")];

    // The application's port is taken: the server cannot start, and neither can the demo.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = taken.local_addr().expect("addr").port();
    let (st, out, err) = demo(app, free_pair(), &ok_env);
    assert_eq!(st.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("demo.sh: error: shmetrics run exited with status 1 before the application answered"),
        "{err}"
    );
    assert!(!out.contains("shmetrics is aggregating"), "no banner: {out}");

    // The metrics port is taken: `shmetrics run` refuses to start.
    let metrics = taken.local_addr().expect("addr").port();
    let (st, out, err) = demo(util::free_port(), metrics, &ok_env);
    assert_eq!(st.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{metrics}")), "{err}");
    assert!(
        err.contains("demo.sh: error: shmetrics run exited with status 2 before the application answered"),
        "{err}"
    );
    assert!(!out.contains("shmetrics is aggregating"), "no banner: {out}");

    // CARGO_TARGET_DIR points where nothing is built.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let dir = elsewhere.path().to_str().expect("utf-8");
    let env = [("CARGO_TARGET_DIR", dir), ("PROFILE", profile), ("DEMO_BUILD", "0")];
    let (st, out, err) = demo(util::free_port(), free_pair(), &env);
    assert_eq!(st.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let missing = format!("demo.sh: error: {dir}/{profile_dir}/shmetrics is not an executable file");
    assert!(err.contains(&missing), "{err}");
    assert_eq!(out, "");

    // Half of the binaries given.
    let shmetrics = util::shmetrics_bin();
    let (st, _, err) =
        demo(util::free_port(), free_pair(), &[("SHMETRICS_BIN", shmetrics.to_str().expect("utf-8"))]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("demo.sh: error: set both SHMETRICS_BIN and SERVER_BIN"), "{err}");
    drop(taken);
}
