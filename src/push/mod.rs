//! Stats pushers, `[[push]]` (uWSGI's `--stats-push` and `--carbon`): every `freq_seconds`, every
//! sample of the merged, job-wide view goes to a statsd daemon ([`statsd`]), carbon-cache
//! ([`carbon`]), a uWSGI-style UDP receiver ([`socket`]) or InfluxDB ([`influx`]).
//!
//! # Why like this
//!
//! - **The merged view, not the workers.** uWSGI pushes its master's int64 metrics; we push what
//!   `/metrics` shows — the application's series summed over every worker (dead ones included),
//!   derived metrics, the aggregator's own series and the pushers' own counters — from
//!   [`Job::recent`], which shares the latest merge with the text dir and the scrapes.
//! - **A receiver never delays a scrape.** Each pusher has two tokio tasks: a *ticker* that takes
//!   a batch (the flattened samples and a timestamp) every `freq_seconds` and puts it on a
//!   bounded queue ([`QUEUE_BATCHES`]; when it is full the oldest batch is dropped and counted as
//!   an error), and a *sender* that encodes and sends batches one at a time, each push bounded by
//!   `timeout_seconds` (DNS, connect, write, the answer). A failed push is counted, logged (the
//!   first error at once, then at most one message a minute), and followed by a back-off (1 s,
//!   2 s, 4 s … up to `freq_seconds` or 60 s); over TCP and HTTP the batch that failed is tried
//!   again after it (so a receiver back after a short outage gets every point), over UDP the
//!   next batch carries the current values. Nothing here runs inside a
//!   merge: the counters the job reads ([`Source::families`]) are two atomics per pusher.
//! - **statsd gets deltas** computed when a batch is *sent*, against what was last sent
//!   successfully (see [`statsd`]): a batch dropped from the queue, or a push that failed, loses
//!   nothing — the next one carries its increments.
//! - **Labels** become dotted name parts for the receivers that have none ([`names`]); InfluxDB
//!   gets them as tags.
//!
//! `shmetrics_pushes_total{pusher}` counts successful pushes, `shmetrics_push_errors_total{pusher}`
//! failed ones and dropped batches. After each successful push, derived metrics with
//! `reset_after_push` start again ([`Job::pushed`]). A reload (SIGHUP) keeps the tasks and the
//! statsd baselines of the pushers whose section did not change; at shutdown every pusher makes one
//! last push (bounded: a receiver that is down does not hold the exit).

mod carbon;
mod influx;
mod names;
mod net;
mod socket;
mod spec;
mod statsd;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::job::{Job, Source};
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::parsed::Selector;
use crate::samples::Sample;

pub use spec::{check_all, Kind, PushSpec, Transport};

/// Batches waiting for the sender, at most: a receiver that is slow for four periods loses the
/// oldest (statsd loses nothing: its deltas are computed when sent).
pub const QUEUE_BATCHES: usize = 4;

/// How long [`Pushers::shutdown`] waits for the last pushes.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(4);

/// At most one error message per pusher this often (the others are counted in the next one).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What a sample is to a receiver that knows kinds (statsd, uWSGI's socket format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Only adds up: a counter, or a histogram's or summary's `_count`, `_sum`, `_bucket`.
    Counter,
    /// A current value.
    Gauge,
    /// A derived metric of uWSGI's type `absolute` (a gauge to everyone but the socket format).
    Absolute,
}

/// One sample to push.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The sample as `/metrics` shows it.
    pub sample: Sample,
    /// Its kind.
    pub flavor: Flavor,
}

/// What one push sends: the samples of one merge and when it was taken.
#[derive(Debug, Default)]
pub struct Batch {
    /// Unix seconds.
    pub at: f64,
    /// The samples, in exposition order.
    pub points: Vec<Point>,
}

/// The batch of a snapshot: every sample (or those matching one of `series`), each with its
/// flavor; `absolute` names the derived families of type `absolute`.
pub fn batch(snap: &Snapshot, absolute: &[String], series: &[Selector], at: f64) -> Batch {
    let mut flavors: HashMap<String, Flavor> = HashMap::new();
    for f in &snap.families {
        let d = &f.meta.desc;
        match d.metric_type {
            MetricType::Counter => {
                flavors.insert(d.sample_name().into_owned(), Flavor::Counter);
            }
            MetricType::Histogram | MetricType::Summary => {
                for suffix in ["_bucket", "_count", "_sum"] {
                    flavors.insert(format!("{}{suffix}", d.name), Flavor::Counter);
                }
            }
            MetricType::Gauge if absolute.contains(&d.name) => {
                flavors.insert(d.name.clone(), Flavor::Absolute);
            }
            MetricType::Gauge | MetricType::Info | MetricType::Enum => {}
        }
    }
    let points = crate::samples::flatten(snap)
        .into_iter()
        .filter(|s| series.is_empty() || series.iter().any(|sel| sel.matches(&s.name, &s.labels)))
        .map(|sample| {
            let flavor = flavors.get(&sample.name).copied().unwrap_or(Flavor::Gauge);
            Point { sample, flavor }
        })
        .collect();
    Batch { at, points }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pusher's counters and its log limiter, shared by its tasks (and kept across a restart of
/// the same name at a reload, so the counters go on).
#[derive(Default)]
struct Stats {
    pushes: AtomicU64,
    errors: AtomicU64,
    /// For failed pushes.
    log: Mutex<LogLimit>,
    /// For dropped batches (another condition, with messages of its own).
    drop_log: Mutex<LogLimit>,
}

/// The first error at once, then at most one message per [`LOG_EVERY`].
#[derive(Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl Stats {
    fn error(&self, pusher: &str, msg: &str) {
        self.count_and_log(&self.log, pusher, msg);
    }

    fn dropped(&self, pusher: &str, msg: &str) {
        self.count_and_log(&self.drop_log, pusher, msg);
    }

    fn count_and_log(&self, log: &Mutex<LogLimit>, pusher: &str, msg: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut l = lock(log);
        if l.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            l.suppressed += 1;
            return;
        }
        let more = match l.suppressed {
            0 => String::new(),
            n => format!(" ({n} more errors since the last message)"),
        };
        tracing::error!(pusher, "push failed: {msg}{more}");
        l.last = Some(Instant::now());
        l.suppressed = 0;
    }

    fn recovered(&self, pusher: &str, failures: u32) {
        *lock(&self.log) = LogLimit::default();
        tracing::info!(pusher, "pushing again after {failures} failed pushes");
    }
}

/// The batches waiting, with their numbers, and the number of the last one added.
#[derive(Default)]
struct Waiting {
    last: u64,
    batches: VecDeque<(u64, Arc<Batch>)>,
}

/// The batches between a pusher's ticker and its sender, numbered.
#[derive(Default)]
struct Queue {
    batches: Mutex<Waiting>,
    ready: Notify,
    /// Number of the last batch the sender finished with.
    done: watch::Sender<u64>,
}

impl Queue {
    /// Adds a batch; returns its number and whether the oldest batch was dropped for it.
    fn push(&self, b: Batch) -> (u64, bool) {
        let mut q = lock(&self.batches);
        q.last += 1;
        let seq = q.last;
        let dropped = q.batches.len() >= QUEUE_BATCHES && q.batches.pop_front().is_some();
        q.batches.push_back((seq, Arc::new(b)));
        drop(q);
        self.ready.notify_one();
        (seq, dropped)
    }

    /// Puts a batch that failed back in front, if there is room; whether it was.
    fn retry(&self, seq: u64, b: &Arc<Batch>) -> bool {
        let mut q = lock(&self.batches);
        let room = q.batches.len() < QUEUE_BATCHES;
        if room {
            q.batches.push_front((seq, Arc::clone(b)));
        }
        room
    }

    async fn pop(&self) -> (u64, Arc<Batch>) {
        loop {
            if let Some(b) = lock(&self.batches).batches.pop_front() {
                return b;
            }
            self.ready.notified().await;
        }
    }
}

/// The sender's connections and statsd baselines, kept between pushes.
#[derive(Default)]
struct Wire {
    udp: net::Udp,
    carbon: carbon::Conn,
    deltas: statsd::Deltas,
}

impl Wire {
    /// One push; the lines left out for being longer than a datagram.
    async fn send(&mut self, spec: &PushSpec, batch: &Batch) -> Result<Vec<String>, String> {
        match (spec.kind, spec.transport) {
            (Kind::Statsd, _) => statsd::send(batch, spec, &mut self.deltas, &mut self.udp).await,
            (Kind::Carbon, _) => {
                self.carbon.send(spec, &carbon::payload(batch, spec)).await.map(|()| Vec::new())
            }
            (Kind::Socket, _) => socket::send(batch, spec, &mut self.udp).await,
            (Kind::Influx, Transport::Udp) => influx::send_udp(batch, spec, &mut self.udp).await,
            (Kind::Influx, Transport::Http) => {
                influx::send_http(batch, spec, spec.timeout.get()).await.map(|()| Vec::new())
            }
        }
    }
}

/// The wait after `failures` failed pushes in a row: 1 s, 2 s, 4 s … up to `freq` or 60 s.
fn backoff(failures: u32, freq: Duration) -> Duration {
    let cap = freq.min(Duration::from_secs(60));
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(cap)
}

/// The batch of the latest merge (shared if it is younger than a second or a period).
async fn collect(job: &Arc<Job>, spec: &PushSpec) -> Option<Batch> {
    let snap = job.recent(spec.freq.get().min(Duration::from_secs(1))).await?;
    let absolute = job.derived_absolute();
    Some(batch(&snap, &absolute, &spec.series, crate::procs::unix_now()))
}

async fn ticker(job: Arc<Job>, spec: PushSpec, queue: Arc<Queue>, stats: Arc<Stats>) {
    let mut every = tokio::time::interval(spec.freq.get());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(b) = collect(&job, &spec).await else { continue };
        if queue.push(b).1 {
            let msg = format!("the receiver is slower than freq_seconds: dropped the oldest of {QUEUE_BATCHES} waiting batches");
            stats.dropped(&spec.name, &msg);
        }
    }
}

async fn sender(
    job: Arc<Job>,
    spec: PushSpec,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wire = Wire::default();
    let mut failures = 0u32;
    let mut warned_long = false;
    loop {
        let (seq, batch) = queue.pop().await;
        let limit = spec.timeout.get();
        let result = tokio::time::timeout(limit, wire.send(&spec, &batch))
            .await
            .unwrap_or_else(|_| Err(format!("no push to {} within {} s", spec.address, spec.timeout)));
        match result {
            Ok(too_long) => {
                stats.pushes.fetch_add(1, Ordering::Relaxed);
                job.pushed();
                if failures > 0 {
                    stats.recovered(&spec.name, failures);
                }
                failures = 0;
                if let (false, Some(first)) = (warned_long, too_long.first()) {
                    warned_long = true;
                    tracing::warn!(
                        pusher = spec.name,
                        "left out {} lines longer than a datagram ({} bytes), e.g. {first:?} \
                         (logged once; use labels = \"values\" or a series filter)",
                        too_long.len(),
                        net::MAX_DATAGRAM
                    );
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                stats.error(&spec.name, &e);
                // Not delivered: tried again after the back-off (not when stopping; and only if
                // the queue has room, else it is the oldest batch and goes).
                if retried(&spec) && !*stop.borrow() && queue.retry(seq, &batch) {
                    backoff_or_stop(&mut stop, backoff(failures, spec.freq.get())).await;
                    continue;
                }
            }
        }
        queue.done.send_replace(seq);
        if failures > 0 && !*stop.borrow() {
            backoff_or_stop(&mut stop, backoff(failures, spec.freq.get())).await;
        }
    }
}

/// Sleeps `wait`, or less if the pusher is told to stop (its last push goes out at once).
async fn backoff_or_stop(stop: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Whether a failed push is tried again: over TCP and HTTP a failure means the batch was not
/// delivered, and carbon and InfluxDB store each batch's points under its timestamp. Over UDP a
/// failure is a refusal of the *previous* push (or of part of this one), and the next batch
/// carries the current values (statsd: every increment not known to have arrived).
fn retried(spec: &PushSpec) -> bool {
    matches!((spec.kind, spec.transport), (Kind::Carbon, _) | (Kind::Influx, Transport::Http))
}

/// A pusher's tasks; dropping it stops them.
struct Running {
    spec: PushSpec,
    stats: Arc<Stats>,
    queue: Arc<Queue>,
    stop: watch::Sender<bool>,
    ticker: JoinHandle<()>,
    sender: JoinHandle<()>,
}

impl Running {
    fn start(rt: &tokio::runtime::Handle, job: &Arc<Job>, spec: PushSpec, stats: Arc<Stats>) -> Running {
        let queue = Arc::new(Queue::default());
        let (stop, stop_rx) = watch::channel(false);
        let ticker = rt.spawn(ticker(Arc::clone(job), spec.clone(), Arc::clone(&queue), Arc::clone(&stats)));
        let sender =
            rt.spawn(sender(Arc::clone(job), spec.clone(), Arc::clone(&queue), Arc::clone(&stats), stop_rx));
        Running { spec, stats, queue, stop, ticker, sender }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ticker.abort();
        self.sender.abort();
    }
}

/// Every configured pusher; a [`Source`] of the job (their own counters).
pub struct Pushers {
    job: Weak<Job>,
    rt: Option<tokio::runtime::Handle>,
    running: Mutex<BTreeMap<String, Running>>,
}

impl Pushers {
    /// Starts the pushers (on the current tokio runtime) and registers with the job.
    pub fn start(job: &Arc<Job>, specs: &[PushSpec]) -> Arc<Pushers> {
        let rt = tokio::runtime::Handle::try_current().ok();
        let p = Arc::new(Pushers { job: Arc::downgrade(job), rt, running: Mutex::new(BTreeMap::new()) });
        p.reload(specs);
        job.add_source(Arc::clone(&p) as Arc<dyn Source>);
        p
    }

    /// Replaces the configuration (SIGHUP): pushers whose section is unchanged keep their tasks,
    /// connections and statsd baselines; changed ones start again (their counters go on), removed
    /// ones stop.
    pub fn reload(&self, specs: &[PushSpec]) {
        let (Some(job), Some(rt)) = (self.job.upgrade(), self.rt.as_ref()) else {
            if !specs.is_empty() {
                tracing::error!("stats pushers need the aggregator's runtime; none started");
            }
            return;
        };
        let mut running = lock(&self.running);
        let mut old = std::mem::take(&mut *running);
        for spec in specs {
            if running.contains_key(&spec.name) {
                tracing::error!(
                    pusher = spec.name,
                    "two [[push]] sections have this name; the second is ignored"
                );
                continue;
            }
            match old.remove(&spec.name) {
                Some(r) if r.spec == *spec => {
                    running.insert(spec.name.clone(), r);
                }
                prev => {
                    let stats = prev.as_ref().map(|r| Arc::clone(&r.stats)).unwrap_or_default();
                    drop(prev);
                    tracing::info!(pusher = spec.name, "pushing to {} every {} s", spec.address, spec.freq);
                    running.insert(spec.name.clone(), Running::start(rt, &job, spec.clone(), stats));
                }
            }
        }
        for name in old.keys() {
            tracing::info!(pusher = name, "pusher stopped (no longer configured)");
        }
    }

    /// One last push of every pusher, then stops them (waits at most [`SHUTDOWN_WAIT`]).
    pub async fn shutdown(&self) {
        let running: Vec<Running> = std::mem::take(&mut *lock(&self.running)).into_values().collect();
        let Some(job) = self.job.upgrade() else { return };
        if running.is_empty() {
            return;
        }
        for r in &running {
            r.ticker.abort();
            r.stop.send_replace(true);
        }
        let snap = job.merged().await;
        let absolute = job.derived_absolute();
        let mut waits = Vec::new();
        if let Some(snap) = snap {
            for r in &running {
                let b = batch(&snap, &absolute, &r.spec.series, crate::procs::unix_now());
                let (seq, _) = r.queue.push(b);
                waits.push((r.queue.done.subscribe(), seq, r.spec.name.clone()));
            }
        }
        let all = async {
            for (mut done, seq, _) in waits.iter_mut().map(|(d, s, n)| (d.clone(), *s, n.clone())) {
                let _ = done.wait_for(|d| *d >= seq).await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_WAIT, all).await.is_err() {
            let late: Vec<&str> =
                waits.iter().filter(|(d, s, _)| *d.borrow() < *s).map(|(_, _, n)| n.as_str()).collect();
            tracing::warn!("the last push of {} did not finish within {SHUTDOWN_WAIT:?}", late.join(", "));
        }
        drop(running);
    }
}

impl Source for Pushers {
    fn families(&self) -> Vec<SnapFamily> {
        let running = lock(&self.running);
        if running.is_empty() {
            return Vec::new();
        }
        let family = |name: &str, help: &str, get: &dyn Fn(&Stats) -> u64| SnapFamily {
            meta: FamilyMeta::own(name, help, MetricType::Counter, ValueType::U64, &["pusher"]),
            series: running
                .iter()
                .map(|(n, r)| {
                    (
                        Arc::new(LabelSet::new(vec![("pusher".to_string(), n.clone())])),
                        Value::U64(get(&r.stats)),
                    )
                })
                .collect(),
        };
        vec![
            family("shmetrics_pushes", "Successful pushes of each [[push]] pusher.", &|s| {
                s.pushes.load(Ordering::Relaxed)
            }),
            family(
                "shmetrics_push_errors",
                "Failed pushes of each [[push]] pusher, and batches dropped because the receiver was too slow.",
                &|s| s.errors.load(Ordering::Relaxed),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(name: &str, t: MetricType, series: Vec<(LabelSet, Value)>) -> SnapFamily {
        let mut meta = (*FamilyMeta::own(name, "", t, ValueType::F64, &["k"])).clone();
        meta.desc.buckets = vec![0.5];
        SnapFamily {
            meta: Arc::new(meta),
            series: series.into_iter().map(|(l, v)| (Arc::new(l), v)).collect(),
        }
    }

    fn labels(v: &str) -> LabelSet {
        LabelSet::new(vec![("k".into(), v.into())])
    }

    #[test]
    fn every_sample_with_its_flavor_and_the_series_filter() {
        let mut h = labels("x");
        h.bounds = vec![0.5];
        let snap = Snapshot {
            families: vec![
                family(
                    "c",
                    MetricType::Counter,
                    vec![(labels("a"), Value::U64(3)), (labels("b"), Value::U64(4))],
                ),
                family("h", MetricType::Histogram, vec![(h, Value::Hist { buckets: vec![1, 2], sum: 2.5 })]),
                family("g", MetricType::Gauge, vec![(labels("a"), Value::F64(-1.0))]),
                family("abs", MetricType::Gauge, vec![(labels("a"), Value::F64(7.0))]),
            ],
        };
        let got = |series: &[Selector]| -> Vec<(String, Flavor, f64)> {
            batch(&snap, &["abs".to_string()], series, 1.0)
                .points
                .into_iter()
                .map(|p| (p.sample.selector(), p.flavor, p.sample.value))
                .collect()
        };
        let all = got(&[]);
        let want = vec![
            (r#"c_total{k="a"}"#.to_string(), Flavor::Counter, 3.0),
            (r#"c_total{k="b"}"#.to_string(), Flavor::Counter, 4.0),
            (r#"h_bucket{k="x",le="0.5"}"#.to_string(), Flavor::Counter, 1.0),
            (r#"h_bucket{k="x",le="+Inf"}"#.to_string(), Flavor::Counter, 3.0),
            (r#"h_count{k="x"}"#.to_string(), Flavor::Counter, 3.0),
            (r#"h_sum{k="x"}"#.to_string(), Flavor::Counter, 2.5),
            (r#"g{k="a"}"#.to_string(), Flavor::Gauge, -1.0),
            (r#"abs{k="a"}"#.to_string(), Flavor::Absolute, 7.0),
        ];
        assert_eq!(all, want);
        let only = [Selector::parse(r#"c_total{k="b"}"#), Selector::parse("h_count")];
        let only: Vec<Selector> = only.into_iter().flatten().collect();
        let names: Vec<String> = got(&only).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(names, vec![r#"c_total{k="b"}"#.to_string(), r#"h_count{k="x"}"#.to_string()]);
    }

    #[test]
    fn backoff_doubles_up_to_freq_or_a_minute() {
        let f = Duration::from_secs(10);
        let got: Vec<u64> = (1..=6).map(|n| backoff(n, f).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(20, Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(backoff(1, Duration::from_millis(200)), Duration::from_millis(200));
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let q = Queue::default();
        let drops: Vec<bool> = (0..6).map(|_| q.push(Batch::default()).1).collect();
        assert_eq!(drops, vec![false, false, false, false, true, true]);
        let seqs = |q: &Queue| -> Vec<u64> { lock(&q.batches).batches.iter().map(|(s, _)| *s).collect() };
        assert_eq!(seqs(&q), vec![3, 4, 5, 6]);
        // A failed batch goes back in front only if there is room.
        let b = Arc::new(Batch::default());
        assert!(!q.retry(2, &b));
        lock(&q.batches).batches.pop_front();
        assert!(q.retry(3, &b));
        assert_eq!(seqs(&q), vec![3, 4, 5, 6]);
    }
}
