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
    }
}
