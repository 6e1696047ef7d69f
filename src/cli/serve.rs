//! `shmetrics serve`: own a directory, serve its merged metrics until SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::aggregator::Aggregator;
use tokio::signal::unix::{signal, SignalKind};

use super::{ServeArgs, Servers};

pub fn main(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let agg = Aggregator::open(&args.dir, &args.agg.options())?;
    super::raise_open_files_limit();
    let rt = super::runtime()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Before anything is announced: SIGHUP's default action would end the process.
        let mut hup = signal(SignalKind::hangup())?;
        let servers = Servers::start(agg, &args.agg, None).await?;
        tracing::info!("serving http://{}/metrics for {}", servers.http_addr, args.dir.display());
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => servers.reload(),
            }
        }
        tracing::info!("shutting down");
        servers.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
