//! The operations view of a running job: health, readiness, warmup and performance figures.
//!
//! Load balancers and operators ask three questions, through the monitor port
//! ([`crate::monitor`]) or HTTP ([`crate::serve`]): is the job able to serve (`health_check`,
//! `/healthz`), how is it doing (`perf_metrics`, `/perf_metrics`), and what is running
//! (`monitor`). [`Ops`] answers them from the aggregator's last scan plus `/proc`.
//!
//! Health, checked in this order (the first that applies is the answer, as in ftw.monitor):
//! 1. `Instance is booting` — no worker has appeared since the aggregator started;
//! 2. `Warmup in progress` — `--warmup-url` has not answered 2xx yet;
//! 3. `No live workers` — none alive; `Only N of M required workers are ready` — fewer than
//!    `--min-workers`
//!    ready workers (a shmetrics worker is ready once it called `Registry::set_ready(true)`; a
//!    Python prometheus_client worker, which cannot say, once its process is alive);
//! 4. `OK`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::serve::Shared;

/// What the health check says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Whether the job can serve.
    pub ok: bool,
    /// `OK`, or one line saying why not.
    pub message: String,
}

/// Settings of the health check.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Ready workers needed for `OK` (at least 1).
    pub min_workers: usize,
    /// URL the aggregator GETs once at start; health waits for a 2xx answer.
    pub warmup_url: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { min_workers: 1, warmup_url: None }
    }
}

/// Warmup states.
const WARMUP_NONE: u8 = 0;
const WARMUP_PENDING: u8 = 1;
const WARMUP_DONE: u8 = 2;

/// The operations view shared by the monitor port and the HTTP endpoints.
pub struct Ops {
    shared: Arc<Shared>,
    alarms: Option<Arc<crate::alarm::Pipeline>>,
    procs: crate::perf::ProcCache,
    config: HealthConfig,
    process_metrics: crate::perf::ProcessMetrics,
    started: Instant,
    warmup: AtomicU8,
}

impl Ops {
    /// An operations view over an aggregator. Warmup is pending if a URL is configured (and
    /// [`Ops::run_warmup`] must then be spawned).
    pub fn new(
        shared: Arc<Shared>,
        config: HealthConfig,
        process_metrics: crate::perf::ProcessMetrics,
        alarms: Option<Arc<crate::alarm::Pipeline>>,
    ) -> Arc<Ops> {
        let warmup = if config.warmup_url.is_some() { WARMUP_PENDING } else { WARMUP_NONE };
        Arc::new(Ops {
            shared,
            alarms,
            procs: crate::perf::ProcCache::default(),
            config,
            process_metrics,
            started: Instant::now(),
            warmup: AtomicU8::new(warmup),
        })
    }

    /// The aggregator.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The alarm pipeline, when a configuration was given.
    pub fn alarms(&self) -> Option<&Arc<crate::alarm::Pipeline>> {
        self.alarms.as_ref()
    }

    /// Which process metrics `/metrics` carries.
    pub fn process_metrics(&self) -> crate::perf::ProcessMetrics {
        self.process_metrics
    }

    /// Seconds since the aggregator started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The health check's answer, from a fresh scan of the directory and a look at `/proc` at most
    /// [`crate::perf::TTL`] old (which tells masters from workers, see [`crate::procs`]).
    pub async fn health(self: &Arc<Self>) -> Health {
        let shared = Arc::clone(&self.shared);
        let scanned = tokio::task::spawn_blocking(move || shared.with(|a| a.compact())).await;
        self.procs().await;
        let seen = scanned
            .map(|()| self.shared.with(|a| (a.workers_ever_seen(), a.ready_workers(), a.live_workers())));
        let Ok((ever_seen, ready, live)) = seen else {
            return Health { ok: false, message: "Health check failed; see the aggregator's log".into() };
        };
        let bad = |m: String| Health { ok: false, message: m };
        if !ever_seen {
            return bad("Instance is booting".into());
        }
        if self.warmup.load(Ordering::Acquire) == WARMUP_PENDING {
            return bad("Warmup in progress".into());
        }
        let need = self.config.min_workers.max(1);
        if live == 0 {
            return bad("No live workers".into());
        }
        if ready < need {
            return bad(format!("Only {ready} of {need} required workers are ready"));
        }
        Health { ok: true, message: "OK".into() }
    }

    /// GETs the warmup URL until it answers 2xx (once a second, each try bounded to 30 s), then
    /// marks warmup done. Returns at once when no URL is configured.
    pub async fn run_warmup(self: Arc<Self>) {
        let Some(url) = self.config.warmup_url.clone() else { return };
        loop {
            match crate::warmup::get(&url, Duration::from_secs(30)).await {
                Ok(status) if (200..300).contains(&status) => {
                    tracing::info!(%url, status, "warmup done");
                    self.warmup.store(WARMUP_DONE, Ordering::Release);
                    return;
                }
                Ok(status) => tracing::info!(%url, status, "warmup: not ready yet"),
                Err(e) => tracing::debug!(%url, "warmup: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The `perf_metrics` JSON document. With `interval`, CPU use is also measured over that many
    /// seconds (at most 10) and reported as a percentage.
    pub async fn perf_metrics(self: &Arc<Self>, interval: Option<f64>) -> serde_json::Value {
        crate::perf::document(self, interval).await
    }

    /// The `monitor` command's text: aggregator and workers, pid, RSS, uptime.
    pub async fn monitor_text(self: &Arc<Self>) -> String {
        crate::perf::monitor_text(self).await
    }

    /// The job's processes (workers and their masters) with memory, CPU and descriptors, and the
    /// job's CPU time, at most [`crate::perf::TTL`] old.
    pub async fn procs(self: &Arc<Self>) -> Arc<crate::perf::JobProcs> {
        self.procs.get(self).await
    }
}
