//! SKELETON (issue 11 part 4): uWSGI's stats server, `[[uwsgi_stats]]` — replaced by the poller.

use std::sync::Arc;

use serde::Deserialize;

use crate::job::{Job, Source};
use crate::merge::SnapFamily;

/// One `[[uwsgi_stats]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatsSpec {
    /// `host:port` or a unix socket path.
    pub address: String,
}

/// The pollers of every configured stats server; a [`Source`] of the job.
pub struct Pollers {}

impl Pollers {
    /// Starts polling (on the current tokio runtime) and registers with the job.
    pub fn start(_job: &Arc<Job>, _specs: &[StatsSpec]) -> Arc<Pollers> {
        Arc::new(Pollers {})
    }

    /// Replaces the configuration (SIGHUP).
    pub fn reload(&self, _specs: &[StatsSpec]) {}
}

impl Source for Pollers {
    fn families(&self) -> Vec<SnapFamily> {
        Vec::new()
    }
}
