//! Supervision alarms end to end: a real aggregator with a configuration, real workers, and a real
//! command action appending each alarm message to a file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util;

const T: Duration = Duration::from_secs(20);

/// A temp dir with a multiproc directory, an alarm log file and a config file.
struct Setup {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    out: PathBuf,
    config: PathBuf,
}

/// `rules` is the TOML of the rules; every rule can use the action `file`.
fn setup(rules: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    let out = tmp.path().join("alarms.txt");
    let config = tmp.path().join("shmetrics.toml");
    write_config(&config, &out, rules);
    Setup { tmp, dir, out, config }
}

fn write_config(config: &Path, out: &Path, rules: &str) {
    let text = format!(
        "check_interval_seconds = 0.5\n\n[actions.file]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> '{}'; echo >> '{}'\"]\ntimeout_seconds = 5\nretries = 1\n\n{rules}",
        out.display(),
        out.display()
    );
    std::fs::write(config, text).expect("config");
}

fn serve(s: &Setup, extra: &[&str]) -> util::Served {
    let d = s.dir.to_str().expect("utf-8");
    let c = s.config.to_str().expect("utf-8");
    let mut args = vec!["serve", "--dir", d, "--config", c, "--upkeep-interval", "0.2"];
    args.extend_from_slice(extra);
    util::spawn_shmetrics(&args, &[], s.tmp.path())
}

fn alarms(s: &Setup) -> String {
    std::fs::read_to_string(&s.out).unwrap_or_default()
}

fn wait_alarm(s: &Setup, needle: &str) -> String {
    util::wait_for(T, &format!("an alarm containing {needle:?}"), || {
        let a = alarms(s);
        a.contains(needle).then_some(a)
    })
}

fn metric(served: &util::Served, key: &str) -> f64 {
    util::samples(&util::scrape(served.addr)).get(key).copied().unwrap_or(0.0)
}

fn kill(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
}

#[test]
fn a_sigkilled_worker_raises_exactly_one_crash_alarm() {
    let s = setup("[crash]\nactions = [\"file\"]\n");
    let served = serve(&s, &[]);
    let wl = util::workload(&s.dir, &["--workers", "2", "--series", "1", "--hold"]);
    let victim = wl.pids[0];
    kill(victim, Signal::SIGKILL);
    let text = wait_alarm(&s, &format!("pid {victim}"));
    assert!(text.contains("exited without a clean exit"), "{text}");
    // The others exit cleanly: no alarm for them.
    drop(wl);
    util::wait_for(T, "all files folded", || (util::worker_files(&s.dir) == 0).then_some(()));
    std::thread::sleep(Duration::from_millis(1500));
    let text = alarms(&s);
    assert_eq!(text.matches("exited without a clean exit").count(), 1, "{text}");
    util::assert_openmetrics_parses(served.addr);
    assert_eq!(metric(&served, "shmetrics_alarms_fired_total{kind=\"crash\",action=\"file\"}"), 1.0);
    let perf: serde_json::Value =
        serde_json::from_slice(&util::http_get(served.addr, "/perf_metrics", &[]).body).expect("JSON");
    let recent = perf["alarms"]["recent"].as_array().expect("recent alarms");
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["kind"], "crash");
    assert_eq!(recent[0]["labels"]["pid"], victim.to_string());
}

#[test]
fn a_memory_hog_is_signalled_once_per_grace_period() {
    let s = setup(
        "[[memory]]\nmeasure = \"rss\"\nlimit = \"48MB\"\nsignal = \"SIGTERM\"\ngrace_seconds = 60\nactions = [\"file\"]\n",
    );
    let served = serve(&s, &[]);
    let wl = util::workload(&s.dir, &["--workers", "2", "--series", "1", "--hold", "--hog-mb", "96"]);
    let (hog, other) = (wl.pids[0], wl.pids[1]);
    let text = wait_alarm(&s, &format!("worker pid {hog} rss is"));
    assert!(text.contains(&format!("sent SIGTERM to pid {hog}")), "{text}");
    // The hog got SIGTERM and exited (cleanly: workload workers exit on SIGTERM); the other lives.
    util::wait_for(T, "the hog to exit", || (!Path::new(&format!("/proc/{hog}")).exists()).then_some(()));
    assert!(Path::new(&format!("/proc/{other}")).exists(), "the small worker was not touched");
    std::thread::sleep(Duration::from_millis(1500));
    let text = alarms(&s);
    assert_eq!(text.matches("rss is").count(), 1, "one alarm, one signal: {text}");
    assert!(!text.contains(&format!("pid {other}")), "{text}");
    assert_eq!(metric(&served, "shmetrics_alarms_fired_total{kind=\"memory\",action=\"file\"}"), 1.0);
}

#[test]
fn a_restart_storm_is_fatal() {
    let s = setup("[fatal]\nmax_crashes = 2\nwindow_seconds = 60\nactions = [\"file\"]\n");
    let d = s.dir.to_str().expect("utf-8").to_string();
    let served = serve(&s, &[]);
    // A real pre-fork server whose workers we crash through its /crash route (abort()).
    let mut server = std::process::Command::new(util::example_bin("prefork_server"))
        .args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .env("SHMETRICS_DIR", &d)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("prefork_server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("listening line");
    let _server = util::Proc { child: server };
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|r| r.split(' ').next())
        .expect("addr")
        .parse()
        .expect("addr");
    for _ in 0..4 {
        // The worker aborts without answering; the master respawns it.
        let _ = std::net::TcpStream::connect(addr).and_then(|mut c| {
            use std::io::{Read, Write};
            c.write_all(b"GET /crash HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut b = Vec::new();
            c.read_to_end(&mut b)
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    let text = wait_alarm(&s, "restart storm");
    assert!(text.contains("crashes within 60 s (more than 2)"), "{text}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alarms(&s).matches("restart storm").count(), 1, "once per window");
    assert_eq!(metric(&served, "shmetrics_alarms_fired_total{kind=\"fatal\",action=\"file\"}"), 1.0);
}

#[test]
fn no_live_workers_for_a_while_is_fatal() {
    let s = setup("[fatal]\nno_live_workers_seconds = 1\nactions = [\"file\"]\n");
    let _served = serve(&s, &[]);
    let wl = util::workload(&s.dir, &["--workers", "2", "--series", "1", "--hold"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alarms(&s), "", "no alarm while workers live");
    drop(wl);
    let text = wait_alarm(&s, "no live workers for 1 s");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alarms(&s).matches("no live workers").count(), 1, "once: {text}");
}

#[test]
fn thresholds_are_rate_limited() {
    // wl_requests_total{route="/r0"} = (i+1)·T = 3 with 2 workers.
    let s = setup(
        "[[threshold]]\nseries = 'wl_requests_total{route=\"/r0\"}'\nop = \">=\"\nvalue = 3\nrate_seconds = 3\nmessage = \"{series} is {value} ({op} {threshold})\"\nactions = [\"file\"]\n",
    );
    let served = serve(&s, &[]);
    let _wl = util::workload(&s.dir, &["--workers", "2", "--series", "2", "--hold"]);
    let text = wait_alarm(&s, "wl_requests_total{route=\"/r0\"} is 3 (>= 3)");
    assert!(!text.contains("/r1"), "/r1 does not match the selector: {text}");
    let first = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(alarms(&s).matches("is 3").count(), 1, "rate limited");
    assert!(metric(&served, "shmetrics_alarms_suppressed_total{kind=\"threshold\"}") >= 1.0);
    let text = util::wait_for(T, "a second alarm after the rate period", || {
        let a = alarms(&s);
        (a.matches("is 3").count() == 2).then_some(a)
    });
    assert!(first.elapsed() >= Duration::from_millis(2500), "second alarm too early: {text}");
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_old_configuration() {
    let s = setup("[crash]\nactions = [\"file\"]\n");
    let served = serve(&s, &[]);
    // A broken file: refused, logged, the old configuration (crash → file) stays in force.
    std::fs::write(&s.config, "[crash]\nactions = [\"missing\"]\n").expect("write");
    served.proc.signal(Signal::SIGHUP);
    util::wait_for(T, "the refusal in the log", || {
        std::fs::read_to_string(&served.log).ok().filter(|l| l.contains("keeping the configuration in force"))
    });
    let wl = util::workload(&s.dir, &["--workers", "1", "--series", "1", "--hold"]);
    kill(wl.pids[0], Signal::SIGKILL);
    wait_alarm(&s, &format!("pid {}", wl.pids[0]));
    drop(wl);
    // A good file with another message target: in force after SIGHUP, and the crash count kept.
    let out2 = s.tmp.path().join("alarms2.txt");
    write_config(&s.config, &out2, "[crash]\nactions = [\"file\"]\n");
    served.proc.signal(Signal::SIGHUP);
    util::wait_for(T, "the reload in the log", || {
        std::fs::read_to_string(&served.log).ok().filter(|l| l.contains("configuration reloaded"))
    });
    let wl = util::workload(&s.dir, &["--workers", "1", "--series", "1", "--hold"]);
    kill(wl.pids[0], Signal::SIGKILL);
    util::wait_for(T, "the alarm in the new file", || {
        std::fs::read_to_string(&out2).ok().filter(|t| t.contains(&format!("pid {}", wl.pids[0])))
    });
    assert_eq!(metric(&served, "shmetrics_alarms_fired_total{kind=\"crash\",action=\"file\"}"), 2.0);
}

/// The values TOML accepts for a float that are no duration: each would panic
/// `Duration::from_secs_f64` (`inf`, `1e20`) or mean nothing (`-1`, `nan`).
const BAD_SECONDS: [&str; 4] = ["inf", "1e20", "-1", "nan"];

fn refusal(key: &str, v: &str) -> String {
    format!("{key} = {v} is not allowed: write a number of seconds from 0 to 31536000 (one year)")
}

#[test]
fn a_duration_out_of_range_is_a_config_error_at_start() {
    for v in BAD_SECONDS {
        let s = setup(&format!("[fatal]\nmax_crashes = 2\nwindow_seconds = {v}\nactions = [\"file\"]\n"));
        let mut child = std::process::Command::new(util::shmetrics_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&s.dir)
            .arg("--config")
            .arg(&s.config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stderr = child.stderr.take().expect("stderr");
        let mut proc = util::Proc { child };
        // Before durations were parsed at load time, this started and the alarm task panicked.
        let status = proc.wait_timeout(Duration::from_secs(10));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).expect("stderr");
        assert_eq!(status.code(), Some(2), "window_seconds = {v}: {err}");
        assert!(err.contains(&refusal("window_seconds", v)), "window_seconds = {v}: {err}");
        assert!(err.contains(&s.config.display().to_string()), "names the file: {err}");
    }
}

#[test]
fn sighup_with_a_duration_out_of_range_keeps_the_old_configuration() {
    let rules = "[crash]\nactions = [\"file\"]\n[fatal]\nmax_crashes = 100\nwindow_seconds = 60\nactions = [\"file\"]\n";
    let s = setup(rules);
    let served = serve(&s, &[]);
    for (i, v) in BAD_SECONDS.iter().enumerate() {
        write_config(
            &s.config,
            &s.out,
            &rules.replace("window_seconds = 60", &format!("window_seconds = {v}")),
        );
        served.proc.signal(Signal::SIGHUP);
        let line = util::wait_for(T, &format!("refusal {} in the log", i + 1), || {
            let log = std::fs::read_to_string(&served.log).ok()?;
            log.lines()
                .filter(|l| l.contains("keeping the configuration in force"))
                .nth(i)
                .map(str::to_string)
        });
        assert!(line.contains(&refusal("window_seconds", v)), "{line}");
    }
    // The old configuration is in force and the alarm task alive (a panic would have stopped it):
    // a crash is reported.
    let wl = util::workload(&s.dir, &["--workers", "1", "--series", "1", "--hold"]);
    kill(wl.pids[0], Signal::SIGKILL);
    wait_alarm(&s, &format!("pid {}", wl.pids[0]));
    assert_eq!(metric(&served, "shmetrics_alarms_fired_total{kind=\"crash\",action=\"file\"}"), 1.0);
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn durations_on_the_command_line_are_bounded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let d = dir.to_str().expect("utf-8");
    let runs: [&[&str]; 4] = [
        &["serve", "--dir", d, "--listen", "127.0.0.1:0", "--upkeep-interval", "1e20"],
        &["serve", "--dir", d, "--listen", "127.0.0.1:0", "--upkeep-interval", "inf"],
        &["ctl", "--monitor", "127.0.0.1:9", "--timeout", "1e20", "health_check"],
        &["ctl", "--monitor", "127.0.0.1:9", "--timeout", "nan", "health_check"],
    ];
    for args in runs {
        let mut child = std::process::Command::new(util::shmetrics_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stderr = child.stderr.take().expect("stderr");
        let mut proc = util::Proc { child };
        let status = proc.wait_timeout(Duration::from_secs(10));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).expect("stderr");
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(
                "is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)"
            ),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Every consumer sees every exit once: 8 of 12 workers SIGKILLed while health checks, perf_metrics
/// and scrapes run all the time (each of them used to scan the directory and could take exits
/// before the crash rule saw them). Each crash gives exactly one alarm, and the counters agree.
#[test]
fn every_exit_reaches_the_alarms_and_the_counters_once() {
    let s = setup("[crash]\nactions = [\"file\"]\n");
    let served = serve(&s, &[]);
    let wl = util::workload(&s.dir, &["--workers", "12", "--series", "1", "--hold"]);
    let addr = served.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = ["/healthz", "/perf_metrics", "/metrics"]
        .into_iter()
        .map(|path| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    util::http_get(addr, path, &[]);
                }
            })
        })
        .collect();
    let victims: Vec<i32> = wl.pids[..8].to_vec();
    for (i, v) in victims.iter().enumerate() {
        kill(*v, Signal::SIGKILL);
        if i % 2 == 1 {
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    util::wait_for(T, "8 crashes counted", || {
        (metric(&served, "shmetrics_workers_crashed_total") == 8.0).then_some(())
    });
    drop(wl); // the other 4 and the master exit cleanly
    util::wait_for(T, "all files folded", || (util::worker_files(&s.dir) == 0).then_some(()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        p.join().expect("poller");
    }
    let fired = r#"shmetrics_alarms_fired_total{kind="crash",action="file"}"#;
    util::wait_for(T, "8 crash alarms delivered", || (metric(&served, fired) == 8.0).then_some(()));
    let text = alarms(&s);
    for v in &victims {
        let n = text.matches(&format!("worker pid {v} exited without a clean exit")).count();
        assert_eq!(n, 1, "pid {v}: {n} alarms in\n{text}");
    }
    assert_eq!(text.matches("exited without a clean exit").count(), 8, "{text}");
    assert_eq!(metric(&served, "shmetrics_workers_crashed_total"), 8.0);
    assert_eq!(metric(&served, "shmetrics_workers_dead_total"), 13.0, "12 workers and the master");
    assert_eq!(metric(&served, fired), 8.0);
}
