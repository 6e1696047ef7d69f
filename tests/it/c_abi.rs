//! The C ABI end to end: `examples/c/prefork.c` is compiled with the system's `cc` against
//! `include/shmetrics.h` and the `libshmetrics.so` this build made, forks real children, and the
//! aggregator serves their exact sum.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util;

const T: Duration = Duration::from_secs(20);

/// Builds the example into `dir` and returns its path. The library is this build's
/// libshmetrics.so: `cargo test` leaves it in target/<profile>/deps (`cargo build` copies it up
/// to target/<profile>, which may be older), found at run time through an rpath.
fn build_prefork(dir: &Path) -> PathBuf {
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
    let out = dir.join("prefork");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("examples/c/prefork.c"))
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
    let prefork = build_prefork(tmp.path());
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
    let prefork = build_prefork(tmp.path());
    let out = Command::new(util::shmetrics_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0", "--"])
        .arg(&prefork)
        .args(["3", "10"])
        .output()
        .expect("shmetrics run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
