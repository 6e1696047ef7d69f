//! Python prometheus_client multiprocess files (`*.db`) read by the aggregator, checked against the
//! reference implementation itself: prometheus_client 0.26's `MultiProcessCollector` +
//! `generate_latest` over the very same files.
//!
//! Real writers: `tests/python/compat_workers.py` forks real prometheus_client worker processes
//! (other `tests/python/compat_*.py` scripts write old layouts, garbage, foreign files, a rolling
//! deploy, growing files, and drive a real pid reuse in a pid namespace). Both expositions are
//! parsed by prometheus_client's own parsers (`tests/python/compat_parse.py`: Prometheus text, and
//! OpenMetrics where noted) and compared sample by sample, by value: our text formats numbers
//! differently (`6` vs `6.0`), so texts are never compared. Labels, label values (including `le`)
//! and HELP texts are compared exactly.
//!
//! Value comparison: exact, except float sums (`*_sum` samples, the float-incremented counter
//! `compat_bytes_total` and the `sum`/`livesum` gauges), which may differ in the last ulps from
//! summation order: those compare with a relative tolerance of 1e-12. Integral sums (counts,
//! buckets, integer counters) and every value that is not a sum (min, max, mostrecent, all) are
//! exact.
//!
//! Our semantics are Python's with `mark_process_dead(pid)` called automatically: Python keeps a
//! dead process's `live*` gauges until the application calls `mark_process_dead`; we drop them as
//! soon as the process is gone. So once workers have died, the reference output is Python's
//! collection over a copy of the directory on which `mark_process_dead` was called for each of
//! them (a copy, so that our aggregator still sees every file and must drop them itself).
//!
//! `$SHMETRICS_TEST_PYTHON` must point at a Python with prometheus_client 0.26.0 (`.ci/run`
//! creates `target/test-venv`); without it the tests fail with instructions.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::util;

const WORKERS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_workers.py");
const PARSE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_parse.py");
const OLDFILES_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_oldfiles.py");
const FOREIGN_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_foreign.py");
const REDEPLOY_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_redeploy.py");
const GROW_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_grow.py");
const PIDREUSE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/compat_pidreuse.py");

/// Number of Python worker processes.
const N: usize = 4;
/// Python files per process in compat_workers.py: counter, histogram, summary, 10 gauge modes.
const FILES_PER_PROCESS: usize = 13;

/// Runs a helper script to completion; panics with its output if it fails.
fn run_py(py: &str, script: &str, args: &[&Path]) {
    let out = Command::new(py).arg(script).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Parsing and comparing expositions

/// An exposition parsed by prometheus_client's text parser.
#[derive(Debug, Default)]
struct Expo {
    /// Family name → (type, help), for families that have at least one sample.
    families: BTreeMap<String, (String, String)>,
    /// `name{label="json-escaped",...}` (labels sorted) → value.
    samples: BTreeMap<String, f64>,
}

impl Expo {
    fn get(&self, key: &str) -> Option<f64> {
        self.samples.get(key).copied()
    }
    /// Value of `shmetrics_bad_files{reason=...}` (0 if absent).
    fn bad(&self, reason: &str) -> f64 {
        self.get(&format!("shmetrics_bad_files{{reason=\"{reason}\"}}")).unwrap_or(0.0)
    }
    fn bad_total(&self) -> f64 {
        ["corrupt", "foreign", "truncated", "version"].iter().map(|r| self.bad(r)).sum()
    }
    /// Samples whose name starts with one of `prefixes`.
    fn only(&self, prefixes: &[&str]) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

static PARSE_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Parses Prometheus text with prometheus_client's parser (text goes through a file in `tmp`).
fn parse(py: &str, text: &str, tmp: &Path) -> Expo {
    parse_as(py, text, tmp, "text")
}

/// Parses OpenMetrics text with prometheus_client's OpenMetrics parser.
fn parse_om(py: &str, text: &str, tmp: &Path) -> Expo {
    parse_as(py, text, tmp, "openmetrics")
}

/// Our exposition in OpenMetrics (what Prometheus asks for).
fn scrape_om(addr: std::net::SocketAddr) -> String {
    let r = util::http_get(addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]);
    assert_eq!(r.status, 200, "OpenMetrics scrape status");
    r.text()
}

fn parse_as(py: &str, text: &str, tmp: &Path, format: &str) -> Expo {
    let path = tmp.join(format!("expo-{}.txt", PARSE_SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).expect("write exposition");
    let out = Command::new(py).arg(PARSE_PY).arg(&path).arg(format).output().expect("run parser");
    assert!(
        out.status.success(),
        "prometheus_client's parser rejected the exposition {}:\n{}\n{text}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut e = Expo::default();
    let mut current: Option<(String, String, String)> = None;
    for line in String::from_utf8(out.stdout).expect("utf-8").lines() {
        let parts: Vec<&str> = line.split('\t').collect();
        match parts[0] {
            "F" => {
                let name: String = serde_json::from_str(parts[1]).expect("family name");
                let help: String = serde_json::from_str(parts[3]).expect("help");
                current = Some((name, parts[2].to_string(), help));
            }
            "S" => {
                let v = match parts[2] {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    s => s.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
                };
                let prev = e.samples.insert(parts[1].to_string(), v);
                assert!(prev.is_none(), "duplicate sample {} in\n{text}", parts[1]);
                if let Some((name, ty, help)) = &current {
                    e.families.insert(name.clone(), (ty.clone(), help.clone()));
                }
            }
            _ => panic!("unexpected parser output {line:?}"),
        }
    }
    e
}

/// Float sums: values that are sums of non-integral floats, whose last ulps depend on the order in
/// which files are summed. Everything else must be bit-for-bit identical.
fn float_summed(key: &str) -> bool {
    let name = key.split('{').next().unwrap_or(key);
    name.ends_with("_sum") || ["compat_bytes_total", "compat_g_sum", "compat_g_livesum"].contains(&name)
}

fn same_value(key: &str, ours: f64, python: f64) -> bool {
    if ours == python || (ours.is_nan() && python.is_nan()) {
        return true;
    }
    // Float sums: a relative tolerance of 1e-12 (a few ulps), for summation order only.
    float_summed(key) && python.is_finite() && (ours - python).abs() <= 1e-12 * python.abs().max(ours.abs())
}

/// Every difference between our exposition and Python's, one line each. Our self metrics
/// (`shmetrics_*`) are ignored; Python families without samples are not compared (a header-only
/// family carries no data).
fn differences(ours: &Expo, python: &Expo) -> Vec<String> {
    let mut d = Vec::new();
    let ours_samples: BTreeMap<&String, f64> =
        // Our additions Python cannot give: self metrics and per-process metrics.
        ours.samples
            .iter()
            .filter(|(k, _)| !k.starts_with("shmetrics_") && !k.starts_with("process_"))
            .map(|(k, v)| (k, *v))
            .collect();
    for (k, pv) in &python.samples {
        match ours_samples.get(k) {
            None => d.push(format!("missing in ours: {k}   (python {pv:?})")),
            Some(ov) if !same_value(k, *ov, *pv) => {
                d.push(format!("value differs:   {k}   ours {ov:?}   python {pv:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, ov) in &ours_samples {
        if !python.samples.contains_key(*k) {
            d.push(format!("extra in ours:   {k}   (ours {ov:?})"));
        }
    }
    for (name, (pty, phelp)) in &python.families {
        match ours.families.get(name) {
            None => d.push(format!("family missing in ours: {name}")),
            Some((oty, ohelp)) => {
                if oty != pty {
                    d.push(format!("family type differs: {name}   ours {oty}   python {pty}"));
                }
                if ohelp != phelp {
                    d.push(format!("family help differs: {name}   ours {ohelp:?}   python {phelp:?}"));
                }
            }
        }
    }
    d
}

/// Asserts two sample maps have the same keys and values ([`same_value`]: NaN equals NaN).
fn assert_same_samples(ours: &BTreeMap<String, f64>, expected: &BTreeMap<String, f64>, what: &str) {
    let mut d = Vec::new();
    for (k, e) in expected {
        match ours.get(k) {
            None => d.push(format!("missing: {k} (expected {e:?})")),
            Some(o) if !same_value(k, *o, *e) => d.push(format!("{k}: {o:?}, expected {e:?}")),
            Some(_) => {}
        }
    }
    d.extend(ours.keys().filter(|k| !expected.contains_key(*k)).map(|k| format!("extra: {k}")));
    assert!(d.is_empty(), "{what}:\n  {}", d.join("\n  "));
}

fn report(what: &str, d: &[String], served: &util::Served) -> String {
    format!(
        "{what}: our /metrics differs from prometheus_client 0.26's MultiProcessCollector \
         ({} differences; aggregator log {}):\n  {}",
        d.len(),
        served.log.display(),
        d.join("\n  ")
    )
}

/// Scrapes until our samples equal `expected`'s (as in [`differences`]), or panics after `timeout`
/// with the last differences. Returns the matching exposition.
fn wait_same(
    py: &str,
    served: &util::Served,
    expected: &Expo,
    tmp: &Path,
    timeout: Duration,
    what: &str,
) -> Expo {
    let start = Instant::now();
    loop {
        let ours = parse(py, &util::scrape(served.addr), tmp);
        let d = differences(&ours, expected);
        if d.is_empty() {
            return ours;
        }
        assert!(start.elapsed() < timeout, "{} (still after {timeout:?})", report(what, &d, served));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts our current exposition equals `expected` now; returns it.
fn assert_same(py: &str, served: &util::Served, expected: &Expo, tmp: &Path, what: &str) -> Expo {
    let ours = parse(py, &util::scrape(served.addr), tmp);
    let d = differences(&ours, expected);
    assert!(d.is_empty(), "{}", report(what, &d, served));
    ours
}

// ---------------------------------------------------------------------------------------------
// The Python workers

/// `compat_workers.py`: a prometheus_client master and its forked workers, driven over stdin.
struct PyWorkers {
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    master: i32,
    workers: Vec<i32>,
    proc: util::Proc,
}

impl PyWorkers {
    /// `exotic_buckets`: histogram bounds whose `le` Python writes in exponent form (`2.5e-05`,
    /// `1e+07`); only the exposition-format test uses them, so that the other tests check their
    /// own subject.
    fn start(py: &str, dir: &Path, exotic_buckets: bool) -> PyWorkers {
        let mut child = Command::new(py)
            .arg(WORKERS_PY)
            .arg(dir)
            .arg(N.to_string())
            .arg(if exotic_buckets { "exotic" } else { "plain" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn compat_workers.py");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let proc = util::Proc { child };
        let mut line = String::new();
        stdout.read_line(&mut line).expect("READY line");
        let pids: Vec<i32> = line
            .strip_prefix("READY")
            .unwrap_or_else(|| panic!("compat_workers.py: unexpected output {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect();
        assert_eq!(pids.len(), N + 1, "{line}");
        PyWorkers { stdin, stdout, master: pids[0], workers: pids[1..].to_vec(), proc }
    }

    fn cmd(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write command");
        stdin.flush().expect("flush");
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("answer");
        assert_eq!(answer.trim(), "OK", "compat_workers.py: `{line}` failed");
    }

    /// Python's exposition of the directory, now.
    fn collect(&mut self, out: &Path) -> String {
        self.cmd(&format!("collect {}", out.display()));
        std::fs::read_to_string(out).expect("python exposition")
    }

    /// Python's exposition of a copy of the directory after `mark_process_dead(pid)` for `dead`.
    fn collect_as_dead(&mut self, out: &Path, copy: &Path, dead: &[i32]) -> String {
        let pids: Vec<String> = dead.iter().map(|p| p.to_string()).collect();
        self.cmd(&format!("collect_as_dead {} {} {}", out.display(), copy.display(), pids.join(" ")));
        std::fs::read_to_string(out).expect("python exposition")
    }
}

impl Drop for PyWorkers {
    fn drop(&mut self) {
        // `quit` (or EOF) makes the master kill and reap what is left of its workers and exit;
        // util::Proc's drop then only has to reap it (or SIGTERM/SIGKILL it if it hangs).
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A temporary directory with the multiproc directory `mp` inside; everything else the tests write
/// (expositions, copies, logs) stays outside `mp`, so the aggregator never sees it.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    (tmp, dir)
}

fn db_files(dir: &Path) -> Vec<String> {
    util::ls(dir).into_iter().filter(|n| n.ends_with(".db")).collect()
}

/// Python files of process `pid` in `dir` (names `<type>[_<mode>]_<pid>.db`).
fn files_of(dir: &Path, pid: i32) -> Vec<String> {
    let suffix = format!("_{pid}.db");
    db_files(dir).into_iter().filter(|n| n.ends_with(&suffix)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Same samples as MultiProcessCollector, workers alive and after they exited

#[test]
fn python_semantics_match_multiprocesscollector() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    let served = util::serve(&dir, &[]);
    let mut w = PyWorkers::start(&py, &dir, true);

    // Workers alive: every file, every mode, the master's values too. Prometheus text 0.0.4, and
    // OpenMetrics 1.0.0 (what Prometheus asks for) against Python's OpenMetrics exposition.
    let live_txt = t.join("py-live.txt");
    let python_live = parse(&py, &w.collect(&live_txt), t);
    let python_live_om =
        parse_om(&py, &std::fs::read_to_string(live_txt.with_extension("txt.om")).expect("om"), t);
    assert!(python_live.samples.len() > 100, "the reference output is suspiciously small");
    let ours = parse(&py, &util::scrape(served.addr), t);
    let alive_diff = differences(&ours, &python_live);
    let alive_diff_om = differences(&parse_om(&py, &scrape_om(served.addr), t), &python_live_om);
    let files = db_files(&dir).len();
    assert_eq!(files, (N + 1) * FILES_PER_PROCESS, "{:?}", db_files(&dir));
    assert_eq!(ours.get("shmetrics_python_files{}"), Some(files as f64), "shmetrics_python_files");
    assert_eq!(ours.bad_total(), 0.0, "no bad files expected");

    // Workers exited (status 0, reaped by the master), nobody called mark_process_dead: their
    // live gauges must go, everything else stays. Both phases are compared before asserting, so
    // that a difference in the first does not hide one in the second.
    w.cmd("exit");
    let workers = w.workers.clone();
    let dead_txt = t.join("py-dead.txt");
    let python_dead = parse(&py, &w.collect_as_dead(&dead_txt, &t.join("copy"), &workers), t);
    let python_dead_om =
        parse_om(&py, &std::fs::read_to_string(dead_txt.with_extension("txt.om")).expect("om"), t);
    assert!(
        python_dead.samples.len() < python_live.samples.len(),
        "mark_process_dead removed nothing from the reference"
    );
    // Wait until the dead workers' live gauges are gone (or 10 s), then compare.
    let start = Instant::now();
    let dead_diff = loop {
        let ours = parse(&py, &util::scrape(served.addr), t);
        assert_eq!(ours.bad_total(), 0.0, "no bad files expected");
        let d = differences(&ours, &python_dead);
        if !d.iter().any(|l| l.contains("compat_g_live")) || start.elapsed() > Duration::from_secs(10) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dead_diff_om = differences(&parse_om(&py, &scrape_om(served.addr), t), &python_dead_om);
    assert!(
        alive_diff.is_empty() && dead_diff.is_empty() && alive_diff_om.is_empty() && dead_diff_om.is_empty(),
        "{}\n{}\n{}\n{}",
        report("workers alive", &alive_diff, &served),
        report("workers exited", &dead_diff, &served),
        report("OpenMetrics, workers alive", &alive_diff_om, &served),
        report("OpenMetrics, workers exited", &dead_diff_om, &served)
    );
}

/// A rolling deploy: old and new code define the same names with other buckets and labels in
/// different processes. MultiProcessCollector merges by key (the union of `le` bounds, both label
/// sets); so must we.
#[test]
fn rolling_deploy_definitions_merge_like_multiprocesscollector() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    let served = util::serve(&dir, &[]);
    let out = t.join("py-redeploy.txt");
    run_py(&py, REDEPLOY_PY, &[&dir, &out]);
    let python = parse(&py, &std::fs::read_to_string(&out).expect("python exposition"), t);
    assert!(python.samples.len() > 10, "the reference output is suspiciously small");
    let ours = assert_same(&py, &served, &python, t, "old and new code side by side");
    util::assert_openmetrics_parses(served.addr);
    assert_eq!(ours.get("shmetrics_metric_conflicts{}"), Some(0.0), "conflicts reported");
}

/// A writer whose files grow (prometheus_client doubles them: 64 KiB → 1 MiB) while the aggregator
/// scrapes every 20 ms: the remapped files are followed and the result equals Python's.
#[test]
fn growing_files_are_followed_while_scraped() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    let served = util::serve(&dir, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), served.addr);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                util::scrape(addr);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    let out = t.join("py-grow.txt");
    run_py(&py, GROW_PY, &[&dir, &out]);
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().expect("scraper");
    assert!(scrapes >= 10, "only {scrapes} scrapes while the files grew");
    let python = parse(&py, &std::fs::read_to_string(&out).expect("python exposition"), t);
    assert!(python.samples.len() > 4000);
    let ours = assert_same(&py, &served, &python, t, "after growth");
    assert_eq!(ours.bad_total(), 0.0, "bad files while growing");
}

// ---------------------------------------------------------------------------------------------
// 2. Older layouts

/// Expected samples of each well-formed old-layout file (names unique to the file, so whether the
/// file was read shows in the output), as written by compat_oldfiles.py.
fn old_file_expectations() -> Vec<(&'static str, Vec<(&'static str, f64)>)> {
    vec![
        (
            "counter_4194401.db",
            vec![
                ("compat_old15_total{route=\"/a\"}", 3.0),
                ("compat_old15_total{route=\"/\\u00fc\\\"\\n\"}", 4.5),
            ],
        ),
        (
            "histogram_4194401.db",
            vec![
                ("compat_old15_h_bucket{le=\"0.5\"}", 2.0),
                ("compat_old15_h_bucket{le=\"1.0\"}", 3.0),
                ("compat_old15_h_bucket{le=\"+Inf\"}", 4.0),
                ("compat_old15_h_count{}", 4.0),
                ("compat_old15_h_sum{}", 3.25),
            ],
        ),
        ("gauge_max_4194401.db", vec![("compat_old15_g{}", 9.5)]),
        ("counter_4194402.db", vec![("compat_old17_total{route=\"/a\"}", 11.0)]),
        ("summary_4194402.db", vec![("compat_old17_s_count{}", 3.0), ("compat_old17_s_sum{}", 1.5)]),
        ("gauge_all_4194402.db", vec![("compat_old17_all{pid=\"4194402\",x=\"y\"}", 2.5)]),
    ]
}

/// Garbage files of compat_oldfiles.py: each must be skipped whole, counted, logged, kept.
const GARBAGE: [&str; 5] = [
    "counter_4194404.db",
    "counter_4194405.db",
    "histogram_4194406.db",
    "summary_4194407.db",
    "gauge_max_4194408.db",
];

/// Checks the old-layout directory's exposition; returns the files that were rejected, and every
/// problem found (all of them, so that one does not hide another).
fn check_old_files(ours: &Expo, served: &util::Served, what: &str) -> (Vec<&'static str>, Vec<String>) {
    let log = std::fs::read_to_string(&served.log).expect("log");
    let mut p: Vec<String> = Vec::new();
    let mut expect = |key: &str, want: f64, why: &str| {
        let got = ours.get(key);
        if got != Some(want) {
            p.push(format!("{what}: {why}: {key} = {got:?}, expected {want:?}"));
        }
    };
    let mut rejected = Vec::new();
    let mut shared = 100.0; // the 0.26 file's value
    for (file, expected) in old_file_expectations() {
        if expected.iter().all(|(k, _)| ours.get(k).is_none()) {
            rejected.push(file);
            continue;
        }
        for (k, v) in &expected {
            expect(k, *v, &format!("{file} was read"));
        }
    }
    if !rejected.contains(&"counter_4194401.db") {
        shared += 7.0;
    }
    if !rejected.contains(&"counter_4194402.db") {
        shared += 20.0;
    }
    expect("compat_shared_total{}", shared, "sum over the old and the 0.26 counter files");
    expect("compat_new_total{route=\"/a\"}", 1.0, "the 0.26 file counter_4194403.db");
    // A 0.26-layout histogram file with entries in unusual orders (`_sum` after `+Inf`; `+Inf`
    // first): Python merges by key, so order does not matter (values checked against 0.26's
    // MultiProcessCollector on that file alone).
    for (k, v) in [
        ("compat_order_h_bucket{case=\"sum_last\",le=\"0.5\"}", 1.0),
        ("compat_order_h_bucket{case=\"sum_last\",le=\"1.0\"}", 3.0),
        ("compat_order_h_bucket{case=\"sum_last\",le=\"+Inf\"}", 6.0),
        ("compat_order_h_count{case=\"sum_last\"}", 6.0),
        ("compat_order_h_sum{case=\"sum_last\"}", 4.5),
        ("compat_order_h_bucket{case=\"inf_first\",le=\"0.5\"}", 3.0),
        ("compat_order_h_bucket{case=\"inf_first\",le=\"1.0\"}", 5.0),
        ("compat_order_h_bucket{case=\"inf_first\",le=\"+Inf\"}", 6.0),
        ("compat_order_h_count{case=\"inf_first\"}", 6.0),
        ("compat_order_h_sum{case=\"inf_first\"}", 2.0),
    ] {
        expect(k, v, "histogram_4194403.db, entries in another order (Python merges by key)");
    }
    // 3-element keys carry no help: Python's pre-0.16 collector said "Multiprocess metric".
    let mut family = |fam: &str, ty: &str, help: &str| match ours.families.get(fam) {
        Some((t, h)) if (t.as_str(), h.as_str()) != (ty, help) => {
            p.push(format!("{what}: family {fam}: ({t}, {h:?}), expected ({ty}, {help:?})"))
        }
        _ => {} // absent: the file was rejected, or its values are reported above
    };
    family("compat_old15", "counter", "Multiprocess metric");
    family("compat_old15_h", "histogram", "Multiprocess metric");
    family("compat_old15_g", "gauge", "Multiprocess metric");
    family("compat_old17", "counter", "Old help.");
    family("compat_old17_s", "summary", "Old summary.");
    // Rejected old files: said in the log, counted as `version`.
    for f in &rejected {
        if !log.contains(f) {
            p.push(format!("{what}: {f} neither read nor logged as rejected"));
        }
    }
    if ours.bad("version") < rejected.len() as f64 {
        p.push(format!(
            "{what}: {rejected:?} rejected, but shmetrics_bad_files{{reason=\"version\"}} = {}",
            ours.bad("version")
        ));
    }
    // Garbage: skipped as a whole (no sample of it, not even its well-formed first entries),
    // counted, logged.
    let leaked: Vec<_> = ours.samples.keys().filter(|k| k.starts_with("compat_garbage")).collect();
    if !leaked.is_empty() {
        p.push(format!("{what}: samples of garbage files served: {leaked:?}"));
    }
    for g in GARBAGE {
        if !log.contains(g) {
            p.push(format!("{what}: garbage file {g} not logged"));
        }
    }
    // Valid empty files are not bad: `used` = 8 (fresh), and `used` = 0 (all zeros: a writer
    // between its truncate() and its first write; prometheus_client's reader yields no entries).
    for f in ["counter_4194409.db", "counter_4194410.db"] {
        for l in log.lines().filter(|l| l.contains(f)) {
            p.push(format!("{what}: the valid empty file {f} was flagged: {l}"));
        }
    }
    let total = ours.bad_total();
    if total != (rejected.len() + GARBAGE.len()) as f64 {
        p.push(format!(
            "{what}: shmetrics_bad_files sum to {total}, expected {} (rejected old files {rejected:?} + \
             {} garbage files; the valid empty files are not bad): corrupt {} foreign {} truncated {} \
             version {}",
            rejected.len() + GARBAGE.len(),
            GARBAGE.len(),
            ours.bad("corrupt"),
            ours.bad("foreign"),
            ours.bad("truncated"),
            ours.bad("version")
        ));
    }
    (rejected, p)
}

#[test]
fn old_format_files_are_read_or_rejected() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    // The same files in two directories: one read as is, one compacted.
    let dir_c = t.join("mp-compact");
    std::fs::create_dir(&dir_c).expect("mkdir");
    let served = util::serve(&dir, &[]);
    let served_c = util::serve(&dir_c, &["--compact-python", "--upkeep-interval", "0.2"]);
    run_py(&py, OLDFILES_PY, &[&dir]);
    run_py(&py, OLDFILES_PY, &[&dir_c]);
    let snapshot = |d: &Path, names: &[&str]| -> Vec<Vec<u8>> {
        names.iter().map(|n| std::fs::read(d.join(n)).expect("read")).collect()
    };
    let garbage_bytes = snapshot(&dir, &GARBAGE);

    let ours = parse(&py, &util::scrape(served.addr), t);
    let (rejected, mut problems) = check_old_files(&ours, &served, "read");
    util::assert_openmetrics_parses(served.addr);
    util::assert_openmetrics_parses(served_c.addr);
    // Problems of the compacting directory that the plain one does not have already.
    let add = |what: &str, more: Vec<String>, problems: &mut Vec<String>| {
        for m in more {
            let tail = m.split_once(": ").map_or(m.as_str(), |(_, t)| t).to_string();
            if !problems.iter().any(|q| q.ends_with(&tail)) {
                problems.push(format!("{what}: {m}"));
            }
        }
    };
    // A second scrape reads the same (no state lost or doubled between scrapes).
    let again = parse(&py, &util::scrape(served.addr), t);
    assert_same_samples(&again.only(&["compat_"]), &ours.only(&["compat_"]), "second scrape vs first");
    assert_eq!(again.bad_total(), ours.bad_total());

    // Compaction: every id is dead, so every file it understands is folded and removed, with the
    // same output; the files it does not understand stay, byte for byte.
    let ours_c = parse(&py, &util::scrape(served_c.addr), t);
    let (rejected_c, more) = check_old_files(&ours_c, &served_c, "compacting, first scrape");
    add("--compact-python", more, &mut problems);
    assert_eq!(rejected_c, rejected);
    let accepted: Vec<&str> =
        old_file_expectations().into_iter().map(|(f, _)| f).filter(|f| !rejected.contains(f)).collect();
    let start = Instant::now();
    let left = loop {
        let left: Vec<&str> = accepted
            .iter()
            .chain(["counter_4194403.db", "histogram_4194403.db"].iter())
            .copied()
            // Gone under its name and under any name it was moved to for compaction.
            .filter(|f| util::ls(&dir_c).iter().any(|n| n.ends_with(*f)))
            .collect();
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !left.is_empty() {
        problems.push(format!("--compact-python: files of dead ids not compacted after 10 s: {left:?}"));
    }
    if !dir_c.join("archive.json").exists() {
        problems.push("--compact-python: no archive.json".into());
    }
    std::thread::sleep(Duration::from_millis(600)); // a few more upkeep passes
    let after = parse(&py, &util::scrape(served_c.addr), t);
    let (_, more) = check_old_files(&after, &served_c, "compacted");
    add("--compact-python", more, &mut problems);
    let (a, o) = (after.only(&["compat_"]), ours.only(&["compat_"]));
    for k in a.keys().chain(o.keys()) {
        let (x, y) = (a.get(k), o.get(k));
        let same = matches!((x, y), (Some(x), Some(y)) if same_value(k, *x, *y));
        if !same {
            problems.push(format!("--compact-python: {k} = {x:?} after compaction, {y:?} without"));
        }
    }
    for d in [&dir, &dir_c] {
        if snapshot(d, &GARBAGE) != garbage_bytes {
            problems.push(format!("a garbage file was modified or removed in {}", d.display()));
        }
        for f in &rejected {
            if !d.join(f).exists() {
                problems.push(format!("rejected {f} removed from {}", d.display()));
            }
        }
    }
    problems.dedup();
    assert!(
        problems.is_empty(),
        "{} problems (logs {} and {}):\n  {}",
        problems.len(),
        served.log.display(),
        served_c.log.display(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Foreign *.db files

#[test]
fn foreign_db_files_are_skipped() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    let dir_c = t.join("mp-compact");
    std::fs::create_dir(&dir_c).expect("mkdir");
    let served = util::serve(&dir, &[]);
    let served_c = util::serve(&dir_c, &["--compact-python", "--upkeep-interval", "0.2"]);
    // Our own workers in the same directory, alongside.
    let _wl = util::workload(&dir, &["--workers", "2", "--series", "2", "--histograms", "1", "--hold"]);
    run_py(&py, FOREIGN_PY, &[&dir]);
    run_py(&py, FOREIGN_PY, &[&dir_c]);
    let sqlite_bytes: Vec<Vec<u8>> =
        ["data.db", "counter_99.db"].iter().map(|n| std::fs::read(dir.join(n)).expect("read")).collect();

    std::thread::sleep(Duration::from_millis(700)); // several upkeep passes for the compactor
    for (d, served) in [(&dir, &served), (&dir_c, &served_c)] {
        let what = d.display().to_string();
        let ours = parse(&py, &util::scrape(served.addr), t); // util::scrape asserts 200
        util::assert_openmetrics_parses(served.addr);
        assert_eq!(ours.get("compat_ok_total{}"), Some(5.0), "{what}: compat_ok_total");
        assert_eq!(ours.families.get("compat_ok").map(|f| f.1.as_str()), Some("Still served."), "{what}");
        if d == &dir {
            // Our workload: K·(i+1)·T with K=1, T=3.
            assert_eq!(ours.get("wl_requests_total{route=\"/r0\"}"), Some(3.0), "{what}");
            assert_eq!(ours.get("wl_requests_total{route=\"/r1\"}"), Some(6.0), "{what}");
        }
        // SQLite data.db and counter_99.db are foreign. The empty counter_98.db is what a writer
        // leaves between its open() and its truncate() (or when it is killed there): an empty
        // file, not a bad one — otherwise a killed worker's file would be reported bad forever.
        // (prometheus_client's own collector raises on it.)
        let bad = ["corrupt", "foreign", "truncated", "version"].map(|r| (r, ours.bad(r)));
        assert_eq!(
            bad,
            [("corrupt", 0.0), ("foreign", 2.0), ("truncated", 0.0), ("version", 0.0)],
            "{what}: shmetrics_bad_files"
        );
        // The SQLite files are left alone, byte for byte, even by the compactor.
        let now: Vec<Vec<u8>> =
            ["data.db", "counter_99.db"].iter().map(|n| std::fs::read(d.join(n)).expect("read")).collect();
        assert_eq!(now, sqlite_bytes, "{what}: a SQLite file was modified");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. live* gauges of a killed worker

#[test]
fn live_gauges_of_dead_pids_disappear() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    let served = util::serve(&dir, &[]);
    let mut w = PyWorkers::start(&py, &dir, false);
    let python_live = parse(&py, &w.collect(&t.join("py-live.txt")), t);
    let before = assert_same(&py, &served, &python_live, t, "workers alive");
    let victim = w.workers[1];
    let liveall = format!("compat_g_liveall{{pid=\"{victim}\",slot=\"a\"}}");
    assert!(before.get(&liveall).is_some(), "no {liveall} before the kill");

    w.cmd("kill 2"); // SIGKILL, reaped by the master; nobody calls mark_process_dead
    let expected = parse(&py, &w.collect_as_dead(&t.join("py-dead.txt"), &t.join("copy"), &[victim]), t);
    let after = wait_same(&py, &served, &expected, t, Duration::from_secs(10), "one worker killed");
    assert!(after.get(&liveall).is_none());
    assert_ne!(after.get("compat_g_livesum{slot=\"a\"}"), before.get("compat_g_livesum{slot=\"a\"}"));
    // Its counters, histograms, summaries and non-live gauges stay.
    let kept = ["compat_requests", "compat_plain", "compat_bytes", "compat_latency", "compat_default"];
    let kept: Vec<&str> = kept.into_iter().chain(["compat_size", "compat_g_all{", "compat_g_max{"]).collect();
    assert_same_samples(&after.only(&kept), &before.only(&kept), "data of the killed worker changed");
    assert!(!files_of(&dir, victim).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. --compact-python

fn exited_and_compacted(py: &str, restart: bool) {
    let (tmp, dir) = setup();
    let t = tmp.path();
    let args = ["--compact-python", "--upkeep-interval", "0.2"];
    let mut served = util::serve(&dir, &args);
    let mut w = PyWorkers::start(py, &dir, false);
    let python_live = parse(py, &w.collect(&t.join("py-live.txt")), t);
    let before = assert_same(py, &served, &python_live, t, "workers alive (compacting aggregator)");
    // Workers are quiescent: their files now hold what they will hold once they exited.
    let workers = w.workers.clone();
    let expected = parse(py, &w.collect_as_dead(&t.join("py-dead.txt"), &t.join("copy"), &workers), t);

    w.cmd("exit");
    util::wait_for(Duration::from_secs(10), "dead workers' files compacted", || {
        workers.iter().all(|p| files_of(&dir, *p).is_empty()).then_some(())
    });
    assert!(dir.join("archive.json").exists(), "no archive.json after compaction");
    assert_eq!(files_of(&dir, w.master).len(), FILES_PER_PROCESS, "the live master's files were touched");
    let after = wait_same(py, &served, &expected, t, Duration::from_secs(5), "workers compacted");
    // Counters, histograms and summaries: the same as before the workers exited.
    let kept = [
        "compat_requests",
        "compat_plain",
        "compat_bytes",
        "compat_latency",
        "compat_default",
        "compat_size",
    ];
    assert_same_samples(
        &after.only(&kept),
        &before.only(&kept),
        "compaction changed counters/histograms/summaries",
    );
    // Folded once: more upkeep passes change nothing.
    std::thread::sleep(Duration::from_millis(600));
    assert_same(py, &served, &expected, t, "workers compacted, 3 upkeep passes later");

    if restart {
        // The aggregator restarts while the Python master is alive: the archive of the folded
        // workers must still count.
        drop(served);
        served = util::serve(&dir, &args);
        assert_same(py, &served, &expected, t, "aggregator restarted after compaction");
    }
    let _ = &served;
}

#[test]
fn compaction_folds_dead_pids() {
    let py = util::require_python();
    exited_and_compacted(&py, false);
}

#[test]
fn compaction_survives_an_aggregator_restart() {
    let py = util::require_python();
    exited_and_compacted(&py, true);
}

// ---------------------------------------------------------------------------------------------
// 6. Real pid reuse against the compactor

#[test]
fn compaction_never_loses_increments_under_pid_reuse() {
    let py = util::require_python();
    let (tmp, dir) = setup();
    let t = tmp.path();
    const ROUNDS: usize = 24;
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(&py)
        .arg(PIDREUSE_PY)
        .arg(util::shmetrics_bin())
        .arg(&dir)
        .arg(ROUNDS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare (util-linux): this test needs root for a new pid namespace");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let proc = util::Proc { child };
    let mut addr = None;
    let mut rounds = Vec::new();
    let mut unrelated: Vec<u64> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).expect("driver output");
        assert!(n > 0, "compat_pidreuse.py ended early (see {}.log)", dir.display());
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first().copied() {
            Some("ADDR") => addr = Some(f[1].parse::<std::net::SocketAddr>().expect("addr")),
            Some("ROUND") => {
                let v: Vec<u64> = f[1..].iter().map(|x| x.parse().expect("number")).collect();
                rounds.push(v);
            }
            Some("UNRELATED") => {
                unrelated = f[1..].iter().map(|x| x.parse().expect("number")).collect();
            }
            Some("DONE") => break,
            _ => panic!("unexpected driver output {line:?}"),
        }
    }
    let addr = addr.expect("ADDR line");
    let text = util::scrape(addr);
    let ours = parse(&py, &text, t);
    let _ = writeln!(stdin, "stop");
    drop(stdin);
    drop(proc);

    assert_eq!(rounds.len(), ROUNDS);
    let reused = rounds.iter().filter(|r| r[3] == 1).count();
    let found = rounds.iter().filter(|r| r[4] == 1).count();
    let renamed = rounds.iter().filter(|r| r[6] == 1).count();
    // Which paths the race took (timing decides): B continued A's file (`found`), B started a new
    // file after A's had been moved away, or B had A's file open while the aggregator renamed it
    // aside (`renamed`: the rename had to be undone).
    eprintln!(
        "pid reuse: {ROUNDS} rounds, B got A's pid in {reused}, continued A's file in {found}, \
         saw its open file renamed in {renamed}; [round, pid A, pid B, reused, found, B's count, \
         renamed]: {rounds:?}"
    );
    let mut wrong = Vec::new();
    for r in &rounds {
        let (i, count) = (r[0], r[5]);
        let expected = 10.0 + 5.0 * count as f64;
        let key = format!("compat_reuse_total{{round=\"{i}\"}}");
        let got = ours.get(&key);
        if got != Some(expected) {
            wrong.push(format!(
                "round {i} (pid A {} B {}, B found A's file: {}, B saw it renamed: {}): expected \
                 10 + 5·{count} = {expected}, served {got:?}",
                r[1], r[2], r[4], r[6]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "increments lost or counted twice under pid reuse:\n  {}\n(aggregator log {}.log)\n{text}",
        wrong.join("\n  "),
        dir.display()
    );
    // The scenario really happened: B got A's pid in (almost) every round.
    assert!(reused >= ROUNDS - 1, "pid reused in only {reused} of {ROUNDS} rounds: {rounds:?}");
    // Both main paths were taken: B continued A's file, and B started a new one because A's had
    // been moved away. (The undo path, `renamed`, needs a race of a few ms and is only reported.)
    assert!(found >= 1, "B never continued A's file, scenario not exercised: {rounds:?}");
    assert!(found < ROUNDS, "B always continued A's file, scenario not exercised: {rounds:?}");
    // The pid of dead writer U now belongs to a process that never used prometheus_client (it is
    // still running): U's liveall gauge is gone, its counter kept (folded).
    eprintln!("unrelated reuse [pid U, pid of the new process, reused]: {unrelated:?}");
    assert_eq!(unrelated.len(), 3);
    assert_eq!(unrelated[2], 1, "the new process did not get U's pid: {unrelated:?}");
    let live: Vec<&String> = ours.samples.keys().filter(|k| k.starts_with("compat_reuse_live")).collect();
    assert!(
        live.is_empty(),
        "the live gauge of dead writer U (pid {} reused by another process) is still served: {live:?}",
        unrelated[0]
    );
    assert_eq!(ours.get("compat_reuse_unrelated_total{}"), Some(3.0), "writer U's counter");
    // Every file of the writers is compacted (the padding processes are alive: theirs stay).
    let writer_pids: Vec<u64> = rounds.iter().flat_map(|r| [r[1], r[2]]).chain([unrelated[0]]).collect();
    let left: Vec<String> = db_files(&dir)
        .into_iter()
        .filter(|n| writer_pids.iter().any(|p| n.ends_with(&format!("_{p}.db"))))
        .collect();
    assert!(left.is_empty(), "files not compacted after every writer exited: {left:?}");
    assert!(dir.join("archive.json").exists());
    assert_eq!(ours.bad_total(), 0.0, "bad files during pid reuse");
}
