//! The pollsters at work: one task that reads every enabled pollster on the interval, and the
//! runtime control (`set_interval`, `set_pollsters`) the monitor port drives.
//!
//! # How
//!
//! - One tokio task. Each pass reads the enabled pollsters one after the other on tokio's
//!   blocking pool (file reads and `statvfs`, one blocking thread per pass, whatever the number
//!   of pollsters), stores what each gave, and sleeps until the next pass is due. The first pass
//!   runs at start.
//! - The settings in force live in a `tokio::sync::watch`: a change wakes the task at once (a
//!   new interval does not wait for the old one to run out; a newly enabled pollster is read
//!   now), and [`Source::families`] reads them too, so a pollster disabled at runtime is gone from
//!   the very next scrape.
//! - A failed read (a reader's error) counts in `shmetrics_pollster_errors_total{pollster}` and
//!   removes that pollster's series until it reads again (stale figures are not served as if they
//!   were current); it is logged at the first failure and whenever the error changes, not at
//!   every poll, and once when the pollster reads again.
//! - Counters never go backwards in what is exposed, whatever the kernel says (an iowait
//!   step back, a driver resetting its counts): [`super::monotonic`].
//! - [`Source::families`] copies what the task stored: no I/O inside a merge.
//!
//! Runtime changes go through [`super::state::Store`], which keeps them against the
//! configuration file's values (see there for the SIGHUP rule).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::state::{self, Effective, Store};
use super::{names, Pollster, PollstersSpec, Settings};
use crate::job::{Job, Source};
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Value};
use crate::parsed::Seconds;
use crate::trust::Trust;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one pollster last gave.
#[derive(Default)]
struct Latest {
    /// The families of its last read, if it worked (and the pollster is still enabled).
    families: Option<Arc<Vec<SnapFamily>>>,
    /// The error of its last read, while it keeps failing (logged when it changes).
    error: Option<String>,
    polls: u64,
    errors: u64,
    /// Its counters as exposed: never lower than before (see [`super::monotonic`]).
    monotonic: super::monotonic::Monotonic,
}

/// What the task shares with [`Pollsters`].
struct Shared {
    dir: PathBuf,
    settings: watch::Sender<Settings>,
    latest: Mutex<BTreeMap<Pollster, Latest>>,
}

impl Shared {
    /// One pass: reads `enabled` (blocking, on tokio's blocking pool) and stores the results.
    async fn poll(&self, enabled: Vec<Pollster>) {
        let dir = self.dir.clone();
        let list = enabled.clone();
        let read =
            tokio::task::spawn_blocking(move || list.iter().map(|p| (*p, p.read(&dir))).collect::<Vec<_>>());
        let results = match read.await {
            Ok(r) => r,
            Err(e) => {
                let why = format!("the read failed: {e}");
                enabled.iter().map(|p| (*p, Err(why.clone()))).collect()
            }
        };
        let mut latest = lock(&self.latest);
        // Read under the lock: [`Pollsters::publish`] sends new settings, then clears under it.
        let now_enabled = self.settings.borrow().enabled.clone();
        for (p, result) in results {
            let l = latest.entry(p).or_default();
            l.polls += 1;
            match result {
                Ok(mut families) => {
                    l.monotonic.apply(&mut families);
                    if l.error.take().is_some() {
                        tracing::info!(pollster = p.name(), "pollster {p} reads again");
                    }
                    // Disabled while it was being read: nothing of it is kept.
                    l.families = now_enabled.contains(&p).then(|| Arc::new(families));
                }
                Err(e) => {
                    l.errors += 1;
                    if l.error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(
                            pollster = p.name(),
                            "pollster {p}: {e} (its series are left out until it reads again)"
                        );
                        l.error = Some(e);
                    }
                    l.families = None;
                }
            }
        }
    }
}

/// The polling task: a pass now, then one every interval; a change of the settings wakes it.
async fn run(shared: Arc<Shared>) {
    let mut rx = shared.settings.subscribe();
    loop {
        let settings = rx.borrow_and_update().clone();
        let started = tokio::time::Instant::now();
        if !settings.enabled.is_empty() {
            shared.poll(settings.enabled.clone()).await;
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + settings.interval.get()) => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Where the settings come from and whether runtime changes are kept.
struct Control {
    store: Store,
    /// The configuration file's settings (or the defaults without a `[pollsters]` section).
    file: Settings,
    /// Whether the configuration file has a `[pollsters]` section.
    section: bool,
    effective: Effective,
}

/// How a runtime change ended.
enum Saved {
    /// Written to the state file.
    Yes,
    /// Written, but to a private directory removed at exit (`shmetrics run` without `--dir`).
    Private,
    /// Not written (the error).
    Failed(String),
}

/// The system pollsters of the aggregator; a [`Source`] of the job.
pub struct Pollsters {
    shared: Arc<Shared>,
    control: Mutex<Control>,
    /// The directory is private to this run and removed at exit.
    private: bool,
    state_write_errors: AtomicU64,
    metas: [Arc<FamilyMeta>; 3],
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Pollsters {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Pollsters {
    /// Starts polling on the current tokio runtime, with the configuration file's `spec` and the
    /// runtime changes recorded in `dir`'s state file, and registers with the job. `private`: the
    /// directory is removed at exit (changes cannot outlive this run; replies say so).
    pub fn start(
        job: &Arc<Job>,
        dir: &Path,
        trust: &Trust,
        spec: Option<&PollstersSpec>,
        private: bool,
    ) -> Arc<Pollsters> {
        let mut store = Store::load(dir, trust);
        let file = Settings::from_spec(spec);
        let (effective, dropped) = store.apply(&file);
        let (settings, _) = watch::channel(effective.settings.clone());
        let shared =
            Arc::new(Shared { dir: dir.to_path_buf(), settings, latest: Mutex::new(BTreeMap::new()) });
        let task = match tokio::runtime::Handle::try_current() {
            Ok(rt) => Some(rt.spawn(run(Arc::clone(&shared)))),
            Err(_) => {
                tracing::error!("no tokio runtime: the system pollsters do not run");
                None
            }
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            FamilyMeta::own(name, help, MetricType::Counter, ValueType::U64, labels)
        };
        let metas = [
            counter(
                "shmetrics_pollster_polls",
                "Reads of the system pollster, failed or not.",
                &["pollster"],
            ),
            counter("shmetrics_pollster_errors", "Reads of the system pollster that failed.", &["pollster"]),
            counter(
                "shmetrics_pollster_state_write_errors",
                "Runtime changes of the pollsters that could not be saved to the state file.",
                &[],
            ),
        ];
        let control = Control { store, file, section: spec.is_some(), effective };
        let pollsters = Arc::new(Pollsters {
            shared,
            control: Mutex::new(control),
            private,
            state_write_errors: AtomicU64::new(0),
            metas,
            task,
        });
        if dropped {
            pollsters.save_dropped(&lock(&pollsters.control));
        }
        if spec.is_some() || pollsters.changed() {
            tracing::info!("pollsters: {}", pollsters.describe());
        }
        job.add_source(Arc::clone(&pollsters) as Arc<dyn Source>);
        pollsters
    }

    /// Takes a reloaded configuration file (SIGHUP): its settings, with the runtime changes whose
    /// key it did not change.
    pub fn reload(&self, spec: Option<&PollstersSpec>) {
        let mut c = lock(&self.control);
        c.file = Settings::from_spec(spec);
        c.section = spec.is_some();
        let file = c.file.clone();
        let (effective, dropped) = c.store.apply(&file);
        c.effective = effective;
        if dropped {
            self.save_dropped(&c);
        }
        self.publish(&c);
        tracing::info!("pollsters: {}", describe(&c));
    }

    /// Saves the state file after the configuration file won over a change; a failure is logged
    /// and counted (the settings in force are right either way).
    fn save_dropped(&self, c: &Control) {
        tracing::info!(
            "pollsters: the configuration file changed a setting that was changed at runtime; the \
             file's value is in force and the runtime change is dropped"
        );
        if let Err(e) = c.store.save() {
            self.state_write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "pollsters: cannot update the state file ({e}); the settings in force are right, but \
                 the next start may apply the dropped change again"
            );
        }
    }

    /// Hands the settings in force to the task (waking it) and forgets disabled pollsters' series.
    fn publish(&self, c: &Control) {
        let settings = c.effective.settings.clone();
        let enabled = settings.enabled.clone();
        self.shared.settings.send_if_modified(|s| {
            let changed = *s != settings;
            *s = settings;
            changed
        });
        // After the send: a pass storing its reads now sees the new settings (see `poll`).
        let mut latest = lock(&self.shared.latest);
        for (p, l) in latest.iter_mut() {
            if !enabled.contains(p) {
                l.families = None;
            }
        }
    }

    /// Whether a runtime change is in force.
    fn changed(&self) -> bool {
        let c = lock(&self.control);
        c.effective.interval_changed || c.effective.enabled_changed
    }

    /// The settings in force, in the `pollsters` command's format (see [`describe`]).
    pub fn describe(&self) -> String {
        describe(&lock(&self.control))
    }

    /// `set_interval`: the reply line (`OK …`) or the error line (`Error: …`).
    pub fn set_interval(&self, interval: Seconds) -> Result<String, String> {
        self.change(format!("interval {interval}"), |c| {
            let file = c.file.clone();
            c.store.set_interval(&file, interval);
        })
    }

    /// `set_pollsters`: as [`Pollsters::set_interval`].
    pub fn set_enabled(&self, enabled: &[Pollster]) -> Result<String, String> {
        let what = format!("pollsters {}", or_none(&state::normal(enabled)));
        self.change(what, |c| {
            let file = c.file.clone();
            c.store.set_enabled(&file, enabled);
        })
    }

    /// Records a change, puts it in force and saves it.
    fn change(&self, what: String, record: impl FnOnce(&mut Control)) -> Result<String, String> {
        let mut c = lock(&self.control);
        record(&mut c);
        let file = c.file.clone();
        c.effective = c.store.apply(&file).0;
        self.publish(&c);
        let saved = match c.store.save() {
            Ok(()) if self.private => Saved::Private,
            Ok(()) => Saved::Yes,
            Err(e) => Saved::Failed(e),
        };
        let now = describe(&c);
        drop(c);
        tracing::info!("pollsters: {what} set on the monitor port; now {now}");
        match saved {
            Saved::Yes => Ok(format!("OK {now}")),
            Saved::Private => Ok(format!(
                "OK {now}; not kept after exit: shmetrics run without --dir uses a private \
                 directory (give it --dir DIR to keep runtime changes across restarts)"
            )),
            Saved::Failed(e) => {
                self.state_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("pollsters: {what} is in force but not saved: {e}");
                Err(format!(
                    "Error: {what} is in force but not saved ({e}): a restart of the aggregator \
                     goes back to the saved settings; now {now}"
                ))
            }
        }
    }
}

/// Names, or `none`.
fn or_none(list: &[Pollster]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        names(list)
    }
}

/// `pollsters NAMES interval SECONDS (pollsters: ORIGIN; interval: ORIGIN)`: NAMES comma-separated
/// or `none`, ORIGIN `runtime change`, `configuration file` or `default` (no `[pollsters]`
/// section).
fn describe(c: &Control) -> String {
    let base = if c.section { "configuration file" } else { "default" };
    let origin = |changed: bool| if changed { "runtime change" } else { base };
    let e = &c.effective;
    format!(
        "pollsters {} interval {} (pollsters: {}; interval: {})",
        or_none(&e.settings.enabled),
        e.settings.interval,
        origin(e.enabled_changed),
        origin(e.interval_changed)
    )
}

fn label(p: Pollster) -> Arc<LabelSet> {
    Arc::new(LabelSet::new(vec![("pollster".to_string(), p.name().to_string())]))
}

impl Source for Pollsters {
    /// The enabled pollsters' last good reads, and the counters: a copy, no I/O.
    fn families(&self) -> Vec<SnapFamily> {
        let enabled = self.shared.settings.borrow().enabled.clone();
        let mut out = Vec::new();
        let (mut polls, mut errors) = (Vec::new(), Vec::new());
        {
            let latest = lock(&self.shared.latest);
            for p in &enabled {
                if let Some(fams) = latest.get(p).and_then(|l| l.families.as_ref()) {
                    out.extend(
                        fams.iter()
                            .filter(|f| !f.series.is_empty())
                            .map(|f| SnapFamily { meta: Arc::clone(&f.meta), series: f.series.clone() }),
                    );
                }
            }
            // Counters of every pollster enabled now or read before (they never go backwards).
            for p in Pollster::ALL {
                let l = latest.get(&p);
                if enabled.contains(&p) || l.is_some() {
                    let (n, e) = l.map_or((0, 0), |l| (l.polls, l.errors));
                    polls.push((label(p), Value::U64(n)));
                    errors.push((label(p), Value::U64(e)));
                }
            }
        }
        let [polls_meta, errors_meta, write_meta] = &self.metas;
        let write_errors = self.state_write_errors.load(Ordering::Relaxed);
        // Nothing at all from an aggregator that never ran a pollster.
        if !polls.is_empty() || write_errors > 0 {
            out.push(SnapFamily {
                meta: Arc::clone(write_meta),
                series: vec![(Arc::new(LabelSet::new(Vec::new())), Value::U64(write_errors))],
            });
        }
        if !polls.is_empty() {
            out.push(SnapFamily { meta: Arc::clone(polls_meta), series: polls });
            out.push(SnapFamily { meta: Arc::clone(errors_meta), series: errors });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregator::{Aggregator, Options};
    use std::time::Duration;

    fn names_of(fams: &[SnapFamily]) -> Vec<String> {
        fams.iter().map(|f| f.meta.desc.name.clone()).collect()
    }

    fn value(fams: &[SnapFamily], name: &str, pollster: &str) -> Option<u64> {
        let f = fams.iter().find(|f| f.meta.desc.name == name)?;
        f.series.iter().find(|(l, _)| l.pairs == [("pollster".to_string(), pollster.to_string())]).and_then(
            |(_, v)| match v {
                Value::U64(n) => Some(*n),
                _ => None,
            },
        )
    }

    /// Polls at start, a disabled pollster is gone at once (its counters stay), a newly enabled one
    /// is read without waiting for the (hour-long) interval, and nothing runs without a section.
    #[test]
    fn changes_take_effect_at_once() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("m");
            let agg = Aggregator::open(&dir, &Options::default()).unwrap();
            let trust = agg.trust();
            let job = Job::new(agg, Duration::from_secs(3600));
            let spec: PollstersSpec = toml::from_str("interval_seconds = 3600\nenabled = [\"loadavg\"]").unwrap();
            let p = Pollsters::start(&job, &dir, &trust, Some(&spec), false);
            let wait = |what: &str, f: &dyn Fn(&[SnapFamily]) -> bool| {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let fams = p.families();
                    if f(&fams) {
                        return fams;
                    }
                    assert!(std::time::Instant::now() < deadline, "{what}: {:?}", names_of(&fams));
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            let fams = tokio::task::block_in_place(|| {
                wait("the first poll", &|f| value(f, "shmetrics_pollster_polls", "loadavg") == Some(1))
            });
            assert_eq!(value(&fams, "shmetrics_pollster_errors", "loadavg"), Some(0));
            assert!(names_of(&fams).contains(&"node_load1".to_string()));

            assert!(p.set_enabled(&[Pollster::Meminfo]).unwrap().starts_with("OK pollsters meminfo interval 3600"));
            let now = p.families();
            assert!(!names_of(&now).contains(&"node_load1".to_string()), "gone at once");
            assert_eq!(value(&now, "shmetrics_pollster_polls", "loadavg"), Some(1), "its counters stay");
            tokio::task::block_in_place(|| {
                wait("meminfo read at once", &|f| names_of(f).contains(&"node_memory_MemTotal_bytes".to_string()))
            });
            assert_eq!(
                p.describe(),
                "pollsters meminfo interval 3600 (pollsters: runtime change; interval: configuration file)"
            );

            // The file now says meminfo too: the change is no longer one.
            let spec: PollstersSpec = toml::from_str("interval_seconds = 3600\nenabled = [\"meminfo\"]").unwrap();
            p.reload(Some(&spec));
            assert_eq!(
                p.describe(),
                "pollsters meminfo interval 3600 (pollsters: configuration file; interval: configuration file)"
            );
            p.reload(None);
            assert_eq!(p.describe(), "pollsters none interval 10 (pollsters: default; interval: default)");
            assert!(!names_of(&p.families()).iter().any(|n| n.starts_with("node_")));
        });
    }
}
