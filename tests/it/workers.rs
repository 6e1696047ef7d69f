//! Real worker processes: exact merged values of forked workers, fork after registration, SIGKILL
//! under load, worker churn, liveness by lock (not by pid) and concurrent scrapes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::run_cmd::spawn_run;
use crate::util::{self, Proc, Workload};

const LONG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Parsing the exposition into (name, label map) → value.

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = util::split_value(line);
        let (name, body) = util::split_labels(head);
        let labels = body.map(util::parse_labels).unwrap_or_default();
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

/// A canonical key: name and labels sorted by name, `le` normalised through f64.
fn key(name: &str, labels: &BTreeMap<String, String>) -> String {
    let mut k = format!("{name}{{");
    for (n, v) in labels {
        if n == "le" {
            let f: f64 = if v == "+Inf" { f64::INFINITY } else { v.parse().expect("le") };
            k.push_str(&format!("le={f:?},"));
        } else {
            k.push_str(&format!("{n}={v:?},"));
        }
    }
    k.push('}');
    k
}

fn k(name: &str, labels: &[(&str, &str)]) -> String {
    let m: BTreeMap<String, String> =
        labels.iter().map(|(a, b)| ((*a).to_string(), (*b).to_string())).collect();
    key(name, &m)
}

/// The value of the sample with exactly this name and label set.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want = k(name, labels);
    samples.iter().find(|s| key(&s.name, &s.labels) == want).map(|s| s.value)
}

/// A label-less sample that must be there.
fn one(samples: &[Sample], name: &str) -> f64 {
    value(samples, name, &[]).unwrap_or_else(|| panic!("no sample {name}"))
}

/// The sum of every sample named `name`.
fn sum(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    parse(&util::scrape(addr))
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A `workload` that is stopped properly even when the test fails: SIGTERM to the master (which
/// forwards it to the `--hold` workers), then SIGKILL to everyone. `util::Workload` alone only
/// kills the master, which would orphan held workers.
struct Held(Workload);

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(None) = self.0.proc.child.try_wait() {
            let _ = kill(Pid::from_raw(self.0.proc.pid()), Signal::SIGTERM);
            for _ in 0..150 {
                if !matches!(self.0.proc.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Still unreaped by their parent, so these pids are still the workers.
            for pid in &self.0.pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
}

/// A `prefork_server` started directly (with `SHMETRICS_DIR`), in its own process group.
struct Prefork {
    proc: Proc,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Prefork {
    /// Starts it with `--listen 127.0.0.1:0 <args>`, stderr into `log`, and waits for its
    /// "listening on ADDR with N workers" line.
    fn spawn(dir: &Path, args: &[&str], log: &Path) -> Prefork {
        let mut child = Command::new(util::example_bin("prefork_server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("SHMETRICS_DIR", dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(log).expect("log file"))
            .spawn()
            .expect("spawn prefork_server");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let proc = Proc { child };
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listening line");
        let addr =
            listening_addr(&line).unwrap_or_else(|| panic!("unexpected prefork_server output {line:?}"));
        Prefork { proc, addr, _stdout: stdout }
    }

    /// SIGTERM (the server stops its workers and exits 0) and wait.
    fn stop(&mut self) -> ExitStatus {
        self.proc.signal(Signal::SIGTERM);
        self.proc.wait_timeout(Duration::from_secs(15))
    }
}

impl Drop for Prefork {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.child.try_wait() {
            // The master leads the group; its workers are in it too.
            let _ = kill(Pid::from_raw(-self.proc.pid()), Signal::SIGKILL);
        }
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("listening on ")?.split(' ').next()?.parse().ok()
}

/// A GET that reports failures instead of panicking (workers get killed under the client).
/// Returns the status and body; a response cut short is an error.
fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, what.to_string());
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head not utf-8"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status"))?;
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| bad("content-length"))?;
    let body = &raw[end + 4..];
    if body.len() != len {
        return Err(bad("short body"));
    }
    Ok((status, String::from_utf8(body.to_vec()).map_err(|_| bad("body not utf-8"))?))
}

/// A pid that names no process right now: a child we started and reaped.
fn vanished_pid() -> u64 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait true");
    assert_eq!(kill(Pid::from_raw(pid as i32), None), Err(Errno::ESRCH));
    u64::from(pid)
}

const HEADER_PID: u64 = shmetrics::layout::header::PID;

fn header_pid(path: &Path) -> u64 {
    let mut b = [0u8; 8];
    File::open(path).expect("open").read_exact_at(&mut b, HEADER_PID).expect("read pid");
    u64::from_le_bytes(b)
}

fn set_header_pid(path: &Path, pid: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open rw");
    f.write_all_at(&pid.to_le_bytes(), HEADER_PID).expect("write pid");
}

/// Whether a live process holds the writer lock of a file (a test-side version of the
/// aggregator's liveness check). A file removed meanwhile counts as not locked.
fn is_locked(path: &Path) -> bool {
    let Ok(f) = File::open(path) else { return false };
    match f.try_lock() {
        Ok(()) => {
            f.unlock().expect("unlock");
            false
        }
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(e)) => panic!("flock {}: {e}", path.display()),
    }
}

/// Renames a worker file `w-<pid>-<id>.shm` to `w-<new pid>-<id>.shm` in the same directory.
fn rename_to_pid(path: &Path, pid: u64) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).expect("name");
    let id = name.rsplit('-').next().expect("id");
    let to = path.with_file_name(format!("w-{pid}-{id}"));
    std::fs::rename(path, &to).expect("rename");
    to
}

/// Worker files of `dir` by the pid in their name.
fn files_by_pid(dir: &Path) -> BTreeMap<u64, PathBuf> {
    util::ls(dir)
        .into_iter()
        .filter(|n| n.starts_with("w-") && n.ends_with(".shm"))
        .map(|n| {
            let pid = n.split('-').nth(1).and_then(|p| p.parse().ok()).expect("pid in file name");
            (pid, dir.join(n))
        })
        .collect()
}

fn str_of(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Expected values of the workload (see the module documentation of examples/workload.rs).

struct Params {
    w: u64,
    s: u64,
    h: u64,
    k: u64,
    m: u64,
}

impl Params {
    fn args(&self) -> Vec<String> {
        let mut a = vec![];
        for (n, v) in
            [("--workers", self.w), ("--series", self.s), ("--histograms", self.h), ("--incs", self.k)]
        {
            a.push(n.to_string());
            a.push(v.to_string());
        }
        a.extend(["--master-incs".to_string(), self.m.to_string(), "--hold".to_string()]);
        a
    }
}

/// Expected `wl_*` samples by canonical key. `live`: the workers are alive. `pids` are the label
/// values of worker `w`'s pid (index w). The `_sum` samples are compared with a tolerance.
fn expected(p: &Params, pids: &[String], live: bool) -> BTreeMap<String, f64> {
    let t = p.w * (p.w + 1) / 2;
    let mut e = BTreeMap::new();
    for i in 0..p.s {
        let route = format!("/r{i}");
        let r = route.as_str();
        e.insert(k("wl_requests_total", &[("route", r)]), (p.m + p.k * (i + 1) * t) as f64);
        e.insert(k("wl_max", &[("route", r)]), (p.w * (i + 1)) as f64);
        if live {
            e.insert(k("wl_inflight", &[("route", r)]), (p.w * (i + 1) + t) as f64);
            for (w, pid) in pids.iter().enumerate() {
                e.insert(k("wl_all", &[("route", r), ("pid", pid)]), (w + 1) as f64);
            }
        }
    }
    if live {
        e.insert(k("wl_recent", &[]), p.w as f64);
    }
    e.insert(k("wl_bytes_total", &[]), (p.k * t) as f64 / 2.0);
    for j in 0..p.h {
        let route = format!("/h{j}");
        let r = route.as_str();
        let kw = |n: u64| (p.k * p.w.min(n)) as f64;
        e.insert(k("wl_latency_seconds_bucket", &[("route", r), ("le", "0.1")]), kw(2));
        e.insert(k("wl_latency_seconds_bucket", &[("route", r), ("le", "0.5")]), kw(10));
        e.insert(k("wl_latency_seconds_bucket", &[("route", r), ("le", "1")]), kw(20));
        e.insert(k("wl_latency_seconds_bucket", &[("route", r), ("le", "+Inf")]), (p.k * p.w) as f64);
        e.insert(k("wl_latency_seconds_count", &[("route", r)]), (p.k * p.w) as f64);
        e.insert(k("wl_latency_seconds_sum", &[("route", r)]), 0.05 * (p.k * t) as f64);
    }
    e
}

/// Checks every `wl_*` sample against `expected`: same keys, same values (`_sum` within 1e-9
/// relative). The master's own `wl_all` series (pid `master`, value 0) may or may not be there.
fn check_workload(samples: &[Sample], want: &BTreeMap<String, f64>, master: &str) {
    let mut got = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name.starts_with("wl_")) {
        if s.name == "wl_all" && s.labels.get("pid").map(String::as_str) == Some(master) {
            assert_eq!(s.value, 0.0, "the master never sets wl_all: {s:?}");
            continue;
        }
        assert!(got.insert(key(&s.name, &s.labels), s.value).is_none(), "duplicate sample {s:?}");
    }
    let got_keys: BTreeSet<&String> = got.keys().collect();
    let want_keys: BTreeSet<&String> = want.keys().collect();
    assert_eq!(got_keys, want_keys, "the set of wl_* samples");
    for (key, w) in want {
        let g = got[key];
        if key.starts_with("wl_latency_seconds_sum") {
            assert!((g - w).abs() <= 1e-9 * w.abs(), "{key}: got {g}, want ≈ {w}");
        } else {
            assert_eq!(g, *w, "{key}");
        }
    }
}

fn pid_labels(pids: &[i32]) -> Vec<String> {
    pids.iter().map(i32::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// 1, 2: exact values with forked workers.

#[test]
fn forked_workers_merge_exactly_and_fold_on_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let p = Params { w: 4, s: 5, h: 2, k: 3, m: 7 };
    let args = p.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut wl = Held(util::workload(&dir, &args));
    assert_eq!(wl.0.pids.len(), 4);
    let master = wl.0.proc.pid().to_string();
    let pids = pid_labels(&wl.0.pids);

    let s = scrape(served.addr);
    check_workload(&s, &expected(&p, &pids, true), &master);
    assert_eq!(one(&s, "shmetrics_workers_live"), 4.0, "4 workers; the master is not one");
    util::assert_openmetrics_parses(served.addr);
    assert_eq!(one(&s, "shmetrics_files"), 5.0);
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 0.0);

    // Clean exit: the master forwards SIGTERM to the workers and exits 0.
    wl.0.proc.signal(Signal::SIGTERM);
    let st = wl.0.proc.wait_timeout(LONG);
    assert_eq!(st.code(), Some(0), "workload exit");
    // Upkeep (every 0.2 s) folds the dead files without any scrape.
    util::wait_for(LONG, "dead files folded by upkeep", || (util::worker_files(&dir) == 0).then_some(()));

    let s = scrape(served.addr);
    // Totals unchanged, live gauges gone, wl_max (mode Max, not live) kept.
    check_workload(&s, &expected(&p, &pids, false), &master);
    for fam in ["wl_inflight", "wl_all", "wl_recent"] {
        assert!(!s.iter().any(|x| x.name == fam), "live gauge {fam} still exposed");
    }
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 5.0);
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), 0.0);
    assert_eq!(one(&s, "shmetrics_workers_live"), 0.0);
    util::assert_openmetrics_parses(served.addr);
    // And stable on the next scrape.
    check_workload(&scrape(served.addr), &expected(&p, &pids, false), &master);
}

#[test]
fn fork_after_registration_counts_the_master_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let mut wl =
        Held(util::workload(&dir, &["--workers", "2", "--series", "1", "--master-incs", "100", "--hold"]));
    // The master's 100 counted once; each child starts from zero and adds K·(i+1)·(w+1): 1 + 2.
    let s = scrape(served.addr);
    assert_eq!(value(&s, "wl_requests_total", &[("route", "/r0")]), Some(100.0 + 3.0));
    wl.0.proc.signal(Signal::SIGTERM);
    assert_eq!(wl.0.proc.wait_timeout(LONG).code(), Some(0));
    util::wait_for(LONG, "dead files folded", || (util::worker_files(&dir) == 0).then_some(()));
    let s = scrape(served.addr);
    assert_eq!(value(&s, "wl_requests_total", &[("route", "/r0")]), Some(100.0 + 3.0));
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 3.0);
}

// ---------------------------------------------------------------------------------------------
// 3: SIGKILL under load.

#[derive(Default)]
struct Load {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    other: AtomicU64,
    /// Worker pids seen in `hello from <pid>` answers.
    pids: Mutex<BTreeSet<i32>>,
}

/// Client threads sending `GET <path>` until `stop`, counting outcomes; a 200 must have a body
/// starting with `body`. Each pauses 1 ms between requests: the load stays continuous without
/// filling the machine with tens of thousands of TIME_WAIT sockets.
fn clients(
    n: usize,
    addr: SocketAddr,
    path: &'static str,
    body: &'static str,
    load: &Arc<Load>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (load, stop) = (Arc::clone(load), Arc::clone(stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    load.sent.fetch_add(1, Ordering::Relaxed);
                    match try_get(addr, path) {
                        Ok((200, b)) if b.starts_with(body) => {
                            if let Some(pid) =
                                b.strip_prefix("hello from ").and_then(|p| p.trim().parse().ok())
                            {
                                load.pids.lock().expect("pids").insert(pid);
                            }
                            load.ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(_) => load.other.fetch_add(1, Ordering::Relaxed),
                        Err(_) => load.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect()
}

/// Scraper threads checking, for their own sequence of scrapes, that the sum of
/// `http_requests_total` never decreases, and in every scrape that each histogram's `_count`
/// equals its `+Inf` bucket and its buckets are cumulative. Return the number of scrapes.
fn scrapers(n: usize, addr: SocketAddr, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..n)
        .map(|_| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut prev = 0.0;
                let mut prev_crashed = 0.0;
                let mut scrapes = 0;
                while !stop.load(Ordering::Relaxed) {
                    let s = scrape(addr);
                    let total = sum(&s, "http_requests_total");
                    assert!(total >= prev, "sum(http_requests_total) went from {prev} to {total}");
                    prev = total;
                    let crashed = one(&s, "shmetrics_workers_crashed_total");
                    assert!(crashed >= prev_crashed, "crashed workers went from {prev_crashed} to {crashed}");
                    prev_crashed = crashed;
                    check_histograms(&s, "http_request_duration_seconds");
                    scrapes += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                scrapes
            })
        })
        .collect()
}

fn check_histograms(s: &[Sample], name: &str) {
    let bucket = format!("{name}_bucket");
    let count = format!("{name}_count");
    let mut seen = 0;
    for c in s.iter().filter(|x| x.name == count) {
        seen += 1;
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter(|b| b.name == bucket && b.labels.iter().filter(|(k, _)| *k != "le").eq(c.labels.iter()))
            .map(|b| {
                let le = &b.labels["le"];
                (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le") }, b.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY), "+Inf bucket of {c:?}");
        assert_eq!(buckets.last().map(|b| b.1), Some(c.value), "_count == +Inf bucket for {:?}", c.labels);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative buckets {buckets:?}");
    }
    assert!(seen > 0, "no {count} sample");
}

#[test]
fn sigkill_workers_under_load_totals_never_decrease() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let server = util::example_bin("prefork_server");
    let mut run = spawn_run(
        &[
            "run",
            "--dir",
            str_of(&dir),
            "--upkeep-interval",
            "0.2",
            "--",
            str_of(&server),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "4",
        ],
        &[],
    );
    let app = run.stdout_line(LONG, "listening line", listening_addr);
    let master = run.child_pid;

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    // Slow requests on the side keep workers busy, so some kills land in the middle of a request.
    let slow = Arc::new(Load::default());
    let mut client_threads = clients(2, app, "/", "hello from ", &load, &stop);
    client_threads.extend(clients(1, app, "/slow?ms=20", "slept 20 ms", &slow, &stop));
    let scraper_threads = scrapers(1, run.addr, &stop);

    // The killer: every 200 ms, SIGKILL a random worker among those that answered and were not
    // killed yet (workers only die when we kill them, so those are alive), 10 times. The /slow
    // client keeps about one worker in four busy, so some kills land in the middle of a request.
    let mut kills = 0u64;
    let mut killed = BTreeSet::new();
    let mut rng = u64::from(std::process::id()) | 1;
    while kills < 10 {
        std::thread::sleep(Duration::from_millis(200));
        let candidates: Vec<i32> =
            load.pids.lock().expect("pids").iter().copied().filter(|p| !killed.contains(p)).collect();
        if candidates.is_empty() {
            continue;
        }
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pid = candidates[(rng % candidates.len() as u64) as usize];
        assert_ne!(pid, master, "answers come from workers");
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL a live worker");
        killed.insert(pid);
        kills += 1;
    }
    // Let the respawned workers serve a little before stopping.
    let before = load.ok.load(Ordering::Relaxed);
    util::wait_for(LONG, "requests after the last kill", || {
        (load.ok.load(Ordering::Relaxed) >= before + 30).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for t in client_threads {
        t.join().expect("client thread");
    }
    let scrapes: u64 = scraper_threads.into_iter().map(|t| t.join().expect("scraper thread")).sum();

    // Settled: nothing in flight, every killed worker folded.
    let s = util::wait_for(LONG, "settled", || {
        let s = scrape(run.addr);
        (one(&s, "http_requests_in_flight") == 0.0
            && one(&s, "shmetrics_workers_crashed_total") >= kills as f64)
            .then_some(s)
    });
    let ok = load.ok.load(Ordering::Relaxed);
    let sent = load.sent.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let total = value(&s, "http_requests_total", &[("method", "GET"), ("path", "/"), ("code", "200")])
        .expect("GET / 200 series") as u64;
    let slow_ok = slow.ok.load(Ordering::Relaxed);
    let slow_failed = slow.failed.load(Ordering::Relaxed);
    let slow_total =
        value(&s, "http_requests_total", &[("method", "GET"), ("path", "/slow"), ("code", "200")])
            .unwrap_or(0.0) as u64;
    eprintln!(
        "GET /: sent {sent}, ok {ok}, failed {failed}, counted {total}; GET /slow: ok {slow_ok}, failed \
         {slow_failed}, counted {slow_total}; kills {kills}, scrapes {scrapes}"
    );
    assert_eq!(
        load.other.load(Ordering::Relaxed) + slow.other.load(Ordering::Relaxed),
        0,
        "only 200 responses"
    );
    assert_eq!(sent, ok + failed);
    // Every failure is a connection of a killed worker (at most one each: a worker serves one
    // connection at a time).
    assert!(failed + slow_failed <= kills, "{failed} + {slow_failed} failed requests for {kills} kills");
    // prefork_server counts a request *after* writing its response (handle(): respond(), then
    // metrics.record()), and respond() returns only once the client has read the response and
    // closed (or after 500 ms). So a counted request was always answered: total <= ok. A SIGKILL
    // landing between respond() and record() loses one count for a response the client got: at
    // most one per kill. Hence ok - kills <= total <= ok (not ok <= total <= sent).
    assert!(total <= ok, "counted {total} > {ok} responses received");
    assert!(slow_total <= slow_ok, "counted {slow_total} > {slow_ok} slow responses received");
    assert!(
        (total + slow_total) + kills >= ok + slow_ok,
        "counted {total} + {slow_total} lost more than one request per kill ({kills}) of {ok} + {slow_ok}"
    );
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), kills as f64);
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), kills as f64);
    assert!(scrapes >= 5, "only {scrapes} scrapes");

    run.signal(Signal::SIGTERM);
    assert_eq!(run.wait(Duration::from_secs(15)).code(), Some(0), "stderr:\n{}", run.stderr_text());
}

// ---------------------------------------------------------------------------------------------
// 4: worker churn keeps the directory bounded.

#[test]
fn two_hundred_worker_restarts_keep_the_directory_bounded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let mut server =
        Prefork::spawn(&dir, &["--workers", "2", "--max-requests", "1"], &tmp.path().join("prefork.log"));
    let counted =
        |s: &[Sample]| value(s, "http_requests_total", &[("method", "GET"), ("path", "/"), ("code", "200")]);

    let mut prev = 0.0;
    let mut series_at_20 = None;
    for i in 1..=200u64 {
        let (status, body) = try_get(server.addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status, 200, "request {i}: {body}");
        if i % 5 == 0 {
            // A worker counts its request after the client has read the response, so the count
            // is i or i - 1 here.
            let s = scrape(served.addr);
            let c = counted(&s).expect("GET / 200 series");
            assert!(
                c >= prev && c <= i as f64 && c >= (i - 1) as f64,
                "after {i} requests: counted {c}, before {prev}"
            );
            prev = c;
        }
        if i == 20 {
            let s = util::wait_for(LONG, "20 restarts folded", || {
                let s = scrape(served.addr);
                (one(&s, "shmetrics_workers_dead_total") >= 20.0).then_some(s)
            });
            series_at_20 = Some(one(&s, "shmetrics_series"));
        }
    }
    // Upkeep alone (no scrape) brings the directory back to 2 workers + the master, every file
    // held by a live writer.
    util::wait_for(LONG, "directory back to 3 live worker files", || {
        let files = files_by_pid(&dir);
        (files.len() == 3 && files.values().all(|p| is_locked(p))).then_some(())
    });
    assert_eq!(util::worker_files(&dir), 3, "{:?}", util::ls(&dir));
    let s = util::wait_for(LONG, "200 restarts folded", || {
        let s = scrape(served.addr);
        (one(&s, "shmetrics_workers_dead_total") >= 200.0 && counted(&s) == Some(200.0)).then_some(s)
    });
    assert_eq!(counted(&s), Some(200.0));
    // Each worker exits cleanly after its one request: exactly 200 dead, none crashed.
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 200.0);
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), 0.0);
    assert_eq!(Some(one(&s, "shmetrics_series")), series_at_20, "series count grew with churn");
    assert!(util::worker_files(&dir) <= 6, "{:?}", util::ls(&dir));
    assert_eq!(one(&s, "shmetrics_workers_live"), 2.0, "2 workers; the master is not one");
    let count = value(&s, "http_request_duration_seconds_count", &[("method", "GET"), ("path", "/")]);
    assert_eq!(count, Some(200.0));

    assert_eq!(server.stop().code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 5: liveness is the lock, not the pid.

#[test]
fn live_file_with_a_vanished_pid_is_not_folded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut wl = Held(util::workload(&dir, &["--workers", "2", "--series", "1", "--hold"]));
    let master = wl.0.proc.pid() as u64;
    let files = files_by_pid(&dir);
    let mut expected_pids: BTreeSet<u64> = wl.0.pids.iter().map(|p| *p as u64).collect();
    expected_pids.insert(master);
    assert_eq!(files.keys().copied().collect::<BTreeSet<u64>>(), expected_pids);

    // Every file now names a process that does not exist (header pid and, consistently, file
    // name — the reader refuses a file whose name does not match its header), as a writer in
    // another pid namespace would; their writers still hold the locks.
    let mut fake = BTreeMap::new();
    for (pid, path) in &files {
        assert_eq!(header_pid(path), *pid);
        let f = vanished_pid();
        set_header_pid(path, f);
        rename_to_pid(path, f);
        fake.insert(*pid, f.to_string());
    }
    // Started now, the aggregator sees live writers (restart rule: nothing removed) and reads the
    // rewritten pids.
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let p = Params { w: 2, s: 1, h: 1, k: 1, m: 0 };
    let worker_labels: Vec<String> = wl.0.pids.iter().map(|p| fake[&(*p as u64)].clone()).collect();
    let fake_pids: BTreeSet<u64> = fake.values().map(|p| p.parse().expect("pid")).collect();
    // Each scrape tests every writer's lock; in between, upkeep passes (every 0.2 s) test them too.
    // A non-event cannot be polled for, so this watches for half a second.
    for _ in 0..5 {
        let s = scrape(served.addr);
        check_workload(&s, &expected(&p, &worker_labels, true), &fake[&master]);
        assert_eq!(one(&s, "shmetrics_workers_live"), 3.0);
        assert_eq!(one(&s, "shmetrics_workers_dead_total"), 0.0);
        assert_eq!(files_by_pid(&dir).keys().copied().collect::<BTreeSet<u64>>(), fake_pids);
        std::thread::sleep(Duration::from_millis(100));
    }

    wl.0.proc.signal(Signal::SIGTERM);
    assert_eq!(wl.0.proc.wait_timeout(LONG).code(), Some(0));
    util::wait_for(LONG, "files folded after exit", || (util::worker_files(&dir) == 0).then_some(()));
    let s = scrape(served.addr);
    check_workload(&s, &expected(&p, &worker_labels, false), &fake[&master]);
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 3.0);
}

#[test]
fn dead_file_naming_a_live_pid_is_folded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let staging = tmp.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");

    // Dead files: a workload run (no --hold) that has exited. W=1, S=1, M=1000: /r0 = 1001.
    let mut done = util::workload(&staging, &["--workers", "1", "--series", "1", "--master-incs", "1000"]);
    assert_eq!(done.proc.wait_timeout(LONG).code(), Some(0));
    let dead = files_by_pid(&staging);
    assert_eq!(dead.len(), 2);

    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    // A live workload alongside: W=1, S=1: /r0 = 1.
    let mut wl = Held(util::workload(&dir, &["--workers", "1", "--series", "1", "--hold"]));
    let s = scrape(served.addr);
    assert_eq!(value(&s, "wl_requests_total", &[("route", "/r0")]), Some(1.0));

    // Give each dead file the pid of a live process (ours), in its header and name, and move it in.
    let me = u64::from(std::process::id());
    for path in dead.values() {
        set_header_pid(path, me);
        let renamed = rename_to_pid(path, me);
        std::fs::rename(&renamed, dir.join(renamed.file_name().expect("name"))).expect("move");
    }
    let s = util::wait_for(LONG, "dead files folded", || {
        let s = scrape(served.addr);
        (one(&s, "shmetrics_workers_dead_total") >= 2.0).then_some(s)
    });
    assert_eq!(value(&s, "wl_requests_total", &[("route", "/r0")]), Some(1001.0 + 1.0));
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 2.0);
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), 0.0);
    assert_eq!(one(&s, "shmetrics_workers_live"), 1.0, "1 worker and its master");
    // The moved files are gone; only the live workload's 2 remain.
    let left: BTreeSet<u64> = files_by_pid(&dir).keys().copied().collect();
    let live: BTreeSet<u64> = [wl.0.proc.pid() as u64, wl.0.pids[0] as u64].into();
    assert_eq!(left, live);
    // Live-only gauges show only the live workload's processes, never the pid of the dead files.
    for x in s.iter().filter(|x| x.name == "wl_all") {
        assert_ne!(x.labels["pid"], me.to_string(), "dead file's series exposed as live: {x:?}");
    }

    wl.0.proc.signal(Signal::SIGTERM);
    assert_eq!(wl.0.proc.wait_timeout(LONG).code(), Some(0));
}

/// Whether this sandbox lets us create a pid namespace.
fn unshare_works() -> Result<(), String> {
    match Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", "test $$ = 1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn workload_in_a_pid_namespace() {
    if let Err(why) = unshare_works() {
        eprintln!("SKIPPED workload_in_a_pid_namespace: unshare --pid does not work here: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let p = Params { w: 3, s: 2, h: 1, k: 2, m: 5 };
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .arg(util::example_bin("workload"))
        .args(p.args())
        .env("SHMETRICS_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    // Killing unshare kills the namespace's init (--kill-child), which takes everything with it.
    let mut ns = Proc { child };
    let mut line = String::new();
    stdout.read_line(&mut line).expect("READY line");
    let pids = util::parse_ready(&line);
    // Inside the namespace the master is pid 1 and its workers come right after.
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| *p > 1 && *p < 100), "namespace pids {pids:?}");
    let names: BTreeSet<u64> = files_by_pid(&dir).keys().copied().collect();
    let mut want: BTreeSet<u64> = pids.iter().map(|p| *p as u64).collect();
    want.insert(1);
    assert_eq!(names, want, "files named by namespace pids");

    let s = scrape(served.addr);
    check_workload(&s, &expected(&p, &pid_labels(&pids), true), "1");
    assert_eq!(one(&s, "shmetrics_workers_live"), 3.0, "3 workers; the master is not one");

    // SIGTERM the master through its pid outside the namespace (unshare's only child).
    let outside: i32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", ns.pid()))
        .expect("children of unshare")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the workload's outside pid");
    kill(Pid::from_raw(outside), Signal::SIGTERM).expect("kill");
    assert_eq!(ns.wait_timeout(LONG).code(), Some(0), "workload exit status through unshare");
    util::wait_for(LONG, "files folded", || (util::worker_files(&dir) == 0).then_some(()));
    let s = scrape(served.addr);
    check_workload(&s, &expected(&p, &pid_labels(&pids), false), "1");
    assert_eq!(one(&s, "shmetrics_workers_dead_total"), 4.0);
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), 0.0);
}

// ---------------------------------------------------------------------------------------------
// 6: concurrent scrapes while real workers write.

#[test]
fn concurrent_scrapes_under_load_are_consistent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    // --max-requests adds worker churn, so files are folded while the scrapers read.
    let mut server =
        Prefork::spawn(&dir, &["--workers", "3", "--max-requests", "40"], &tmp.path().join("prefork.log"));

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let client_threads = clients(3, server.addr, "/", "hello from ", &load, &stop);
    let scraper_threads = scrapers(3, served.addr, &stop);
    util::wait_for(Duration::from_secs(12), "600 requests", || {
        (load.ok.load(Ordering::Relaxed) >= 600).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for t in client_threads {
        t.join().expect("client thread");
    }
    let scrapes: Vec<u64> = scraper_threads.into_iter().map(|t| t.join().expect("scraper thread")).collect();
    assert!(scrapes.iter().all(|n| *n >= 5), "scrapes per thread: {scrapes:?}");

    // No worker was killed: every request was answered and counted.
    assert_eq!(load.failed.load(Ordering::Relaxed), 0);
    assert_eq!(load.other.load(Ordering::Relaxed), 0);
    let ok = load.ok.load(Ordering::Relaxed) as f64;
    let s = util::wait_for(LONG, "nothing in flight", || {
        let s = scrape(served.addr);
        (one(&s, "http_requests_in_flight") == 0.0).then_some(s)
    });
    assert_eq!(
        value(&s, "http_requests_total", &[("method", "GET"), ("path", "/"), ("code", "200")]),
        Some(ok)
    );
    assert_eq!(
        value(&s, "http_request_duration_seconds_count", &[("method", "GET"), ("path", "/")]),
        Some(ok)
    );
    assert_eq!(one(&s, "shmetrics_workers_crashed_total"), 0.0);
    eprintln!("{ok} requests, scrapes per thread {scrapes:?}");

    assert_eq!(server.stop().code(), Some(0));
}
