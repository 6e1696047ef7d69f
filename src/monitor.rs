//! The monitor port: zc.monitor's line protocol (`health_check`, `perf_metrics`, `monitor`, …).
//!
//! (Being written: the server lands here.)

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::ops::Ops;

/// Serves the monitor protocol on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, shutdown: impl std::future::Future<Output = ()>) {
    let _ = (listener, ops);
    shutdown.await;
}
