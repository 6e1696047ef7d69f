//! One scrape of a multiproc directory: scan, refresh, fold the dead, merge, add self metrics.
//!
//! The [`Aggregator`] keeps every worker file open and parsed between scrapes. A scrape:
//! 1. lists the directory; new writer files are opened, vanished ones dropped, files that cannot
//!    be read are remembered as bad (and re-examined only when their size or mtime changes);
//! 2. parses records each file appended since the last scrape and maps new series to merged ones;
//! 3. tests each writer's lock: a dead writer's final values are folded into the archive, the
//!    archive is saved durably, and only then is the file removed ([`folds`], [`crate::archive`]);
//! 4. starts from the archived values and combines every live file's slots into them;
//! 5. appends the aggregator's own metrics.
//!
//! The aggregator is the only process that removes files in the directory (it holds the
//! directory lock), so there is never a race between two compactors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::archive::{self, Totals};
use crate::dir::{self, DirLock, Startup};
use crate::error::Result;
use crate::layout::{self, header, GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, Merger, SnapFamily, Snapshot, Value};
use crate::procs;
use crate::python::{self as py, KeyCache, PyFile};
use crate::reader::{BadReason, WorkerFile};
use crate::trust::Trust;

mod folds;
mod python;
use folds::Folds;
use python::PyTracked;

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
    /// [`python`](self::python) for why that is safe).
    pub compact_python: bool,
    /// The directory is deliberately shared between users: accept it although another user owns
    /// it or may write to it (see [`crate::trust::check_dir`]).
    pub shared_dir: bool,
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
            let startup = if opts.keep { Startup::Kept } else { dir::startup(&lock, opts.wipe)? };
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
        Ok(Aggregator {
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
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What start-up did.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// Statistics of the last scrape.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live workers as of the last scan.
    pub fn workers(&self) -> &[WorkerInfo] {
        &self.workers
    }

    /// Worker exits noticed since the last call (for crash alarms).
    pub fn take_exits(&mut self) -> Vec<Exit> {
        std::mem::take(&mut self.exits)
    }

    /// Whether any worker (a shmetrics file or a live Python process) was seen since start.
    pub fn workers_ever_seen(&self) -> bool {
        self.ever_seen
    }

    /// Ready workers: shmetrics workers that set their ready flag (as of the last scan), plus the
    /// other workers found at the last [`Aggregator::account`] that count as ready (Python workers,
    /// which have no way to say so, and workers forked without a file; see [`procs`]). Masters are
    /// not workers.
    pub fn ready_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.ready && !w.master).count() + self.other_workers.1
    }

    /// Live workers (masters not included), ready or not: see [`Aggregator::ready_workers`].
    pub fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| !w.master).count() + self.other_workers.0
    }

    /// What [`procs::collect`] needs to know of the job.
    pub fn job_input(&self) -> procs::JobInput {
        procs::JobInput {
            files: self
                .workers
                .iter()
                .map(|w| procs::FileProc {
                    pid: w.pid,
                    start_time_ns: w.start_time_ns,
                    master: w.master,
                    ready: w.ready,
                    shared_forks: w.shared_forks,
                })
                .collect(),
            python: self.python_pids(),
            masters: self.cpu.masters().clone(),
        }
    }

    /// Takes in a fresh look at the job's processes ([`procs::collect`] of [`Aggregator::job_input`]):
    /// who the masters are, workers without files, and the job's CPU time. Returns the job's CPU
    /// seconds, which never go down (see [`procs`]).
    pub fn account(&mut self, table: &[procs::ProcStats]) -> f64 {
        if self.cpu.account(table, procs::exists) {
            self.totals.cpu_seconds = self.cpu.archived();
            self.totals.cpu_bases = self.cpu.bases();
            self.folds.touch();
        }
        let files: std::collections::HashSet<i32> =
            self.workers.iter().filter_map(|w| i32::try_from(w.pid).ok()).collect();
        let others = table.iter().filter(|p| p.kind.is_worker() && !files.contains(&p.pid));
        self.other_workers = others.fold((0, 0), |(l, r), p| (l + 1, r + usize::from(p.ready)));
        self.stats.live_workers = self.live_workers();
        self.ever_seen |= self.stats.live_workers > 0;
        self.cpu.total()
    }

    /// Pids of the live Python processes as of the last scan.
    pub fn python_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> =
            self.py.values().filter(|t| t.alive).filter_map(|t| t.file.name.pid()).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
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
        for (name, t) in &mut self.files {
            let merger = &self.merger;
            let map = &t.series;
            let dead = t.dead;
            let read = t.file.for_each_values(|i, slots| {
                if let Some(&idx) = map.get(i) {
                    if idx != SKIP && !(dead && merger.family_is_live(idx)) {
                        accs[idx as usize].add_slots(merger.rule(idx), slots);
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

    fn open_python(&mut self, name: &str, pyname: py::PyName) {
        let path = self.dir().join(name);
        if let Some(b) = self.bad.get(name) {
            if b.stamp == stamp(&path) {
                return;
            }
        }
        match PyFile::open(&path, pyname, &self.trust) {
            Ok(file) => {
                self.bad.remove(name);
                self.py.insert(name.to_string(), PyTracked::new(file));
            }
            Err((reason, why)) => self.mark_bad(name, reason, &why),
        }
    }

    /// A `.compact-*` file we are not following: a compaction interrupted by a crash. It continues
    /// (or, if the archive already holds it, the file is just removed).
    fn adopt_aside(&mut self, name: &str, original: &str) {
        let path = self.dir().join(name);
        let Some(pyname) = py::parse_name(original) else { return };
        match PyFile::open(&path, pyname, &self.trust) {
            Ok(file) => {
                let id = format!("py:{original}:{}", file.dev_ino.1);
                if self.folds.is_folded(&id) {
                    // The archive holds it already; its removal was interrupted.
                    if !self.read_only {
                        self.folds.found(&id, name, path);
                    }
                    return;
                }
                let mut t = PyTracked::new(file);
                let since = Instant::now().checked_sub(python::GRACE).unwrap_or_else(Instant::now);
                t.aside = Some((self.dir().join(original), since));
                self.py.insert(name.to_string(), t);
            }
            Err((reason, why)) => self.mark_bad(name, reason, &why),
        }
    }

    fn refresh_python(&mut self) {
        let mut failed = Vec::new();
        let mut starts: HashMap<i32, bool> = HashMap::new();
        // One /proc read per process, not per file (a Python process has several files).
        let mut process_starts: HashMap<i32, Option<f64>> = HashMap::new();
        // In name order: when two files define a metric differently, the same one wins every
        // time, across restarts too.
        let mut order: Vec<(&String, &mut PyTracked)> = self.py.iter_mut().collect();
        order.sort_by(|a, b| a.0.cmp(b.0));
        for (name, t) in order {
            if let Err((reason, why)) = t.file.refresh(&mut self.keys) {
                failed.push((name.clone(), reason, why));
                continue;
            }
            t.map_new(&mut self.merger, &mut self.stats.conflicts);
            t.alive = match t.file.name.pid() {
                Some(pid) => {
                    let start = *process_starts.entry(pid).or_insert_with(|| py::process_start(pid));
                    py::file_alive(pid, start, t.file.created, t.file.dev_ino)
                }
                None => true, // an identifier that is not a pid: we cannot tell, keep it
            };
            if let (Some(pid), true) = (t.file.name.pid(), t.alive) {
                starts.insert(pid, true);
            }
        }
        self.stats.python_processes = starts.len();
        for (name, reason, why) in failed {
            self.mark_bad(&name, reason, &why);
        }
        if self.compact_python && !self.read_only {
            self.compact_python_files();
        }
    }

    /// One pass of the compaction protocol described in [`python`].
    fn compact_python_files(&mut self) {
        let names: Vec<String> = self.py.keys().cloned().collect();
        for name in names {
            let Some(t) = self.py.get_mut(&name) else { continue };
            if t.keep || t.file.name.pid().is_none() {
                continue;
            }
            match &t.aside {
                None if !t.alive => {
                    // Step 1: rename aside. From now on a process with this pid makes a new file.
                    let aside_name = format!("{}{name}", python::ASIDE_PREFIX);
                    let aside = self.dir.join(&aside_name);
                    if std::fs::rename(t.file.path(), &aside).is_ok() {
                        let original = t.file.path().to_path_buf();
                        t.file.set_path(aside);
                        t.aside = Some((original, Instant::now()));
                        if let Some(t) = self.py.remove(&name) {
                            self.py.insert(aside_name, t);
                        }
                    }
                }
                Some((original, since)) if since.elapsed() >= python::GRACE => {
                    let original = original.clone();
                    let pid = t.file.name.pid().unwrap_or(0);
                    // Step 2: a process that reused the pid before the rename has the file open.
                    if py::has_open(pid, t.file.dev_ino) {
                        tracing::info!(file = %original.display(), "pid {pid} was reused and the \
                            new process continues this file; not compacting it");
                        if std::fs::hard_link(t.file.path(), &original).is_ok() {
                            let _ = std::fs::remove_file(t.file.path());
                            t.file.set_path(original);
                        }
                        t.aside = None;
                        t.keep = true;
                        continue;
                    }
                    // Step 3: fold (unless it is a live gauge file or already folded); the file is
                    // removed once an archive recording the fold is saved. The id names the
                    // original file, as `adopt_aside` does after a restart.
                    let original_name = original.file_name().and_then(|n| n.to_str()).unwrap_or(&name);
                    let id = format!("py:{original_name}:{}", t.file.dev_ino.1);
                    if !t.is_live_gauge() && !self.folds.is_folded(&id) {
                        if let Err(e) = t.file.refresh(&mut self.keys) {
                            tracing::warn!(file = %name, "cannot read a dead Python file: {}", e.1);
                            continue;
                        }
                        t.map_new(&mut self.merger, &mut self.stats.conflicts);
                        if t.fold(&mut self.merger).is_err() {
                            continue;
                        }
                        self.dead_since_rebuild += 1;
                    }
                    if let Some(t) = self.py.remove(&name) {
                        self.totals.python_files_compacted += 1;
                        self.folds.record(&id, &name, t.file.path().to_path_buf());
                    }
                }
                _ => {}
            }
        }
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

    fn collect_workers(&mut self) {
        // A file that another file names as its parent is a master's, for as long as it lives.
        let by_pid: HashMap<u64, [u8; 16]> =
            self.files.values().filter(|t| !t.dead).map(|t| (t.file.pid, t.file.file_id)).collect();
        for t in self.files.values().filter(|t| t.file.parent_pid != 0) {
            if let Some(id) = by_pid.get(&t.file.parent_pid) {
                self.master_files.insert(*id);
            }
        }
        let live_ids: std::collections::HashSet<[u8; 16]> = by_pid.values().copied().collect();
        self.master_files.retain(|id| live_ids.contains(id));
        let masters = &self.master_files;
        let mut workers: Vec<WorkerInfo> = self
            .files
            .values_mut()
            .filter(|t| !t.dead)
            .map(|t| WorkerInfo {
                pid: t.file.pid,
                start_time_ns: t.file.start_time_ns,
                parent_pid: t.file.parent_pid,
                ready: t.file.header_word(header::FLAGS) & layout::flags::READY != 0,
                path: t.file.path().to_path_buf(),
                master: masters.contains(&t.file.file_id),
                shared_forks: t.file.header_word(header::SHARED_FORKS),
            })
            .collect();
        workers.sort_by_key(|w| (w.start_time_ns, w.pid));
        self.stats.live_dropped_series =
            self.files.values_mut().map(|t| t.file.header_word(header::DROPPED_SERIES)).sum();
        self.stats.live_dropped_updates =
            self.files.values_mut().map(|t| t.file.header_word(header::DROPPED_UPDATES)).sum();
        self.stats.live_shared_forks =
            self.files.values_mut().map(|t| t.file.header_word(header::SHARED_FORKS)).sum();
        self.stats.totals = self.totals.clone();
        self.workers = workers;
        self.stats.live_workers = self.live_workers();
        self.ever_seen |= self.stats.live_workers > 0;
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

    fn self_metrics(&self, snap: &mut Snapshot) {
        let s = &self.stats;
        let m = &self.self_meta;
        let one = |meta: &Arc<FamilyMeta>, v: Value| SnapFamily {
            meta: Arc::clone(meta),
            series: vec![(Arc::clone(&m.no_labels), v)],
        };
        let mut fams = vec![
            one(&m.scrape_seconds, Value::F64(s.last_scrape.as_secs_f64())),
            one(&m.scrapes, Value::U64(s.scrapes)),
            one(&m.merges, Value::U64(s.merges)),
            one(&m.files, Value::F64(s.files as f64)),
            one(&m.live, Value::F64(s.live_workers as f64)),
            one(&m.dead, Value::U64(s.totals.dead_workers)),
            one(&m.crashed, Value::U64(s.totals.crashed_workers)),
            one(&m.series, Value::F64(s.series as f64)),
            one(&m.conflicts, Value::F64(s.conflicts as f64)),
            one(&m.bad_events, Value::U64(s.bad_file_events)),
            one(&m.dropped_series, Value::U64(s.totals.dropped_series + s.live_dropped_series)),
            one(&m.dropped_updates, Value::U64(s.totals.dropped_updates + s.live_dropped_updates)),
            one(&m.shared_forks, Value::U64(s.totals.shared_forks + s.live_shared_forks)),
            one(&m.python_files, Value::F64(s.python_files as f64)),
            one(&m.python_processes, Value::F64(s.python_processes as f64)),
            one(&m.python_folded, Value::U64(s.totals.python_files_compacted)),
            one(&m.save_errors, Value::U64(s.archive_save_errors)),
            one(&m.corrupt_archives, Value::F64(s.corrupt_archives as f64)),
            one(&m.pending_removal, Value::F64(s.pending_removal as f64)),
        ];
        let mut bad = SnapFamily { meta: Arc::clone(&m.bad_files), series: Vec::new() };
        for reason in BadReason::ALL {
            let n = s.bad_files.get(&reason).copied().unwrap_or(0);
            let labels = Arc::new(LabelSet::new(vec![("reason".to_string(), reason.as_str().to_string())]));
            bad.series.push((labels, Value::F64(n as f64)));
        }
        fams.push(bad);
        fams.sort_by(|a, b| a.meta.desc.name.cmp(&b.meta.desc.name));
        snap.families.extend(fams);
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
                let idx = merger.series_for(fam, pairs);
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

/// Descriptions of the aggregator's own metrics.
struct SelfMeta {
    no_labels: Arc<LabelSet>,
    scrape_seconds: Arc<FamilyMeta>,
    scrapes: Arc<FamilyMeta>,
    merges: Arc<FamilyMeta>,
    files: Arc<FamilyMeta>,
    live: Arc<FamilyMeta>,
    dead: Arc<FamilyMeta>,
    crashed: Arc<FamilyMeta>,
    series: Arc<FamilyMeta>,
    conflicts: Arc<FamilyMeta>,
    bad_files: Arc<FamilyMeta>,
    bad_events: Arc<FamilyMeta>,
    dropped_series: Arc<FamilyMeta>,
    dropped_updates: Arc<FamilyMeta>,
    shared_forks: Arc<FamilyMeta>,
    python_files: Arc<FamilyMeta>,
    python_processes: Arc<FamilyMeta>,
    python_folded: Arc<FamilyMeta>,
    save_errors: Arc<FamilyMeta>,
    corrupt_archives: Arc<FamilyMeta>,
    pending_removal: Arc<FamilyMeta>,
}

fn meta(name: &str, help: &str, t: MetricType, labels: &[&str]) -> Arc<FamilyMeta> {
    let label_names: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
    Arc::new(FamilyMeta {
        desc: MetricDesc {
            name: name.to_string(),
            help: help.to_string(),
            metric_type: t,
            value_type: if t == MetricType::Counter { ValueType::U64 } else { ValueType::F64 },
            gauge_mode: (t == MetricType::Gauge).then_some(GaugeMode::Sum),
            label_names: label_names.clone(),
            buckets: Vec::new(),
        },
        label_names,
    })
}

impl SelfMeta {
    fn new() -> SelfMeta {
        use MetricType::{Counter, Gauge};
        SelfMeta {
            no_labels: Arc::new(LabelSet::default()),
            scrape_seconds: meta(
                "shmetrics_scrape_duration_seconds",
                "Time the last scrape took to read and merge all files.",
                Gauge,
                &[],
            ),
            scrapes: meta("shmetrics_scrapes", "Scrapes served by this aggregator.", Counter, &[]),
            merges: meta(
                "shmetrics_merges",
                "Merges of every file: concurrent scrapes share one (at most one runs at a time).",
                Counter,
                &[],
            ),
            files: meta("shmetrics_files", "Worker files followed in the last scrape.", Gauge, &[]),
            live: meta("shmetrics_workers_live", "Workers alive in the last scrape.", Gauge, &[]),
            dead: meta(
                "shmetrics_workers_dead",
                "Workers that exited and were folded into the archive.",
                Counter,
                &[],
            ),
            crashed: meta(
                "shmetrics_workers_crashed",
                "Dead workers that did not exit cleanly (killed or crashed).",
                Counter,
                &[],
            ),
            series: meta(
                "shmetrics_series",
                "Merged series exposed in the last scrape, without these self metrics.",
                Gauge,
                &[],
            ),
            conflicts: meta(
                "shmetrics_metric_conflicts",
                "Metric definitions skipped because another process defined the same name differently.",
                Gauge,
                &[],
            ),
            bad_files: meta(
                "shmetrics_bad_files",
                "Files in the directory skipped in the last scrape, by reason.",
                Gauge,
                &["reason"],
            ),
            bad_events: meta("shmetrics_bad_file_events", "Times a file was found unreadable.", Counter, &[]),
            dropped_series: meta(
                "shmetrics_dropped_series",
                "Series workers could not register because a file or the disk was full.",
                Counter,
                &[],
            ),
            dropped_updates: meta(
                "shmetrics_dropped_updates",
                "Updates workers dropped because their series had no room.",
                Counter,
                &[],
            ),
            shared_forks: meta(
                "shmetrics_shared_forks",
                "Forked workers that could not create their own file (disk full) and write into their parent's.",
                Counter,
                &[],
            ),
            python_files: meta(
                "shmetrics_python_files",
                "Python prometheus_client files followed in the last scrape.",
                Gauge,
                &[],
            ),
            python_processes: meta(
                "shmetrics_python_processes",
                "Live processes among the Python prometheus_client files.",
                Gauge,
                &[],
            ),
            python_folded: meta(
                "shmetrics_python_files_compacted",
                "Dead Python processes' files folded into the archive (--compact-python).",
                Counter,
                &[],
            ),
            save_errors: meta(
                "shmetrics_archive_save_errors",
                "Archive saves that failed (disk full, I/O errors); dead workers' files are kept until one works.",
                Counter,
                &[],
            ),
            corrupt_archives: meta(
                "shmetrics_archive_corrupt_files",
                "Unusable archives set aside at start-up (archive.json.corrupt-*) still in the directory.",
                Gauge,
                &[],
            ),
            pending_removal: meta(
                "shmetrics_files_pending_removal",
                "Dead workers' files folded into the archive and waiting for it to be saved before removal.",
                Gauge,
                &[],
            ),
        }
    }
}
