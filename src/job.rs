//! The job: the one owner of the [`Aggregator`], its only upkeep task, and what every reader sees.
//!
//! # Why a job core
//!
//! Everything on the operations side (health checks, `perf_metrics`, the `monitor` command, the
//! process families of `/metrics`, alarms, and the pushers and pollsters to come) asks the same
//! questions about the same directory. When each of them scanned the directory itself, a flood of
//! `/healthz` requests was a flood of scans, and the worker exits the aggregator noticed went to
//! whichever caller happened to ask first: an exit taken by a health check never reached the
//! crash alarm. And every `/metrics` request merged every file under one mutex: 1,000 concurrent
//! scrapers of a W=4 S=1000 directory waited 1.56 s at the median, 5.2 s at the 99th percentile.
//!
//! So, as in mini-redis's `Db` (a state type owns its background task):
//!
//! - [`Job`] owns the aggregator and runs the **only** upkeep task: every interval it folds dead
//!   workers and publishes a [`JobView`] (a `tokio::sync::watch` of `Arc<JobView>`); every
//!   [`PROCS_INTERVAL`], and when new writers appear, the view also gets a fresh look at the
//!   job's processes in `/proc` (not on every pass: reading `smaps_rollup` walks page tables). Every merge publishes a view too, so what a scrape
//!   saw, health sees. Readers take the latest view and never scan.
//! - Every exit the aggregator notices (in upkeep or during a merge) goes to **every** subscriber
//!   of [`Job::exits`], exactly once each.
//! - [`Job::scrape`] is single flight: a scrape arriving while a merge is in flight takes that
//!   merge's result instead of starting another, and no more than one merge runs at a time
//!   (`shmetrics_merges_total` against `shmetrics_scrapes_total` shows the sharing).
//!
//! - What the directory does not hold joins every merge here, so `/metrics`, the threshold rules,
//!   the pushers and the text dir all see the same series: families of [`Source`]s (uWSGI's
//!   stats server, the pushers' own counters), then the derived metrics ([`crate::derived`]),
//!   computed on the merged series.
//! - Consumers that need merged series on their own schedule (pushers, the text dir) take
//!   [`Job::recent`], which shares the latest merge; with derived metrics configured (their
//!   collectors run every `freq_seconds`), or when [`Job::merge_every_pass`] is asked, every upkeep
//!   pass is a merge.
//!
//! Nothing here knows about HTTP, the monitor port or alarms: those sit above and read views.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::aggregator::{Aggregator, Exit, Stats};
use crate::derived;
use crate::merge::{SnapFamily, Snapshot};
use crate::procs::{self, ProcStats};

/// What the job looks like, as of one upkeep pass. Cheap to share: readers hold an `Arc`.
#[derive(Clone, Debug, Default)]
pub struct JobView {
    /// Number of this view (0 for the one published before the first pass).
    pub generation: u64,
    /// Number of looks at `/proc` so far: `procs` and `cpu_seconds` are from the last one (a view
    /// published after a merge carries the directory's news and the previous look's figures).
    pub procs_generation: u64,
    /// Seconds since the aggregator started, when the view was taken.
    pub uptime: f64,
    /// When the view was taken, unix seconds.
    pub at: f64,
    /// The multiproc directory.
    pub dir: PathBuf,
    /// The aggregator's pid and resident memory (bytes, `-1` if unknown).
    pub aggregator_pid: u32,
    /// See `aggregator_pid`.
    pub aggregator_rss: i64,
    /// Whether any worker was seen since start (health says "booting" until then).
    pub ever_seen: bool,
    /// Live workers (masters not included).
    pub live_workers: usize,
    /// Ready workers (see [`Aggregator::ready_workers`]).
    pub ready_workers: usize,
    /// Workers and masters, with their figures from `/proc`.
    /// (Shared between views: a merge republishes the last look's without copying it.)
    pub procs: Arc<Vec<ProcStats>>,
    /// The job's CPU seconds, including processes that are gone (never goes down).
    pub cpu_seconds: f64,
    /// The aggregator's statistics (files, series, archive totals, last merge).
    pub stats: Stats,
    /// Scrapes asked of the job so far.
    pub scrapes: u64,
}

/// Shortest time between two looks at the job's processes in `/proc` by the upkeep task.
pub const PROCS_INTERVAL: Duration = Duration::from_secs(1);

/// How many times the last look's duration must have passed before new writers prompt another
/// look: with hundreds of processes a look takes tens of milliseconds, and under worker churn
/// there is a new writer at every pass. (While the job is booting, every new writer is looked
/// at: health must not say "booting" about a job whose files a scrape has already served.)
const LOOK_GAP_FACTOR: u32 = 10;

/// When the last look at `/proc` started, how long it took, and the writers' pids it was for.
struct LastLook {
    at: Instant,
    took: Duration,
    pids: std::collections::HashSet<u64>,
}

/// A merge result shared by every scrape that waited for it (`None`: the merge failed).
type Merged = Option<Arc<Snapshot>>;

/// Families that something other than the directory adds to every merge (uWSGI's stats server,
/// the pushers' own counters). `families` answers from memory — what the source's own task
/// fetched last — and never blocks: it runs inside every merge.
pub trait Source: Send + Sync {
    /// The families to add, each with at least one series; names must not clash with the
    /// directory's (use a prefix of your own).
    fn families(&self) -> Vec<SnapFamily>;
}

/// The job core: the aggregator, the upkeep task, the published view and the exit feeds.
pub struct Job {
    aggregator: Mutex<Aggregator>,
    started: Instant,
    view: watch::Sender<Arc<JobView>>,
    exit_feeds: Mutex<Vec<mpsc::UnboundedSender<Exit>>>,
    /// The merge in flight, if any: scrapes arriving now wait for its result.
    flight: Mutex<Option<watch::Receiver<Option<Merged>>>>,
    scrapes: AtomicU64,
    /// Asks the upkeep task for a pass with a look at `/proc` now (see [`Job::fresh_view`]).
    wake: Notify,
    /// Serializes publishing, so generations only grow.
    publishing: Mutex<()>,
    /// The last look at `/proc`.
    last_look: Mutex<Option<LastLook>>,
    interval: Duration,
    /// Families added to every merge.
    sources: Mutex<Vec<Arc<dyn Source>>>,
    /// Derived metrics, computed on every merge.
    derived: Mutex<derived::Engine>,
    /// The latest merge and when it finished.
    latest: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// Whether every upkeep pass merges (asked by a consumer, see [`Job::merge_every_pass`]).
    every_pass: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Job {
    /// Takes over an aggregator and publishes a first view (a blocking upkeep pass). The upkeep
    /// task starts with [`Job::run_upkeep`].
    pub fn new(aggregator: Aggregator, interval: Duration) -> Arc<Job> {
        let dir = aggregator.dir().to_path_buf();
        let view =
            JobView { dir, aggregator_pid: std::process::id(), aggregator_rss: -1, ..JobView::default() };
        let job = Arc::new(Job {
            aggregator: Mutex::new(aggregator),
            started: Instant::now(),
            view: watch::channel(Arc::new(view)).0,
            exit_feeds: Mutex::new(Vec::new()),
            flight: Mutex::new(None),
            scrapes: AtomicU64::new(0),
            wake: Notify::new(),
            publishing: Mutex::new(()),
            last_look: Mutex::new(None),
            interval,
            sources: Mutex::new(Vec::new()),
            derived: Mutex::new(derived::Engine::default()),
            latest: Mutex::new(None),
            every_pass: std::sync::atomic::AtomicBool::new(false),
        });
        job.upkeep(true);
        job
    }

    /// Time since the job core was created (the aggregator's uptime).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The latest view.
    pub fn view(&self) -> Arc<JobView> {
        Arc::clone(&self.view.borrow())
    }

    /// A receiver of every view published from now on.
    pub fn watch(&self) -> watch::Receiver<Arc<JobView>> {
        self.view.subscribe()
    }

    /// A view with a look at `/proc` that finished after this call: asks the upkeep task for a
    /// pass now and waits for it (requests arriving meanwhile share that pass).
    pub async fn fresh_view(&self) -> Arc<JobView> {
        let mut rx = self.view.subscribe();
        let seen = rx.borrow_and_update().procs_generation;
        self.wake.notify_one();
        let fresh = rx.wait_for(|v| v.procs_generation > seen).await.map(|v| Arc::clone(&v));
        fresh.unwrap_or_else(|_| self.view())
    }

    /// A feed of every worker exit noticed from now on, each exactly once.
    pub fn exits(&self) -> mpsc::UnboundedReceiver<Exit> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.exit_feeds).push(tx);
        rx
    }

    /// Runs `f` with the aggregator locked, then hands the exits it noticed to every feed.
    pub fn with<R>(&self, f: impl FnOnce(&mut Aggregator) -> R) -> R {
        let (r, exits) = {
            let mut agg = lock(&self.aggregator);
            let r = f(&mut agg);
            (r, agg.take_exits())
        };
        if !exits.is_empty() {
            let mut feeds = lock(&self.exit_feeds);
            feeds.retain(|tx| exits.iter().all(|e| tx.send(e.clone()).is_ok()));
        }
        r
    }

    /// The merged view of every file plus self metrics, sources and derived metrics. Single
    /// flight: while a merge runs, every scrape that arrives waits for its result; the next
    /// scrape after it starts a new one. Counted in `shmetrics_scrapes_total`.
    pub async fn scrape(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        self.shared_merge().await
    }

    /// A merge for the aggregator's own consumers (pushers, the text dir): as [`Job::scrape`],
    /// but not counted as a scrape.
    pub async fn merged(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        self.shared_merge().await
    }

    /// The latest merge if it finished less than `max_age` ago, else a new one ([`Job::merged`]).
    pub async fn recent(self: &Arc<Self>, max_age: Duration) -> Option<Arc<Snapshot>> {
        let latest = lock(&self.latest).as_ref().filter(|(at, _)| at.elapsed() < max_age).map(|(_, s)| Arc::clone(s));
        match latest {
            Some(s) => Some(s),
            None => self.merged().await,
        }
    }

    /// Adds a source of families to every merge from now on.
    pub fn add_source(&self, source: Arc<dyn Source>) {
        lock(&self.sources).push(source);
    }

    /// Replaces the derived metrics (`[[metric]]`); the state of those that stay is kept.
    pub fn set_derived(&self, specs: Vec<derived::MetricSpec>) {
        lock(&self.derived).reload(specs);
    }

    /// A pusher sent the latest values: derived metrics with `reset_after_push` start again.
    pub fn pushed(&self) {
        lock(&self.derived).pushed();
    }

    /// Names of the derived families of uWSGI's type `absolute` (see [`derived::Engine::absolute_names`]).
    pub fn derived_absolute(&self) -> Vec<String> {
        lock(&self.derived).absolute_names()
    }

    /// Makes every upkeep pass a merge (a consumer needs merged series every pass: the text dir).
    pub fn merge_every_pass(&self) {
        self.every_pass.store(true, Ordering::Relaxed);
    }

    /// Whether upkeep passes merge: asked for, or derived metrics are configured.
    fn merging_passes(&self) -> bool {
        self.every_pass.load(Ordering::Relaxed) || !lock(&self.derived).is_empty()
    }

    /// One merge shared by every caller that arrives while it runs.
    async fn shared_merge(self: &Arc<Self>) -> Option<Arc<Snapshot>> {
        let mut rx = {
            let mut flight = lock(&self.flight);
            match &*flight {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *flight = Some(rx.clone());
                    // On a task of its own: a scrape whose client went away does not cancel the
                    // merge the others wait for.
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        let job = Arc::clone(&me);
                        let merged =
                            tokio::task::spawn_blocking(move || job.merge()).await.ok().map(Arc::new);
                        if let Some(m) = &merged {
                            *lock(&me.latest) = Some((Instant::now(), Arc::clone(m)));
                        }
                        // Cleared first: a scrape arriving after this starts a fresh merge.
                        *lock(&me.flight) = None;
                        tx.send_replace(Some(merged));
                    });
                    rx
                }
            }
        };
        let merged = rx.wait_for(Option::is_some).await.map(|m| m.clone()).ok()?;
        merged.flatten()
    }

    /// One merge (blocking), with a look at `/proc` first if one is due: the process families
    /// served with it, and the health checks after it, see the processes of the files it merged.
    /// Then the sources' families and the derived metrics join it; it becomes the latest.
    fn merge(&self) -> Snapshot {
        let scrapes = self.scrapes.load(Ordering::Relaxed);
        let mut snap = self.pass(false, Some(scrapes)).unwrap_or_default();
        let sources: Vec<Arc<dyn Source>> = lock(&self.sources).clone();
        for s in sources {
            snap.families.extend(s.families());
        }
        lock(&self.derived).apply(&mut snap, Instant::now());
        snap.families.sort_by(|a, b| a.meta.desc.name.cmp(&b.meta.desc.name));
        snap
    }

    /// Whether to look at `/proc` now: `asked`, or the last look is [`PROCS_INTERVAL`] old, or a
    /// process wrote its first file since the last look (a master must be seen before it reaps
    /// its first workers, see [`procs`], and new workers should show up at once) and the last
    /// look is ten times its own duration old, or no worker was seen yet. A look counts as
    /// started when this says yes.
    fn look_wanted(&self, a: &Aggregator, asked: bool) -> bool {
        let mut last = lock(&self.last_look);
        let writers = || {
            let python = a.python_pids().into_iter().filter_map(|p| u64::try_from(p).ok());
            a.workers().iter().map(|w| w.pid).chain(python)
        };
        let want = match last.as_ref() {
            None => true,
            Some(l) => {
                let since = l.at.elapsed();
                let due = since >= l.took * LOOK_GAP_FACTOR || !a.workers_ever_seen();
                asked || since >= PROCS_INTERVAL || (due && writers().any(|p| !l.pids.contains(&p)))
            }
        };
        if want {
            let took = last.as_ref().map_or(Duration::ZERO, |l| l.took);
            *last = Some(LastLook { at: Instant::now(), took, pids: writers().collect() });
        }
        want
    }

    /// Records how long the look that just ended took.
    fn looked(&self, took: Duration) {
        if let Some(l) = lock(&self.last_look).as_mut() {
            l.took = took;
        }
    }

    /// One pass (blocking: file and `/proc` I/O): scans the directory (merging if `merge`, the
    /// scrapes asked so far) and folds dead workers, then looks at the job's processes when
    /// [`Job::look_wanted`] says so, and publishes the view.
    fn pass(&self, asked: bool, merge: Option<u64>) -> Option<Snapshot> {
        let (snap, input) = self.with(|a| {
            let snap = match merge {
                Some(n) => Some(a.scrape_counted(n)),
                None => {
                    a.compact();
                    None
                }
            };
            let input = self.look_wanted(a, asked).then(|| a.job_input());
            if input.is_none() {
                self.publish(a, None);
            }
            (snap, input)
        });
        if let Some(input) = input {
            // Outside the lock: reading smaps_rollup walks each process's page tables.
            let started = Instant::now();
            let table = procs::collect(&input);
            self.looked(started.elapsed());
            self.with(|a| {
                let cpu = a.account(&table);
                self.publish(a, Some((table, cpu)));
            });
        }
        snap
    }

    /// Scrapes asked of the job so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }

    /// Publishes the aggregator's state as the new view, with `procs` (the processes and the
    /// job's CPU seconds) from a fresh look, or the previous view's.
    fn publish(&self, a: &Aggregator, procs: Option<(Vec<ProcStats>, f64)>) {
        let _order = lock(&self.publishing);
        let last = self.view();
        let fresh = procs.is_some();
        let (procs, cpu_seconds) = match procs {
            Some((table, cpu)) => (Arc::new(table), cpu),
            None => (Arc::clone(&last.procs), last.cpu_seconds),
        };
        let view = JobView {
            generation: last.generation + 1,
            procs_generation: last.procs_generation + u64::from(fresh),
            uptime: self.started.elapsed().as_secs_f64(),
            at: procs::unix_now(),
            dir: a.dir().to_path_buf(),
            aggregator_pid: std::process::id(),
            aggregator_rss: if fresh { procs::own_rss() } else { last.aggregator_rss },
            ever_seen: a.workers_ever_seen(),
            live_workers: a.live_workers(),
            ready_workers: a.ready_workers(),
            procs,
            cpu_seconds,
            stats: a.stats().clone(),
            scrapes: self.scrapes(),
        };
        self.view.send_replace(Arc::new(view));
    }

    /// One upkeep pass (blocking): folds dead workers, looks at the job's processes if `look` or
    /// if one is due, publishes the view.
    pub fn upkeep(&self, look: bool) {
        self.pass(look, None);
    }

    /// The upkeep task: a pass at once, then every interval (or at once when [`Job::fresh_view`]
    /// asks), until aborted. A pass is a merge when [`Job::merging_passes`] says so (and not
    /// asked for a look at `/proc`: that pass publishes at once).
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut asked = false;
        loop {
            if !asked && self.merging_passes() {
                let _ = self.merged().await;
            } else {
                let me = Arc::clone(&self);
                if let Err(e) = tokio::task::spawn_blocking(move || me.upkeep(asked)).await {
                    tracing::error!("upkeep pass failed: {e}");
                }
            }
            asked = tokio::time::timeout(self.interval, self.wake.notified()).await.is_ok();
        }
    }

    /// Saves what only the in-memory archive holds (shutdown).
    pub fn flush(&self) {
        self.with(Aggregator::flush);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregator::Options;

    fn job() -> (tempfile::TempDir, Arc<Job>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        let agg = Aggregator::open(&dir, &Options::default()).expect("open");
        (tmp, Job::new(agg, Duration::from_secs(3600)))
    }

    #[test]
    fn upkeep_publishes_numbered_views() {
        let (_tmp, job) = job();
        assert_eq!((job.view().generation, job.view().procs_generation), (1, 1));
        assert!(!job.view().ever_seen);
        job.upkeep(true);
        job.upkeep(false);
        let v = job.view();
        assert_eq!((v.generation, v.procs_generation), (3, 2));
        assert_eq!((v.live_workers, v.ready_workers, v.ever_seen), (0, 0, false));
        assert_eq!(v.aggregator_pid, std::process::id());
        assert!(v.aggregator_rss > 0);
    }

    #[tokio::test]
    async fn concurrent_scrapes_share_merges_and_are_all_counted() {
        let (_tmp, job) = job();
        let scrapes: Vec<_> = (0..50)
            .map(|_| {
                tokio::spawn({
                    let job = Arc::clone(&job);
                    async move { job.scrape().await.is_some() }
                })
            })
            .collect();
        for s in scrapes {
            assert!(s.await.expect("join"));
        }
        assert_eq!(job.scrapes(), 50);
        let merges = job.with(|a| a.stats().merges);
        assert!((1..=50).contains(&merges), "{merges}");
        // A scrape after all of them is a merge of its own, and counts every scrape before it.
        let snap = job.scrape().await.expect("snapshot");
        assert_eq!(job.with(|a| a.stats().merges), merges + 1);
        let scraped = snap.family("shmetrics_scrapes").expect("scrapes family");
        assert_eq!(scraped.series[0].1, crate::merge::Value::U64(51));
    }
}
