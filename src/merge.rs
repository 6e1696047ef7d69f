//! Merging many processes' series into one job-wide view.
//!
//! The `Merger` keeps a table of merged families and series that lives across scrapes: a source
//! (a worker file, or the archive of dead workers) maps each of its series to a merged series index
//! once, and every later scrape just combines values by index. Label text is rendered and escaped
//! once, when a merged series is created, so the encoders only copy it.
//!
//! How values combine, per family:
//! - counters, histograms and summaries are summed (histograms bucket by bucket, plus the sum);
//! - info and enum: per label set, the value a live process set last wins (`live*` like);
//! - gauges follow their [`GaugeMode`]: sum, max, min, most recent by timestamp, or one series per
//!   process with a `pid` label. `live*` modes ignore dead processes; the others keep what a dead
//!   process last wrote, through the archive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};

/// What a merged family is: the metric description, as first seen.
#[derive(Clone, Debug, PartialEq)]
pub struct FamilyMeta {
    /// The description (name without `_total` for counters).
    pub desc: MetricDesc,
    /// Label names as exposed: the description's, plus `pid` for per-process gauges.
    pub label_names: Vec<String>,
}

impl FamilyMeta {
    /// A family the aggregator adds itself (its own metrics, process figures, alarm counters): no
    /// buckets, gauges summed. The one builder of such families.
    pub fn own(name: &str, help: &str, t: MetricType, v: ValueType, labels: &[&str]) -> Arc<FamilyMeta> {
        let label_names: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        Arc::new(FamilyMeta {
            desc: MetricDesc {
                name: name.to_string(),
                help: help.to_string(),
                metric_type: t,
                value_type: v,
                gauge_mode: (t == MetricType::Gauge).then_some(GaugeMode::Sum),
                label_names: label_names.clone(),
                buckets: Vec::new(),
                states: Vec::new(),
            },
            label_names,
        })
    }
}

/// A merged series' identity: its labels (pre-rendered) and, for histograms, its bucket bounds.
#[derive(Debug, Default)]
pub struct LabelSet {
    /// Label names and values, in exposition order.
    pub pairs: Vec<(String, String)>,
    /// `name="value",…` with values escaped for the text formats; empty without labels.
    pub text: String,
    /// Finite bucket bounds of a histogram series, increasing; empty for other types.
    pub bounds: Vec<f64>,
}

impl LabelSet {
    /// A label set rendered from its pairs.
    pub(crate) fn new(pairs: Vec<(String, String)>) -> LabelSet {
        let text = render_labels(&pairs);
        LabelSet { pairs, text, bounds: Vec::new() }
    }

    /// A shared label set from borrowed pairs, for the series the aggregator makes itself
    /// (sources, pollsters, derived metrics).
    pub(crate) fn shared(pairs: &[(&str, &str)]) -> Arc<LabelSet> {
        Arc::new(LabelSet::new(pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()))
    }

    /// A histogram's buckets as exposed: (upper bound, `None` for `+Inf`; cumulative count). The
    /// one place counts accumulate (wrapping, as the counters themselves do), for every encoder,
    /// `dump` and the threshold rules.
    pub fn cumulative<'a>(&'a self, buckets: &'a [u64]) -> impl Iterator<Item = (Option<f64>, u64)> + 'a {
        buckets.iter().enumerate().scan(0u64, move |cum, (i, n)| {
            *cum = cum.wrapping_add(*n);
            Some((self.bounds.get(i).copied(), *cum))
        })
    }
}

/// A merged value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No contribution (yet): not exposed.
    #[default]
    Unset,
    /// Integer counter.
    U64(u64),
    /// Float counter or gauge.
    F64(f64),
    /// Most-recent gauge: the value with the largest timestamp (unix ns).
    Recent {
        /// Timestamp of the write, unix ns.
        ts: u64,
        /// The value.
        v: f64,
    },
    /// Summary: count and sum of observations.
    Summary {
        /// Number of observations.
        count: f64,
        /// Sum of observations.
        sum: f64,
    },
    /// Histogram: non-cumulative bucket counts (last is `+Inf`) and the sum.
    Hist {
        /// Per-bucket counts.
        buckets: Vec<u64>,
        /// Sum of observations.
        sum: f64,
    },
    /// Info series (its labels hold the key/value pairs): when a process last chose this value
    /// set, unix ns. Exposed as 1; of the series of one label set only the latest is exposed.
    Info {
        /// Timestamp of the `set`, unix ns.
        ts: u64,
    },
    /// Enum: the state set last (index into the family's states) and when, unix ns.
    State {
        /// Timestamp of the set, unix ns.
        ts: u64,
        /// Index of the state.
        index: u32,
    },
}

/// How a family combines contributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Sum integers.
    AddU64,
    /// Sum floats.
    AddF64,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
    /// Largest timestamp wins.
    Recent,
    /// Per-process series: the last contribution wins (only one process contributes).
    Replace,
    /// Bucket-wise sum.
    Hist,
    /// Count and sum added.
    Summary,
    /// Info: the latest timestamp wins.
    Info,
    /// Enum of this many states: the latest timestamp wins; an index out of range is ignored.
    State(u16),
}

impl Rule {
    /// The rule for a description.
    pub(crate) fn of(d: &MetricDesc) -> Rule {
        match (d.metric_type, d.value_type, d.gauge_mode.map(GaugeMode::base)) {
            (MetricType::Counter, ValueType::U64, _) => Rule::AddU64,
            (MetricType::Counter, ValueType::F64, _) => Rule::AddF64,
            (MetricType::Histogram, _, _) => Rule::Hist,
            (MetricType::Summary, _, _) => Rule::Summary,
            (MetricType::Info, _, _) => Rule::Info,
            // At most MAX_STATES (512) states, checked when the record was decoded.
            (MetricType::Enum, _, _) => Rule::State(d.states.len() as u16),
            (MetricType::Gauge, _, Some(GaugeMode::Max)) => Rule::Max,
            (MetricType::Gauge, _, Some(GaugeMode::Min)) => Rule::Min,
            (MetricType::Gauge, _, Some(GaugeMode::MostRecent)) => Rule::Recent,
            (MetricType::Gauge, _, Some(GaugeMode::All)) => Rule::Replace,
            (MetricType::Gauge, _, _) => Rule::AddF64,
        }
    }
}

impl Value {
    /// Whether the value is [`Value::Unset`].
    pub(crate) fn is_unset(&self) -> bool {
        matches!(self, Value::Unset)
    }

    /// Combines raw slots (as a writer laid them out) into this accumulator. Returns `false` if
    /// the slots hold a value that is not valid (an enum state index out of range), which is then
    /// ignored: that writer has not set the series.
    #[inline]
    pub(crate) fn add_slots(&mut self, rule: Rule, slots: &[AtomicU64]) -> bool {
        let word = |i: usize| slots.get(i).map_or(0, |a| a.load(Ordering::Relaxed));
        let f = |i: usize| f64::from_bits(word(i));
        // The hot cases add in place; the rest go through `combine`.
        match (rule, &mut *self) {
            (Rule::AddU64, Value::U64(a)) => {
                *a = a.wrapping_add(word(0));
                return true;
            }
            (Rule::AddF64, Value::F64(a)) => {
                *a += f(0);
                return true;
            }
            _ => {}
        }
        match rule {
            Rule::AddU64 => self.combine(rule, &Value::U64(word(0))),
            Rule::Recent => {
                // Timestamp first (acquire), then the value the writer stored before it.
                // Timestamp 0 means the process never set the gauge: no contribution.
                let ts = slots.get(1).map_or(0, |a| a.load(Ordering::Acquire));
                if ts != 0 {
                    self.combine(rule, &Value::Recent { ts, v: f(0) });
                }
            }
            Rule::Summary => self.combine(rule, &Value::Summary { count: word(0) as f64, sum: f(1) }),
            Rule::Info => {
                // Timestamp 0: this process never chose this value set.
                let ts = slots.first().map_or(0, |a| a.load(Ordering::Acquire));
                if ts != 0 {
                    self.combine(rule, &Value::Info { ts });
                }
            }
            Rule::State(states) => {
                // Timestamp first (acquire), then the index stored before it. Timestamp 0: never
                // set, so in the initial state (the first), which any set outranks — as
                // prometheus_client shows an enum nobody set in its first state.
                let ts = slots.get(1).map_or(0, |a| a.load(Ordering::Acquire));
                let index = if ts == 0 { Some(0) } else { u32::try_from(word(0)).ok() };
                match index.filter(|i| *i < u32::from(states)) {
                    Some(index) => self.combine(rule, &Value::State { ts, index }),
                    None => return false,
                }
            }
            Rule::Hist => {
                let n = slots.len().saturating_sub(1);
                match self {
                    Value::Hist { buckets, sum } if buckets.len() == n => {
                        for (b, s) in buckets.iter_mut().zip(slots) {
                            *b = b.wrapping_add(s.load(Ordering::Relaxed));
                        }
                        *sum += f(n);
                    }
                    _ => {
                        let buckets = slots[..n].iter().map(|s| s.load(Ordering::Relaxed)).collect();
                        self.combine(rule, &Value::Hist { buckets, sum: f(n) });
                    }
                }
            }
            _ => self.combine(rule, &Value::F64(f(0))),
        }
        true
    }

    /// Combines another value into this accumulator.
    pub(crate) fn combine(&mut self, rule: Rule, other: &Value) {
        if other.is_unset() {
            return;
        }
        if self.is_unset() {
            *self = other.clone();
            return;
        }
        match (rule, &mut *self, other) {
            (Rule::AddU64, Value::U64(a), Value::U64(b)) => *a = a.wrapping_add(*b),
            (Rule::AddF64, Value::F64(a), Value::F64(b)) => *a += b,
            (Rule::Max, Value::F64(a), Value::F64(b)) => *a = a.max(*b),
            (Rule::Min, Value::F64(a), Value::F64(b)) => *a = a.min(*b),
            (Rule::Recent, Value::Recent { ts, v }, Value::Recent { ts: t2, v: v2 }) => {
                if *t2 >= *ts {
                    (*ts, *v) = (*t2, *v2);
                }
            }
            (Rule::Info, Value::Info { ts }, Value::Info { ts: t2 }) => *ts = (*ts).max(*t2),
            // Ties (the same nanosecond) go to the larger index: the same answer in every scrape.
            (Rule::State(_), Value::State { ts, index }, Value::State { ts: t2, index: i2 }) => {
                if (*t2, *i2) > (*ts, *index) {
                    (*ts, *index) = (*t2, *i2);
                }
            }
            (Rule::Summary, Value::Summary { count, sum }, Value::Summary { count: c2, sum: s2 }) => {
                *count += c2;
                *sum += s2;
            }
            (Rule::Hist, Value::Hist { buckets, sum }, Value::Hist { buckets: b2, sum: s2 })
                if buckets.len() == b2.len() =>
            {
                for (a, b) in buckets.iter_mut().zip(b2) {
                    *a = a.wrapping_add(*b);
                }
                *sum += s2;
            }
            // Replace, and any shape mismatch (which family checks prevent): last one wins.
            _ => *self = other.clone(),
        }
    }
}

/// Which part of a merged value one Python prometheus_client entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// The whole value of a counter or gauge (combined by the family's rule).
    Value,
    /// A most-recent gauge's value, with its timestamp.
    Recent,
    /// Non-cumulative count of histogram bucket `i` (the last index is `+Inf`).
    Bucket(u16),
    /// A histogram's sum.
    HistSum,
    /// A summary's count.
    SummaryCount,
    /// A summary's sum.
    SummarySum,
}

impl Value {
    /// Combines one Python entry (value, timestamp in seconds) into this accumulator. `buckets` is
    /// the family's number of finite bucket bounds.
    #[inline]
    pub(crate) fn apply(&mut self, rule: Rule, part: Part, v: f64, ts: f64, buckets: usize) {
        match part {
            Part::Value => match (rule, &mut *self) {
                (Rule::AddF64, Value::F64(a)) => *a += v,
                _ => self.combine(rule, &Value::F64(v)),
            },
            Part::Recent => {
                // prometheus_client: a timestamp of 0 never wins.
                if ts > 0.0 {
                    self.combine(rule, &Value::Recent { ts: (ts * 1e9) as u64, v });
                }
            }
            Part::Bucket(_) | Part::HistSum => {
                if !matches!(self, Value::Hist { .. }) {
                    *self = Value::Hist { buckets: vec![0; buckets + 1], sum: 0.0 };
                }
                if let Value::Hist { buckets, sum } = self {
                    match part {
                        Part::Bucket(i) => {
                            if let Some(b) = buckets.get_mut(usize::from(i)) {
                                // Python stores counts as floats; they are whole numbers.
                                *b = b.wrapping_add(v as u64);
                            }
                        }
                        _ => *sum += v,
                    }
                }
            }
            Part::SummaryCount | Part::SummarySum => {
                if !matches!(self, Value::Summary { .. }) {
                    *self = Value::Summary { count: 0.0, sum: 0.0 };
                }
                if let Value::Summary { count, sum } = self {
                    if part == Part::SummaryCount {
                        *count += v;
                    } else {
                        *sum += v;
                    }
                }
            }
        }
    }
}

/// One merged family.
#[derive(Debug)]
struct MFamily {
    meta: Arc<FamilyMeta>,
    rule: Rule,
    series: Vec<u32>,
}

/// One merged series.
#[derive(Debug)]
struct MSeries {
    family: u32,
    labels: Arc<LabelSet>,
    /// Info series: how many leading label pairs are the metric's labels (the rest are its value
    /// set); series with the same leading pairs compete for the one exposed value.
    info_base: usize,
}

/// A family in a [`Snapshot`].
#[derive(Debug)]
pub struct SnapFamily {
    /// What the family is.
    pub meta: Arc<FamilyMeta>,
    /// Its series with their merged values (never `Unset`).
    pub series: Vec<(Arc<LabelSet>, Value)>,
}

/// A job-wide view, ready to encode. Families are sorted by name.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The families, each with at least one series.
    pub families: Vec<SnapFamily>,
}

impl Snapshot {
    /// Number of series.
    pub fn series_count(&self) -> usize {
        self.families.iter().map(|f| f.series.len()).sum()
    }

    /// Finds a family by name (counters without `_total`).
    pub(crate) fn family(&self, name: &str) -> Option<&SnapFamily> {
        self.families.iter().find(|f| f.meta.desc.name == name)
    }
}

/// Escapes a label value for the Prometheus text formats (`\\`, `\"`, `\n`).
pub(crate) fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

pub(crate) fn render_labels(pairs: &[(String, String)]) -> String {
    let mut text = String::new();
    for (i, (n, v)) in pairs.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(n);
        text.push_str("=\"");
        escape_label_value(v, &mut text);
        text.push('"');
    }
    text
}

/// The merged table, plus the archive of dead processes' values.
#[derive(Debug, Default)]
pub(crate) struct Merger {
    families: Vec<MFamily>,
    by_name: HashMap<String, u32>,
    series: Vec<MSeries>,
    by_key: HashMap<(u32, Vec<(String, String)>), u32>,
    /// Bumped whenever a series' bucket bounds widen: every mapping to bucket indices is stale.
    epoch: u64,
    /// Dead processes' contributions, parallel to `series`.
    archive: Vec<Value>,
    /// Family indices sorted by name.
    order: Vec<u32>,
}

impl Merger {
    /// An empty merger.
    pub(crate) fn new() -> Merger {
        Merger::default()
    }

    /// The merged family for `desc`, created on first sight; `None` if the name is taken by a
    /// different description (a conflict the caller counts).
    pub(crate) fn family_for(&mut self, desc: &MetricDesc) -> Option<u32> {
        if let Some(&i) = self.by_name.get(&desc.name) {
            let existing = &self.families[i as usize].meta.desc;
            // A family is its name, type and merge mode. Help, label names and buckets may differ
            // between versions of an app running side by side (a rolling deploy): series are
            // told apart by their labels and carry their own bucket bounds, as prometheus_client's
            // MultiProcessCollector merges by key.
            // An enum's state indices mean its own states: they are part of what the family is.
            let same = existing.metric_type == desc.metric_type
                && existing.value_type == desc.value_type
                && existing.gauge_mode == desc.gauge_mode
                && existing.states == desc.states;
            return same.then_some(i);
        }
        let mut label_names = desc.label_names.clone();
        if desc.gauge_mode.is_some_and(GaugeMode::per_process) {
            label_names.push("pid".to_string());
        }
        let i = self.families.len() as u32;
        self.families.push(MFamily {
            meta: Arc::new(FamilyMeta { desc: desc.clone(), label_names }),
            rule: Rule::of(desc),
            series: Vec::new(),
        });
        self.by_name.insert(desc.name.clone(), i);
        let pos = self.order.partition_point(|&j| self.families[j as usize].meta.desc.name < desc.name);
        self.order.insert(pos, i);
        Some(i)
    }

    /// The merged series of family `fam` with these labels (`pid` included for per-process
    /// gauges), created on first sight.
    pub(crate) fn series_for(&mut self, fam: u32, pairs: Vec<(String, String)>) -> u32 {
        let key = (fam, pairs);
        if let Some(&i) = self.by_key.get(&key) {
            return i;
        }
        let i = self.series.len() as u32;
        self.families[fam as usize].series.push(i);
        let info_base = key.1.len();
        self.series.push(MSeries { family: fam, labels: Arc::new(LabelSet::new(key.1.clone())), info_base });
        self.archive.push(Value::Unset);
        self.by_key.insert(key, i);
        i
    }

    /// The merged series of an info family with these labels: the metric's `base` label pairs,
    /// then its value set's pairs. Created on first sight.
    pub(crate) fn info_series_for(&mut self, fam: u32, pairs: Vec<(String, String)>, base: usize) -> u32 {
        let n = self.series.len();
        let idx = self.series_for(fam, pairs);
        if idx as usize == n {
            if let Some(s) = self.series.get_mut(n) {
                s.info_base = base;
            }
        }
        idx
    }

    /// The bucket bounds of histogram series `idx`.
    pub(crate) fn bounds(&self, idx: u32) -> &[f64] {
        &self.series[idx as usize].labels.bounds
    }

    /// Widens the bucket bounds of series `idx` to include `les` (the union, as prometheus_client
    /// merges buckets by `le`); archived values are re-indexed. Returns whether anything changed,
    /// in which case [`Merger::epoch`] moved and bucket indices held by callers are stale.
    pub(crate) fn widen(&mut self, idx: u32, les: &[f64]) -> bool {
        let Some(series) = self.series.get_mut(idx as usize) else { return false };
        let old = &series.labels.bounds;
        if les.iter().all(|b| old.contains(b)) {
            return false;
        }
        let was_empty = old.is_empty();
        let mut new: Vec<f64> = old.iter().chain(les).copied().collect();
        new.sort_by(f64::total_cmp);
        new.dedup();
        if let Some(Value::Hist { buckets, .. }) = self.archive.get_mut(idx as usize) {
            let mut moved = vec![0u64; new.len() + 1];
            for (i, n) in buckets.iter().enumerate() {
                let pos = old.get(i).and_then(|b| new.iter().position(|x| x == b)).unwrap_or(new.len());
                moved[pos] = moved[pos].wrapping_add(*n);
            }
            *buckets = moved;
        }
        let labels =
            LabelSet { pairs: series.labels.pairs.clone(), text: series.labels.text.clone(), bounds: new };
        series.labels = Arc::new(labels);
        // A series that had no bounds yet (just created) has no bucket index anywhere to go
        // stale: only widening bounds already in use moves the epoch (and costs a remap).
        if was_empty {
            return true;
        }
        self.epoch += 1;
        true
    }

    /// Changes whenever bucket bounds widen.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The combine rule of the family of series `idx`.
    #[inline]
    pub(crate) fn rule(&self, idx: u32) -> Rule {
        self.families[self.series[idx as usize].family as usize].rule
    }

    /// Whether the family of series `idx` drops dead processes' values (live-mode gauges, info,
    /// enum).
    pub(crate) fn family_is_live(&self, idx: u32) -> bool {
        let fam = &self.families[self.series[idx as usize].family as usize];
        fam.meta.desc.drops_dead()
    }

    /// Number of merged series in the table.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.series.len()
    }

    /// Starts a scrape: fills `accs` with the archived values (one per merged series).
    pub(crate) fn begin(&self, accs: &mut Vec<Value>) {
        accs.clone_from(&self.archive);
    }

    /// Number of finite bucket bounds of series `idx`.
    #[inline]
    pub(crate) fn buckets(&self, idx: u32) -> usize {
        self.series[idx as usize].labels.bounds.len()
    }

    /// Folds one entry of a dead Python process into the archive.
    pub(crate) fn archive_apply(&mut self, idx: u32, part: Part, v: f64, ts: f64) {
        let (rule, n) = (self.rule(idx), self.buckets(idx));
        if let Some(a) = self.archive.get_mut(idx as usize) {
            a.apply(rule, part, v, ts, n);
        }
    }

    /// Folds a dead process's final slots into the archive.
    pub(crate) fn archive_slots(&mut self, idx: u32, slots: &[AtomicU64]) {
        let rule = self.rule(idx);
        if let Some(a) = self.archive.get_mut(idx as usize) {
            let _ = a.add_slots(rule, slots);
        }
    }

    /// Adds a value to the archive (loading a persisted archive).
    pub(crate) fn archive_value(&mut self, idx: u32, v: &Value) {
        let rule = self.rule(idx);
        if let Some(a) = self.archive.get_mut(idx as usize) {
            a.combine(rule, v);
        }
    }

    /// The archived series: (family description, labels and bounds, value), for persistence.
    pub(crate) fn archived(&self) -> impl Iterator<Item = (&MetricDesc, &LabelSet, &Value)> {
        self.series
            .iter()
            .zip(&self.archive)
            .filter(|(_, v)| !v.is_unset())
            .map(|(s, v)| (&self.families[s.family as usize].meta.desc, s.labels.as_ref(), v))
    }

    /// Moves the archive into a fresh table, dropping every merged series no source maps to any
    /// more. The caller re-maps its live sources afterwards. Bounds memory under worker churn with
    /// per-process series.
    pub(crate) fn rebuilt(&self) -> Merger {
        let mut m = Merger::new();
        for (desc, labels, v) in self.archived() {
            if let Some(fam) = m.family_for(desc) {
                let idx = m.series_for(fam, labels.pairs.clone());
                m.widen(idx, &labels.bounds);
                m.archive_value(idx, v);
            }
        }
        m
    }

    /// Of the set series of an info family (with the number of leading label pairs that are the
    /// metric's labels), keeps per metric label set the one chosen last; ties go to the greater
    /// label text, so every scrape gives the same answer.
    fn latest_info(set: Vec<(Arc<LabelSet>, Value, usize)>) -> Vec<(Arc<LabelSet>, Value)> {
        let ts = |v: &Value| if let Value::Info { ts } = v { *ts } else { 0 };
        let key = |l: &LabelSet, base: usize| l.pairs[..base.min(l.pairs.len())].to_vec();
        let mut best: HashMap<Vec<(String, String)>, (u64, &str)> = HashMap::new();
        for (l, v, base) in &set {
            let b = best.entry(key(l, *base)).or_insert((ts(v), l.text.as_str()));
            if (ts(v), l.text.as_str()) > *b {
                *b = (ts(v), l.text.as_str());
            }
        }
        let keep: Vec<bool> = set
            .iter()
            .map(|(l, v, base)| best.get(&key(l, *base)) == Some(&(ts(v), l.text.as_str())))
            .collect();
        set.into_iter().zip(keep).filter(|(_, k)| *k).map(|((l, v, _), _)| (l, v)).collect()
    }

    /// Builds the snapshot from this scrape's accumulators (consumed).
    pub(crate) fn snapshot(&self, mut accs: Vec<Value>) -> Snapshot {
        let mut families = Vec::with_capacity(self.order.len());
        for &fi in &self.order {
            let f = &self.families[fi as usize];
            let mut series = Vec::with_capacity(f.series.len());
            let mut info = Vec::new();
            for &si in &f.series {
                let v = accs.get_mut(si as usize).map_or(Value::Unset, std::mem::take);
                if !v.is_unset() {
                    let s = &self.series[si as usize];
                    if f.rule == Rule::Info {
                        info.push((Arc::clone(&s.labels), v, s.info_base));
                    } else {
                        series.push((Arc::clone(&s.labels), v));
                    }
                }
            }
            if !info.is_empty() {
                series = Merger::latest_info(info);
            }
            if !series.is_empty() {
                families.push(SnapFamily { meta: Arc::clone(&f.meta), series });
            }
        }
        Snapshot { families }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(mode: GaugeMode) -> MetricDesc {
        MetricDesc {
            name: "g".into(),
            help: "G.".into(),
            metric_type: MetricType::Gauge,
            value_type: ValueType::F64,
            gauge_mode: Some(mode),
            label_names: vec!["a".into()],
            buckets: vec![],
            states: Vec::new(),
        }
    }

    #[test]
    fn gauge_modes_combine() {
        let v = |x: f64| Value::F64(x);
        for (mode, expect) in [(GaugeMode::Sum, 6.0), (GaugeMode::Max, 3.0), (GaugeMode::LiveMin, 1.0)] {
            let rule = Rule::of(&gauge(mode));
            let mut acc = Value::Unset;
            for x in [2.0, 3.0, 1.0] {
                acc.combine(rule, &v(x));
            }
            assert_eq!(acc, v(expect), "{mode:?}");
        }
        let mut acc = Value::Unset;
        acc.combine(Rule::Recent, &Value::Recent { ts: 5, v: 1.0 });
        acc.combine(Rule::Recent, &Value::Recent { ts: 3, v: 2.0 });
        assert_eq!(acc, Value::Recent { ts: 5, v: 1.0 });
    }

    fn typed(t: MetricType, states: &[&str]) -> MetricDesc {
        MetricDesc {
            name: "t".into(),
            help: String::new(),
            metric_type: t,
            value_type: ValueType::U64,
            gauge_mode: None,
            label_names: vec!["a".into()],
            buckets: vec![],
            states: states.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    fn slots(words: &[u64]) -> Vec<AtomicU64> {
        words.iter().map(|w| AtomicU64::new(*w)).collect()
    }

    #[test]
    fn enum_latest_set_wins_and_a_bad_index_is_ignored() {
        let rule = Rule::of(&typed(MetricType::Enum, &["x", "y", "z"]));
        assert_eq!(rule, Rule::State(3));
        let mut acc = Value::Unset;
        assert!(acc.add_slots(rule, &slots(&[2, 0])), "never set: valid, the initial state");
        assert_eq!(acc, Value::State { ts: 0, index: 0 }, "an index without a timestamp is a set in flight");
        assert!(acc.add_slots(rule, &slots(&[1, 50])));
        assert!(!acc.add_slots(rule, &slots(&[3, 90])), "index 3 of 3 states");
        assert!(acc.add_slots(rule, &slots(&[0, 40])));
        assert_eq!(acc, Value::State { ts: 50, index: 1 });
        assert!(acc.add_slots(rule, &slots(&[2, 50])));
        assert_eq!(acc, Value::State { ts: 50, index: 2 }, "a tie goes to the larger index");
        // Other states are another family.
        let mut m = Merger::new();
        assert!(m.family_for(&typed(MetricType::Enum, &["x", "y", "z"])).is_some());
        assert!(m.family_for(&typed(MetricType::Enum, &["x", "y"])).is_none());
    }

    #[test]
    fn info_exposes_the_latest_value_set_per_label_set() {
        let mut m = Merger::new();
        let fam = m.family_for(&typed(MetricType::Info, &[])).unwrap();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let old = m.info_series_for(fam, vec![pair("a", "1"), pair("v", "old")], 1);
        let new = m.info_series_for(fam, vec![pair("a", "1"), pair("v", "new")], 1);
        let other = m.info_series_for(fam, vec![pair("a", "2"), pair("v", "old")], 1);
        let never = m.info_series_for(fam, vec![pair("a", "3"), pair("v", "x")], 1);
        let mut accs = Vec::new();
        m.begin(&mut accs);
        let rule = Rule::Info;
        for (idx, ts) in [(old, 10), (new, 20), (other, 5), (never, 0), (old, 15)] {
            assert!(accs[idx as usize].add_slots(rule, &slots(&[ts])));
        }
        let snap = m.snapshot(accs);
        let got: Vec<(&str, &Value)> =
            snap.families[0].series.iter().map(|(l, v)| (l.text.as_str(), v)).collect();
        assert_eq!(
            got,
            vec![
                ("a=\"1\",v=\"new\"", &Value::Info { ts: 20 }),
                ("a=\"2\",v=\"old\"", &Value::Info { ts: 5 })
            ]
        );
    }

    #[test]
    fn conflicting_descriptions_are_refused() {
        let mut m = Merger::new();
        let a = m.family_for(&gauge(GaugeMode::Sum));
        assert_eq!(a, Some(0));
        assert_eq!(m.family_for(&gauge(GaugeMode::Max)), None);
        // Another version of the same metric (other help, other labels) is the same family.
        let mut other = gauge(GaugeMode::Sum);
        other.help = "other".into();
        other.label_names = vec!["a".into(), "b".into()];
        assert_eq!(m.family_for(&other), Some(0));
    }

    #[test]
    fn widening_bounds_reindexes_the_archive() {
        let mut m = Merger::new();
        let h = MetricDesc {
            name: "h".into(),
            help: "H.".into(),
            metric_type: MetricType::Histogram,
            value_type: ValueType::F64,
            gauge_mode: None,
            label_names: vec![],
            buckets: vec![0.1, 1.0],
            states: Vec::new(),
        };
        let f = m.family_for(&h).unwrap();
        let s = m.series_for(f, vec![]);
        assert!(m.widen(s, &[0.1, 1.0]));
        assert_eq!(m.epoch(), 0, "a fresh series' first bounds invalidate nothing");
        m.archive_value(s, &Value::Hist { buckets: vec![1, 2, 3], sum: 4.0 });
        let epoch = m.epoch();
        assert!(!m.widen(s, &[1.0]));
        assert!(m.widen(s, &[0.5, 5.0]));
        assert_ne!(m.epoch(), epoch);
        assert_eq!(m.bounds(s), &[0.1, 0.5, 1.0, 5.0]);
        assert_eq!(m.archive[s as usize], Value::Hist { buckets: vec![1, 0, 2, 0, 3], sum: 4.0 });
    }

    #[test]
    fn rebuild_keeps_only_archived_series() {
        let mut m = Merger::new();
        let f = m.family_for(&gauge(GaugeMode::Sum)).unwrap();
        let a = m.series_for(f, vec![("a".into(), "x".into())]);
        let _b = m.series_for(f, vec![("a".into(), "y".into())]);
        m.archive_value(a, &Value::F64(4.0));
        let r = m.rebuilt();
        assert_eq!(r.len(), 1);
        let snap = r.snapshot(r.archive.clone());
        assert_eq!(snap.families[0].series[0].0.text, "a=\"x\"");
        assert_eq!(snap.families[0].series[0].1, Value::F64(4.0));
    }
}
