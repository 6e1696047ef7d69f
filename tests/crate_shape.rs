//! The crate's shape: a worker that depends on `shmetrics = { default-features = false }` builds
//! the writer alone. None of the aggregator's dependencies may be among its normal dependencies,
//! however deep; they are optional and come with the `aggregator` feature (see `Cargo.toml`).
//!
//! The test runs `cargo tree` (which resolves, but builds nothing) on this package with the
//! default features off.

use std::process::Command;

/// Crates only the aggregator needs: the async runtime, HTTP, the command line, `/proc`, gzip,
/// configuration files and log output.
const AGGREGATOR_ONLY: &[&str] = &[
    "tokio",
    "hyper",
    "hyper-util",
    "http-body-util",
    "clap",
    "procfs",
    "flate2",
    "toml",
    "tracing-subscriber",
    // Also optional today: the binary's errors, the encoders' number formatting, the archive's
    // and the dump's JSON, the aggregator's temporary files.
    "anyhow",
    "itoa",
    "ryu",
    "serde",
    "serde_json",
    "tempfile",
];

/// Runs `cargo tree -e normal --no-default-features --offline` plus `extra` in this package's
/// directory and returns its standard output.
fn cargo_tree(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-e", "normal", "--no-default-features", "--offline"])
        .args(extra)
        .output()
        .expect("cannot run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {extra:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo tree printed non-UTF-8")
}

#[test]
fn writer_alone_has_no_aggregator_dependency() {
    let tree = cargo_tree(&["--prefix", "none"]);
    // One crate a line, `name vX.Y.Z [(path)] [(*)]`.
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(
        names.contains(&"shmetrics"),
        "cargo tree does not list shmetrics itself; is this the right package? It printed:\n{tree}"
    );
    let leaked: Vec<&str> = AGGREGATOR_ONLY.iter().copied().filter(|c| names.contains(c)).collect();
    let mut why = String::new();
    for c in &leaked {
        // Who pulls it in, for the message: the inverted tree of the leaked crate.
        why.push_str(&format!("\n--- cargo tree -e normal --no-default-features -i {c}:\n"));
        why.push_str(&cargo_tree(&["-i", c]));
    }
    assert!(
        leaked.is_empty(),
        "the writer alone (default-features = false) depends on {}, which only the aggregator \
         needs: make each an optional dependency enabled by the `aggregator` feature, and gate its \
         users with #[cfg(feature = \"aggregator\")].{why}",
        leaked.join(", ")
    );
}
