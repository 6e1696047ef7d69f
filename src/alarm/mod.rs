//! Supervision alarms: crash, fatal, memory, threshold and httpok (superlance + uWSGI metric
//! alarms).
//!
//! The aggregator already sees every worker's file, liveness and memory, so it is the one place
//! that raises these alarms. [`rules`] turns what it sees into [`Event`]s, and [`httpok`] what a
//! URL answers; the [`Pipeline`] keeps the recent ones, counts them, and hands them to [`action`],
//! which delivers them (a command with the message on stdin, a webhook, the log) with batching,
//! timeouts and retries, on its own tasks so a slow or failing action never delays a scrape. [`supervisor`] feeds supervisord's process
//! events into the same pipeline.

pub mod action;
pub mod config;
pub mod httpok;
pub mod rules;
pub mod supervisor;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::AlarmConfig;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A worker exited without its clean-exit flag (killed, segfault, OOM), or supervisord
    /// reported an unexpected exit.
    Crash,
    /// The job cannot stay up: no live workers for a while, a restart storm, or supervisord's
    /// FATAL state.
    Fatal,
    /// A worker's (or the job's) memory is above a limit.
    Memory,
    /// A merged series crossed a threshold.
    Threshold,
    /// A URL checked by `[[httpok]]` failed too many times in a row (superlance's httpok).
    Httpok,
}

impl EventKind {
    /// Lower-case name (labels, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Crash => "crash",
            EventKind::Fatal => "fatal",
            EventKind::Memory => "memory",
            EventKind::Threshold => "threshold",
            EventKind::Httpok => "httpok",
        }
    }
}

/// One alarm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// What it happened to: `pid 1234`, a program name, a series.
    pub subject: String,
    /// One line for a human.
    pub message: String,
    /// When, unix seconds.
    pub at: f64,
    /// Extra labels (pid, program, series, measure …), also used as Alertmanager labels.
    pub labels: BTreeMap<String, String>,
    /// The actions (names from the configuration) to deliver it through.
    #[serde(skip)]
    pub actions: Vec<String>,
}

impl Event {
    /// An event happening now.
    pub fn now(
        kind: EventKind,
        subject: impl Into<String>,
        message: impl Into<String>,
        actions: &[String],
    ) -> Event {
        let at = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        Event {
            kind,
            subject: subject.into(),
            message: message.into(),
            at,
            labels: BTreeMap::new(),
            actions: actions.to_vec(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: impl Into<String>) -> Event {
        self.labels.insert(k.to_string(), v.into());
        self
    }
}

/// Counters of the pipeline, exposed as metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlarmStats {
    /// Deliveries made, by kind and action.
    pub fired: BTreeMap<(EventKind, String), u64>,
    /// Alarms not raised because of a rate limit or grace period, by kind.
    pub suppressed: BTreeMap<EventKind, u64>,
    /// Deliveries that failed after all retries, by action.
    pub failed: BTreeMap<String, u64>,
}

/// Messages to the dispatcher.
pub enum Msg {
    /// Deliver an event.
    Event(Event),
    /// Deliver every pending batch now; answer once everything submitted before is delivered or
    /// given up (retries included).
    Flush(oneshot::Sender<()>),
}

/// How many recent events are kept for `perf_metrics`.
pub const RECENT: usize = 50;

/// The alarm pipeline: submit events, read stats and recent events, reload the configuration.
pub struct Pipeline {
    tx: mpsc::UnboundedSender<Msg>,
    config: watch::Sender<Arc<AlarmConfig>>,
    stats: Arc<Mutex<AlarmStats>>,
    recent: Mutex<VecDeque<Event>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pipeline {
    /// Starts the dispatcher (on the current tokio runtime) with a configuration.
    pub fn start(config: AlarmConfig) -> Arc<Pipeline> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (config, config_rx) = watch::channel(Arc::new(config));
        let stats = Arc::new(Mutex::new(AlarmStats::default()));
        tokio::spawn(action::run(rx, config_rx, Arc::clone(&stats)));
        Arc::new(Pipeline { tx, config, stats, recent: Mutex::new(VecDeque::new()) })
    }

    /// Raises an alarm: remembered, counted and delivered in the background (never blocks).
    pub fn submit(&self, event: Event) {
        tracing::debug!(kind = event.kind.as_str(), subject = %event.subject, "alarm: {}", event.message);
        {
            let mut r = lock(&self.recent);
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(event.clone());
        }
        let _ = self.tx.send(Msg::Event(event));
    }

    /// Counts an alarm not raised (rate limit, grace period).
    pub fn suppressed(&self, kind: EventKind) {
        *lock(&self.stats).suppressed.entry(kind).or_default() += 1;
    }

    /// Replaces the configuration; rule state, pending batches and counters are kept.
    pub fn reload(&self, config: AlarmConfig) {
        self.config.send_replace(Arc::new(config));
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<AlarmConfig> {
        Arc::clone(&self.config.borrow())
    }

    /// The counters.
    pub fn stats(&self) -> AlarmStats {
        lock(&self.stats).clone()
    }

    /// The most recent events, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Delivers every pending batch now (supervisord TICK events, shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}
