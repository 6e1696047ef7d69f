//! Real Python servers behind `shmetrics run`: gunicorn and uWSGI running the unchanged
//! prometheus_client app `tests/python/app.py` with the configurations in `conf/`.
//!
//! `shmetrics run -- gunicorn …` exports `PROMETHEUS_MULTIPROC_DIR` (its own directory, empty at
//! start), so prometheus_client writes its multiprocess `*.db` files there and the aggregator
//! serves them merged with `MultiProcessCollector`'s semantics. These tests send known traffic to
//! the app and check the merged samples exactly, against our own count of the requests answered
//! and against prometheus_client's own `MultiProcessCollector` reading the same files.
//!
//! Requirements (installed by `.ci/run`): `$SHMETRICS_TEST_PYTHON` is a venv python with
//! prometheus_client==0.26.0 and gunicorn==23.0.0 (gunicorn is taken from the same `bin/`);
//! Debian's `uwsgi` and `uwsgi-plugin-python3`. A missing one fails the test with instructions:
//! these checks must not pass silently.
//!
//! Every test stops the server with SIGTERM through `shmetrics run` and checks that no process of
//! its group is left; on failure `RunProc`'s drop kills the group.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::run_cmd::{spawn_run, RunProc};
use crate::util;

pub(crate) const LONG: Duration = Duration::from_secs(20);
const WORKERS: usize = 4;
/// Pinned in `.ci/run`.
const GUNICORN_PIN: &str = "gunicorn==23.0.0";

// ---------------------------------------------------------------------------------------------
// Tools: the Python venv, gunicorn, uWSGI.

/// Runs `python -c code`, returning its trimmed stdout, or panics with `hint`.
pub(crate) fn python_says(code: &str, hint: &str) -> String {
    let py = util::python();
    let out = Command::new(&py)
        .args(["-c", code])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (SHMETRICS_TEST_PYTHON): {e}\n{hint}"));
    assert!(
        out.status.success(),
        "{py} (SHMETRICS_TEST_PYTHON) failed: {}\n{hint}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

fn venv_hint() -> String {
    format!(
        "run `bash .ci/run`, or: python3 -m venv target/test-venv && \
         target/test-venv/bin/pip install prometheus_client==0.26.0 {GUNICORN_PIN} && \
         export SHMETRICS_TEST_PYTHON=$PWD/target/test-venv/bin/python"
    )
}

/// The gunicorn installed next to `$SHMETRICS_TEST_PYTHON` (same venv, so it imports the same
/// prometheus_client).
pub(crate) fn require_gunicorn() -> PathBuf {
    let hint = venv_hint();
    let bin = python_says(
        "import os, sys, prometheus_client; print(os.path.join(os.path.dirname(sys.executable), 'gunicorn'))",
        &hint,
    );
    let bin = PathBuf::from(bin);
    let ok = Command::new(&bin).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "gunicorn not found at {} (next to $SHMETRICS_TEST_PYTHON): {hint}", bin.display());
    bin
}

/// Fails with how to install them unless Debian's uWSGI and its Python 3 plugin are here.
pub(crate) fn require_uwsgi_plugin() {
    let hint = "install Debian's uWSGI and its Python 3 plugin: \
                `apt-get install -y uwsgi uwsgi-plugin-python3` (or run `bash .ci/run`)";
    let out = Command::new("uwsgi")
        .args(["--plugin", "python3", "--version"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run uwsgi: {e}; {hint}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("UNABLE to load"), "uwsgi python3 plugin: {text}\n{hint}");
}

/// `uwsgi` with its python3 plugin (Debian's packages), and the site-packages directory holding
/// `$SHMETRICS_TEST_PYTHON`'s prometheus_client, for uWSGI's `--pythonpath`.
///
/// Why `pythonpath` and not `virtualenv`: the plugin embeds Debian's python3.11, and a venv made
/// by another Python build (pyenv's, on CI) cannot be its `virtualenv` (`home`): uWSGI would load
/// that build's standard library and its C extensions fail to load (`_ssl`: undefined symbol).
/// prometheus_client is pure Python, so adding the venv's site-packages to the path is enough.
/// ([`require_uwsgi_plugin`] first.)
pub(crate) fn require_uwsgi() -> (String, String) {
    require_uwsgi_plugin();
    let site = python_says(
        "import os, prometheus_client; print(os.path.dirname(os.path.dirname(prometheus_client.__file__)))",
        &venv_hint(),
    );
    ("uwsgi".to_string(), site)
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// HTTP to the app.

/// GET with `Connection: close`: `Ok((status, body))` only for a complete response (the whole
/// `Content-Length` body arrived); anything else (refused, reset, closed early) is an error.
pub(crate) fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| {
        Error::new(ErrorKind::UnexpectedEof, format!("{what}: {:?}", String::from_utf8_lossy(&raw)))
    };
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head"))?;
    let status: u16 =
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad("status line"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| bad("no content-length"))?;
    let body = &raw[end + 4..];
    if body.len() != len {
        return Err(bad("truncated body"));
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

/// Waits until the app answers `/pid`; returns the number of answered `/pid` requests (1).
pub(crate) fn wait_app(addr: SocketAddr, run: &mut RunProc) -> u64 {
    util::wait_for(LONG, "the app to answer /pid", || {
        if let Some(st) = run.proc.child.try_wait().expect("try_wait") {
            panic!("shmetrics run exited ({st}) before the app answered; stderr:\n{}", run.stderr_text());
        }
        match try_get(addr, "/pid") {
            Ok((200, _)) => Some(1),
            _ => None,
        }
    })
}

/// Waits until `n` different workers have answered `/pid` (4 clients ask until they have), so that
/// every worker is up and has written its files; returns the number of answered `/pid` requests.
pub(crate) fn wait_workers(addr: SocketAddr, run: &mut RunProc, n: usize) -> u64 {
    let mut answered = wait_app(addr, run);
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let count = Arc::new(AtomicU64::new(0));
    let deadline = std::time::Instant::now() + LONG;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (seen, count) = (Arc::clone(&seen), Arc::clone(&count));
            std::thread::spawn(move || {
                while seen.lock().expect("seen").len() < n && std::time::Instant::now() < deadline {
                    if let Ok((200, body)) = try_get(addr, "/pid") {
                        count.fetch_add(1, Ordering::SeqCst);
                        seen.lock().expect("seen").insert(body.trim().to_string());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("probe thread");
    }
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(
        seen.len(),
        n,
        "workers that answered /pid within {LONG:?}: {seen:?}; stderr:\n{}",
        run.stderr_text()
    );
    answered += count.load(Ordering::SeqCst);
    answered
}

/// Sends every request of `paths` once, from `threads` threads, and returns the statuses of the
/// answered ones (any failure panics: only for runs where no worker is killed).
pub(crate) fn send_all(addr: SocketAddr, paths: &[&str], threads: usize) -> BTreeMap<(String, u16), u64> {
    let queue: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(paths.iter().map(|p| p.to_string()).collect()));
    let answered = Arc::new(Mutex::new(BTreeMap::new()));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let queue = Arc::clone(&queue);
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || loop {
                let Some(path) = queue.lock().expect("queue").pop() else { break };
                let (status, _) = try_get(addr, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
                *answered.lock().expect("answered").entry((path, status)).or_insert(0u64) += 1;
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    Arc::try_unwrap(answered).expect("clients done").into_inner().expect("answered")
}

// ---------------------------------------------------------------------------------------------
// The exposition.

/// A sample key: name and labels sorted by name, `le` normalised through f64 ("1" == "1.0").
type Key = (String, BTreeMap<String, String>);

#[derive(Debug, Default)]
pub(crate) struct Expo {
    pub(crate) samples: BTreeMap<Key, f64>,
    /// `# HELP` and `# TYPE` text by metric name.
    help: BTreeMap<String, String>,
    pub(crate) types: BTreeMap<String, String>,
}

pub(crate) fn parse(text: &str) -> Expo {
    let mut e = Expo::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            e.help.insert(name.to_string(), help.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE line {line:?}"));
            e.types.insert(name.to_string(), t.to_string());
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = util::split_value(line);
        let (name, body) = util::split_labels(head);
        let labels = body.map(labels_le_normalized).unwrap_or_default();
        e.samples.insert((name.to_string(), labels), value);
    }
    e
}

fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    (name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

impl Expo {
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }
    /// The value of a sample that must be there.
    pub(crate) fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let near: Vec<_> = self.samples.keys().filter(|(n, _)| n.starts_with("app_")).collect();
            panic!("no sample {name}{labels:?}; app samples: {near:?}")
        })
    }
    /// The app's samples (names starting with `app_`).
    fn app(&self) -> BTreeMap<Key, f64> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n.starts_with("app_"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

pub(crate) fn scrape(addr: SocketAddr) -> Expo {
    parse(&util::scrape(addr))
}

const REQ: &str = "app_requests_total";
const COUNT: &str = "app_request_seconds_count";

fn requests(e: &Expo, path: &str, status: &str) -> f64 {
    e.must(REQ, &[("method", "GET"), ("path", path), ("status", status)])
}

/// prometheus_client's own `MultiProcessCollector` over a copy of the `*.db` files of `dir`.
///
/// Empty files are left out of the copy: a worker SIGKILLed between creating its file and sizing
/// it leaves a 0-byte `*.db`, on which prometheus_client 0.26's collector itself fails
/// (`struct.error: unpack_from requires a buffer of at least 4 bytes`). Such a file holds no
/// value, so leaving it out changes nothing to the result.
fn python_collector(dir: &Path) -> Expo {
    let copy = tempfile::tempdir().expect("tempdir");
    for name in util::ls(dir) {
        let src = dir.join(&name);
        if name.ends_with(".db")
            && !name.starts_with('.')
            && std::fs::metadata(&src).map(|m| m.len() > 0).unwrap_or(false)
        {
            std::fs::copy(&src, copy.path().join(&name)).expect("copy");
        }
    }
    let code = "import sys\n\
                from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n\
                r = CollectorRegistry()\n\
                multiprocess.MultiProcessCollector(r, path=sys.argv[1])\n\
                sys.stdout.write(generate_latest(r).decode())\n";
    let out = Command::new(util::python()).args(["-c", code, s(copy.path())]).output().expect("run python");
    assert!(out.status.success(), "MultiProcessCollector: {}", String::from_utf8_lossy(&out.stderr));
    parse(&String::from_utf8(out.stdout).expect("utf-8"))
}

/// Our app samples equal `MultiProcessCollector`'s over the same directory: same series, same
/// values (sums of float observations to 1e-9 relative, the order of additions may differ), same
/// HELP and TYPE. Only meaningful while no process died (the Python collector keeps dead
/// processes' `live*` gauges, by design of prometheus_client).
fn check_against_python(ours: &Expo, dir: &Path) {
    let theirs = python_collector(dir);
    let (a, b) = (ours.app(), theirs.app());
    let ka: Vec<_> = a.keys().collect();
    let kb: Vec<_> = b.keys().collect();
    assert_eq!(ka, kb, "series: ours (left) vs MultiProcessCollector (right)");
    for (k, va) in &a {
        let vb = b[k];
        let close =
            if k.0.ends_with("_sum") { (va - vb).abs() <= 1e-9 * vb.abs().max(1e-9) } else { *va == vb };
        assert!(close, "{k:?}: ours {va} vs MultiProcessCollector {vb}");
    }
    let app = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        m.iter().filter(|(n, _)| n.starts_with("app_")).map(|(n, v)| (n.clone(), v.clone())).collect()
    };
    assert_eq!(app(&ours.types), app(&theirs.types), "TYPE lines: ours (left) vs MultiProcessCollector");
    assert_eq!(app(&ours.help), app(&theirs.help), "HELP lines: ours (left) vs MultiProcessCollector");
}

// ---------------------------------------------------------------------------------------------
// The directory and processes.

/// prometheus_client files in `dir`: every name ending in `.db`, hidden ones included (a file
/// being compacted is renamed aside to a dot-name first; it still takes room).
fn db_files(dir: &Path) -> Vec<String> {
    util::ls(dir).into_iter().filter(|n| n.ends_with(".db")).collect()
}

/// The pids whose parent is `ppid` (the workers of a master).
pub(crate) fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid …: comm may hold spaces and parentheses, so split at the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut f = rest.split_whitespace();
        let state = f.next();
        if f.next().and_then(|p| p.parse::<i32>().ok()) == Some(ppid) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}

/// Waits until `pid` has died (gone or a zombie): its sockets are closed, it accepts nothing more.
pub(crate) fn wait_dead(pid: i32) {
    util::wait_for(LONG, &format!("pid {pid} to die"), || {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(()),
            Ok(stat) => (stat.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')) == Some(true))
                .then_some(()),
        }
    });
}

/// SIGTERM through `shmetrics run`; the server must stop cleanly (status 0) and leave no process
/// of its group behind.
pub(crate) fn stop(mut run: RunProc) {
    run.signal(Signal::SIGTERM);
    let st = run.wait(LONG);
    assert_eq!(
        st.code(),
        Some(0),
        "shmetrics run exits with the server's status; stderr:\n{}",
        run.stderr_text()
    );
    let group = Pid::from_raw(-run.child_pid);
    util::wait_for(Duration::from_secs(5), "no process left in the server's group", || {
        (kill(group, None) == Err(Errno::ESRCH)).then_some(())
    });
}

pub(crate) fn start(args: &[&str], extra_env: &[(&str, &str)], xdg: &Path) -> RunProc {
    let mut env = vec![("XDG_RUNTIME_DIR", s(xdg)), ("PYTHONDONTWRITEBYTECODE", "1")];
    env.extend_from_slice(extra_env);
    spawn_run(args, &env)
}

/// `shmetrics run [run_opts] -- gunicorn -c conf/gunicorn.conf.py … [gunicorn_opts]`.
fn start_gunicorn(run_opts: &[&str], gunicorn_opts: &[&str], xdg: &Path) -> (RunProc, SocketAddr) {
    let gunicorn = require_gunicorn();
    let root = root();
    let conf = root.join("conf/gunicorn.conf.py");
    let app_dir = root.join("tests/python");
    let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
    let bind = app.to_string();
    let workers = WORKERS.to_string();
    let mut args = vec!["run"];
    args.extend_from_slice(run_opts);
    args.extend([
        "--",
        s(&gunicorn),
        "-c",
        s(&conf),
        "--chdir",
        s(&app_dir),
        "--bind",
        &bind,
        "--workers",
        &workers,
    ]);
    args.extend_from_slice(gunicorn_opts);
    args.push("app:app");
    (start(&args, &[], xdg), app)
}

/// `shmetrics run [run_opts] -- uwsgi --ini conf/uwsgi.ini --pythonpath SITE [uwsgi_opts]`.
///
/// The port goes through the environment: the ini binds its default only when UWSGI_HTTP_SOCKET
/// is unset (a second `--http-socket` would add a port, not replace it).
fn start_uwsgi(run_opts: &[&str], uwsgi_opts: &[&str], xdg: &Path) -> (RunProc, SocketAddr) {
    let (uwsgi, site) = require_uwsgi();
    let conf = root().join("conf/uwsgi.ini");
    let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
    let bind = app.to_string();
    let mut args = vec!["run"];
    args.extend_from_slice(run_opts);
    args.extend(["--", &uwsgi, "--ini", s(&conf), "--pythonpath", &site]);
    args.extend_from_slice(uwsgi_opts);
    (start(&args, &[("UWSGI_HTTP_SOCKET", &bind)], xdg), app)
}

/// The parts every exact run checks: the directory is `run`'s and holds prometheus_client files.
fn check_dir_is_exported(run: &RunProc) {
    let files = db_files(&run.dir);
    assert!(
        files.iter().any(|f| f.starts_with("counter_")),
        "no prometheus_client counter file in SHMETRICS_DIR {} ({files:?}): is PROMETHEUS_MULTIPROC_DIR exported \
         to the server? stderr:\n{}",
        run.dir.display(),
        run.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------------
// (a), (d): exact counts under gunicorn and uWSGI.

/// 200 × `/`, 30 × `/status/404`, 10 × `/status/503` from 4 clients, then exact checks.
fn exact_counts(run: &mut RunProc, app: SocketAddr, server: &str) {
    let pid_probes = wait_workers(app, run, WORKERS);
    let mut paths = vec!["/"; 200];
    paths.extend(["/status/404"; 30]);
    paths.extend(["/status/503"; 10]);
    let answered = send_all(app, &paths, 4);
    assert_eq!(answered.get(&("/".into(), 200)), Some(&200), "{server}: {answered:?}");
    assert_eq!(answered.get(&("/status/404".into(), 404)), Some(&30), "{server}: {answered:?}");
    assert_eq!(answered.get(&("/status/503".into(), 503)), Some(&10), "{server}: {answered:?}");
    check_dir_is_exported(run);
    util::assert_openmetrics_parses(run.addr);

    let e = scrape(run.addr);
    assert_eq!(requests(&e, "/", "200"), 200.0, "{server}");
    assert_eq!(requests(&e, "/status/{code}", "404"), 30.0, "{server}");
    assert_eq!(requests(&e, "/status/{code}", "503"), 10.0, "{server}");
    assert_eq!(requests(&e, "/pid", "200"), pid_probes as f64, "{server}");
    assert_eq!(e.must(COUNT, &[("path", "/")]), 200.0, "{server}");
    assert_eq!(e.must(COUNT, &[("path", "/status/{code}")]), 40.0, "{server}");
    assert_eq!(e.must("app_request_seconds_bucket", &[("path", "/"), ("le", "+Inf")]), 200.0, "{server}");
    let sum = e.must("app_request_seconds_sum", &[("path", "/")]);
    assert!(sum > 0.0 && sum < 200.0, "{server}: sum of 200 latencies {sum}");
    assert_eq!(e.must("app_in_flight", &[]), 0.0, "{server}: nothing in flight");
    assert_eq!(e.types.get("app_request_seconds").map(String::as_str), Some("histogram"), "{server}");
    assert_eq!(e.types.get("app_in_flight").map(String::as_str), Some("gauge"), "{server}");

    // Each worker answered a /pid, so each has its counter, histogram and `livesum` gauge file;
    // the master has a gauge file of its own: the app was loaded there before the fork (gunicorn's
    // preload_app, uWSGI without lazy-apps), which created app_in_flight with the value 0.
    // (At least WORKERS workers: the server may replace a worker that was slow under load, and its
    // replacement writes files of its own; the counts asserted above stay exact either way.)
    let files = db_files(&run.dir);
    let of = |prefix: &str| files.iter().filter(|f| f.starts_with(prefix)).count();
    let workers = of("counter_");
    assert!(workers >= WORKERS, "{server}: {files:?}");
    assert_eq!(
        (of("histogram_"), of("gauge_livesum_"), files.len()),
        (workers, workers + 1, 3 * workers + 1),
        "{server}: {files:?}"
    );
    assert!(
        files.iter().any(|f| f == &format!("gauge_livesum_{}.db", run.child_pid)),
        "{server}: the master's gauge file: {files:?}"
    );
    assert_eq!(e.get("shmetrics_python_files", &[]), Some(files.len() as f64), "{server}: {files:?}");

    // Nobody died: prometheus_client's own collector must say exactly the same.
    check_against_python(&e, &run.dir);
}

#[test]
fn gunicorn_four_workers_exact_counts() {
    let xdg = tempfile::tempdir().expect("tempdir");
    let (mut run, app) = start_gunicorn(&[], &[], xdg.path());
    exact_counts(&mut run, app, "gunicorn");
    stop(run);
}

#[test]
fn uwsgi_four_processes_exact_counts() {
    let xdg = tempfile::tempdir().expect("tempdir");
    let (mut run, app) = start_uwsgi(&[], &[], xdg.path());
    exact_counts(&mut run, app, "uwsgi");
    let st = run.stderr_text();
    assert!(st.contains("Python version: 3"), "uWSGI runs the app with its python3 plugin:\n{st}");
    // No lazy-apps: the app was loaded once, in the master (the process `run` started).
    let loaded = format!("pid: {} (default app)", run.child_pid);
    assert!(st.contains(&loaded), "app loaded in the master ({loaded:?}):\n{st}");
    stop(run);
}

// ---------------------------------------------------------------------------------------------
// (b): SIGKILLed workers.

/// Every app counter and histogram sample of `e` (they may only grow).
fn monotonic_part(e: &Expo) -> BTreeMap<Key, f64> {
    e.app()
        .into_iter()
        .filter(|((n, _), _)| n.starts_with("app_requests_total") || n.starts_with("app_request_seconds"))
        .collect()
}

/// Fails if a series of `next` is below its value in `prev` (or went missing).
fn check_no_decrease(prev: &BTreeMap<Key, f64>, next: &BTreeMap<Key, f64>, what: &str) {
    for (k, v) in prev {
        let now = next.get(k).copied().unwrap_or(0.0);
        assert!(now >= *v, "{what}: {k:?} went from {v} to {now}");
    }
}

#[test]
fn gunicorn_sigkilled_workers_keep_their_counts() {
    let xdg = tempfile::tempdir().expect("tempdir");
    let (mut run, app) = start_gunicorn(&[], &[], xdg.path());
    let master = run.child_pid;
    let mut pid_answered = wait_app(app, &mut run);
    let mut last = monotonic_part(&scrape(run.addr));

    // Phase 1, exact. One client, requests one after the other; after every 15th, SIGKILL the
    // worker that answered it. That worker is idle: the app counts a request (counter and
    // histogram, in the mmap'd file) before it returns the response, and we read the response to
    // its end, so all its counting is done; the next request is sent only once it is dead (a
    // zombie, its copy of the listening socket closed), so it cannot accept one more and die with
    // it. No request can be counted and not answered, or answered and not counted: the counts
    // equal the answered requests exactly, after each kill.
    let mut killed = Vec::new();
    for round in 0..4 {
        let mut pid = 0;
        for _ in 0..15 {
            let (st, body) = try_get(app, "/pid").unwrap_or_else(|e| panic!("round {round}: GET /pid: {e}"));
            assert_eq!(st, 200);
            pid_answered += 1;
            pid = body.trim().parse().expect("pid");
        }
        assert_ne!(pid, master, "/pid answers from a worker, not the master");
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill worker");
        wait_dead(pid);
        killed.push(pid);
        let e = scrape(run.addr);
        let now = monotonic_part(&e);
        check_no_decrease(&last, &now, &format!("after killing {pid}"));
        last = now;
        assert_eq!(requests(&e, "/pid", "200"), pid_answered as f64, "after killing {killed:?}");
        assert_eq!(e.must(COUNT, &[("path", "/pid")]), pid_answered as f64, "after killing {killed:?}");
    }

    // Phase 2, bounded. Four clients send requests to `/` (at least 30 each) for as long as a
    // killer SIGKILLs a random worker every 40 ms (8 kills), and a scraper checks that no count
    // ever decreases. A killed worker may have counted the request it was serving without
    // answering it (a sync worker serves one request at a time), so with A requests answered 200,
    // F failed and K kills: A <= histogram count <= counter <= A + min(F, K) (the app increments
    // the counter, then observes the latency, then answers).
    let stop_flag = Arc::new(AtomicBool::new(false));
    let killing = Arc::new(AtomicBool::new(true));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ok, failed, sent, killing) =
                (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&sent), Arc::clone(&killing));
            std::thread::spawn(move || {
                let mut n = 0;
                while n < 2000 && (n < 30 || killing.load(Ordering::SeqCst)) {
                    n += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                    match try_get(app, "/") {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                        Ok((st, body)) => panic!("GET / answered {st}: {body}"),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    let scraper = {
        let stop_flag = Arc::clone(&stop_flag);
        let addr = run.addr;
        let mut last = last.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop_flag.load(Ordering::SeqCst) {
                let now = monotonic_part(&scrape(addr));
                check_no_decrease(&last, &now, "scrape during kills");
                last = now;
                n += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            n
        })
    };
    let mut kills = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let t0 = std::time::Instant::now();
    while kills < 8 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(40));
        // A worker killed a moment ago may not be a zombie yet: never count one twice.
        let workers: Vec<i32> = children_of(master).into_iter().filter(|p| !killed.contains(p)).collect();
        if workers.is_empty() {
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pid = workers[(rng % workers.len() as u64) as usize];
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            kills += 1;
            killed.push(pid);
        }
    }
    let kill_time = t0.elapsed();
    killing.store(false, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client");
    }
    stop_flag.store(true, Ordering::SeqCst);
    let client_time = t0.elapsed();
    let scrapes = scraper.join().expect("scraper");
    assert!(scrapes > 0);
    for pid in &killed {
        wait_dead(*pid);
    }
    let (a, f) = (ok.load(Ordering::SeqCst) as f64, failed.load(Ordering::SeqCst) as f64);
    assert_eq!(a + f, sent.load(Ordering::SeqCst) as f64);
    assert_eq!(kills, 8, "the killer found workers to kill");
    let e = scrape(run.addr);
    check_no_decrease(&last, &monotonic_part(&e), "final scrape");
    let counted = requests(&e, "/", "200");
    let observed = e.must(COUNT, &[("path", "/")]);
    let upper = a + f.min(kills as f64);
    eprintln!(
        "kills under load: answered {a}, failed {f}, kills {kills} in {kill_time:?}, clients done after \
         {client_time:?}, {scrapes} scrapes; histogram {observed}, counter {counted}"
    );
    assert!(
        a <= observed && observed <= counted && counted <= upper,
        "answered {a}, failed {f}, kills {kills}: histogram count {observed}, counter {counted} \
         (want {a} <= histogram <= counter <= {upper})"
    );
    // Phase 1's series is untouched by phase 2.
    assert_eq!(requests(&e, "/pid", "200"), pid_answered as f64);

    // A worker that dies in the middle of a request leaves app_in_flight = 1 in its file: that
    // `livesum` gauge must stop counting once the process is dead, without any child_exit hook.
    assert!(try_get(app, "/crash").is_err(), "/crash gets no answer");
    // The scenario is real: prometheus_client alone (no mark_process_dead hook) reports it, plus
    // the requests in flight in the workers killed in phase 2. (This holds while shmetrics leaves
    // dead processes' files in place without --compact-python.)
    let python_says = python_collector(&run.dir).must("app_in_flight", &[]);
    assert!(python_says >= 1.0, "MultiProcessCollector after /crash: app_in_flight {python_says}");
    util::wait_for(Duration::from_secs(10), "app_in_flight back to 0 after /crash", || {
        (scrape(run.addr).must("app_in_flight", &[]) == 0.0).then_some(())
    });
    let e = scrape(run.addr);
    assert_eq!(e.get(REQ, &[("method", "GET"), ("path", "/crash"), ("status", "200")]), None);
    assert_eq!(requests(&e, "/pid", "200"), pid_answered as f64);
    stop(run);
}

// ---------------------------------------------------------------------------------------------
// (c): max_requests churn.

/// The most `*.db` files allowed once upkeep has run: 3 per live process. (The steady state is
/// 3 × 4 + 1 = 13: counter, histogram and `gauge_livesum` files of the 4 workers, and the
/// master's gauge file.)
const BOUND: usize = 3 * (WORKERS + 1);
/// Requests and max-requests of the churn runs: gunicorn recycles 60 workers. uWSGI throttles
/// respawns ("worker respawning too fast !!! i have to sleep a bit (2 seconds)"), so it recycles
/// 10, to stay within a few seconds.
const CHURN: [(&str, usize, usize); 2] = [("gunicorn", 300, 5), ("uwsgi", 100, 10)];

fn churn_params(server: &str) -> (usize, usize) {
    let (_, n, m) = CHURN.iter().find(|(s, _, _)| *s == server).expect("server");
    (*n, *m)
}

/// A server recycling its workers after M requests: N requests to `/` in batches of 50 (see
/// [`CHURN`]), each answered (a worker that reached its limit finishes its request, then exits).
/// Returns the run, its final scrape and the temporary directory holding the run's directory.
///
/// gunicorn: `--max-requests M --max-requests-jitter 0`. uWSGI: `--max-requests M
/// --min-worker-lifetime 0` (uWSGI recycles a worker for max-requests only once it has lived
/// min-worker-lifetime seconds, 60 by default).
fn churn(server: &str, compact: bool) -> (RunProc, Expo, tempfile::TempDir) {
    let xdg = tempfile::tempdir().expect("tempdir");
    let mut opts = vec!["--upkeep-interval", "0.2"];
    if compact {
        opts.push("--compact-python");
    }
    let (total, max_requests) = churn_params(server);
    let mr = max_requests.to_string();
    let (mut run, app) = match server {
        "gunicorn" => {
            start_gunicorn(&opts, &["--max-requests", &mr, "--max-requests-jitter", "0"], xdg.path())
        }
        "uwsgi" => start_uwsgi(&opts, &["--max-requests", &mr, "--min-worker-lifetime", "0"], xdg.path()),
        _ => unreachable!(),
    };
    let pid_probes = wait_app(app, &mut run);
    let mut sent = 0;
    while sent < total {
        let answered = send_all(app, &["/"; 50], 2);
        assert_eq!(answered.get(&("/".into(), 200)), Some(&50), "{answered:?}");
        sent += 50;
        if compact {
            // Bounded all along, not only at the end: after every batch, once upkeep has folded
            // the workers that exited (0.2 s passes plus the compaction grace period).
            let t0 = std::time::Instant::now();
            loop {
                let files = db_files(&run.dir);
                if files.len() <= BOUND {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "{server}: still {} *.db files > {BOUND} 10 s after {sent} requests: {files:?}",
                    files.len()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let e = scrape(run.addr);
    let what = format!("{server}, compact={compact}");
    assert_eq!(requests(&e, "/", "200"), total as f64, "{what}");
    assert_eq!(e.must(COUNT, &[("path", "/")]), total as f64, "{what}");
    assert_eq!(e.must("app_request_seconds_bucket", &[("path", "/"), ("le", "+Inf")]), total as f64);
    assert_eq!(requests(&e, "/pid", "200"), pid_probes as f64);
    assert_eq!(e.must("app_in_flight", &[]), 0.0, "{what}");
    let restart_line = if server == "gunicorn" { "Autorestarting worker" } else { "is done. Seeya!" };
    let restarts = run.stderr_text().matches(restart_line).count();
    assert!(
        restarts >= (total + 1) / max_requests - WORKERS,
        "{what}: workers were recycled: {restarts} restarts"
    );
    (run, e, xdg)
}

/// With --compact-python: bounded after every batch, exact totals, an archive.
fn churn_compacted(server: &str) {
    let (run, _, _xdg) = churn(server, true);
    let files = db_files(&run.dir);
    assert!(files.len() <= BOUND, "{server}: {} files > {BOUND}: {files:?}", files.len());
    assert!(
        run.dir.join("archive.json").is_file(),
        "{server}: dead workers folded into archive.json: {:?}",
        util::ls(&run.dir)
    );
    let e = scrape(run.addr);
    let followed = e.must("shmetrics_python_files", &[]);
    assert!(followed <= BOUND as f64, "{server}: shmetrics_python_files {followed}");
    // And the totals are still exact after the final fold.
    assert_eq!(requests(&e, "/", "200"), churn_params(server).0 as f64, "{server}");
    stop(run);
}

#[test]
fn gunicorn_max_requests_churn_compact_python_keeps_the_directory_bounded() {
    churn_compacted("gunicorn");
}

#[test]
fn uwsgi_max_requests_churn_compact_python_keeps_the_directory_bounded() {
    churn_compacted("uwsgi");
}

#[test]
fn gunicorn_max_requests_churn_without_compaction_grows_the_directory() {
    // The control for the test above: without --compact-python, every worker that ever served a
    // request leaves its counter and histogram files (at least 300 / 5 = 60 workers served), so
    // the bound above would fail. The totals are exact all the same.
    let (run, _, _xdg) = churn("gunicorn", false);
    // (Upkeep would have removed them by now if it did.)
    std::thread::sleep(Duration::from_millis(1000));
    let files = db_files(&run.dir);
    let (total, max_requests) = churn_params("gunicorn");
    let min = 2 * total / max_requests;
    assert!(files.len() > BOUND && files.len() >= min, "{} files, expected >= {min}", files.len());
    stop(run);
}

/// [`util::parse_labels`], with `le` written as a float the same way on both sides.
fn labels_le_normalized(s: &str) -> BTreeMap<String, String> {
    let mut labels = util::parse_labels(s);
    if let Some(v) = labels.get_mut("le") {
        let f: f64 = if v == "+Inf" { f64::INFINITY } else { v.parse().expect("le") };
        *v = if f.is_infinite() { "+Inf".to_string() } else { format!("{f}") };
    }
    labels
}

// ---------------------------------------------------------------------------------------------
// `shmetrics run` killed by SIGKILL: the server and its workers go with it.

/// Kills `run` with SIGKILL; the master (reparented) and every worker must die, and the
/// application port must be free again: a new listener can bind it.
fn sigkilled_run_takes_the_server_along(server: &str, mut run: RunProc, app: SocketAddr) {
    wait_workers(app, &mut run, WORKERS);
    let master = run.child_pid;
    let workers = children_of(master);
    assert_eq!(workers.len(), WORKERS, "{server} workers: {workers:?}");
    run.signal(Signal::SIGKILL);
    run.wait(LONG);
    for pid in std::iter::once(master).chain(workers) {
        wait_dead(pid);
    }
    util::wait_for(LONG, "the application port free again", || std::net::TcpListener::bind(app).ok());
}

#[test]
fn gunicorn_dies_with_a_sigkilled_run() {
    let xdg = tempfile::tempdir().expect("tempdir");
    let (run, app) = start_gunicorn(&[], &[], xdg.path());
    sigkilled_run_takes_the_server_along("gunicorn", run, app);
}

#[test]
fn uwsgi_dies_with_a_sigkilled_run() {
    let xdg = tempfile::tempdir().expect("tempdir");
    let (run, app) = start_uwsgi(&[], &[], xdg.path());
    sigkilled_run_takes_the_server_along("uwsgi", run, app);
}
