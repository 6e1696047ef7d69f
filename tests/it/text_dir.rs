//! `--text-dir` (one file per merged sample) and `--restore` (a fresh start continuing the
//! previous run's counters), against the real `shmetrics` binary and real workloads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{self, Served};

const T: Duration = Duration::from_secs(30);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn p(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn scrape(served: &Served) -> BTreeMap<String, f64> {
    util::samples(&util::scrape(served.addr))
}

/// The value text of each sample line of /metrics, by `name{labels}`.
fn value_texts(served: &Served) -> BTreeMap<String, String> {
    util::scrape(served.addr)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Entries of the text dir, without the temporaries a refresh in flight may have for an instant.
fn entries(dir: &Path) -> BTreeSet<String> {
    util::ls(dir).into_iter().filter(|n| !n.starts_with(".tmp-")).collect()
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

/// Waits until the file `name` in `dir` holds `want`.
fn wait_content(dir: &Path, name: &str, want: &str) {
    util::wait_for(T, &format!("{name} to hold {want:?}"), || {
        (read(dir, name).as_deref() == Some(want)).then_some(())
    });
}

/// The file name of a `wl_` sample key as /metrics writes it (the workload's label values are
/// `/r<i>`, `/h<j>`, pids and bucket bounds: only `/` and `+` need escaping).
fn file_of(key: &str) -> String {
    let (name, labels) = util::split_labels(key);
    let mut out = name.to_string();
    if let Some(labels) = labels {
        for pair in labels.split(',') {
            let (k, v) = pair.split_once("=\"").expect("label");
            let v = v.strip_suffix('"').expect("quoted value");
            out.push_str(&format!(",{k}={}", v.replace('/', "%2F").replace('+', "%2B")));
        }
    }
    out
}

fn stop(served: Served) {
    let mut served = served;
    served.proc.signal(Signal::SIGTERM);
    let status = served.proc.wait_timeout(T);
    assert!(status.success(), "aggregator exit: {status:?}");
}

fn wait_exit(w: &mut util::Workload) {
    let status = w.proc.wait_timeout(T);
    assert!(status.success(), "workload exit: {status:?}");
}

#[test]
fn text_dir_holds_one_file_per_sample_and_follows_the_series() {
    let tmp = tmp();
    let (dir, text) = (tmp.path().join("m"), tmp.path().join("text"));
    std::fs::create_dir(&text).expect("text dir");
    std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Not ours: a file whose name could be a series', a hidden file, a link, and a link under
    // the name of a series the workload has (wl_recent).
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("victim");
    std::fs::write(text.join("README"), "hello\n").expect("README");
    std::fs::write(text.join(".hidden"), "x").expect(".hidden");
    std::os::unix::fs::symlink(&victim, text.join("a-link")).expect("link");
    std::os::unix::fs::symlink(&victim, text.join("wl_recent")).expect("link");
    let foreign = ["README", ".hidden", "a-link", "wl_recent", ".shmetrics-text-dir.lock"];

    let served = util::serve(&dir, &["--text-dir", p(&text), "--upkeep-interval", "0.2"]);
    let mut held = util::workload(&dir, &["--workers", "2", "--series", "2", "--hold"]);
    let pids = held.pids.clone();

    // W=2, S=2, H=1: T = 3.
    let mut want: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, value) in [
        ("wl_requests_total,route=%2Fr0", "3\n"),
        ("wl_requests_total,route=%2Fr1", "6\n"),
        ("wl_bytes_total", "1.5\n"),
        ("wl_inflight,route=%2Fr0", "5\n"),
        ("wl_inflight,route=%2Fr1", "7\n"),
        ("wl_max,route=%2Fr0", "2\n"),
        ("wl_max,route=%2Fr1", "4\n"),
        ("wl_latency_seconds_bucket,route=%2Fh0,le=0.1", "2\n"),
        ("wl_latency_seconds_bucket,route=%2Fh0,le=0.5", "2\n"),
        ("wl_latency_seconds_bucket,route=%2Fh0,le=1.0", "2\n"),
        ("wl_latency_seconds_bucket,route=%2Fh0,le=%2BInf", "2\n"),
        ("wl_latency_seconds_count,route=%2Fh0", "2\n"),
    ] {
        want.insert(name, value);
    }
    for (name, value) in &want {
        wait_content(&text, name, value);
    }
    let metrics = value_texts(&served);
    // The sum is a float: exactly as /metrics writes it.
    let sum = &metrics["wl_latency_seconds_sum{route=\"/h0\"}"];
    wait_content(&text, "wl_latency_seconds_sum,route=%2Fh0", &format!("{sum}\n"));
    // wl_all has one series per pid (the workers', and the master's if it set one).
    let all: Vec<&String> = metrics.keys().filter(|k| k.starts_with("wl_all{")).collect();
    for (w, pid) in pids.iter().enumerate() {
        for r in 0..2 {
            let key = format!("wl_all{{route=\"/r{r}\",pid=\"{pid}\"}}");
            assert_eq!(metrics.get(&key).map(String::as_str), Some(format!("{}.0", w + 1).as_str()), "{key}");
        }
    }
    // Every wl_ sample of /metrics has its file, holding its value, and nothing else is there but
    // the aggregator's own samples and what is not ours.
    let wl: BTreeSet<String> = metrics.keys().filter(|k| k.starts_with("wl_")).map(|k| file_of(k)).collect();
    assert_eq!(wl.len(), want.len() + 1 + all.len() + 1, "{wl:?}"); // + the sum, wl_all, wl_recent
    util::wait_for(T, "a file for every wl_ sample (wl_recent: the link)", || {
        let got: BTreeSet<String> = entries(&text).into_iter().filter(|n| n.starts_with("wl_")).collect();
        (got == wl).then_some(())
    });
    for key in metrics.keys().filter(|k| k.starts_with("wl_") && !k.starts_with("wl_recent")) {
        let got = read(&text, &file_of(key)).expect("file");
        let v: f64 = got.trim_end().parse().expect("a number");
        assert_eq!(v, metrics[key].parse::<f64>().expect("value"), "{key}");
        assert!(got.ends_with('\n') && got.lines().count() == 1, "{got:?}");
    }
    for n in entries(&text) {
        assert!(
            n.starts_with("wl_") || n.starts_with("shmetrics_") || foreign.contains(&n.as_str()),
            "unexpected {n}"
        );
    }
    let mode = std::fs::metadata(text.join("wl_bytes_total")).expect("file").mode() & 0o777;
    assert_eq!(mode & 0o644, 0o644, "readable by sysadmins: {mode:o}");
    // The series whose name a link holds is not written, counted once.
    wait_content(&text, "shmetrics_text_dir_errors_total", "1\n");
    assert_eq!(scrape(&served)["shmetrics_text_dir_errors_total"], 1.0);

    // More increments: values change (W=1: T=1).
    let mut more = util::workload(&dir, &["--workers", "1", "--series", "2"]);
    wait_exit(&mut more);
    wait_content(&text, "wl_requests_total,route=%2Fr0", "4\n");
    wait_content(&text, "wl_requests_total,route=%2Fr1", "8\n");
    wait_content(&text, "wl_bytes_total", "2\n");
    wait_content(&text, "wl_latency_seconds_count,route=%2Fh0", "3\n");

    // The held workers go: their live gauges' series go, and their files with them.
    held.proc.signal(Signal::SIGTERM);
    wait_exit(&mut held);
    let left: BTreeSet<String> = [
        "wl_bytes_total",
        "wl_latency_seconds_bucket,route=%2Fh0,le=%2BInf",
        "wl_latency_seconds_bucket,route=%2Fh0,le=0.1",
        "wl_latency_seconds_bucket,route=%2Fh0,le=0.5",
        "wl_latency_seconds_bucket,route=%2Fh0,le=1.0",
        "wl_latency_seconds_count,route=%2Fh0",
        "wl_latency_seconds_sum,route=%2Fh0",
        "wl_max,route=%2Fr0",
        "wl_max,route=%2Fr1",
        "wl_recent",
        "wl_requests_total,route=%2Fr0",
        "wl_requests_total,route=%2Fr1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    util::wait_for(T, "the live gauges' files to go", || {
        let got: BTreeSet<String> = entries(&text).into_iter().filter(|n| n.starts_with("wl_")).collect();
        (got == left).then_some(())
    });
    assert!(!scrape(&served).keys().any(|k| k.starts_with("wl_inflight") || k.starts_with("wl_all")));
    assert_eq!(read(&text, "wl_requests_total,route=%2Fr1").as_deref(), Some("8\n"));

    // What is not ours is untouched.
    assert_eq!(read(&text, "README").as_deref(), Some("hello\n"));
    assert_eq!(read(&text, ".hidden").as_deref(), Some("x"));
    for link in ["a-link", "wl_recent"] {
        assert!(std::fs::symlink_metadata(text.join(link)).expect("link").file_type().is_symlink());
    }
    assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious\n");
    assert_eq!(scrape(&served)["shmetrics_text_dir_errors_total"], 1.0);

    // A restarted aggregator (a writer lives on) takes its files over: those of series still
    // there are rewritten, the others removed (here: one of a series that is gone).
    let mut live = util::workload(&dir, &["--workers", "1", "--series", "1", "--hold"]);
    wait_content(&text, "wl_requests_total,route=%2Fr0", "5\n");
    stop(served);
    std::fs::write(text.join("wl_gone_total"), "12\n").expect("leftover");
    let served = util::serve(&dir, &["--text-dir", p(&text)]);
    util::wait_for(T, "the leftover to go", || (!text.join("wl_gone_total").exists()).then_some(()));
    assert_eq!(read(&text, "wl_requests_total,route=%2Fr0").as_deref(), Some("5\n"));
    assert_eq!(read(&text, "wl_requests_total,route=%2Fr1").as_deref(), Some("8\n"));
    live.proc.signal(Signal::SIGTERM);
    wait_exit(&mut live);
    stop(served);

    // A fresh start (no live writer) resets the totals: the previous run's files go, what is not
    // ours stays.
    let served = util::serve(&dir, &["--text-dir", p(&text)]);
    util::wait_for(T, "the previous run's files to go", || {
        let got: Vec<String> = entries(&text).into_iter().filter(|n| n.starts_with("wl_")).collect();
        (got == ["wl_recent"]).then_some(())
    });
    assert_eq!(read(&text, "README").as_deref(), Some("hello\n"));
    assert!(std::fs::symlink_metadata(text.join("wl_recent")).expect("link").file_type().is_symlink());
    stop(served);
}

/// Runs `shmetrics <args>`, which must fail at start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let child = Command::new(util::shmetrics_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawn shmetrics");
    let mut p = util::Proc { child };
    let status = p.wait_timeout(T);
    let mut err = String::new();
    p.child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert_eq!(status.code(), Some(2), "{args:?} must fail at start: {err}");
    assert!(!err.contains("serving http://"), "{err}");
    err
}

fn serve_refused(dir: &Path, text: &Path) -> String {
    refused(&["serve", "--dir", p(dir), "--text-dir", p(text), "--listen", "127.0.0.1:0"])
}

#[test]
fn hostile_text_dirs_are_refused_at_start() {
    let tmp = tmp();
    let dir = tmp.path().join("m");
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).expect("real");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("link");
    let e = serve_refused(&dir, &link);
    assert!(e.contains("is a symbolic link") && e.contains("--text-dir"), "{e}");
    assert!(util::ls(&real).is_empty(), "nothing written through the link");

    let file = tmp.path().join("file");
    std::fs::write(&file, "x").expect("file");
    let e = serve_refused(&dir, &file);
    assert!(e.contains("is not a directory"), "{e}");

    let e = serve_refused(&dir, &dir);
    assert!(e.contains("is the multiproc directory itself"), "{e}");

    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    let e = serve_refused(&dir, &real);
    assert!(e.contains("writable by group or others") && e.contains("chmod go-w"), "{e}");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // One aggregator per text dir.
    let served = util::serve(&dir, &["--text-dir", p(&real)]);
    let e = serve_refused(&tmp.path().join("m2"), &real);
    assert!(e.contains("another shmetrics aggregator"), "{e}");
    stop(served);
}

fn wl_keys(s: &BTreeMap<String, f64>) -> Vec<&String> {
    s.keys().filter(|k| k.starts_with("wl_")).collect()
}

#[test]
fn restore_continues_counters_and_histograms_and_resets_gauges() {
    let tmp = tmp();
    let (dir, text): (PathBuf, PathBuf) = (tmp.path().join("m"), tmp.path().join("text"));
    let r0 = "wl_requests_total{route=\"/r0\"}";
    let r1 = "wl_requests_total{route=\"/r1\"}";
    let count = "wl_latency_seconds_count{route=\"/h0\"}";

    // Run 1: three workers that stay (T=6), two that come and go (T=3).
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let mut held = util::workload(&dir, &["--workers", "3", "--series", "2", "--hold"]);
    let mut gone = util::workload(&dir, &["--workers", "2", "--series", "2"]);
    wait_exit(&mut gone);
    util::wait_for(T, "run 1's totals", || (scrape(&served).get(r0) == Some(&9.0)).then_some(()));
    let s1 = scrape(&served);
    assert_eq!((s1[r1], s1["wl_bytes_total"], s1[count]), (18.0, 4.5, 5.0));
    assert_eq!(s1["wl_max{route=\"/r0\"}"], 3.0);

    // An aggregator restart (live writers) is a restart, --restore or not: gauges stay too.
    stop(served);
    let served = util::serve(&dir, &["--restore"]);
    let s = scrape(&served);
    assert_eq!((s[r0], s[r1], s[count]), (9.0, 18.0, 5.0));
    assert_eq!((s["wl_max{route=\"/r0\"}"], s["wl_inflight{route=\"/r0\"}"]), (3.0, 9.0));

    // The job stops: the aggregator, then every writer (the held workers SIGKILLed).
    stop(served);
    for pid in &held.pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL).expect("kill");
    }
    wait_exit(&mut held);
    assert!(util::worker_files(&dir) >= 4, "{:?}", util::ls(&dir));

    // Run 2, --restore (with a text dir: the archive is the source either way).
    let served = util::serve(&dir, &["--restore", "--text-dir", p(&text)]);
    let s = scrape(&served);
    assert_eq!((s[r0], s[r1], s["wl_bytes_total"], s[count]), (9.0, 18.0, 4.5, 5.0));
    let bucket = |le: &str| s[&format!("wl_latency_seconds_bucket{{route=\"/h0\",le=\"{le}\"}}")];
    assert_eq!((bucket("0.1"), bucket("0.5"), bucket("1.0"), bucket("+Inf")), (4.0, 5.0, 5.0, 5.0));
    let gauges: Vec<&String> = wl_keys(&s)
        .into_iter()
        .filter(|k| ["wl_max", "wl_inflight", "wl_all", "wl_recent"].iter().any(|g| k.starts_with(g)))
        .collect();
    assert!(gauges.is_empty(), "gauges start afresh: {gauges:?}");
    // The previous run's files are folded (exactly once) and gone; its own totals continue:
    // 2 + 1 and 3 + 1 dead files (workers and masters), the 3 killed ones crashed.
    assert_eq!(util::worker_files(&dir), 0, "{:?}", util::ls(&dir));
    assert_eq!((s["shmetrics_workers_dead_total"], s["shmetrics_workers_crashed_total"]), (7.0, 3.0));
    wait_content(&text, "wl_requests_total,route=%2Fr0", "9\n");

    // Increments continue from the totals (W=1: T=1).
    let mut more = util::workload(&dir, &["--workers", "1", "--series", "2"]);
    wait_exit(&mut more);
    util::wait_for(T, "run 2's increments", || (scrape(&served).get(r1) == Some(&20.0)).then_some(()));
    let s = scrape(&served);
    assert_eq!((s[r0], s["wl_bytes_total"], s[count]), (10.0, 5.0, 6.0));
    wait_content(&text, "wl_requests_total,route=%2Fr1", "20\n");
    stop(served);

    // Run 3 without --restore: a fresh start resets everything.
    let served = util::serve(&dir, &[]);
    let s = scrape(&served);
    assert!(wl_keys(&s).is_empty(), "totals start from zero: {:?}", wl_keys(&s));
    assert_eq!(s["shmetrics_workers_dead_total"], 0.0);
    let mut last = util::workload(&dir, &["--workers", "1", "--series", "1"]);
    wait_exit(&mut last);
    util::wait_for(T, "run 3's increments", || (scrape(&served).get(r0) == Some(&1.0)).then_some(()));
    stop(served);
}

/// prometheus_client writers that exit (files of dead Python processes), `n` increments each.
fn python_writers(py: &str, dir: &Path, n: u32) {
    let script = "import sys\n\
from prometheus_client import Counter, Gauge, Histogram\n\
c = Counter('py_jobs', 'Jobs.', ['kind'])\n\
h = Histogram('py_lat_seconds', 'Latency.', buckets=(0.1, 1.0))\n\
g = Gauge('py_temp', 'A gauge (mode all).')\n\
for _ in range(int(sys.argv[1])):\n    c.labels('a').inc()\n    h.observe(0.05)\n\
g.set(3)\n";
    let st = Command::new(py)
        .args(["-c", script, &n.to_string()])
        .env("PROMETHEUS_MULTIPROC_DIR", dir)
        .status()
        .expect("python");
    assert!(st.success(), "{st}");
}

#[test]
fn restore_keeps_python_counters_and_histograms_and_drops_python_gauges() {
    let py = util::require_python();
    let tmp = tmp();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let jobs = "py_jobs_total{kind=\"a\"}";

    // The previous run: a Python process wrote 4 jobs and a gauge, and is gone.
    python_writers(&py, &dir, 4);
    let served = util::serve(&dir, &["--restore"]);
    let s = scrape(&served);
    assert_eq!((s[jobs], s["py_lat_seconds_count"], s["py_lat_seconds_bucket{le=\"0.1\"}"]), (4.0, 4.0, 4.0));
    let gauges: Vec<&String> = s.keys().filter(|k| k.starts_with("py_temp")).collect();
    assert!(gauges.is_empty(), "gauges start afresh: {gauges:?}");

    // Another Python process adds 2: the totals continue.
    python_writers(&py, &dir, 2);
    util::wait_for(T, "6 jobs", || (scrape(&served).get(jobs) == Some(&6.0)).then_some(()));
    assert_eq!(scrape(&served)["py_lat_seconds_count"], 6.0);
    stop(served);

    // Again with --restore: 6 continue; without it, a fresh start is empty.
    let served = util::serve(&dir, &["--restore"]);
    assert_eq!(scrape(&served)[jobs], 6.0);
    stop(served);
    let served = util::serve(&dir, &[]);
    let s = scrape(&served);
    assert!(!s.keys().any(|k| k.starts_with("py_")), "{s:?}");
    stop(served);
}

#[test]
fn run_restore_without_dir_is_an_error() {
    let e = refused(&["run", "--restore", "--listen", "127.0.0.1:0", "--", "true"]);
    assert!(e.contains("--restore needs --dir"), "{e}");
}

/// Fills the file system of `path` with a new file until `ENOSPC`.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create_new(path).expect("filler");
    let chunk = vec![0xa5u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
}

#[test]
fn a_full_disk_keeps_the_old_values_counts_and_recovers() {
    let Some(fs) = util::Tmpfs::mount("a_full_disk_keeps_the_old_values_counts_and_recovers", "size=256k")
    else {
        return;
    };
    let tmp = tmp();
    let (dir, text) = (tmp.path().join("m"), fs.mnt.join("text"));
    let served = util::serve(&dir, &["--text-dir", p(&text)]);
    wait_content(&text, "shmetrics_text_dir_errors_total", "0\n");
    let before = read(&text, "shmetrics_merges_total").expect("merges file");
    fill(&fs.mnt.join("filler"));
    // Every refresh has something to write (the merges count grows): every write fails.
    let mut w = util::workload(&dir, &["--workers", "1", "--series", "1"]);
    wait_exit(&mut w);
    util::wait_for(T, "write errors to be counted", || {
        (scrape(&served)["shmetrics_text_dir_errors_total"] >= 3.0).then_some(())
    });
    // The old values stay, whole; the new series has no file yet.
    assert_eq!(read(&text, "shmetrics_text_dir_errors_total").as_deref(), Some("0\n"));
    assert_eq!(read(&text, "shmetrics_merges_total"), Some(before));
    assert!(read(&text, "wl_requests_total,route=%2Fr0").is_none());
    // Logged once (at most once a minute), not at every failure.
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert_eq!(log.lines().filter(|l| l.contains("text dir: cannot write")).count(), 1, "{log}");
    // Room again: everything is written at the next refresh.
    std::fs::remove_file(fs.mnt.join("filler")).expect("free");
    wait_content(&text, "wl_requests_total,route=%2Fr0", "1\n");
    util::wait_for(T, "the errors count in its file", || {
        let n: f64 = read(&text, "shmetrics_text_dir_errors_total")?.trim_end().parse().ok()?;
        (n >= 3.0).then_some(())
    });
    stop(served);
}
