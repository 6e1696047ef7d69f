//! Is the job able to serve? The answer of `health_check` (monitor port) and `/healthz`.
//!
//! A pure function of the job's latest view ([`crate::job::JobView`]): a flood of health checks
//! costs no directory scan, and the answer is at most one upkeep interval old.
//!
//! Checked in this order (the first that applies is the answer, as in ftw.monitor):
//! 1. `Instance is booting` — no worker has appeared since the aggregator started;
//! 2. `Warmup in progress` — `--warmup-url` has not answered 2xx yet;
//! 3. `No live workers` — none alive; `Only N of M required workers are ready` — fewer than
//!    `--min-workers` ready workers (a shmetrics worker is ready once it called
//!    `Registry::set_ready(true)`; a Python prometheus_client worker, which cannot say, once its
//!    process is alive);
//! 4. `OK`.

use crate::job::JobView;

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

/// The health of the job in `view`; `warming_up` while the warmup URL has not answered 2xx.
pub fn check(view: &JobView, config: &HealthConfig, warming_up: bool) -> Health {
    let bad = |m: String| Health { ok: false, message: m };
    if !view.ever_seen {
        return bad("Instance is booting".into());
    }
    if warming_up {
        return bad("Warmup in progress".into());
    }
    if view.live_workers == 0 {
        return bad("No live workers".into());
    }
    let need = config.min_workers.max(1);
    if view.ready_workers < need {
        return bad(format!("Only {} of {need} required workers are ready", view.ready_workers));
    }
    Health { ok: true, message: "OK".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ever_seen: bool, live: usize, ready: usize) -> JobView {
        JobView { ever_seen, live_workers: live, ready_workers: ready, ..JobView::default() }
    }

    fn says(v: &JobView, min: usize, warming: bool) -> (bool, String) {
        let h = check(v, &HealthConfig { min_workers: min, warmup_url: None }, warming);
        (h.ok, h.message)
    }

    #[test]
    fn the_first_rule_that_applies_is_the_answer() {
        assert_eq!(says(&view(false, 0, 0), 1, true), (false, "Instance is booting".into()));
        assert_eq!(says(&view(true, 2, 2), 1, true), (false, "Warmup in progress".into()));
        assert_eq!(says(&view(true, 0, 0), 1, false), (false, "No live workers".into()));
        assert_eq!(
            says(&view(true, 2, 0), 1, false),
            (false, "Only 0 of 1 required workers are ready".into())
        );
        assert_eq!(
            says(&view(true, 3, 2), 3, false),
            (false, "Only 2 of 3 required workers are ready".into())
        );
        assert_eq!(says(&view(true, 3, 3), 3, false), (true, "OK".into()));
        // --min-workers 0 means 1.
        assert_eq!(
            says(&view(true, 1, 0), 0, false),
            (false, "Only 0 of 1 required workers are ready".into())
        );
        assert_eq!(says(&view(true, 1, 1), 0, false), (true, "OK".into()));
    }
}
