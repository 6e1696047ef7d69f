//! SKELETON (issue 11 part 2): stats pushers, `[[push]]` — replaced by the pushers.

use std::sync::Arc;

use serde::Deserialize;

use crate::job::{Job, Source};
use crate::merge::SnapFamily;

/// One `[[push]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    /// `statsd`, `carbon`, `socket` or `influx`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Every configured pusher; a [`Source`] of the job (their own counters).
pub struct Pushers {}

impl Pushers {
    /// Starts the pushers (on the current tokio runtime) and registers with the job.
    pub fn start(_job: &Arc<Job>, _specs: &[PushSpec]) -> Arc<Pushers> {
        Arc::new(Pushers {})
    }

    /// Replaces the configuration (SIGHUP).
    pub fn reload(&self, _specs: &[PushSpec]) {}

    /// Stops pushing (shutdown).
    pub async fn shutdown(&self) {}
}

impl Source for Pushers {
    fn families(&self) -> Vec<SnapFamily> {
        Vec::new()
    }
}
