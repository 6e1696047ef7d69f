//! `shmetrics run -- CMD`: exit status propagation, signal forwarding, `SHMETRICS_DIR` export and
//! metrics served while the child runs.
//!
//! `util::spawn_shmetrics` lets the aggregator's stdout through to the terminal; `run` passes its
//! child's stdout through, and these tests need to read it, so this file has its own spawner
//! ([`spawn_run`], [`run_to_end`]), also used by `workers.rs`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, Proc};

/// `args` with `--listen 127.0.0.1:0` inserted before the first `--` (or appended).
fn with_listen(args: &[&str]) -> Vec<String> {
    let mut full = Vec::new();
    let mut inserted = false;
    for a in args {
        if *a == "--" && !inserted {
            full.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
            inserted = true;
        }
        full.push((*a).to_string());
    }
    if !inserted {
        full.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
    }
    full
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(util::shmetrics_bin());
    cmd.args(with_listen(args)).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env("SHMETRICS_LOG", "info").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A running `shmetrics run` whose stdout (the child's stdout, passed through) we read.
pub(crate) struct RunProc {
    /// The `shmetrics` process.
    pub proc: Proc,
    /// Where it serves `/metrics`.
    pub addr: SocketAddr,
    /// The child's pid (it leads its own process group: `run` starts it with `process_group(0)`).
    pub child_pid: i32,
    /// The `SHMETRICS_DIR` the child got, from the "serving" log line.
    pub dir: PathBuf,
    /// Lines of stdout, as they come.
    pub stdout: Receiver<String>,
    /// Everything written to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl RunProc {
    /// The next stdout line for which `f` returns `Some`, skipping others.
    pub fn stdout_line<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = f(&line) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what} on stdout"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stdout closed while waiting for {what}; stderr:\n{}", self.stderr_text())
                }
            }
        }
    }

    /// Sends `sig` to the `shmetrics run` process.
    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig);
    }

    /// Waits for `shmetrics run` to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_timeout(timeout)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }
}

impl Drop for RunProc {
    fn drop(&mut self) {
        // Only on failure paths: `run` is still running, or was itself killed by a signal, so its
        // child may still be there (if `run` exited with a status, it reaped the child first).
        // Kill the child's process group (the child and everything it forked); `Proc` then kills
        // and reaps `run`.
        let orphaned = match self.proc.child.try_wait() {
            Ok(None) => true,
            Ok(Some(st)) => st.code().is_none(),
            Err(_) => false,
        };
        if orphaned {
            let _ = kill(Pid::from_raw(-self.child_pid), Signal::SIGKILL);
        }
    }
}

/// Starts `shmetrics <args>` (a `run`, with `--listen 127.0.0.1:0` inserted before `--`) and waits
/// for its "serving http://ADDR/metrics for PROG (pid N, SHMETRICS_DIR=D)" log line.
pub(crate) fn spawn_run(args: &[&str], env: &[(&str, &str)]) -> RunProc {
    let mut child = command(args, env).spawn().expect("spawn shmetrics");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let proc = Proc { child };
    let (out_tx, out_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if out_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let buf = Arc::clone(&stderr);
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            {
                let mut b = buf.lock().expect("stderr lock");
                b.push_str(&line);
                b.push('\n');
            }
            if !sent {
                if let Some(parsed) = parse_serving(&line) {
                    let _ = tx.send(Some(parsed));
                    sent = true;
                }
            }
        }
        if !sent {
            let _ = tx.send(None);
        }
    });
    let (addr, child_pid, dir) = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Some(v)) => v,
        Ok(None) => panic!("shmetrics run exited before serving; stderr:\n{}", stderr.lock().expect("lock")),
        Err(_) => panic!("shmetrics run did not start within 20 s"),
    };
    RunProc { proc, addr, child_pid, dir, stdout: out_rx, stderr }
}

/// Parses `serving http://ADDR/metrics for PROG (pid N, SHMETRICS_DIR=D)`.
fn parse_serving(line: &str) -> Option<(SocketAddr, i32, PathBuf)> {
    let rest = line.split("serving http://").nth(1)?;
    let addr = rest.split('/').next()?.parse().ok()?;
    let pid = rest.split("(pid ").nth(1)?.split(',').next()?.parse().ok()?;
    let dir = rest.split("SHMETRICS_DIR=").nth(1)?.strip_suffix(')')?;
    Some((addr, pid, PathBuf::from(dir)))
}

/// Runs `shmetrics <args>` to completion (at most `timeout`): status, stdout, stderr.
pub(crate) fn run_to_end(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let mut child = command(args, env).spawn().expect("spawn shmetrics");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let mut proc = Proc { child };
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = proc.wait_timeout(timeout);
    (status, out_t.join().expect("stdout thread"), err_t.join().expect("stderr thread"))
}

const LONG: Duration = Duration::from_secs(10);

/// The signals `run` forwards.
const FORWARDED: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Waits until process `pid` has handlers for every signal in `sigs` (`SigCgt` in
/// /proc/PID/status). `run` installs its handlers only after it has started the child and logged
/// "serving" (see `run_forwards_signals_as_soon_as_it_serves`); tests about what happens to
/// forwarded signals wait for this first, so they test forwarding and not that race.
fn wait_handlers(pid: i32, sigs: &[Signal]) {
    util::wait_for(LONG, "run's signal handlers", || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?.trim();
        let mask = u64::from_str_radix(mask, 16).ok()?;
        sigs.iter().all(|s| mask & (1u64 << (*s as i32 - 1)) != 0).then_some(())
    });
}

/// A fresh `$XDG_RUNTIME_DIR` for one test (so `run`'s private directory lands somewhere we see).
fn xdg() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn run_exit_status_is_the_childs() {
    let x = xdg();
    let env = [("XDG_RUNTIME_DIR", path_str(x.path()))];

    let (st, _, err) = run_to_end(&["run", "--", "sh", "-c", "exit 7"], &env, LONG);
    assert_eq!(st.code(), Some(7), "exit 7; stderr:\n{err}");

    let (st, _, err) = run_to_end(&["run", "--", "sh", "-c", "kill -9 $$"], &env, LONG);
    assert_eq!(st.code(), Some(128 + 9), "killed by SIGKILL → 137; stderr:\n{err}");

    let (st, _, err) = run_to_end(&["run", "--", "sh", "-c", "exit 0"], &env, LONG);
    assert_eq!(st.code(), Some(0), "exit 0; stderr:\n{err}");

    // A program that does not exist: one clear error naming it, exit status 2 (the CLI's status
    // for errors), nothing served, and the private directory is not left behind.
    let missing = "/nonexistent/shmetrics-test-no-such-program";
    let (st, out, err) = run_to_end(&["run", "--", missing, "arg"], &env, LONG);
    assert_eq!(st.code(), Some(2), "missing program; stderr:\n{err}");
    assert!(err.contains("shmetrics: error: cannot start"), "error message: {err}");
    assert!(err.contains(missing), "error names the program: {err}");
    assert!(err.contains("No such file or directory"), "error gives the cause: {err}");
    assert!(!err.contains("serving http://"), "nothing served: {err}");
    assert_eq!(out, "");
    assert_eq!(util::ls(x.path()), Vec::<String>::new(), "private directory removed");
}

/// A child that appends the name of each signal it gets to the file `$1`, exits 3 on TERM.
const RECORDER: &str = r#"
f="$1"
for s in HUP INT QUIT USR1 USR2 TTIN TTOU; do
    trap "echo $s >> \"$f\"" $s
done
trap 'echo TERM >> "$f"; exit 3' TERM
echo READY >> "$f"
while :; do sleep 0.02; done
"#;

fn recorded(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn run_forwards_signals_in_order_and_propagates_status() {
    let x = xdg();
    let tmp = tempfile::tempdir().expect("tempdir");
    let rec = tmp.path().join("signals.txt");
    let mut run = spawn_run(
        &["run", "--", "sh", "-c", RECORDER, "sh", path_str(&rec)],
        &[("XDG_RUNTIME_DIR", path_str(x.path()))],
    );
    util::wait_for(LONG, "child ready", || (recorded(&rec) == ["READY"]).then_some(()));
    wait_handlers(run.proc.pid(), &FORWARDED);

    // One at a time: the shell runs pending traps in signal-number order, so each signal is
    // sent only once the previous one was recorded.
    let order = [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGQUIT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGINT,
    ];
    let mut expected = vec!["READY".to_string()];
    for sig in order {
        run.signal(sig);
        expected.push(sig.as_str().trim_start_matches("SIG").to_string());
        let what = format!("child to record {sig}");
        util::wait_for(LONG, &what, || {
            if let Some(st) = run.proc.child.try_wait().expect("try_wait") {
                panic!("run exited ({st}) instead of forwarding {sig}; stderr:\n{}", run.stderr_text());
            }
            let got = recorded(&rec);
            assert!(expected.starts_with(&got), "recorded {got:?}, expected a prefix of {expected:?}");
            (got == expected).then_some(())
        });
        assert_eq!(run.proc.child.try_wait().expect("try_wait"), None, "run survives {sig}");
    }

    run.signal(Signal::SIGTERM);
    let st = run.wait(LONG);
    expected.push("TERM".to_string());
    assert_eq!(recorded(&rec), expected);
    assert_eq!(st.code(), Some(3), "the child's own status; stderr:\n{}", run.stderr_text());
}

#[test]
fn run_reports_a_forwarded_signal_that_kills_the_child() {
    let x = xdg();
    let tmp = tempfile::tempdir().expect("tempdir");
    let rec = tmp.path().join("ready");
    let script = r#"echo READY > "$1"; while :; do sleep 0.02; done"#;
    let mut run = spawn_run(
        &["run", "--", "sh", "-c", script, "sh", path_str(&rec)],
        &[("XDG_RUNTIME_DIR", path_str(x.path()))],
    );
    util::wait_for(LONG, "child ready", || (recorded(&rec) == ["READY"]).then_some(()));
    wait_handlers(run.proc.pid(), &FORWARDED);
    run.signal(Signal::SIGUSR1);
    let st = run.wait(LONG);
    assert_eq!(st.code(), Some(128 + Signal::SIGUSR1 as i32), "stderr:\n{}", run.stderr_text());
}

#[test]
fn run_forwards_signals_as_soon_as_it_serves() {
    // A signal that reaches `run` once it has announced that it serves must be forwarded, not
    // kill `run` (which would orphan the child). Sent right after the "serving" log line, before
    // the child had time to do anything: the child dies of it (138) or its trap exits 5.
    let x = xdg();
    let script = r#"trap "exit 5" USR1; while :; do sleep 0.02; done"#;
    for _ in 0..20 {
        let mut run =
            spawn_run(&["run", "--", "sh", "-c", script], &[("XDG_RUNTIME_DIR", path_str(x.path()))]);
        run.signal(Signal::SIGUSR1);
        let st = run.wait(LONG);
        assert!(
            matches!(st.code(), Some(5 | 138)),
            "run must forward SIGUSR1 and exit with the child's status, got {st}; stderr:\n{}",
            run.stderr_text()
        );
    }
}

/// Prints `SHMETRICS_DIR`, its mode and whether it is a directory.
const SHOW_DIR: &str = r#"echo "dir=$SHMETRICS_DIR"; echo "mode=$(stat -c %a "$SHMETRICS_DIR")"; test -d "$SHMETRICS_DIR" && echo isdir"#;

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= line in {out:?}"))
}

#[test]
fn run_exports_shmetrics_dir() {
    // With --dir: exactly that directory (created 0700), kept after the child exits.
    let x = xdg();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("metrics");
    let env = [("XDG_RUNTIME_DIR", path_str(x.path()))];
    let (st, out, err) = run_to_end(&["run", "--dir", path_str(&d), "--", "sh", "-c", SHOW_DIR], &env, LONG);
    assert_eq!(st.code(), Some(0), "stderr:\n{err}");
    assert_eq!(field(&out, "dir"), path_str(&d));
    assert_eq!(field(&out, "mode"), "700");
    assert!(out.lines().any(|l| l == "isdir"), "{out}");
    assert!(d.is_dir(), "--dir is the user's directory: kept");
    assert_eq!(util::ls(x.path()), Vec::<String>::new(), "nothing created under XDG_RUNTIME_DIR with --dir");

    // Without --dir: a fresh private directory under $XDG_RUNTIME_DIR, mode 0700, removed after
    // the child exits.
    let (st, out, err) = run_to_end(&["run", "--", "sh", "-c", SHOW_DIR], &env, LONG);
    assert_eq!(st.code(), Some(0), "stderr:\n{err}");
    let private = PathBuf::from(field(&out, "dir"));
    assert_eq!(private.parent(), Some(x.path()), "private dir {} under XDG_RUNTIME_DIR", private.display());
    assert!(out.lines().any(|l| l == "isdir"), "{out}");
    assert!(!private.exists(), "private directory removed at exit");
    assert_eq!(util::ls(x.path()), Vec::<String>::new());

    // Two runs get two different private directories.
    let (_, out2, _) = run_to_end(&["run", "--", "sh", "-c", SHOW_DIR], &env, LONG);
    assert_ne!(field(&out2, "dir"), private.to_str().expect("utf-8"));

    // Private: nobody else may read the metrics or plant files in it.
    assert_eq!(field(&out, "mode"), "700", "mode of the private directory {}", private.display());
}

#[test]
fn run_serves_metrics_while_the_child_runs() {
    let x = xdg();
    let wl = util::example_bin("workload");
    let mut run = spawn_run(
        &["run", "--", path_str(&wl), "--workers", "2", "--series", "1", "--hold"],
        &[("XDG_RUNTIME_DIR", path_str(x.path()))],
    );
    assert_eq!(run.dir.parent(), Some(x.path()));
    let pids: Vec<i32> = run.stdout_line(LONG, "READY", |l| {
        l.strip_prefix("READY").map(|r| r.split_whitespace().map(|p| p.parse().expect("pid")).collect())
    });
    assert_eq!(pids.len(), 2);
    // W=2, S=1, K=1, M=0: T = 3, wl_requests_total{route="/r0"} = K·1·T = 3.
    let s = util::samples(&util::scrape(run.addr));
    assert_eq!(s.get("wl_requests_total{route=\"/r0\"}"), Some(&3.0), "{s:?}");
    assert_eq!(s.get("wl_inflight{route=\"/r0\"}"), Some(&(2.0 * 1.0 + 3.0)));
    assert_eq!(s.get("shmetrics_workers_live"), Some(&2.0), "2 workers; the master is not one");
    // TERM is forwarded to the workload, which stops its workers and exits 0.
    wait_handlers(run.proc.pid(), &FORWARDED);
    run.signal(Signal::SIGTERM);
    let st = run.wait(LONG);
    assert_eq!(st.code(), Some(0), "stderr:\n{}", run.stderr_text());
    assert!(!run.dir.exists(), "private directory removed");
}
