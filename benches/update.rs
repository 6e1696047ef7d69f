//! Update cost of a worker's handles, side by side with prometheus-client's in-process metrics.
//!
//! - group `update`: cached handles — counter `inc`, gauge `set`, histogram `observe` — on a
//!   file-backed [`shmetrics::Registry`] (a real file in a temp directory, as a worker under
//!   an aggregator has) against prometheus-client's `Counter::inc`, `Gauge::set`,
//!   `Histogram::observe`. Target: shmetrics ≤ 1.2× prometheus-client.
//! - group `labelled`: label lookup plus `inc` on a family pre-populated with 100 label sets:
//!   `family.with_labels(&["GET", "200"])?.inc()` against prometheus-client's
//!   `Family::<Labels, Counter>::get_or_create(&labels).inc()`. Target: ≤ 1×.
//!
//! - group `labelled_4_threads`: the same lookup + `inc` from 4 threads at once on the same
//!   family and label set (contended: every thread increments the same series), wall time per
//!   call, i.e. total time / (4 × calls).
//!
//! Run with `cargo bench --bench update` (see BENCHMARKS.md).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PcCounter;
use prometheus_client::metrics::family::Family as PcFamily;
use prometheus_client::metrics::gauge::Gauge as PcGauge;
use prometheus_client::metrics::histogram::Histogram as PcHistogram;
use prometheus_client::registry::Registry as PcRegistry;
use shmetrics::{Counter, Family, GaugeMode, Registry, DEFAULT_BUCKETS};

/// The value observed by both histograms (falls in the 0.5 bucket of the default buckets).
const OBSERVED: f64 = 0.3;

/// prometheus-client's idiomatic label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    method: String,
    status: String,
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// 100 (method, status) pairs, `("GET", "200")` among them.
fn label_sets() -> Vec<(&'static str, String)> {
    METHODS.iter().flat_map(|m| (200..220).map(move |s| (*m, s.to_string()))).collect()
}

fn temp_registry() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().expect("create a temp directory");
    let registry = Registry::open(dir.path()).expect("open a file-backed registry");
    assert!(registry.path().is_some(), "the registry must be file-backed");
    (dir, registry)
}

fn update(c: &mut Criterion) {
    let (_dir, reg) = temp_registry();
    let counter = reg.counter("bench_requests_total", "Requests.").expect("register counter");
    let gauge = reg.gauge("bench_inflight", "In flight.", GaugeMode::Sum).expect("register gauge");
    let recent =
        reg.gauge("bench_temperature", "Most recent.", GaugeMode::MostRecent).expect("register gauge");
    let hist = reg.histogram("bench_latency_seconds", "Latency.", &DEFAULT_BUCKETS).expect("register hist");

    let mut pc_reg = PcRegistry::default();
    let pc_counter: PcCounter = PcCounter::default();
    let pc_gauge: PcGauge<f64, std::sync::atomic::AtomicU64> = PcGauge::default();
    let pc_hist = PcHistogram::new(DEFAULT_BUCKETS);
    pc_reg.register("bench_requests", "Requests.", pc_counter.clone());
    pc_reg.register("bench_inflight", "In flight.", pc_gauge.clone());
    pc_reg.register("bench_latency_seconds", "Latency.", pc_hist.clone());

    let mut g = c.benchmark_group("update");
    g.bench_function(BenchmarkId::new("counter_inc", "shmetrics"), |b| b.iter(|| counter.inc()));
    g.bench_function(BenchmarkId::new("counter_inc", "prometheus_client"), |b| b.iter(|| pc_counter.inc()));
    g.bench_function(BenchmarkId::new("gauge_set", "shmetrics"), |b| b.iter(|| gauge.set(black_box(42.5))));
    g.bench_function(BenchmarkId::new("gauge_set", "prometheus_client"), |b| {
        b.iter(|| pc_gauge.set(black_box(42.5)))
    });
    g.bench_function(BenchmarkId::new("histogram_observe", "shmetrics"), |b| {
        b.iter(|| hist.observe(black_box(OBSERVED)))
    });
    g.bench_function(BenchmarkId::new("histogram_observe", "prometheus_client"), |b| {
        b.iter(|| pc_hist.observe(black_box(OBSERVED)))
    });
    // No prometheus-client counterpart: a most-recent gauge also stores a wall-clock timestamp.
    g.bench_function(BenchmarkId::new("gauge_set_mostrecent", "shmetrics"), |b| {
        b.iter(|| recent.set(black_box(42.5)))
    });
    g.finish();

    // The handles above wrote into the file, not into scratch slots. (A filter on the command line
    // may have skipped the benchmarks, so only check what ran: both sides advance together.)
    assert_eq!(reg.dropped_updates(), 0);
    assert_eq!(counter.get() > 0, pc_counter.get() > 0);
}

/// Both labelled families, pre-populated with the same 100 label sets, and the label struct of
/// the looked-up set (`GET`, `200`) for prometheus-client.
fn families() -> (tempfile::TempDir, Registry, Family<Counter>, PcFamily<Labels, PcCounter>, Labels) {
    let (dir, reg) = temp_registry();
    let family =
        reg.counter_family("bench_http_requests_total", "Requests.", &["method", "status"]).expect("family");
    let pc_family: PcFamily<Labels, PcCounter> = PcFamily::default();
    for (method, status) in label_sets() {
        family.with_labels(&[method, status.as_str()]).expect("pre-populate").inc();
        pc_family.get_or_create(&Labels { method: method.to_owned(), status: status.clone() }).inc();
    }
    let labels = Labels { method: "GET".to_owned(), status: "200".to_owned() };
    (dir, reg, family, pc_family, labels)
}

fn labelled(c: &mut Criterion) {
    let (_dir, reg, family, pc_family, labels) = families();
    let mut pc_reg = PcRegistry::default();
    pc_reg.register("bench_http_requests", "Requests.", pc_family.clone());

    let mut g = c.benchmark_group("labelled");
    g.bench_function(BenchmarkId::new("lookup_inc", "shmetrics"), |b| {
        b.iter(|| family.with_labels(black_box(&["GET", "200"])).expect("existing label set").inc())
    });
    g.bench_function(BenchmarkId::new("lookup_inc", "prometheus_client"), |b| {
        b.iter(|| pc_family.get_or_create(black_box(&labels)).inc())
    });
    // Context, not the target comparison: prometheus-client when the label set is built from
    // `&str`s at the call site (two `String` allocations per call), as request handlers often do.
    g.bench_function(BenchmarkId::new("lookup_inc_fresh_labels", "prometheus_client"), |b| {
        b.iter(|| {
            let (m, s) = black_box(("GET", "200"));
            pc_family.get_or_create(&Labels { method: m.to_owned(), status: s.to_owned() }).inc()
        })
    });
    g.finish();

    let ours = family.with_labels(&["GET", "200"]).expect("existing label set").get();
    assert!(ours > 1, "the looked-up series is the pre-populated one");
    assert_eq!(reg.dropped_series(), 0);
}

/// Threads of the contended group.
const THREADS: u64 = 4;

/// Runs `f` `iters` times on each of [`THREADS`] threads started together; returns the wall time
/// divided by [`THREADS`], so criterion reports wall time per call.
fn on_threads(iters: u64, f: impl Fn() + Sync) -> std::time::Duration {
    let barrier = std::sync::Barrier::new(THREADS as usize + 1);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..iters {
                    f();
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = std::time::Instant::now();
        barrier.wait();
        start.elapsed() / THREADS as u32
    })
}

fn labelled_4_threads(c: &mut Criterion) {
    let (_dir, reg, family, pc_family, labels) = families();
    let mut g = c.benchmark_group("labelled_4_threads");
    g.bench_function(BenchmarkId::new("lookup_inc", "shmetrics"), |b| {
        b.iter_custom(|iters| {
            on_threads(iters, || family.with_labels(black_box(&["GET", "200"])).expect("existing").inc())
        })
    });
    g.bench_function(BenchmarkId::new("lookup_inc", "prometheus_client"), |b| {
        b.iter_custom(|iters| {
            on_threads(iters, || {
                pc_family.get_or_create(black_box(&labels)).inc();
            })
        })
    });
    g.finish();
    assert_eq!(reg.dropped_series(), 0);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = update, labelled, labelled_4_threads
}
criterion_main!(benches);
