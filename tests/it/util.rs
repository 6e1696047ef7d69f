//! Shared helpers: locating binaries, temp dirs, spawning workloads, scraping.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a binary built by cargo for this test run (`shmetrics`, or an example).
pub fn example_bin(name: &str) -> PathBuf {
    // target/<profile>/deps/it-<hash> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    profile_dir.join("examples").join(name)
}

/// Path of the `shmetrics` binary.
pub fn shmetrics_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shmetrics"))
}
