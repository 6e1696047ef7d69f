//! One scrape — merge plus Prometheus text encoding — of W live workers × S series.
//!
//! The shape follows `../shared/anchors/python_multiproc/gen.py`, so the numbers can be read next
//! to Python's `MultiProcessCollector`: every worker has
//! - S counters `anchor_requests_total{route,status}`, series i incremented by (i+1)·(w+1);
//! - S gauges `anchor_inflight{route,status}` (mode `livesum`), series i set to (i+1)+(w+1);
//! - S/10 histograms `anchor_latency_seconds{route}` (shmetrics' default buckets), series j
//!   observing one bucket bound, `DEFAULT_BUCKETS[(j+w) % 11]`;
//!
//! with identical label sets across workers, so every output series merges W files.
//!
//! The W workers are W [`Registry::open`] calls in this one process: each makes its own file and
//! holds its lock, so the aggregator sees W live writers. Each cell's directory is built once, the
//! first time its benchmark runs (a criterion filter such as `W64/S10000` skips building the
//! others), checked once against the closed-form values, and then scraped repeatedly. Registries
//! live until the process exits (the library leaks them by design), so the files of finished cells
//! stay mapped; the directory itself is removed when its cell is done.
//!
//! Under `cargo test --benches` (criterion's test mode) only the smallest cell runs unless
//! `SHMETRICS_BENCH_FULL=1` is set. Run with `cargo bench --bench scrape` (see BENCHMARKS.md).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use shmetrics::aggregator::{Aggregator, Options};
use shmetrics::expose::{self, Format};
use shmetrics::{GaugeMode, Registry, DEFAULT_BUCKETS};

const WORKERS: [u64; 3] = [4, 16, 64];
const SERIES: [u64; 3] = [100, 1000, 10_000];

/// A built directory with its aggregator.
struct Cell {
    _dir: tempfile::TempDir,
    agg: Aggregator,
}

fn route(i: u64) -> String {
    format!("/api/r{i:05}")
}

/// Writes W worker files of S series each in a new temp directory and opens an aggregator on it.
fn build(w_count: u64, s: u64) -> Cell {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("create a temp directory");
    for w in 0..w_count {
        let reg = Registry::open(dir.path()).expect("open a worker registry");
        let counters = reg
            .counter_family("anchor_requests_total", "Requests handled.", &["route", "status"])
            .expect("counter family");
        let gauges = reg
            .gauge_family("anchor_inflight", "In-flight requests.", GaugeMode::LiveSum, &["route", "status"])
            .expect("gauge family");
        let hists = reg
            .histogram_family("anchor_latency_seconds", "Request latency.", &DEFAULT_BUCKETS, &["route"])
            .expect("histogram family");
        for i in 0..s {
            let r = route(i);
            counters.with_labels(&[&r, "200"]).expect("counter series").inc_by((i + 1) * (w + 1));
            gauges.with_labels(&[&r, "200"]).expect("gauge series").set(((i + 1) + (w + 1)) as f64);
        }
        for j in 0..s / 10 {
            let bound = DEFAULT_BUCKETS[((j + w) % DEFAULT_BUCKETS.len() as u64) as usize];
            hists.with_labels(&[&route(j)]).expect("histogram series").observe(bound);
        }
        assert_eq!(reg.dropped_series(), 0, "worker {w}: series dropped");
    }
    let built = started.elapsed();
    let agg = Aggregator::open(dir.path(), &Options::default()).expect("open the aggregator");
    eprintln!("W={w_count} S={s}: wrote {w_count} worker files in {:.2} s", built.as_secs_f64());
    Cell { _dir: dir, agg }
}

/// The value of the sample line starting with `head` (name and labels, without the space).
fn sample(text: &str, head: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(head).is_some_and(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no sample {head} in the output"));
    line[head.len() + 1..].parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"))
}

/// Scrapes once, untimed, and checks merged values against the closed forms of the module docs.
fn check(cell: &mut Cell, w: u64, s: u64) {
    let started = Instant::now();
    let snap = cell.agg.scrape();
    let text = expose::encode(&snap, Format::Prometheus);
    let first = started.elapsed();
    assert_eq!(cell.agg.stats().live_workers as u64, w, "every worker must be live");
    let tri = w * (w + 1) / 2;
    for i in [0, s / 2, s - 1] {
        let r = route(i);
        let c = sample(&text, &format!("anchor_requests_total{{route=\"{r}\",status=\"200\"}}"));
        assert_eq!(c, ((i + 1) * tri) as f64, "counter {r}");
        let g = sample(&text, &format!("anchor_inflight{{route=\"{r}\",status=\"200\"}}"));
        assert_eq!(g, (w * (i + 1) + tri) as f64, "gauge {r}");
    }
    for j in [0, s / 10 - 1] {
        let r = route(j);
        let n = sample(&text, &format!("anchor_latency_seconds_count{{route=\"{r}\"}}"));
        assert_eq!(n, w as f64, "histogram count {r}");
        let inf = sample(&text, &format!("anchor_latency_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}}"));
        assert_eq!(inf, w as f64, "histogram +Inf bucket {r}");
    }
    let h = s / 10;
    let expected_series = (2 * s + h) as usize;
    assert_eq!(cell.agg.stats().series, expected_series, "merged series (without self metrics)");
    let lines = text.lines().filter(|l| !l.starts_with('#')).count();
    eprintln!(
        "W={w} S={s}: {} series ({} merged + self metrics), {lines} sample lines, {} bytes; \
         first scrape (parses every file) {:.1} ms; check ok",
        snap.series_count(),
        expected_series,
        text.len(),
        first.as_secs_f64() * 1e3,
    );
}

fn in_test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn scrape(c: &mut Criterion) {
    let full = !in_test_mode() || std::env::var_os("SHMETRICS_BENCH_FULL").is_some_and(|v| v == "1");
    let mut g = c.benchmark_group("scrape");
    for w in WORKERS {
        for s in SERIES {
            if !full && (w, s) != (WORKERS[0], SERIES[0]) {
                continue;
            }
            // Keep big cells to a handful of seconds: fewer, flat samples once a scrape takes ms.
            let cost = w * s;
            if cost >= 64_000 {
                g.sample_size(10).sampling_mode(SamplingMode::Flat);
            } else if cost >= 16_000 {
                g.sample_size(30).sampling_mode(SamplingMode::Flat);
            } else {
                g.sample_size(100).sampling_mode(SamplingMode::Auto);
            }
            let mut cell: Option<Cell> = None;
            g.bench_with_input(BenchmarkId::new(format!("W{w}"), format!("S{s}")), &(w, s), |b, &(w, s)| {
                let cell = cell.get_or_insert_with(|| {
                    let mut built = build(w, s);
                    check(&mut built, w, s);
                    built
                });
                b.iter(|| {
                    let snap = cell.agg.scrape();
                    expose::encode(&snap, Format::Prometheus)
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = scrape
}
criterion_main!(benches);
