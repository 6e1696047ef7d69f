//! Python prometheus_client files followed by the aggregator: mapping entries to merged series,
//! liveness, and opt-in compaction.
//!
//! Merge semantics are `MultiProcessCollector`'s (prometheus_client 0.26): counters and summaries
//! summed; histogram buckets summed per `le` and exposed cumulatively with `_count` derived; gauges
//! by the mode in the file name, `all`/`liveall` with a `pid` label taken from the file name. One
//! difference by design: `live*` gauge files of dead processes are ignored without anyone calling
//! `mark_process_dead`.
//!
//! # Compaction (`--compact-python`) and why it is safe
//!
//! prometheus_client's maintainers declined compaction because of pid reuse and concurrent
//! compactors. Here: (1) only the aggregator holding the directory lock compacts, so there is one
//! compactor; (2) a file is first *renamed aside* (`.compact-<name>`): from that instant a process
//! that starts under the same pid and opens `<kind>_<pid>.db` creates a fresh file, and nothing it
//! writes can reach the renamed one; (3) a full upkeep pass later (at least [`GRACE`]), after any
//! `open()` that raced with the rename has completed, the aggregator checks whether the process now
//! holding that pid has the renamed file open (`/proc/<pid>/fd`): a process that reused the pid
//! *before* the rename opened the old file and continues it, so the rename is undone and the file
//! is left alone; (4) otherwise its final values are folded into the archive, the archive is saved
//! atomically with the file recorded as folded, and only then is the file removed. A crash at any
//! point leaves either the file (folded at most once, thanks to the recorded id) or the archive
//! holding its values. So every increment is counted exactly once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{Merger, Part, Rule, Value};
use crate::python as py;
use crate::python::{PyFile, PyKind};
use crate::reader::BadReason;

/// Merged-series index meaning "not exported".
const SKIP: u32 = u32::MAX;

/// How long a renamed-aside file waits before it is checked and folded.
pub const GRACE: Duration = Duration::from_millis(500);

/// Help text prometheus_client used before 0.16 stored help in the file.
const OLD_HELP: &str = "Multiprocess metric";

/// Prefix of files being compacted.
pub const ASIDE_PREFIX: &str = ".compact-";

/// Where one entry goes.
#[derive(Clone, Copy)]
struct Target {
    idx: u32,
    part: Part,
    rule: Rule,
    buckets: u16,
}

const SKIPPED: Target = Target { idx: SKIP, part: Part::Value, rule: Rule::AddF64, buckets: 0 };

/// A Python series: metric name and labels (without `le`).
type SeriesKey = (String, Vec<(String, String)>);

/// A Python file being followed.
pub(super) struct PyTracked {
    pub file: PyFile,
    targets: Vec<Target>,
    /// Histogram series whose `+Inf` bucket has not been written yet: entries wait here, since
    /// the family's bucket bounds are known only once the series is complete.
    pending: HashMap<SeriesKey, Vec<usize>>,
    /// Histogram series already mapped: merged index and bucket bounds, for entries that arrive
    /// after the series was complete.
    mapped: HashMap<SeriesKey, (u32, Vec<f64>)>,
    /// Whether its process was alive at the last scan (always true for non-pid ids).
    pub alive: bool,
    /// Compaction in progress: the original path and when the file was renamed aside.
    pub aside: Option<(PathBuf, Instant)>,
    /// The rename was undone because a live process has the file open: never compact it.
    pub keep: bool,
}

impl PyTracked {
    pub fn new(file: PyFile) -> PyTracked {
        PyTracked {
            file,
            targets: Vec::new(),
            pending: HashMap::new(),
            mapped: HashMap::new(),
            alive: true,
            aside: None,
            keep: false,
        }
    }

    /// Forgets all mappings (the merger was rebuilt).
    pub fn reset(&mut self) {
        self.targets.clear();
        self.pending.clear();
        self.mapped.clear();
    }

    /// Whether the file holds live-mode gauges (dropped when the process is dead).
    pub fn is_live_gauge(&self) -> bool {
        matches!(self.file.name.kind, PyKind::Gauge(m) if m.is_live())
    }

    /// Maps entries parsed since the last call to merged series.
    pub fn map_new(&mut self, merger: &mut Merger, conflicts: &mut usize) {
        let kind = self.file.name.kind;
        while self.targets.len() < self.file.entries.len() {
            let i = self.targets.len();
            let key = std::sync::Arc::clone(&self.file.entries[i].key);
            self.targets.push(SKIPPED);
            let suffix = key.sample.strip_prefix(key.metric.as_str());
            let help = key.help.as_deref().unwrap_or(OLD_HELP);
            let names: Vec<&str> = key.labels.iter().map(|(n, _)| n.as_str()).collect();
            let (t, mode, part) = match (kind, suffix) {
                (PyKind::Counter, Some("_total")) => (MetricType::Counter, None, Part::Value),
                (PyKind::Summary, Some("_count")) => (MetricType::Summary, None, Part::SummaryCount),
                (PyKind::Summary, Some("_sum")) => (MetricType::Summary, None, Part::SummarySum),
                (PyKind::Gauge(m), Some("")) => {
                    let part = if m.has_timestamp() { Part::Recent } else { Part::Value };
                    (MetricType::Gauge, Some(m), part)
                }
                (PyKind::Histogram, Some("_bucket" | "_sum")) => {
                    self.pend(i);
                    continue;
                }
                // `_created`, a stored `_count` of a histogram (derived, as Python does), or a
                // sample that does not belong to its metric: not exported.
                _ => continue,
            };
            let desc = py_desc(&key.metric, help, t, mode, &names, Vec::new());
            let Some(fam) = family(merger, &desc, conflicts) else { continue };
            let mut pairs = key.labels.clone();
            if mode.is_some_and(GaugeMode::per_process) {
                pairs.push(("pid".to_string(), self.file.name.id.clone()));
            }
            let idx = merger.series_for(fam, pairs);
            self.targets[i] = target(merger, idx, part);
        }
        // A histogram series is complete once its `+Inf` bucket exists: prometheus_client writes
        // `_sum` and the buckets in one go, `+Inf` last, but any order is accepted as long as the
        // entries were all there when the batch was parsed.
        let complete: Vec<SeriesKey> = self
            .pending
            .iter()
            .filter(|(_, members)| {
                members
                    .iter()
                    .any(|&j| self.file.entries[j].key.labels.iter().any(|(n, v)| n == "le" && v == "+Inf"))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for group in complete {
            self.map_group(group, merger, conflicts);
        }
    }

    fn le(&self, j: usize) -> Option<Result<f64, std::num::ParseFloatError>> {
        self.file.entries[j].key.labels.iter().find(|(n, _)| n == "le").map(|(_, v)| v.parse::<f64>())
    }

    /// Files a histogram entry under its series: directly if the series is mapped already, else in
    /// `pending` until the series is complete.
    fn pend(&mut self, i: usize) {
        let key = std::sync::Arc::clone(&self.file.entries[i].key);
        let without_le: Vec<(String, String)> =
            key.labels.iter().filter(|(n, _)| n != "le").cloned().collect();
        let group = (key.metric.clone(), without_le);
        if let Some((idx, bounds)) = self.mapped.get(&group) {
            let part = match self.le(i) {
                Some(Ok(b)) if b.is_infinite() => Some(Part::Bucket(bounds.len() as u16)),
                Some(Ok(b)) => bounds.iter().position(|x| *x == b).map(|p| Part::Bucket(p as u16)),
                Some(Err(_)) => None,
                None => Some(Part::HistSum),
            };
            if let Some(part) = part {
                self.targets[i] = Target { idx: *idx, part, rule: Rule::Hist, buckets: bounds.len() as u16 };
            }
            return;
        }
        self.pending.entry(group).or_default().push(i);
    }

    /// Maps a complete histogram series: its finite `le` values are the family's bucket bounds.
    fn map_group(&mut self, group: SeriesKey, merger: &mut Merger, conflicts: &mut usize) {
        let Some(members) = self.pending.remove(&group) else { return };
        let mut bounds: Vec<f64> = Vec::new();
        for &j in &members {
            match self.le(j) {
                Some(Ok(b)) if b.is_finite() => bounds.push(b),
                Some(Ok(_)) | None => {}
                Some(Err(_)) => return, // an `le` that is not a number: not exported
            }
        }
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let key = std::sync::Arc::clone(&self.file.entries[members[0]].key);
        let help = key.help.as_deref().unwrap_or(OLD_HELP);
        let names: Vec<&str> = group.1.iter().map(|(n, _)| n.as_str()).collect();
        let desc = py_desc(&group.0, help, MetricType::Histogram, None, &names, bounds.clone());
        let Some(fam) = family(merger, &desc, conflicts) else { return };
        let idx = merger.series_for(fam, group.1.clone());
        // The merged series holds the union of every version's bounds; index into that.
        merger.widen(idx, &bounds);
        let bounds = merger.bounds(idx).to_vec();
        for j in members {
            let part = match self.le(j) {
                Some(Ok(b)) => {
                    let pos = bounds.iter().position(|x| *x == b).unwrap_or(bounds.len());
                    Part::Bucket(pos as u16)
                }
                _ => Part::HistSum,
            };
            self.targets[j] = target(merger, idx, part);
        }
        self.mapped.insert(group, (idx, bounds));
    }

    /// Adds this file's current values into `accs`.
    pub fn accumulate(&mut self, accs: &mut [Value]) -> Result<(), (BadReason, String)> {
        let targets = &self.targets;
        self.file.for_each_value(|i, v, ts| {
            if let Some(t) = targets.get(i) {
                if let Some(acc) = accs.get_mut(t.idx as usize) {
                    acc.apply(t.rule, t.part, v, ts, usize::from(t.buckets));
                }
            }
        })
    }

    /// Folds this file's final values into the archive.
    pub fn fold(&mut self, merger: &mut Merger) -> Result<(), (BadReason, String)> {
        let targets = &self.targets;
        self.file.for_each_value(|i, v, ts| {
            if let Some(t) = targets.get(i).filter(|t| t.idx != SKIP) {
                merger.archive_apply(t.idx, t.part, v, ts);
            }
        })
    }
}

fn target(merger: &Merger, idx: u32, part: Part) -> Target {
    Target { idx, part, rule: merger.rule(idx), buckets: merger.buckets(idx) as u16 }
}

fn family(merger: &mut Merger, desc: &MetricDesc, conflicts: &mut usize) -> Option<u32> {
    let fam = merger.family_for(desc);
    if fam.is_none() {
        *conflicts += 1;
        tracing::warn!(metric = %desc.name, "metric defined differently elsewhere in the directory; \
            these Python samples are not exported");
    }
    fam
}

fn py_desc(
    name: &str,
    help: &str,
    t: MetricType,
    mode: Option<GaugeMode>,
    labels: &[&str],
    buckets: Vec<f64>,
) -> MetricDesc {
    MetricDesc {
        name: name.to_string(),
        help: help.to_string(),
        metric_type: t,
        value_type: ValueType::F64,
        gauge_mode: mode,
        label_names: labels.iter().map(|l| (*l).to_string()).collect(),
        buckets,
        states: Vec::new(),
    }
}

/// The aggregator's handling of Python files: opening, adopting renamed files, refreshing,
/// compaction.
impl super::Aggregator {
    pub(super) fn open_python(&mut self, name: &str, pyname: py::PyName) {
        let path = self.dir().join(name);
        if let Some(b) = self.bad.get(name) {
            if b.stamp == super::stamp(&path) {
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
    pub(super) fn adopt_aside(&mut self, name: &str, original: &str) {
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
                let since = Instant::now().checked_sub(GRACE).unwrap_or_else(Instant::now);
                t.aside = Some((self.dir().join(original), since));
                self.py.insert(name.to_string(), t);
            }
            Err((reason, why)) => self.mark_bad(name, reason, &why),
        }
    }

    pub(super) fn refresh_python(&mut self) {
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
    pub(super) fn compact_python_files(&mut self) {
        let names: Vec<String> = self.py.keys().cloned().collect();
        for name in names {
            let Some(t) = self.py.get_mut(&name) else { continue };
            if t.keep || t.file.name.pid().is_none() {
                continue;
            }
            match &t.aside {
                None if !t.alive => {
                    // Step 1: rename aside. From now on a process with this pid makes a new file.
                    let aside_name = format!("{}{name}", ASIDE_PREFIX);
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
                Some((original, since)) if since.elapsed() >= GRACE => {
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
}
