//! Derived metrics, `[[metric]]` (uWSGI's `--metric` with a collector or an alias), computed on the
//! merged, job-wide view.
//!
//! # Why here, and why like this
//!
//! uWSGI's metrics subsystem lets a sysadmin define numbers nobody's code writes: a sum of other
//! metrics, a running total, a value read from `/proc`, another name for an existing metric. uWSGI
//! computes them in its master from per-worker int64 metrics without labels. We compute them on
//! the merged view (every worker's series already summed by the aggregator), so a derived metric
//! is job-wide from the start and may select labelled series. They join every merge
//! ([`crate::job::Job::merge`] calls [`Engine::apply`]), so `/metrics`, `dump --config`, the
//! threshold rules, the pushers and the text dir all see them like any other series.
//!
//! # What a metric is
//!
//! A `[[metric]]` section is parsed once, at load, into a checked [`MetricSpec`] ("parse, don't
//! validate"): every bad combination of keys is a configuration error naming the metric and the
//! key, so a file with one is refused (at SIGHUP the configuration in force is kept) and the engine
//! only ever sees metrics it can compute.
//!
//! - A *collected* metric (`type` counter, gauge or absolute; counter by default, as in uWSGI) is
//!   computed when it is due, at the first merge at least `freq_seconds` after its last collection
//!   (the first merge collects at once): its value becomes `initial_value + collector()`, except
//!   for `accumulator`, which adds the children's sum to its own value every round, starting from
//!   `initial_value`. (uWSGI computes `initial_value + (value + Σ)` there, adding the initial
//!   value again at every round; we add it once, which is what the docs' worked example means.)
//!   Between collections a metric shows its last value. With derived metrics configured the job's
//!   upkeep task merges at every pass (`--upkeep-interval`, 1 s by default), so collectors run on
//!   time even when nobody scrapes.
//! - Children are selectors of merged samples as exposed (`name` or `name{label="value"}`, the
//!   same as threshold rules, matched against [`samples::flatten`]); a selector matching several
//!   series sums them. `avg` divides by the number of children that matched something (uWSGI's
//!   `avg` is an integer division; ours is a float). A derived metric may use other derived
//!   metrics as children, but only those defined before it in the file (a later one is a load
//!   error): each merge computes them in file order.
//! - `file` reads at most 4096 bytes of `path`, splits them on runs of space, `\t`, `\r`, `\n` and
//!   NUL, and parses the token at the 0-based index `split` as a float: `/proc/loadavg`'s `0.58`
//!   is 0.58, where uWSGI's `strtoll` would give 0, and a token that is not a number (a word,
//!   `12kB`) is a problem rather than 0. The path is named by the operator, so it need not be ours
//!   (`/proc` files are root's), but it is opened with `O_NOFOLLOW | O_NONBLOCK` and read only if
//!   it is a regular file: a FIFO or a device can never hang a merge.
//! - `type = "alias"` exposes the series its `alias` selector matches under another name, at every
//!   merge. An alias of a counter's `_total` sample is a counter (its name gets `_total`), of
//!   anything else a gauge. An alias that matches nothing is not exposed.
//! - Types as exposed: counter is a Prometheus counter (family name without `_total`, as the
//!   writer names counters), gauge and absolute are gauges; absolute is uWSGI's type 2, which the
//!   socket pusher sends as such ([`Engine::absolute_names`]).
//!
//! # Problems
//!
//! A child that matches nothing, a file that cannot be read or parsed, a value that is not finite
//! or a derived name that clashes with a family already merged never stops anything: the metric
//! keeps its last value (a clashing one is not added). Each problem is logged once per metric and
//! kind (a warning, with the details) and shown, while it lasts, as
//! `shmetrics_derived_problems{metric="…",problem="…"} 1` (problems `no_match`, `not_finite`,
//! `unreadable`, `no_token`, `not_a_number`, `clash`).
//!
//! # Reloads and pushes
//!
//! [`Engine::reload`] keeps the state (value, next collection) of every metric whose section is
//! unchanged; a changed or new one starts from its `initial_value`. [`Engine::pushed`] puts the
//! metrics with `reset_after_push` back to their `initial_value`, as uWSGI's statsd, socket and
//! carbon pushers do after sending.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::parsed::{Seconds, Selector};
use crate::samples::{self, Sample};

/// The engine's own family: the problems of derived metrics, 1 while each lasts.
const PROBLEMS: &str = "shmetrics_derived_problems";

/// How many bytes of a `file` collector's file are read (as uWSGI does).
const FILE_BYTES: usize = 4096;

/// One `[[metric]]` section, checked: the engine can compute every metric it is given.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(try_from = "RawSpec")]
pub struct MetricSpec {
    /// The exposed name: a collected counter's family name (without `_total`), else the name as
    /// written.
    pub name: String,
    /// The name as written (in messages and the problems' `metric` label).
    pub(crate) written: String,
    /// Help text (`help`, or a description of what the metric computes).
    pub(crate) help: String,
    /// What it computes.
    pub(crate) what: What,
}

/// What a derived metric is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum What {
    /// Computed by a collector every `freq_seconds`.
    Collected(Collected),
    /// Another name for the series a selector matches, every merge.
    Alias(Child),
}

/// A collected metric's settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Collected {
    pub(crate) kind: Kind,
    pub(crate) collector: Collector,
    pub(crate) freq: Duration,
    pub(crate) initial_value: f64,
    pub(crate) reset_after_push: bool,
}

/// The `type` of a collected metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// uWSGI's type 0, a Prometheus counter.
    Counter,
    /// uWSGI's type 1, a gauge.
    Gauge,
    /// uWSGI's type 2, exposed as a gauge.
    Absolute,
}

/// A `collector` with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Collector {
    /// The token at index `split` of the first 4096 bytes of `path`.
    File { path: PathBuf, split: usize },
    /// Σ children.
    Sum(Vec<Child>),
    /// Σ children / number of children that matched something (0 if none).
    Avg(Vec<Child>),
    /// value += Σ children, every round.
    Accumulator(Vec<Child>),
    /// Σ children × factor.
    Multiplier(Vec<Child>, f64),
}

/// A child (or alias) selector, with its text as written (for messages).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Child {
    pub(crate) text: String,
    pub(crate) sel: Selector,
}

/// A `[[metric]]` section as written; [`MetricSpec::try_from`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    help: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    collector: Option<String>,
    children: Option<Vec<String>>,
    freq_seconds: Option<f64>,
    initial_value: Option<f64>,
    reset_after_push: Option<bool>,
    path: Option<PathBuf>,
    split: Option<i64>,
    factor: Option<f64>,
    alias: Option<String>,
}

/// A counter's family name: without a trailing `_total` (as the writer names counters).
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").filter(|n| !n.is_empty()).unwrap_or(name)
}

impl TryFrom<RawSpec> for MetricSpec {
    type Error = String;

    fn try_from(r: RawSpec) -> Result<MetricSpec, String> {
        let at = format!("[[metric]] {:?}", r.name);
        let bad = |m: String| Err(format!("{at}: {m}"));
        if !crate::layout::valid_metric_name(&r.name) {
            return bad(format!(
                "name = {:?} is not a Prometheus metric name: write letters, digits, _ and : \
                 ([a-zA-Z_:][a-zA-Z0-9_:]*; uWSGI's dots and dashes become underscores)",
                r.name
            ));
        }
        if r.name.starts_with("shmetrics_") {
            return bad(format!(
                "name = {:?}: names starting with shmetrics_ are the aggregator's own; pick another",
                r.name
            ));
        }
        let finite = |key: &str, v: Option<f64>| -> Result<Option<f64>, String> {
            match v {
                Some(x) if !x.is_finite() => Err(format!(
                    "{at}: {key} = {} is not allowed: write a finite number",
                    crate::parsed::toml_float(x)
                )),
                v => Ok(v),
            }
        };
        let initial_value = finite("initial_value", r.initial_value)?;
        let factor = finite("factor", r.factor)?;
        let kind = match r.kind.as_deref() {
            None | Some("counter") => Some(Kind::Counter),
            Some("gauge") => Some(Kind::Gauge),
            Some("absolute") => Some(Kind::Absolute),
            Some("alias") => None,
            Some(t) => {
                return bad(format!("type = {t:?} is not allowed: write counter, gauge, absolute or alias"))
            }
        };
        let child = |key: &str, text: &str| -> Result<Child, String> {
            match Selector::parse(text) {
                Some(sel) => Ok(Child { text: text.trim().to_string(), sel }),
                None => Err(format!("{at}: {key} has {text:?}: write name or name{{label=\"value\"}}")),
            }
        };
        let Some(kind) = kind else {
            // An alias: only `name`, `help` and `alias`.
            let given = [
                ("collector", r.collector.is_some()),
                ("children", r.children.is_some()),
                ("freq_seconds", r.freq_seconds.is_some()),
                ("initial_value", r.initial_value.is_some()),
                ("reset_after_push", r.reset_after_push.is_some()),
                ("path", r.path.is_some()),
                ("split", r.split.is_some()),
                ("factor", r.factor.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, g)| *g) {
                return bad(format!(
                    "type = \"alias\" takes no {key}: an alias only renames the series of alias = \"…\" \
                     (remove {key})"
                ));
            }
            let Some(text) = r.alias else {
                return bad(
                    "type = \"alias\" needs alias = \"<series>\" (name or name{label=\"value\"})".into()
                );
            };
            let alias = child("alias", &text)?;
            let help = r.help.unwrap_or_else(|| format!("Alias of {} ([[metric]]).", alias.text));
            return Ok(MetricSpec { written: r.name.clone(), name: r.name, help, what: What::Alias(alias) });
        };
        if r.alias.is_some() {
            return bad("alias = \"…\" needs type = \"alias\" (remove alias, or set the type)".into());
        }
        let Some(collector) = r.collector else {
            return bad(
                "collector is missing: write collector = \"file\", \"sum\", \"avg\", \"accumulator\" or \
                 \"multiplier\" (or type = \"alias\" with alias = \"…\")"
                    .into(),
            );
        };
        let not_with = |key: &str, given: bool| -> Result<(), String> {
            if given {
                Err(format!("{at}: collector = {collector:?} takes no {key} (remove {key})"))
            } else {
                Ok(())
            }
        };
        let children = |r_children: Option<Vec<String>>| -> Result<Vec<Child>, String> {
            match r_children {
                Some(c) if !c.is_empty() => c.iter().map(|t| child("children", t)).collect(),
                _ => Err(format!(
                    "{at}: collector = {collector:?} needs children = [\"<series>\", …] (name or \
                     name{{label=\"value\"}})"
                )),
            }
        };
        let collector = match collector.as_str() {
            "file" => {
                not_with("children", r.children.is_some())?;
                not_with("factor", r.factor.is_some())?;
                let Some(path) = r.path else {
                    return bad("collector = \"file\" needs path = \"/absolute/path\"".into());
                };
                if !path.is_absolute() {
                    return bad(format!("path = {:?} is relative: write an absolute path", path.display()));
                }
                let split = match r.split.map(usize::try_from) {
                    None => 0,
                    Some(Ok(s)) => s,
                    Some(Err(_)) => {
                        return bad(format!(
                            "split = {} is not allowed: write the 0-based index of the token (0, 1, 2, …)",
                            r.split.unwrap_or_default()
                        ))
                    }
                };
                Collector::File { path, split }
            }
            "sum" | "avg" | "accumulator" | "multiplier" => {
                not_with("path", r.path.is_some())?;
                not_with("split", r.split.is_some())?;
                if collector != "multiplier" {
                    not_with("factor", r.factor.is_some())?;
                }
                let c = children(r.children)?;
                match collector.as_str() {
                    "sum" => Collector::Sum(c),
                    "avg" => Collector::Avg(c),
                    "accumulator" => Collector::Accumulator(c),
                    _ => match factor {
                        Some(f) => Collector::Multiplier(c, f),
                        None => return bad("collector = \"multiplier\" needs factor = <number>".into()),
                    },
                }
            }
            other => {
                return bad(format!(
                    "collector = {other:?} is not allowed: write file, sum, avg, accumulator or multiplier"
                ))
            }
        };
        let freq = match r.freq_seconds {
            None => Duration::from_secs(1),
            Some(x) => match Seconds::new(x, true) {
                Ok(s) => s.get(),
                Err(e) => return bad(format!("freq_seconds = {e}")),
            },
        };
        let name = match kind {
            Kind::Counter => counter_name(&r.name).to_string(),
            _ => r.name.clone(),
        };
        let help = r.help.unwrap_or_else(|| describe(&collector));
        Ok(MetricSpec {
            name,
            written: r.name,
            help,
            what: What::Collected(Collected {
                kind,
                collector,
                freq,
                initial_value: initial_value.unwrap_or(0.0),
                reset_after_push: r.reset_after_push.unwrap_or(false),
            }),
        })
    }
}

/// The default help text of a collected metric.
fn describe(c: &Collector) -> String {
    let list = |children: &[Child]| children.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join(", ");
    let what = match c {
        Collector::File { path, split } => format!("token {split} of {}", path.display()),
        Collector::Sum(c) => format!("sum of {}", list(c)),
        Collector::Avg(c) => format!("average of {}", list(c)),
        Collector::Accumulator(c) => format!("running total of {}", list(c)),
        Collector::Multiplier(c, f) => format!("sum of {} times {f}", list(c)),
    };
    format!("Derived ([[metric]]): {what}.")
}

impl MetricSpec {
    /// Every family and sample name this metric may be exposed under (an alias's type is known
    /// only when it matches).
    fn names(&self) -> Vec<String> {
        match &self.what {
            What::Collected(c) if c.kind == Kind::Counter => {
                vec![self.name.clone(), format!("{}_total", self.name)]
            }
            What::Collected(_) => vec![self.name.clone()],
            What::Alias(_) => {
                let base = counter_name(&self.name);
                let mut v = vec![self.name.clone(), base.to_string(), format!("{base}_total")];
                v.dedup();
                v
            }
        }
    }

    /// The selectors it reads.
    fn selectors(&self) -> Vec<&Child> {
        match &self.what {
            What::Alias(a) => vec![a],
            What::Collected(c) => match &c.collector {
                Collector::File { .. } => Vec::new(),
                Collector::Sum(v)
                | Collector::Avg(v)
                | Collector::Accumulator(v)
                | Collector::Multiplier(v, _) => v.iter().collect(),
            },
        }
    }
}

/// Checks the `[[metric]]` sections together: names are unique (as families and as samples), and
/// a metric reads only derived metrics defined before it. Called when the file is loaded.
pub(crate) fn check(specs: &[MetricSpec]) -> Result<(), String> {
    for (i, s) in specs.iter().enumerate() {
        let mine = s.names();
        if let Some(before) = specs[..i].iter().find(|b| b.names().iter().any(|n| mine.contains(n))) {
            return Err(format!(
                "[[metric]] {:?}: name clashes with [[metric]] {:?} before it: give each metric its own name",
                s.written, before.written
            ));
        }
        for c in s.selectors() {
            if let Some(later) = specs[i..].iter().find(|l| l.names().contains(&c.sel.name)) {
                let key = if matches!(s.what, What::Alias(_)) { "alias" } else { "children" };
                let whom = if later.written == s.written {
                    "itself".to_string()
                } else {
                    format!("[[metric]] {:?}, defined after it", later.written)
                };
                return Err(format!(
                    "[[metric]] {:?}: {key} has {:?}, which is {whom}: a derived metric can read only \
                     the [[metric]] sections before it in the file",
                    s.written, c.text
                ));
            }
        }
    }
    Ok(())
}

/// A kind of problem of a derived metric (the `problem` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Problem {
    /// A child (or the alias) matches no series.
    NoMatch,
    /// A child's value, or the computed value, is NaN or infinite (left out; the value kept).
    NotFinite,
    /// The file cannot be opened or read, or is not a regular file.
    Unreadable,
    /// The file has no token at `split`.
    NoToken,
    /// The token is not a number.
    NotANumber,
    /// The name clashes with a merged family: the metric is not added.
    Clash,
}

impl Problem {
    fn as_str(self) -> &'static str {
        match self {
            Problem::NoMatch => "no_match",
            Problem::NotFinite => "not_finite",
            Problem::Unreadable => "unreadable",
            Problem::NoToken => "no_token",
            Problem::NotANumber => "not_a_number",
            Problem::Clash => "clash",
        }
    }
}

/// One metric's state.
#[derive(Debug)]
struct Metric {
    spec: MetricSpec,
    /// The current value (a collected metric's; an alias computes its own at every merge).
    value: f64,
    /// When the next collection is due (`None`: at the next merge).
    next_due: Option<Instant>,
    /// Problems found by the last collection (they last until the next one).
    collected: Vec<(Problem, String)>,
    /// Problems already logged.
    logged: HashSet<Problem>,
    /// The family as a counter and as a gauge.
    counter: Arc<FamilyMeta>,
    gauge: Arc<FamilyMeta>,
}

impl Metric {
    fn new(spec: MetricSpec) -> Metric {
        let initial = match &spec.what {
            What::Collected(c) => c.initial_value,
            What::Alias(_) => 0.0,
        };
        // An alias of a counter is exposed under the counter's family name (its sample gets _total).
        let counter_family = match &spec.what {
            What::Alias(_) => counter_name(&spec.name),
            What::Collected(_) => spec.name.as_str(),
        };
        let counter = FamilyMeta::own(counter_family, &spec.help, MetricType::Counter, ValueType::F64, &[]);
        let gauge = FamilyMeta::own(&spec.name, &spec.help, MetricType::Gauge, ValueType::F64, &[]);
        Metric {
            spec,
            value: initial,
            next_due: None,
            collected: Vec::new(),
            logged: HashSet::new(),
            counter,
            gauge,
        }
    }

    /// Runs the collector: the new value, or the last one kept with the problems found.
    fn collect(value: &mut f64, found: &mut Vec<(Problem, String)>, c: &Collected, view: &mut View<'_>) {
        found.clear();
        let computed = match &c.collector {
            Collector::File { path, split } => match read_token(path, *split) {
                Ok(x) => Some(c.initial_value + x),
                Err(p) => {
                    found.push(p);
                    None
                }
            },
            Collector::Sum(children)
            | Collector::Avg(children)
            | Collector::Accumulator(children)
            | Collector::Multiplier(children, _) => {
                let (mut total, mut matched) = (0.0, 0usize);
                for child in children {
                    let m = view.sum(&child.sel);
                    if m.matched == 0 {
                        found.push((Problem::NoMatch, format!("child {} matches no series", child.text)));
                    } else {
                        matched += 1;
                        total += m.sum;
                    }
                    if m.non_finite > 0 {
                        found.push((
                            Problem::NotFinite,
                            format!("child {}: {} series not finite, left out", child.text, m.non_finite),
                        ));
                    }
                }
                Some(match &c.collector {
                    Collector::Avg(_) => {
                        c.initial_value + if matched > 0 { total / matched as f64 } else { 0.0 }
                    }
                    Collector::Accumulator(_) => *value + total,
                    Collector::Multiplier(_, f) => c.initial_value + total * f,
                    _ => c.initial_value + total,
                })
            }
        };
        match computed {
            Some(v) if v.is_finite() => *value = v,
            Some(v) => {
                found.push((Problem::NotFinite, format!("computed {v}, keeping the last value {}", *value)))
            }
            None => {}
        }
    }

    /// Logs a problem the first time this metric has it.
    fn report(&mut self, p: Problem, detail: &str) {
        if self.logged.insert(p) {
            tracing::warn!(
                metric = %self.spec.written,
                problem = p.as_str(),
                "derived metric {}: {detail} (logged once; {PROBLEMS} shows it while it lasts)",
                self.spec.written
            );
        }
    }
}

/// What a selector matched: how many samples, their sum (finite ones), how many were not finite,
/// and whether the first came from a counter.
#[derive(Default)]
struct Matched {
    matched: usize,
    sum: f64,
    non_finite: usize,
    counter: bool,
}

/// The merged snapshot as the derived metrics read it: families found by name, flattened (with
/// [`samples::flatten`], the one flattening) only when a selector or a clash check needs them, plus
/// the derived samples added so far.
struct View<'a> {
    snap: &'a Snapshot,
    by_name: HashMap<&'a str, Vec<usize>>,
    flat: HashMap<usize, Vec<Sample>>,
    /// Derived samples so far: name, value, counter.
    derived: Vec<(String, f64, bool)>,
    /// Family and sample names of the derived families added so far.
    taken: HashSet<String>,
}

/// Sample suffixes [`samples::flatten`] adds to a family name.
const SUFFIXES: [&str; 5] = ["_total", "_info", "_bucket", "_count", "_sum"];

impl<'a> View<'a> {
    fn new(snap: &'a Snapshot) -> View<'a> {
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, f) in snap.families.iter().enumerate() {
            by_name.entry(f.meta.desc.name.as_str()).or_default().push(i);
        }
        View { snap, by_name, flat: HashMap::new(), derived: Vec::new(), taken: HashSet::new() }
    }

    /// Indices of the families that may expose a sample called `name`.
    fn candidates(&self, name: &str) -> Vec<usize> {
        let stems = std::iter::once(name).chain(SUFFIXES.iter().filter_map(|s| name.strip_suffix(s)));
        stems.filter_map(|s| self.by_name.get(s)).flatten().copied().collect()
    }

    /// The samples of family `i`.
    fn samples(&mut self, i: usize) -> &[Sample] {
        let snap = self.snap;
        self.flat.entry(i).or_insert_with(|| {
            let f = &snap.families[i];
            let one = Snapshot {
                families: vec![SnapFamily { meta: Arc::clone(&f.meta), series: f.series.clone() }],
            };
            samples::flatten(&one)
        })
    }

    /// The samples a selector matches, summed.
    fn sum(&mut self, sel: &Selector) -> Matched {
        let mut m = Matched::default();
        let add = |m: &mut Matched, v: f64, counter: bool| {
            if m.matched == 0 {
                m.counter = counter;
            }
            m.matched += 1;
            if v.is_finite() {
                m.sum += v;
            } else {
                m.non_finite += 1;
            }
        };
        for i in self.candidates(&sel.name) {
            let counter = self.snap.families[i].meta.desc.metric_type == MetricType::Counter;
            for s in self.samples(i).iter().filter(|s| sel.matches(&s.name, &s.labels)) {
                add(&mut m, s.value, counter);
            }
        }
        for (name, v, counter) in &self.derived {
            if sel.matches(name, &[]) {
                add(&mut m, *v, *counter);
            }
        }
        m
    }

    /// Whether a family called `family`, exposing a sample called `sample`, would clash with one
    /// already merged or added.
    fn clashes(&mut self, family: &str, sample: &str) -> bool {
        if self.by_name.contains_key(family) || self.taken.contains(family) || self.taken.contains(sample) {
            return true;
        }
        self.candidates(sample).into_iter().any(|i| self.samples(i).iter().any(|s| s.name == sample))
    }

    fn add(&mut self, family: &str, sample: &str, v: f64, counter: bool) {
        self.taken.insert(family.to_string());
        self.taken.insert(sample.to_string());
        self.derived.push((sample.to_string(), v, counter));
    }
}

/// Reads the token at index `split` of the first [`FILE_BYTES`] bytes of `path` as a number.
fn read_token(path: &Path, split: usize) -> Result<f64, (Problem, String)> {
    let unreadable = |what: String| (Problem::Unreadable, format!("{}: {what}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => unreadable("is a symbolic link (not followed)".into()),
            _ => unreadable(format!("cannot open: {e}")),
        })?;
    let meta = file.metadata().map_err(|e| unreadable(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(unreadable("is not a regular file".into()));
    }
    let mut buf = vec![0u8; FILE_BYTES];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreadable(format!("cannot read: {e}"))),
        }
    }
    token(&buf[..len], split).map_err(|(p, what)| (p, format!("{}: {what}", path.display())))
}

/// The token at index `split` of `bytes` (split on runs of space, `\t`, `\r`, `\n` and NUL, as
/// uWSGI's `file` collector does) as a finite number.
fn token(bytes: &[u8], split: usize) -> Result<f64, (Problem, String)> {
    let mut tokens = bytes.split(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0)).filter(|t| !t.is_empty());
    let Some(t) = tokens.nth(split) else {
        return Err((Problem::NoToken, format!("no token at split = {split}")));
    };
    let text = String::from_utf8_lossy(t);
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err((Problem::NotANumber, format!("token {split} is {text:?}, not a number"))),
    }
}

/// The derived metrics and their state (accumulators), kept across merges and reloads.
#[derive(Debug, Default)]
pub struct Engine {
    metrics: Vec<Metric>,
}

impl Engine {
    /// An engine for these metrics.
    pub fn new(specs: Vec<MetricSpec>) -> Engine {
        Engine { metrics: specs.into_iter().map(Metric::new).collect() }
    }

    /// Replaces the metrics; the state of metrics that stay is kept.
    pub fn reload(&mut self, specs: Vec<MetricSpec>) {
        let mut old: HashMap<String, Metric> = HashMap::new();
        for m in std::mem::take(&mut self.metrics) {
            old.entry(m.spec.name.clone()).or_insert(m);
        }
        self.metrics = specs
            .into_iter()
            .map(|s| match old.remove(&s.name) {
                Some(m) if m.spec == s => m,
                _ => Metric::new(s),
            })
            .collect();
    }

    /// Whether no metric is configured (then the job need not merge on its own).
    pub fn is_empty(&self) -> bool {
        self.metrics.is_empty()
    }

    /// Collects the metrics that are due at `now` and adds every derived family to `snap`, plus
    /// `shmetrics_derived_problems` while a metric has a problem.
    pub fn apply(&mut self, snap: &mut Snapshot, now: Instant) {
        if self.metrics.is_empty() {
            return;
        }
        let no_labels = Arc::new(LabelSet::default());
        let mut added = Vec::new();
        let mut problems: Vec<(String, Problem)> = Vec::new();
        let mut view = View::new(snap);
        for m in &mut self.metrics {
            let mut now_problems: Vec<(Problem, String)> = Vec::new();
            let exposed = match &m.spec.what {
                What::Collected(c) => {
                    if m.next_due.is_none_or(|due| now >= due) {
                        Metric::collect(&mut m.value, &mut m.collected, c, &mut view);
                        m.next_due = now.checked_add(c.freq);
                    }
                    now_problems.extend(m.collected.iter().cloned());
                    Some((m.value, c.kind == Kind::Counter))
                }
                What::Alias(a) => {
                    let got = view.sum(&a.sel);
                    if got.non_finite > 0 {
                        now_problems.push((
                            Problem::NotFinite,
                            format!("alias {}: series not finite, left out", a.text),
                        ));
                    }
                    if got.matched == 0 {
                        now_problems.push((Problem::NoMatch, format!("alias {} matches no series", a.text)));
                        None
                    } else {
                        Some((got.sum, got.counter))
                    }
                }
            };
            if let Some((v, counter)) = exposed {
                let meta = if counter { &m.counter } else { &m.gauge };
                let family = meta.desc.name.clone();
                let sample = meta.desc.sample_name().into_owned();
                if view.clashes(&family, &sample) {
                    now_problems.push((
                        Problem::Clash,
                        format!(
                            "{sample} clashes with a merged family or an earlier derived metric: not added"
                        ),
                    ));
                } else {
                    view.add(&family, &sample, v, counter);
                    added.push(SnapFamily {
                        meta: Arc::clone(meta),
                        series: vec![(Arc::clone(&no_labels), Value::F64(v))],
                    });
                }
            }
            for (p, detail) in &now_problems {
                m.report(*p, detail);
                if !problems.iter().any(|(n, q)| *n == m.spec.written && q == p) {
                    problems.push((m.spec.written.clone(), *p));
                }
            }
        }
        let own_clash = view.by_name.contains_key(PROBLEMS);
        drop(view);
        snap.families.extend(added);
        if !problems.is_empty() && !own_clash {
            let meta = FamilyMeta::own(
                PROBLEMS,
                "Problems of derived metrics ([[metric]]): 1 while one lasts (details in the log, once).",
                MetricType::Gauge,
                ValueType::F64,
                &["metric", "problem"],
            );
            let series = problems
                .into_iter()
                .map(|(name, p)| {
                    let labels = LabelSet::new(vec![
                        ("metric".to_string(), name),
                        ("problem".to_string(), p.as_str().to_string()),
                    ]);
                    (Arc::new(labels), Value::F64(1.0))
                })
                .collect();
            snap.families.push(SnapFamily { meta, series });
        }
    }

    /// Names of the families of `type = "absolute"` metrics (uWSGI's type 2, for the socket
    /// pusher; they are exposed as gauges).
    pub fn absolute_names(&self) -> Vec<String> {
        self.metrics
            .iter()
            .filter(|m| matches!(&m.spec.what, What::Collected(c) if c.kind == Kind::Absolute))
            .map(|m| m.spec.name.clone())
            .collect()
    }

    /// A push went out: metrics with `reset_after_push` go back to their initial value.
    pub fn pushed(&mut self) {
        for m in &mut self.metrics {
            if let What::Collected(c) = &m.spec.what {
                if c.reset_after_push {
                    m.value = c.initial_value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `[[metric]]` sections as the configuration file does (each section, then together).
    fn load(text: &str) -> Result<Vec<MetricSpec>, String> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            metric: Vec<MetricSpec>,
        }
        let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
        check(&f.metric)?;
        Ok(f.metric)
    }

    fn engine(text: &str) -> Engine {
        Engine::new(load(text).unwrap_or_else(|e| panic!("{e}\n{text}")))
    }

    /// A family of the merged view: name, type, and series (label pairs, value).
    fn fam(name: &str, t: MetricType, series: Vec<(&[(&str, &str)], Value)>) -> SnapFamily {
        let names: Vec<&str> =
            series.first().map(|(l, _)| l.iter().map(|(k, _)| *k).collect()).unwrap_or_default();
        let v = if t == MetricType::Counter { ValueType::U64 } else { ValueType::F64 };
        SnapFamily {
            meta: FamilyMeta::own(name, "", t, v, &names),
            series: series.into_iter().map(|(l, v)| (LabelSet::shared(l), v)).collect(),
        }
    }

    /// The directory's families: a counter `req` with two routes, gauges `a` and `b`.
    fn merged(r0: u64, r1: u64, a: f64, b: f64) -> Snapshot {
        Snapshot {
            families: vec![
                fam(
                    "req",
                    MetricType::Counter,
                    vec![(&[("route", "/r0")], Value::U64(r0)), (&[("route", "/r1")], Value::U64(r1))],
                ),
                fam("a", MetricType::Gauge, vec![(&[], Value::F64(a))]),
                fam("b", MetricType::Gauge, vec![(&[], Value::F64(b))]),
            ],
        }
    }

    /// Sample selector → value, of every sample of `snap`, after `apply`.
    fn run(e: &mut Engine, mut snap: Snapshot, now: Instant) -> HashMap<String, f64> {
        e.apply(&mut snap, now);
        samples::flatten(&snap).into_iter().map(|s| (s.selector(), s.value)).collect()
    }

    fn type_of(e: &mut Engine, snap: Snapshot, now: Instant, family: &str) -> Option<MetricType> {
        let mut snap = snap;
        e.apply(&mut snap, now);
        snap.family(family).map(|f| f.meta.desc.metric_type)
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn sum_avg_and_multiplier_of_selected_series() {
        let mut e = engine(
            "[[metric]]\nname = \"all_requests_total\"\ncollector = \"sum\"\nchildren = [\"req_total\"]\n\
             [[metric]]\nname = \"mixed\"\ntype = \"gauge\"\ncollector = \"sum\"\ninitial_value = 100\n\
             children = ['req_total{route=\"/r1\"}', \"a\"]\n\
             [[metric]]\nname = \"mean\"\ntype = \"gauge\"\ncollector = \"avg\"\nchildren = [\"a\", \"b\"]\n\
             [[metric]]\nname = \"scaled\"\ntype = \"absolute\"\ncollector = \"multiplier\"\nfactor = 0.5\n\
             children = [\"req_total\", \"b\"]\n",
        );
        let got = run(&mut e, merged(3, 6, 22.0, 17.0), Instant::now());
        assert_eq!(got["all_requests_total"], 9.0);
        assert_eq!(got["mixed"], 100.0 + 6.0 + 22.0);
        // uWSGI's avg divides integers (19); ours is a float.
        assert_eq!(got["mean"], 19.5);
        assert_eq!(got["scaled"], (3.0 + 6.0 + 17.0) * 0.5);
        assert_eq!(e.absolute_names(), vec!["scaled".to_string()]);
        assert!(!got.keys().any(|k| k.starts_with(PROBLEMS)), "{got:?}");
    }

    #[test]
    fn types_as_exposed() {
        let mut e = engine(
            "[[metric]]\nname = \"c\"\ncollector = \"sum\"\nchildren = [\"a\"]\n\
             [[metric]]\nname = \"g\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"a\"]\n\
             [[metric]]\nname = \"abs\"\ntype = \"absolute\"\ncollector = \"sum\"\nchildren = [\"a\"]\n",
        );
        let now = Instant::now();
        assert_eq!(type_of(&mut e, merged(1, 1, 1.0, 1.0), now, "c"), Some(MetricType::Counter));
        assert_eq!(type_of(&mut e, merged(1, 1, 1.0, 1.0), now, "g"), Some(MetricType::Gauge));
        assert_eq!(type_of(&mut e, merged(1, 1, 1.0, 1.0), now, "abs"), Some(MetricType::Gauge));
    }

    #[test]
    fn the_accumulator_of_uwsgis_docs() {
        // Metrics.rst: children 22 and 17 give 39, then 26 and 30 are added: 95.
        let mut e = engine(
            "[[metric]]\nname = \"acc\"\ntype = \"gauge\"\ncollector = \"accumulator\"\nchildren = [\"a\", \"b\"]\n",
        );
        let t0 = Instant::now();
        assert_eq!(run(&mut e, merged(0, 0, 22.0, 17.0), t0)["acc"], 39.0);
        // Not due yet (freq_seconds = 1): the last value, the children not read.
        assert_eq!(run(&mut e, merged(0, 0, 26.0, 30.0), t0 + S / 2)["acc"], 39.0);
        assert_eq!(run(&mut e, merged(0, 0, 26.0, 30.0), t0 + S)["acc"], 95.0);
        // An initial value is added once, not at every round (as uWSGI would).
        let mut e = engine(
            "[[metric]]\nname = \"acc\"\ntype = \"gauge\"\ncollector = \"accumulator\"\ninitial_value = 5\n\
             freq_seconds = 2\nchildren = [\"a\"]\n",
        );
        assert_eq!(run(&mut e, merged(0, 0, 1.0, 0.0), t0)["acc"], 6.0);
        assert_eq!(run(&mut e, merged(0, 0, 1.0, 0.0), t0 + S)["acc"], 6.0);
        assert_eq!(run(&mut e, merged(0, 0, 1.0, 0.0), t0 + 2 * S)["acc"], 7.0);
        assert_eq!(run(&mut e, merged(0, 0, 1.0, 0.0), t0 + 4 * S)["acc"], 8.0);
    }

    #[test]
    fn derived_metrics_read_earlier_ones() {
        let mut e = engine(
            "[[metric]]\nname = \"base\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"a\", \"b\"]\n\
             [[metric]]\nname = \"twice\"\ntype = \"gauge\"\ncollector = \"multiplier\"\nfactor = 2\n\
             children = [\"base\"]\n\
             [[metric]]\nname = \"req_sum\"\ncollector = \"sum\"\nchildren = [\"req_total\"]\n\
             [[metric]]\nname = \"req_alias\"\ntype = \"alias\"\nalias = \"req_sum_total\"\n",
        );
        let got = run(&mut e, merged(1, 2, 3.0, 4.0), Instant::now());
        assert_eq!((got["base"], got["twice"]), (7.0, 14.0));
        assert_eq!((got["req_sum_total"], got["req_alias_total"]), (3.0, 3.0));
    }

    #[test]
    fn aliases_take_the_type_of_what_they_alias() {
        let mut e = engine(
            "[[metric]]\nname = \"r0\"\ntype = \"alias\"\nalias = 'req_total{route=\"/r0\"}'\n\
             [[metric]]\nname = \"bee\"\ntype = \"alias\"\nalias = \"b\"\n\
             [[metric]]\nname = \"ghost\"\ntype = \"alias\"\nalias = \"nothing_here\"\n",
        );
        let now = Instant::now();
        let got = run(&mut e, merged(5, 6, 1.0, 2.5), now);
        assert_eq!((got["r0_total"], got["bee"]), (5.0, 2.5));
        // Every merge: a new value at once, however often.
        let got = run(&mut e, merged(8, 6, 1.0, 3.5), now);
        assert_eq!((got["r0_total"], got["bee"]), (8.0, 3.5));
        assert_eq!(type_of(&mut e, merged(1, 1, 1.0, 1.0), now, "r0"), Some(MetricType::Counter));
        assert_eq!(type_of(&mut e, merged(1, 1, 1.0, 1.0), now, "bee"), Some(MetricType::Gauge));
        // An alias of nothing is not exposed, and is reported.
        assert!(!got.contains_key("ghost") && !got.contains_key("ghost_total"), "{got:?}");
        assert_eq!(got[r#"shmetrics_derived_problems{metric="ghost",problem="no_match"}"#], 1.0);
    }

    #[test]
    fn problems_last_while_they_last_and_nothing_is_lost() {
        let mut e = engine(
            "[[metric]]\nname = \"a\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"b\"]\n\
             [[metric]]\nname = \"s\"\ntype = \"gauge\"\ncollector = \"sum\"\n\
             children = [\"a\", 'req_total{route=\"/r9\"}']\n",
        );
        let t0 = Instant::now();
        let got = run(&mut e, merged(1, 1, 2.0, 3.0), t0);
        // The child that matches nothing adds nothing; the others still count.
        assert_eq!(got["s"], 2.0);
        assert_eq!(got[r#"shmetrics_derived_problems{metric="s",problem="no_match"}"#], 1.0);
        // `a` is a family of the directory: the derived `a` is not added (and `s` read the
        // directory's).
        assert_eq!(got["a"], 2.0);
        assert_eq!(got[r#"shmetrics_derived_problems{metric="a",problem="clash"}"#], 1.0);
        assert_eq!(e.metrics[1].logged, HashSet::from([Problem::NoMatch]));
        // The series appears: the problem is gone at the next collection.
        let mut snap = merged(1, 1, 2.0, 3.0);
        snap.families.push(fam("req", MetricType::Counter, vec![(&[("route", "/r9")], Value::U64(10))]));
        snap.families.retain(|f| f.meta.desc.name != "a");
        let got = run(&mut e, snap, t0 + S);
        assert_eq!(got["a"], 3.0, "no clash any more");
        assert_eq!(got["s"], 3.0 + 10.0, "{got:?}");
        assert!(!got.keys().any(|k| k.starts_with(PROBLEMS)), "{got:?}");
    }

    #[test]
    fn problems_name_the_metric_as_written() {
        let mut e = engine("[[metric]]\nname = \"errs_total\"\ncollector = \"sum\"\nchildren = [\"nope\"]\n");
        let got = run(&mut e, merged(0, 0, 0.0, 0.0), Instant::now());
        assert_eq!(got["errs_total"], 0.0);
        assert_eq!(got[r#"shmetrics_derived_problems{metric="errs_total",problem="no_match"}"#], 1.0);
    }

    #[test]
    fn not_finite_values_are_left_out() {
        let mut e = engine(
            "[[metric]]\nname = \"s\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"a\", \"b\"]\n",
        );
        let got = run(&mut e, merged(0, 0, f64::NAN, 2.0), Instant::now());
        assert_eq!(got["s"], 2.0);
        assert_eq!(got[r#"shmetrics_derived_problems{metric="s",problem="not_finite"}"#], 1.0);
    }

    fn file_metric(path: &Path, split: usize) -> Engine {
        engine(&format!(
            "[[metric]]\nname = \"f\"\ntype = \"gauge\"\ncollector = \"file\"\npath = {:?}\nsplit = {split}\n\
             initial_value = 1\n",
            path.display().to_string()
        ))
    }

    #[test]
    fn the_file_collector() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("value");
        std::fs::write(&path, b"  12\t3.5\r\n\0\0words 7").expect("write");
        let t0 = Instant::now();
        let got = |e: &mut Engine, at| run(e, Snapshot::default(), at);
        assert_eq!(got(&mut file_metric(&path, 0), t0)["f"], 13.0);
        assert_eq!(got(&mut file_metric(&path, 1), t0)["f"], 4.5);
        assert_eq!(got(&mut file_metric(&path, 3), t0)["f"], 8.0);
        // A word, a missing token, a missing file: reported, the last value kept.
        let mut e = file_metric(&path, 2);
        let r = got(&mut e, t0);
        assert_eq!(r["f"], 1.0, "the initial value until a number is read");
        assert_eq!(r[r#"shmetrics_derived_problems{metric="f",problem="not_a_number"}"#], 1.0);
        let mut e = file_metric(&path, 1);
        assert_eq!(got(&mut e, t0)["f"], 4.5);
        std::fs::write(&path, b"1\n").expect("write");
        let r = got(&mut e, t0 + S);
        assert_eq!(r["f"], 4.5);
        assert_eq!(r[r#"shmetrics_derived_problems{metric="f",problem="no_token"}"#], 1.0);
        std::fs::remove_file(&path).expect("rm");
        let r = got(&mut e, t0 + 2 * S);
        assert_eq!(r["f"], 4.5);
        assert_eq!(r[r#"shmetrics_derived_problems{metric="f",problem="unreadable"}"#], 1.0);
        // Only the first 4096 bytes are read.
        let mut long = vec![b'1'; FILE_BYTES - 1];
        long.extend_from_slice(b" 2");
        std::fs::write(&path, &long).expect("write");
        let r = got(&mut e, t0 + 3 * S);
        assert_eq!(r["f"], 4.5);
        assert_eq!(r[r#"shmetrics_derived_problems{metric="f",problem="no_token"}"#], 1.0);
        // A link is not followed, a FIFO not opened for reading (it would block).
        std::fs::write(tmp.path().join("target"), b"5").expect("write");
        std::os::unix::fs::symlink(tmp.path().join("target"), tmp.path().join("link")).expect("symlink");
        let (p, why) = read_token(&tmp.path().join("link"), 0).expect_err("link");
        assert_eq!(
            (p, why.ends_with("is a symbolic link (not followed)")),
            (Problem::Unreadable, true),
            "{why}"
        );
        nix::unistd::mkfifo(&tmp.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let (p, why) = read_token(&tmp.path().join("fifo"), 0).expect_err("fifo");
        assert_eq!((p, why.ends_with("is not a regular file")), (Problem::Unreadable, true), "{why}");
    }

    #[test]
    fn proc_loadavg_is_read_as_floats() {
        // /proc/loadavg as the kernel writes it: uWSGI's strtoll would make 0.58 a 0.
        let text = b"0.58 0.42 0.37 1/234 5678\n";
        assert_eq!(token(text, 0), Ok(0.58));
        assert_eq!(token(text, 2), Ok(0.37));
        assert_eq!(token(text, 4), Ok(5678.0));
        assert_eq!(token(text, 3).map_err(|e| e.0), Err(Problem::NotANumber));
        assert_eq!(token(text, 5).map_err(|e| e.0), Err(Problem::NoToken));
        // The real file: the same token as its text shows (read again if it changed in between).
        let (value, first) = loop {
            let before = std::fs::read_to_string("/proc/loadavg").expect("/proc/loadavg");
            let v = read_token(Path::new("/proc/loadavg"), 1).expect("loadavg");
            if std::fs::read_to_string("/proc/loadavg").expect("again") == before {
                break (v, before);
            }
        };
        let want: f64 = first.split_whitespace().nth(1).and_then(|t| t.parse().ok()).expect("5 min load");
        assert_eq!(value, want);
    }

    #[test]
    fn reload_keeps_the_state_of_unchanged_metrics() {
        let acc =
            "[[metric]]\nname = \"acc\"\ntype = \"gauge\"\ncollector = \"accumulator\"\ninitial_value = 1\n\
                   children = [\"a\"]\n";
        let mut e = engine(acc);
        let t0 = Instant::now();
        run(&mut e, merged(0, 0, 10.0, 0.0), t0);
        assert_eq!(run(&mut e, merged(0, 0, 10.0, 0.0), t0 + S)["acc"], 21.0);
        let added = format!("{acc}[[metric]]\nname = \"new\"\ntype = \"gauge\"\ncollector = \"sum\"\ninitial_value = 3\nchildren = [\"b\"]\n");
        e.reload(load(&added).expect("reload"));
        // Unchanged: the value and the next collection are kept (not due before t0 + 2 s).
        let got = run(&mut e, merged(0, 0, 10.0, 2.0), t0 + S + S / 2);
        assert_eq!((got["acc"], got["new"]), (21.0, 5.0));
        assert_eq!(run(&mut e, merged(0, 0, 10.0, 2.0), t0 + 2 * S)["acc"], 31.0);
        // Changed: starts again from its initial value.
        e.reload(load(&added.replace("initial_value = 1", "initial_value = 2")).expect("reload"));
        assert_eq!(run(&mut e, merged(0, 0, 10.0, 2.0), t0 + 2 * S)["acc"], 12.0);
        e.reload(Vec::new());
        assert!(e.is_empty());
        let mut snap = merged(0, 0, 1.0, 1.0);
        e.apply(&mut snap, t0);
        assert_eq!(snap.families.len(), 3);
    }

    #[test]
    fn reset_after_push() {
        let mut e = engine(
            "[[metric]]\nname = \"acc\"\ntype = \"gauge\"\ncollector = \"accumulator\"\ninitial_value = 1\n\
             reset_after_push = true\nchildren = [\"a\"]\n\
             [[metric]]\nname = \"kept\"\ntype = \"gauge\"\ncollector = \"accumulator\"\nchildren = [\"a\"]\n",
        );
        let t0 = Instant::now();
        run(&mut e, merged(0, 0, 4.0, 0.0), t0);
        let got = run(&mut e, merged(0, 0, 4.0, 0.0), t0 + S);
        assert_eq!((got["acc"], got["kept"]), (9.0, 8.0));
        e.pushed();
        let got = run(&mut e, merged(0, 0, 4.0, 0.0), t0 + S);
        assert_eq!((got["acc"], got["kept"]), (1.0, 8.0), "until the next collection");
        let got = run(&mut e, merged(0, 0, 4.0, 0.0), t0 + 2 * S);
        assert_eq!((got["acc"], got["kept"]), (5.0, 12.0));
    }

    #[test]
    fn counter_names_lose_total_and_histogram_samples_can_be_children() {
        let mut h = LabelSet::new(vec![("route".into(), "/h0".into())]);
        h.bounds = vec![0.5];
        let desc = FamilyMeta::own("lat", "", MetricType::Histogram, ValueType::F64, &["route"]);
        let snap = Snapshot {
            families: vec![SnapFamily {
                meta: desc,
                series: vec![(Arc::new(h), Value::Hist { buckets: vec![2, 3], sum: 1.25 })],
            }],
        };
        let mut e = engine(
            "[[metric]]\nname = \"obs_total\"\ncollector = \"sum\"\nchildren = [\"lat_count\"]\n\
             [[metric]]\nname = \"slow\"\ntype = \"gauge\"\ncollector = \"sum\"\n\
             children = ['lat_bucket{le=\"+Inf\"}', \"lat_sum\"]\n",
        );
        assert_eq!(e.metrics[0].spec.name, "obs");
        let got = run(&mut e, snap, Instant::now());
        assert_eq!((got["obs_total"], got["slow"]), (5.0, 6.25));
    }

    /// The error of a file with one `[[metric]]` section (`{}`).
    fn error(section: &str) -> String {
        match load(&format!("[[metric]]\n{section}")) {
            Ok(s) => panic!("accepted: {s:?}\n{section}"),
            Err(e) => e,
        }
    }

    #[test]
    fn mistakes_are_refused_at_load_naming_the_metric_and_the_key() {
        let sum = "collector = \"sum\"\nchildren = [\"a\"]\n";
        let cases: Vec<(String, &str)> = vec![
            ("name = \"x\"\ntype = \"alias\"\nalias = \"a\"\ncollector = \"sum\"\n".into(),
             "[[metric]] \"x\": type = \"alias\" takes no collector: an alias only renames the series of alias = \"…\" (remove collector)"),
            ("name = \"x\"\ntype = \"alias\"\nalias = \"a\"\nfreq_seconds = 2\n".into(),
             "[[metric]] \"x\": type = \"alias\" takes no freq_seconds: an alias only renames the series of alias = \"…\" (remove freq_seconds)"),
            ("name = \"x\"\ntype = \"alias\"\n".into(),
             "[[metric]] \"x\": type = \"alias\" needs alias = \"<series>\" (name or name{label=\"value\"})"),
            (format!("name = \"x\"\nalias = \"a\"\n{sum}"),
             "[[metric]] \"x\": alias = \"…\" needs type = \"alias\" (remove alias, or set the type)"),
            ("name = \"x\"\ncollector = \"file\"\n".into(),
             "[[metric]] \"x\": collector = \"file\" needs path = \"/absolute/path\""),
            ("name = \"x\"\ncollector = \"file\"\npath = \"loadavg\"\n".into(),
             "[[metric]] \"x\": path = \"loadavg\" is relative: write an absolute path"),
            ("name = \"x\"\ncollector = \"file\"\npath = \"/proc/loadavg\"\nsplit = -1\n".into(),
             "[[metric]] \"x\": split = -1 is not allowed: write the 0-based index of the token (0, 1, 2, …)"),
            ("name = \"x\"\ncollector = \"file\"\npath = \"/proc/loadavg\"\nchildren = [\"a\"]\n".into(),
             "[[metric]] \"x\": collector = \"file\" takes no children (remove children)"),
            ("name = \"x\"\ncollector = \"sum\"\n".into(),
             "[[metric]] \"x\": collector = \"sum\" needs children = [\"<series>\", …] (name or name{label=\"value\"})"),
            ("name = \"x\"\ncollector = \"avg\"\nchildren = []\n".into(),
             "[[metric]] \"x\": collector = \"avg\" needs children = [\"<series>\", …] (name or name{label=\"value\"})"),
            ("name = \"x\"\ncollector = \"sum\"\nchildren = [\"a{b=c}\"]\n".into(),
             "[[metric]] \"x\": children has \"a{b=c}\": write name or name{label=\"value\"}"),
            ("name = \"x\"\ncollector = \"multiplier\"\nchildren = [\"a\"]\n".into(),
             "[[metric]] \"x\": collector = \"multiplier\" needs factor = <number>"),
            (format!("name = \"x\"\nfactor = 2.0\n{sum}"),
             "[[metric]] \"x\": collector = \"sum\" takes no factor (remove factor)"),
            ("name = \"x\"\ncollector = \"multiplier\"\nfactor = nan\nchildren = [\"a\"]\n".into(),
             "[[metric]] \"x\": factor = nan is not allowed: write a finite number"),
            (format!("name = \"x\"\ninitial_value = inf\n{sum}"),
             "[[metric]] \"x\": initial_value = inf is not allowed: write a finite number"),
            (format!("name = \"x\"\nfreq_seconds = 0\n{sum}"),
             "[[metric]] \"x\": freq_seconds = 0 is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)"),
            (format!("name = \"x\"\nfreq_seconds = -inf\n{sum}"),
             "[[metric]] \"x\": freq_seconds = -inf is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)"),
            ("name = \"x\"\n".into(),
             "[[metric]] \"x\": collector is missing: write collector = \"file\", \"sum\", \"avg\", \"accumulator\" or \"multiplier\" (or type = \"alias\" with alias = \"…\")"),
            (format!("name = \"x\"\ntype = \"meter\"\n{sum}"),
             "[[metric]] \"x\": type = \"meter\" is not allowed: write counter, gauge, absolute or alias"),
            ("name = \"x\"\ncollector = \"func\"\n".into(),
             "[[metric]] \"x\": collector = \"func\" is not allowed: write file, sum, avg, accumulator or multiplier"),
            (format!("name = \"worker.0.requests\"\n{sum}"),
             "[[metric]] \"worker.0.requests\": name = \"worker.0.requests\" is not a Prometheus metric name: write letters, digits, _ and : ([a-zA-Z_:][a-zA-Z0-9_:]*; uWSGI's dots and dashes become underscores)"),
            (format!("name = \"shmetrics_mine\"\n{sum}"),
             "[[metric]] \"shmetrics_mine\": name = \"shmetrics_mine\": names starting with shmetrics_ are the aggregator's own; pick another"),
            (format!("name = \"x\"\n{sum}[[metric]]\nname = \"x_total\"\n{sum}"),
             "[[metric]] \"x_total\": name clashes with [[metric]] \"x\" before it: give each metric its own name"),
            (format!("name = \"x\"\ntype = \"gauge\"\n{sum}[[metric]]\nname = \"x\"\ntype = \"alias\"\nalias = \"b\"\n"),
             "[[metric]] \"x\": name clashes with [[metric]] \"x\" before it: give each metric its own name"),
            ("name = \"x\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"y\"]\n[[metric]]\nname = \"y\"\ntype = \"gauge\"\ncollector = \"sum\"\nchildren = [\"a\"]\n".into(),
             "[[metric]] \"x\": children has \"y\", which is [[metric]] \"y\", defined after it: a derived metric can read only the [[metric]] sections before it in the file"),
            ("name = \"x\"\ncollector = \"accumulator\"\nchildren = [\"x_total\"]\n".into(),
             "[[metric]] \"x\": children has \"x_total\", which is itself: a derived metric can read only the [[metric]] sections before it in the file"),
        ];
        for (section, want) in cases {
            assert_eq!(error(&section), want, "{section}");
        }
        // Mistakes toml finds name the key too.
        let e = error("name = \"x\"\ncolector = \"sum\"\n");
        assert!(e.contains("unknown field `colector`"), "{e}");
        // Gauges keep a _total they were given; a collected counter's family loses it.
        let specs = load(&format!(
            "[[metric]]\nname = \"g_total\"\ntype = \"gauge\"\n{sum}[[metric]]\nname = \"c_total\"\n{sum}"
        ))
        .expect("specs");
        assert_eq!((specs[0].name.as_str(), specs[1].name.as_str()), ("g_total", "c"));
        let spec = &specs[1];
        assert_eq!(spec.help, "Derived ([[metric]]): sum of a.");
        assert_eq!(
            spec.what,
            What::Collected(Collected {
                kind: Kind::Counter,
                collector: Collector::Sum(vec![Child {
                    text: "a".into(),
                    sel: Selector { name: "a".into(), labels: Vec::new() }
                }]),
                freq: S,
                initial_value: 0.0,
                reset_after_push: false,
            })
        );
    }
}
