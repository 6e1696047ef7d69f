//! `shmetrics supervisor-listener`: a supervisord event listener (a drop-in for superlance's
//! crashmail / crashmailbatch / fatalmailbatch) feeding the alarm pipeline.
//!
//! Standard output carries the listener protocol and nothing else (anything else would put the
//! listener in supervisord's UNKNOWN state for good); logs go to standard error. Standard input is
//! read on a thread of its own, so signals are served while it waits: SIGHUP reloads the
//! configuration (a bad one is rejected and the old one kept), SIGTERM / SIGINT and the end of the
//! input deliver the pending batches and exit 0.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::alarm::supervisor::{self, Frame, Listener};
use crate::alarm::{AlarmConfig, Pipeline};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Arguments of `shmetrics supervisor-listener`.
#[derive(clap::Args, Debug)]
pub struct ListenerArgs {
    /// The alarm configuration (TOML; see conf/shmetrics.toml).
    #[arg(long)]
    config: PathBuf,
}

/// How long pending batches may take to go out at exit.
const FINAL_FLUSH: Duration = Duration::from_secs(30);

pub fn main(args: ListenerArgs) -> anyhow::Result<ExitCode> {
    let config = AlarmConfig::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = rt.block_on(run(&args.config, config));
    // The stdin thread may still be blocked in a read (SIGTERM): it is not waited for.
    rt.shutdown_background();
    code
}

fn describe(config: &AlarmConfig) {
    let route = |actions: Option<&Vec<String>>, section: &str| match actions {
        Some(a) => format!("[{section}] → {}", a.join(", ")),
        None => format!("no [{section}] section (ignored)"),
    };
    tracing::info!(
        "supervisor-listener: crashes: {}; FATAL: {}",
        route(config.crash.as_ref().map(|c| &c.actions), "crash"),
        route(config.fatal.as_ref().map(|f| &f.actions), "fatal"),
    );
}

async fn run(path: &Path, config: AlarmConfig) -> anyhow::Result<ExitCode> {
    describe(&config);
    // Handlers first: a signal before READY must not kill the listener.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let pipeline = Pipeline::start(config);
    let mut listener = Listener::new(Arc::clone(&pipeline));

    let (tx, mut frames) = mpsc::unbounded_channel();
    std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut input = std::io::stdin().lock();
        loop {
            let r = supervisor::read_frame(&mut input);
            let end = !matches!(r, Ok(Some(_)));
            if tx.send(r).is_err() || end {
                return;
            }
        }
    })?;

    let mut out = std::io::stdout().lock();
    let mut code = ExitCode::SUCCESS;
    let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
    if let Err(e) = supervisor::write_ready(&mut out) {
        tracing::error!("supervisor-listener: cannot write to standard output: {e}");
        return Ok(ExitCode::FAILURE);
    }
    loop {
        tokio::select! {
            r = frames.recv() => {
                let frame: Frame = match r {
                    Some(Ok(Some(frame))) => frame,
                    Some(Ok(None)) | None => {
                        tracing::info!("supervisor-listener: end of input");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("supervisor-listener: reading standard input: {e}");
                        break;
                    }
                };
                let handled = listener.handle(&frame);
                if handled.flush && flushing.as_ref().is_none_or(|f| f.is_finished()) {
                    let p = Arc::clone(&pipeline);
                    flushing = Some(tokio::spawn(async move { p.flush().await }));
                }
                if let Err(e) = supervisor::write_reply(&mut out, handled.reply) {
                    tracing::error!("supervisor-listener: cannot write to standard output: {e}");
                    code = ExitCode::FAILURE;
                    break;
                }
            }
            _ = hup.recv() => match AlarmConfig::load(path) {
                Ok(c) => {
                    tracing::info!("supervisor-listener: SIGHUP: reloaded {}", path.display());
                    describe(&c);
                    listener.reload(c);
                }
                Err(e) => tracing::error!(
                    "supervisor-listener: SIGHUP: the new configuration is rejected, the previous one \
                     stays in force: {e}"
                ),
            },
            _ = term.recv() => {
                tracing::info!("supervisor-listener: SIGTERM");
                break;
            }
            _ = int.recv() => {
                tracing::info!("supervisor-listener: SIGINT");
                break;
            }
        }
    }
    if tokio::time::timeout(FINAL_FLUSH, pipeline.flush()).await.is_err() {
        tracing::warn!(
            "supervisor-listener: pending alarms not delivered within {} s; exiting",
            FINAL_FLUSH.as_secs()
        );
    }
    Ok(code)
}
