//! `shmetrics run -- CMD`: the one-command way to run a pre-fork server.
//!
//! Prepares the directory, exports `SHMETRICS_DIR` (and `PROMETHEUS_MULTIPROC_DIR`, so Python
//! prometheus_client apps write into the same directory) to the child, serves metrics while the child
//! runs, forwards the signals a process manager sends (TERM, INT, HUP, QUIT, USR1, USR2, TTIN,
//! TTOU — gunicorn and uWSGI use all of them), and exits with the child's status (128 + signal
//! number when the child was killed by a signal, as shells report it).
//!
//! The child dies with `run`, also when `run` is killed by SIGKILL ([`super::child`]), and the
//! private directory such a `run` leaves behind is removed by the next start ([`super::leftover`]).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;

use crate::aggregator::Aggregator;
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use super::{RunArgs, Servers};

/// Signals forwarded to the child.
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

pub fn main(mut args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.agg.restore && args.dir.is_none() {
        anyhow::bail!(
            "--restore needs --dir: without it, `shmetrics run` uses a private directory removed at \
             exit, so there is no previous run to restore; give the job's directory with --dir DIR"
        );
    }
    let private = match &args.dir {
        Some(_) => None,
        None => {
            let base = super::leftover::base();
            super::leftover::clean(&base);
            Some(super::leftover::create(&base)?)
        }
    };
    let dir = match (&args.dir, &private) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => anyhow::bail!("no directory"),
    };
    args.agg.private_dir = private.is_some();
    let opts = args.agg.options();
    let agg = Aggregator::open(&dir, &opts)?;
    let rt = super::runtime()?;
    let code = rt.block_on(async move {
        // Handlers first: a signal that arrives once the child exists must be forwarded, not kill
        // us and orphan the child.
        let mut streams = Vec::new();
        for sig in FORWARDED {
            streams.push((sig, signal(SignalKind::from_raw(sig as i32))?));
        }
        // httpok's signal target: filled in once the command runs, emptied when it has exited.
        let child_pid = std::sync::Arc::new(crate::alarm::httpok::ChildPid::default());
        let servers = Servers::start(agg, &args.agg, Some(std::sync::Arc::clone(&child_pid))).await?;
        let addr = servers.http_addr;
        let (program, rest) = args.command.split_first().context("no command given after --")?;
        let mut command = tokio::process::Command::new(program);
        // SIGKILL for the child when this thread ends. This future runs on the main thread (the
        // one calling `block_on`, not a runtime worker), which lives as long as `run`: keep the
        // spawn here, not in a `tokio::spawn`ed task.
        super::child::die_with_parent(&mut command);
        let mut child = command
            .args(rest)
            .env("SHMETRICS_DIR", &dir)
            // Python prometheus_client's multiprocess mode writes its files here too (the
            // lower-case name is the one releases before 0.10 read).
            .env("PROMETHEUS_MULTIPROC_DIR", &dir)
            .env("prometheus_multiproc_dir", &dir)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {program:?}"))?;
        // After the spawn: the command keeps the limit it would have had without us.
        super::raise_open_files_limit();
        let pid = child.id().context("child has no pid")?;
        child_pid.set(pid);
        tracing::info!(
            "serving http://{addr}/metrics for {} (pid {pid}, SHMETRICS_DIR={})",
            program,
            dir.display()
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (sig, mut s) in streams {
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            });
        }
        let status = loop {
            tokio::select! {
                st = child.wait() => {
                    child_pid.clear();
                    break st.context("waiting for the child")?;
                }
                Some(sig) = rx.recv() => {
                    if sig == Signal::SIGHUP {
                        // Ours too: reload the alarm configuration (the child reloads its own).
                        servers.reload();
                    }
                    tracing::debug!("forwarding {sig} to {pid}");
                    let _ = kill(Pid::from_raw(pid as i32), sig);
                }
            }
        };
        servers.shutdown().await;
        let code = match (status.code(), status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 1,
        };
        tracing::info!("{program} exited with status {code}");
        anyhow::Ok(code)
    })?;
    drop(private);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
