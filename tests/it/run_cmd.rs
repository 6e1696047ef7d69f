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

/// Whether process `pid` is gone: no /proc entry, or a zombie (it has released everything; its
/// reaper may be a PID 1 that never reaps).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S …": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
    }
}

/// The children of `pid` (`/proc/PID/task/PID/children`).
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `GET /` from the bundled pre-fork server: its answer, `hello from <pid>`.
fn hello(port: u16) -> String {
    let r = util::http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/", &[]);
    assert_eq!(r.status, 200);
    r.text()
}

#[test]
fn a_sigkilled_run_takes_its_application_along_and_the_next_start_cleans_up() {
    let x = xdg();
    let env = [("XDG_RUNTIME_DIR", path_str(x.path()))];
    let server = util::example_bin("prefork_server");
    let port = util::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["run", "--", path_str(&server), "--listen", &listen, "--workers", "2"];
    let mut first = spawn_run(&args, &env);
    first.stdout_line(LONG, "the server listening", |l| l.starts_with("listening on").then_some(()));
    let master = first.child_pid;
    let workers = util::wait_for(LONG, "2 workers", || Some(children(master)).filter(|c| c.len() == 2));
    assert!(hello(port).starts_with("hello from"));
    let left = first.dir.clone();

    // The OOM killer, or supervisord after stopwaitsecs.
    first.signal(Signal::SIGKILL);
    first.wait(LONG);
    // The master (its own process group, so no signal reaches it otherwise) dies with `run`, and
    // its workers with it.
    for pid in std::iter::once(master).chain(workers.iter().copied()) {
        util::wait_for(LONG, &format!("process {pid} gone after run was killed"), || gone(pid).then_some(()));
    }
    assert!(left.is_dir(), "a killed run cannot remove its private directory");

    // A replacement on the same application port: it starts and serves (no "address in use"),
    // and removed the directory the killed one left behind before making its own.
    let mut second = spawn_run(&args, &env);
    second.stdout_line(LONG, "the new server listening", |l| l.starts_with("listening on").then_some(()));
    let answer = hello(port);
    // The bundled server's HTTP metrics and the job's process metrics, as Prometheus reads them.
    util::assert_openmetrics_parses(second.addr);
    assert!(!workers.iter().any(|w| answer == format!("hello from {w}")), "{answer}");
    assert!(!left.exists(), "{} left behind", left.display());
    let removed =
        format!("removed {}, the private directory of a `shmetrics run` that was killed", left.display());
    assert!(second.stderr_text().contains(&removed), "{}", second.stderr_text());
    assert_eq!(util::ls(x.path()), vec![second.dir.file_name().and_then(|n| n.to_str()).expect("name")]);
    wait_handlers(second.proc.pid(), &FORWARDED);
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait(LONG).code(), Some(0), "{}", second.stderr_text());
    assert_eq!(util::ls(x.path()), Vec::<String>::new());
}

/// A private directory in `base`: mode 0700, with `files` (name, content).
fn private(base: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = base.join(name);
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for (f, content) in files {
        std::fs::write(d.join(f), content).expect("write");
    }
    d
}

/// Sets a directory's modification time `secs` seconds back.
fn age(dir: &Path, secs: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(secs);
    std::fs::File::open(dir).and_then(|f| f.set_modified(t)).expect("set mtime");
}

#[test]
fn run_removes_only_dead_private_directories() {
    use std::os::unix::fs::PermissionsExt;
    let x = xdg();
    let base = x.path();
    // The pid of an aggregator that is gone (the lock is free: nobody holds it).
    let dead = "pid 4000000\n";
    let w = "w-1-00000000000000000000000000000000.shm";
    // Removed: a killed run's directory (archive, dead writers, Python files of a dead process).
    private(
        base,
        "shmetrics-dead01",
        &[("aggregator.lock", dead), (w, ""), ("archive.json", "{}"), ("counter_4000000.db", "")],
    );
    // Removed: an empty directory (a run killed before it locked it), more than a minute old, with
    // or without an empty lock file.
    age(&private(base, "shmetrics-empty1", &[]), 120);
    age(&private(base, "shmetrics-empty2", &[("aggregator.lock", "")]), 120);

    // Kept: all of these.
    let mut kept = Vec::new();
    // Young and never locked: a run may be starting right now.
    kept.push(private(base, "shmetrics-young1", &[]));
    kept.push(private(base, "shmetrics-young2", &[("aggregator.lock", "")]));
    // Old, but never locked and not empty.
    let d = private(base, "shmetrics-nopid1", &[("aggregator.lock", ""), (w, "")]);
    age(&d, 120);
    kept.push(d);
    // In use: its aggregator holds the lock.
    let d = private(base, "shmetrics-inuse1", &[("aggregator.lock", "pid 1\n")]);
    let held = std::fs::File::open(d.join("aggregator.lock")).expect("open");
    held.try_lock().expect("lock");
    kept.push(d);
    // A worker that outlived the run still writes its file.
    let d = private(base, "shmetrics-write1", &[("aggregator.lock", dead), (w, "")]);
    let writer = std::fs::File::open(d.join(w)).expect("open");
    writer.try_lock().expect("lock");
    kept.push(d);
    // A Python worker that is alive (the test process: the file is younger than it).
    kept.push(private(
        base,
        "shmetrics-pylive",
        &[("aggregator.lock", dead), (&format!("counter_{}.db", std::process::id()), "")],
    ));
    // A file we do not know.
    kept.push(private(base, "shmetrics-forgn1", &[("aggregator.lock", dead), ("notes.txt", "mine")]));
    // Not mode 0700, or not ours.
    let d = private(base, "shmetrics-mode01", &[("aggregator.lock", dead)]);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    kept.push(d);
    let d = private(base, "shmetrics-uid001", &[("aggregator.lock", dead)]);
    std::os::unix::fs::chown(&d, Some(65534), Some(65534)).expect("chown");
    kept.push(d);
    let d = private(base, "shmetrics-fuid01", &[("aggregator.lock", dead), (w, "")]);
    std::os::unix::fs::chown(d.join(w), Some(65534), None).expect("chown");
    kept.push(d);
    // Links are never followed: a symlink named like ours, and a directory holding a symlink.
    let target = private(base, "target", &[("aggregator.lock", dead), (w, "")]);
    std::os::unix::fs::symlink(&target, base.join("shmetrics-link01")).expect("symlink");
    kept.push(base.join("shmetrics-link01"));
    let outside = base.join("outside.txt");
    std::fs::write(&outside, "precious").expect("write");
    let d = private(base, "shmetrics-slnk01", &[("aggregator.lock", dead)]);
    std::os::unix::fs::symlink(&outside, d.join(w)).expect("symlink");
    kept.push(d);
    let d = private(base, "shmetrics-slnk02", &[]);
    std::os::unix::fs::symlink(&outside, d.join("aggregator.lock")).expect("symlink");
    age(&d, 120);
    kept.push(d);
    // A FIFO does not hang the start.
    let d = private(base, "shmetrics-fifo01", &[("aggregator.lock", dead)]);
    nix::unistd::mkfifo(&d.join(w), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    kept.push(d);
    // A subdirectory.
    let d = private(base, "shmetrics-sub001", &[("aggregator.lock", dead)]);
    std::fs::create_dir(d.join(w)).expect("mkdir");
    kept.push(d);
    // Not named like ours.
    kept.push(private(base, "shmetrics-toolong", &[("aggregator.lock", dead)]));
    kept.push(private(base, "shmetrics-abc.de", &[("aggregator.lock", dead)]));

    let before: Vec<(PathBuf, Vec<String>)> =
        kept.iter().map(|d| (d.clone(), if d.is_dir() { util::ls(d) } else { Vec::new() })).collect();
    let (st, _, err) = run_to_end(&["run", "--", "true"], &[("XDG_RUNTIME_DIR", path_str(base))], LONG);
    assert_eq!(st.code(), Some(0), "{err}");
    for gone in ["shmetrics-dead01", "shmetrics-empty1", "shmetrics-empty2"] {
        assert!(!base.join(gone).exists(), "{gone} not removed; stderr:\n{err}");
        assert!(err.contains(&format!("removed {}", base.join(gone).display())), "{err}");
    }
    for (d, files) in before {
        assert!(d.exists(), "{} removed", d.display());
        if d.is_dir() {
            assert_eq!(util::ls(&d), files, "{}", d.display());
        }
    }
    assert_eq!(util::ls(&target), vec!["aggregator.lock".to_string(), w.to_string()]);
    assert_eq!(std::fs::read_to_string(&outside).expect("outside"), "precious");
    drop((held, writer));
}
