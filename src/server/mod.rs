//! The aggregator's ports: HTTP (`/metrics`, `/healthz`, `/perf_metrics`) and the zc.monitor-style
//! monitor port, plus the one request the aggregator makes itself (warmup).
//!
//! This is the top of the operations side: it reads the job core's views (`crate::job`) and
//! answers with `crate::health` and `crate::report`; nothing below imports it. `State` is
//! what both ports share.
//!
//! - [`http`]: hyper 1, content negotiation, gzip, connection and request limits;
//! - [`monitor`]: the line protocol (`health_check`, `perf_metrics`, `monitor`, `help`, …);
//! - [`slots`]: the monitor port's connection slots (the longest-idle one is evicted when full);
//! - [`warmup`]: GET the application's warmup URL until it answers 2xx.

pub mod http;
pub mod monitor;
pub mod slots;
pub mod warmup;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::alarm::Pipeline;
use crate::health::{self, Health, HealthConfig};
use crate::job::Job;
use crate::pollsters::Pollsters;
use crate::report::{self, Alarms, Measured, ProcessMetrics};

/// Reads and drops what a client still sends, for at most `limit` and `max_bytes`: closing a
/// socket with unread input resets the connection, and the client may lose the answer it has not
/// read yet (both ports close this way).
pub(crate) async fn drain(stream: &mut tokio::net::TcpStream, limit: Duration, max_bytes: usize) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < max_bytes {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Longest `perf_metrics` measuring interval, in seconds (both ports).
pub const MAX_INTERVAL: f64 = 10.0;

/// What the ports share: the job core and the settings of what they answer.
pub struct State {
    job: Arc<Job>,
    health: HealthConfig,
    process_metrics: ProcessMetrics,
    alarms: Option<Arc<Pipeline>>,
    /// Whether the warmup URL has yet to answer 2xx.
    warming_up: AtomicBool,
    /// The system pollsters, which the monitor port shows and (with `allow_control`) changes.
    pollsters: Option<Arc<Pollsters>>,
    /// `--allow-control`: the monitor port's commands that change settings are accepted.
    allow_control: bool,
}

/// What the monitor port may control: the pollsters, and whether changing them is allowed
/// (`--allow-control`; the monitor port has no authentication).
pub struct Control {
    /// The system pollsters.
    pub pollsters: Arc<Pollsters>,
    /// Whether `set_interval` and `set_pollsters` are accepted.
    pub allow: bool,
}

impl State {
    /// The ports' state. Warmup is pending if a URL is configured (spawn [`State::run_warmup`]).
    pub fn new(
        job: Arc<Job>,
        health: HealthConfig,
        process_metrics: ProcessMetrics,
        alarms: Option<Arc<Pipeline>>,
        control: Option<Control>,
    ) -> Arc<State> {
        let warming_up = AtomicBool::new(health.warmup_url.is_some());
        let (pollsters, allow_control) = match control {
            Some(c) => (Some(c.pollsters), c.allow),
            None => (None, false),
        };
        Arc::new(State { job, health, process_metrics, alarms, warming_up, pollsters, allow_control })
    }

    /// The system pollsters, if this aggregator runs them.
    pub fn pollsters(&self) -> Option<&Arc<Pollsters>> {
        self.pollsters.as_ref()
    }

    /// Whether the monitor port's commands that change settings are accepted (`--allow-control`).
    pub fn allow_control(&self) -> bool {
        self.allow_control
    }

    /// The job core.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// Which process metrics `/metrics` carries.
    pub fn process_metrics(&self) -> ProcessMetrics {
        self.process_metrics
    }

    /// The health check's answer, from the latest view.
    pub fn health(&self) -> Health {
        health::check(&self.job.view(), &self.health, self.warming_up.load(Ordering::Acquire))
    }

    /// The alarm pipeline's figures, when alarms are configured.
    pub fn alarms(&self) -> Option<Alarms> {
        self.alarms.as_ref().map(|p| Alarms {
            stats: p.stats(),
            recent: p.recent(),
            actions: p.config().actions.keys().cloned().collect(),
        })
    }

    /// The `perf_metrics` document. With `interval` (seconds, in (0, [`MAX_INTERVAL`]]), CPU use
    /// is measured over that interval; other intervals are ignored.
    pub async fn perf_metrics(&self, interval: Option<f64>) -> serde_json::Value {
        // Fresh figures (requests arriving together share one look at `/proc`).
        let before = self.job.fresh_view().await;
        let secs = interval.filter(|i| *i > 0.0 && *i <= MAX_INTERVAL);
        let after = match secs {
            Some(secs) => {
                // Filtered to (0, 10] above (NaN too); `try_` all the same: it comes from a client.
                tokio::time::sleep(Duration::try_from_secs_f64(secs).unwrap_or_default()).await;
                Some(self.job.fresh_view().await)
            }
            None => None,
        };
        let measured = match (&after, secs) {
            // Over the time between the two views (the first may be up to an upkeep interval
            // older than the request).
            (Some(after), Some(secs)) => {
                let seconds = if after.at > before.at { after.at - before.at } else { secs };
                Some(Measured { before: &before, after, seconds, interval: secs })
            }
            _ => None,
        };
        let view = after.as_deref().unwrap_or(&before);
        let health = health::check(view, &self.health, self.warming_up.load(Ordering::Acquire));
        report::document(view, &health, self.alarms().as_ref(), measured.as_ref())
    }

    /// GETs the warmup URL until it answers 2xx (once a second, each try bounded to 30 s), then
    /// marks warmup done. Returns at once when no URL is configured.
    pub async fn run_warmup(self: Arc<Self>) {
        let Some(url) = self.health.warmup_url.clone() else { return };
        loop {
            match warmup::get(&url, Duration::from_secs(30)).await {
                Ok(status) if (200..300).contains(&status) => {
                    tracing::info!(%url, status, "warmup done");
                    self.warming_up.store(false, Ordering::Release);
                    return;
                }
                Ok(status) => tracing::info!(%url, status, "warmup: not ready yet"),
                Err(e) => tracing::debug!(%url, "warmup: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
