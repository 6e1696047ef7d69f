//! `shmetrics._native`: the native half of the `shmetrics` Python package.
//!
//! One `#[pyclass]` per prometheus_client metric class, over the Rust writer
//! ([`shmetrics::Registry::global`]: a file in `$SHMETRICS_DIR`, private memory when it is unset).
//! The hot calls (`inc`, `dec`, `set`, `observe`, `labels`) are native methods of frozen classes:
//! no Python frame, no borrow flag, one atomic update on the mapping. The conveniences that return
//! decorators and context managers (`time`, `track_inprogress`, `count_exceptions`) are native
//! methods that build small objects of `shmetrics._helpers` (Python).
//!
//! A metric object is either a series (unlabelled, or a child of `labels(...)`: it holds the
//! writer's handle) or a labelled parent (it holds the writer's family and a dict of its children
//! keyed by the tuple of label values, so a repeated `labels('GET')` is one dict lookup).
//!
//! Errors are Python exceptions, never a crash of the worker: the writer's invalid names, label
//! counts and conflicting re-registrations are `ValueError`, anything else `RuntimeError`.
//!
//! Fork: the writer's `pthread_atfork` handlers give a forked child its own file, whichever way
//! the fork comes (`os.fork`, uWSGI's C `fork()`). Nothing here releases the GIL while it holds a
//! writer lock or takes the GIL while holding one, so a fork by a thread holding the GIL (as
//! `os.fork` does) never finds a writer lock held by a thread that waits for the GIL.

// The constructors take prometheus_client's keyword arguments, one parameter each.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule, PyString, PyTuple};
use pyo3::PyClass;

use shmetrics::{
    CounterF64, Enum as EnumHandle, Family, Gauge as GaugeHandle, GaugeMode, Histogram as HistogramHandle,
    Info as InfoHandle, Registry, Summary as SummaryHandle,
};

/// prometheus_client's default histogram buckets (`+Inf` is implied here).
const DEFAULT_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// The writer's error as a Python exception: bad input is a `ValueError`.
fn py_err(e: shmetrics::Error) -> PyErr {
    use shmetrics::Error as E;
    match e {
        E::InvalidName(_)
        | E::InvalidLabelName(_)
        | E::InvalidLabelValue(_)
        | E::InvalidValue(_)
        | E::InvalidBuckets(_)
        | E::LabelCount { .. }
        | E::Conflict { .. } => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// What every metric object knows about its metric (shared by a parent and its children).
struct Meta {
    /// `counter`, `gauge`, … (prometheus_client's `_type`).
    kind: &'static str,
    /// The full name (namespace_subsystem_name_unit; a counter's without `_total`).
    name: String,
    labelnames: Vec<String>,
}

impl Meta {
    fn repr(&self, values: &[String]) -> String {
        let class = match self.kind {
            "counter" => "Counter",
            "gauge" => "Gauge",
            "histogram" => "Histogram",
            "summary" => "Summary",
            "info" => "Info",
            "stateset" => "Enum",
            other => other,
        };
        if values.is_empty() {
            return format!("shmetrics.{class}({})", self.name);
        }
        let labels: Vec<String> =
            self.labelnames.iter().zip(values).map(|(n, v)| format!("{n}={v:?}")).collect();
        format!("shmetrics.{class}({}{{{}}})", self.name, labels.join(","))
    }
}

/// prometheus_client's full name: `namespace_subsystem_name_unit`. A counter's trailing `_total`
/// is dropped before the unit is added (the exposition adds `_total` back).
fn full_name(kind: &str, name: &str, namespace: &str, subsystem: &str, unit: &str) -> PyResult<String> {
    if name.is_empty() {
        return Err(PyValueError::new_err("Metric name should not be empty"));
    }
    let mut full = String::new();
    for part in [namespace, subsystem] {
        if !part.is_empty() {
            full.push_str(part);
            full.push('_');
        }
    }
    full.push_str(name);
    if kind == "counter" {
        if let Some(stripped) = full.strip_suffix("_total") {
            full.truncate(stripped.len());
        }
    }
    if !unit.is_empty() {
        if matches!(kind, "info" | "stateset") {
            return Err(PyValueError::new_err(format!(
                "Metric name is of a type that cannot have a unit: {full}"
            )));
        }
        if !full.ends_with(&format!("_{unit}")) {
            full.push('_');
            full.push_str(unit);
        }
    }
    Ok(full)
}

/// A labelled parent: the writer's family and the children made so far.
struct Parent<H> {
    family: Family<H>,
    /// `tuple[str, ...]` of label values → child metric object.
    children: Py<PyDict>,
}

/// A metric object: one series, or a labelled parent.
enum Node<H> {
    Series(H),
    Parent(Parent<H>),
}

impl<H> Node<H> {
    fn new(py: Python<'_>, family: Family<H>, meta: &Meta) -> PyResult<Node<H>>
    where
        H: shmetrics::writer::Metric,
    {
        if meta.labelnames.is_empty() {
            Ok(Node::Series(family.with_labels(&[]).map_err(py_err)?))
        } else {
            Ok(Node::Parent(Parent { family, children: PyDict::new(py).unbind() }))
        }
    }

    /// The series handle; a `ValueError` on a labelled parent, as prometheus_client raises.
    #[inline]
    fn series(&self, meta: &Meta) -> PyResult<&H> {
        match self {
            Node::Series(h) => Ok(h),
            Node::Parent(_) => Err(PyValueError::new_err(format!(
                "{} metric {} is missing label values: call .labels({}) first",
                meta.kind,
                meta.name,
                meta.labelnames.join(", ")
            ))),
        }
    }
}

/// The label values of a `labels(*args, **kw)` call, as prometheus_client takes them: positional
/// in label-name order, or all by keyword (not both); each value `str()`-ed.
fn label_values(
    meta: &Meta,
    args: &Bound<'_, PyTuple>,
    kw: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<String>> {
    let kw = kw.filter(|k| !k.is_empty());
    if !args.is_empty() && kw.is_some() {
        return Err(PyValueError::new_err("Can't pass both *args and **kwargs"));
    }
    let wrong = |what: &str| {
        PyValueError::new_err(format!(
            "{what} for {}: expected {} value(s), for {}",
            meta.name,
            meta.labelnames.len(),
            meta.labelnames.join(", ")
        ))
    };
    let to_string = |v: Bound<'_, PyAny>| -> PyResult<String> { Ok(v.str()?.to_cow()?.into_owned()) };
    match kw {
        Some(kw) => {
            if kw.len() != meta.labelnames.len() {
                return Err(wrong("Incorrect label names"));
            }
            meta.labelnames
                .iter()
                .map(|n| match kw.get_item(n)? {
                    Some(v) => to_string(v),
                    None => Err(wrong("Incorrect label names")),
                })
                .collect()
        }
        None => {
            if args.len() != meta.labelnames.len() {
                return Err(wrong("Incorrect label count"));
            }
            args.iter().map(to_string).collect()
        }
    }
}

/// `labels(...)` of a parent: the cached child, or a new one made by `make` from the writer's
/// handle of these label values.
fn child<'py, H, T>(
    slf: &Bound<'py, T>,
    meta: &Arc<Meta>,
    node: &Node<H>,
    args: &Bound<'py, PyTuple>,
    kw: Option<&Bound<'py, PyDict>>,
    make: impl FnOnce(Arc<Meta>, H, Vec<String>) -> T,
) -> PyResult<Bound<'py, PyAny>>
where
    H: shmetrics::writer::Metric,
    T: PyClass + Into<pyo3::PyClassInitializer<T>>,
{
    let py = slf.py();
    let Node::Parent(parent) = node else {
        return Err(PyValueError::new_err(format!(
            "No label names were set when constructing {}",
            meta.name
        )));
    };
    let children = parent.children.bind(py);
    // Fast path: positional str values are their own key. (A non-str value never equals a key,
    // all of which are tuples of str; an unhashable one is handled below.)
    if kw.is_none_or(|k| k.is_empty()) {
        if let Ok(Some(c)) = children.get_item(args) {
            return Ok(c);
        }
    }
    let values = label_values(meta, args, kw)?;
    let key = PyTuple::new(py, values.iter().map(|v| PyString::new(py, v)))?;
    if let Some(c) = children.get_item(&key)? {
        return Ok(c);
    }
    let handle =
        parent.family.with_labels(&values.iter().map(String::as_str).collect::<Vec<_>>()).map_err(py_err)?;
    let c = Bound::new(py, make(Arc::clone(meta), handle, values))?.into_any();
    children.set_item(key, &c)?;
    Ok(c)
}

static HELPERS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// An object of `shmetrics._helpers` (Python): `name(*args)`.
fn helper<'py>(
    py: Python<'py>,
    name: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let m = HELPERS.get_or_try_init(py, || py.import("shmetrics._helpers").map(Bound::unbind))?;
    m.bind(py).getattr(name)?.call1(args)
}

/// Label names given to a constructor (any iterable of str; prometheus_client's `labelnames`).
fn names(labelnames: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(l) = labelnames else { return Ok(Vec::new()) };
    if l.is_instance_of::<PyString>() {
        return Err(PyValueError::new_err("labelnames must be a sequence of str, not a str"));
    }
    l.try_iter()?.map(|n| n?.extract::<String>()).collect()
}

fn registry() -> &'static Registry {
    Registry::global()
}

/// A metric class and its `#[pymethods]`: its own methods, plus what every class has (`labels`,
/// `remove`, `clear`, `__repr__`). Every class has the fields `meta`, `node` and `labels` (the
/// label values of a child, empty otherwise).
///
/// The constructor takes prometheus_client's common arguments, then the class's own (`extra`,
/// with defaults); `register` makes the writer's family from the full name, the documentation,
/// the label names and the extra arguments. `observe = ("observe")` adds `observe` and `time`
/// (histograms and summaries; the literal is the method `time()`'s timer calls).
macro_rules! metric_methods {
    (
        $(#[$attr:meta])*
        $class:ident($handle:ty), kind = $kind:literal,
        extra = ($($p:ident: $t:ty = $d:expr),*),
        register = |$name:ident, $doc:ident, $labels:ident| $register:expr,
        observe = ($($observe:literal)?),
        $($own:tt)*
    ) => {
        $(#[$attr])*
        #[pyclass(frozen, module = "shmetrics")]
        struct $class {
            meta: Arc<Meta>,
            node: Node<$handle>,
            /// The label values of a child; empty otherwise.
            labels: Vec<String>,
        }

        #[pymethods]
        impl $class {
            #[new]
            #[pyo3(signature = (name, documentation, labelnames=None, namespace="", subsystem="", unit="", registry=None $(, $p=$d)*))]
            fn new(
                py: Python<'_>,
                name: &str,
                documentation: &str,
                labelnames: Option<&Bound<'_, PyAny>>,
                namespace: &str,
                subsystem: &str,
                unit: &str,
                registry: Option<&Bound<'_, PyAny>>,
                $($p: $t),*
            ) -> PyResult<Self> {
                let _ = registry; // one registry per process: the process's file
                let meta = Meta {
                    kind: $kind,
                    name: full_name($kind, name, namespace, subsystem, unit)?,
                    labelnames: names(labelnames)?,
                };
                let refs: Vec<&str> = meta.labelnames.iter().map(String::as_str).collect();
                let family = {
                    let ($name, $doc, $labels) = (meta.name.as_str(), documentation, refs.as_slice());
                    $register
                }
                .map_err(py_err)?;
                let node = Node::new(py, family, &meta)?;
                Ok($class { meta: Arc::new(meta), node, labels: Vec::new() })
            }

            $(
                /// Records one observation.
                #[pyo3(signature = (amount, exemplar=None))]
                fn observe(&self, amount: f64, exemplar: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                    let _ = exemplar;
                    self.node.series(&self.meta)?.observe(amount);
                    Ok(())
                }

                /// Observes the seconds a block or decorated function took.
                fn time<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
                    slf.get().node.series(&slf.get().meta)?;
                    helper(slf.py(), "Timer", (slf.clone(), $observe))
                }
            )?

            $($own)*

            /// The child of these label values (cached): `labels('GET')`, `labels(method='GET')`.
            #[pyo3(signature = (*args, **kw))]
            fn labels<'py>(
                slf: &Bound<'py, Self>,
                args: &Bound<'py, PyTuple>,
                kw: Option<&Bound<'py, PyDict>>,
            ) -> PyResult<Bound<'py, PyAny>> {
                let me = slf.get();
                child(slf, &me.meta, &me.node, args, kw, |meta, h, labels| $class {
                    meta,
                    node: Node::Series(h),
                    labels,
                })
            }

            /// Not supported: a process's file only grows.
            #[pyo3(signature = (*_values))]
            fn remove(&self, _values: &Bound<'_, PyTuple>) -> PyResult<()> {
                Err(not_removable())
            }

            /// Not supported: a process's file only grows.
            fn clear(&self) -> PyResult<()> {
                Err(not_removable())
            }

            fn __repr__(&self) -> String {
                self.meta.repr(&self.labels)
            }
        }
    };
}

// -------------------------------------------------------------------------------------------------
// Counter

metric_methods! {
    /// A counter: `Counter(name, documentation, labelnames=(), namespace='', subsystem='', unit='',
    /// registry=None)`. Float increments, as in prometheus_client (the writer's f64 counter).
    Counter(CounterF64), kind = "counter", extra = (),
    register = |name, doc, labels| registry().counter_f64_family(name, doc, labels),
    observe = (),


    /// Adds `amount` (default 1; floats allowed). Negative or NaN: `ValueError`.
    #[pyo3(signature = (amount=1.0, exemplar=None))]
    fn inc(&self, amount: f64, exemplar: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let _ = exemplar;
        let h = self.node.series(&self.meta)?;
        if amount.is_nan() || amount < 0.0 {
            return Err(PyValueError::new_err("Counters can only be incremented by non-negative amounts."));
        }
        h.inc_by(amount);
        Ok(())
    }

    /// Counts exceptions of type `exception` (default `Exception`) leaving a block or a decorated
    /// function.
    #[pyo3(signature = (exception=None))]
    fn count_exceptions<'py>(
        slf: &Bound<'py, Self>,
        exception: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().node.series(&slf.get().meta)?;
        let exception = exception.unwrap_or_else(|| py.get_type::<pyo3::exceptions::PyException>().into_any());
        helper(py, "ExceptionCounter", (slf.clone(), exception))
    }
}

fn not_removable() -> PyErr {
    PyNotImplementedError::new_err(
        "shmetrics series cannot be removed: a process's file only grows (series of dead \
         processes are folded by the aggregator)",
    )
}

// -------------------------------------------------------------------------------------------------
// Gauge

metric_methods! {
    /// A gauge: `Gauge(name, documentation, labelnames=(), namespace='', subsystem='', unit='',
    /// registry=None, multiprocess_mode='all')`. The modes are prometheus_client's names, which are
    /// the writer's (`all liveall min livemin max livemax sum livesum mostrecent livemostrecent`).
    Gauge(GaugeHandle), kind = "gauge", extra = (multiprocess_mode: &str = "all"),
    register = |name, doc, labels| {
        let mode = GaugeMode::parse(multiprocess_mode)
            .ok_or_else(|| PyValueError::new_err(format!("Invalid multiprocess mode: {multiprocess_mode}")))?;
        registry().gauge_family(name, doc, mode, labels)
    },
    observe = (),


    /// Adds `amount` (default 1).
    #[pyo3(signature = (amount=1.0))]
    fn inc(&self, amount: f64) -> PyResult<()> {
        self.node.series(&self.meta)?.add(amount);
        Ok(())
    }

    /// Subtracts `amount` (default 1).
    #[pyo3(signature = (amount=1.0))]
    fn dec(&self, amount: f64) -> PyResult<()> {
        self.node.series(&self.meta)?.sub(amount);
        Ok(())
    }

    /// Sets the value.
    fn set(&self, value: f64) -> PyResult<()> {
        self.node.series(&self.meta)?.set(value);
        Ok(())
    }

    /// Sets the value to the current time (seconds since the epoch).
    fn set_to_current_time(&self) -> PyResult<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.node.series(&self.meta)?.set(now);
        Ok(())
    }

    /// Raises the value to `value` if larger (atomic; uWSGI's `metric_set_max`). Not in
    /// prometheus_client.
    fn set_max(&self, value: f64) -> PyResult<()> {
        self.node.series(&self.meta)?.set_max(value);
        Ok(())
    }

    /// Lowers the value to `value` if smaller (atomic; uWSGI's `metric_set_min`). Not in
    /// prometheus_client.
    fn set_min(&self, value: f64) -> PyResult<()> {
        self.node.series(&self.meta)?.set_min(value);
        Ok(())
    }

    /// +1 while a block or decorated function runs, −1 after.
    fn track_inprogress<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().node.series(&slf.get().meta)?;
        helper(slf.py(), "InprogressTracker", (slf.clone(),))
    }

    /// Sets the gauge to the seconds a block or decorated function took.
    fn time<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().node.series(&slf.get().meta)?;
        helper(slf.py(), "Timer", (slf.clone(), "set"))
    }

    /// Not supported: the value of a callback lives in one process only.
    fn set_function(&self, _f: &Bound<'_, PyAny>) -> PyResult<()> {
        Err(PyNotImplementedError::new_err(
            "Gauge.set_function is not supported by shmetrics: values must be written to the \
             process's file; call set() instead",
        ))
    }
}

// -------------------------------------------------------------------------------------------------
// Histogram

/// Finite, increasing bucket bounds from prometheus_client's `buckets` (a trailing `+Inf` is
/// dropped: the writer implies it).
fn bucket_bounds(buckets: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<f64>> {
    let Some(b) = buckets else { return Ok(DEFAULT_BUCKETS.to_vec()) };
    let mut bounds: Vec<f64> = b.try_iter()?.map(|v| v?.extract::<f64>()).collect::<PyResult<_>>()?;
    if bounds.last() == Some(&f64::INFINITY) {
        bounds.pop();
    }
    if bounds.is_empty() {
        return Err(PyValueError::new_err("Must have at least two buckets"));
    }
    if bounds.windows(2).any(|w| w[0] >= w[1] || w[0].is_nan() || w[1].is_nan()) {
        return Err(PyValueError::new_err("Buckets not in sorted order"));
    }
    Ok(bounds)
}

metric_methods! {
    /// A histogram: `Histogram(name, documentation, labelnames=(), namespace='', subsystem='',
    /// unit='', registry=None, buckets=DEFAULT_BUCKETS)` (prometheus_client's default buckets).
    Histogram(HistogramHandle), kind = "histogram", extra = (buckets: Option<&Bound<'_, PyAny>> = None),
    register = |name, doc, labels| registry().histogram_family(name, doc, &bucket_bounds(buckets)?, labels),
    observe = ("observe"),


}

// -------------------------------------------------------------------------------------------------
// Summary, Info, Enum

metric_methods! {
    /// A summary: `Summary(name, documentation, labelnames=(), namespace='', subsystem='', unit='',
    /// registry=None)`: count and sum, no quantiles (as prometheus_client's).
    Summary(SummaryHandle), kind = "summary", extra = (),
    register = |name, doc, labels| registry().summary_family(name, doc, labels),
    observe = ("observe"),

}

metric_methods! {
    /// An info metric: `Info(name, documentation, labelnames=(), namespace='', subsystem='',
    /// registry=None)`; `info({key: value})` replaces its pairs. Exposed as `<name>_info{…} 1`
    /// (OpenMetrics `info`); across processes, the pairs set last by a live process win.
    Info(InfoHandle), kind = "info", extra = (),
    register = |name, doc, labels| registry().info_family(name, doc, labels),
    observe = (),

    /// Replaces the key/value pairs (values are `str()`-ed).
    fn info(&self, val: &Bound<'_, PyDict>) -> PyResult<()> {
        let h = self.node.series(&self.meta)?;
        let pairs: Vec<(String, String)> = val
            .iter()
            .map(|(k, v)| Ok((k.extract::<String>()?, v.str()?.to_cow()?.into_owned())))
            .collect::<PyResult<_>>()?;
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        h.set(&refs).map_err(py_err)
    }
}

metric_methods! {
    /// An enum: `Enum(name, documentation, labelnames=(), namespace='', subsystem='', registry=None,
    /// states=[...])`; `state(s)` sets it (the first state until then). Exposed as one sample per
    /// state (OpenMetrics `stateset`); across processes, the state set last by a live process wins.
    Enum(EnumHandle), kind = "stateset", extra = (states: Option<Vec<String>> = None),
    register = |name, doc, labels| {
        let states = states.filter(|s| !s.is_empty()).ok_or_else(|| {
            PyValueError::new_err(format!("No states provided for Enum metric: {name}"))
        })?;
        if labels.contains(&name) {
            return Err(PyValueError::new_err(format!("Overlapping labels for Enum metric: {name}")));
        }
        let states: Vec<&str> = states.iter().map(String::as_str).collect();
        registry().enum_family(name, doc, labels, &states)
    },
    observe = (),

    /// Sets the state; a `ValueError` if it is not one of the states.
    fn state(&self, state: &str) -> PyResult<()> {
        self.node.series(&self.meta)?.set(state).map_err(py_err)
    }
}

// -------------------------------------------------------------------------------------------------
// The process

/// Declares this process ready (or not) to serve: the aggregator's `/healthz` and health check
/// count the ready workers.
#[pyfunction]
fn set_ready(ready: bool) {
    registry().set_ready(ready);
}

/// The file this process writes, or None when its metrics are not exported (`SHMETRICS_DIR`
/// unset or unusable). Changes after a fork.
#[pyfunction]
fn file_path() -> Option<String> {
    registry().path().map(|p| p.display().to_string())
}

/// Why this process writes into its parent's file (a fork whose own file could not be created),
/// or None.
#[pyfunction]
fn degraded() -> Option<String> {
    registry().degraded()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Counter>()?;
    m.add_class::<Gauge>()?;
    m.add_class::<Histogram>()?;
    m.add_class::<Summary>()?;
    m.add_class::<Info>()?;
    m.add_class::<Enum>()?;
    m.add_function(wrap_pyfunction!(set_ready, m)?)?;
    m.add_function(wrap_pyfunction!(file_path, m)?)?;
    m.add_function(wrap_pyfunction!(degraded, m)?)?;
    m.add(
        "DEFAULT_BUCKETS",
        PyTuple::new(m.py(), DEFAULT_BUCKETS.iter().copied().chain([f64::INFINITY]).collect::<Vec<_>>())?,
    )?;
    Ok(())
}
