//! A small pre-fork HTTP/1.1 server (one process per worker, like gunicorn's sync workers) that
//! exports job-wide metrics through shmetrics.
//!
//! What it shows:
//! - the master registers every metric through [`Registry::global`] *before* forking, and even
//!   creates a few series handles; each forked worker gets its own file automatically and the
//!   handles taken in the master keep working in the workers, without double counting;
//! - workers that exit cleanly (`--max-requests`), crash (`/crash` aborts) or are killed get
//!   respawned by the master, each respawn writing a new file;
//! - the three usual HTTP metrics:
//!   - `http_requests_total{method,path,code}` (counter),
//!   - `http_request_duration_seconds{method,path}` (histogram, [`DEFAULT_BUCKETS`]),
//!   - `http_requests_in_flight` (gauge, [`GaugeMode::LiveSum`]: a crashed worker's in-flight
//!     request disappears from the sum with the worker).
//!
//!   `path` is the route, not the raw path, to keep cardinality bounded: one of `/`, `/slow`,
//!   `/burn`, `/status`, `/pid`, `/crash` or `other`; `method` is a standard method name or `other`; `code`
//!   is the numeric status. A `/crash` request is counted with `code="0"` (no response) just before
//!   the worker aborts, so its counter survives in the dead worker's file.
//!
//! Routes (one request per connection, `Connection: close`):
//! - `/` → 200 `hello from <pid>`;
//! - `/slow?ms=N` → sleeps N ms (default 100, capped at 10000) then 200;
//! - `/burn?ms=N` → spins on the CPU for N ms (same default and cap) then 200;
//! - `/status/NNN` → responds with status NNN (100..=599, anything else is a 400);
//! - `/pid` → 200 with the worker's pid;
//! - `/crash` → the worker calls `abort()` without answering;
//! - anything else → 404. A malformed request (or a head over 16 KiB) gets a 400, a client that
//!   stops half-way through its request head for 5 s a 408; a connection that sends nothing for
//!   5 s is closed without an answer.
//!
//! Signals: SIGTERM or SIGINT to the master stops every worker and exits 0; SIGHUP restarts the
//! workers (each is sent SIGTERM and replaced). Workers exit 0 on SIGTERM/SIGINT.
//!
//! Run it:
//!
//! ```text
//! mkdir -p /tmp/metrics
//! SHMETRICS_DIR=/tmp/metrics cargo run --example prefork_server -- --workers 4
//! # or, with the aggregator serving the merged metrics:
//! cargo build --example prefork_server
//! shmetrics run -- target/debug/examples/prefork_server --workers 4
//! ```
//!
//! Once the workers are forked the master prints `listening on <addr> with <n> workers` on stdout;
//! `--listen 127.0.0.1:0` picks a free port and prints it.
//!
//! The only `unsafe` is the `fork()` call itself (`nix::unistd::fork` is an `unsafe fn`): the master
//! is single-threaded whenever it forks, which is what that function requires.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use shmetrics::{Counter, Family, Gauge, GaugeMode, Histogram, Registry, DEFAULT_BUCKETS};

/// Largest request head we read.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `/slow` sleep.
const MAX_SLOW_MS: u64 = 10_000;
/// How long the master waits for workers to exit after SIGTERM before sending SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "A pre-fork HTTP/1.1 server exporting job-wide metrics through shmetrics")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Number of worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// A worker exits (status 0) after serving this many requests and is replaced; 0 = never.
    #[arg(long, default_value_t = 0)]
    max_requests: u64,
}

/// Forks the process.
#[allow(unsafe_code)]
fn fork() -> nix::Result<ForkResult> {
    // SAFETY: only the master forks, from its main thread, and the master never starts another
    // thread, so the child is a copy of a single-threaded process and may do anything it likes.
    unsafe { nix::unistd::fork() }
}

/// The signals the master handles with `sigwait` (blocked everywhere, inherited by workers).
fn master_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// The signals that stop a worker.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Metric families and cached series handles. Built in the master, copied into every worker by
/// `fork`; the handles created before the fork keep working in the workers.
struct Metrics {
    requests: Family<Counter>,
    duration: Family<Histogram>,
    in_flight: Gauge,
    counters: HashMap<(&'static str, &'static str, u16), Counter>,
    histograms: HashMap<(&'static str, &'static str), Histogram>,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics> {
        let requests = registry.counter_family(
            "http_requests_total",
            "HTTP requests handled, by method, route and status code.",
            &["method", "path", "code"],
        )?;
        let duration = registry.histogram_family(
            "http_request_duration_seconds",
            "Time spent handling HTTP requests, by method and route.",
            &DEFAULT_BUCKETS,
            &["method", "path"],
        )?;
        let in_flight =
            registry.gauge("http_requests_in_flight", "HTTP requests being handled.", GaugeMode::LiveSum)?;
        let mut metrics =
            Metrics { requests, duration, in_flight, counters: HashMap::new(), histograms: HashMap::new() };
        // Create the most common series now, in the master, so that the workers use handles taken
        // before the fork.
        metrics.counter("GET", "/", 200);
        metrics.histogram("GET", "/");
        Ok(metrics)
    }

    fn counter(&mut self, method: &'static str, route: &'static str, code: u16) -> Option<Counter> {
        if let Some(c) = self.counters.get(&(method, route, code)) {
            return Some(*c);
        }
        let code_str = code.to_string();
        match self.requests.with_labels(&[method, route, &code_str]) {
            Ok(c) => {
                self.counters.insert((method, route, code), c);
                Some(c)
            }
            Err(e) => {
                eprintln!("prefork_server: http_requests_total: {e}");
                None
            }
        }
    }

    fn histogram(&mut self, method: &'static str, route: &'static str) -> Option<Histogram> {
        if let Some(h) = self.histograms.get(&(method, route)) {
            return Some(*h);
        }
        match self.duration.with_labels(&[method, route]) {
            Ok(h) => {
                self.histograms.insert((method, route), h);
                Some(h)
            }
            Err(e) => {
                eprintln!("prefork_server: http_request_duration_seconds: {e}");
                None
            }
        }
    }

    fn record(&mut self, method: &'static str, route: &'static str, code: u16, started: Instant) {
        if let Some(c) = self.counter(method, route, code) {
            c.inc();
        }
        if let Some(h) = self.histogram(method, route) {
            h.observe(started.elapsed().as_secs_f64());
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");

    let listener = TcpListener::bind(&args.listen).with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;

    // Register the metrics before forking: the workers inherit them (fork-after-registration).
    let registry = Registry::global();
    let metrics = Metrics::register(registry)?;

    // Block the signals we handle before the first fork, so none is lost and workers inherit the
    // mask.
    let signals = master_signals();
    signals.thread_block()?;

    let mut master = Master {
        listener,
        metrics,
        max_requests: args.max_requests,
        target: args.workers,
        workers: HashSet::new(),
    };
    master.fill();

    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr} with {} workers", args.workers)?;
    out.flush()?;
    drop(out);

    loop {
        match signals.wait()? {
            Signal::SIGCHLD => {
                master.reap();
                master.fill();
            }
            Signal::SIGHUP => {
                eprintln!("prefork_server: SIGHUP, restarting workers");
                master.signal_all(Signal::SIGTERM);
            }
            sig => {
                eprintln!("prefork_server: {sig}, shutting down");
                master.shutdown();
                return Ok(());
            }
        }
    }
}

struct Master {
    listener: TcpListener,
    metrics: Metrics,
    max_requests: u64,
    target: usize,
    workers: HashSet<Pid>,
}

impl Master {
    /// Forks workers until there are `target` of them.
    fn fill(&mut self) {
        let mut failures = 0;
        let master = nix::unistd::getpid();
        while self.workers.len() < self.target {
            match fork() {
                Ok(ForkResult::Child) => {
                    // Die with the master, like gunicorn's workers: no orphans holding the socket.
                    // A master that died before the prctl sends no signal: then stop at once.
                    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                    if nix::unistd::getppid() != master {
                        std::process::exit(1);
                    }
                    let code = match worker(&self.listener, &mut self.metrics, self.max_requests) {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("prefork_server: worker {}: {e:#}", std::process::id());
                            1
                        }
                    };
                    std::process::exit(code);
                }
                Ok(ForkResult::Parent { child }) => {
                    self.workers.insert(child);
                }
                Err(e) => {
                    // Out of processes or memory: retry a little, then run short until the next
                    // worker exit triggers another attempt.
                    eprintln!("prefork_server: fork: {e}");
                    failures += 1;
                    if failures >= 5 {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Reaps every exited worker without blocking.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if code != 0 {
                        eprintln!("prefork_server: worker {pid} exited with status {code}");
                    }
                    self.workers.remove(&pid);
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    eprintln!("prefork_server: worker {pid} killed by {sig}");
                    self.workers.remove(&pid);
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("prefork_server: waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn signal_all(&self, sig: Signal) {
        for pid in &self.workers {
            if let Err(e) = kill(*pid, sig) {
                if e != Errno::ESRCH {
                    eprintln!("prefork_server: kill {pid}: {e}");
                }
            }
        }
    }

    /// Stops every worker (SIGTERM, then SIGKILL after a grace period) and reaps them.
    fn shutdown(&mut self) {
        self.signal_all(Signal::SIGTERM);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut killed = false;
        loop {
            self.reap();
            if self.workers.is_empty() {
                return;
            }
            if !killed && Instant::now() >= deadline {
                eprintln!("prefork_server: workers still running, sending SIGKILL");
                self.signal_all(Signal::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A worker's life: accept connections on the shared socket until stopped or `max_requests`.
fn worker(listener: &TcpListener, metrics: &mut Metrics, max_requests: u64) -> Result<()> {
    // SIGTERM/SIGINT stay blocked in this thread (the mask came with fork); one thread waits for
    // them and exits normally, which runs the exit handlers that mark our metrics file clean.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let code = match stop_signals().wait() {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("prefork_server: sigwait: {e}");
                    1
                }
            };
            Registry::global().set_ready(false);
            std::process::exit(code);
        })
        .context("spawning the signal thread")?;

    let pid = std::process::id();
    let registry = Registry::global();
    registry.set_ready(true);
    let mut served = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Usually EMFILE/ENFILE or an aborted connection: back off briefly and go on.
                eprintln!("prefork_server: worker {pid}: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if handle(stream, metrics, pid) {
            served += 1;
            if max_requests > 0 && served >= max_requests {
                registry.set_ready(false);
                return Ok(());
            }
        }
    }
}

/// A parsed request line.
struct Request<'a> {
    method: &'static str,
    path: &'a str,
    query: &'a str,
}

/// The outcome of reading a request head.
enum Head {
    Complete(Vec<u8>),
    /// The client closed or timed out before sending anything.
    Nothing,
    TimedOut,
    TooLarge,
    Broken,
}

fn read_head(stream: &mut TcpStream) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return if buf.is_empty() { Head::Nothing } else { Head::TimedOut };
        }
        match stream.read(&mut chunk) {
            Ok(0) => return if buf.is_empty() { Head::Nothing } else { Head::Broken },
            Ok(n) => {
                // Search only the new bytes (plus 3 before them for a split terminator).
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                    if from + end + 4 > MAX_HEAD {
                        return Head::TooLarge;
                    }
                    buf.truncate(from + end);
                    return Head::Complete(buf);
                }
                if buf.len() >= MAX_HEAD {
                    return Head::TooLarge;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return if buf.is_empty() { Head::Nothing } else { Head::TimedOut };
            }
            Err(_) => return Head::Nothing,
        }
    }
}

fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

fn parse_request(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let line = head.split("\r\n").next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/1.")
    {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request { method: method_label(method), path, query })
}

fn route_of(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/slow" => "/slow",
        "/burn" => "/burn",
        "/pid" => "/pid",
        "/crash" => "/crash",
        p if p.starts_with("/status/") => "/status",
        _ => "other",
    }
}

/// Handles one connection; returns whether it carried a request (for `--max-requests`).
fn handle(mut stream: TcpStream, metrics: &mut Metrics, pid: u32) -> bool {
    let head = match read_head(&mut stream) {
        Head::Complete(head) => head,
        Head::Nothing => return false,
        Head::TimedOut => {
            let started = Instant::now();
            respond(&mut stream, false, 408, "request timeout\n");
            metrics.record("other", "other", 408, started);
            return true;
        }
        Head::TooLarge | Head::Broken => {
            let started = Instant::now();
            respond(&mut stream, false, 400, "bad request\n");
            metrics.record("other", "other", 400, started);
            return true;
        }
    };
    let started = Instant::now();
    let in_flight = metrics.in_flight;
    in_flight.inc();
    let Some(req) = parse_request(&head) else {
        respond(&mut stream, false, 400, "bad request\n");
        metrics.record("other", "other", 400, started);
        in_flight.dec();
        return true;
    };
    let route = route_of(req.path);
    let (code, body) = match route {
        "/" => (200, format!("hello from {pid}\n")),
        "/pid" => (200, format!("{pid}\n")),
        "/slow" => match slow_ms(req.query) {
            Some(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                (200, format!("slept {ms} ms\n"))
            }
            None => (400, "bad ms parameter\n".to_owned()),
        },
        "/burn" => match slow_ms(req.query) {
            Some(ms) => {
                let until = Instant::now() + Duration::from_millis(ms);
                let mut x: u64 = 1;
                while Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                (200, format!("burnt {ms} ms\n"))
            }
            None => (400, "bad ms parameter\n".to_owned()),
        },
        "/status" => match req.path["/status/".len()..].parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => (code, format!("status {code}\n")),
            _ => (400, "status must be 100..=599\n".to_owned()),
        },
        "/crash" => {
            // Count it (there is no response code: 0) before dying without answering.
            metrics.record(req.method, route, 0, started);
            eprintln!("prefork_server: worker {pid}: /crash, aborting");
            std::process::abort();
        }
        _ => (404, "not found\n".to_owned()),
    };
    respond(&mut stream, req.method == "HEAD", code, &body);
    metrics.record(req.method, route, code, started);
    in_flight.dec();
    true
}

/// The `ms` query parameter of `/slow` and `/burn`: 100 when absent, capped at [`MAX_SLOW_MS`].
fn slow_ms(query: &str) -> Option<u64> {
    match query.split('&').find_map(|kv| kv.strip_prefix("ms=")) {
        None => Some(100),
        Some(v) => v.parse::<u64>().ok().map(|ms| ms.min(MAX_SLOW_MS)),
    }
}

fn reason(code: u16) -> &'static str {
    let exact = match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        418 => "I'm a teapot",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    if !exact.is_empty() {
        return exact;
    }
    match code / 100 {
        1 => "Informational",
        2 => "Success",
        3 => "Redirection",
        4 => "Client Error",
        _ => "Server Error",
    }
}

/// Writes the response and closes the connection. Write errors (the client went away) are ignored.
fn respond(stream: &mut TcpStream, head_only: bool, code: u16, body: &str) {
    // 1xx, 204 and 304 responses carry no body.
    let body = if matches!(code, 100..=199 | 204 | 304) { "" } else { body };
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    if stream.write_all(out.as_bytes()).is_err() {
        return;
    }
    // Half-close and drain what the client may still send (e.g. a request body we ignored), so
    // closing does not reset the connection before the client has read the response.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
