//! A load tool for the aggregator's two ports, for BENCHMARKS.md section (e): it starts each given
//! `shmetrics serve` binary in turn on the same workload and reports what its clients saw and what
//! the process cost (resident memory, threads, sockets). It asserts nothing; the correctness side
//! of the same attacks is in `tests/it/monitor.rs` and `tests/it/robustness.rs`.
//!
//! Scenarios (`--scenarios`, comma-separated, all by default):
//!
//! - `scrapers` (or `scrapers:N`): `--clients` (2000) or N concurrent HTTP/1.1 keep-alive clients GET `/metrics` (with
//!   `--series` (1000) series per family, about 300 KB) in a loop for `--seconds` (10), reconnecting 20 ms after a refusal or error. Reported: responses by
//!   status, errors, the largest resident set seen (sampled every 100 ms, and the kernel's
//!   high-water mark), the resident set 1 s and `--settle` (30) seconds after the load stopped,
//!   threads, and the slowest monitor `health_check` answer during the load.
//! - `stalled` / `stalled-close`: `--stalled` (300) clients with a 4 KiB receive buffer send one
//!   GET `/metrics` (keep-alive, or `Connection: close`) and never read; the directory has
//!   `--stalled-series` (20000) series per family (about 6 MB of exposition) so the response
//!   cannot fit the socket buffers (the server's send buffer grows to `tcp_wmem`'s maximum, 4 MB
//!   by default). Reported after
//!   `--stalled-wait` (20) seconds: how many of the server's sockets are still open, its resident
//!   set, and whether a normal client still gets `/metrics`.
//! - `hog` (or `hog:N`): `--hogs` (500) or N silent connections to the monitor port, each reopened
//!   5 ms after it is cut, for `--seconds`; meanwhile `health_check` is asked every 200 ms.
//!   Reported: answers, `Error: too many connections` refusals, timeouts, slowest answer.
//! - `burst` (or `burst:N`): `--burst` (1000) or N clients scrape `/metrics` once each, all at the
//!   same moment (many scrapers firing on the same tick), on `--workers` (4) workers with
//!   `--series` (1000) series per family. Every client connects first; once all are connected they
//!   are released together and each sends one `GET /metrics` with `Connection: close` and reads
//!   its whole response. Reported per binary: clients by outcome (200, 503, other status, closed
//!   without a full response, errors, and how many had their answer before they sent a request,
//!   i.e. a refusal at `accept`), latency from the release to the last byte (p50, p99, max; over
//!   all answers and over the 200s), resident set before, at its peak (sampled every 5 ms while
//!   the burst runs, and the kernel's high-water mark) and 2 s after, threads, and the
//!   aggregator's `shmetrics_scrapes_total` and `shmetrics_merges_total` read by one more scrape
//!   (`n/a` where a binary has no such family; both also count the warm-up scrape and that last
//!   one): whether simultaneous scrapes share their merges. `/proc/loadavg` is printed at the
//!   start and end of the run and next to each burst, since the machine may be shared. The goal is
//!   every client answered, p99 under 1 s, peak RSS under 150 MB and at most one merge per ten
//!   scrapes. `scrapers` measures a steady state that the connection limit shapes; the burst
//!   measures the first moment, every client waiting and none answered yet: that is when memory
//!   peaks, and when a server that merges once per request makes the last client wait for all the
//!   others' merges.
//!
//! ```text
//! cargo build --release --bin shmetrics --example workload --example net_load
//! target/release/examples/net_load --bin new=target/release/shmetrics --bin old=/path/to/old/shmetrics
//! target/release/examples/net_load --bin new=target/release/shmetrics --bin old=/path/to/old/shmetrics \
//!     --scenarios burst
//! ```
//!
//! The workload is `workload --hold --workers 4` (found next to this executable, or
//! `--workload PATH`) in a fresh directory per run.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "Load the aggregator's HTTP and monitor ports and measure what it costs")]
struct Args {
    /// `LABEL=PATH` of a shmetrics binary; repeat to compare binaries in one run.
    #[arg(long = "bin", required = true, value_parser = labelled)]
    bins: Vec<(String, PathBuf)>,
    /// The `workload` example binary (default: next to this executable).
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Scenarios to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "scrapers,scrapers:50,stalled,stalled-close,hog,hog:1024,burst"
    )]
    scenarios: Vec<String>,
    /// Concurrent scraping clients.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Length of the scraping and hog loads, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds to wait after the scraping load before the last memory reading.
    #[arg(long, default_value_t = 30.0)]
    settle: f64,
    /// Workers of the workload.
    #[arg(long, default_value_t = 4)]
    workers: u64,
    /// Series per family for the scraping load.
    #[arg(long, default_value_t = 1000)]
    series: u64,
    /// Clients that never read.
    #[arg(long, default_value_t = 300)]
    stalled: usize,
    /// Series per family for the never-reading clients (a response far above socket buffers).
    #[arg(long, default_value_t = 20000)]
    stalled_series: u64,
    /// Seconds before counting the never-reading clients still connected.
    #[arg(long, default_value_t = 20.0)]
    stalled_wait: f64,
    /// Silent monitor connections.
    #[arg(long, default_value_t = 500)]
    hogs: usize,
    /// Clients of the burst, one scrape each, all at once.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
}

fn labelled(s: &str) -> Result<(String, PathBuf), String> {
    let (label, path) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected LABEL=PATH"))?;
    Ok((label.to_string(), PathBuf::from(path)))
}

/// A process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shmetrics serve` on a fresh directory with a held workload.
struct Server {
    proc: Killed,
    _workload: Killed,
    http: SocketAddr,
    monitor: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl Server {
    fn start(bin: &Path, workload: &Path, workers: u64, series: u64) -> Result<Server> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("mp");
        let mut child = Command::new(bin)
            .args(["serve", "--dir"])
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("SHMETRICS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let proc = Killed(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut http, mut monitor) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("monitor port on ").nth(1) {
                    monitor = rest.split_whitespace().next().and_then(|a| a.parse::<SocketAddr>().ok());
                }
                if let Some(rest) = line.split("serving http://").nth(1) {
                    http = rest.split('/').next().and_then(|a| a.parse::<SocketAddr>().ok());
                }
                if let (Some(h), Some(m)) = (http, monitor) {
                    let _ = tx.send((h, m));
                    http = None;
                }
                // Keep draining so the server never blocks on a full pipe.
            }
        });
        let (http, monitor) = rx.recv_timeout(Duration::from_secs(20)).context("the server did not start")?;
        let mut wl = Command::new(workload)
            .args(["--hold", "--workers", &workers.to_string(), "--series", &series.to_string()])
            .env("SHMETRICS_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", workload.display()))?;
        let mut ready = String::new();
        BufReader::new(wl.stdout.take().context("stdout")?).read_line(&mut ready)?;
        if !ready.starts_with("READY") {
            bail!("workload said {ready:?}");
        }
        Ok(Server { proc, _workload: Killed(wl), http, monitor, _tmp: tmp })
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// `(VmRSS, VmHWM)` in MiB and the thread count.
    fn status(&self) -> (f64, f64, u64) {
        proc_status(self.pid())
    }

    fn rss(&self) -> f64 {
        self.status().0
    }

    /// Open sockets of the server process.
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

/// `(VmRSS, VmHWM)` in MiB and the thread count of process `pid` (NaN and 0 once it is gone).
fn proc_status(pid: u32) -> (f64, f64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:") / 1024.0, field("VmHWM:") / 1024.0, field("Threads:") as u64)
}

/// `/proc/loadavg`, trimmed: the machine is shared, so every figure is read next to it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(no /proc/loadavg: {e})"))
}

/// Reads one HTTP/1.1 response (Content-Length bodies only; hyper sends those for full bodies).
/// Returns the status, whether the server keeps the connection, and the body's length.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, bool, usize)> {
    buf.clear();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before a response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("status line")?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head.lines().any(|l| l.starts_with("connection:") && l.contains("close"));
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed mid-body");
        }
        have += n;
    }
    Ok((status, !close, len))
}

/// Asks the monitor port `health_check`; the answer and how long it took.
async fn health(monitor: SocketAddr) -> (Option<String>, Duration) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(monitor).await?;
        s.write_all(b"health_check\r\n").await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).trim_end().to_string())
    })
    .await;
    (r.ok().and_then(Result::ok), t.elapsed())
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

/// What a run measured, one table row.
struct Row {
    bin: String,
    scenario: String,
    cells: Vec<(String, String)>,
}

fn mib(v: f64) -> String {
    format!("{v:.1}")
}

async fn scrapers(srv: &Server, args: &Args, clients: usize) -> Vec<(String, String)> {
    let before = srv.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (addr, stop, counts) = (srv.http, stop.clone(), counts.clone());
        tasks.spawn(async move {
            let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let mut buf = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let conn = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
                let Ok(Ok(mut s)) = conn else {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if s.write_all(req.as_bytes()).await.is_err() {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(30), read_response(&mut s, &mut buf)).await
                    {
                        Ok(Ok((200, keep, _))) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                            if !keep {
                                break;
                            }
                        }
                        Ok(Ok((503, _, _))) => {
                            counts.refused.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(Ok(_)) => {
                            counts.other.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let mut peak: f64 = 0.0;
    let mut peak_threads = 0;
    let mut slowest = Duration::ZERO;
    let mut health_failed = 0;
    let mut last_health = Instant::now() - Duration::from_secs(1);
    while Instant::now() < deadline {
        let (rss, _, threads) = srv.status();
        peak = peak.max(rss);
        peak_threads = peak_threads.max(threads);
        if last_health.elapsed() >= Duration::from_millis(500) {
            last_health = Instant::now();
            let (answer, took) = health(srv.monitor).await;
            slowest = slowest.max(took);
            if answer.is_none_or(|a| a.starts_with("Error")) {
                health_failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    // Clients in the middle of a response get a few seconds, then are cut.
    let _ =
        tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} })
            .await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after1, hwm, _) = srv.status();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let (after, _, threads_after) = srv.status();
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    vec![
        ("RSS before MiB".into(), mib(before)),
        ("RSS peak MiB (sampled / VmHWM)".into(), format!("{} / {}", mib(peak), mib(hwm))),
        ("RSS 1 s after".into(), mib(after1)),
        (format!("RSS {} s after", args.settle), mib(after)),
        ("threads peak / after".into(), format!("{peak_threads} / {threads_after}")),
        ("200".into(), c(&counts.ok)),
        ("503".into(), c(&counts.refused)),
        ("other status".into(), c(&counts.other)),
        ("errors".into(), c(&counts.errors)),
        ("slowest health_check".into(), format!("{:.3} s", slowest.as_secs_f64())),
        ("health_check failed".into(), health_failed.to_string()),
    ]
}

async fn stalled(srv: &Server, args: &Args, close: bool) -> Vec<(String, String)> {
    let before_sockets = srv.sockets();
    let before = srv.rss();
    let conn = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n{conn}\r\n", srv.http);
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..args.stalled {
        let s = async {
            let sock = TcpSocket::new_v4()?;
            sock.set_recv_buffer_size(4096)?;
            let mut s = sock.connect(srv.http).await?;
            s.write_all(req.as_bytes()).await?;
            anyhow::Ok(s)
        };
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    let start = Instant::now();
    let mut peak: f64 = 0.0;
    while start.elapsed() < Duration::from_secs_f64(args.stalled_wait) {
        peak = peak.max(srv.rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = srv.sockets().saturating_sub(before_sockets);
    let after = srv.rss();
    // A normal client meanwhile.
    let t = Instant::now();
    let normal = tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = TcpStream::connect(srv.http).await?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", srv.http).as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        read_response(&mut s, &mut buf).await
    })
    .await;
    let normal = match normal {
        Ok(Ok((status, _, _))) => format!("{status} in {:.2} s", t.elapsed().as_secs_f64()),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "no answer in 30 s".into(),
    };
    drop(held);
    vec![
        ("clients connected".into(), (args.stalled - failed).to_string()),
        (format!("server sockets still open after {} s", args.stalled_wait), still.to_string()),
        ("RSS before / peak / end MiB".into(), format!("{} / {} / {}", mib(before), mib(peak), mib(after))),
        ("normal scrape meanwhile".into(), normal),
    ]
}

async fn hog(srv: &Server, args: &Args, hogs: usize) -> Vec<(String, String)> {
    let stop = Arc::new(AtomicBool::new(false));
    let cuts = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..hogs {
        let (addr, stop, cuts) = (srv.monitor, stop.clone(), cuts.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    let mut b = [0u8; 256];
                    // Silent until the server cuts us.
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    cuts.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut answered, mut refused, mut timeouts) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    while Instant::now() < deadline {
        let (answer, took) = health(srv.monitor).await;
        slowest = slowest.max(took);
        match answer {
            Some(a) if a.contains("too many connections") => refused += 1,
            Some(a) if !a.is_empty() => answered += 1,
            _ => timeouts += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    vec![
        ("health_check answered".into(), answered.to_string()),
        ("refused (too many connections)".into(), refused.to_string()),
        ("no answer / empty".into(), timeouts.to_string()),
        ("slowest".into(), format!("{:.3} s", slowest.as_secs_f64())),
        ("hog connections cut".into(), cuts.load(Ordering::Relaxed).to_string()),
    ]
}

/// How long a burst client waits for its whole answer.
const BURST_TIMEOUT: Duration = Duration::from_secs(60);
/// The burst's request, the same for every client.
const BURST_REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Raises this process's soft limit on open files to at least `wanted`.
fn raise_open_files(wanted: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft >= wanted {
        return Ok(());
    }
    if hard < wanted {
        bail!("{wanted} open files needed, the hard limit (ulimit -Hn) is {hard}");
    }
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).context("raising RLIMIT_NOFILE")?;
    Ok(())
}

/// Reads one response to its last byte (by `content-length`, or to the close without one),
/// keeping only its head; `buf` holds what was read already. The status, or `closed…` /
/// `error: …`.
async fn read_whole(s: &mut TcpStream, mut buf: Vec<u8>) -> std::result::Result<u16, String> {
    let mut chunk = vec![0u8; 16 * 1024];
    // Status and content-length, once the head is in; then only the body's length is counted.
    let mut head: Option<(u16, Option<usize>)> = None;
    let mut body = 0;
    loop {
        if head.is_none() {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let status = text
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("error: status line {:?}", text.lines().next()))?;
                let len = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok());
                body = buf.len() - i - 4;
                head = Some((status, len));
                buf = Vec::new();
            }
        }
        if let Some((status, Some(len))) = head {
            if body >= len {
                return Ok(status);
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) => {
                return match head {
                    Some((status, None)) => Ok(status),
                    Some(_) => Err("closed mid-body".into()),
                    None if buf.is_empty() => Err("closed".into()),
                    None => Err("closed mid-head".into()),
                }
            }
            Ok(n) if head.is_some() => body += n,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("error: {e}")),
        }
    }
}

/// What one burst client got.
struct Outcome {
    /// The status, or `closed…` / `error: …`.
    result: std::result::Result<u16, String>,
    /// Part of the answer was there before the request was sent: a refusal at `accept`.
    early: bool,
    /// When the last byte came.
    end: Option<Instant>,
}

/// One burst client: connects, says so on `connected`, waits for the release, sends
/// [`BURST_REQUEST`] and reads the whole answer.
async fn burst_client(
    addr: SocketAddr,
    connected: tokio::sync::mpsc::UnboundedSender<()>,
    mut release: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let conn = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await;
    let _ = connected.send(());
    let _ = release.wait_for(|go| *go).await;
    let failed = |e: String| Outcome { result: Err(e), early: false, end: None };
    let mut s = match conn {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(format!("error: connect: {e}")),
        Err(_) => return failed("error: connect: no answer in 10 s".into()),
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let early = match s.try_read(&mut chunk) {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    };
    let result = tokio::time::timeout(BURST_TIMEOUT, async {
        // A server that answered already may have closed its side; its answer still counts.
        if let Err(e) = s.write_all(BURST_REQUEST).await {
            if buf.is_empty() {
                return Err(format!("error: write: {e}"));
            }
        }
        read_whole(&mut s, buf).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("error: no whole answer in {} s", BURST_TIMEOUT.as_secs())));
    let end = result.is_ok().then(Instant::now);
    Outcome { result, early, end }
}

/// GET `/metrics` on a new connection: the status and the body.
async fn get_metrics(addr: SocketAddr) -> Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("status line")?;
        anyhow::Ok((status, body.to_string()))
    })
    .await
    .context("no answer to /metrics in 30 s")?
}

/// The value of the unlabelled sample `name` in a text exposition, or `n/a`.
fn sample(exposition: &str, name: &str) -> String {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next())
        .unwrap_or("n/a")
        .to_string()
}

/// `p50 / p99 / max` in milliseconds (nearest rank), or `-` without any.
fn latencies(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        format!("{:.1}", v[i].as_secs_f64() * 1e3)
    };
    if v.is_empty() {
        "-".into()
    } else {
        format!("{} / {} / {}", at(0.5), at(0.99), at(1.0))
    }
}

async fn burst(srv: &Server, clients: usize) -> Result<Vec<(String, String)>> {
    // Our end of every connection, plus some for the runtime and the pipes.
    raise_open_files(clients as u64 + 256)?;
    let load = loadavg();
    let (before, _, threads_before) = srv.status();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (stop, pid) = (stop.clone(), srv.pid());
        move || {
            let (mut peak, mut threads): (f64, u64) = (0.0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (rss, _, t) = proc_status(pid);
                peak = peak.max(rss);
                threads = threads.max(t);
                std::thread::sleep(Duration::from_millis(5));
            }
            (peak, threads)
        }
    });
    let (connected_tx, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(burst_client(srv.http, connected_tx.clone(), release_rx.clone()));
    }
    drop(connected_tx);
    // Every client sends once, connected or not (a connect gives up after 10 s).
    for _ in 0..clients {
        connected.recv().await.context("a burst client ended before connecting")?;
    }
    let connecting = started.elapsed();
    let released = Instant::now();
    release.send(true).context("releasing the burst")?;
    let mut outcomes = Vec::with_capacity(clients);
    while let Some(joined) = tasks.join_next().await {
        outcomes.push(joined.unwrap_or_else(|e| Outcome {
            result: Err(format!("error: client task: {e}")),
            early: false,
            end: None,
        }));
    }
    let took = released.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak, peak_threads) = sampler.join().map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
    let (_, hwm, _) = srv.status();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _, threads_after) = srv.status();
    // One more scrape for the counters; the last refusals may still be draining.
    let mut last = get_metrics(srv.http).await?;
    for _ in 0..10 {
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = get_metrics(srv.http).await?;
    }
    let (scrapes, merges) = if last.0 == 200 {
        (sample(&last.1, "shmetrics_scrapes_total"), sample(&last.1, "shmetrics_merges_total"))
    } else {
        (format!("({} to /metrics)", last.0), "n/a".into())
    };
    let ratio = match (scrapes.parse::<f64>(), merges.parse::<f64>()) {
        (Ok(s), Ok(m)) if s > 0.0 => format!("{:.3}", m / s),
        _ => "n/a".into(),
    };

    let mut by_status = std::collections::BTreeMap::<u16, u64>::new();
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    let (mut all, mut ok) = (Vec::new(), Vec::new());
    for o in &outcomes {
        match &o.result {
            Ok(status) => {
                *by_status.entry(*status).or_default() += 1;
                let latency = o.end.map_or(Duration::ZERO, |e| e.saturating_duration_since(released));
                all.push(latency);
                if *status == 200 {
                    ok.push(latency);
                }
            }
            Err(e) => *failures.entry(e.clone()).or_default() += 1,
        }
    }
    let count =
        |pred: &dyn Fn(&str) -> bool| failures.iter().filter(|(k, _)| pred(k)).map(|(_, n)| n).sum::<u64>();
    let other: u64 = by_status.iter().filter(|(s, _)| !matches!(s, 200 | 503)).map(|(_, n)| n).sum();
    let failed = failures.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join("; ");
    eprintln!(
        "burst of {clients}: connected in {:.2} s, all done {:.2} s after the release; statuses {by_status:?}",
        connecting.as_secs_f64(),
        took.as_secs_f64()
    );
    let n = |s: u16| by_status.get(&s).copied().unwrap_or(0).to_string();
    Ok(vec![
        ("clients".into(), clients.to_string()),
        ("200".into(), n(200)),
        ("503".into(), n(503)),
        ("other status".into(), other.to_string()),
        ("closed".into(), count(&|k| k.starts_with("closed")).to_string()),
        ("errors".into(), count(&|k| !k.starts_with("closed")).to_string()),
        ("answered before the request".into(), outcomes.iter().filter(|o| o.early).count().to_string()),
        ("ms p50 / p99 / max (all answers)".into(), latencies(all)),
        ("ms p50 / p99 / max (200s)".into(), latencies(ok)),
        (
            "RSS MiB before / peak (5 ms samples) / VmHWM / 2 s after".into(),
            format!("{} / {} / {} / {}", mib(before), mib(peak), mib(hwm), mib(after)),
        ),
        (
            "threads before / peak / after".into(),
            format!("{threads_before} / {peak_threads} / {threads_after}"),
        ),
        // The server's counters also count the warm-up scrape and the one that read them.
        ("scrapes_total (+2 not in the burst)".into(), scrapes),
        ("merges_total (+≤2 not in the burst)".into(), merges),
        ("merges / scrapes".into(), ratio),
        (
            "connect s / burst s".into(),
            format!("{:.2} / {:.2}", connecting.as_secs_f64(), took.as_secs_f64()),
        ),
        ("loadavg before".into(), load),
        ("failures".into(), if failed.is_empty() { "-".into() } else { failed }),
    ])
}

fn main() -> Result<()> {
    let args = Args::parse();
    let load_start = loadavg();
    eprintln!("loadavg at start: {load_start}");
    let workload = match &args.workload {
        Some(w) => w.clone(),
        None => std::env::current_exe()?.with_file_name("workload"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rows = Vec::new();
    for scenario in &args.scenarios {
        for (label, bin) in &args.bins {
            let series = if scenario.starts_with("stalled") { args.stalled_series } else { args.series };
            let srv = Server::start(bin, &workload, args.workers, series)?;
            // One scrape first: the files are mapped and the process is warm.
            let cells = rt.block_on(async {
                let mut s = TcpStream::connect(srv.http).await?;
                s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", srv.http).as_bytes())
                    .await?;
                let mut buf = Vec::new();
                let (_, _, len) = read_response(&mut s, &mut buf).await?;
                // Closed, so that it holds none of the server's connections during the scenario.
                drop(s);
                eprintln!("{label} {scenario}: /metrics is {len} bytes");
                anyhow::Ok(match scenario.as_str() {
                    "scrapers" => scrapers(&srv, &args, args.clients).await,
                    "stalled" => stalled(&srv, &args, false).await,
                    "stalled-close" => stalled(&srv, &args, true).await,
                    "hog" => hog(&srv, &args, args.hogs).await,
                    "burst" => burst(&srv, args.burst).await?,
                    other => match other.split_once(':').map(|(s, n)| (s, n.parse::<usize>())) {
                        Some(("hog", Ok(n))) => hog(&srv, &args, n).await,
                        Some(("burst", Ok(n))) => burst(&srv, n).await?,
                        Some(("scrapers", Ok(n))) => scrapers(&srv, &args, n).await,
                        _ => bail!("unknown scenario {other:?}"),
                    },
                })
            })?;
            eprintln!("{label} {scenario}: {cells:?}");
            rows.push(Row { bin: label.clone(), scenario: scenario.clone(), cells });
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "loadavg at start: {load_start}")?;
    writeln!(out, "loadavg at end:   {}", loadavg())?;
    let mut last = String::new();
    for r in &rows {
        if r.scenario != last {
            last = r.scenario.clone();
            writeln!(out, "\n{}\n", r.scenario)?;
            let names: Vec<&str> = r.cells.iter().map(|(k, _)| k.as_str()).collect();
            writeln!(out, "| binary | {} |", names.join(" | "))?;
            writeln!(out, "|---{}|", "|---".repeat(names.len()))?;
        }
        let vals: Vec<&str> = r.cells.iter().map(|(_, v)| v.as_str()).collect();
        writeln!(out, "| {} | {} |", r.bin, vals.join(" | "))?;
    }
    Ok(())
}
