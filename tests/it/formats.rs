//! Exposition formats checked by independent parsers: `promtool check metrics` for Prometheus text
//! 0.0.4, Python prometheus_client's OpenMetrics parser for OpenMetrics 1.0.0, and the Rust
//! prometheus-client crate's encoder as a second implementation of the same families.
//!
//! promtool comes from Debian's `prometheus` package; the Python interpreter with
//! prometheus_client is `$SHMETRICS_TEST_PYTHON` (`.ci/run` creates that venv). A missing tool
//! fails the test with instructions: these checks must not silently pass.

use std::process::Command;

use crate::util;

/// A directory with every kind of metric the library writes, held by live workers.
fn populated() -> (tempfile::TempDir, util::Served, util::Workload) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let wl = util::workload(
        &dir,
        &["--workers", "3", "--series", "4", "--histograms", "2", "--incs", "2", "--hold"],
    );
    (tmp, served, wl)
}

#[test]
fn promtool_accepts_the_prometheus_text() {
    let (_tmp, served, _wl) = populated();
    let text = util::scrape(served.addr);
    assert!(text.contains("wl_requests_total{route=\"/r3\"} 48\n"), "{text}");
    let (ok, out) =
        util::run_with_stdin(Command::new("promtool").args(["check", "metrics"]), text.as_bytes());
    assert!(
        ok,
        "promtool check metrics failed (install it with `apt-get install prometheus`):\n{out}\n{text}"
    );
    assert_eq!(out.trim(), "", "promtool printed lint findings");
}

/// Parses OpenMetrics text with prometheus_client and prints one `name{k="v",...} value` line per
/// sample (labels sorted), so the Rust side can compare values exactly.
const OM_PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
text = sys.stdin.read()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s|%s|%s{%s} %r" % (fam.name, fam.type, s.name, labels, float(s.value)))
"#;

#[test]
fn python_openmetrics_parser_accepts_the_openmetrics_text() {
    let py = util::require_python();
    let (_tmp, served, wl) = populated();
    let r =
        util::http_get(served.addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    let text = r.text();
    assert!(text.ends_with("# EOF\n"));
    let (ok, out) = util::run_with_stdin(Command::new(&py).args(["-c", OM_PARSE]), text.as_bytes());
    assert!(ok, "the OpenMetrics parser rejected our output:\n{out}\n{text}");
    let parsed: std::collections::BTreeMap<&str, (&str, &str)> = out
        .lines()
        .map(|l| {
            let (fam, rest) = l.split_once('|').expect("family");
            let (ty, sample) = rest.split_once('|').expect("type");
            let (key, value) = sample.rsplit_once(' ').expect("value");
            (key, (fam, value)).clone_with_type(ty)
        })
        .collect();
    let get = |k: &str| parsed.get(k).map(|(_, v)| *v).unwrap_or_else(|| panic!("no sample {k} in\n{out}"));
    // Counter: family `wl_requests` of type counter, sample `_total`; K=2, T=6: 2·(i+1)·6.
    assert_eq!(get("wl_requests_total{route=\"/r0\"}"), "12.0");
    assert_eq!(get("wl_requests_total{route=\"/r3\"}"), "48.0");
    assert_eq!(parsed["wl_requests_total{route=\"/r0\"}"].0, "wl_requests/counter");
    // f64 counter: K·T/2 = 6.
    assert_eq!(get("wl_bytes_total{}"), "6.0");
    // Histogram: 3 workers observe 0.05, 0.10, 0.15 twice each.
    assert_eq!(get("wl_latency_seconds_bucket{le=\"0.1\",route=\"/h1\"}"), "4.0");
    assert_eq!(get("wl_latency_seconds_bucket{le=\"0.5\",route=\"/h1\"}"), "6.0");
    assert_eq!(get("wl_latency_seconds_bucket{le=\"+Inf\",route=\"/h1\"}"), "6.0");
    assert_eq!(get("wl_latency_seconds_count{route=\"/h1\"}"), "6.0");
    // Gauges: livesum W·(i+1)+T, max W·(i+1), per-process with pid.
    assert_eq!(get("wl_inflight{route=\"/r1\"}"), "12.0");
    assert_eq!(get("wl_max{route=\"/r1\"}"), "6.0");
    for (w, pid) in wl.pids.iter().enumerate() {
        assert_eq!(get(&format!("wl_all{{pid=\"{pid}\",route=\"/r2\"}}")), format!("{}.0", w + 1));
    }
}

trait CloneWithType<'a> {
    fn clone_with_type(self, ty: &'a str) -> (&'a str, (&'a str, &'a str));
}

impl<'a> CloneWithType<'a> for (&'a str, (&'a str, &'a str)) {
    /// Keeps `family/type` together so a test can check both.
    fn clone_with_type(self, ty: &'a str) -> (&'a str, (&'a str, &'a str)) {
        let (key, (fam, value)) = self;
        let joined: &'a str = Box::leak(format!("{fam}/{ty}").into_boxed_str());
        (key, (joined, value))
    }
}

/// The same families built in the Rust prometheus-client crate and encoded by it must carry the
/// same samples as our OpenMetrics encoding of the merged snapshot.
#[test]
fn prometheus_client_crate_encodes_the_same_samples() {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};

    // Ours: one process's registry, merged by the library aggregator.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let mut agg = shmetrics::aggregator::Aggregator::open(&dir, &Default::default()).expect("aggregator");
    let reg = shmetrics::writer::Registry::open(&dir).expect("registry");
    let c = reg.counter_family("jobs", "Jobs done.", &["queue"]).expect("counter");
    c.with_labels(&["fast"]).expect("labels").inc_by(5);
    c.with_labels(&["slow"]).expect("labels").inc_by(2);
    let g = reg.gauge("temperature", "Temperature.", shmetrics::layout::GaugeMode::Sum).expect("gauge");
    g.set(21.5);
    let h = reg.histogram("latency_seconds", "Latency.", &[0.1, 1.0]).expect("histogram");
    for v in [0.05, 0.5, 3.0] {
        h.observe(v);
    }
    let snap = agg.scrape();
    let ours = shmetrics::expose::encode(&snap, shmetrics::expose::Format::OpenMetrics);

    // Theirs.
    let mut registry = prometheus_client::registry::Registry::default();
    let jobs = Family::<Vec<(String, String)>, Counter>::default();
    registry.register("jobs", "Jobs done.", jobs.clone());
    jobs.get_or_create(&vec![("queue".into(), "fast".into())]).inc_by(5);
    jobs.get_or_create(&vec![("queue".into(), "slow".into())]).inc_by(2);
    let temp = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    registry.register("temperature", "Temperature.", temp.clone());
    temp.set(21.5);
    let lat = Histogram::new([0.1, 1.0]);
    registry.register("latency_seconds", "Latency.", lat.clone());
    for v in [0.05, 0.5, 3.0] {
        lat.observe(v);
    }
    let mut theirs = String::new();
    encode(&mut theirs, &registry).expect("encode");

    // Compare sample lines (the crate orders families by registration; we sort by name).
    let lines = |t: &str| {
        let mut v: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("shmetrics_"))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(lines(&ours), lines(&theirs), "ours:\n{ours}\ntheirs:\n{theirs}");
}

/// Histograms fed negative and NaN observations, or with negative bucket bounds, through the real
/// writer: OpenMetrics (what Prometheus asks for) must parse with prometheus_client's OpenMetrics
/// parser, which rejects a NaN or negative `_sum`, a `_sum` beside a negative `le`, and a
/// `_count` without a `_sum`. Such series are written with their buckets only; Prometheus text
/// keeps `_sum` and `_count` (and promtool accepts it).
#[test]
fn histograms_with_negative_or_nan_observations_parse_as_openmetrics() {
    let py = util::require_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let reg = shmetrics::writer::Registry::open(&dir).expect("registry");
    let observe = |name: &str, bounds: &[f64], values: &[f64]| {
        let h = reg.histogram(name, "Observations.", bounds).expect("histogram");
        for v in values {
            h.observe(*v);
        }
    };
    observe("offset_seconds", &[0.1, 1.0], &[-2.0, 0.05]);
    observe("ratio", &[0.5, 1.0], &[0.25, f64::NAN]);
    observe("temp_delta", &[-1.0, 0.0, 1.0], &[-0.5, 0.5, 2.0]);
    observe("latency_seconds", &[0.1, 1.0], &[0.05, 0.5]);

    let r =
        util::http_get(served.addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]);
    assert_eq!(r.status, 200);
    let text = r.text();
    let (ok, out) = util::run_with_stdin(Command::new(&py).args(["-c", OM_PARSE]), text.as_bytes());
    assert!(ok, "the OpenMetrics parser rejected our output:\n{out}\n{text}");
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| {
            ["offset_seconds|", "ratio|", "temp_delta|", "latency_seconds|"].iter().any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(
        ours,
        [
            "latency_seconds|histogram|latency_seconds_bucket{le=\"0.1\"} 1.0",
            "latency_seconds|histogram|latency_seconds_bucket{le=\"1.0\"} 2.0",
            "latency_seconds|histogram|latency_seconds_bucket{le=\"+Inf\"} 2.0",
            "latency_seconds|histogram|latency_seconds_count{} 2.0",
            "latency_seconds|histogram|latency_seconds_sum{} 0.55",
            // -2.0 + 0.05: negative.
            "offset_seconds|histogram|offset_seconds_bucket{le=\"0.1\"} 2.0",
            "offset_seconds|histogram|offset_seconds_bucket{le=\"1.0\"} 2.0",
            "offset_seconds|histogram|offset_seconds_bucket{le=\"+Inf\"} 2.0",
            // NaN goes to +Inf and makes the sum NaN.
            "ratio|histogram|ratio_bucket{le=\"0.5\"} 1.0",
            "ratio|histogram|ratio_bucket{le=\"1.0\"} 1.0",
            "ratio|histogram|ratio_bucket{le=\"+Inf\"} 2.0",
            // Negative bounds: no sum, whatever its sign (2.0 here).
            "temp_delta|histogram|temp_delta_bucket{le=\"-1.0\"} 0.0",
            "temp_delta|histogram|temp_delta_bucket{le=\"0.0\"} 1.0",
            "temp_delta|histogram|temp_delta_bucket{le=\"1.0\"} 2.0",
            "temp_delta|histogram|temp_delta_bucket{le=\"+Inf\"} 3.0",
        ],
        "{out}"
    );

    let prom = util::scrape(served.addr);
    for line in [
        "offset_seconds_count 2\noffset_seconds_sum -1.95\n",
        "ratio_count 2\nratio_sum NaN\n",
        "temp_delta_count 3\ntemp_delta_sum 2.0\n",
    ] {
        assert!(prom.contains(line), "{line:?} in\n{prom}");
    }
    let (ok, out) =
        util::run_with_stdin(Command::new("promtool").args(["check", "metrics"]), prom.as_bytes());
    assert!(ok, "promtool check metrics failed:\n{out}\n{prom}");
}
