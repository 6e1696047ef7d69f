//! A deterministic multi-process workload for integration tests.
//!
//! The master registers every metric and creates every series handle through
//! [`Registry::global`] (so `SHMETRICS_DIR` decides where the files go), optionally increments the
//! counters itself, then forks `W` workers that update the metrics by fixed amounts. Once every
//! worker has finished writing, the master prints exactly one line on stdout and flushes it:
//!
//! ```text
//! READY <pid of worker 0> <pid of worker 1> ... <pid of worker W-1>
//! ```
//!
//! then reaps the workers and exits 0 (1 if a worker exited non-zero or crashed with SIGSEGV,
//! SIGBUS, SIGABRT, SIGILL, SIGFPE, SIGSYS or SIGTRAP; a worker killed by any other signal is
//! assumed to have been killed on purpose and is fine). Without `--hold` the workers exit (status
//! 0) right after writing, so they may still be exiting when `READY` is printed; with `--hold`
//! they stay alive until they get SIGTERM or SIGINT, which the master forwards to them, and then
//! exit 0.
//!
//! Options: `--workers W` (4), `--series S` (10), `--histograms H` (1), `--incs K` (1),
//! `--master-incs M` (0), `--hold`, `--hog-mb N` (worker 0 holds N MiB of resident memory).
//!
//! Options for full-disk tests (every worker waits until all are forked, and have run their fork
//! handlers, before it writes, so they all see the disk in the same state):
//! - `--fill PATH`: after registering (its file exists) and before forking, the master fills the
//!   file system of `PATH` by writing a new file `PATH` until `ENOSPC`, then frees
//!   `--fill-leave-kib L` KiB (0) of it again. It prints `workload: filled PATH: <n> bytes free` on
//!   stderr (from `statvfs`).
//! - `--new-series N`: in every round (below) a worker also registers, after the fork, `N` new series
//!   `wl_requests_total{route="/new<w>-<n>"}` (`n` in `0..N`) and, if `N` > 0, the new unlabelled
//!   counter `wl_late_total`, and calls `inc()` `K` times on each: `K·(N+1)` unit updates a round.
//! - `--grandchildren G`: after its round, a worker forks `G` grandchildren one after the other;
//!   each does one round as worker `w` and exits (0), and the worker waits for it. With
//!   `--free-before-grandchildren` the worker first removes the `--fill` file (if still there).
//! - `--orphan`: the master exits (0) right after `READY` without waiting for its workers; the
//!   workers, which then do not die with it, wait until it is gone, do one more round, and exit
//!   (with `--hold`: wait for SIGTERM/SIGINT first). With `--master-crash` the master instead
//!   kills itself with SIGKILL (so its file is not marked as cleanly exited).
//! - `--slow-fork-handler-ms D`: every worker but worker 0 sleeps `D` ms in a `pthread_atfork`
//!   child handler that runs before shmetrics' own (where a child decides between a file of its own
//!   and the inherited one), so a test can show that the start signal waits for it.
//! - `--ready`: every worker and grandchild calls `set_ready(true)` after each round (the master
//!   never does).
//!
//! A *round* is everything the table below says a worker writes. Without these options a worker
//! does one round; with them it does `R = 1 + G + (1 if --orphan)` rounds (counting its
//! grandchildren's), so every counter and histogram figure below is multiplied by `R`, and each
//! `/new<w>-<n>` series and `wl_late_total` per worker is `R·K`.
//!
//! # Expected values
//!
//! Worker `w` is 0-based; `i` ranges over `0..S` and `j` over `0..H`; route labels are `/r<i>`
//! and `/h<j>` with `i`, `j` as plain integers. Let `T = W(W+1)/2` (the sum of `w+1` over workers).
//!
//! | metric (merge mode) | each worker writes | merged value |
//! |---|---|---|
//! | `wl_requests_total{route="/r<i>"}` (u64 counter) | `inc_by(K·(i+1)·(w+1))` (odd `w`: through `with_labels` after the fork) | `M + K·(i+1)·T` |
//! | `wl_inflight{route="/r<i>"}` (`LiveSum`) | `set((i+1)+(w+1))` | `W·(i+1) + T` while the workers live |
//! | `wl_max{route="/r<i>"}` (`Max`) | `set((w+1)·(i+1))` | `W·(i+1)` |
//! | `wl_all{route="/r<i>",pid}` (`LiveAll`) | `set(w+1)` | `w+1` for the pid of worker `w`, while it lives |
//! | `wl_recent` (`LiveMostRecent`) | `set(w+1)` after sleeping `w·20` ms | `W` while the workers live |
//! | `wl_bytes_total` (f64 counter) | `inc_by(0.5·(w+1))`, `K` times | `K·T/2` (exact in binary) |
//! | `wl_latency_seconds{route="/h<j>"}` (histogram, buckets 0.1, 0.5, 1) | `observe(0.05·(w+1))`, `K` times | see below |
//!
//! For every `/h<j>`: `_count` = `K·W`; `_sum` ≈ `0.05·K·T` (float additions: compare with a
//! tolerance); cumulative buckets `le="0.1"` = `K·min(W,2)`, `le="0.5"` = `K·min(W,10)`,
//! `le="1"` = `K·min(W,20)`, `le="+Inf"` = `K·W` (`0.05·k` in f64 is `<= 0.1`, `<= 0.5`, `<= 1.0`
//! exactly for `k <= 2`, `k <= 10`, `k <= 20`).
//!
//! The master's own file holds every series too (it created the handles before forking) with value
//! 0, except the counters, which hold `M`; it never sets `wl_recent`. So a live-mode gauge may also
//! show the master: `wl_all` can have a series for the master's pid with value 0, and once the
//! workers have exited `wl_inflight` is 0 (only the master is live). Nothing a worker inherited from
//! the master is counted twice: children start from zero.
//!
//! Run it: `mkdir -p /tmp/wl && SHMETRICS_DIR=/tmp/wl cargo run --example workload -- --workers 3`.
//!
//! The only `unsafe` is the `fork()` call itself (`nix::unistd::fork` is an `unsafe fn`): the master
//! is single-threaded when it forks, which is what that function requires; and, for
//! `--slow-fork-handler-ms`, the `pthread_atfork` registration of a handler that only sleeps.
#![deny(unsafe_code)]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use shmetrics::{Counter, CounterF64, Family, Gauge, GaugeMode, Histogram, Registry};

#[derive(Parser, Debug)]
#[command(about = "A deterministic multi-process shmetrics workload for integration tests")]
struct Args {
    /// Number of worker processes (W).
    #[arg(long, default_value_t = 4)]
    workers: u64,
    /// Number of labelled series per family (S): routes /r0 .. /r<S-1>.
    #[arg(long, default_value_t = 10)]
    series: u64,
    /// Number of histogram series (H): routes /h0 .. /h<H-1>.
    #[arg(long, default_value_t = 1)]
    histograms: u64,
    /// Repetition factor (K).
    #[arg(long, default_value_t = 1)]
    incs: u64,
    /// Amount the master adds to every wl_requests_total series before forking (M).
    #[arg(long, default_value_t = 0)]
    master_incs: u64,
    /// Keep the workers alive after writing until SIGTERM/SIGINT.
    #[arg(long)]
    hold: bool,
    /// Worker 0 allocates and touches this many MiB before it is done writing (a memory hog, for
    /// memory alarm tests).
    #[arg(long, default_value_t = 0)]
    hog_mb: usize,
    /// Fill the file system of this (new) file after registering, before forking.
    #[arg(long)]
    fill: Option<PathBuf>,
    /// KiB to free again after filling.
    #[arg(long, default_value_t = 0)]
    fill_leave_kib: u64,
    /// New series (and one new metric) each worker registers after the fork (N).
    #[arg(long, default_value_t = 0)]
    new_series: u64,
    /// Grandchildren each worker forks after its round (G).
    #[arg(long, default_value_t = 0)]
    grandchildren: u64,
    /// Workers remove the --fill file before forking grandchildren.
    #[arg(long)]
    free_before_grandchildren: bool,
    /// The master exits after READY; workers do another round once it is gone.
    #[arg(long)]
    orphan: bool,
    /// With --orphan: the master SIGKILLs itself instead of exiting.
    #[arg(long)]
    master_crash: bool,
    /// With --hold: the master stays after its workers are gone, until SIGTERM/SIGINT.
    #[arg(long)]
    linger: bool,
    /// Workers and grandchildren declare themselves ready after each round.
    #[arg(long)]
    ready: bool,
    /// Every worker but worker 0 sleeps this long in a fork handler that runs before shmetrics'.
    #[arg(long, default_value_t = 0)]
    slow_fork_handler_ms: u64,
}

/// The worker being forked (set by the master before each fork) and `--slow-fork-handler-ms`.
static FORKING: AtomicU64 = AtomicU64::new(0);
static SLOW_FORK_MS: AtomicU64 = AtomicU64::new(0);

extern "C" fn slow_child_handler() {
    let ms = SLOW_FORK_MS.load(Ordering::Relaxed);
    if ms > 0 && FORKING.load(Ordering::Relaxed) != 0 {
        // nanosleep is async-signal-safe: allowed in a child's fork handler.
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Registers [`slow_child_handler`]. Called before the registry is created, so that it runs before
/// shmetrics' child handler (child handlers run in the order they were registered).
#[allow(unsafe_code)]
fn register_slow_fork_handler(ms: u64) -> Result<()> {
    SLOW_FORK_MS.store(ms, Ordering::Relaxed);
    // SAFETY: the handler only reads two atomics and sleeps, which is safe in a forked child.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(slow_child_handler)) };
    if rc != 0 {
        bail!("pthread_atfork: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Forks the process.
#[allow(unsafe_code)]
fn fork() -> nix::Result<ForkResult> {
    // SAFETY: the master (and a worker, for its grandchildren) forks from its main thread and never
    // starts another thread, so the child is a copy of a single-threaded process and may do
    // anything it likes.
    unsafe { nix::unistd::fork() }
}

/// The handles of one `/r<i>` route.
struct Series {
    requests: Counter,
    inflight: Gauge,
    max: Gauge,
    all: Gauge,
}

/// Every handle, created in the master before forking.
struct Handles {
    requests: Family<Counter>,
    series: Vec<Series>,
    recent: Gauge,
    bytes: CounterF64,
    latency: Vec<Histogram>,
}

impl Handles {
    fn create(registry: &Registry, args: &Args) -> Result<Handles> {
        let requests = registry.counter_family("wl_requests_total", "Requests.", &["route"])?;
        let inflight = registry.gauge_family("wl_inflight", "In flight.", GaugeMode::LiveSum, &["route"])?;
        let max = registry.gauge_family("wl_max", "Max.", GaugeMode::Max, &["route"])?;
        let all = registry.gauge_family("wl_all", "Per process.", GaugeMode::LiveAll, &["route"])?;
        let recent = registry.gauge("wl_recent", "Most recent.", GaugeMode::LiveMostRecent)?;
        let bytes = registry.counter_f64("wl_bytes_total", "Bytes.")?;
        let latency =
            registry.histogram_family("wl_latency_seconds", "Latency.", &[0.1, 0.5, 1.0], &["route"])?;

        let mut series = Vec::new();
        for i in 0..args.series {
            let route = format!("/r{i}");
            let labels = [route.as_str()];
            series.push(Series {
                requests: requests.with_labels(&labels)?,
                inflight: inflight.with_labels(&labels)?,
                max: max.with_labels(&labels)?,
                all: all.with_labels(&labels)?,
            });
        }
        let mut hists = Vec::new();
        for j in 0..args.histograms {
            hists.push(latency.with_labels(&[format!("/h{j}").as_str()])?);
        }
        Ok(Handles { requests, series, recent, bytes, latency: hists })
    }
}

fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
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
    if args.slow_fork_handler_ms > 0 {
        register_slow_fork_handler(args.slow_fork_handler_ms)?;
    }

    let registry = Registry::global();
    let handles = Handles::create(registry, &args)?;
    if args.master_incs > 0 {
        for s in &handles.series {
            s.requests.inc_by(args.master_incs);
        }
    }

    if let Some(path) = &args.fill {
        let free =
            fill(path, args.fill_leave_kib << 10).with_context(|| format!("filling {}", path.display()))?;
        eprintln!("workload: filled {}: {free} bytes free", path.display());
    }

    // With --hold the master waits for signals with sigwait: block them before forking, so none is
    // lost and the workers inherit the mask (they sigwait too).
    let mut master_set = stop_signals();
    master_set.add(Signal::SIGCHLD);
    if args.hold {
        master_set.thread_block()?;
    }

    let master = nix::unistd::getpid();
    let (rd, wr) = nix::unistd::pipe()?;
    // The master writes one byte per worker once all are forked: the start signal.
    let (go_rd, go_wr) = nix::unistd::pipe()?;
    // Every worker writes one byte once fork() has returned in it, i.e. once the fork handlers
    // (shmetrics' among them) have run. In the parent, fork() returns before that.
    let (forked_rd, forked_wr) = nix::unistd::pipe()?;
    let mut pids = Vec::new();
    for w in 0..args.workers {
        FORKING.store(w, Ordering::Relaxed);
        match fork() {
            Ok(ForkResult::Child) => {
                drop(rd);
                drop(go_wr);
                drop(forked_rd);
                if let Err(e) = File::from(forked_wr).write_all(&[1]) {
                    eprintln!("workload: worker {w}: writing the forked pipe: {e}");
                    std::process::exit(1);
                }
                if !args.orphan {
                    // Die with the master (a test harness may SIGKILL it): no orphaned workers. A
                    // master that died before the prctl sends no signal: then stop at once.
                    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                    if nix::unistd::getppid() != master {
                        std::process::exit(1);
                    }
                }
                let pipes = (File::from(go_rd), File::from(wr));
                let code = match run_worker(w, &args, &handles, pipes, master) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("workload: worker {w}: {e:#}");
                        1
                    }
                };
                std::process::exit(code);
            }
            Ok(ForkResult::Parent { child }) => pids.push(child),
            Err(e) => {
                drop(go_wr); // EOF: the workers forked so far give up
                stop(&pids, Signal::SIGTERM);
                reap_all(&pids);
                bail!("fork: {e}");
            }
        }
    }
    drop(wr);
    drop(go_rd);
    drop(forked_wr);
    let forked = count_bytes(File::from(forked_rd), args.workers);
    if forked != Ok(args.workers) {
        stop(&pids, Signal::SIGTERM);
        reap_all(&pids);
        bail!("only {} of {} workers got past their fork handlers", forked.unwrap_or(0), args.workers);
    }
    File::from(go_wr).write_all(&vec![1u8; args.workers as usize]).context("starting the workers")?;

    // Every worker writes one byte when it is done; EOF first means one died before finishing.
    match count_bytes(File::from(rd), args.workers) {
        Ok(got) if got == args.workers => {}
        Ok(got) => {
            stop(&pids, Signal::SIGTERM);
            reap_all(&pids);
            bail!("only {got} of {} workers finished writing", args.workers);
        }
        Err(e) => {
            stop(&pids, Signal::SIGTERM);
            reap_all(&pids);
            bail!("reading the pipe: {e}");
        }
    }

    let mut line = String::from("READY");
    for pid in &pids {
        line.push_str(&format!(" {pid}"));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    drop(out);
    if args.orphan {
        if args.master_crash {
            kill(master, Signal::SIGKILL).context("SIGKILL the master")?;
        }
        return Ok(());
    }

    let statuses =
        if args.hold { wait_forwarding(&pids, &master_set, args.linger)? } else { reap_all(&pids) };
    let failed: Vec<String> = statuses.iter().filter_map(failure).collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// Worker `w`: waits for the start signal, does its rounds (see the module documentation), reports
/// on `done`.
fn run_worker(w: u64, args: &Args, h: &Handles, (mut go, mut done): (File, File), master: Pid) -> Result<()> {
    let mut byte = [0u8; 1];
    go.read_exact(&mut byte).context("waiting for the start signal")?;
    drop(go);
    // Kept alive until the worker exits: resident, since every page is written.
    let _hog: Vec<u8> = if w == 0 { vec![1u8; args.hog_mb << 20] } else { Vec::new() };
    round(w, args, h)?;
    if args.free_before_grandchildren {
        if let Some(path) = &args.fill {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e).context("removing the fill file"),
                _ => {}
            }
        }
    }
    for g in 0..args.grandchildren {
        match fork().context("fork")? {
            ForkResult::Child => {
                let code = match round(w, args, h) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("workload: grandchild {g} of worker {w}: {e:#}");
                        1
                    }
                };
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                let status = reap_all(&[child]);
                if let Some(f) = status.iter().find_map(failure) {
                    bail!("grandchild {g}: {f}");
                }
            }
        }
    }
    done.write_all(&[1]).context("writing the pipe")?;
    drop(done);
    if args.orphan {
        let start = Instant::now();
        while nix::unistd::getppid() == master {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the master did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        round(w, args, h)?;
    }
    if args.hold {
        stop_signals().wait().context("sigwait")?;
    }
    Ok(())
}

/// One round of worker `w`'s updates (see the module documentation for the closed forms).
fn round(w: u64, args: &Args, h: &Handles) -> Result<()> {
    let k = args.incs;
    let n = w + 1;
    for (i, s) in (1u64..).zip(&h.series) {
        // `i` here is the 1-based i+1 of the documentation. Odd workers look `wl_requests_total`
        // up again through its family, which finds the series the master created before the fork
        // in the table the child inherited: it must resolve to the child's own file, as the
        // handle the master took does.
        if w % 2 == 1 {
            h.requests.with_labels(&[format!("/r{}", i - 1).as_str()])?.inc_by(k * i * n);
        } else {
            s.requests.inc_by(k * i * n);
        }
        s.inflight.set((i + n) as f64);
        s.max.set((n * i) as f64);
        s.all.set(n as f64);
    }
    // Later workers write later, so the most recent value is W.
    std::thread::sleep(Duration::from_millis(w * 20));
    h.recent.set(n as f64);
    for _ in 0..k {
        h.bytes.inc_by(0.5 * n as f64);
    }
    for hist in &h.latency {
        for _ in 0..k {
            hist.observe(0.05 * n as f64);
        }
    }
    if args.new_series > 0 {
        let mut late = vec![Registry::global().counter("wl_late_total", "Registered by workers.")?];
        for i in 0..args.new_series {
            late.push(h.requests.with_labels(&[format!("/new{w}-{i}").as_str()])?);
        }
        for c in &late {
            for _ in 0..k {
                c.inc();
            }
        }
    }
    if args.ready {
        Registry::global().set_ready(true);
    }
    Ok(())
}

/// Writes a new file at `path` until its file system is full, then frees `leave` bytes of it again.
/// Returns the bytes free afterwards (`statvfs`).
fn fill(path: &Path, leave: u64) -> Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)?;
    // Not zeros: some file systems would not allocate them.
    let chunk = vec![0xa5u8; 64 << 10];
    let mut len = 0u64;
    for size in [chunk.len(), 4096, 512] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    f.set_len(len.saturating_sub(leave))?;
    f.sync_all()?;
    let st = nix::sys::statvfs::fstatvfs(&f)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Reads from `rd` until `want` bytes have come or the pipe is at EOF; returns how many came.
fn count_bytes(mut rd: File, want: u64) -> Result<u64, ErrorKind> {
    let mut got = 0u64;
    let mut buf = [0u8; 64];
    while got < want {
        match rd.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.kind()),
        }
    }
    Ok(got)
}

/// Sends `sig` to every pid in `pids` that still exists.
fn stop(pids: &[Pid], sig: Signal) {
    for pid in pids {
        if let Err(e) = kill(*pid, sig) {
            if e != Errno::ESRCH {
                eprintln!("workload: kill {pid}: {e}");
            }
        }
    }
}

/// Waits for every pid in order (blocking).
fn reap_all(pids: &[Pid]) -> Vec<WaitStatus> {
    let mut statuses = Vec::new();
    for pid in pids {
        loop {
            match waitpid(*pid, None) {
                Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    statuses.push(s);
                    break;
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("workload: waitpid {pid}: {e}");
                    break;
                }
            }
        }
    }
    statuses
}

/// With `--hold`: reaps workers as they exit, forwarding SIGTERM/SIGINT to those still running.
fn wait_forwarding(pids: &[Pid], set: &SigSet, linger: bool) -> Result<Vec<WaitStatus>> {
    let mut live: Vec<Pid> = pids.to_vec();
    let mut statuses = Vec::new();
    while !live.is_empty() || linger {
        match set.wait()? {
            Signal::SIGCHLD => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(s @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, ..))) => {
                        live.retain(|p| *p != pid);
                        statuses.push(s);
                    }
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e).context("waitpid"),
                }
            },
            _ if live.is_empty() => break, // lingering master: a stop signal ends it
            sig => stop(&live, sig),
        }
    }
    Ok(statuses)
}

/// A description of a worker's end if it counts as a failure.
fn failure(s: &WaitStatus) -> Option<String> {
    match *s {
        WaitStatus::Exited(pid, code) if code != 0 => Some(format!("worker {pid} exited with status {code}")),
        WaitStatus::Signaled(pid, sig, _)
            if matches!(
                sig,
                Signal::SIGSEGV
                    | Signal::SIGBUS
                    | Signal::SIGABRT
                    | Signal::SIGILL
                    | Signal::SIGFPE
                    | Signal::SIGSYS
                    | Signal::SIGTRAP
            ) =>
        {
            Some(format!("worker {pid} crashed with {sig}"))
        }
        _ => None,
    }
}
