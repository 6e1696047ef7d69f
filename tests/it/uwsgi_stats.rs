//! `[[uwsgi_stats]]` end to end: a real uWSGI (Debian's, with its python3 plugin) serving a tiny
//! WSGI app with its stats server on 127.0.0.1, on a unix socket, or with `--stats-http`; a real
//! `shmetrics serve --config` polling it; exact request counts in `/metrics`. Then the stats
//! server goes away, and hostile stats servers (silent, garbage, endless) are polled: scrapes
//! keep answering, `uwsgi_up` is 0 and the errors are counted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::python_servers::try_get;
use crate::util;

const T: Duration = Duration::from_secs(20);
const WORKERS: usize = 3;

/// The WSGI app: standard library only, so no virtualenv is needed.
const APP: &str = "def application(environ, start_response):\n    \
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', '2')])\n    \
    return [b'ok']\n";

/// A running uWSGI: master and `WORKERS` workers on an HTTP port, its stats server at `stats`.
struct Uwsgi {
    proc: util::Proc,
    app: SocketAddr,
    log: PathBuf,
}

impl Uwsgi {
    fn start(tmp: &Path, stats: &str, extra: &[&str]) -> Uwsgi {
        crate::python_servers::require_uwsgi_plugin();
        let app_py = tmp.join("app.py");
        std::fs::write(&app_py, APP).expect("app.py");
        let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
        let log = tmp.join("uwsgi.log");
        let (a, w, n) = (app.to_string(), app_py.to_str().expect("utf-8").to_string(), WORKERS.to_string());
        let mut args: Vec<&str> = vec![
            "--plugin",
            "python3",
            "--master",
            "--processes",
            &n,
            "--http-socket",
            &a,
            "--wsgi-file",
            &w,
            "--need-app",
            "--die-on-term",
            "--no-orphans",
            "--disable-logging",
            "--memory-report",
            "--stats",
            stats,
        ];
        args.extend_from_slice(extra);
        let child = Command::new("uwsgi")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn uwsgi");
        let mut uwsgi = Uwsgi { proc: util::Proc { child }, app, log };
        // Its stats server listens before shmetrics starts: a first poll that fails would be
        // logged before shmetrics says it serves, which `spawn_shmetrics` takes for a failure.
        util::wait_for(T, &format!("uWSGI's stats server on {stats}"), || {
            if let Some(st) = uwsgi.proc.child.try_wait().expect("try_wait") {
                panic!("uwsgi exited ({st}):\n{}", uwsgi.log());
            }
            let up = if stats.starts_with('/') {
                std::os::unix::net::UnixStream::connect(stats).is_ok()
            } else {
                std::net::TcpStream::connect(stats).is_ok()
            };
            up.then_some(())
        });
        uwsgi
    }

    /// Stops uWSGI (SIGTERM, which `--die-on-term` makes a shutdown) and waits for it.
    fn stop(&mut self) {
        self.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let st = self.proc.wait_timeout(T);
        assert!(st.success() || st.code().is_some(), "uwsgi: {st}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `shmetrics serve --dir TMP/m --config TMP/shmetrics.toml` with `sections` as the file.
fn serve(tmp: &Path, sections: &str) -> util::Served {
    let dir = tmp.join("m");
    let config = tmp.join("shmetrics.toml");
    std::fs::write(&config, sections).expect("config");
    let (d, c) = (dir.to_str().expect("utf-8"), config.to_str().expect("utf-8"));
    util::spawn_shmetrics(&["serve", "--dir", d, "--config", c], &[], tmp)
}

/// The samples of a scrape whose labels include `stats="<stats>"`, by sample name, summed.
fn sum(samples: &std::collections::BTreeMap<String, f64>, name: &str, stats: &str) -> Option<f64> {
    let label = format!("stats=\"{}\"", stats.replace('\\', "\\\\").replace('"', "\\\""));
    let values: Vec<f64> = samples
        .iter()
        .filter(|(k, _)| {
            let (n, labels) = util::split_labels(k);
            n == name && labels.is_some_and(|l| l.split(',').any(|p| p == label))
        })
        .map(|(_, v)| *v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn sample_count(samples: &std::collections::BTreeMap<String, f64>, name: &str, stats: &str) -> usize {
    let label = format!("stats=\"{stats}\"");
    samples.keys().filter(|k| k.starts_with(&format!("{name}{{")) && k.contains(&label)).count()
}

/// Waits until `stats` is up with every worker and no request served yet; returns its failed
/// polls so far.
fn wait_up(served: &util::Served, uwsgi: &mut Uwsgi, stats: &str) -> f64 {
    util::wait_for(T, &format!("uwsgi_up 1 and {WORKERS} idle workers for {stats}"), || {
        if let Some(st) = uwsgi.proc.child.try_wait().expect("try_wait") {
            panic!("uwsgi exited ({st}):\n{}", uwsgi.log());
        }
        let s = util::samples(&util::scrape(served.addr));
        let ready = sum(&s, "uwsgi_up", stats) == Some(1.0)
            && sum(&s, "uwsgi_workers", stats) == Some(WORKERS as f64)
            && sample_count(&s, "uwsgi_worker_requests_total", stats) == WORKERS;
        ready.then(|| sum(&s, "shmetrics_uwsgi_stats_errors_total", stats).expect("errors"))
    })
}

/// Sends exactly `n` requests to the app, each answered 200.
fn send(app: SocketAddr, n: usize) {
    for i in 0..n {
        match try_get(app, "/") {
            Ok((200, body)) => assert_eq!(body, "ok"),
            other => panic!("request {i}: {other:?}"),
        }
    }
}

/// Waits until the workers' `uwsgi_worker_requests_total` add up to exactly `n`.
fn wait_requests(served: &util::Served, stats: &str, n: usize) -> std::collections::BTreeMap<String, f64> {
    util::wait_for(T, &format!("uwsgi_worker_requests_total of {stats} to add up to {n}"), || {
        let s = util::samples(&util::scrape(served.addr));
        (sum(&s, "uwsgi_worker_requests_total", stats) == Some(n as f64)).then_some(s)
    })
}

#[test]
fn uwsgi_stats_on_tcp_counts_every_request_then_goes_down() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stats = format!("127.0.0.1:{}", util::free_port());
    let mut uwsgi = Uwsgi::start(tmp.path(), &stats, &[]);
    let served = serve(
        tmp.path(),
        &format!("[[uwsgi_stats]]\naddress = \"{stats}\"\nname = \"app\"\nfreq_seconds = 0.1\n"),
    );
    let errors_up = wait_up(&served, &mut uwsgi, "app");
    assert_eq!(errors_up, 0.0, "uWSGI's stats server listened before shmetrics started");
    const N: usize = 37;
    send(uwsgi.app, N);
    let s = wait_requests(&served, "app", N);
    assert_eq!(sum(&s, "uwsgi_workers", "app"), Some(WORKERS as f64));
    assert_eq!(sum(&s, "uwsgi_up", "app"), Some(1.0));
    assert_eq!(sum(&s, "uwsgi_worker_exceptions_total", "app"), Some(0.0));
    assert_eq!(sum(&s, "uwsgi_worker_respawn_count_total", "app"), Some(WORKERS as f64));
    // Every response is 2 bytes of body after the same headers: tx is a multiple of N.
    let tx = sum(&s, "uwsgi_worker_transmitted_bytes_total", "app").expect("tx");
    assert!(tx > 0.0 && tx % N as f64 == 0.0, "tx {tx}");
    let busy: f64 = ["busy", "idle", "cheap"]
        .iter()
        .map(|st| sum(&s, &format!("uwsgi_worker_{st}"), "app").expect("status"))
        .sum();
    assert_eq!(busy, WORKERS as f64, "each worker is in exactly one of busy, idle, cheap");
    assert!(sum(&s, "uwsgi_worker_rss_bytes", "app").expect("rss") > 0.0, "--memory-report gives RSS");
    let socket = format!("uwsgi_socket_queue_length{{stats=\"app\",name=\"{}\",proto=\"http\"}}", uwsgi.app);
    assert_eq!(s.get(&socket), Some(&0.0), "{s:?}");
    // Every poll since it was up worked.
    assert_eq!(sum(&s, "shmetrics_uwsgi_stats_errors_total", "app"), Some(errors_up));
    for id in 1..=WORKERS {
        let key = format!("uwsgi_worker_requests_total{{stats=\"app\",worker_id=\"{id}\"}}");
        assert!(s.contains_key(&key), "{key} in {s:?}");
    }

    // The stats server goes away: uwsgi_up 0, errors counted, worker series gone, scrapes answer.
    uwsgi.stop();
    let s = util::wait_for(T, "uwsgi_up 0 and 3 failed polls", || {
        let s = util::samples(&util::scrape(served.addr));
        let errors = sum(&s, "shmetrics_uwsgi_stats_errors_total", "app").unwrap_or(0.0);
        (sum(&s, "uwsgi_up", "app") == Some(0.0) && errors >= errors_up + 3.0).then_some(s)
    });
    assert_eq!(sample_count(&s, "uwsgi_worker_requests_total", "app"), 0, "{s:?}");
    assert_eq!(sum(&s, "uwsgi_workers", "app"), None);
    let polls = sum(&s, "shmetrics_uwsgi_stats_polls_total", "app").expect("polls");
    let errors = sum(&s, "shmetrics_uwsgi_stats_errors_total", "app").expect("errors");
    assert!(polls > errors, "polls {polls}, errors {errors}");
    // Logged, and rate-limited: fewer lines than failed polls.
    let log = std::fs::read_to_string(&served.log).expect("log");
    let lines = log.lines().filter(|l| l.contains(&format!("uWSGI stats server {stats}: "))).count();
    assert!(lines >= 1 && (lines as f64) < errors, "{lines} log lines for {errors} failures:\n{log}");
    assert!(log.contains(&format!("cannot connect to {stats}")), "{log}");
}

#[test]
fn uwsgi_stats_on_a_unix_socket() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("stats.sock");
    let sock = sock.to_str().expect("utf-8");
    let mut uwsgi = Uwsgi::start(tmp.path(), sock, &[]);
    // No name: the label is the address.
    let served = serve(tmp.path(), &format!("[[uwsgi_stats]]\naddress = \"{sock}\"\nfreq_seconds = 0.1\n"));
    wait_up(&served, &mut uwsgi, sock);
    send(uwsgi.app, 11);
    let s = wait_requests(&served, sock, 11);
    assert_eq!(sum(&s, "uwsgi_workers", sock), Some(WORKERS as f64));
    uwsgi.stop();
}

#[test]
fn uwsgi_stats_http() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stats = format!("127.0.0.1:{}", util::free_port());
    let mut uwsgi = Uwsgi::start(tmp.path(), &stats, &["--stats-http"]);
    // The same server twice: asked over HTTP it answers, asked plainly it waits for a request.
    let served = serve(
        tmp.path(),
        &format!(
            "[[uwsgi_stats]]\naddress = \"{stats}\"\nname = \"http\"\nhttp = true\nfreq_seconds = 0.1\n\n\
             [[uwsgi_stats]]\naddress = \"{stats}\"\nname = \"plain\"\nfreq_seconds = 0.1\ntimeout_seconds = 0.3\n"
        ),
    );
    let errors_up = wait_up(&served, &mut uwsgi, "http");
    send(uwsgi.app, 23);
    wait_requests(&served, "http", 23);
    let s = util::wait_for(T, "failed plain polls", || {
        let s = util::samples(&util::scrape(served.addr));
        (sum(&s, "shmetrics_uwsgi_stats_errors_total", "plain").unwrap_or(0.0) >= 2.0).then_some(s)
    });
    assert_eq!(sum(&s, "uwsgi_up", "plain"), Some(0.0));
    assert_eq!(sum(&s, "uwsgi_up", "http"), Some(1.0));
    assert_eq!(sum(&s, "shmetrics_uwsgi_stats_errors_total", "http"), Some(errors_up));
    uwsgi.stop();
}

/// A hostile stats server on 127.0.0.1: each connection is handed to `f` on a thread of its own.
/// Stops accepting when dropped.
struct Hostile {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Hostile {
    fn start(f: fn(std::net::TcpStream)) -> Hostile {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            for s in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(s) = s {
                    std::thread::spawn(move || f(s));
                }
            }
        });
        Hostile { addr, stop }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop
    }
}

#[test]
fn hostile_stats_servers_never_hang_a_scrape_and_are_counted() {
    let silent = Hostile::start(|mut s| {
        // Accepts and never answers; holds the connection until the poller gives up.
        let _ = s.read(&mut [0u8; 1]);
    });
    let garbage = Hostile::start(|mut s| {
        let _ = s.write_all(b"\x00\xffthis is not JSON\n");
    });
    let endless = Hostile::start(|mut s| {
        let chunk = vec![b'['; 1 << 16];
        while s.write_all(&chunk).is_ok() {}
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let section = |name: &str, addr: SocketAddr| {
        format!("[[uwsgi_stats]]\naddress = \"{addr}\"\nname = \"{name}\"\nfreq_seconds = 0.1\ntimeout_seconds = 0.5\n")
    };
    let config =
        [section("silent", silent.addr), section("garbage", garbage.addr), section("endless", endless.addr)]
            .join("\n");
    let served = serve(tmp.path(), &config);
    let s = util::wait_for(T, "two failed polls of each hostile server", || {
        let s = util::samples(&util::scrape(served.addr));
        let all = ["silent", "garbage", "endless"]
            .iter()
            .all(|n| sum(&s, "shmetrics_uwsgi_stats_errors_total", n).unwrap_or(0.0) >= 2.0);
        all.then_some(s)
    });
    for n in ["silent", "garbage", "endless"] {
        assert_eq!(sum(&s, "uwsgi_up", n), Some(0.0), "{n}");
        assert_eq!(sum(&s, "uwsgi_workers", n), None, "{n}");
        // Every poll ended (failed): none is stuck.
        let polls = sum(&s, "shmetrics_uwsgi_stats_polls_total", n).expect("polls");
        let errors = sum(&s, "shmetrics_uwsgi_stats_errors_total", n).expect("errors");
        assert!((polls - errors).abs() <= 1.0, "{n}: polls {polls}, errors {errors}");
    }
    let log = std::fs::read_to_string(&served.log).expect("log");
    for needle in ["no complete reply within 0.5 s", "not uWSGI's stats JSON", "longer than 16 MiB"] {
        assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
    }
    // Scrapes keep answering while all of them fail.
    util::scrape(served.addr);
}

/// `shmetrics serve --config FILE` that must refuse to start: its exit status and stderr.
fn refused_at_start(tmp: &Path, config: &str) -> (Option<i32>, String) {
    let path = tmp.join("bad.toml");
    std::fs::write(&path, config).expect("config");
    let out = Command::new(util::shmetrics_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0", "--dir"])
        .arg(tmp.join("m-bad"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run shmetrics");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn uwsgi_stats_sections_are_checked_at_start_and_reloaded_on_sighup() {
    use nix::sys::signal::Signal;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, err) = refused_at_start(tmp.path(), "[[uwsgi_stats]]\naddress = \"localhost\"\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("address = \"localhost\": write host:port"), "{err}");
    let (code, err) =
        refused_at_start(tmp.path(), "[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\nfreq_seconds = 0\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("freq_seconds = 0 is not allowed"), "{err}");

    // A stats server answering with the reply recorded from uWSGI 2.0.21 (2 workers: 1 + 4
    // requests).
    let recorded = Hostile::start(|mut s| {
        let _ = s.write_all(include_bytes!("../data/uwsgi-2.0.21-stats.json"));
    });
    let section = |name: &str| {
        format!("[[uwsgi_stats]]\naddress = \"{}\"\nname = \"{name}\"\nfreq_seconds = 0.1\n", recorded.addr)
    };
    let served = serve(tmp.path(), &section("a"));
    let config = tmp.path().join("shmetrics.toml");
    let scrape = || util::samples(&util::scrape(served.addr));
    let s = util::wait_for(T, "a polled", || {
        let s = scrape();
        (sum(&s, "uwsgi_up", "a") == Some(1.0)).then_some(s)
    });
    assert_eq!(sum(&s, "uwsgi_worker_requests_total", "a"), Some(5.0));
    assert_eq!(s.get("uwsgi_worker_requests_total{stats=\"a\",worker_id=\"2\"}"), Some(&4.0));
    assert_eq!(
        s.get("uwsgi_worker_average_response_time_seconds{stats=\"a\",worker_id=\"1\"}"),
        Some(&0.000547)
    );
    let polls_before = sum(&s, "shmetrics_uwsgi_stats_polls_total", "a").expect("polls");

    // A bad file (two sections labelled "a") is refused; the old configuration stays.
    std::fs::write(&config, [section("a"), section("a")].join("\n")).expect("config");
    served.proc.signal(Signal::SIGHUP);
    let line = util::wait_for(T, "the refusal in the log", || {
        let log = std::fs::read_to_string(&served.log).ok()?;
        log.lines().find(|l| l.contains("keeping the configuration in force")).map(str::to_string)
    });
    assert!(line.contains("two sections are named \"a\""), "{line}");

    // A good file adds "b": "a" keeps its poller (its counters never go back).
    std::fs::write(&config, [section("a"), section("b")].join("\n")).expect("config");
    served.proc.signal(Signal::SIGHUP);
    let s = util::wait_for(T, "b polled", || {
        let s = scrape();
        (sum(&s, "uwsgi_up", "b") == Some(1.0)).then_some(s)
    });
    let polls = sum(&s, "shmetrics_uwsgi_stats_polls_total", "a").expect("polls");
    assert!(polls >= polls_before, "a's polls went back from {polls_before} to {polls}");
    assert_eq!(sum(&s, "uwsgi_worker_requests_total", "b"), Some(5.0));
    assert_eq!(sum(&s, "uwsgi_worker_requests_total", "a"), Some(5.0));

    // "a" removed: its series go, "b" stays.
    std::fs::write(&config, section("b")).expect("config");
    served.proc.signal(Signal::SIGHUP);
    let s = util::wait_for(T, "a gone", || {
        let s = scrape();
        (sum(&s, "shmetrics_uwsgi_stats_polls_total", "a").is_none()).then_some(s)
    });
    assert_eq!(sum(&s, "uwsgi_up", "a"), None);
    assert_eq!(sum(&s, "uwsgi_up", "b"), Some(1.0));
}
