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
//!
//! ```text
//! cargo build --release --bin shmetrics --example workload --example net_load
//! target/release/examples/net_load --bin new=target/release/shmetrics --bin old=/path/to/old/shmetrics
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
        default_value = "scrapers,scrapers:50,stalled,stalled-close,hog,hog:1024"
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
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| -> f64 {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (field("VmRSS:") / 1024.0, field("VmHWM:") / 1024.0, field("Threads:") as u64)
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

fn main() -> Result<()> {
    let args = Args::parse();
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
                eprintln!("{label} {scenario}: /metrics is {len} bytes");
                anyhow::Ok(match scenario.as_str() {
                    "scrapers" => scrapers(&srv, &args, args.clients).await,
                    "stalled" => stalled(&srv, &args, false).await,
                    "stalled-close" => stalled(&srv, &args, true).await,
                    "hog" => hog(&srv, &args, args.hogs).await,
                    other => match other.split_once(':').map(|(s, n)| (s, n.parse::<usize>())) {
                        Some(("hog", Ok(n))) => hog(&srv, &args, n).await,
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
