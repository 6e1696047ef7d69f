//! The monitor port (zc.monitor / ftw.monitor line protocol), `shmetrics ctl` and HAProxy's health
//! check through it, with real processes and sockets: protocol conformance, hostile clients and
//! limits, health transitions with real workers, ctl's exit statuses, and a real haproxy
//! marking a server UP and DOWN.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shmetrics::server::monitor::{LINE_TIMEOUT, MAX_CONNECTIONS, MAX_LINE, MAX_MEASUREMENTS};

use crate::util::{self, Proc, Served};

const T: Duration = Duration::from_secs(10);
const INTERACTIVE: &str = "Interactive mode on.  Use \"quit\" To exit.\n";

/// An aggregator on a fresh directory, and its monitor address. Drops the aggregator before the
/// directory.
struct Agg {
    served: Served,
    monitor: SocketAddr,
    dir: PathBuf,
    tmp: tempfile::TempDir,
}

impl Agg {
    /// `shmetrics serve --dir TMP/mp <extra>` with extra environment.
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Agg {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mp");
        let d = dir.to_str().expect("utf-8 path").to_string();
        let mut args = vec!["serve", "--dir", &d];
        args.extend_from_slice(extra);
        let served = util::spawn_shmetrics(&args, env, tmp.path());
        let monitor = monitor_addr(&served);
        Agg { served, monitor, dir, tmp }
    }

    fn health(&self) -> String {
        ask(self.monitor, b"health_check\n")
    }

    fn wait_health(&self, want: &str) {
        let want = format!("{want}\n");
        let mut last = String::new();
        let start = Instant::now();
        while start.elapsed() < T {
            last = self.health();
            if last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("health never became {want:?}; last {last:?}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.served.log).unwrap_or_default()
    }

    /// No panic in the aggregator's log, and /metrics still answers.
    fn assert_unharmed(&self) {
        assert_eq!(util::http_get(self.served.addr, "/metrics", &[]).status, 200);
        let log = self.log();
        assert!(!log.contains("panicked"), "the aggregator panicked:\n{log}");
    }
}

/// The monitor address from the aggregator's `monitor port on ADDR` log line.
fn monitor_addr(served: &Served) -> SocketAddr {
    util::wait_for(T, "the `monitor port on` log line", || {
        let log = std::fs::read_to_string(&served.log).ok()?;
        let rest = log.split("monitor port on ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    s
}

/// Sends `input` (without closing our side, as HAProxy and nc do) and reads until EOF.
fn ask_bytes(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(input).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read reply");
    out
}

fn ask(addr: SocketAddr, input: &[u8]) -> String {
    String::from_utf8(ask_bytes(addr, input)).expect("utf-8 reply")
}

/// Reads from `s` until the bytes received end with `want` (interactive mode has no terminator).
fn read_exactly(s: &mut TcpStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap_or_else(|e| panic!("reading {want:?}: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), want);
}

/// Whether the server has neither sent anything nor closed within `wait`.
fn still_open_and_silent(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut b = [0u8; 1];
    let r =
        matches!(s.read(&mut b), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    r
}

/// A `prefork_server` (ready workers) started directly with `SHMETRICS_DIR`, in its own process
/// group (killed whole on drop if still running).
struct Prefork {
    proc: Proc,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Prefork {
    fn start(dir: &Path, listen: &str, workers: usize) -> Prefork {
        let mut child = Command::new(util::example_bin("prefork_server"))
            .args(["--listen", listen, "--workers", &workers.to_string()])
            .env("SHMETRICS_DIR", dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn prefork_server");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let proc = Proc { child };
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listening line");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected prefork_server output {line:?}"));
        Prefork { proc, addr, _stdout: stdout }
    }

    /// SIGTERM: the master stops its workers and exits.
    fn stop(&mut self) {
        self.proc.signal(Signal::SIGTERM);
        let status = self.proc.wait_timeout(Duration::from_secs(15));
        assert!(status.success(), "prefork_server: {status}");
    }
}

impl Drop for Prefork {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.child.try_wait() {
            let _ = kill(Pid::from_raw(-self.proc.pid()), Signal::SIGKILL);
        }
    }
}

fn help_text() -> String {
    "Supported commands:\n\
     \x20 health_check -- Tell whether the job is able to serve requests\n\
     \x20 help -- List the commands, or describe one\n\
     \x20 interactive -- Keep the connection open for more commands\n\
     \x20 monitor -- Show what is running: the aggregator, the workers and this port\n\
     \x20 perf_metrics -- Performance figures of the job, as one line of JSON\n\
     \x20 pollsters -- Show the system pollsters in force and their interval\n\
     \x20 quit -- Close the connection\n\
     \x20 set_interval -- Set the seconds between two polls of the system pollsters\n\
     \x20 set_pollsters -- Set which system pollsters run\n"
        .to_string()
}

/// Every command, one per connection, with `\n` and `\r\n`, exact texts.
#[test]
fn commands_one_per_connection() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;

    // health_check on an empty directory: booting; `\r\n` and surrounding blanks are ignored.
    assert_eq!(ask(m, b"health_check\n"), "Instance is booting\n");
    assert_eq!(ask(m, b"health_check\r\n"), "Instance is booting\n");
    assert_eq!(ask(m, b"  health_check \t\r\n"), "Instance is booting\n");
    // An empty line before the command is ignored; one command per connection.
    assert_eq!(ask(m, b"\r\nhealth_check\nhelp\nquit\n"), "Instance is booting\n");

    // help and help COMMAND.
    assert_eq!(ask(m, b"help\n"), help_text());
    assert_eq!(
        ask(m, b"help   quit\r\n"),
        "Help for quit:\n\nClose the connection\n\nMostly useful in interactive mode (see \"interactive\").\n"
    );
    let h = ask(m, b"help health_check\n");
    assert!(
        h.starts_with("Help for health_check:\n\nTell whether the job is able to serve requests\n\n"),
        "{h}"
    );
    assert!(h.ends_with("\n") && h.contains("health_check\\r\\n"), "{h}");
    assert_eq!(ask(m, b"help nope\n"), "Invalid command 'nope'\nTry \"help\".\n");
    assert!(ask(m, b"help a b\n").starts_with("Error: help takes at most 1 argument (2 given)"));

    // Unknown commands, quoted as Python's repr does.
    assert_eq!(ask(m, b"x\n"), "Invalid command 'x'\nTry \"help\".\n");
    assert_eq!(ask(m, b"HEALTH_CHECK\n"), "Invalid command 'HEALTH_CHECK'\nTry \"help\".\n");
    assert_eq!(ask(m, b"it's\n"), "Invalid command \"it's\"\nTry \"help\".\n");
    assert_eq!(ask(m, b"it's\"\n"), "Invalid command 'it\\'s\"'\nTry \"help\".\n");
    assert_eq!(ask(m, b"a\\b\n"), "Invalid command 'a\\\\b'\nTry \"help\".\n");
    assert_eq!(ask(m, "héllo\n".as_bytes()), "Invalid command 'héllo'\nTry \"help\".\n");

    // perf_metrics: one line of JSON; ftw's `[db|-] [interval]` form; bounded interval.
    for cmd in ["perf_metrics\n", "perf_metrics main\n", "perf_metrics 0.2\n", "perf_metrics - 0.2\r\n"] {
        let r = ask(m, cmd.as_bytes());
        assert!(r.ends_with('\n') && r.matches('\n').count() == 1, "{cmd:?}: {r:?}");
        let doc: serde_json::Value = serde_json::from_str(&r).unwrap_or_else(|e| panic!("{cmd:?}: {e}: {r}"));
        assert!(doc["instance"]["uptime"].as_f64().is_some_and(|u| u >= 0.0), "{cmd:?}: {r}");
    }
    for bad in ["0", "-1", "10.5", "nan", "- soon"] {
        let r = ask(m, format!("perf_metrics {bad}\n").as_bytes());
        assert!(
            r.starts_with("Error: perf_metrics interval must be a number of seconds in (0, 10]"),
            "{bad}: {r}"
        );
        assert_eq!(r.matches('\n').count(), 1, "{r}");
    }
    assert!(ask(m, b"perf_metrics - 1 2\n")
        .starts_with("Error: perf_metrics takes at most 2 arguments (3 given)"));

    // monitor: the aggregator first, the port's own account last (this connection is open).
    let mon = ask(m, b"monitor\n");
    assert!(mon.starts_with("aggregator pid "), "{mon:?}");
    // This connection, and maybe earlier ones still draining their input (LINGER).
    let port = mon.lines().last().unwrap_or("");
    let open: usize = port
        .strip_prefix("monitor port: ")
        .and_then(|r| r.strip_suffix(" of 512 connections open, 0 of 4 perf_metrics measurements running"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{mon:?}"));
    assert!((1..=20).contains(&open), "{mon:?}");

    // Arguments where none are taken; quit and interactive outside interactive mode.
    assert!(ask(m, b"health_check now\n").starts_with("Error: health_check takes at most 0 arguments"));
    assert_eq!(ask(m, b"quit\n"), "Goodbye.\n");

    // A command without its newline is never run: the client closing gets nothing.
    for partial in [&b"health_check"[..], b"help", b"quit", b"\r\n\r\nmonitor"] {
        let mut s = connect(m);
        s.write_all(partial).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read");
        assert!(out.is_empty(), "{partial:?} ran: {:?}", String::from_utf8_lossy(&out));
    }
    agg.assert_unharmed();
}

/// `interactive`: several commands on one connection, an empty line repeats, `quit` closes.
#[test]
fn interactive_mode() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;

    // Step by step: the connection stays open between commands.
    let mut s = connect(m);
    s.write_all(b"interactive\r\n").expect("write");
    read_exactly(&mut s, INTERACTIVE);
    assert!(still_open_and_silent(&mut s, Duration::from_millis(300)));
    s.write_all(b"health_check\n").expect("write");
    read_exactly(&mut s, "Instance is booting\n");
    s.write_all(b"\n").expect("write");
    read_exactly(&mut s, "Instance is booting\n");
    s.write_all(b"\r\n").expect("write");
    read_exactly(&mut s, "Instance is booting\n");
    s.write_all(b"perf_metrics\n").expect("write");
    let mut line = String::new();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    r.read_line(&mut line).expect("json line");
    assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok(), "{line}");
    assert!(still_open_and_silent(&mut s, Duration::from_millis(200)));
    s.write_all(b"quit\n").expect("write");
    let mut rest = String::new();
    r.read_to_string(&mut rest).expect("read to EOF");
    assert_eq!(rest, "Goodbye.\n");

    // Pipelined in one write: the whole transcript, then EOF.
    let t = ask(m, b"interactive\nhealth_check\n\nbogus\n\nhelp quit\ninteractive\nquit\nhealth_check\n");
    let invalid = "Invalid command 'bogus'\nTry \"help\".\n";
    let expected = format!(
        "{INTERACTIVE}Instance is booting\nInstance is booting\n{invalid}{invalid}Help for quit:\n\n\
         Close the connection\n\nMostly useful in interactive mode (see \"interactive\").\n\
         {INTERACTIVE}Goodbye.\n"
    );
    assert_eq!(t, expected);

    // The client closing in interactive mode: a last line without newline is not run.
    let mut s = connect(m);
    s.write_all(b"interactive\nhealth_check\nhelp").expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert_eq!(out, format!("{INTERACTIVE}Instance is booting\n"));
    agg.assert_unharmed();
}

/// Garbage, NUL bytes and over-long lines: an answer, never a panic; the aggregator unharmed.
#[test]
fn garbage_and_long_lines() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;

    assert_eq!(ask(m, b"\x00\n"), "Invalid command '\\x00'\nTry \"help\".\n");
    assert_eq!(ask(m, b"health_check\x00\r\n"), "Invalid command 'health_check\\x00'\nTry \"help\".\n");
    assert_eq!(ask(m, b"\x01\x7f\x1bx\n"), "Invalid command '\\x01\\x7f\\x1bx'\nTry \"help\".\n");
    assert_eq!(ask(m, b"\xff\xfe\xc3(\n"), "Invalid command '\\xff\\xfe\\xc3('\nTry \"help\".\n");
    // \x1c..\x1f separate words as in Python's str.split().
    assert_eq!(ask(m, b"help\x1fquit\n").lines().next(), Some("Help for quit:"));

    // Random binary garbage (deterministic), starting with a non-blank byte and with a newline
    // within MAX_LINE: each connection gets "Invalid command …", never silence or a reset.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..20 {
        let len = 100 + round * 3000;
        let mut garbage: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        garbage[0] = b'Z';
        garbage[(len / 2).min(3000)] = b'\n';
        let r = String::from_utf8_lossy(&ask_bytes(m, &garbage)).into_owned();
        assert!(
            r.starts_with("Invalid command 'Z") || r.starts_with("Invalid command \"Z"),
            "round {round}: {r:?}"
        );
        assert!(r.ends_with("\nTry \"help\".\n") && r.lines().count() == 2, "round {round}: {r:?}");
        // Garbage without any newline, then EOF: nothing is run, nothing is said.
        let mut s = connect(m);
        let no_newline: Vec<u8> = garbage.iter().copied().filter(|&b| b != b'\n').take(MAX_LINE).collect();
        s.write_all(&no_newline).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read");
        assert!(out.is_empty(), "round {round}: {:?}", String::from_utf8_lossy(&out));
    }

    // Exactly MAX_LINE bytes before the newline are accepted; one more is refused.
    let longest = format!("{:<MAX_LINE$}\n", "health_check");
    assert_eq!(ask(m, longest.as_bytes()), "Instance is booting\n");
    let too_long = format!("{:<w$}\n", "health_check", w = MAX_LINE + 1);
    assert_eq!(
        ask(m, too_long.as_bytes()),
        format!("Error: line too long (more than {MAX_LINE} bytes); closing\n")
    );
    // Without any newline: refused once the limit is passed, connection closed.
    let start = Instant::now();
    let r = ask(m, &vec![b'a'; 4 * MAX_LINE]);
    assert_eq!(r, format!("Error: line too long (more than {MAX_LINE} bytes); closing\n"));
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    // Same in interactive mode.
    let mut input = b"interactive\n".to_vec();
    input.extend(vec![b'x'; 2 * MAX_LINE]);
    input.push(b'\n');
    assert_eq!(
        ask(m, &input),
        format!("{INTERACTIVE}Error: line too long (more than {MAX_LINE} bytes); closing\n")
    );

    assert_eq!(agg.health(), "Instance is booting\n");
    agg.assert_unharmed();
}

/// A client that sends half a line and stalls blocks nobody, and is cut off after LINE_TIMEOUT
/// without its command being run.
#[test]
fn slow_client_times_out() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;
    let mut slow = connect(m);
    let started = Instant::now();
    slow.write_all(b"health_").expect("write");
    let mut silent = connect(m); // sends nothing at all

    // Meanwhile everybody else is served at once, and /metrics works.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(agg.health(), "Instance is booting\n");
        assert!(t.elapsed() < Duration::from_secs(2), "a health check took {:?}", t.elapsed());
        assert_eq!(util::http_get(agg.served.addr, "/metrics", &[]).status, 200);
    }
    assert!(started.elapsed() < LINE_TIMEOUT / 2, "the test itself is too slow: {:?}", started.elapsed());
    assert!(still_open_and_silent(&mut slow, Duration::from_millis(100)));

    // The stalled client finishes too late: the command is not run.
    slow.set_read_timeout(Some(LINE_TIMEOUT + Duration::from_secs(5))).expect("timeout");
    let mut out = String::new();
    slow.read_to_string(&mut out).expect("read");
    let waited = started.elapsed();
    let expected = format!("Error: no complete command line within {} s; closing\n", LINE_TIMEOUT.as_secs());
    assert_eq!(out, expected);
    assert!(waited >= LINE_TIMEOUT - Duration::from_millis(200), "closed after {waited:?}");
    assert!(waited < LINE_TIMEOUT + Duration::from_secs(3), "closed after {waited:?}");
    let _ = slow.write_all(b"check\n"); // too late: nothing more comes back
    let mut out = String::new();
    silent.read_to_string(&mut out).expect("read");
    assert_eq!(out, expected);
    agg.assert_unharmed();
}

/// What a connection closed to make room is told.
const EVICTED: &str =
    "Error: closed to make room for new connections (too many open); send the command right after connecting\n";

/// `Some(bytes received)` once the server has closed `s`, `None` while it is open and silent (reads
/// what is there without waiting; once something came, up to the close that follows it).
fn closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_nonblocking(true).expect("nonblocking");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let r = loop {
        match s.read(&mut buf) {
            Ok(0) => break Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Nothing yet: still open. (Something, but not the end yet: the server closes right
            // after its last line, so wait for the end; returning `None` here would drop what
            // was read, and the next call would see a bare close.)
            Err(e) if e.kind() == ErrorKind::WouldBlock && got.is_empty() => break None,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                s.set_nonblocking(false).expect("blocking");
                let _ = s.read_to_end(&mut got);
                break Some(got);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break Some(got),
            Err(e) => panic!("read: {e}"),
        }
    };
    s.set_nonblocking(false).expect("blocking");
    r
}

/// Connects and runs `command` in interactive mode; returns once the server has read the
/// command line (it answered `interactive` first), so the command is running.
fn start_interactive(addr: SocketAddr, command: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(format!("interactive\n{command}\n").as_bytes()).expect("write");
    read_exactly(&mut s, INTERACTIVE);
    s
}

/// With every slot taken, newcomers are still served: each evicts the connection idle the
/// longest, which is told so and closed. A connection running a command is never evicted, and one
/// that just ran a command counts as idle only from then.
#[test]
fn a_full_port_evicts_the_longest_idle_connection() {
    util::raise_open_files_limit(4 * MAX_CONNECTIONS as u64);
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;
    // conns[1] runs a 5 s measurement (busy); the others are silent.
    let mut conns: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|i| if i == 1 { start_interactive(m, "perf_metrics 5") } else { connect(m) })
        .collect();
    // Newcomers stay open (interactive), so no slot is ever freed: each one evicts.
    let newcomer = || {
        let mut s = start_interactive(m, "health_check");
        read_exactly(&mut s, "Instance is booting\n");
        s
    };
    let mut newcomers = vec![newcomer()];
    // The port was full (connections are admitted in order): the oldest went.
    let b = util::wait_for(T, "conns[0] to be evicted", || closed(&mut conns[0]));
    assert_eq!(String::from_utf8_lossy(&b), EVICTED);
    // conns[2] runs a command: idle again from now, the youngest of the old ones.
    conns[2].write_all(b"interactive\n").expect("write");
    read_exactly(&mut conns[2], INTERACTIVE);
    newcomers.push(newcomer());
    newcomers.push(newcomer());
    for i in [3, 4] {
        let b = util::wait_for(T, "an eviction", || closed(&mut conns[i]));
        assert_eq!(String::from_utf8_lossy(&b), EVICTED, "conns[{i}]");
    }
    for (i, c) in conns.iter_mut().enumerate().filter(|(i, _)| ![0, 3, 4].contains(i)) {
        assert_eq!(closed(c), None, "conns[{i}] was closed");
    }

    // The busy one finishes its measurement; the others still answer.
    let mut line = String::new();
    BufReader::new(conns[1].try_clone().expect("clone")).read_line(&mut line).expect("perf_metrics reply");
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(doc["instance"]["uptime"].is_number(), "{doc}");
    conns[2].write_all(b"health_check\n").expect("write");
    read_exactly(&mut conns[2], "Instance is booting\n");
    for s in &mut newcomers {
        s.write_all(b"\n").expect("write");
        read_exactly(s, "Instance is booting\n");
    }
    assert!(agg.log().contains("connections open; closing the one idle the longest"), "{}", agg.log());
    drop((conns, newcomers));
    // Capacity comes back.
    assert_eq!(agg.health(), "Instance is booting\n");
    agg.assert_unharmed();
}

/// Hostile clients of the monitor port, `n` connections from a few threads: a third silent, a
/// third trickling a partial line (one byte a second), a third idle in interactive mode. Every
/// connection the server cuts is reopened at once.
struct Hog {
    stop: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start(addr: SocketAddr, n: usize) -> Hog {
        util::raise_open_files_limit(4 * n as u64);
        let (stop, cuts) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let threads = (0..4)
            .map(|t| {
                let (stop, cuts) = (stop.clone(), cuts.clone());
                std::thread::spawn(move || {
                    let open = |kind: usize| -> Option<TcpStream> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                        if kind == 2 {
                            s.write_all(b"interactive\n").ok()?;
                        }
                        s.set_nonblocking(true).ok()?;
                        Some(s)
                    };
                    let kinds: Vec<usize> = (0..n).filter(|i| i % 4 == t).map(|i| i % 3).collect();
                    let mut socks: Vec<Option<TcpStream>> = kinds.iter().map(|&k| open(k)).collect();
                    let mut last_trickle = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let trickle = last_trickle.elapsed() >= Duration::from_secs(1);
                        if trickle {
                            last_trickle = Instant::now();
                        }
                        for (sock, &kind) in socks.iter_mut().zip(&kinds) {
                            let mut cut = sock.is_none();
                            if let Some(s) = sock.as_mut() {
                                let mut b = [0u8; 512];
                                loop {
                                    match s.read(&mut b) {
                                        Ok(0) => cut = true,
                                        Ok(_) => continue,
                                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                                        Err(_) => cut = true,
                                    }
                                    break;
                                }
                                if kind == 1 && trickle && !cut && s.write_all(b"h").is_err() {
                                    cut = true;
                                }
                            }
                            if cut {
                                if sock.is_some() {
                                    cuts.fetch_add(1, Ordering::Relaxed);
                                }
                                *sock = open(kind);
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Hog { stop, cuts, threads }
    }

    /// Stops the hog; how many of its connections the server cut.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("hog thread");
        }
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Twice MAX_CONNECTIONS silent, trickling and idle connections, reopened whenever cut, for
/// longer than LINE_TIMEOUT: every `health_check` is answered `OK`, none is refused.
#[test]
fn slot_hogs_cannot_keep_health_checks_out() {
    let agg = Agg::start(&[], &[]);
    let _app = Prefork::start(&agg.dir, "127.0.0.1:0", 2);
    agg.wait_health("OK");
    let hog = Hog::start(agg.monitor, 2 * MAX_CONNECTIONS);
    // Let it fill the port first.
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < LINE_TIMEOUT + Duration::from_secs(2) {
        // `ask` reads with a 20 s timeout: a hang fails the test instead of stalling it.
        answers.push(ask(agg.monitor, b"health_check\r\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let cuts = hog.stop();
    let not_ok: Vec<&String> = answers.iter().filter(|a| *a != "OK\n").collect();
    assert!(not_ok.is_empty(), "{} of {} health checks were not OK: {not_ok:?}", not_ok.len(), answers.len());
    assert!(answers.len() >= 20, "only {} health checks", answers.len());
    // The hog was really there: its connections were evicted and reopened.
    assert!(cuts >= MAX_CONNECTIONS, "only {cuts} hog connections were cut");
    assert!(agg.log().contains("closing the one idle the longest"), "{}", agg.log());
    agg.assert_unharmed();
}

/// At most MAX_MEASUREMENTS `perf_metrics <interval>` run at once; the next one is told so, and
/// `perf_metrics` without an interval still answers.
#[test]
fn perf_metrics_measurements_are_limited() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;
    let mut running: Vec<TcpStream> =
        (0..MAX_MEASUREMENTS).map(|_| start_interactive(m, "perf_metrics 8")).collect();
    let refused = format!(
        "Error: too many perf_metrics measurements at once (limit {MAX_MEASUREMENTS}); try again later, \
         or without an interval\n"
    );
    // The four are running once their commands have been read. Probing with a measurement of our
    // own could take a permit before the last of the four was read (it did, in CI): ask `monitor`.
    let all_running = format!("{MAX_MEASUREMENTS} of {MAX_MEASUREMENTS} perf_metrics measurements running\n");
    util::wait_for(Duration::from_secs(10), "the measurements to be running", || {
        ask(m, b"monitor\n").ends_with(&all_running).then_some(())
    });
    assert_eq!(ask(m, b"perf_metrics 0.1\n"), refused);
    assert_eq!(ask(m, b"perf_metrics - 2\n"), refused);
    let doc: serde_json::Value = serde_json::from_str(&ask(m, b"perf_metrics\n")).expect("JSON");
    assert!(doc["instance"]["uptime"].is_number(), "{doc}");
    for s in &mut running {
        let mut line = String::new();
        BufReader::new(s.try_clone().expect("clone")).read_line(&mut line).expect("reply");
        let doc: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(doc["instance"]["uptime"].is_number(), "{doc}");
    }
    // Finished: measurements are possible again.
    let doc: serde_json::Value = serde_json::from_str(&ask(m, b"perf_metrics 0.1\n")).expect("JSON");
    assert!(doc["instance"]["uptime"].is_number(), "{doc}");
    agg.assert_unharmed();
}

/// Health through the monitor port as workers come and go: booting → OK → No live workers.
#[test]
fn health_transitions_with_real_workers() {
    let agg = Agg::start(&[], &[]);
    assert_eq!(agg.health(), "Instance is booting\n");
    let mut app = Prefork::start(&agg.dir, "127.0.0.1:0", 2);
    agg.wait_health("OK");
    app.stop();
    agg.wait_health("No live workers");

    // Workers that never say they are ready (`workload` does not call set_ready) are not OK.
    let held = util::workload(&agg.dir, &["--hold", "--workers", "2"]);
    std::thread::sleep(Duration::from_millis(300));
    let h = agg.health();
    assert_ne!(h, "OK\n");
    drop(held);
    agg.assert_unharmed();
}

/// `--min-workers 3` with 2 ready workers.
#[test]
fn health_min_workers() {
    let agg = Agg::start(&["--min-workers", "3"], &[]);
    let _app = Prefork::start(&agg.dir, "127.0.0.1:0", 2);
    agg.wait_health("Only 2 of 3 required workers are ready");
    let _more = Prefork::start(&agg.dir, "127.0.0.1:0", 1);
    agg.wait_health("OK");
}

/// A tiny HTTP server for `--warmup-url`: 503 until `ready` is set, then 200.
struct WarmupTarget {
    url: String,
    ready: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl WarmupTarget {
    fn start() -> WarmupTarget {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/@@warmup", listener.local_addr().expect("addr"));
        let (ready, hits, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (r, h, s) = (ready.clone(), hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let status = if r.load(Ordering::SeqCst) { "200 OK" } else { "503 Service Unavailable" };
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        WarmupTarget { url, ready, hits, stop }
    }
}

impl Drop for WarmupTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `--warmup-url`: "Warmup in progress" until the URL answers 2xx; SHMETRICS_AUTOWARMUP=0 turns it
/// off.
#[test]
fn health_warmup() {
    let target = WarmupTarget::start();
    let agg = Agg::start(&["--warmup-url", &target.url], &[]);
    // Booting comes first, while no worker has appeared.
    assert_eq!(agg.health(), "Instance is booting\n");
    let _app = Prefork::start(&agg.dir, "127.0.0.1:0", 2);
    agg.wait_health("Warmup in progress");
    util::wait_for(T, "two warmup attempts", || (target.hits.load(Ordering::SeqCst) >= 2).then_some(()));
    assert_eq!(agg.health(), "Warmup in progress\n");
    target.ready.store(true, Ordering::SeqCst);
    agg.wait_health("OK");

    // Disabled: OK without asking the (still failing) URL.
    let failing = WarmupTarget::start();
    let agg2 = Agg::start(&["--warmup-url", &failing.url], &[("SHMETRICS_AUTOWARMUP", "0")]);
    let _app2 = Prefork::start(&agg2.dir, "127.0.0.1:0", 1);
    agg2.wait_health("OK");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(failing.hits.load(Ordering::SeqCst), 0);
}

fn ctl(monitor: SocketAddr, args: &[&str]) -> Output {
    Command::new(util::shmetrics_bin())
        .arg("ctl")
        .arg("--monitor")
        .arg(monitor.to_string())
        .args(args)
        .env_remove("SHMETRICS_MONITOR")
        .output()
        .expect("run shmetrics ctl")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `shmetrics ctl`'s exit statuses: 0 OK-type, 1 negative, 2 invalid command, 3 no reply.
#[test]
fn ctl_exit_codes() {
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;

    let o = ctl(m, &["health_check"]);
    assert_eq!((code(&o), out(&o).as_str()), (1, "Instance is booting\n"));
    let o = ctl(m, &[]);
    assert_eq!((code(&o), out(&o)), (0, help_text()));
    let o = ctl(m, &["help", "perf_metrics"]);
    assert_eq!(code(&o), 0);
    assert!(out(&o).starts_with("Help for perf_metrics:\n\n"));

    let _app = Prefork::start(&agg.dir, "127.0.0.1:0", 2);
    agg.wait_health("OK");
    let o = ctl(m, &["health_check"]);
    assert_eq!((code(&o), out(&o).as_str()), (0, "OK\n"));

    for args in [&["perf_metrics"][..], &["perf_metrics", "-", "0.2"], &["perf_metrics", "0.2"]] {
        let o = ctl(m, args);
        assert_eq!(code(&o), 0, "{args:?}: {}", out(&o));
        let doc: serde_json::Value = serde_json::from_str(&out(&o)).expect("JSON");
        assert!(doc["instance"]["uptime"].is_number(), "{doc}");
    }
    let o = ctl(m, &["perf_metrics", "99"]);
    assert_eq!(code(&o), 1, "{}", out(&o));
    let o = ctl(m, &["monitor"]);
    assert_eq!(code(&o), 0);
    assert!(!out(&o).is_empty());

    let o = ctl(m, &["frobnicate", "now"]);
    assert_eq!((code(&o), out(&o).as_str()), (2, "Invalid command 'frobnicate'\nTry \"help\".\n"));

    // Nothing listening: 3, and the message names the address.
    let port = util::free_port();
    let nobody: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let o = ctl(nobody, &["health_check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 3, "{err}");
    assert!(err.contains(&nobody.to_string()) && err.contains("refused"), "{err}");
    assert!(o.stdout.is_empty());

    // Accepting but never answering: 3 after --timeout.
    let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mute_addr = mute.local_addr().expect("addr");
    let start = Instant::now();
    let o = Command::new(util::shmetrics_bin())
        .args(["ctl", "--timeout", "1", "--monitor", &mute_addr.to_string(), "health_check"])
        .output()
        .expect("ctl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 3, "{err}");
    assert!(err.contains(&mute_addr.to_string()), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(mute);

    // --help documents the exit statuses.
    let o = Command::new(util::shmetrics_bin()).args(["ctl", "--help"]).output().expect("ctl --help");
    let help = out(&o);
    for s in ["Exit status", "  0  ", "  1  ", "  2  ", "  3  "] {
        assert!(help.contains(s), "{s:?} missing from:\n{help}");
    }
}

/// A running haproxy, killed on drop.
struct Haproxy {
    proc: Proc,
    sock: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// The `show stat` row of backend `app`, server `app1`, as (status, check status, last check).
    fn server_state(&self) -> Option<(String, String, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.sock).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        s.read_to_string(&mut csv).ok()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, st, cs, lc) =
            (col("pxname")?, col("svname")?, col("status")?, col("check_status")?, col("last_chk")?);
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.get(px) == Some(&"app") && f.get(sv) == Some(&"app1"))
            .map(|f| {
                let g = |i: usize| f.get(i).copied().unwrap_or("").to_string();
                (g(st), g(cs), g(lc))
            })
    }

    /// Waits until the server's status is exactly `want` (`UP` or `DOWN`).
    fn wait_status(&self, want: &str, timeout: Duration) {
        let mut last = None;
        let start = Instant::now();
        while start.elapsed() < timeout {
            last = self.server_state();
            if last.as_ref().is_some_and(|(s, _, _)| s == want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("haproxy never marked app1 {want} within {timeout:?}; last (status, check, last_chk) {last:?}\n{log}");
    }
}

/// Renders conf/haproxy.cfg for this test: the same check directives, local addresses.
fn render_haproxy_cfg(sock: &Path, frontend: u16, app: SocketAddr, monitor: SocketAddr) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/haproxy.cfg");
    let mut cfg = std::fs::read_to_string(&path).expect("conf/haproxy.cfg");
    for directive in [
        "option tcp-check",
        "tcp-check connect port 9181",
        "tcp-check send health_check\\r\\n",
        "tcp-check expect string OK",
        "server app1 127.0.0.1:8000 check port 9181 inter 2s",
    ] {
        assert!(cfg.lines().any(|l| l.trim().starts_with(directive)), "conf/haproxy.cfg lacks {directive:?}");
    }
    let subst = [
        ("/run/haproxy/admin.sock", sock.to_str().expect("utf-8").to_string()),
        ("bind *:8080", format!("bind 127.0.0.1:{frontend}")),
        ("127.0.0.1:8000", app.to_string()),
        ("port 9181", format!("port {}", monitor.port())),
    ];
    for (from, to) in subst {
        assert!(cfg.contains(from), "conf/haproxy.cfg no longer contains {from:?}");
        cfg = cfg.replace(from, &to);
    }
    assert_eq!(monitor.ip().to_string(), "127.0.0.1");
    cfg
}

impl Haproxy {
    /// haproxy with conf/haproxy.cfg checking `agg`'s monitor port for an app server on `app`.
    /// Returns it and its frontend's address.
    fn start(agg: &Agg, app: SocketAddr) -> (Haproxy, SocketAddr) {
        // Debian installs it in /usr/sbin, which is not on every user's PATH.
        let haproxy = ["haproxy", "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|h| Command::new(h).arg("-v").output().is_ok_and(|o| o.status.success()))
            .unwrap_or_else(|| {
                panic!(
                    "haproxy is not installed: this test runs a real HAProxy against conf/haproxy.cfg. \
                     Install it with `apt-get install -y haproxy` (Debian/Ubuntu; .ci/run does it)."
                )
            });
        let tmp = agg.tmp.path();
        let sock = tmp.join("haproxy.sock");
        let frontend = util::free_port();
        let cfg_path = tmp.join("haproxy.cfg");
        std::fs::write(&cfg_path, render_haproxy_cfg(&sock, frontend, app, agg.monitor)).expect("write cfg");

        let check = Command::new(haproxy).arg("-c").arg("-f").arg(&cfg_path).output().expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = tmp.join("haproxy.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(haproxy)
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn haproxy");
        let hx = Haproxy { proc: Proc { child }, sock, log };
        util::wait_for(T, "haproxy's stats socket", || hx.server_state());
        (hx, format!("127.0.0.1:{frontend}").parse().expect("addr"))
    }
}

/// A real haproxy health-checks an app server through the monitor port as conf/haproxy.cfg
/// says: DOWN while the job is booting, UP once its workers are ready (and traffic flows), DOWN
/// again when they are gone.
#[test]
fn haproxy_checks_the_monitor_port() {
    let agg = Agg::start(&[], &[]);
    let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
    let (mut hx, through) = Haproxy::start(&agg, app);

    // Booting: the check reads "Instance is booting", no "OK": DOWN.
    hx.wait_status("DOWN", Duration::from_secs(8));
    let (_, check_status, _) = hx.server_state().expect("state");
    assert!(
        check_status.starts_with("L7"),
        "the check should fail on content, not connection: {check_status}"
    );

    // Ready workers: UP, and traffic reaches them through haproxy.
    let mut app_proc = Prefork::start(&agg.dir, &app.to_string(), 2);
    assert_eq!(app_proc.addr, app);
    agg.wait_health("OK");
    hx.wait_status("UP", Duration::from_secs(8));
    let r = util::http_get(through, "/", &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("hello from "), "{}", r.text());

    // Workers gone: "No live workers": DOWN.
    app_proc.stop();
    agg.wait_health("No live workers");
    hx.wait_status("DOWN", Duration::from_secs(8));
    assert!(matches!(hx.proc.child.try_wait(), Ok(None)), "haproxy exited");
    drop(hx);
    agg.assert_unharmed();
}

/// The slot hog against a real haproxy: the healthy server stays UP (with `inter 2s fall 2`, two
/// refused checks in a row would take it DOWN) while twice MAX_CONNECTIONS hostile connections
/// are held and reopened, for longer than LINE_TIMEOUT.
#[test]
fn haproxy_keeps_a_healthy_server_up_under_a_slot_hog() {
    let agg = Agg::start(&[], &[]);
    let app: SocketAddr = format!("127.0.0.1:{}", util::free_port()).parse().expect("addr");
    let (hx, through) = Haproxy::start(&agg, app);
    let _app = Prefork::start(&agg.dir, &app.to_string(), 2);
    agg.wait_health("OK");
    hx.wait_status("UP", Duration::from_secs(8));

    let hog = Hog::start(agg.monitor, 2 * MAX_CONNECTIONS);
    let start = Instant::now();
    let mut states = Vec::new();
    while start.elapsed() < LINE_TIMEOUT + Duration::from_secs(4) {
        let state = hx.server_state().expect("haproxy state");
        // A check in progress is shown as "* <last status>".
        if state.0 != "UP" || !state.1.trim_start_matches("* ").starts_with("L7OK") {
            states.push((start.elapsed(), state));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cuts = hog.stop();
    let log = std::fs::read_to_string(&hx.log).unwrap_or_default();
    assert!(states.is_empty(), "under the hog haproxy saw: {states:?}\n{log}");
    assert!(cuts >= MAX_CONNECTIONS, "only {cuts} hog connections were cut");
    // Traffic still flows.
    assert_eq!(util::http_get(through, "/", &[]).status, 200);
    drop(hx);
    agg.assert_unharmed();
}

/// The soft open-files limit of process `pid`.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).expect("soft limit")
}

/// `shmetrics ARGS` started by a shell with a soft open-files limit of 256, the `serving` log line.
fn with_low_soft_limit(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(util::shmetrics_bin())
        .args(args)
        .env("SHMETRICS_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let proc = Proc { child };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving http://") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("the `serving` log line");
    (proc, line)
}

/// Both ports need a descriptor per connection: `serve` and `run` raise their soft open-files
/// limit to the hard limit; the command `run` starts keeps the limit it was given.
#[test]
fn the_open_files_limit_is_raised_for_the_aggregator_only() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(hard > 256, "the hard open-files limit ({hard}) must be above 256 for this test");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let d = dir.to_str().expect("utf-8");
    let (serve, _) = with_low_soft_limit(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]);
    assert_eq!(soft_open_files(serve.child.id()), hard);
    drop(serve);

    let (run, line) = with_low_soft_limit(&["run", "--listen", "127.0.0.1:0", "--", "sleep", "60"]);
    let child: u32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split([',', ')']).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    assert_eq!(soft_open_files(run.child.id()), hard);
    assert_eq!(soft_open_files(child), 256);
    drop(run);
}

/// A burst of connections while the aggregator cannot accept (here: stopped) waits in the listen
/// queue (1024 long, not the usual 128) instead of having its handshakes dropped, and each is
/// served once the aggregator resumes.
#[test]
fn a_burst_of_connections_waits_in_the_listen_queue() {
    let burst = 500;
    util::raise_open_files_limit(4 * burst as u64);
    let agg = Agg::start(&[], &[]);
    let m = agg.monitor;
    agg.served.proc.signal(Signal::SIGSTOP);
    let mut conns = Vec::new();
    let mut failed = None;
    for i in 0..burst {
        match TcpStream::connect_timeout(&m, Duration::from_secs(1)) {
            Ok(s) => conns.push(s),
            Err(e) => {
                failed = Some(format!("connection {i}: {e}"));
                break;
            }
        }
    }
    agg.served.proc.signal(Signal::SIGCONT);
    assert_eq!(failed, None, "the listen queue overflowed");
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        s.write_all(b"health_check\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(out, "Instance is booting\n", "connection {i}");
    }
    agg.assert_unharmed();
}
