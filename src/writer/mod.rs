//! The worker side: register metrics and update them from any thread, lock-free.
//!
//! A [`Registry`] owns one file in the multiproc directory (or private memory when none is
//! configured, so an application runs unchanged when nobody aggregates). Registering a metric or a
//! new label set appends a record under a short lock; the handle you get back points straight at its
//! value slots, so updating it is one atomic instruction (two for a most-recent gauge, a
//! compare-and-swap loop for float sums) — no syscall, no lock, no allocation. Cache handles.
//!
//! Fork safety is automatic: a process that registers metrics and then forks (gunicorn
//! `preload_app`, uWSGI without `lazy-apps`, a Rust master that forks) gives each child its own file,
//! with the same metrics and zeroed values, mapped at the same address, so handles taken before the
//! fork keep working in the child and nothing is counted twice. A child that cannot create its file
//! (a full disk) writes into its parent's file instead, where its updates are merged once; what it
//! cannot record there (new metrics and label sets) is counted as dropped. It says so on stderr.

mod labels;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::layout::{self, header, GaugeMode, MetricDesc, MetricType, ValueType};
use labels::LabelTable;
use store::{Store, StoreState, SCRATCH};

pub use store::DEFAULT_RESERVE;

/// The environment variable naming the multiproc directory.
pub(crate) const ENV_DIR: &str = "SHMETRICS_DIR";

/// Prometheus' default histogram buckets (seconds).
pub const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Per-metric registry data, kept under the store lock.
#[derive(Default)]
pub(crate) struct RegistryState {
    metrics: Vec<MetricEntry>,
    by_name: std::collections::HashMap<String, u32>,
    /// METRIC records written to the file so far (the next file metric id).
    published: u32,
    /// TYPED_METRIC records written so far (the next id of that kind's own sequence).
    published_typed: u32,
}

struct MetricEntry {
    desc: MetricDesc,
    /// Bucket bounds with `'static` lifetime for histogram handles (leaked once per metric).
    bounds: &'static [f64],
    /// States with `'static` lifetime for enum handles (leaked once per metric).
    states: &'static [String],
    /// The metric's id in the file, if its METRIC record made it in; if not, every series goes
    /// to scratch.
    published: Option<u32>,
    /// Label values → the series' slots (scratch slots for a series that found no room). Its
    /// [`Family`] handles read it without the lock.
    series: &'static LabelTable,
}

/// A process's metrics: one file in the multiproc directory, or private memory.
///
/// Cheap to copy around; the underlying store lives until the process exits.
#[derive(Clone, Copy)]
pub struct Registry {
    store: Option<&'static Store>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("path", &self.path()).finish()
    }
}

static GLOBAL: OnceLock<Registry> = OnceLock::new();

impl Registry {
    /// The process-wide registry: a file in `$SHMETRICS_DIR` if that is set, private memory if not.
    ///
    /// If the directory cannot be used (missing, no permission, disk full) the error is logged
    /// through `tracing` and the registry falls back to private memory: the application keeps
    /// running, its metrics are just not aggregated.
    pub fn global() -> &'static Registry {
        GLOBAL.get_or_init(|| match std::env::var_os(ENV_DIR) {
            Some(dir) if !dir.is_empty() => Registry::open(&dir).unwrap_or_else(|e| {
                // Also on stderr: many applications never install a tracing subscriber, and this
                // misconfiguration must not go unnoticed (the aggregator would show nothing).
                let msg = format!(
                    "shmetrics: {e}; metrics of this process will not be aggregated \
                     (check that {ENV_DIR} names the directory the aggregator serves)"
                );
                tracing::error!("{msg}");
                eprintln!("{msg}");
                Registry::in_process()
            }),
            _ => Registry::in_process(),
        })
    }

    /// A registry writing a new file in `dir`, reserving [`DEFAULT_RESERVE`] bytes of address space.
    pub fn open(dir: impl AsRef<Path>) -> Result<Registry> {
        Registry::open_with_reserve(dir, DEFAULT_RESERVE)
    }

    /// Like [`Registry::open`] with an explicit reserve: the most bytes the file can grow to.
    /// Registrations beyond it are dropped and counted (see [`Registry::dropped_series`]).
    pub fn open_with_reserve(dir: impl AsRef<Path>, reserve: u64) -> Result<Registry> {
        let dir = dir.as_ref();
        let store = Store::open(Some(dir), reserve).map_err(|e| Error::io(dir, e))?;
        Ok(Registry { store: Some(store) })
    }

    /// A registry in private memory: everything works, nothing is exported.
    pub fn in_process() -> Registry {
        let store = Store::open(None, DEFAULT_RESERVE)
            .or_else(|_| Store::open(None, 1 << 20))
            .map_err(|e| tracing::error!("shmetrics: cannot map memory for metrics: {e}"))
            .ok();
        Registry { store }
    }

    /// The file this registry writes (`None` for private memory). Changes after `fork`.
    pub fn path(&self) -> Option<PathBuf> {
        self.store.and_then(Store::path)
    }

    /// Declares this process ready (or not) to serve; the aggregator's health check reads it.
    ///
    /// Does nothing in a forked child that writes into its parent's file (see
    /// [`Registry::degraded`]): the flag there is the parent's.
    pub fn set_ready(&self, ready: bool) {
        if let Some(s) = self.store.filter(|s| !s.is_shared()) {
            let flags = s.header_atomic(header::FLAGS);
            if ready {
                flags.fetch_or(layout::flags::READY, Ordering::Release);
            } else {
                flags.fetch_and(!layout::flags::READY, Ordering::Release);
            }
        }
    }

    /// Series that could not be registered because the file or the disk was full.
    pub fn dropped_series(&self) -> u64 {
        self.store.map_or(0, |s| s.header_atomic(header::DROPPED_SERIES).load(Ordering::Relaxed))
    }

    /// Updates that went nowhere because their series could not be registered.
    pub fn dropped_updates(&self) -> u64 {
        self.store.map_or(0, |s| s.header_atomic(header::DROPPED_UPDATES).load(Ordering::Relaxed))
    }

    /// Why the registry has no file of its own although a directory was given, if so: after a fork
    /// whose file could not be created (a full disk), the child writes into its parent's file —
    /// series registered before the fork are exported, new ones are dropped and counted.
    pub fn degraded(&self) -> Option<String> {
        self.store.and_then(|s| {
            s.flush_log();
            s.lock().degraded.clone()
        })
    }

    /// Registers `desc` (or finds it registered): its id and its table of series.
    fn register(&self, desc: MetricDesc) -> Result<(u32, Option<&'static LabelTable>)> {
        layout::validate_desc(&desc)?;
        let Some(store) = self.store else { return Ok((0, None)) };
        store.flush_log();
        let mut st = store.lock();
        if let Some(&id) = st.registry.by_name.get(&desc.name) {
            let existing = &st.registry.metrics[id as usize];
            if existing.desc != desc {
                return Err(Error::Conflict {
                    name: desc.name.clone(),
                    existing: describe(&existing.desc),
                    requested: describe(&desc),
                });
            }
            return Ok((id, Some(existing.series)));
        }
        let id = st.registry.metrics.len() as u32;
        // File metric ids count only METRIC records that made it into the file (readers require
        // them in sequence); a metric that finds no room still gets an entry here, so its series
        // become scratch handles.
        // Kinds 1 and 3 number their records separately (shm-layout.md section 6.4).
        let typed = desc.metric_type.is_typed();
        let file_id = if typed { st.registry.published_typed } else { st.registry.published };
        let record = layout::encode_metric(file_id, &desc);
        let published = store.append(&mut st, &record).map(|_| file_id);
        match (published, typed) {
            (Some(_), false) => st.registry.published += 1,
            (Some(_), true) => st.registry.published_typed += 1,
            (None, _) => {
                store.header_atomic(header::DROPPED_SERIES).fetch_add(1, Ordering::Relaxed);
            }
        }
        let bounds: &'static [f64] = Box::leak(desc.buckets.clone().into_boxed_slice());
        let states: &'static [String] = Box::leak(desc.states.clone().into_boxed_slice());
        st.registry.by_name.insert(desc.name.clone(), id);
        let series = LabelTable::leak();
        st.registry.metrics.push(MetricEntry { desc, bounds, states, published, series });
        Ok((id, Some(series)))
    }

    fn family<M: Metric>(&self, desc: MetricDesc) -> Result<Family<M>> {
        let n_labels = desc.label_names.len();
        let name = desc.name.clone();
        let (id, series) = self.register(desc)?;
        Ok(Family { registry: *self, id, n_labels, name, series, _m: std::marker::PhantomData })
    }

    /// A counter family (u64) with the given label names. A trailing `_total` in `name` is
    /// dropped: the exposition adds it.
    pub fn counter_family(&self, name: &str, help: &str, labels: &[&str]) -> Result<Family<Counter>> {
        self.family(desc(counter_name(name), help, MetricType::Counter, ValueType::U64, None, labels, &[]))
    }

    /// A summary family: count and sum of observations (no quantiles, which cannot be merged
    /// across processes), like prometheus_client's `Summary`.
    pub fn summary_family(&self, name: &str, help: &str, labels: &[&str]) -> Result<Family<Summary>> {
        self.family(desc(name, help, MetricType::Summary, ValueType::F64, None, labels, &[]))
    }

    /// An unlabelled summary.
    pub fn summary(&self, name: &str, help: &str) -> Result<Summary> {
        self.summary_family(name, help, &[])?.with_labels(&[])
    }

    /// An info family: each series holds a set of key/value pairs ([`Info::set`]), exposed as
    /// `<name>_info{labels…,pairs…} 1`. A trailing `_info` in `name` is dropped: the exposition
    /// adds it. Across processes, the value set last by a live process wins.
    pub fn info_family(&self, name: &str, help: &str, labels: &[&str]) -> Result<Family<Info>> {
        self.family(desc(info_name(name), help, MetricType::Info, ValueType::U64, None, labels, &[]))
    }

    /// An unlabelled info.
    pub fn info(&self, name: &str, help: &str) -> Result<Info> {
        self.info_family(name, help, &[])?.with_labels(&[])
    }

    /// An enum family (OpenMetrics stateset): each series is in one of `states` (the first one
    /// until set), exposed as one sample per state, `name{labels…,name="state"} 0|1`. Across
    /// processes, the state set last by a live process wins. No label may be named like the metric.
    pub fn enum_family(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        states: &[&str],
    ) -> Result<Family<Enum>> {
        let mut d = desc(name, help, MetricType::Enum, ValueType::U64, None, labels, &[]);
        d.states = states.iter().map(|s| (*s).to_owned()).collect();
        self.family(d)
    }

    /// An unlabelled enum.
    pub fn enum_metric(&self, name: &str, help: &str, states: &[&str]) -> Result<Enum> {
        self.enum_family(name, help, &[], states)?.with_labels(&[])
    }

    /// An unlabelled counter (u64).
    pub fn counter(&self, name: &str, help: &str) -> Result<Counter> {
        self.counter_family(name, help, &[])?.with_labels(&[])
    }

    /// A float counter family.
    pub fn counter_f64_family(&self, name: &str, help: &str, labels: &[&str]) -> Result<Family<CounterF64>> {
        self.family(desc(counter_name(name), help, MetricType::Counter, ValueType::F64, None, labels, &[]))
    }

    /// An unlabelled float counter.
    pub fn counter_f64(&self, name: &str, help: &str) -> Result<CounterF64> {
        self.counter_f64_family(name, help, &[])?.with_labels(&[])
    }

    /// A gauge family merged across processes by `mode`.
    pub fn gauge_family(
        &self,
        name: &str,
        help: &str,
        mode: GaugeMode,
        labels: &[&str],
    ) -> Result<Family<Gauge>> {
        self.family(desc(name, help, MetricType::Gauge, ValueType::F64, Some(mode), labels, &[]))
    }

    /// An unlabelled gauge merged across processes by `mode`.
    pub fn gauge(&self, name: &str, help: &str, mode: GaugeMode) -> Result<Gauge> {
        self.gauge_family(name, help, mode, &[])?.with_labels(&[])
    }

    /// A histogram family with the given finite bucket bounds (`+Inf` is implied).
    pub fn histogram_family(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<Family<Histogram>> {
        self.family(desc(name, help, MetricType::Histogram, ValueType::F64, None, labels, buckets))
    }

    /// An unlabelled histogram.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram> {
        self.histogram_family(name, help, buckets, &[])?.with_labels(&[])
    }

    /// Finds or creates the series `values` of metric `id`; returns its slots, bucket bounds and
    /// states.
    fn child(&self, id: u32, values: &[&str]) -> Result<Resolved> {
        let Some(store) = self.store else {
            return Ok(Resolved { slots: Slots::scratch(None, SCRATCH.len()), bounds: &[], states: &[] });
        };
        store.flush_log();
        let mut guard = store.lock();
        let st: &mut StoreState = &mut guard;
        let unknown = || Error::Corrupt(format!("unknown metric id {id}"));
        let entry = st.registry.metrics.get(id as usize).ok_or_else(unknown)?;
        let (series, bounds, states, n_slots, published) =
            (entry.series, entry.bounds, entry.states, entry.desc.slots(), entry.published);
        if let Some(found) = series.get(values) {
            return Ok(found);
        }
        if values.iter().any(|v| v.len() > layout::MAX_STRING) {
            return Err(Error::InvalidLabelValue(entry.desc.name.clone()));
        }
        let typed = entry.desc.metric_type.is_typed();
        let off = published.and_then(|file_id| {
            let (record, slots_offset) = layout::encode_series(typed, file_id, values, n_slots);
            store.append(st, &record).map(|rec| rec + slots_offset as u64)
        });
        if off.is_none() {
            store.header_atomic(header::DROPPED_SERIES).fetch_add(1, Ordering::Relaxed);
        }
        let slots = match off.and_then(|off| store.region.atomics(off, n_slots)) {
            Some(values) => Slots { values, dropped: None },
            None => Slots::scratch(Some(store.header_atomic(header::DROPPED_UPDATES)), n_slots),
        };
        let resolved = Resolved { slots, bounds, states };
        series.insert(values, resolved);
        Ok(resolved)
    }

    /// The description of metric `id` (a copy, under the registration lock).
    fn desc_of(&self, id: u32) -> Option<MetricDesc> {
        let store = self.store?;
        let st = store.lock();
        st.registry.metrics.get(id as usize).map(|e| e.desc.clone())
    }
}

fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").filter(|n| !n.is_empty()).unwrap_or(name)
}

fn info_name(name: &str) -> &str {
    name.strip_suffix("_info").filter(|n| !n.is_empty()).unwrap_or(name)
}

fn desc(
    name: &str,
    help: &str,
    t: MetricType,
    v: ValueType,
    mode: Option<GaugeMode>,
    labels: &[&str],
    buckets: &[f64],
) -> MetricDesc {
    MetricDesc {
        name: name.to_owned(),
        help: help.to_owned(),
        metric_type: t,
        value_type: v,
        gauge_mode: mode,
        label_names: labels.iter().map(|l| (*l).to_owned()).collect(),
        buckets: buckets.to_vec(),
        states: Vec::new(),
    }
}

fn describe(d: &MetricDesc) -> String {
    let mut s = d.metric_type.as_str().to_owned();
    if d.metric_type == MetricType::Counter && d.value_type == ValueType::F64 {
        s.push_str(" (f64)");
    }
    if let Some(m) = d.gauge_mode {
        s.push_str(&format!(" (mode {})", m.as_str()));
    }
    s.push_str(&format!(" with labels {:?}", d.label_names));
    if !d.buckets.is_empty() {
        s.push_str(&format!(" and buckets {:?}", d.buckets));
    }
    if !d.states.is_empty() {
        s.push_str(&format!(" and states {:?}", d.states));
    }
    if !d.help.is_empty() {
        s.push_str(&format!(" and help {:?}", d.help));
    }
    s
}

/// A resolved series: its slots, and its metric's bucket bounds and states.
#[derive(Clone, Copy)]
struct Resolved {
    slots: Slots,
    bounds: &'static [f64],
    states: &'static [String],
}

/// The value slots of one series, plus where to count updates when it is a scratch series.
#[derive(Clone, Copy)]
struct Slots {
    values: &'static [AtomicU64],
    dropped: Option<&'static AtomicU64>,
}

impl Slots {
    fn scratch(dropped: Option<&'static AtomicU64>, n: usize) -> Slots {
        Slots { values: &SCRATCH[..n.min(SCRATCH.len())], dropped }
    }
    #[inline]
    fn count_drop(&self) {
        if let Some(d) = self.dropped {
            d.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[inline]
fn add_f64(a: &AtomicU64, v: f64) {
    let mut cur = a.load(Ordering::Relaxed);
    loop {
        let new = (f64::from_bits(cur) + v).to_bits();
        match a.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(x) => cur = x,
        }
    }
}

/// Stores `v` in `a` while `better(current, v)` holds (a compare-and-swap loop); NaN `v` never.
#[inline]
fn replace_f64_if(a: &AtomicU64, v: f64, better: impl Fn(f64, f64) -> bool) {
    if v.is_nan() {
        return;
    }
    let mut cur = a.load(Ordering::Relaxed);
    while better(f64::from_bits(cur), v) {
        match a.compare_exchange_weak(cur, v.to_bits(), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(x) => cur = x,
        }
    }
}

/// A metric handle type that a [`Family`] hands out.
pub trait Metric: Sized + private::Sealed {
    /// The handle's series are appended by its updates, not by `with_labels` (info: one series
    /// per value set).
    #[doc(hidden)]
    const DEFERRED: bool = false;
    #[doc(hidden)]
    fn from_parts(parts: Parts<'_>) -> Self;
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::Counter {}
    impl Sealed for super::CounterF64 {}
    impl Sealed for super::Gauge {}
    impl Sealed for super::Histogram {}
    impl Sealed for super::Summary {}
    impl Sealed for super::Info {}
    impl Sealed for super::Enum {}
}

/// Opaque bundle passed to [`Metric::from_parts`]: the resolved series and where it came from.
#[doc(hidden)]
pub struct Parts<'a> {
    resolved: Resolved,
    registry: Registry,
    id: u32,
    values: &'a [&'a str],
}

/// A metric with labels; [`Family::with_labels`] returns the handle of one label set.
pub struct Family<M> {
    registry: Registry,
    id: u32,
    n_labels: usize,
    name: String,
    /// The metric's series ([`MetricEntry::series`]); `None` without a store.
    series: Option<&'static LabelTable>,
    _m: std::marker::PhantomData<fn() -> M>,
}

impl<M> Clone for Family<M> {
    fn clone(&self) -> Self {
        Family {
            registry: self.registry,
            id: self.id,
            n_labels: self.n_labels,
            name: self.name.clone(),
            series: self.series,
            _m: std::marker::PhantomData,
        }
    }
}

impl<M> std::fmt::Debug for Family<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("name", &self.name).finish()
    }
}

impl<M: Metric> Family<M> {
    /// The handle of the series with these label values (in label-name order), creating it on
    /// first use. Lookups of existing series take no lock (the metric's table of series is
    /// read lock-free from every thread); caching the handle yourself is faster still.
    pub fn with_labels(&self, values: &[&str]) -> Result<M> {
        if values.len() != self.n_labels {
            return Err(Error::LabelCount {
                metric: self.name.clone(),
                expected: self.n_labels,
                got: values.len(),
            });
        }
        let parts = |resolved| Parts { resolved, registry: self.registry, id: self.id, values };
        if M::DEFERRED {
            if values.iter().any(|v| v.len() > layout::MAX_STRING) {
                return Err(Error::InvalidLabelValue(self.name.clone()));
            }
            let none = Resolved { slots: Slots::scratch(None, 0), bounds: &[], states: &[] };
            return Ok(M::from_parts(parts(none)));
        }
        if let Some(resolved) = self.series.and_then(|t| t.get(values)) {
            return Ok(M::from_parts(parts(resolved)));
        }
        let resolved = self.registry.child(self.id, values)?;
        Ok(M::from_parts(parts(resolved)))
    }
}

/// A monotonic u64 counter.
#[derive(Clone, Copy)]
pub struct Counter(Slots);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// Adds `v`.
    #[inline]
    pub fn inc_by(&self, v: u64) {
        self.0.values[0].fetch_add(v, Ordering::Relaxed);
        self.0.count_drop();
    }
    /// This process's value.
    pub fn get(&self) -> u64 {
        self.0.values[0].load(Ordering::Relaxed)
    }
}

/// A monotonic f64 counter.
#[derive(Clone, Copy)]
pub struct CounterF64(Slots);

impl CounterF64 {
    /// Adds `v`. Negative and NaN increments are ignored: a counter never goes down.
    #[inline]
    pub fn inc_by(&self, v: f64) {
        if v >= 0.0 {
            add_f64(&self.0.values[0], v);
            self.0.count_drop();
        }
    }
    /// This process's value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.values[0].load(Ordering::Relaxed))
    }
}

/// A gauge (f64).
#[derive(Clone, Copy)]
pub struct Gauge(Slots);

impl Gauge {
    #[inline]
    fn stamp(&self) {
        if let Some(ts) = self.0.values.get(1) {
            ts.store(now_ns(), Ordering::Release);
        }
        self.0.count_drop();
    }
    /// Sets the value.
    #[inline]
    pub fn set(&self, v: f64) {
        self.0.values[0].store(v.to_bits(), Ordering::Relaxed);
        self.stamp();
    }
    /// Adds `v` (may be negative).
    #[inline]
    pub fn add(&self, v: f64) {
        add_f64(&self.0.values[0], v);
        self.stamp();
    }
    /// Subtracts `v`.
    #[inline]
    pub fn sub(&self, v: f64) {
        self.add(-v);
    }
    /// Raises the value to `v` if `v` is larger (uWSGI's `metric_set_max`): one atomic
    /// compare-and-swap loop, not a read and a write, so of concurrent callers the largest value
    /// always stays. A NaN `v` is ignored; a NaN value is replaced.
    #[inline]
    pub fn set_max(&self, v: f64) {
        replace_f64_if(&self.0.values[0], v, |cur, v| cur.is_nan() || v > cur);
        self.stamp();
    }
    /// Lowers the value to `v` if `v` is smaller (uWSGI's `metric_set_min`); see
    /// [`Gauge::set_max`].
    #[inline]
    pub fn set_min(&self, v: f64) {
        replace_f64_if(&self.0.values[0], v, |cur, v| cur.is_nan() || v < cur);
        self.stamp();
    }
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1.0);
    }
    /// Subtracts one.
    #[inline]
    pub fn dec(&self) {
        self.add(-1.0);
    }
    /// This process's value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.values[0].load(Ordering::Relaxed))
    }
}

/// A histogram: observations counted into fixed buckets, plus their sum.
#[derive(Clone, Copy)]
pub struct Histogram {
    slots: Slots,
    bounds: &'static [f64],
}

impl Histogram {
    /// Records one observation. NaN is counted in the `+Inf` bucket and added to the sum, as
    /// Prometheus clients do.
    #[inline]
    pub fn observe(&self, v: f64) {
        let i = if self.bounds.len() <= 16 {
            self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len())
        } else {
            // NaN compares false with every bound: it belongs in +Inf, as on the linear path.
            if v.is_nan() {
                self.bounds.len()
            } else {
                self.bounds.partition_point(|b| *b < v)
            }
        };
        let n = self.slots.values.len();
        if let (Some(bucket), Some(sum)) = (self.slots.values.get(i), self.slots.values.get(n - 1)) {
            bucket.fetch_add(1, Ordering::Relaxed);
            add_f64(sum, v);
        }
        self.slots.count_drop();
    }
    /// Starts timing: the seconds until the returned guard is dropped (or
    /// [`Timer::observe_duration`] is called) are observed once.
    pub fn start_timer(&self) -> HistogramTimer {
        Timer::new(*self)
    }
    /// Runs `f` and observes how many seconds it took (also when it panics).
    pub fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        let _timer = self.start_timer();
        f()
    }
    /// This process's (observation count, sum).
    pub fn get(&self) -> (u64, f64) {
        let n = self.slots.values.len();
        let count = self.slots.values[..n - 1].iter().map(|b| b.load(Ordering::Relaxed)).sum();
        (count, f64::from_bits(self.slots.values[n - 1].load(Ordering::Relaxed)))
    }
}

/// A summary: the count and sum of observations (no quantiles: they cannot be merged across
/// processes). Exposed as `<name>_count` and `<name>_sum`.
#[derive(Clone, Copy)]
pub struct Summary(Slots);

impl Summary {
    /// Records one observation: adds one to the count, then `v` to the sum.
    #[inline]
    pub fn observe(&self, v: f64) {
        if let [count, sum, ..] = self.0.values {
            count.fetch_add(1, Ordering::Relaxed);
            add_f64(sum, v);
        }
        self.0.count_drop();
    }
    /// Starts timing: the seconds until the returned guard is dropped (or
    /// [`Timer::observe_duration`] is called) are observed once.
    pub fn start_timer(&self) -> SummaryTimer {
        Timer::new(*self)
    }
    /// Runs `f` and observes how many seconds it took (also when it panics).
    pub fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        let _timer = self.start_timer();
        f()
    }
    /// This process's (observation count, sum).
    pub fn get(&self) -> (u64, f64) {
        match self.0.values {
            [count, sum, ..] => (count.load(Ordering::Relaxed), f64::from_bits(sum.load(Ordering::Relaxed))),
            _ => (0, 0.0),
        }
    }
}

/// Something a [`Timer`] can observe a duration into: [`Histogram`], [`Summary`].
pub trait Observe: Copy + private::Sealed {
    /// Records one observation.
    fn observe(&self, v: f64);
}

impl Observe for Histogram {
    fn observe(&self, v: f64) {
        Histogram::observe(self, v);
    }
}

impl Observe for Summary {
    fn observe(&self, v: f64) {
        Summary::observe(self, v);
    }
}

/// Times a block for a [`Histogram`] or [`Summary`] (their `start_timer`): observes the elapsed
/// seconds once, when dropped or at [`Timer::observe_duration`].
#[must_use = "the time is observed when the timer is dropped: bind it to a variable"]
pub struct Timer<M: Observe> {
    metric: M,
    start: std::time::Instant,
    observed: bool,
}

/// The timer of a [`Histogram`] ([`Histogram::start_timer`]).
pub type HistogramTimer = Timer<Histogram>;
/// The timer of a [`Summary`] ([`Summary::start_timer`]).
pub type SummaryTimer = Timer<Summary>;

impl<M: Observe> Timer<M> {
    fn new(metric: M) -> Timer<M> {
        Timer { metric, start: std::time::Instant::now(), observed: false }
    }

    /// Observes the seconds since the timer started, now, and returns them.
    pub fn observe_duration(mut self) -> f64 {
        self.observe()
    }

    fn observe(&mut self) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        if !self.observed {
            self.observed = true;
            self.metric.observe(secs);
        }
        secs
    }
}

impl<M: Observe> Drop for Timer<M> {
    fn drop(&mut self) {
        self.observe();
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .max(1)
}

/// An info metric's series (one label set): [`Info::set`] replaces its key/value pairs, exposed
/// as `<name>_info{labels…,pairs…} 1`.
///
/// In the file, each distinct value set is a series of its own, holding the time of the last
/// `set` that chose it; the most recent one is the value. Setting a value set for the first time
/// appends a series under the registration lock; setting it again is one atomic store.
#[derive(Clone)]
pub struct Info {
    registry: Registry,
    id: u32,
    labels: std::sync::Arc<[String]>,
}

impl std::fmt::Debug for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Info").field("labels", &self.labels).finish()
    }
}

impl Info {
    /// Replaces the value with these key/value pairs (in this order), as prometheus_client's
    /// `Info.info()` does. Keys must be valid label names, unique, and not among the metric's label
    /// names; labels and keys together at most 64; values at most 64 KiB.
    pub fn set(&self, pairs: &[(&str, &str)]) -> Result<()> {
        let mut values: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        for (k, v) in pairs {
            values.push(k);
            values.push(v);
        }
        let desc = self.registry.desc_of(self.id);
        match &desc {
            Some(d) => layout::check_info_values(d, &values)?,
            None if self.registry.store.is_some() => {
                return Err(Error::Corrupt(format!("unknown metric id {}", self.id)))
            }
            None => {}
        }
        let resolved = self.registry.child(self.id, &values)?;
        if let Some(ts) = resolved.slots.values.first() {
            ts.store(now_ns(), Ordering::Release);
        }
        resolved.slots.count_drop();
        Ok(())
    }
}

/// An enum's series (one label set): one of the metric's states, the first until set.
#[derive(Clone, Copy)]
pub struct Enum {
    slots: Slots,
    states: &'static [String],
}

impl Enum {
    /// Sets the state by name; an error if it is not one of the metric's states.
    pub fn set(&self, state: &str) -> Result<()> {
        match self.states.iter().position(|s| s == state) {
            Some(i) => self.set_index(i),
            None => Err(Error::InvalidValue(format!("{state:?} is not one of the states {:?}", self.states))),
        }
    }
    /// Sets the state by its index in the metric's states; an error if out of range.
    #[inline]
    pub fn set_index(&self, i: usize) -> Result<()> {
        if i >= self.states.len() {
            return Err(Error::InvalidValue(format!(
                "state index {i} is out of range (the enum has {} states)",
                self.states.len()
            )));
        }
        if let [index, ts, ..] = self.slots.values {
            // Index first, then the timestamp with release: a reader that loads the timestamp
            // with acquire sees an index at least as new (shm-layout.md section 7).
            index.store(i as u64, Ordering::Relaxed);
            ts.store(now_ns(), Ordering::Release);
        }
        self.slots.count_drop();
        Ok(())
    }
    /// This process's state index (0, the first state, until set).
    pub fn get(&self) -> usize {
        let i = self.slots.values.first().map_or(0, |a| a.load(Ordering::Relaxed));
        usize::try_from(i).ok().filter(|i| *i < self.states.len()).unwrap_or(0)
    }
}

impl Metric for Counter {
    fn from_parts(p: Parts<'_>) -> Self {
        Counter(p.resolved.slots)
    }
}
impl Metric for CounterF64 {
    fn from_parts(p: Parts<'_>) -> Self {
        CounterF64(p.resolved.slots)
    }
}
impl Metric for Gauge {
    fn from_parts(p: Parts<'_>) -> Self {
        Gauge(p.resolved.slots)
    }
}
impl Metric for Histogram {
    fn from_parts(p: Parts<'_>) -> Self {
        Histogram { slots: p.resolved.slots, bounds: p.resolved.bounds }
    }
}
impl Metric for Summary {
    fn from_parts(p: Parts<'_>) -> Self {
        Summary(p.resolved.slots)
    }
}
impl Metric for Info {
    const DEFERRED: bool = true;
    fn from_parts(p: Parts<'_>) -> Self {
        let labels = p.values.iter().map(|v| (*v).to_owned()).collect();
        Info { registry: p.registry, id: p.id, labels }
    }
}
impl Metric for Enum {
    fn from_parts(p: Parts<'_>) -> Self {
        Enum { slots: p.resolved.slots, states: p.resolved.states }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync + Copy>() {}

    #[test]
    fn handles_are_send_sync_copy() {
        send_sync::<Counter>();
        send_sync::<CounterF64>();
        send_sync::<Gauge>();
        send_sync::<Histogram>();
        send_sync::<Summary>();
        send_sync::<Enum>();
        send_sync::<Registry>();
        fn send_sync_clone<T: Send + Sync + Clone>() {}
        send_sync_clone::<Info>();
        fn family<T: Send + Sync + Clone>() {}
        family::<Family<Counter>>();
    }

    #[test]
    fn set_max_and_set_min_keep_the_extreme_across_threads() {
        let reg = Registry::in_process();
        let hi = reg.gauge("g_hi", "x", GaugeMode::Max).unwrap();
        let lo = reg.gauge("g_lo", "x", GaugeMode::Min).unwrap();
        lo.set(f64::NAN); // a NaN value is replaced by the first set_min
        std::thread::scope(|s| {
            for t in 0..4u32 {
                s.spawn(move || {
                    for i in 0..10_000u32 {
                        let v = f64::from(i * 4 + t);
                        hi.set_max(v);
                        lo.set_min(v - 5.0);
                    }
                });
            }
        });
        assert_eq!(hi.get(), 39_999.0);
        assert_eq!(lo.get(), -5.0);
        hi.set_max(f64::NAN);
        hi.set_max(7.0);
        assert_eq!(hi.get(), 39_999.0, "NaN and smaller values change nothing");
    }

    #[test]
    fn timers_observe_once() {
        let reg = Registry::in_process();
        let h = reg.histogram("t_seconds", "x", &[0.001, 10.0]).unwrap();
        let r = h.time(|| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            42
        });
        assert_eq!(r, 42);
        let t = h.start_timer();
        let secs = t.observe_duration(); // and not again when dropped
        {
            let _t = h.start_timer();
        }
        let (count, sum) = h.get();
        assert_eq!(count, 3);
        assert!(sum >= 0.002 && secs >= 0.0, "{sum}");
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let reg = Registry::in_process();
        assert!(matches!(reg.counter("1bad", "x"), Err(Error::InvalidName(_))));
        assert!(matches!(reg.counter_family("ok", "x", &["__x"]), Err(Error::InvalidLabelName(_))));
        assert!(matches!(reg.histogram_family("h", "x", &[1.0], &["le"]), Err(Error::InvalidLabelName(_))));
        assert!(matches!(reg.histogram("h2", "x", &[2.0, 1.0]), Err(Error::InvalidBuckets(_))));
        assert!(matches!(
            reg.gauge_family("g", "x", GaugeMode::All, &["pid"]),
            Err(Error::InvalidLabelName(_))
        ));
        let fam = reg.counter_family("c", "x", &["a", "b"]).unwrap();
        assert!(matches!(fam.with_labels(&["1"]), Err(Error::LabelCount { expected: 2, got: 1, .. })));
        assert!(matches!(reg.gauge("c", "x", GaugeMode::Sum), Err(Error::Conflict { .. })));
        // The same definition again is the same metric.
        let again = reg.counter_family("c", "x", &["a", "b"]).unwrap();
        again.with_labels(&["1", "2"]).unwrap().inc_by(3);
        assert_eq!(fam.with_labels(&["1", "2"]).unwrap().get(), 3);
    }

    #[test]
    fn summary_counts_and_sums_with_its_timer() {
        let reg = Registry::in_process();
        let s = reg.summary("s_seconds", "x").unwrap();
        s.observe(1.5);
        s.observe(-0.5);
        assert_eq!(s.get(), (2, 1.0));
        let t = s.start_timer();
        let secs = t.observe_duration();
        assert_eq!(s.time(|| 7), 7);
        let (count, sum) = s.get();
        assert_eq!(count, 4);
        assert!(sum >= 1.0 + secs, "{sum}");
        let fam = reg.summary_family("s_by", "x", &["a"]).unwrap();
        fam.with_labels(&["1"]).unwrap().observe(2.0);
        assert_eq!(fam.with_labels(&["1"]).unwrap().get(), (1, 2.0));
        assert!(matches!(reg.histogram("s_seconds", "x", &[1.0]), Err(Error::Conflict { .. })));
    }

    #[test]
    fn enum_states_and_errors() {
        let reg = Registry::in_process();
        let e = reg.enum_metric("task_state", "x", &["idle", "running", "done"]).unwrap();
        assert_eq!(e.get(), 0, "the first state until set");
        e.set("running").unwrap();
        assert_eq!(e.get(), 1);
        e.set_index(2).unwrap();
        assert_eq!(e.get(), 2);
        assert!(matches!(e.set("lost"), Err(Error::InvalidValue(_))));
        assert!(matches!(e.set_index(3), Err(Error::InvalidValue(_))));
        assert_eq!(e.get(), 2);
        let fam = reg.enum_family("job_state", "x", &["job"], &["a", "b"]).unwrap();
        fam.with_labels(&["j1"]).unwrap().set("b").unwrap();
        assert_eq!(fam.with_labels(&["j1"]).unwrap().get(), 1);
        assert!(matches!(reg.enum_family("st", "x", &["st"], &["a"]), Err(Error::InvalidLabelName(_))));
        assert!(matches!(reg.enum_metric("st", "x", &[]), Err(Error::InvalidValue(_))));
        assert!(matches!(reg.enum_metric("st", "x", &["a", "a"]), Err(Error::InvalidValue(_))));
        assert!(matches!(reg.enum_metric("st", "x", &["a", ""]), Err(Error::InvalidValue(_))));
    }

    #[test]
    fn info_validates_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        let i = reg.info("build_info", "x").unwrap();
        i.set(&[("version", "1.2"), ("commit", "abc")]).unwrap();
        i.set(&[("version", "1.3")]).unwrap();
        assert!(matches!(i.set(&[("1bad", "x")]), Err(Error::InvalidLabelName(_))));
        assert!(matches!(i.set(&[("a", "x"), ("a", "y")]), Err(Error::InvalidLabelName(_))));
        let fam = reg.info_family("app", "x", &["region"]).unwrap();
        let eu = fam.with_labels(&["eu"]).unwrap();
        assert!(matches!(eu.set(&[("region", "x")]), Err(Error::InvalidLabelName(_))));
        let many: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        let pairs: Vec<(&str, &str)> = many.iter().map(|k| (k.as_str(), "v")).collect();
        assert!(matches!(eu.set(&pairs), Err(Error::InvalidLabelName(_))), "1 label + 64 keys");
        eu.set(&pairs[..63]).unwrap();
        // `build_info` is stored as `build`: the same metric as `build`.
        assert!(reg.info("build", "x").is_ok());
        assert!(matches!(reg.counter("build", "x"), Err(Error::Conflict { .. })));
        assert_eq!(reg.dropped_series(), 0);
    }

    #[test]
    fn every_thread_resolves_a_label_set_to_the_same_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(dir.path()).expect("registry");
        let fam = reg.counter_family("races_total", "x", &["i", "kind"]).expect("family");
        let again = reg.counter_family("races_total", "x", &["i", "kind"]).expect("same family");
        const N: usize = 3000;
        // Four threads create and look up the same label sets in different orders, racing each
        // other's inserts and the table's growth; half go through the second handle.
        let seen: Vec<Vec<usize>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4usize)
                .map(|t| {
                    let f = if t % 2 == 0 { &fam } else { &again };
                    s.spawn(move || {
                        let mut at = vec![0; N];
                        for k in 0..N {
                            let i = (k + t * 777) % N;
                            let c = f.with_labels(&[i.to_string().as_str(), "x"]).expect("series");
                            c.inc();
                            at[i] = c.0.values.as_ptr() as usize;
                        }
                        at
                    })
                })
                .collect();
            threads.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let mut distinct = std::collections::HashSet::new();
        for i in 0..N {
            assert!(seen.iter().all(|at| at[i] == seen[0][i]), "label set {i}: one series");
            let c = fam.with_labels(&[i.to_string().as_str(), "x"]).expect("series");
            assert_eq!(c.0.values.as_ptr() as usize, seen[0][i]);
            assert_eq!(c.get(), 4, "label set {i}: one increment per thread");
            distinct.insert(seen[0][i]);
        }
        assert_eq!(distinct.len(), N, "distinct label sets are distinct series");
        assert_eq!(reg.dropped_series(), 0);
        assert!(matches!(
            fam.with_labels(&["1", "x", "y"]),
            Err(Error::LabelCount { expected: 2, got: 3, .. })
        ));
    }

    #[test]
    fn histogram_buckets_and_nan() {
        let reg = Registry::in_process();
        let bounds: Vec<f64> = (1..=20).map(f64::from).collect();
        let h = reg.histogram("big", "x", &bounds).unwrap();
        let small = reg.histogram("small", "x", &[1.0, 2.0]).unwrap();
        for hist in [h, small] {
            hist.observe(f64::NAN);
            hist.observe(1.0);
            hist.observe(100.0);
            let n = hist.slots.values.len();
            let buckets: Vec<u64> =
                hist.slots.values[..n - 1].iter().map(|b| b.load(Ordering::Relaxed)).collect();
            assert_eq!(buckets[0], 1, "1.0 is in le=1");
            assert_eq!(buckets[n - 2], 2, "NaN and 100 are in +Inf");
            assert_eq!(buckets.iter().sum::<u64>(), 3);
        }
    }
}
