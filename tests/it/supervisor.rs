//! `shmetrics supervisor-listener`: supervisord's event-listener protocol spoken by hand through
//! the listener's stdin/stdout (stdout must carry the protocol tokens and nothing else), config
//! reloads on SIGHUP, and a real supervisord (Debian's `supervisor` package) whose crashing
//! program reaches the crash and FATAL actions — real `sh -c 'cat >> FILE'` command actions.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{self, Proc};

const T: Duration = Duration::from_secs(10);

const READY: &str = "READY\n";
const OK: &str = "RESULT 2\nOKREADY\n";
const FAIL: &str = "RESULT 4\nFAILREADY\n";

/// A `command` action appending each message (and a newline) to `file`. It also writes to its
/// stdout, which must not reach the listener's (the protocol channel).
fn file_action(name: &str, file: &Path, batch_seconds: f64) -> String {
    let sh = format!("cat >> '{}'; echo >> '{}'; echo action-noise", file.display(), file.display());
    let command = serde_json::to_string(&["sh", "-c", sh.as_str()]).expect("json");
    format!(
        "[actions.{name}]\ntype = \"command\"\ncommand = {command}\nbatch_seconds = {batch_seconds}\n\
         timeout_seconds = 5\nretries = 1\n\n"
    )
}

/// Crash events to `crash_actions`, FATAL events to `fatal_actions` (`max_crashes` only because
/// the configuration check asks [fatal] for a condition of the aggregator's own).
fn rules(crash_actions: Option<&str>, fatal_actions: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(a) = crash_actions {
        s.push_str(&format!("[crash]\nactions = [{a}]\n\n"));
    }
    if let Some(a) = fatal_actions {
        s.push_str(&format!("[fatal]\nmax_crashes = 1000\nactions = [{a}]\n\n"));
    }
    s
}

fn read_file(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `file` contains `what`.
fn wait_file(file: &Path, what: &str, timeout: Duration) -> String {
    util::wait_for(timeout, &format!("{what:?} in {}", file.display()), || {
        let text = read_file(file);
        text.contains(what).then_some(text)
    })
}

/// Everything a pipe gave so far, filled by a thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn spawn(mut r: impl Read + Send + 'static) -> Captured {
        let c = Captured::default();
        let buf = Arc::clone(&c.0);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().expect("lock").extend_from_slice(&chunk[..n]);
            }
        });
        c
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().expect("lock").clone()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

/// A listener run by hand: we are supervisord.
struct Listener {
    proc: Proc,
    stdin: Option<ChildStdin>,
    stdout: Captured,
    stderr: Captured,
    /// How much of stdout has been checked.
    seen: usize,
}

impl Listener {
    fn start(config: &Path) -> Listener {
        let mut child = Command::new(util::shmetrics_bin())
            .args(["supervisor-listener", "--config"])
            .arg(config)
            .env("SHMETRICS_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shmetrics supervisor-listener");
        let stdin = child.stdin.take();
        let stdout = Captured::spawn(child.stdout.take().expect("stdout"));
        let stderr = Captured::spawn(child.stderr.take().expect("stderr"));
        Listener { proc: Proc { child }, stdin, stdout, stderr, seen: 0 }
    }

    /// Asserts that the next bytes on stdout are exactly `expected`.
    fn expect(&mut self, expected: &str) {
        let end = self.seen + expected.len();
        let out = util::wait_for(T, &format!("{expected:?} on the listener's stdout"), || {
            let b = self.stdout.bytes();
            (b.len() >= end).then_some(b)
        });
        assert_eq!(
            String::from_utf8_lossy(&out[self.seen..end]),
            expected,
            "stdout so far: {:?}\nstderr: {}",
            String::from_utf8_lossy(&out),
            self.stderr.text()
        );
        self.seen = end;
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).expect("write to listener");
        w.flush().expect("flush");
    }

    /// Sends an event as supervisord does (the payload has no trailing newline).
    fn send(&mut self, serial: u32, eventname: &str, payload: &str) {
        let header = format!(
            "ver:3.0 server:supervisor serial:{serial} pool:shm poolserial:{serial} eventname:{eventname} len:{}\n",
            payload.len()
        );
        self.send_raw(format!("{header}{payload}").as_bytes());
    }

    fn wait_stderr(&self, what: &str) -> String {
        util::wait_for(T, &format!("{what:?} in the listener's stderr"), || {
            let t = self.stderr.text();
            t.contains(what).then_some(t)
        })
    }
}

fn exited(name: &str, pid: u32, expected: u8) -> String {
    format!("processname:{name} groupname:{name} from_state:RUNNING expected:{expected} pid:{pid}")
}

#[test]
fn protocol_by_hand_events_reach_the_actions_and_stdout_carries_only_the_protocol() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (crash, crash2, fatal) =
        (tmp.path().join("crash.txt"), tmp.path().join("crash2.txt"), tmp.path().join("fatal.txt"));
    let config = tmp.path().join("alarms.toml");
    // Crashes are batched for an hour: only a TICK (or the end) delivers them, as crashmailbatch.
    let base =
        format!("{}{}", file_action("crashfile", &crash, 3600.0), file_action("fatalfile", &fatal, 0.0));
    std::fs::write(&config, format!("{base}{}", rules(Some("\"crashfile\""), Some("\"fatalfile\""))))
        .expect("config");

    let mut l = Listener::start(&config);
    l.expect(READY);
    l.send(1, "PROCESS_STATE_EXITED", &exited("crasher", 4242, 0));
    l.expect(OK);
    l.send(2, "PROCESS_STATE_EXITED", &exited("quitter", 4343, 1));
    l.expect(OK);
    l.send(3, "PROCESS_STATE_FATAL", "processname:crasher groupname:crasher from_state:BACKOFF");
    l.expect(OK);
    l.send_raw(b"this is not a header\n");
    l.expect(FAIL);
    l.send(4, "PROCESS_STATE_RUNNING", "processname:web groupname:web from_state:STARTING pid:77");
    l.expect(OK);
    // A payload with newlines inside and at its end, which must be read by length, not by line.
    l.send(5, "PROCESS_COMMUNICATION_STDOUT", "processname:web groupname:web pid:77\nhello\nworld\n");
    l.expect(OK);
    let fatal_text = wait_file(&fatal, "FATAL", T);
    assert!(
        fatal_text.contains("Process crasher in group crasher has entered the FATAL state"),
        "{fatal_text}"
    );
    assert!(read_file(&crash).is_empty(), "crash delivered before a TICK: {}", read_file(&crash));
    l.send(6, "TICK_5", "when:1700000000");
    l.expect(OK);
    let crash_text = wait_file(
        &crash,
        "Process crasher in group crasher exited unexpectedly (pid 4242) from state RUNNING",
        T,
    );
    assert!(!crash_text.contains("quitter"), "an expected exit was reported: {crash_text}");

    // SIGHUP with a broken file: refused, the old configuration stays, the listener answers on.
    std::fs::write(&config, "[crash]\nactions = [\"nowhere\"]\n").expect("config");
    l.proc.signal(Signal::SIGHUP);
    let err = l.wait_stderr("rejected");
    assert!(err.contains("nowhere"), "the reason is not given: {err}");
    l.send(7, "PROCESS_STATE_EXITED", &exited("crasher", 5001, 0));
    l.expect(OK);
    // SIGHUP with a good file: crashes now also go to crash2 (unbatched).
    let new = format!(
        "{base}{}{}",
        file_action("crash2", &crash2, 0.0),
        rules(Some("\"crashfile\", \"crash2\""), Some("\"fatalfile\""))
    );
    std::fs::write(&config, new).expect("config");
    l.proc.signal(Signal::SIGHUP);
    l.wait_stderr("reloaded");
    l.send(8, "PROCESS_STATE_EXITED", &exited("crasher", 5002, 0));
    l.expect(OK);
    let c2 = wait_file(&crash2, "(pid 5002)", T);
    assert!(!c2.contains("5001"), "{c2}");

    // End of input: pending batches are delivered, exit 0, nothing more on stdout.
    drop(l.stdin.take());
    let status = l.proc.wait_timeout(T);
    assert!(status.success(), "{status}; stderr: {}", l.stderr.text());
    let crash_text = wait_file(&crash, "(pid 5002)", T);
    assert!(crash_text.contains("(pid 5001)"), "{crash_text}");
    std::thread::sleep(Duration::from_millis(100));
    let out = l.stdout.bytes();
    assert_eq!(
        out.len(),
        l.seen,
        "unexpected bytes after the protocol: {:?}",
        String::from_utf8_lossy(&out[l.seen.min(out.len())..])
    );
    let err = l.stderr.text();
    assert!(err.contains("malformed event header"), "{err}");
}

#[test]
fn without_sections_events_are_answered_and_ignored_with_one_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out.txt");
    let config = tmp.path().join("alarms.toml");
    std::fs::write(&config, file_action("file", &out, 0.0)).expect("config");
    let mut l = Listener::start(&config);
    l.expect(READY);
    for serial in 1..=3 {
        l.send(serial, "PROCESS_STATE_EXITED", &exited("crasher", 100 + serial, 0));
        l.expect(OK);
    }
    l.send(4, "PROCESS_STATE_FATAL", "processname:crasher groupname:crasher from_state:BACKOFF");
    l.expect(OK);
    drop(l.stdin.take());
    assert!(l.proc.wait_timeout(T).success());
    let err = l.stderr.text();
    assert_eq!(err.matches("no [crash] section (logged once)").count(), 1, "{err}");
    assert_eq!(err.matches("no [fatal] section (logged once)").count(), 1, "{err}");
    assert_eq!(l.stdout.text(), format!("{READY}{OK}{OK}{OK}{OK}"));
    assert!(read_file(&out).is_empty());
}

#[test]
fn a_bad_configuration_at_start_is_an_error_and_writes_nothing_to_stdout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("alarms.toml");
    std::fs::write(&config, "[crash]\nactions = [\"nowhere\"]\n").expect("config");
    let out = Command::new(util::shmetrics_bin())
        .args(["supervisor-listener", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere") && err.contains("alarms.toml"), "{err}");
}

/// supervisord from Debian's `supervisor` package.
fn supervisord() -> PathBuf {
    let found = Command::new("supervisord").arg("--version").output().map(|o| o.status.success());
    assert!(
        matches!(found, Ok(true)),
        "supervisord is not installed: install Debian's supervisor package \
         (`apt-get install -y --no-install-recommends supervisor`, as .ci/run does)"
    );
    PathBuf::from("supervisord")
}

#[test]
fn real_supervisord_crash_and_fatal_reach_the_actions() {
    let bin = supervisord();
    let tmp = tempfile::Builder::new().prefix("shm-sup").tempdir().expect("tempdir");
    let d = tmp.path();
    let (crash, fatal) = (d.join("crash.txt"), d.join("fatal.txt"));
    let alarms = d.join("alarms.toml");
    std::fs::write(
        &alarms,
        format!(
            "{}{}{}",
            // Crashes batched: delivered by the TICK_5 flush; FATAL at once.
            file_action("crashfile", &crash, 3600.0),
            file_action("fatalfile", &fatal, 0.0),
            rules(Some("\"crashfile\""), Some("\"fatalfile\""))
        ),
    )
    .expect("alarms");
    // The first run stays up past startsecs (RUNNING), then dies by SIGKILL: an unexpected exit.
    // Later runs die at once, before startsecs: BACKOFF, then FATAL after startretries. (With
    // startsecs = 0 a program never goes FATAL: it is RUNNING at once, so every death is an
    // EXITED and autorestart restarts it for ever.)
    let flag = d.join("ran-once");
    let conf = d.join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "{base}\
             [eventlistener:shm]\ncommand = {bin} supervisor-listener --config {alarms}\n\
             events = PROCESS_STATE_EXITED,PROCESS_STATE_FATAL,TICK_5\n\
             environment = SHMETRICS_LOG=\"debug\",NO_COLOR=\"1\"\n\
             stderr_logfile = {d}/listener.err\nstdout_logfile = {d}/listener.out\n\n\
             [program:crasher]\n\
             command = sh -c 'if [ -e {flag} ]; then kill -9 $$; fi; touch {flag}; sleep 1.5; kill -9 $$'\n\
             autorestart = true\nstartsecs = 1\nstartretries = 1\n\
             stdout_logfile = {d}/crasher.out\nstderr_logfile = {d}/crasher.err\n",
            d = d.display(),
            bin = util::shmetrics_bin().display(),
            alarms = alarms.display(),
            flag = flag.display(),
            base = util::supervisord_sections(d),
        ),
    )
    .expect("supervisord.conf");
    let out = std::fs::File::create(d.join("supervisord.out")).expect("out");
    let mut sup = Proc {
        child: Command::new(&bin)
            .args(["-n", "-c"])
            .arg(&conf)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn supervisord"),
    };
    let logs = || {
        format!(
            "supervisord.log:\n{}\nlistener.err:\n{}",
            read_file(&d.join("supervisord.log")),
            read_file(&d.join("listener.err"))
        )
    };

    // A wait, not a timing assertion: about 4 s on a quiet machine (start, a run past startsecs,
    // back-off, a retry, FATAL), much longer when the whole test suite shares two cores. On a
    // timeout the logs say where it stopped.
    let timeout = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let fatal_text = loop {
        let t = read_file(&fatal);
        if t.contains("Process crasher in group crasher has entered the FATAL state") {
            break t;
        }
        if let Ok(Some(s)) = sup.child.try_wait() {
            panic!("supervisord exited ({s}):\n{}", logs());
        }
        assert!(started.elapsed() < timeout, "no FATAL alarm after {timeout:?}:\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let crash_text = loop {
        let t = read_file(&crash);
        if t.contains("Process crasher in group crasher exited unexpectedly") {
            break t;
        }
        assert!(started.elapsed() < 2 * timeout, "no crash alarm (after a TICK_5):\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(crash_text.contains("from state RUNNING"), "{crash_text}");
    assert!(!fatal_text.contains("exited unexpectedly"), "{fatal_text}");

    sup.signal(Signal::SIGTERM);
    let status = sup.wait_timeout(Duration::from_secs(10));
    assert!(status.success(), "supervisord: {status}\n{}", logs());
    let log = read_file(&d.join("supervisord.log"));
    assert!(!log.contains("UNKNOWN"), "the listener went UNKNOWN:\n{}", logs());
    assert!(log.contains("crasher entered FATAL state"), "{}", logs());
    assert!(
        log.contains("stopped: shm (exit status 0)"),
        "the listener did not exit 0 on SIGTERM:\n{}",
        logs()
    );
    // supervisord logs what the listener wrote on stdout: protocol tokens only, all OK.
    let listener_out = read_file(&d.join("listener.out"));
    let mut rest = listener_out.strip_prefix(READY).unwrap_or_else(|| panic!("{listener_out:?}"));
    let mut answers = 0;
    while let Some(r) = rest.strip_prefix(OK) {
        rest = r;
        answers += 1;
    }
    assert!(rest.is_empty() && answers >= 3, "listener stdout: {listener_out:?}");
    let err = read_file(&d.join("listener.err"));
    assert!(!err.contains("ERROR") && !err.contains("malformed"), "{err}");
}
