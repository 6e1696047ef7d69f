//! Delivering alarms: commands, webhooks, the log; batching, timeouts, retries. (Being written.)

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::{AlarmConfig, AlarmStats, Msg};

/// Runs the dispatcher until the pipeline is dropped.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    config: watch::Receiver<Arc<AlarmConfig>>,
    stats: Arc<Mutex<AlarmStats>>,
) {
    let _ = (config, stats);
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Event(e) => tracing::warn!(kind = e.kind.as_str(), "alarm: {}", e.message),
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}
