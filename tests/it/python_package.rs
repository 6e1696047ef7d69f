//! The `shmetrics` Python package (python/: PyO3 over the writer) under real servers: gunicorn
//! (4 workers, `preload_app` on and off) and uWSGI (4 processes, `lazy-apps` on and off) run
//! `tests/python/pkg_app.py` behind `shmetrics run`.
//!
//! Checked: every worker writes a file of its own (the writer's fork handling fires for Python's
//! `os.fork` and for uWSGI's C `fork()`, whether the app was loaded before or after it); exact
//! counts after N requests and after SIGKILLing workers; each SIGKILLed worker raises exactly one
//! crash alarm naming its pid, while a worker that the server stops gracefully exits cleanly and
//! raises none; `shmetrics.set_ready` drives `/healthz`.
//!
//! Requirements (installed by `.ci/run`): the package installed in `$SHMETRICS_TEST_PYTHON`'s venv
//! (`pip install ./python`), gunicorn there, Debian's uWSGI with its python3 plugin. uWSGI's
//! plugin embeds Debian's python3 and finds the package through `pythonpath` (the extension is
//! abi3: it loads into any CPython >= 3.10). A missing one fails the test with instructions.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::python_servers::{self as ps, Expo, LONG};
use crate::run_cmd::RunProc;
use crate::typed_metrics as typed;
use crate::util;

const WORKERS: usize = 4;

/// The site-packages directory holding the `shmetrics` package of `$SHMETRICS_TEST_PYTHON`.
fn require_package() -> String {
    ps::python_says(
        "import os, shmetrics, shmetrics._native; print(os.path.dirname(os.path.dirname(shmetrics.__file__)))",
        "the shmetrics Python package is not installed in $SHMETRICS_TEST_PYTHON's venv: run \
         `bash .ci/run`, or `$SHMETRICS_TEST_PYTHON -m pip install ./python`",
    )
}

#[derive(Clone, Copy, Debug)]
enum Server {
    /// gunicorn with `preload_app` on or off.
    Gunicorn { preload: bool },
    /// uWSGI with `lazy-apps` on or off.
    Uwsgi { lazy: bool },
}

/// A temporary directory with the alarm configuration (crash → append to `alarms.txt`).
struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("alarms.txt");
        let config = format!(
            "check_interval_seconds = 0.5\n\n[actions.file]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \
             \"cat >> '{0}'; echo >> '{0}'\"]\ntimeout_seconds = 5\nretries = 1\n\n[crash]\nactions = [\"file\"]\n",
            out.display()
        );
        std::fs::write(tmp.path().join("shmetrics.toml"), config).expect("config");
        Setup { tmp }
    }
    fn path(&self, name: &str) -> String {
        self.tmp.path().join(name).to_str().expect("utf-8").to_string()
    }
    fn alarms(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("alarms.txt")).unwrap_or_default()
    }
}

/// `shmetrics run --config … [run_opts] -- <server running pkg_app>`.
fn start(server: Server, setup: &Setup, run_opts: &[&str]) -> (RunProc, SocketAddr) {
    let site = require_package();
    let root = ps::root();
    let app_dir = root.join("tests/python");
    let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
    let bind = app.to_string();
    let config = setup.path("shmetrics.toml");
    let mut args = vec!["run", "--config", &config, "--upkeep-interval", "0.2"];
    args.extend_from_slice(run_opts);
    args.push("--");
    let (conf, gunicorn);
    let workers = WORKERS.to_string();
    match server {
        Server::Gunicorn { preload } => {
            // The repository's configuration, with preload_app as asked.
            let base = root.join("conf/gunicorn.conf.py");
            conf = setup.path("gunicorn.conf.py");
            let py = if preload { "True" } else { "False" };
            let text = format!("exec(open({:?}).read())\npreload_app = {py}\n", ps::s(&base));
            std::fs::write(&conf, text).expect("gunicorn conf");
            gunicorn = ps::require_gunicorn();
            args.extend([ps::s(&gunicorn), "-c", &conf, "--chdir", ps::s(&app_dir)]);
            args.extend(["--bind", &bind, "--workers", &workers, "pkg_app:app"]);
        }
        Server::Uwsgi { lazy } => {
            let (uwsgi, _) = ps::require_uwsgi();
            conf = setup.path("uwsgi.ini");
            let text = format!(
                "[uwsgi]\nplugins = python3\nchdir = {}\nmodule = pkg_app:application\npythonpath = {site}\n\
                 need-app = true\nstrict = true\nmaster = true\nprocesses = {WORKERS}\nhttp-socket = {bind}\n\
                 die-on-term = true\nno-orphans = true\nsingle-interpreter = true\nenable-threads = true\n\
                 disable-logging = true\nlazy-apps = {lazy}\n",
                ps::s(&app_dir)
            );
            std::fs::write(&conf, text).expect("uwsgi ini");
            gunicorn = uwsgi.into();
            args.extend([ps::s(&gunicorn), "--ini", &conf]);
        }
    }
    let server_name = if matches!(server, Server::Gunicorn { .. }) { "gunicorn" } else { "uwsgi" };
    (ps::start(&args, &[("PKG_SERVER", server_name)], setup.tmp.path()), app)
}

/// GET `/pid` until the answer is `pid file`; checks that the worker writes a file of its own.
fn pid_of_answer(app: SocketAddr, master: i32) -> i32 {
    let (st, body) = ps::try_get(app, "/pid").unwrap_or_else(|e| panic!("GET /pid: {e}"));
    assert_eq!(st, 200, "{body}");
    let (pid, file) = body.trim().split_once(' ').unwrap_or_else(|| panic!("/pid answered {body:?}"));
    let pid: i32 = pid.parse().expect("pid");
    assert_ne!(pid, master, "/pid answers from a worker, not the master");
    let name = Path::new(file).file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(name.starts_with(&format!("w-{pid}-")), "worker {pid} writes a file of its own, not {file:?}");
    pid
}

fn req(e: &Expo, path: &str) -> f64 {
    e.must("pkg_requests_total", &[("path", path)])
}

fn crashes(text: &str) -> usize {
    text.matches("exited without a clean exit").count()
}

/// Exact counts, SIGKILLed workers (exact after each, one crash alarm each naming the pid), and a
/// worker stopped gracefully by the server (a clean exit: no alarm).
fn exact_through_kills(server: Server) {
    let setup = Setup::new();
    let (mut run, app) = start(server, &setup, &[]);
    let what = format!("{server:?}");
    let master = run.child_pid;
    let mut pid_probes = ps::wait_workers(app, &mut run, WORKERS);
    for _ in 0..8 {
        pid_of_answer(app, master);
        pid_probes += 1;
    }

    let answered = ps::send_all(app, &["/"; 200], 4);
    assert_eq!(answered.get(&("/".into(), 200)), Some(&200), "{what}: {answered:?}");
    util::assert_openmetrics_parses(run.addr);
    let e = ps::scrape(run.addr);
    assert_eq!(req(&e, "/"), 200.0, "{what}");
    assert_eq!(req(&e, "/pid"), pid_probes as f64, "{what}");
    assert_eq!(e.must("pkg_request_seconds_count", &[("path", "/")]), 200.0, "{what}");
    assert_eq!(e.must("pkg_request_seconds_bucket", &[("path", "/"), ("le", "+Inf")]), 200.0, "{what}");
    let sum = e.must("pkg_request_seconds_sum", &[("path", "/")]);
    assert!(sum > 0.0 && sum < 200.0, "{what}: sum of 200 latencies {sum}");
    assert_eq!(e.must("pkg_in_flight", &[]), 0.0, "{what}");
    assert_eq!(e.must("pkg_up", &[]), 1.0, "{what}");
    // Every answer was a 200, each observed once in the summary.
    assert_eq!(e.must("pkg_payload_bytes_count", &[]), (200 + pid_probes) as f64, "{what}");
    assert_eq!(e.types.get("pkg_payload_bytes").map(String::as_str), Some("summary"), "{what}");
    assert_eq!(e.types.get("pkg_request_seconds").map(String::as_str), Some("histogram"), "{what}");
    assert_eq!(
        e.types.get("pkg_requests_total").map(String::as_str),
        Some("counter"),
        "{what}: {:?}",
        e.types
    );

    // SIGKILL the worker that answered the 15th /pid of a round: it is idle (it counted the
    // request before answering it, and the answer was read to its end), and the next request is
    // sent once it is dead, so the counts equal the answered requests exactly after each kill.
    let mut killed = Vec::new();
    for round in 0..2 {
        let mut pid = 0;
        for _ in 0..15 {
            pid = pid_of_answer(app, master);
            pid_probes += 1;
        }
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill worker");
        ps::wait_dead(pid);
        killed.push(pid);
        let e = ps::scrape(run.addr);
        assert_eq!(req(&e, "/pid"), pid_probes as f64, "{what}: round {round}, killed {killed:?}");
        assert_eq!(e.must("pkg_request_seconds_count", &[("path", "/pid")]), pid_probes as f64, "{what}");
        assert_eq!(req(&e, "/"), 200.0, "{what}");
        let alarm = format!("pid {pid} exited without a clean exit");
        util::wait_for(LONG, &format!("{what}: the crash alarm of {pid}"), || {
            setup.alarms().contains(&alarm).then_some(())
        });
    }

    // A graceful stop of one worker (gunicorn: SIGTERM to the worker; uWSGI: SIGHUP to the
    // worker, "gracefully reload"): the worker exits normally, the clean-exit flag is set, and no
    // alarm follows. The server replaces it.
    let victim = ps::children_of(master).into_iter().find(|p| !killed.contains(p)).expect("a live worker");
    let sig = if matches!(server, Server::Gunicorn { .. }) { Signal::SIGTERM } else { Signal::SIGHUP };
    kill(Pid::from_raw(victim), sig).expect("signal worker");
    ps::wait_dead(victim);
    util::wait_for(LONG, &format!("{what}: the 3 dead workers folded"), || {
        let s = util::samples(&util::scrape(run.addr));
        (s.get("shmetrics_workers_dead_total").copied().unwrap_or(0.0) >= 3.0).then_some(s)
    });
    std::thread::sleep(Duration::from_millis(1500)); // two alarm checks
    let s = util::samples(&util::scrape(run.addr));
    assert_eq!(
        s.get("shmetrics_workers_crashed_total"),
        Some(&2.0),
        "{what}: only the SIGKILLed ones crashed"
    );
    let text = setup.alarms();
    assert_eq!(
        crashes(&text),
        2,
        "{what}: one alarm per SIGKILLed worker {killed:?}, none for {victim}:\n{text}"
    );
    assert!(!text.contains(&format!("pid {victim} ")), "{what}: {text}");

    // And the totals are still exact, through the replacement workers.
    let answered = ps::send_all(app, &["/"; 40], 2);
    assert_eq!(answered.get(&("/".into(), 200)), Some(&40), "{what}: {answered:?}");
    let e = ps::scrape(run.addr);
    assert_eq!(req(&e, "/"), 240.0, "{what}");
    assert_eq!(req(&e, "/pid"), pid_probes as f64, "{what}");
    ps::stop(run);
}

#[test]
fn gunicorn_preload_exact_counts_and_crash_alarms() {
    exact_through_kills(Server::Gunicorn { preload: true });
}

#[test]
fn gunicorn_no_preload_exact_counts_and_crash_alarms() {
    exact_through_kills(Server::Gunicorn { preload: false });
}

#[test]
fn uwsgi_exact_counts_and_crash_alarms() {
    exact_through_kills(Server::Uwsgi { lazy: false });
}

#[test]
fn uwsgi_lazy_apps_exact_counts_and_crash_alarms() {
    exact_through_kills(Server::Uwsgi { lazy: true });
}

/// `/healthz` body once it contains `needle`.
fn wait_health(run: &RunProc, needle: &str) -> (u16, String) {
    util::wait_for(LONG, &format!("/healthz saying {needle:?}"), || {
        let r = util::http_get(run.addr, "/healthz", &[]);
        let text = r.text();
        text.contains(needle).then_some((r.status, text))
    })
}

#[test]
fn set_ready_drives_healthz_and_info_and_enum_are_exposed() {
    let setup = Setup::new();
    let (mut run, app) = start(Server::Gunicorn { preload: false }, &setup, &["--min-workers", "2"]);
    ps::wait_workers(app, &mut run, WORKERS);
    // Alive but not ready: the app has not called set_ready yet.
    let (status, _) = wait_health(&run, "Only 0 of 2 required workers are ready");
    assert_eq!(status, 503);
    let (st, first) = ps::try_get(app, "/ready").expect("GET /ready");
    assert_eq!(st, 200);
    let (status, _) = wait_health(&run, "Only 1 of 2 required workers are ready");
    assert_eq!(status, 503, "one worker ({first:?}) is ready");
    // Until a second worker has answered /ready.
    let mut ready = std::collections::BTreeSet::from([first.trim().to_string()]);
    for _ in 0..400 {
        if ready.len() >= 2 {
            break;
        }
        let (st, body) = ps::try_get(app, "/ready").expect("GET /ready");
        assert_eq!(st, 200);
        ready.insert(body.trim().to_string());
    }
    assert_eq!(ready.len(), 2, "two workers answered /ready within 400 requests");
    let (status, text) = wait_health(&run, "OK");
    assert_eq!((status, text.trim()), (200, "OK"), "ready: {ready:?}");

    // Info and Enum, read by prometheus_client's parsers: OpenMetrics `info` and `stateset`, and
    // their 0.0.4 gauge forms. Every worker set the same info at import and the enum to
    // "starting"; the /ready answers set it to "serving" later: the last set by a live process
    // wins.
    let parse = typed::PARSE.replace(
        "not fam.name.startswith(\"tw_\")",
        "fam.name not in (\"pkg_build\", \"pkg_build_info\", \"pkg_state\")",
    );
    assert_ne!(parse, typed::PARSE, "the family filter was replaced");
    let om = typed::python(&parse.replace("sys.argv[1]", "\"om\""), &typed::openmetrics(run.addr));
    let want = "\
pkg_build|info|pkg_build_info{server=\"gunicorn\",version=\"1.2\"} 1.0
pkg_state|stateset|pkg_state{app=\"pkg\",pkg_state=\"starting\"} 0.0
pkg_state|stateset|pkg_state{app=\"pkg\",pkg_state=\"serving\"} 1.0
";
    assert_eq!(om, want, "OpenMetrics");
    let p004 = typed::python(&parse.replace("sys.argv[1]", "\"004\""), &util::scrape(run.addr));
    let want = "\
pkg_build_info|gauge|pkg_build_info{server=\"gunicorn\",version=\"1.2\"} 1.0
pkg_state|gauge|pkg_state{app=\"pkg\",pkg_state=\"starting\"} 0.0
pkg_state|gauge|pkg_state{app=\"pkg\",pkg_state=\"serving\"} 1.0
";
    assert_eq!(p004, want, "text 0.0.4");
    ps::stop(run);
}

/// The API in one process and three forked children (`tests/python/pkg_api.py`), exact values
/// after all four exited cleanly; and the same script without `SHMETRICS_DIR` (private memory).
#[test]
fn api_in_a_process_and_its_forked_children() {
    let site = require_package();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let script = ps::root().join("tests/python/pkg_api.py");
    let py = util::python();
    let out =
        std::process::Command::new(&py).arg(&script).env("SHMETRICS_DIR", &dir).output().expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(&format!("ok {}/w-", dir.display())), "{stdout}");

    let s = util::wait_for(LONG, "the 4 files folded", || {
        let s = util::samples(&util::scrape(served.addr));
        (s.get("shmetrics_workers_dead_total") == Some(&4.0)).then_some(s)
    });
    assert_eq!(s.get("shmetrics_workers_crashed_total"), Some(&0.0), "all four exited cleanly");
    let get = |k: &str| s.get(k).copied().unwrap_or_else(|| panic!("no {k}"));
    assert_eq!(get(r#"api_requests_total{method="GET",code="200"}"#), 4.5);
    assert_eq!(get("ns_sub_sent_bytes_total"), 3.0);
    assert_eq!(get("api_plain_total"), 0.0);
    assert_eq!(get("api_exceptions_total"), 2.0, "one ValueError in a block, one decorated call");
    assert_eq!(get("api_in_progress"), 0.0);
    assert!(get("api_clock") > 1.7e9, "set_to_current_time: {}", get("api_clock"));
    assert_eq!(get(r#"api_latency_seconds_bucket{le="0.1"}"#), 1.0);
    assert_eq!(get(r#"api_latency_seconds_bucket{le="1.0"}"#), 2.0);
    assert_eq!(get(r#"api_latency_seconds_bucket{le="+Inf"}"#), 3.0);
    assert_eq!(get("api_latency_seconds_sum"), 5.55);
    assert_eq!(get(r#"api_timed_seconds_count{kind="decorated"}"#), 3.0);
    assert_eq!(get(r#"api_timed_seconds_count{kind="block"}"#), 1.0);
    assert_eq!(get(r#"api_forked_total{who="child"}"#), 300.0);
    assert_eq!(get(r#"api_forked_total{who="parent"}"#), 1.0);
    assert_eq!(get("api_after_fork_total"), 3.0);
    assert_eq!(get(r#"api_sizes_count{kind="a"}"#), 2.0);
    assert_eq!(get(r#"api_sizes_sum{kind="a"}"#), 5.5);
    assert_eq!(get("api_summary_timed_seconds_count"), 1.0);

    // Unexported: the same script runs, nothing is written.
    let out = std::process::Command::new(&py)
        .arg(&script)
        .env_remove("SHMETRICS_DIR")
        .env("PYTHONPATH", &site)
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok None\n");
}
