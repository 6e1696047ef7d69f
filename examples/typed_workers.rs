//! Forked writers of summaries, info and enums, for the integration tests (`tests/it/typed_metrics.rs`).
//!
//! The master registers, through [`Registry::global`] (so `SHMETRICS_DIR` decides where the files
//! go), a summary `tw_latency_seconds`, an info `tw_build_info`, an enum `tw_state` with states
//! `idle`, `busy`, `down`, and a labelled enum `tw_job_state{job}`; then it forks `--workers W`
//! workers **one after the other**: worker `i` is forked only once worker `i-1` has made all its
//! updates, so the values written last are worker `W-1`'s, then `W-2`'s, and so on. Worker `i`:
//!
//! - observes `i+1` and `0.5` into the summary (count 2, sum `i + 1.5`);
//! - sets the info to `{version: "1.<i>", worker: "w<i>"}` (after first setting `{version: "0"}`,
//!   which it replaces);
//! - sets `tw_state` to state `i % 3` and `tw_job_state{job="j"}` to `busy` then to `idle` if `i`
//!   is even, `down` if odd.
//!
//! The master prints `READY <pid> <pid> …` (the workers, in order) once all are forked and done,
//! then every process waits until it is killed (SIGTERM or SIGKILL; a worker also dies with the
//! master). The master itself writes nothing but its handles' registrations.
//!
//! The only `unsafe` is the `fork()` call (`nix::unistd::fork` is an `unsafe fn`): the master is
//! single-threaded when it forks.

use std::fs::File;
use std::io::{Read, Write};

use anyhow::{bail, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::ForkResult;
use shmetrics::Registry;

fn main() -> Result<()> {
    let workers: usize = match std::env::args().collect::<Vec<_>>().as_slice() {
        [_, flag, n] if flag == "--workers" => n.parse()?,
        _ => bail!("usage: typed_workers --workers N"),
    };
    let registry = Registry::global();
    let latency = registry.summary("tw_latency_seconds", "Latency.")?;
    let build = registry.info("tw_build_info", "Build.")?;
    let state = registry.enum_metric("tw_state", "State.", &["idle", "busy", "down"])?;
    let jobs = registry.enum_family("tw_job_state", "Job state.", &["job"], &["idle", "busy", "down"])?;
    let job = jobs.with_labels(&["j"])?;

    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block()?;
    let mut pids = Vec::new();
    for i in 0..workers {
        let (rd, wr) = nix::unistd::pipe()?;
        // SAFETY: the master never starts a thread, so the child is a copy of a single-threaded
        // process.
        #[allow(unsafe_code)]
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                drop(rd);
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                latency.observe(i as f64 + 1.0);
                latency.observe(0.5);
                build.set(&[("version", "0")])?;
                build.set(&[("version", &format!("1.{i}")), ("worker", &format!("w{i}"))])?;
                state.set_index(i % 3)?;
                job.set("busy")?;
                job.set(if i % 2 == 0 { "idle" } else { "down" })?;
                File::from(wr).write_all(b"x")?;
                let _ = stop.wait();
                std::process::exit(0);
            }
            ForkResult::Parent { child } => {
                drop(wr);
                let mut done = [0u8; 1];
                File::from(rd).read_exact(&mut done)?;
                pids.push(child.to_string());
            }
        }
    }
    println!("READY {}", pids.join(" "));
    std::io::stdout().flush()?;
    let _ = stop.wait();
    for p in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.parse()?), Signal::SIGTERM);
    }
    Ok(())
}
