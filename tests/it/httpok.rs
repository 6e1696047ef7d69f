//! httpok end to end: a real HTTP application (Python's http.server) that can be told to hang,
//! answer 500 or answer without the expected text, run under `shmetrics run` or signalled through
//! a pid file under `shmetrics serve`; the application records every signal it gets, a command
//! action records every alarm, and the counters are read from /metrics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util;

const T: Duration = Duration::from_secs(30);

/// The application: `app.py PORT CONTROL SIGNALS PIDFILE`. Each GET of `/health` takes the first
/// word of the file CONTROL (none: `ok`) and answers accordingly: `ok` (200, "all is well"),
/// `hang` (accepts, reads the request, never answers), `500` (500, "all is well"), `nobody`
/// (200, "hello"). Any other path answers `ok`. Every SIGHUP and SIGUSR1 is appended to SIGNALS;
/// its pid goes to PIDFILE once it listens.
const APP: &str = r#"
import http.server, os, signal, sys, threading, time
port, control, signals, pidfile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lock = threading.Lock()

def on_signal(num, frame):
    with open(signals, "a") as f:
        f.write(signal.Signals(num).name + "\n")

for s in (signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, on_signal)

def next_answer():
    with lock:
        try:
            with open(control) as f:
                words = f.read().split()
        except FileNotFoundError:
            words = []
        if not words:
            return "ok"
        with open(control + ".tmp", "w") as f:
            f.write(" ".join(words[1:]))
        os.replace(control + ".tmp", control)
        return words[0]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *args):
        pass
    def do_GET(self):
        kind = next_answer() if self.path == "/health" else "ok"
        if kind == "hang":
            time.sleep(3600)
            return
        status, body = {"ok": (200, b"all is well"), "500": (500, b"all is well"), "nobody": (200, b"hello")}[kind]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

server = Server(("127.0.0.1", port), Handler)
with open(pidfile + ".tmp", "w") as f:
    f.write("%d\n" % os.getpid())
os.replace(pidfile + ".tmp", pidfile)
server.serve_forever()
"#;

struct Setup {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    app: PathBuf,
    control: PathBuf,
    signals: PathBuf,
    pidfile: PathBuf,
    alarms: PathBuf,
    config: PathBuf,
    port: u16,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| tmp.path().join(n);
    let dir = p("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(p("app.py"), APP).expect("app");
    let s = Setup {
        dir,
        app: p("app.py"),
        control: p("control"),
        signals: p("signals"),
        pidfile: p("app.pid"),
        alarms: p("alarms.txt"),
        config: p("shmetrics.toml"),
        port: util::free_port(),
        tmp,
    };
    std::fs::write(&s.control, "").expect("control");
    s
}

impl Setup {
    /// Writes the configuration: an action `file` appending each alarm to `alarms`, then `rules`.
    fn config(&self, rules: &str) {
        let out = self.alarms.display();
        let text = format!(
            "[actions.file]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> '{out}'; echo >> '{out}'\"]\n\
             timeout_seconds = 5\nretries = 1\n\n{rules}"
        );
        std::fs::write(&self.config, text).expect("config");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn app_args(&self) -> Vec<String> {
        let s = |p: &Path| p.to_str().expect("utf-8").to_string();
        vec![
            "python3".into(),
            s(&self.app),
            self.port.to_string(),
            s(&self.control),
            s(&self.signals),
            s(&self.pidfile),
        ]
    }

    /// `shmetrics run --config … -- python3 app.py …`.
    fn run(&self) -> util::Served {
        let mut args: Vec<String> =
            ["run", "--dir", self.dir.to_str().expect("utf-8")].map(String::from).to_vec();
        args.extend(["--config".into(), self.config.to_str().expect("utf-8").into(), "--".into()]);
        args.extend(self.app_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        util::spawn_shmetrics(&args, &[], self.tmp.path())
    }

    fn app_pid(&self) -> i32 {
        util::wait_for(T, "the application's pid file", || {
            std::fs::read_to_string(&self.pidfile).ok().and_then(|t| t.trim().parse().ok())
        })
    }

    fn signals(&self) -> String {
        std::fs::read_to_string(&self.signals).unwrap_or_default()
    }

    fn alarms(&self) -> String {
        std::fs::read_to_string(&self.alarms).unwrap_or_default()
    }
}

fn metrics(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    util::samples(&util::scrape(addr))
}

fn checks(m: &std::collections::BTreeMap<String, f64>, url: &str, result: &str) -> f64 {
    let key = format!("shmetrics_httpok_checks_total{{url=\"{url}\",result=\"{result}\"}}");
    *m.get(&key).unwrap_or_else(|| panic!("no {key} in {m:?}"))
}

fn get(m: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:?}"))
}

/// Waits until `url` has at least `n` ok checks (and so has stopped failing), returns /metrics.
fn wait_ok(addr: SocketAddr, url: &str, n: f64) -> std::collections::BTreeMap<String, f64> {
    util::wait_for(T, &format!("{n} ok checks of {url}"), || {
        let m = metrics(addr);
        let key = format!("shmetrics_httpok_checks_total{{url=\"{url}\",result=\"ok\"}}");
        (m.get(&key).copied().unwrap_or(0.0) >= n).then_some(m)
    })
}

#[test]
fn a_hung_application_under_run_gets_the_signal_once_within_grace() {
    let s = setup();
    let (health, other) = (s.url("/health"), s.url("/other"));
    s.config(&format!(
        "[[httpok]]\nurl = \"{health}\"\ninterval_seconds = 0.2\ntimeout_seconds = 0.5\nstart_seconds = 2\n\
         expect_body = \"is well\"\nfailures = 3\nsignal = \"SIGHUP\"\ngrace_seconds = 600\nactions = [\"file\"]\n\n\
         [[httpok]]\nurl = \"{other}\"\ninterval_seconds = 0.2\ntimeout_seconds = 0.5\nstart_seconds = 2\n\
         actions = [\"file\"]\n"
    ));
    // Five hangs (the third acts, the next two are within grace), a 500 and a body without the
    // text (still in a row: within grace), an answer that passes (the count starts again), then
    // two 500s: two in a row, fewer than three, no act.
    std::fs::write(&s.control, "hang hang hang hang hang 500 nobody ok 500 500").expect("control");
    let served = s.run();
    let pid = s.app_pid();
    let m = util::wait_for(T, "the control words to be used up and two more ok checks", || {
        let left = std::fs::read_to_string(&s.control).unwrap_or_default();
        if !left.trim().is_empty() {
            return None;
        }
        let m = metrics(served.addr);
        (checks(&m, &health, "ok") >= 3.0).then_some(m)
    });
    assert_eq!(checks(&m, &health, "timeout"), 5.0);
    assert_eq!(checks(&m, &health, "status"), 3.0);
    assert_eq!(checks(&m, &health, "body"), 1.0);
    assert_eq!(checks(&m, &health, "connect_error"), 0.0);
    assert_eq!(checks(&m, &health, "protocol_error"), 0.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signals_total{{url=\"{health}\"}}")), 1.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signal_errors_total{{url=\"{health}\"}}")), 0.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_up{{url=\"{health}\"}}")), 1.0);
    assert_eq!(get(&m, "shmetrics_alarms_suppressed_total{kind=\"httpok\"}"), 4.0);
    // The other URL of the same application was never held up by the hanging checks.
    assert!(checks(&m, &other, "ok") >= 10.0, "{m:?}");
    for r in ["connect_error", "timeout", "status", "body", "protocol_error"] {
        assert_eq!(checks(&m, &other, r), 0.0, "{r}");
    }
    assert_eq!(get(&m, &format!("shmetrics_httpok_up{{url=\"{other}\"}}")), 1.0);
    assert_eq!(s.signals(), "SIGHUP\n", "exactly one signal");
    let text = util::wait_for(T, "the alarm", || {
        let a = s.alarms();
        a.contains("in a row").then_some(a)
    });
    util::wait_for(T, "the alarm's delivery to be counted", || {
        let m = metrics(served.addr);
        (get(&m, "shmetrics_alarms_fired_total{kind=\"httpok\",action=\"file\"}") == 1.0).then_some(())
    });
    assert_eq!(text.matches("in a row").count(), 1, "one alarm: {text}");
    assert!(
        text.contains(&format!(
            "GET {health}: 3 failed checks in a row, the last: no answer within 0.5 s; sent SIGHUP to pid {pid}"
        )),
        "{text}"
    );
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(log.contains("no signal and no alarm within grace_seconds = 600 of the last"), "{log}");
}

#[test]
fn a_refused_connection_signals_the_pid_files_process_under_serve() {
    let s = setup();
    // The application listens on its own port; the URL names one where nobody listens (yet).
    let app_port = util::free_port();
    let mut app_args = s.app_args();
    app_args[2] = app_port.to_string();
    let app = util::Proc {
        child: std::process::Command::new(&app_args[0]).args(&app_args[1..]).spawn().expect("python3"),
    };
    let pid = s.app_pid();
    assert_eq!(pid, app.pid());
    let url = s.url("/health");
    let rules = format!(
        "[[httpok]]\nurl = \"{url}\"\ninterval_seconds = 0.2\ntimeout_seconds = 1\nfailures = 2\n\
         signal = \"SIGUSR1\"\npidfile = \"{}\"\ngrace_seconds = 600\nactions = [\"file\"]\n",
        s.pidfile.display()
    );
    s.config(&rules);
    let d = s.dir.to_str().expect("utf-8");
    let c = s.config.to_str().expect("utf-8");
    let served = util::spawn_shmetrics(&["serve", "--dir", d, "--config", c], &[], s.tmp.path());
    util::wait_for(T, "the signal", || (s.signals() == "SIGUSR1\n").then_some(()));
    // Now something answers there: the failures stop.
    let listener = std::net::TcpListener::bind(("127.0.0.1", s.port)).expect("rebind the URL's port");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            use std::io::{Read, Write};
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let m = wait_ok(served.addr, &url, 2.0);
    let refused = checks(&m, &url, "connect_error");
    assert!(refused >= 2.0, "{m:?}");
    assert_eq!(checks(&m, &url, "timeout"), 0.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signals_total{{url=\"{url}\"}}")), 1.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signal_errors_total{{url=\"{url}\"}}")), 0.0);
    assert_eq!(get(&m, "shmetrics_alarms_suppressed_total{kind=\"httpok\"}"), refused - 2.0);
    assert_eq!(s.signals(), "SIGUSR1\n");
    let text = util::wait_for(T, "the alarm", || {
        let a = s.alarms();
        a.contains("in a row").then_some(a)
    });
    assert!(
        text.contains(&format!(
            "GET {url}: 2 failed checks in a row, the last: cannot connect to 127.0.0.1:{}: Connection \
             refused (os error 111); sent SIGUSR1 to pid {pid}",
            s.port
        )),
        "{text}"
    );

    // A reload with a signal and no pid file is refused under serve: the rule in force stays.
    s.config(&rules.replace(&format!("pidfile = \"{}\"\n", s.pidfile.display()), ""));
    served.proc.signal(Signal::SIGHUP);
    let log = util::wait_for(T, "the refusal in the log", || {
        std::fs::read_to_string(&served.log).ok().filter(|l| l.contains("keeping the configuration in force"))
    });
    assert!(log.contains("has signal = \"SIGUSR1\" but nothing to send it to"), "{log}");
    let before = checks(&metrics(served.addr), &url, "ok");
    wait_ok(served.addr, &url, before + 2.0);

    // A changed rule restarts with its counters kept; a removed one's series go.
    s.config(&rules.replace("timeout_seconds = 1\n", "timeout_seconds = 2\n"));
    served.proc.signal(Signal::SIGHUP);
    util::wait_for(T, "the reload in the log", || {
        std::fs::read_to_string(&served.log).ok().filter(|l| l.contains("configuration reloaded"))
    });
    let before = checks(&metrics(served.addr), &url, "ok");
    let m = wait_ok(served.addr, &url, before + 2.0);
    assert_eq!(checks(&m, &url, "connect_error"), refused);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signals_total{{url=\"{url}\"}}")), 1.0);
    s.config("");
    served.proc.signal(Signal::SIGHUP);
    util::wait_for(T, "the httpok series to go", || {
        (!util::scrape(served.addr).contains("shmetrics_httpok_")).then_some(())
    });
    drop(app);
}

#[test]
fn serve_refuses_a_signal_without_a_pidfile_at_start() {
    let s = setup();
    s.config(&format!("[[httpok]]\nurl = \"{}\"\nsignal = \"SIGHUP\"\n", s.url("/")));
    let out = std::process::Command::new(util::shmetrics_bin())
        .args(["serve", "--dir", s.dir.to_str().expect("utf-8"), "--listen", "127.0.0.1:0"])
        .args(["--monitor", "127.0.0.1:0", "--config", s.config.to_str().expect("utf-8")])
        .output()
        .expect("run shmetrics");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "shmetrics: error: {}: [[httpok]] url = \"{}\" has signal = \"SIGHUP\" but nothing to send \
             it to: under `shmetrics serve` there is no command, so give pidfile = \"/path/to/app.pid\", \
             or run the application under `shmetrics run`",
            s.config.display(),
            s.url("/")
        )),
        "{err}"
    );
}

/// A WSGI application for gunicorn: `/health` hangs (30 s) while the file `$HTTPOK_CONTROL` says
/// `hang`, and every answer is the pid of the worker that gave it.
const WSGI_APP: &str = r#"
import os, time
CONTROL = os.environ["HTTPOK_CONTROL"]

def app(environ, start_response):
    if environ["PATH_INFO"] == "/health":
        try:
            with open(CONTROL) as f:
                hang = f.read().strip() == "hang"
        except FileNotFoundError:
            hang = False
        if hang:
            time.sleep(5)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"#;

#[test]
fn gunicorn_hung_workers_are_replaced_by_a_graceful_reload() {
    use crate::python_servers as ps;
    let gunicorn = ps::require_gunicorn();
    let s = setup();
    let app_dir = s.tmp.path().join("wsgi");
    std::fs::create_dir(&app_dir).expect("mkdir");
    std::fs::write(app_dir.join("hangapp.py"), WSGI_APP).expect("app");
    let health = s.url("/health");
    s.config(&format!(
        "[[httpok]]\nurl = \"{health}\"\ninterval_seconds = 0.2\ntimeout_seconds = 0.5\nstart_seconds = 4\n\
         failures = 2\nsignal = \"SIGHUP\"\ngrace_seconds = 600\nactions = [\"file\"]\n"
    ));
    let bind = format!("127.0.0.1:{}", s.port);
    let pidfile = s.pidfile.to_str().expect("utf-8").to_string();
    let args = [
        "run",
        "--dir",
        ps::s(&s.dir),
        "--config",
        ps::s(&s.config),
        "--",
        ps::s(&gunicorn),
        "--workers",
        "2",
        "--bind",
        &bind,
        "--graceful-timeout",
        "1",
        "--pid",
        &pidfile,
        "--chdir",
        ps::s(&app_dir),
        "hangapp:app",
    ];
    let control = s.control.to_str().expect("utf-8");
    let served = util::spawn_shmetrics(&args, &[("HTTPOK_CONTROL", control)], s.tmp.path());
    let master = s.app_pid();
    wait_ok(served.addr, &health, 1.0);
    let old = util::wait_for(T, "two workers", || {
        let w = ps::children_of(master);
        (w.len() == 2).then_some(w)
    });
    std::fs::write(&s.control, "hang").expect("control");
    util::wait_for(T, "the signal", || {
        let m = metrics(served.addr);
        (get(&m, &format!("shmetrics_httpok_signals_total{{url=\"{health}\"}}")) == 1.0).then_some(())
    });
    std::fs::write(&s.control, "").expect("control");
    let m = wait_ok(served.addr, &health, 2.0);
    // The master reloaded gracefully: same master, two new workers, none of the hung ones left.
    let new = util::wait_for(T, "two new workers, the hung ones gone", || {
        let w = ps::children_of(master);
        (w.len() == 2 && w.iter().all(|p| !old.contains(p))).then_some(w)
    });
    assert_eq!(s.app_pid(), master);
    let (status, body) = ps::try_get(([127, 0, 0, 1], s.port).into(), "/").expect("GET /");
    assert_eq!(status, 200);
    let answered: i32 = body.trim().parse().expect("pid");
    assert!(new.contains(&answered), "answered by {answered}, workers {new:?}");
    assert!(checks(&m, &health, "timeout") >= 2.0, "{m:?}");
    assert_eq!(checks(&m, &health, "connect_error"), 0.0);
    assert_eq!(get(&m, &format!("shmetrics_httpok_signals_total{{url=\"{health}\"}}")), 1.0);
    let text = util::wait_for(T, "the alarm", || {
        let a = s.alarms();
        a.contains("in a row").then_some(a)
    });
    assert!(text.contains(&format!("; sent SIGHUP to pid {master}")), "{text}");
}
