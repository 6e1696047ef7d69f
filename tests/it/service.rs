//! The shipped service files, checked for real: `conf/shmetrics.service` with systemd's own
//! checker (`systemd-analyze verify`, and `security --offline` for its hardening), then its
//! `ExecStart=` and `ExecReload=` lines run as systemd would run them; `conf/supervisord.conf`
//! under a real supervisord (Debian's `supervisor` package), program and event listener both.
//!
//! The files are used as shipped, with only their placeholders replaced (binary, directory,
//! configuration file, ports, the application's command); each replacement must find its text,
//! so a change to a shipped file that these tests no longer cover fails here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{self, Proc};

const T: Duration = Duration::from_secs(30);

/// A shipped file under `conf/`.
fn shipped(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `text` with every `from` replaced by `to`; `from` must occur.
fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the shipped file no longer contains {from:?}:\n{text}");
    text.replace(from, to)
}

/// The application's command in both files, and what the tests run instead: the bundled
/// pre-fork server (2 workers) on `port`.
const APP: &str = "/srv/myapp/venv/bin/gunicorn --workers 4 --bind 127.0.0.1:8000 myapp.wsgi:application";

fn app(port: u16) -> String {
    format!("{} --workers 2 --listen 127.0.0.1:{port}", util::example_bin("prefork_server").display())
}

/// The configuration file both use: a crash rule (for the listener) with a log action.
fn config(d: &Path) -> PathBuf {
    let p = d.join("myapp.toml");
    std::fs::write(&p, "[actions.log]\ntype = \"log\"\n\n[crash]\nactions = [\"log\"]\n").expect("config");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `GET /` from the pre-fork server on `port`, once it answers.
fn hello(port: u16) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    util::wait_for(T, "the application answering", || {
        std::net::TcpStream::connect(addr).ok()?;
        Some(())
    });
    let r = util::http_get(addr, "/", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The worker pid answering `/pid`.
fn worker_pid(port: u16) -> i32 {
    let r = util::http_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "/pid", &[]);
    r.text().trim().parse().unwrap_or_else(|_| panic!("/pid: {:?}", r.text()))
}

/// `http_requests_total` for `GET /` in `/metrics` at `addr`, once it is `want`.
fn wait_requests(addr: std::net::SocketAddr, want: f64) {
    let key = r#"http_requests_total{method="GET",path="/",code="200"}"#;
    util::wait_for(T, &format!("{key} = {want}"), || {
        (util::samples(&util::scrape(addr)).get(key) == Some(&want)).then_some(())
    });
}

fn systemd_analyze() -> &'static str {
    let ok = Command::new("systemd-analyze").arg("--version").output().map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "systemd-analyze is not installed: install Debian's systemd package \
         (`apt-get install -y --no-install-recommends systemd`, as .ci/run does)"
    );
    "systemd-analyze"
}

/// The unit as installed, with `ExecStart=`'s binary pointing at this build (systemd checks that
/// it exists and is executable).
fn unit(d: &Path) -> PathBuf {
    let text = replace(&shipped("shmetrics.service"), "/usr/local/bin/shmetrics", s(&util::shmetrics_bin()));
    let p = d.join("myapp.service");
    std::fs::write(&p, text).expect("unit");
    p
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let bin = systemd_analyze();
    let tmp = tempfile::tempdir().expect("tempdir");
    let unit = unit(tmp.path());
    let out = Command::new(bin).arg("verify").arg(&unit).current_dir(tmp.path()).output().expect("verify");
    let err = String::from_utf8_lossy(&out.stderr);
    // Warnings (an unknown key, a value it cannot parse) do not change the status: any line about
    // our unit is a failure. (Other units of the machine may have their own warnings.)
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("myapp.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {}\n{err}", out.status);

    let out = Command::new(bin)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .current_dir(tmp.path())
        .output()
        .expect("security");
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for myapp.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    // systemd's scale: 0 (locked down) to 10 (UNSAFE); up to 2.0 is "OK". The unit is at 1.4.
    assert!(level <= 2.0, "exposure level {level}, more than 2.0:\n{text}");
    for key in ["ProtectSystem=strict", "NoNewPrivileges=yes", "RuntimeDirectory=myapp-metrics"] {
        assert!(shipped("shmetrics.service").lines().any(|l| l == key), "{key} is not set");
    }
}

/// One `Key=value` of the unit's `[Service]` section.
fn key<'a>(unit: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}=");
    unit.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name}= in the unit"))
}

#[test]
fn the_systemd_units_commands_run_the_job() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let unit = shipped("shmetrics.service");
    // What systemd does before ExecStart=: the runtime directory, mode RuntimeDirectoryMode=.
    let runtime = d.join(key(&unit, "RuntimeDirectory"));
    std::fs::create_dir(&runtime).expect("runtime dir");
    let mode = u32::from_str_radix(key(&unit, "RuntimeDirectoryMode"), 8).expect("mode");
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");

    let port = util::free_port();
    let exec = key(&unit, "ExecStart");
    let exec = replace(exec, "${RUNTIME_DIRECTORY}", s(&runtime));
    let exec = replace(&exec, "/etc/shmetrics/myapp.toml", s(&config(d)));
    // The test's ports: `spawn_shmetrics` adds `--listen 127.0.0.1:0` (the monitor port follows).
    let exec = replace(&exec, " --instance-port 8000", "");
    let exec = replace(&exec, APP, &app(port));
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/shmetrics", "{exec}");
    let env: Vec<(&str, &str)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(env, [("SHMETRICS_LOG", "info")]);
    let mut served = util::spawn_shmetrics(&words[1..], &env, d);

    for _ in 0..3 {
        hello(port);
    }
    wait_requests(served.addr, 3.0);
    // The job's files are in the runtime directory: the master's (it registers before forking)
    // and the two workers'.
    assert_eq!(util::worker_files(&runtime), 3, "{:?}", util::ls(&runtime));

    // ExecReload=: SIGHUP to the main process reloads the configuration and reaches the server,
    // whose workers are replaced.
    let before = worker_pid(port);
    let reload = replace(key(&unit, "ExecReload"), "$MAINPID", &served.proc.pid().to_string());
    let words: Vec<&str> = reload.split_whitespace().collect();
    let st = Command::new(words[0]).args(&words[1..]).status().expect("ExecReload");
    assert!(st.success(), "{reload}: {st}");
    util::wait_for(T, "the reload in the log", || {
        std::fs::read_to_string(&served.log).ok().filter(|l| l.contains("configuration reloaded"))
    });
    util::wait_for(T, "the workers replaced", || {
        let p = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let r = std::panic::catch_unwind(|| util::http_get(p, "/pid", &[]).text()).ok()?;
        let pid: i32 = r.trim().parse().ok()?;
        (pid != before && !Path::new(&format!("/proc/{before}")).exists()).then_some(())
    });
    hello(port);
    wait_requests(served.addr, 4.0);

    // Stopping (KillMode=mixed): SIGTERM to the main process; everything is down, status 0,
    // within TimeoutStopSec=.
    let stop: u64 = key(&unit, "TimeoutStopSec").parse().expect("TimeoutStopSec");
    served.proc.signal(Signal::SIGTERM);
    let st = served.proc.wait_timeout(Duration::from_secs(stop));
    assert!(st.success(), "{st}");
    wait_gone(port);
}

/// Waits until nothing answers on `port` any more.
fn wait_gone(port: u16) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    util::wait_for(T, "the application gone", || std::net::TcpStream::connect(addr).is_err().then_some(()));
}

#[test]
fn supervisord_runs_the_program_and_its_listener() {
    let ok = Command::new("supervisord").arg("--version").output().map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "supervisord is not installed: install Debian's supervisor package (as .ci/run does)"
    );
    let tmp = tempfile::Builder::new().prefix("shm-svc").tempdir().expect("tempdir");
    let d = tmp.path();
    let metrics_dir = d.join("myapp-metrics");
    std::fs::create_dir(&metrics_dir).expect("dir");
    std::fs::set_permissions(&metrics_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let (port, http, mon) = (util::free_port(), util::free_port(), util::free_port());
    let bin = util::shmetrics_bin();
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).expect("getpwuid").expect("user").name;

    let snippet = shipped("supervisord.conf");
    let snippet = replace(&snippet, "/usr/local/bin/shmetrics", s(&bin));
    let snippet = replace(&snippet, "/run/myapp-metrics", s(&metrics_dir));
    let snippet = replace(&snippet, "/etc/shmetrics/myapp.toml", s(&config(d)));
    let snippet = replace(
        &snippet,
        "--instance-port 8000",
        &format!("--listen 127.0.0.1:{http} --monitor 127.0.0.1:{mon}"),
    );
    let snippet = replace(&snippet, APP, &app(port));
    let snippet = replace(&snippet, "user = myapp", &format!("user = {user}"));
    let snippet = replace(&snippet, "directory = /srv/myapp", &format!("directory = {}", d.display()));
    let snippet = replace(&snippet, "/var/log/supervisor", s(d));
    let conf = d.join("supervisord.conf");
    std::fs::write(&conf, format!("{}{snippet}", util::supervisord_sections(d))).expect("supervisord.conf");
    let mut sup = Proc {
        child: Command::new("supervisord")
            .args(["-n", "-c"])
            .arg(&conf)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn supervisord"),
    };
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
    let logs = || format!("supervisord.log:\n{}\nmyapp.log:\n{}", read("supervisord.log"), read("myapp.log"));
    let ctl = |args: &[&str]| {
        let out =
            Command::new("supervisorctl").arg("-c").arg(&conf).args(args).output().expect("supervisorctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    util::wait_for(Duration::from_secs(60), "both programs RUNNING", || {
        let st = ctl(&["status"]);
        (st.lines().filter(|l| l.contains("RUNNING")).count() == 2).then_some(())
    });
    hello(port);
    hello(port);
    wait_requests(metrics, 2.0);
    let health = Command::new(&bin)
        .args(["ctl", "--monitor", &format!("127.0.0.1:{mon}"), "health_check"])
        .output()
        .expect("ctl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "OK\n", "{}", logs());

    // `supervisorctl signal HUP myapp`: the configuration is reloaded, the workers replaced.
    let before = worker_pid(port);
    assert!(ctl(&["signal", "HUP", "myapp"]).contains("myapp: signalled"), "{}", logs());
    util::wait_for(T, "the reload in myapp.log", || {
        read("myapp.log").contains("configuration reloaded").then_some(())
    });
    util::wait_for(T, "the workers replaced", || {
        (!Path::new(&format!("/proc/{before}")).exists()).then_some(())
    });

    // `supervisorctl stop myapp`: TERM, forwarded; status 0; nothing left answering.
    assert!(ctl(&["stop", "myapp"]).contains("myapp: stopped"), "{}", logs());
    wait_gone(port);
    util::wait_for(T, "the stop in supervisord.log", || {
        read("supervisord.log").contains("stopped: myapp (exit status 0)").then_some(())
    });
    assert!(ctl(&["status", "myapp-alarms"]).contains("RUNNING"), "{}", logs());
    sup.signal(Signal::SIGTERM);
    let st = sup.wait_timeout(T);
    assert!(st.success(), "supervisord: {st}\n{}", logs());
}
