//! Turning what the aggregator sees into alarms.
//!
//! The rules consume the job core (`crate::job`): its feed of worker exits (every exit exactly
//! once, whoever else reads exits) and its latest view. They never scan the directory themselves;
//! thresholds read a merged scrape, which shares a merge with any scrape in flight.
//!
//! [`run`] checks every second for crashes and fatal conditions, and every
//! `check_interval_seconds` for memory and thresholds:
//! - *crash*: a worker's file was folded without its clean-exit flag (killed, segfault, OOM);
//! - *fatal*: no live worker for `no_live_workers_seconds` (once, re-armed when workers are back),
//!   or more than `max_crashes` crashes within `window_seconds` (at most once per window);
//! - *memory*: a worker's (or the job's summed) RSS, USS or PSS above `limit`; the optional signal
//!   goes to that worker (job scope: the largest worker), at most once per `grace_seconds`;
//! - *threshold*: a merged sample `>=` or `<=` a value, at most once per series per `rate_seconds`
//!   (uWSGI's `metric-alarm`). uWSGI's `reset` rewrites the metric after an alarm; here the values
//!   belong to the workers and the aggregator only reads them, so nothing is reset: the rate limit
//!   is what keeps a value that stays over the line from alarming on every check.
//!
//! Alarms not raised because of a grace period or a rate limit are counted as suppressed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{AlarmConfig, Measure, Op, Scope};
use super::{Event, EventKind, Pipeline};
use crate::aggregator::Exit;
use crate::job::{Job, JobView};
use crate::merge::Snapshot;
use crate::procs::ProcStats;
use crate::samples;

/// Sends `sig` to `pid` and says what happened, for an alarm's message: `sent SIGTERM to pid 12`,
/// or `could not send SIGTERM to pid 12: ESRCH: No such process`. Shared by the memory rules and
/// httpok ([`super::httpok`]), which both signal a process in trouble.
pub(crate) fn send_signal(pid: i32, sig: nix::sys::signal::Signal) -> Result<String, String> {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) => Ok(format!("sent {sig} to pid {pid}")),
        Err(e) => Err(format!("could not send {sig} to pid {pid}: {e}")),
    }
}

/// Whether an act (a signal, an alarm) at `last` still holds back another one at `now`: the grace
/// period of memory rules and httpok.
pub(crate) fn in_grace(last: Option<Instant>, now: Instant, grace: Duration) -> bool {
    last.is_some_and(|t| now.duration_since(t) < grace)
}

/// State kept across checks (and across configuration reloads).
#[derive(Default)]
pub struct Detector {
    crashes: VecDeque<Instant>,
    no_workers_since: Option<Instant>,
    no_workers_fired: bool,
    storm_fired: Option<Instant>,
    memory_last: HashMap<(usize, i32), Instant>,
    threshold_last: HashMap<(usize, String), Instant>,
    last_slow_check: Option<Instant>,
}

fn measure(p: &ProcStats, m: Measure) -> i64 {
    match m {
        Measure::Rss => p.rss,
        Measure::Uss => p.uss,
        Measure::Pss => p.pss,
    }
}

fn measure_name(m: Measure) -> &'static str {
    match m {
        Measure::Rss => "rss",
        Measure::Uss => "uss",
        Measure::Pss => "pss",
    }
}

impl Detector {
    /// Crashes (the exits since the last check) and fatal conditions (from the latest view).
    pub fn check_workers(&mut self, exits: &[Exit], view: &JobView, pipeline: &Pipeline, cfg: &AlarmConfig) {
        let (live, ever_seen) = (view.live_workers, view.ever_seen);
        let now = Instant::now();
        for e in exits.iter().filter(|e| !e.clean) {
            self.crashes.push_back(now);
            if let Some(rule) = &cfg.crash {
                let msg = format!(
                    "worker pid {} exited without a clean exit (killed, crashed or out of memory)",
                    e.pid
                );
                pipeline.submit(
                    Event::now(EventKind::Crash, format!("pid {}", e.pid), msg, &rule.actions)
                        .label("pid", e.pid.to_string()),
                );
            }
        }
        let Some(rule) = &cfg.fatal else { return };
        if let Some(secs) = rule.no_live_workers_seconds {
            if live == 0 && ever_seen {
                let since = *self.no_workers_since.get_or_insert(now);
                if now.duration_since(since) >= secs.get() && !self.no_workers_fired {
                    self.no_workers_fired = true;
                    let msg = format!("no live workers for {secs} s");
                    pipeline.submit(
                        Event::now(EventKind::Fatal, "job", msg, &rule.actions)
                            .label("reason", "no_live_workers"),
                    );
                }
            } else {
                self.no_workers_since = None;
                self.no_workers_fired = false;
            }
        }
        if let Some(max) = rule.max_crashes {
            let window = rule.window_seconds.get();
            while self.crashes.front().is_some_and(|t| now.duration_since(*t) > window) {
                self.crashes.pop_front();
            }
            if self.crashes.len() > max as usize {
                if self.storm_fired.is_some_and(|t| now.duration_since(t) < window) {
                    if !exits.iter().all(|e| e.clean) {
                        pipeline.suppressed(EventKind::Fatal);
                    }
                } else {
                    self.storm_fired = Some(now);
                    let msg = format!(
                        "restart storm: {} crashes within {} s (more than {max})",
                        self.crashes.len(),
                        rule.window_seconds
                    );
                    pipeline.submit(
                        Event::now(EventKind::Fatal, "job", msg, &rule.actions)
                            .label("reason", "restart_storm"),
                    );
                }
            }
        }
    }

    /// Memory rules, from the job's process figures in the latest view.
    pub fn check_memory(&mut self, view: &JobView, pipeline: &Pipeline, cfg: &AlarmConfig) {
        if cfg.memory.is_empty() {
            return;
        }
        let procs = &view.procs;
        let now = Instant::now();
        for (i, rule) in cfg.memory.iter().enumerate() {
            let grace = rule.grace_seconds.get();
            let workers: Vec<&ProcStats> = procs.iter().filter(|p| p.kind.is_worker()).collect();
            let over: Vec<(&ProcStats, i64)> = match rule.scope {
                Scope::Worker => workers
                    .iter()
                    .map(|p| (*p, measure(p, rule.measure)))
                    .filter(|(_, v)| *v >= 0 && *v as u64 > rule.limit.0)
                    .collect(),
                Scope::Job => {
                    let total: i64 = procs.iter().map(|p| measure(p, rule.measure).max(0)).sum();
                    let largest = workers.iter().max_by_key(|p| measure(p, rule.measure)).copied();
                    match largest {
                        Some(l) if total as u64 > rule.limit.0 => vec![(l, total)],
                        _ => Vec::new(),
                    }
                }
            };
            for (p, value) in over {
                let key = (i, if rule.scope == Scope::Job { 0 } else { p.pid });
                if in_grace(self.memory_last.get(&key).copied(), now, grace) {
                    pipeline.suppressed(EventKind::Memory);
                    continue;
                }
                self.memory_last.insert(key, now);
                let what = measure_name(rule.measure);
                let (subject, mut msg) = match rule.scope {
                    Scope::Worker => (
                        format!("pid {}", p.pid),
                        format!(
                            "worker pid {} {what} is {value} bytes, over the limit of {} bytes",
                            p.pid, rule.limit.0
                        ),
                    ),
                    Scope::Job => (
                        "job".to_string(),
                        format!(
                            "the job's {what} is {value} bytes, over the limit of {} bytes",
                            rule.limit.0
                        ),
                    ),
                };
                if let Some(sig) = rule.signal.map(|s| s.0) {
                    let (Ok(note) | Err(note)) = send_signal(p.pid, sig);
                    msg.push_str(&format!("; {note}"));
                }
                let ev = Event::now(EventKind::Memory, subject, msg, &rule.actions)
                    .label("pid", p.pid.to_string())
                    .label("measure", what)
                    .label("value", value.to_string());
                pipeline.submit(ev);
            }
        }
    }

    /// Threshold rules, from a merged scrape.
    pub fn check_thresholds(&mut self, snap: &Snapshot, pipeline: &Pipeline, cfg: &AlarmConfig) {
        if cfg.threshold.is_empty() {
            return;
        }
        let all = samples::flatten(snap);
        let now = Instant::now();
        for (i, rule) in cfg.threshold.iter().enumerate() {
            let sel = &rule.series;
            for sample in all.iter().filter(|s| sel.matches(&s.name, &s.labels)) {
                let v = &sample.value;
                let crossed = match rule.op {
                    Op::AtLeast => *v >= rule.value,
                    Op::AtMost => *v <= rule.value,
                };
                if !crossed {
                    continue;
                }
                let series = sample.selector();
                let key = (i, series.clone());
                let rate = rule.rate_seconds.get();
                if self.threshold_last.get(&key).is_some_and(|t| now.duration_since(*t) < rate) {
                    pipeline.suppressed(EventKind::Threshold);
                    continue;
                }
                self.threshold_last.insert(key, now);
                let op = match rule.op {
                    Op::AtLeast => ">=",
                    Op::AtMost => "<=",
                };
                let msg = rule
                    .message
                    .replace("{series}", &series)
                    .replace("{value}", &v.to_string())
                    .replace("{threshold}", &rule.value.to_string())
                    .replace("{op}", op);
                let ev = Event::now(EventKind::Threshold, series.clone(), msg, &rule.actions)
                    .label("series", series)
                    .label("value", v.to_string());
                pipeline.submit(ev);
            }
        }
    }

    /// One round: crashes and fatal every time; memory and thresholds when their interval is due.
    pub async fn check(&mut self, job: &Arc<Job>, exits: &[Exit], pipeline: &Pipeline) {
        let cfg = pipeline.config();
        let view = job.view();
        self.check_workers(exits, &view, pipeline, &cfg);
        let due = self.last_slow_check.is_none_or(|t| t.elapsed() >= cfg.check_interval_seconds.get());
        if due {
            self.last_slow_check = Some(Instant::now());
            self.check_memory(&view, pipeline, &cfg);
            if !cfg.threshold.is_empty() {
                if let Some(snap) = job.scrape().await {
                    self.check_thresholds(&snap, pipeline, &cfg);
                }
            }
        }
    }
}

/// Checks the rules until the task is aborted: every second, and as soon as an exit arrives.
pub async fn run(job: Arc<Job>, pipeline: Arc<Pipeline>) {
    let mut exits_rx = job.exits();
    let mut d = Detector::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut exits = Vec::new();
        tokio::select! {
            _ = tick.tick() => {}
            Some(e) = exits_rx.recv() => exits.push(e),
        }
        while let Ok(e) = exits_rx.try_recv() {
            exits.push(e);
        }
        d.check(&job, &exits, &pipeline).await;
    }
}
