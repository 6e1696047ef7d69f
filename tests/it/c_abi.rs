//! The C ABI end to end: `examples/c/prefork.c` and `examples/c/typed.c` are compiled with the
//! system's `cc` against `include/shmetrics.h` and the `libshmetrics.so` this build made, fork real
//! children, and the aggregator serves their exact values.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util;

const T: Duration = Duration::from_secs(20);

/// Builds `examples/c/<example>.c` into `dir` and returns its path. The library is this build's
/// libshmetrics.so: `cargo test` leaves it in target/<profile>/deps (`cargo build` copies it up
/// to target/<profile>, which may be older), found at run time through an rpath.
fn build_c(dir: &Path, example: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let profile = util::shmetrics_bin().parent().expect("target dir").to_path_buf();
    let lib_dir = [profile.join("deps"), profile.clone()]
        .into_iter()
        .find(|d| d.join("libshmetrics.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "no libshmetrics.so in {0}/deps or {0}: the library's cdylib is built with the crate \
                 (Cargo.toml [lib] crate-type)",
                profile.display()
            )
        });
    let out = dir.join(example);
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join(format!("examples/c/{example}.c")))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lshmetrics", "-o"])
        .arg(&out)
        .output()
        .expect("cc (a C compiler is needed for this test: apt-get install gcc)");
    assert!(cc.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&cc.stderr));
    out
}

#[test]
fn a_c_prefork_server_is_counted_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefork = build_c(tmp.path(), "prefork");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let status =
        Command::new(&prefork).args(["4", "1000"]).env("SHMETRICS_DIR", &dir).status().expect("prefork");
    assert!(status.success(), "{status}");
    // The 4 children and the parent exited cleanly: all 5 files folded, none a crash.
    let s = util::wait_for(T, "every file folded", || {
        let s = util::samples(&util::scrape(served.addr));
        (s.get("shmetrics_workers_dead_total") == Some(&5.0)).then_some(s)
    });
    for w in 0..4 {
        assert_eq!(s.get(&format!("c_requests_total{{worker=\"{w}\"}}")), Some(&1000.0), "worker {w}");
    }
    assert_eq!(s.get("c_latency_seconds_count"), Some(&4000.0));
    assert_eq!(s.get("c_latency_seconds_bucket{le=\"0.01\"}"), Some(&0.0));
    assert_eq!(s.get("c_latency_seconds_bucket{le=\"0.1\"}"), Some(&4000.0));
    assert_eq!(s.get("shmetrics_workers_crashed_total"), Some(&0.0));
    assert_eq!(s.get("shmetrics_dropped_updates_total"), Some(&0.0));
}

/// Under `shmetrics run`, as the README shows: the run exits with the program's status, 0.
#[test]
fn shmetrics_run_of_the_c_example_exits_0() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefork = build_c(tmp.path(), "prefork");
    let out = Command::new(util::shmetrics_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0", "--"])
        .arg(&prefork)
        .args(["3", "10"])
        .output()
        .expect("shmetrics run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `examples/c/typed.c` under `serve`: 4 children, one after another, observe a summary and set an
/// info and an enum (by name and by index) while every error code for bad input is checked in C;
/// all stay alive until the scrape, so the last child's info and state are the ones shown.
#[test]
fn a_c_program_writes_summary_info_and_enum_and_gets_codes_for_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let typed = build_c(tmp.path(), "typed");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let mut child = Command::new(&typed)
        .arg("4")
        .env("SHMETRICS_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("typed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line, "ready\n", "typed failed before every child was set (its stderr says why)");

    let c_samples = |text: &str| -> Vec<(String, f64)> {
        util::samples(text).into_iter().filter(|(k, _)| k.starts_with("c_")).collect()
    };
    let s = c_samples(&util::scrape(served.addr));
    let want: Vec<(String, f64)> = [
        ("c_build_info{app=\"demo\",version=\"1.3\",worker=\"w3\"}", 1.0),
        ("c_phase{via=\"index\",c_phase=\"draining\"}", 1.0),
        ("c_phase{via=\"index\",c_phase=\"serving\"}", 0.0),
        ("c_phase{via=\"index\",c_phase=\"starting\"}", 0.0),
        ("c_phase{via=\"name\",c_phase=\"draining\"}", 1.0),
        ("c_phase{via=\"name\",c_phase=\"serving\"}", 0.0),
        ("c_phase{via=\"name\",c_phase=\"starting\"}", 0.0),
        // 1 + 2 + 3 + 4 observations of 0.25.
        ("c_work_seconds_count{kind=\"task\"}", 10.0),
        ("c_work_seconds_sum{kind=\"task\"}", 2.5),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(s, want);

    drop(child.stdin.take());
    let status = child.wait().expect("wait typed");
    assert!(status.success(), "{status}");
    // All 5 exited cleanly: the summary stays (archived), no conflicts, no invalid values.
    let s = util::wait_for(T, "every file folded", || {
        let s = util::samples(&util::scrape(served.addr));
        (s.get("shmetrics_workers_dead_total") == Some(&5.0)).then_some(s)
    });
    assert_eq!(s.get("c_work_seconds_count{kind=\"task\"}"), Some(&10.0));
    assert_eq!(s.get("c_work_seconds_sum{kind=\"task\"}"), Some(&2.5));
    assert_eq!(s.get("shmetrics_workers_crashed_total"), Some(&0.0));
    assert_eq!(s.get("shmetrics_metric_conflicts"), Some(&0.0));
    assert_eq!(s.get("shmetrics_invalid_values"), Some(&0.0));
}
