//! The job's processes as the aggregator reports them: who is a worker and who a master, the job's
//! totals under names of their own, and a job CPU counter that never goes backwards while workers
//! come and go — checked against `/proc` itself.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util;

const T: Duration = Duration::from_secs(20);

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}; have {:?}", s.keys().collect::<Vec<_>>()))
}

fn perf(addr: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&util::http_get(addr, "/perf_metrics", &[]).body).expect("perf_metrics JSON")
}

/// (own, reaped children) CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_of(pid: i64) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<f64> = after.split(' ').map(|x| x.parse().unwrap_or(0.0)).collect();
    // Fields after the comm, 0-based from `state`: utime 11, stime 12, cutime 13, cstime 14.
    let tps = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    ((f[11] + f[12]) / tps, (f[13] + f[14]) / tps)
}

/// A `prefork_server` started through `timeout` (a parent that is not part of the job), with the
/// given extra arguments.
struct Server {
    proc: util::Proc,
    addr: SocketAddr,
    _out: BufReader<std::process::ChildStdout>,
}

impl Server {
    fn start(dir: &Path, args: &[&str]) -> Server {
        let mut child = Command::new("timeout")
            .arg("300")
            .arg(util::example_bin("prefork_server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("SHMETRICS_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn timeout prefork_server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("listening line");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected prefork_server output {line:?}"));
        Server { proc: util::Proc { child }, addr, _out: out }
    }
}

/// Item 3. Under worker churn the job's CPU counter never goes down, it holds the CPU time of
/// workers that were reaped (exactly what the kernel accounted to the master for them), job totals
/// are not mixed into the per-pid families, and a graceful aggregator restart continues the count.
/// Item 12: `timeout`, the server's parent, is not taken for a master.
#[test]
fn job_cpu_never_goes_backwards_and_keeps_what_reaped_workers_used() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &["--upkeep-interval", "0.1"]);
    let server = Server::start(&dir, &["--workers", "2", "--max-requests", "3"]);
    util::wait_for(T, "health OK", || {
        (util::http_get(served.addr, "/healthz", &[]).status == 200).then_some(())
    });
    let mut last = get(&util::samples(&util::scrape(served.addr)), "shmetrics_job_cpu_seconds_total");
    for i in 0..45 {
        let r = util::http_get(server.addr, "/burn?ms=25", &[]);
        assert_eq!(r.status, 200, "request {i}");
        let s = util::samples(&util::scrape(served.addr));
        let now = get(&s, "shmetrics_job_cpu_seconds_total");
        assert!(now >= last, "request {i}: the job's CPU went back from {last} to {now}");
        last = now;
    }
    let doc = perf(served.addr);
    let workers = doc["workers"].as_array().expect("workers");
    let masters: Vec<i64> =
        workers.iter().filter(|w| w["kind"] == "master").map(|w| w["pid"].as_i64().expect("pid")).collect();
    assert_eq!(masters.len(), 1, "one master, not `timeout`: {doc}");
    assert_ne!(masters[0], i64::from(server.proc.pid()), "`timeout` is not the master: {doc}");
    assert_eq!(doc["metrics"]["live_workers"], 2, "{doc}");
    assert_eq!(workers.len(), 3, "two workers and their master, nothing else: {doc}");
    // Idle now. After the cache's 2 s, the job's CPU is what /proc says: the master's own time
    // and what it reaped (15 generations of workers), plus the live workers' own time.
    std::thread::sleep(Duration::from_millis(2100));
    let doc = perf(served.addr);
    let (m_own, m_reaped) = cpu_of(masters[0]);
    let live: f64 = doc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["kind"] != "master")
        .map(|w| cpu_of(w["pid"].as_i64().expect("pid")).0)
        .sum();
    let truth = m_own + m_reaped + live;
    let s = util::samples(&util::scrape(served.addr));
    let job = get(&s, "shmetrics_job_cpu_seconds_total");
    assert!((job - truth).abs() <= 0.03, "job CPU {job} s, /proc says {truth} s");
    assert!(m_reaped >= 0.5, "the reaped workers burnt CPU: {m_reaped}");
    // Job totals have names of their own: sum() over the per-pid series is the job's figure.
    for (per_pid, total) in [
        ("process_resident_memory_bytes", "shmetrics_job_resident_memory_bytes"),
        ("process_unique_memory_bytes", "shmetrics_job_unique_memory_bytes"),
        ("process_open_fds", "shmetrics_job_open_fds"),
    ] {
        let series: Vec<f64> =
            s.iter().filter(|(k, _)| k.starts_with(&format!("{per_pid}{{"))).map(|(_, v)| *v).collect();
        assert_eq!(series.len(), 3, "{per_pid}: {s:?}");
        assert!(!s.contains_key(per_pid), "{per_pid} without a pid label");
        assert_eq!(series.iter().sum::<f64>(), get(&s, total), "{per_pid}");
    }
    // A graceful restart of the aggregator continues the count.
    drop(served);
    let served = util::serve(&dir, &["--process-metrics", "job"]);
    let s = util::samples(&util::scrape(served.addr));
    let after = get(&s, "shmetrics_job_cpu_seconds_total");
    assert!((after - job).abs() <= 0.03, "after a restart {after} s, before {job} s");
    assert!(!s.keys().any(|k| k.starts_with("process_")), "--process-metrics job: no per-pid series");
    assert!(s.contains_key("shmetrics_job_resident_memory_bytes"));
    drop(server);
}

/// Item 12. A master whose workers are all gone is not a worker: health says there are none, and
/// `shmetrics_workers_live` counts workers only.
#[test]
fn a_master_alone_means_no_live_workers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &["--upkeep-interval", "0.05"]);
    let mut wl = util::workload(&dir, &["--hold", "--linger", "--ready", "--workers", "3", "--series", "1"]);
    util::wait_for(T, "health OK", || {
        (util::http_get(served.addr, "/healthz", &[]).status == 200).then_some(())
    });
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "shmetrics_workers_live"), 3.0, "3 workers; the master is not one");
    assert_eq!(perf(served.addr)["metrics"]["live_workers"], 3);
    for pid in &wl.pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL).expect("kill worker");
    }
    let h = util::wait_for(T, "health to change", || {
        let h = util::http_get(served.addr, "/healthz", &[]);
        (h.status == 503).then_some(h.text())
    });
    assert_eq!(h, "No live workers\n");
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "shmetrics_workers_live"), 0.0);
    assert_eq!(get(&s, "shmetrics_files"), 1.0, "the master's file is still followed");
    // perf_metrics' process figures are cached for 2 s.
    util::wait_for(T, "perf_metrics without the workers", || {
        (perf(served.addr)["metrics"]["live_workers"] == 0).then_some(())
    });
    wl.proc.signal(Signal::SIGTERM);
    assert!(wl.proc.wait_timeout(T).success());
}

const PRELOAD: &str = r#"
import os, sys, time
from prometheus_client import Counter
Counter("preloaded", "Created by the master before it forks.").inc()
print("LOADED", flush=True)
time.sleep(float(sys.argv[1]))
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print("FORKED", pid, flush=True)
os.waitpid(pid, 0)
"#;

/// Item 12. A Python master that loaded the application before forking (gunicorn's
/// `preload_app`) has files of its own before any worker exists: it is not a ready worker, and once
/// it has forked it is the master and its child (which has written nothing yet) the worker.
#[test]
fn a_preloading_python_master_is_not_a_ready_worker() {
    let py = util::require_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = tmp.path().join("preload.py");
    std::fs::write(&script, PRELOAD).expect("script");
    let mut child = Command::new(util::shmetrics_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--"])
        .arg(&py)
        .arg(&script)
        .arg("3")
        .env("XDG_RUNTIME_DIR", tmp.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let run = util::Proc { child };
    let addr: SocketAddr = stderr
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split("serving http://").nth(1).map(|r| r.split('/').next().unwrap_or("").to_string())
        })
        .expect("serving line")
        .parse()
        .expect("address");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("LOADED");
    assert_eq!(line.trim(), "LOADED");
    // Before the fork: only the master's files exist.
    util::wait_for(T, "the master's file", || {
        (get(&util::samples(&util::scrape(addr)), "shmetrics_python_files") >= 1.0).then_some(())
    });
    let h = util::http_get(addr, "/healthz", &[]);
    assert_eq!((h.status, h.text()), (503, "Only 0 of 1 required workers are ready\n".to_string()));
    line.clear();
    stdout.read_line(&mut line).expect("FORKED");
    let worker: i64 = line.trim().strip_prefix("FORKED ").expect("FORKED line").parse().expect("pid");
    util::wait_for(T, "health OK", || (util::http_get(addr, "/healthz", &[]).status == 200).then_some(()));
    let doc = perf(addr);
    let kinds: BTreeMap<i64, String> = doc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| (w["pid"].as_i64().expect("pid"), w["kind"].as_str().expect("kind").to_string()))
        .collect();
    assert_eq!(kinds.get(&worker).map(String::as_str), Some("python"), "{doc}");
    assert_eq!(kinds.values().filter(|k| *k == "master").count(), 1, "{doc}");
    assert_eq!(doc["metrics"]["live_workers"], 1, "{doc}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker as i32), Signal::SIGKILL);
    drop(run);
}
