//! `shmetrics serve`: own a directory, serve its merged metrics until SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use shmetrics::aggregator::Aggregator;
use shmetrics::serve::{self, Shared};
use tokio::signal::unix::{signal, SignalKind};

use super::ServeArgs;

pub fn main(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let opts = args.agg.options();
    let agg = Aggregator::open(&args.dir, &opts)?;
    let rt = super::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.agg.listen).await.with_context(|| {
            format!("cannot listen on {} (use --listen to pick another address)", args.agg.listen)
        })?;
        let addr = listener.local_addr()?;
        tracing::info!("serving http://{addr}/metrics for {}", args.dir.display());
        let shared = Shared::new(agg);
        let upkeep = tokio::spawn(serve::upkeep(shared.clone(), args.agg.upkeep()));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::info!("shutting down");
        };
        serve::http(listener, shared, stop).await;
        upkeep.abort();
        Ok(ExitCode::SUCCESS)
    })
}
