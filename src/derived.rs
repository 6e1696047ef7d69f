//! SKELETON (issue 11 part 1): derived metrics, `[[metric]]` — replaced by the real engine.

use std::time::Instant;

use serde::Deserialize;

use crate::merge::Snapshot;

/// One `[[metric]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// The exposed name.
    pub name: String,
}

/// The derived metrics and their state (accumulators), kept across merges and reloads.
#[derive(Debug, Default)]
pub struct Engine {
    specs: Vec<MetricSpec>,
}

impl Engine {
    /// An engine for these metrics.
    pub fn new(specs: Vec<MetricSpec>) -> Engine {
        Engine { specs }
    }

    /// Replaces the metrics; the state of metrics that stay is kept.
    pub fn reload(&mut self, specs: Vec<MetricSpec>) {
        self.specs = specs;
    }

    /// Whether no metric is configured (then the job need not merge on its own).
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Collects the metrics that are due at `now` and adds every derived family to `snap`.
    pub fn apply(&mut self, _snap: &mut Snapshot, _now: Instant) {}

    /// Names of the families of `type = "absolute"` metrics (uWSGI's type 2, for the socket
    /// pusher; they are exposed as gauges).
    pub fn absolute_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// A push went out: metrics with `reset_after_push` go back to their initial value.
    pub fn pushed(&mut self) {}
}
