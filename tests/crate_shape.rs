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

/// The modules, lowest first: data flows up this list, and a module may use only modules before
/// it (README, "Code map"). `client` is a leaf (the one HTTP client) that alarms and the server
/// use.
const LAYERS: &[&str] = &[
    "error",
    "layout",
    "writer",
    "ffi",
    "trust",
    "parsed",
    "procs",
    "client",
    "reader",
    "python",
    "merge",
    "expose",
    "samples",
    "archive",
    "dir",
    "aggregator",
    "derived",
    "job",
    "pollsters",
    "health",
    "uwsgi_stats",
    "push",
    "textdir",
    "alarm",
    "report",
    "server",
    "cli",
];

/// The top-level module a source file belongs to (`src/aggregator/python.rs` → `aggregator`).
fn module_of(path: &std::path::Path, src: &std::path::Path) -> Option<String> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// No module imports one above it: every `crate::<module>` in a module's files (comments left
/// out) names a module before it in [`LAYERS`]. Fails naming each offending file and reference.
#[test]
fn no_module_imports_one_above_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in &files {
        let Some(module) = module_of(f, &src) else { continue };
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let Some(me) = rank(&module) else {
            wrong.push(format!("{}: module {module} is not in LAYERS", f.display()));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read");
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for part in code.split("crate::").skip(1) {
                let target: String =
                    part.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if target.is_empty() {
                    continue; // `crate::Result`, `crate::Error`: the root's re-exports of `error`
                }
                match rank(&target) {
                    Some(t) if t <= me => {}
                    Some(_) => wrong
                        .push(format!("{}: {module} uses crate::{target}, which is above it", f.display())),
                    None => wrong.push(format!("{}: crate::{target} is not in LAYERS", f.display())),
                }
            }
        }
    }
    assert!(wrong.is_empty(), "the module layers are broken:\n  {}", wrong.join("\n  "));
    let listed: std::collections::BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, listed, "LAYERS lists exactly the modules in src/");
}
