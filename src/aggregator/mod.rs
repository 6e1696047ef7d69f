//! One scrape of a multiproc directory: scan, refresh, fold the dead, merge, add self metrics.
//!
//! The [`Aggregator`] keeps every worker file open and parsed between scrapes. A scrape:
//! 1. lists the directory; new writer files are opened, vanished ones dropped, files that cannot
//!    be read are remembered as bad (and re-examined only when their size or mtime changes);
//! 2. parses records each file appended since the last scrape and maps new series to merged ones;
//! 3. tests each writer's lock: a dead writer's final values are folded into the archive, the
//!    archive is saved durably, and only then is the file removed (`folds`, `crate::archive`);
//! 4. starts from the archived values and combines every live file's slots into them;
//! 5. appends the aggregator's own metrics.
//!
//! The aggregator is the only process that removes files in the directory (it holds the
//! directory lock), so there is never a race between two compactors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::archive;
use crate::dir::{self, DirLock};
use crate::error::Result;
use crate::layout::{self, header, GaugeMode, MetricType};
use crate::merge::Merger;
use crate::procs;
use crate::python::{self as py, KeyCache};
use crate::reader::WorkerFile;
use crate::trust::Trust;

pub use crate::archive::Totals;
pub use crate::dir::Startup;
pub use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
pub use crate::reader::BadReason;

mod folds;
mod python;
mod self_metrics;
mod workers;
use folds::Folds;
use python::PyTracked;
use self_metrics::SelfMeta;

/// Merged-series index meaning "not exported" (conflicting metric).
const SKIP: u32 = u32::MAX;

/// A worker file being followed.
struct Tracked {
    file: WorkerFile,
    /// Its writer is gone (kept only by a read-only aggregator, which does not fold).
    dead: bool,
    /// Merged family per file metric id (`None`: conflicts with another file's definition).
    families: Vec<Option<u32>>,
    /// Merged series per file series index, or [`SKIP`].
    series: Vec<u32>,
}

/// A file we could not read, and the state it was in when we gave up on it.
struct Bad {
    reason: BadReason,
    stamp: (u64, Option<SystemTime>),
}

/// Facts about one live worker, for health checks and process metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Pid in the writer's namespace.
    pub pid: u64,
    /// File creation time, unix ns.
    pub start_time_ns: u64,
    /// Pid of the process that forked it (0 if none): its master.
    pub parent_pid: u64,
    /// Whether the worker declared itself ready.
    pub ready: bool,
    /// The worker's file.
    pub path: PathBuf,
    /// Whether other files name it as their parent: it is a master, not a worker (sticky).
    pub master: bool,
    /// Forked children that write into this file, having none of their own (disk full).
    pub shared_forks: u64,
}

/// A worker whose exit the aggregator noticed (its file was folded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Pid in the writer's namespace.
    pub pid: u64,
    /// Whether it exited through a normal process exit (its clean-exit flag was set).
    pub clean: bool,
}

/// Counters and gauges about the aggregator itself.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Scrapes served (as told by the caller of [`Aggregator::scrape_counted`]; one per merge
    /// with [`Aggregator::scrape`]).
    pub scrapes: u64,
    /// Merges done: several scrapes may share one.
    pub merges: u64,
    /// Duration of the last scrape's merge.
    pub last_scrape: Duration,
    /// Writer files followed in the last scrape.
    pub files: usize,
    /// Live workers in the last scrape.
    pub live_workers: usize,
    /// Series exposed in the last scrape (without self metrics).
    pub series: usize,
    /// Files skipped in the last scrape, by reason.
    pub bad_files: BTreeMap<BadReason, usize>,
    /// Times a file was found unreadable, since start.
    pub bad_file_events: u64,
    /// Metric definitions skipped because another process defined the same name differently.
    pub conflicts: usize,
    /// Archive totals (dead workers, dropped updates of dead workers).
    pub totals: Totals,
    /// Dropped series and updates reported by live files.
    pub live_dropped_series: u64,
    /// See `live_dropped_series`.
    pub live_dropped_updates: u64,
    /// Forked children writing into live files because they could not create their own.
    pub live_shared_forks: u64,
    /// Python prometheus_client files followed.
    pub python_files: usize,
    /// Distinct live processes among the Python files.
    pub python_processes: usize,
    /// Archive saves that failed, since start.
    pub archive_save_errors: u64,
    /// Archives set aside as corrupt (`archive.json.corrupt-*`) in the directory.
    pub corrupt_archives: usize,
    /// Dead workers' files folded but not removed yet (waiting for the archive to be saved).
    pub pending_removal: usize,
    /// Series whose slots held an invalid value in the last scrape (an enum state index out of
    /// range): ignored, as if that writer had not set them.
    pub invalid_values: usize,
}

/// Options of an aggregator.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Remove everything of ours at start-up, whatever is alive.
    pub wipe: bool,
    /// Apply no start-up rule: read the directory as it is (one-shot reads, benchmarks).
    pub keep: bool,
    /// Take no lock and change nothing in the directory (`shmetrics dump`, next to a running
    /// aggregator): dead workers' files are read as they are instead of being folded.
    pub read_only: bool,
    /// Fold dead Python processes' files into the archive and remove them (see
    /// `python` for why that is safe).
    pub compact_python: bool,
    /// The directory is deliberately shared between users: accept it although another user owns
    /// it or may write to it (see `crate::trust::check_dir`).
    pub shared_dir: bool,
    /// On a fresh start (no live writer), keep the previous run's counters, histograms and
    /// summaries (the archive, with dead writers' files folded in) instead of clearing them.
    pub restore: bool,
}

/// Follows a directory and produces merged snapshots.
pub struct Aggregator {
    /// The directory lock; `None` for a read-only aggregator.
    _lock: Option<DirLock>,
    dir: PathBuf,
    trust: Trust,
    read_only: bool,
    startup: Startup,
    files: HashMap<String, Tracked>,
    py: HashMap<String, PyTracked>,
    keys: KeyCache,
    compact_python: bool,
    foreign_logged: std::collections::HashSet<String>,
    bad: HashMap<String, Bad>,
    merger: Merger,
    totals: Totals,
    /// What was folded, what of it is on disk, what waits for removal.
    folds: Folds,
    /// Archives set aside as corrupt, present in the directory at the last scan.
    corrupt_archives: usize,
    /// Ids of files that other files name as their parent: masters, for as long as they live.
    master_files: std::collections::HashSet<[u8; 16]>,
    /// The job's CPU time and who the masters are, from the last look at `/proc`.
    cpu: procs::CpuLedger,
    /// Workers without a shmetrics file (Python workers, workers forked without a file) at the
    /// last look at `/proc`: (live, ready).
    other_workers: (usize, usize),
    dead_since_rebuild: usize,
    /// The merger epoch all mappings were made at.
    epoch_mapped: u64,
    /// Whether any worker was seen since start (health: booting until then).
    ever_seen: bool,
    /// Exits noticed and not yet taken by the alarm rules.
    exits: Vec<Exit>,
    stats: Stats,
    workers: Vec<WorkerInfo>,
    self_meta: SelfMeta,
}

impl Aggregator {
    /// Takes ownership of `dir` (creating it), applies the start-up rule and loads the archive.
    pub fn open(dir: &Path, opts: &Options) -> Result<Aggregator> {
        let (lock, trust, startup) = if opts.read_only {
            (None, crate::trust::check_dir(dir, opts.shared_dir)?, Startup::Kept)
        } else {
            let lock = dir::lock(dir, opts.shared_dir)?;
            let startup =
                if opts.keep { Startup::Kept } else { dir::startup(&lock, opts.wipe, opts.restore)? };
            let trust = lock.trust();
            remove_archive_temps(dir, &trust);
            (Some(lock), trust, startup)
        };
        let mut merger = Merger::new();
        let loaded = if opts.read_only {
            archive::load_read_only(dir, &trust, &mut merger)
        } else {
            archive::load(dir, &trust, &mut merger)?
        };
        if let Some((aside, why)) = &loaded.set_aside {
            tracing::error!(
                archive = %dir.join(dir::ARCHIVE_FILE).display(),
                "THE ARCHIVE OF DEAD WORKERS' TOTALS IS UNUSABLE ({why}); it was moved to {} and \
                 the totals of dead workers restart from zero. Restore it (stop the aggregator, \
                 move it back) if you can repair it; remove it once dealt with \
                 (shmetrics_archive_corrupt_files counts such files)",
                aside.display()
            );
        }
        if !opts.read_only {
            tracing::info!(dir = %dir.display(), ?startup, "aggregator owns the directory");
        }
        let cpu = procs::CpuLedger::restore(loaded.totals.cpu_seconds, &loaded.totals.cpu_bases);
        let mut agg = Aggregator {
            _lock: lock,
            dir: dir.to_path_buf(),
            trust,
            read_only: opts.read_only,
            startup,
            files: HashMap::new(),
            py: HashMap::new(),
            keys: KeyCache::default(),
            compact_python: opts.compact_python,
            foreign_logged: Default::default(),
            bad: HashMap::new(),
            merger,
            totals: loaded.totals,
            folds: Folds::loaded(loaded.folded),
            corrupt_archives: 0,
            master_files: Default::default(),
            cpu,
            other_workers: (0, 0),
            dead_since_rebuild: 0,
            epoch_mapped: 0,
            ever_seen: false,
            exits: Vec::new(),
            stats: Stats::default(),
            workers: Vec::new(),
            self_meta: SelfMeta::new(),
        };
        if startup == Startup::Restored {
            agg.restore_previous_run();
        }
        Ok(agg)
    }

    /// `--restore` on a fresh start ([`Startup::Restored`]): the previous run's counters,
    /// histograms and summaries continue from its totals.
    ///
    /// The writers' files the start-up kept are folded into the archive as if those workers had
    /// just died — by the fold code every dead worker goes through, so each exactly once (the
    /// archive records the folded ids before the files are removed, and a crash in between
    /// folds nothing twice) — and the archive then loses what must not survive a fresh start:
    /// gauges of every mode (info and enum values are never archived), as without `--restore`.
    /// The aggregator's own totals (dead and crashed workers, dropped series and updates, the
    /// job's CPU seconds of gone processes) are counters too, and continue likewise: the previous
    /// run's last workers, folded here, count as dead (and as crashed unless they exited
    /// cleanly), but raise no crash alarm — the job was stopped, and the alarm would be about
    /// the previous run.
    fn restore_previous_run(&mut self) {
        self.scan();
        let workers = std::mem::take(&mut self.exits).len();
        let mut kept = Merger::new();
        let mut dropped = 0usize;
        for (desc, labels, value) in self.merger.archived() {
            if !matches!(desc.metric_type, MetricType::Counter | MetricType::Histogram | MetricType::Summary)
            {
                dropped += 1;
                continue;
            }
            if let Some(fam) = kept.family_for(desc) {
                let idx = kept.series_for(fam, labels.pairs.clone());
                kept.widen(idx, &labels.bounds);
                kept.archive_value(idx, value);
            }
        }
        self.merger = kept;
        self.remap();
        self.epoch_mapped = self.merger.epoch();
        self.dead_since_rebuild = 0;
        self.folds.touch();
        let (dir, merger, totals) = (&self.dir, &self.merger, &self.totals);
        self.folds.save(|folded| archive::save(dir, merger, totals, folded));
        self.folds.remove_saved();
        tracing::info!(
            dir = %self.dir.display(),
            folded_workers = workers,
            dropped_gauge_series = dropped,
            "--restore: the previous run's counters, histograms and summaries continue from its totals; \
             its gauges start afresh"
        );
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whose files in the directory are used (for the files of ours that sit above, such as the
    /// pollsters' state file).
    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// What start-up did.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// Statistics of the last scrape.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Worker exits noticed since the last call (for crash alarms).
    pub fn take_exits(&mut self) -> Vec<Exit> {
        std::mem::take(&mut self.exits)
    }

    /// Scans the directory, folds dead workers and returns the merged view plus self metrics;
    /// counts one scrape and one merge.
    pub fn scrape(&mut self) -> Snapshot {
        let scrapes = self.stats.scrapes + 1;
        self.scrape_counted(scrapes)
    }

    /// [`Aggregator::scrape`] for a caller that shares merges between scrapes: `scrapes` is how
    /// many it has been asked for so far (exposed as `shmetrics_scrapes_total`, next to
    /// `shmetrics_merges_total`).
    pub fn scrape_counted(&mut self, scrapes: u64) -> Snapshot {
        let started = Instant::now();
        self.scan();
        let mut accs = Vec::new();
        self.merger.begin(&mut accs);
        let mut failed = Vec::new();
        let mut invalid = 0;
        for (name, t) in &mut self.files {
            let merger = &self.merger;
            let map = &t.series;
            let dead = t.dead;
            let read = t.file.for_each_values(|i, slots| {
                if let Some(&idx) = map.get(i) {
                    if idx != SKIP
                        && !(dead && merger.family_is_live(idx))
                        && !accs[idx as usize].add_slots(merger.rule(idx), slots)
                    {
                        invalid += 1;
                    }
                }
            });
            if let Err((reason, why)) = read {
                failed.push((name.clone(), reason, why));
            }
        }
        for (name, t) in &mut self.py {
            if !t.alive && t.is_live_gauge() {
                continue; // a dead process's live gauges are dropped, as mark_process_dead would
            }
            if let Err((reason, why)) = t.accumulate(&mut accs) {
                failed.push((name.clone(), reason, why));
            }
        }
        for (name, reason, why) in failed {
            self.mark_bad(&name, reason, &why);
        }
        if invalid > 0 && self.stats.invalid_values == 0 {
            tracing::warn!(
                series = invalid,
                "ignoring series whose slots hold an invalid value \
                (an enum state index out of range) until they are set again; see shmetrics_invalid_values"
            );
        }
        self.stats.invalid_values = invalid;
        let mut snap = self.merger.snapshot(accs);
        self.stats.scrapes = self.stats.scrapes.max(scrapes);
        self.stats.merges += 1;
        self.stats.series = snap.series_count();
        self.stats.last_scrape = started.elapsed();
        self.self_metrics(&mut snap);
        snap
    }

    /// Scans the directory and folds dead workers, without merging values (background upkeep).
    pub fn compact(&mut self) {
        self.scan();
    }

    fn mark_bad(&mut self, name: &str, reason: BadReason, why: &str) {
        self.files.remove(name);
        self.py.remove(name);
        let path = self.dir().join(name);
        let stamp = stamp(&path);
        tracing::warn!(file = %path.display(), reason = reason.as_str(), "skipping file: {why}; \
            it is left in place — remove it if no worker is using it");
        self.stats.bad_file_events += 1;
        self.bad.insert(name.to_string(), Bad { reason, stamp });
    }

    fn scan(&mut self) {
        let dir = self.dir().to_path_buf();
        let names = match dir::list(&dir) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let present: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        self.files.retain(|n, _| present.contains(n.as_str()));
        self.py.retain(|n, _| present.contains(n.as_str()));
        self.bad.retain(|n, _| present.contains(n.as_str()));
        self.foreign_logged.retain(|n| present.contains(n.as_str()));
        self.folds.prune(&present);
        let mut foreign = 0;
        self.corrupt_archives = 0;
        for name in &names {
            if self.folds.is_doomed(name) {
                continue; // folded already; removed once the archive holding it is saved
            }
            if name.starts_with(archive::CORRUPT_PREFIX) {
                self.corrupt_archives += 1;
                continue;
            }
            if layout::is_writer_temp(name) {
                self.remove_stale_temp(&dir.join(name));
                continue;
            }
            if let Some(original) = name.strip_prefix(python::ASIDE_PREFIX) {
                if !self.py.contains_key(name) {
                    self.adopt_aside(name, original);
                }
                continue;
            }
            if let Some(pyname) = py::parse_name(name) {
                if !self.py.contains_key(name) {
                    self.open_python(name, pyname);
                }
                continue;
            }
            if !layout::is_writer_file(name) {
                if !dir::is_ours(name) {
                    foreign += 1;
                    if self.foreign_logged.insert(name.clone()) {
                        tracing::info!(file = %name, "not a shmetrics or prometheus_client file; skipping it");
                    }
                }
                continue;
            }
            if self.files.contains_key(name) {
                continue;
            }
            let path = dir.join(name);
            if let Some(b) = self.bad.get(name) {
                if b.stamp == stamp(&path) {
                    continue;
                }
            }
            match WorkerFile::open(&path, &self.trust) {
                Ok(file) => {
                    let id = layout::file_id_hex(&file.file_id);
                    if self.folds.is_folded(&id) {
                        // Folded already (an earlier run crashed before removing it, its removal
                        // failed, or a copy was put back): removed, never folded again.
                        if file.is_dead_now() && !self.read_only {
                            self.folds.found(&id, name, path);
                        }
                        continue;
                    }
                    // Two files with one id: one is a copy. The genuine one is the one whose lock
                    // a live writer holds, whichever comes first in name order.
                    let twin = self.files.iter().find(|(_, t)| t.file.file_id == file.file_id);
                    if let Some((twin_name, twin)) = twin {
                        let twin_name = twin_name.clone();
                        if !twin.file.is_dead_now() || file.is_dead_now() {
                            self.mark_bad(
                                name,
                                BadReason::Corrupt,
                                "a copy of another worker's file (same file id)",
                            );
                            continue;
                        }
                        self.mark_bad(
                            &twin_name,
                            BadReason::Corrupt,
                            "a copy of another worker's file (same file id, its lock is free)",
                        );
                    }
                    self.bad.remove(name);
                    self.files.insert(
                        name.clone(),
                        Tracked { file, dead: false, families: Vec::new(), series: Vec::new() },
                    );
                }
                Err((reason, why)) => self.mark_bad(name, reason, &why),
            }
        }
        self.refresh_and_fold();
        if !self.read_only {
            let (dir, merger, totals) = (&self.dir, &self.merger, &self.totals);
            self.folds.save(|folded| archive::save(dir, merger, totals, folded));
            self.folds.remove_saved();
        }
        let mut bad: BTreeMap<BadReason, usize> = BTreeMap::new();
        for b in self.bad.values() {
            *bad.entry(b.reason).or_default() += 1;
        }
        if foreign > 0 {
            *bad.entry(BadReason::Foreign).or_default() += foreign;
        }
        self.stats.bad_files = bad;
        self.stats.files = self.files.len();
        self.stats.python_files = self.py.len();
        self.stats.archive_save_errors = self.folds.save_errors;
        self.stats.corrupt_archives = self.corrupt_archives;
        self.stats.pending_removal = self.folds.doomed_count();
    }

    /// A temp file whose lock is free is the leftover of a writer that died while creating it.
    /// Anything else under a temp name (a link, a FIFO, another user's file) is left alone.
    fn remove_stale_temp(&mut self, path: &Path) {
        if self.read_only {
            return;
        }
        let Ok((file, meta)) = crate::trust::open_read(path, &self.trust) else { return };
        let old =
            meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > dir::TEMP_GRACE);
        if old && crate::trust::lock_is_free(&file) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn refresh_and_fold(&mut self) {
        let mut failed = Vec::new();
        let mut dead = Vec::new();
        let mut names: Vec<String> = self.files.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(t) = self.files.get_mut(&name) else { continue };
            // Liveness first: if the writer is dead, the refresh below sees its final records.
            let is_dead = match t.file.is_dead() {
                Ok(d) => d,
                Err(e) => {
                    failed.push((name, BadReason::Corrupt, e.to_string()));
                    continue;
                }
            };
            if let Err((reason, why)) = t.file.refresh() {
                failed.push((name, reason, why));
                continue;
            }
            map_new(&mut self.merger, t, &mut self.stats.conflicts);
            t.dead = is_dead;
            if is_dead && !self.read_only {
                dead.push(name);
            }
        }
        for (name, reason, why) in failed {
            self.mark_bad(&name, reason, &why);
        }
        self.fold(dead);
        self.refresh_python();
        if self.merger.epoch() != self.epoch_mapped {
            // Bucket bounds widened (another version of a histogram appeared): remap everything.
            self.remap();
            self.epoch_mapped = self.merger.epoch();
        }
        self.collect_workers();
        if self.dead_since_rebuild > 16.max(self.files.len()) {
            self.rebuild();
        }
    }

    fn fold(&mut self, dead: Vec<String>) {
        for name in dead {
            let Some(mut t) = self.files.remove(&name) else { continue };
            let id = layout::file_id_hex(&t.file.file_id);
            if self.folds.is_folded(&id) {
                continue; // cannot happen (folded files are not followed); never fold twice
            }
            let merger = &mut self.merger;
            let map = &t.series;
            let read = t.file.for_each_values(|i, slots| {
                if let Some(&idx) = map.get(i) {
                    if idx != SKIP && !merger.family_is_live(idx) {
                        // Only kept families reach here: they have no invalid slot values.
                        merger.archive_slots(idx, slots);
                    }
                }
            });
            if let Err((reason, why)) = read {
                self.files.insert(name.clone(), t);
                self.mark_bad(&name, reason, &why);
                continue;
            }
            let flags = t.file.header_word(header::FLAGS);
            self.totals.dead_workers += 1;
            let clean = flags & layout::flags::CLEAN_EXIT != 0;
            if !clean {
                self.totals.crashed_workers += 1;
            }
            if self.exits.len() < 10_000 {
                self.exits.push(Exit { pid: t.file.pid, clean });
            }
            self.totals.dropped_series += t.file.header_word(header::DROPPED_SERIES);
            self.totals.dropped_updates += t.file.header_word(header::DROPPED_UPDATES);
            self.totals.shared_forks += t.file.header_word(header::SHARED_FORKS);
            self.dead_since_rebuild += 1;
            self.folds.record(&id, &name, t.file.path().to_path_buf());
        }
    }

    /// Drops merged series that only dead processes had (per-process gauges under churn).
    fn rebuild(&mut self) {
        self.merger = self.merger.rebuilt();
        self.remap();
        self.epoch_mapped = self.merger.epoch();
        self.dead_since_rebuild = 0;
    }

    /// Maps every followed file afresh to the merger's series.
    fn remap(&mut self) {
        self.stats.conflicts = 0;
        for t in self.files.values_mut() {
            t.families.clear();
            t.series.clear();
            map_new(&mut self.merger, t, &mut self.stats.conflicts);
        }
        for t in self.py.values_mut() {
            t.reset();
            t.map_new(&mut self.merger, &mut self.stats.conflicts);
        }
    }
}

impl Aggregator {
    /// Saves the archive if it holds anything not on disk yet (at shutdown), so that what only the
    /// in-memory archive holds (CPU time of gone processes, masters' bases) survives a graceful
    /// restart. Folded files are safe either way: until an archive recording them is saved, they
    /// stay in the directory and the next aggregator folds them.
    pub fn flush(&mut self) {
        if !self.read_only && self.folds.is_dirty() {
            let (dir, merger, totals) = (&self.dir, &self.merger, &self.totals);
            self.folds.save(|folded| archive::save(dir, merger, totals, folded));
            self.folds.remove_saved();
        }
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.flush();
    }
}

fn map_new(merger: &mut Merger, t: &mut Tracked, conflicts: &mut usize) {
    let f = &t.file;
    while t.families.len() < f.metrics.len() {
        let desc = &f.metrics[t.families.len()];
        let fam = merger.family_for(desc);
        if fam.is_none() {
            *conflicts += 1;
            tracing::warn!(metric = %desc.name, file = %f.path().display(),
                "metric defined differently by another process; this process's series are not exported");
        }
        t.families.push(fam);
    }
    while t.series.len() < f.series.len() {
        let s = &f.series[t.series.len()];
        let idx = match t.families.get(s.metric_id as usize).copied().flatten() {
            Some(fam) => {
                let desc = &f.metrics[s.metric_id as usize];
                let mut pairs: Vec<(String, String)> =
                    desc.label_names.iter().cloned().zip(s.label_values.iter().cloned()).collect();
                if desc.gauge_mode.is_some_and(GaugeMode::per_process) {
                    pairs.push(("pid".to_string(), f.pid.to_string()));
                }
                let idx = if desc.metric_type == MetricType::Info {
                    // An info series' values are its label values, then its value set's pairs.
                    let base = pairs.len();
                    let set = s.label_values.get(base..).unwrap_or_default();
                    pairs.extend(set.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())));
                    merger.info_series_for(fam, pairs, base)
                } else {
                    merger.series_for(fam, pairs)
                };
                if desc.metric_type == MetricType::Histogram {
                    // Our slots are laid out for the file's own buckets: the merged series must
                    // have exactly those bounds (it takes them if it has none yet).
                    if merger.bounds(idx).is_empty() {
                        merger.widen(idx, &desc.buckets);
                    }
                    if merger.bounds(idx) != desc.buckets.as_slice() {
                        *conflicts += 1;
                        tracing::warn!(metric = %desc.name, file = %f.path().display(),
                            "histogram series with other buckets elsewhere; this process's series is not exported");
                        t.series.push(SKIP);
                        continue;
                    }
                }
                idx
            }
            None => SKIP,
        };
        t.series.push(idx);
    }
}

/// Size and modification time of a directory entry itself (a link is not followed).
fn stamp(path: &Path) -> (u64, Option<SystemTime>) {
    std::fs::symlink_metadata(path).map_or((0, None), |m| (m.len(), m.modified().ok()))
}

/// Removes temporary archives left by an aggregator that died while saving (only an aggregator
/// holding the lock writes them, so any present now is such a leftover).
fn remove_archive_temps(dir: &Path, trust: &Trust) {
    let Ok(names) = dir::list(dir) else { return };
    for n in names.iter().filter(|n| crate::trust::is_replace_temp(n, dir::ARCHIVE_FILE)) {
        let p = dir.join(n);
        if crate::trust::open_read(&p, trust).is_ok() {
            let _ = std::fs::remove_file(&p);
        }
    }
}
