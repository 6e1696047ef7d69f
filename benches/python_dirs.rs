//! One scrape — read, merge and Prometheus text encoding — of Python prometheus_client
//! multiprocess directories (`*.db` files), for the side-by-side comparison with Python's
//! `MultiProcessCollector` in `benches/python_compare.sh` (BENCHMARKS.md, section (d)).
//!
//! `SHMETRICS_PYDIRS` lists the directories (colon-separated), normally made by
//! `../shared/anchors/python_multiproc/gen.py` (W forked workers; S counters, S `livesum` gauges and
//! H = S/10 histograms with Python's 14 default buckets each). One benchmark per directory, named
//! after its basename (`python_dirs/W64_S10000`). For each directory:
//! 1. `Aggregator::open(dir, &Options { keep: true, .. })`: no start-up rule, the directory is read
//!    as it is (nothing is removed; the aggregator adds only its lock file);
//! 2. a first scrape, which parses every entry of every file (what a freshly started aggregator
//!    pays once), and a second one; both are outside criterion's measurement, their wall times
//!    are printed (`first scrape`, `second scrape`), and the second one sizes the sampling;
//! 3. a check of both outputs: sample lines, without our `shmetrics_*` self metrics, must be
//!    2S + 17H (S counters, S gauges, H histograms × (15 buckets + `_sum` + `_count`)), with S and
//!    H from the directory's `gen_manifest.json` (or S from a `W<w>_S<s>` basename and H = S/10);
//!    no unreadable file, no conflict; the live Python processes we see are printed next to W;
//! 4. timed iterations of `agg.scrape()` + `expose::encode(&snap, Format::Prometheus)` (including
//!    dropping both), which read value slots only: every entry was parsed by the first scrape.
//!
//! `SHMETRICS_PYDIRS_SAVE=DIR` writes each first scrape's text to `DIR/<basename>.prom` (for the
//! comparison with Python's output).
//!
//! Without `SHMETRICS_PYDIRS` (as under `cargo test --benches`, where no Python is needed) it runs
//! one tiny self-contained case, `python_dirs/tiny`: two files written byte by byte in the
//! prometheus_client ≥ 0.18 layout, with our own pid, checked for their merged values.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use shmetrics::aggregator::BadReason;
use shmetrics::aggregator::{Aggregator, Options};
use shmetrics::expose::{self, Format};

/// Prefix of the aggregator's own metrics, left out of the sample-line count.
const SELF_PREFIX: &str = "shmetrics_";

/// Sample lines: non-empty, not a comment, not a self metric.
fn sample_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(SELF_PREFIX))
}

/// What a directory should produce, from `gen_manifest.json` or the basename.
struct Expected {
    series: u64,
    histograms: u64,
    workers: Option<u64>,
}

fn expected(dir: &Path, name: &str) -> Expected {
    if let Ok(text) = std::fs::read_to_string(dir.join("gen_manifest.json")) {
        let m: serde_json::Value = serde_json::from_str(&text).expect("gen_manifest.json is JSON");
        let field = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("gen_manifest.json: no `{k}`"));
        return Expected {
            series: field("series"),
            histograms: field("histograms"),
            workers: Some(field("workers")),
        };
    }
    // `W<w>_S<s>`
    let (w, s) = name
        .strip_prefix('W')
        .and_then(|r| r.split_once("_S"))
        .and_then(|(w, s)| Some((w.parse().ok()?, s.parse().ok()?)))
        .unwrap_or_else(|| panic!("{}: no gen_manifest.json and not named W<w>_S<s>", dir.display()));
    Expected { series: s, histograms: s / 10, workers: Some(w) }
}

/// Opens the aggregator, scrapes twice (untimed by criterion, timed here) and checks the output;
/// returns the aggregator and the second scrape's duration.
fn prepare(dir: &Path, name: &str) -> (Aggregator, Duration) {
    let exp = expected(dir, name);
    let opened = Instant::now();
    let mut agg =
        Aggregator::open(dir, &Options { keep: true, ..Default::default() }).expect("open the aggregator");
    let started = Instant::now();
    let snap = agg.scrape();
    let text = expose::encode(&snap, Format::Prometheus);
    let first = started.elapsed();
    let open = started - opened;
    // A second scrape, timed, as a first look at the steady state (and to size the sampling).
    let again = Instant::now();
    let text2 = expose::encode(&agg.scrape(), Format::Prometheus);
    let second = again.elapsed();

    let lines = sample_lines(&text).count() as u64;
    let want = 2 * exp.series + 17 * exp.histograms;
    assert_eq!(lines, want, "{name}: sample lines without {SELF_PREFIX}* (2S + 17H)");
    assert_eq!(sample_lines(&text2).count() as u64, want, "{name}: second scrape");
    let stats = agg.stats();
    // `Foreign` counts files that are not metrics files at all (gen.py's `gen_*.json`).
    let unreadable: usize =
        stats.bad_files.iter().filter(|(r, _)| **r != BadReason::Foreign).map(|(_, n)| n).sum();
    assert_eq!(unreadable, 0, "{name}: unreadable files: {:?}", stats.bad_files);
    assert_eq!(stats.conflicts, 0, "{name}: metric conflicts");
    let gauges = sample_lines(&text).filter(|l| l.starts_with("anchor_inflight{")).count() as u64;
    eprintln!(
        "{name}: {} Python files, {} live Python processes (W = {}), {lines} sample lines (= 2S + 17H, \
         {gauges} live gauge series), {} bytes; open {:.1} ms, first scrape (parses every entry) {:.1} ms, \
         second scrape {:.2} ms; check ok",
        stats.python_files,
        stats.python_processes,
        exp.workers.map_or_else(|| "?".to_string(), |w| w.to_string()),
        text.len(),
        open.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3,
    );
    if let Some(save) = std::env::var_os("SHMETRICS_PYDIRS_SAVE") {
        let path = Path::new(&save).join(format!("{name}.prom"));
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    (agg, second)
}

/// One prometheus_client ≥ 0.18 entry: int32 key length, JSON key, 1–8 spaces to an 8-byte
/// boundary, f64 value, f64 timestamp.
fn entry(key: &str, value: f64) -> Vec<u8> {
    let mut e = (key.len() as i32).to_le_bytes().to_vec();
    e.extend_from_slice(key.as_bytes());
    e.extend(std::iter::repeat_n(b' ', 8 - (key.len() + 4) % 8));
    e.extend_from_slice(&value.to_le_bytes());
    e.extend_from_slice(&0f64.to_le_bytes());
    e
}

/// A file as prometheus_client writes it: int32 `used`, 4 bytes of padding, entries, zeros up to
/// the 64 KiB it preallocates.
fn write_py_file(path: &Path, entries: &[(&str, f64)]) {
    let body: Vec<u8> = entries.iter().flat_map(|(k, v)| entry(k, *v)).collect();
    let mut bytes = ((8 + body.len()) as i32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&body);
    bytes.resize(64 * 1024, 0);
    std::fs::write(path, bytes).expect("write a Python file");
}

/// The self-contained case: a counter file and a `livesum` gauge file of this (live) process.
fn tiny() -> (tempfile::TempDir, Aggregator) {
    let dir = tempfile::tempdir().expect("create a temp directory");
    let pid = std::process::id();
    write_py_file(
        &dir.path().join(format!("counter_{pid}.db")),
        &[
            (r#"["m", "m_total", {"a": "x"}, "Help."]"#, 3.0),
            (r#"["m", "m_total", {"a": "y"}, "Help."]"#, 4.5),
        ],
    );
    write_py_file(
        &dir.path().join(format!("gauge_livesum_{pid}.db")),
        &[(r#"["g", "g", {}, "Gauge."]"#, 2.5)],
    );
    let mut agg = Aggregator::open(dir.path(), &Options { keep: true, ..Default::default() })
        .expect("open the aggregator");
    let text = expose::encode(&agg.scrape(), Format::Prometheus);
    let got: Vec<&str> = sample_lines(&text).collect();
    assert_eq!(got, ["g 2.5", "m_total{a=\"x\"} 3.0", "m_total{a=\"y\"} 4.5"], "tiny case output:\n{text}");
    assert_eq!(agg.stats().python_files, 2);
    assert_eq!(agg.stats().python_processes, 1);
    (dir, agg)
}

fn basename(dir: &Path) -> String {
    dir.file_name().and_then(|n| n.to_str()).map_or_else(|| dir.display().to_string(), str::to_string)
}

fn python_dirs(c: &mut Criterion) {
    let dirs: Vec<PathBuf> = std::env::var_os("SHMETRICS_PYDIRS")
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    let mut g = c.benchmark_group("python_dirs");
    if dirs.is_empty() {
        let (_dir, mut agg) = tiny();
        g.bench_function("tiny", |b| {
            b.iter(|| {
                let snap = agg.scrape();
                expose::encode(&snap, Format::Prometheus)
            })
        });
    }
    for dir in dirs {
        let name = basename(&dir);
        let (mut agg, second) = prepare(&dir, &name);
        // As in `benches/scrape.rs`: fewer, flat samples once a scrape takes a millisecond or more.
        if second >= Duration::from_millis(1) {
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
        } else if second >= Duration::from_micros(100) {
            g.sample_size(30).sampling_mode(SamplingMode::Flat);
        } else {
            g.sample_size(100).sampling_mode(SamplingMode::Auto);
        }
        g.bench_function(name.as_str(), |b| {
            b.iter(|| {
                let snap = agg.scrape();
                expose::encode(&snap, Format::Prometheus)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = python_dirs
}
criterion_main!(benches);
