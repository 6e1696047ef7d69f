//! The on-disk format of a shmetrics file, version 1 — the code form of `shm-layout.md`.
//!
//! Every other module goes through this one to touch a mapping, so the format lives in one place and
//! the crate's `unsafe` code lives in one file ([`region`]; the writer's store calls its `unsafe fn`s
//! and says at each call why their contracts hold). Writers and readers in other languages work
//! from `shm-layout.md`; the constants below are named after its fields, and the tests in
//! `tests/it/layout_doc.rs` check the worked example of that document byte for byte.
//!
//! A file is a 4096-byte header followed by an append-only log of 8-byte aligned records. Records
//! are immutable once published except for their value slots, which are 8-byte atomics. A writer
//! publishes a record by writing it completely and then storing the new end of the log into the
//! header's `used` field with release ordering; a reader loads `used` with acquire ordering and never
//! looks past it, so it never sees half a record.

pub mod region;

use crate::error::Error;

/// The 8 magic bytes at offset 0 of every file.
pub const MAGIC: [u8; 8] = *b"SHMETRIC";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header; the first record starts here.
pub const HEADER_SIZE: u64 = 4096;

/// Header field offsets (bytes from the start of the file). All fields are little-endian.
pub mod header {
    /// `[u8; 8]` — [`super::MAGIC`].
    pub const MAGIC: u64 = 0;
    /// `u32` — format version.
    pub const VERSION: u64 = 8;
    /// `u32` — header size, 4096.
    pub const HEADER_SIZE: u64 = 12;
    /// `u64`, atomic — end of the published record log (release/acquire).
    pub const USED: u64 = 16;
    /// `u64`, atomic — state flags, see [`super::flags`].
    pub const FLAGS: u64 = 24;
    /// `u64` — the writer's pid, as seen in its own pid namespace.
    pub const PID: u64 = 32;
    /// `u64` — unix time in nanoseconds when the writer created the file.
    pub const START_TIME_NS: u64 = 40;
    /// `[u8; 16]` — random file id; also in the file name.
    pub const FILE_ID: u64 = 48;
    /// `u64`, atomic — series the writer could not register (file or disk full).
    pub const DROPPED_SERIES: u64 = 64;
    /// `u64`, atomic — updates the writer dropped because their series had no room.
    pub const DROPPED_UPDATES: u64 = 72;
    /// `u64` — bytes of address space the writer maps; the file never grows past it.
    pub const RESERVE: u64 = 80;
    /// `u64` — pid of the process this one was forked from, 0 if none.
    pub const PARENT_PID: u64 = 88;
    /// `u64`, atomic — forked children that could not create a file of their own and write into
    /// this one (`shm-layout.md` section 9.4). Zero in files of writers that predate the field.
    pub const SHARED_FORKS: u64 = 96;
    /// First byte past the defined fields; the rest of the header is zero.
    pub const END: u64 = 104;
}

/// Bits of the header's `flags` word.
pub mod flags {
    /// The writer declared itself ready to serve (readiness, health checks).
    pub const READY: u64 = 1;
    /// The writer exited through a normal process exit (not killed, not crashed).
    pub const CLEAN_EXIT: u64 = 2;
}

/// Record kinds (the `kind` field of a record header).
pub mod kind {
    /// Describes a metric: name, help, type, label names, buckets, gauge mode.
    pub const METRIC: u16 = 1;
    /// One labelled series of a metric, with its value slots.
    pub const SERIES: u16 = 2;
    /// Describes a metric of a type added in document revision 3 (summary, info, enum): the
    /// layout of [`METRIC`], with its own id sequence. Older readers skip it by its length.
    pub const TYPED_METRIC: u16 = 3;
    /// One series of a [`TYPED_METRIC`]: the layout of [`SERIES`]; `metric_id` is a kind-3 id.
    pub const TYPED_SERIES: u16 = 4;
}

/// Size of the common record header: `u32 len`, `u16 kind`, `u16 reserved`.
pub const RECORD_HEADER: usize = 8;
/// Size of the fixed part of a METRIC record before its strings.
pub const METRIC_FIXED: usize = 24;
/// Size of the fixed part of a SERIES record before its label values.
pub const SERIES_FIXED: usize = 24;
/// Longest name, help text or label value a record may hold.
pub const MAX_STRING: usize = 64 * 1024;
/// Most labels a metric may have.
pub const MAX_LABELS: usize = 64;
/// Most finite histogram bucket bounds.
pub const MAX_BUCKETS: usize = 512;
/// Most states of an enum (stored in the `n_buckets` field of its TYPED_METRIC record).
pub const MAX_STATES: usize = 512;

/// What kind of metric a METRIC record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// Monotonic counter.
    Counter,
    /// Gauge; merged across processes by its [`GaugeMode`].
    Gauge,
    /// Histogram with fixed bucket bounds.
    Histogram,
    /// Summary: count and sum of observations (no quantiles: they cannot be merged). In a
    /// shmetrics file, a TYPED_METRIC record; also read from Python prometheus_client files.
    Summary,
    /// Info: a set of key/value pairs, exposed as the labels of `<name>_info 1`. The value written
    /// last by a live process wins.
    Info,
    /// Enum (OpenMetrics stateset): one of a fixed list of states. The state set last by a live
    /// process wins.
    Enum,
}

impl MetricType {
    fn code(self) -> u8 {
        match self {
            MetricType::Counter => 1,
            MetricType::Gauge => 2,
            MetricType::Histogram => 3,
            MetricType::Summary => 4,
            MetricType::Info => 5,
            MetricType::Enum => 6,
        }
    }
    /// The type of code `c` in a record of kind METRIC (`typed` false) or TYPED_METRIC (true).
    fn from_code(c: u8, typed: bool) -> Option<Self> {
        let t = match c {
            1 => MetricType::Counter,
            2 => MetricType::Gauge,
            3 => MetricType::Histogram,
            4 => MetricType::Summary,
            5 => MetricType::Info,
            6 => MetricType::Enum,
            _ => return None,
        };
        (t.is_typed() == typed).then_some(t)
    }
    /// Whether the type is stored in TYPED_METRIC / TYPED_SERIES records (kinds 3 and 4), which
    /// readers of document revision 2 skip, rather than METRIC / SERIES (kinds 1 and 2).
    pub fn is_typed(self) -> bool {
        matches!(self, MetricType::Summary | MetricType::Info | MetricType::Enum)
    }
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::Summary => "summary",
            MetricType::Info => "info",
            MetricType::Enum => "stateset",
        }
    }
    /// The `# TYPE` word in the Prometheus text format 0.0.4, which has no info or stateset:
    /// those are gauges there (as prometheus_client writes them).
    pub fn as_str_004(self) -> &'static str {
        match self {
            MetricType::Info | MetricType::Enum => "gauge",
            t => t.as_str(),
        }
    }
    /// Parses [`MetricType::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        [
            MetricType::Counter,
            MetricType::Gauge,
            MetricType::Histogram,
            MetricType::Summary,
            MetricType::Info,
            MetricType::Enum,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// How a slot's 8 bytes are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE 754 double, stored as its bit pattern.
    F64,
}

/// How a gauge is merged across processes.
///
/// The `Live*` modes drop the values of processes that are no longer alive; the others keep the
/// last value a dead process wrote (folded into the aggregator's archive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GaugeMode {
    /// Sum over all processes, dead ones included.
    Sum,
    /// Maximum over all processes, dead ones included.
    Max,
    /// Minimum over all processes, dead ones included.
    Min,
    /// The value written last (by wall-clock time) by any process, dead ones included.
    MostRecent,
    /// One series per process, labelled `pid`, dead ones included.
    All,
    /// Sum over live processes.
    LiveSum,
    /// Maximum over live processes.
    LiveMax,
    /// Minimum over live processes.
    LiveMin,
    /// The value written last by a live process.
    LiveMostRecent,
    /// One series per live process, labelled `pid`.
    LiveAll,
}

impl GaugeMode {
    /// Every mode, in code order.
    pub const ALL: [GaugeMode; 10] = [
        GaugeMode::Sum,
        GaugeMode::Max,
        GaugeMode::Min,
        GaugeMode::MostRecent,
        GaugeMode::All,
        GaugeMode::LiveSum,
        GaugeMode::LiveMax,
        GaugeMode::LiveMin,
        GaugeMode::LiveMostRecent,
        GaugeMode::LiveAll,
    ];

    /// The code stored in a METRIC record (1-based; 0 means "not a gauge").
    pub fn code(self) -> u8 {
        // The position in ALL is the code minus one; ALL has 10 entries, so this fits in u8.
        GaugeMode::ALL.iter().position(|m| *m == self).map_or(0, |i| i as u8 + 1)
    }
    fn from_code(c: u8) -> Option<Self> {
        GaugeMode::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }
    /// The name used in documentation, configuration and Python's file names (`livesum`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            GaugeMode::Sum => "sum",
            GaugeMode::Max => "max",
            GaugeMode::Min => "min",
            GaugeMode::MostRecent => "mostrecent",
            GaugeMode::All => "all",
            GaugeMode::LiveSum => "livesum",
            GaugeMode::LiveMax => "livemax",
            GaugeMode::LiveMin => "livemin",
            GaugeMode::LiveMostRecent => "livemostrecent",
            GaugeMode::LiveAll => "liveall",
        }
    }
    /// Parses [`GaugeMode::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        GaugeMode::ALL.iter().copied().find(|m| m.as_str() == s)
    }
    /// Whether dead processes' values are dropped.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            GaugeMode::LiveSum
                | GaugeMode::LiveMax
                | GaugeMode::LiveMin
                | GaugeMode::LiveMostRecent
                | GaugeMode::LiveAll
        )
    }
    /// The same merge without the liveness rule (`LiveSum` → `Sum`, …).
    pub(crate) fn base(self) -> GaugeMode {
        match self {
            GaugeMode::LiveSum => GaugeMode::Sum,
            GaugeMode::LiveMax => GaugeMode::Max,
            GaugeMode::LiveMin => GaugeMode::Min,
            GaugeMode::LiveMostRecent => GaugeMode::MostRecent,
            GaugeMode::LiveAll => GaugeMode::All,
            m => m,
        }
    }
    /// Whether each value carries a timestamp slot.
    pub fn has_timestamp(self) -> bool {
        self.base() == GaugeMode::MostRecent
    }
    /// Whether merged series get a `pid` label.
    pub(crate) fn per_process(self) -> bool {
        self.base() == GaugeMode::All
    }
}

/// Everything a METRIC record says about a metric.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricDesc {
    /// Metric name. For counters, without the `_total` suffix (the encoders add it).
    pub name: String,
    /// Help text.
    pub help: String,
    /// Counter, gauge or histogram.
    pub metric_type: MetricType,
    /// Slot interpretation for counters (gauges and histogram sums are always f64).
    pub value_type: ValueType,
    /// Merge mode; `Some` exactly for gauges.
    pub gauge_mode: Option<GaugeMode>,
    /// Label names, in order.
    pub label_names: Vec<String>,
    /// Finite histogram bucket upper bounds, strictly increasing; empty for other types.
    pub buckets: Vec<f64>,
    /// The states of an enum, in index order (at least one, unique, non-empty); empty for other
    /// types. The label that carries them is named like the metric.
    pub states: Vec<String>,
}

impl MetricDesc {
    /// The name its plain samples are exposed under: a counter's gets `_total` (the name stored
    /// in files has none), every other type's is the name itself.
    pub fn sample_name(&self) -> std::borrow::Cow<'_, str> {
        match self.metric_type {
            MetricType::Counter => format!("{}_total", self.name).into(),
            MetricType::Info => format!("{}_info", self.name).into(),
            _ => self.name.as_str().into(),
        }
    }

    /// Whether the values of dead writers are dropped rather than archived: `live*` gauges, info
    /// and enum.
    pub fn drops_dead(&self) -> bool {
        self.gauge_mode.is_some_and(GaugeMode::is_live)
            || matches!(self.metric_type, MetricType::Info | MetricType::Enum)
    }

    /// Number of 8-byte value slots each series of this metric has.
    ///
    /// Counter: 1. Gauge: 1, or 2 (value, then timestamp in unix ns) for the most-recent modes.
    /// Histogram: one non-cumulative count per bucket including `+Inf`, then the f64 sum.
    /// Summary: u64 count, f64 sum. Info: unix ns of the last `set` that chose this series' value.
    /// Enum: u64 state index, unix ns of the last set.
    pub(crate) fn slots(&self) -> usize {
        match self.metric_type {
            MetricType::Counter => 1,
            MetricType::Gauge => {
                if self.gauge_mode.is_some_and(GaugeMode::has_timestamp) {
                    2
                } else {
                    1
                }
            }
            MetricType::Histogram => self.buckets.len() + 2,
            MetricType::Summary | MetricType::Enum => 2,
            MetricType::Info => 1,
        }
    }
}

/// Checks a metric name against Prometheus' rules (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub(crate) fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Checks a label name against Prometheus' rules (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting `__`).
pub(crate) fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Rounds `n` up to a multiple of 8.
pub(crate) fn align8(n: usize) -> usize {
    (n + 7) & !7
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Lengths are bounded by MAX_STRING at validation time, so the cast cannot truncate.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad8(out: &mut Vec<u8>) {
    out.resize(align8(out.len()), 0);
}

fn finish_record(mut out: Vec<u8>) -> Vec<u8> {
    pad8(&mut out);
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Encodes a METRIC record with the given id.
pub(crate) fn encode_metric(id: u32, d: &MetricDesc) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + d.name.len() + d.help.len());
    out.extend_from_slice(&0u32.to_le_bytes()); // len, patched by finish_record
    let k = if d.metric_type.is_typed() { kind::TYPED_METRIC } else { kind::METRIC };
    out.extend_from_slice(&k.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.push(d.metric_type.code());
    out.push(match d.value_type {
        ValueType::U64 => 0,
        ValueType::F64 => 1,
    });
    out.push(d.gauge_mode.map_or(0, GaugeMode::code));
    out.push(0);
    out.extend_from_slice(&(d.label_names.len() as u16).to_le_bytes());
    // `n_buckets`: the bounds of a histogram, the states of an enum (never both).
    out.extend_from_slice(&((d.buckets.len() + d.states.len()) as u16).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(out.len(), METRIC_FIXED);
    put_str(&mut out, &d.name);
    put_str(&mut out, &d.help);
    for l in d.label_names.iter().chain(&d.states) {
        put_str(&mut out, l);
    }
    pad8(&mut out);
    for b in &d.buckets {
        out.extend_from_slice(&b.to_le_bytes());
    }
    finish_record(out)
}

/// Encodes a SERIES record (a TYPED_SERIES record if `typed`) of metric `metric_id` with `slots`
/// zeroed value slots.
///
/// Returns the record and the offset of its first slot relative to the record start.
pub(crate) fn encode_series(
    typed: bool,
    metric_id: u32,
    label_values: &[&str],
    slots: usize,
) -> (Vec<u8>, usize) {
    let strings: usize = label_values.iter().map(|v| 4 + v.len()).sum();
    let slots_offset = align8(SERIES_FIXED + strings);
    let mut out = Vec::with_capacity(slots_offset + 8 * slots);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(if typed { kind::TYPED_SERIES } else { kind::SERIES }).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&metric_id.to_le_bytes());
    out.extend_from_slice(&(slots as u32).to_le_bytes());
    out.extend_from_slice(&(slots_offset as u32).to_le_bytes());
    out.extend_from_slice(&(label_values.len() as u32).to_le_bytes());
    debug_assert_eq!(out.len(), SERIES_FIXED);
    for v in label_values {
        put_str(&mut out, v);
    }
    pad8(&mut out);
    out.resize(slots_offset + 8 * slots, 0);
    (finish_record(out), slots_offset)
}

/// A record decoded from the log.
#[derive(Debug, PartialEq)]
pub enum Record {
    /// A METRIC record, or a TYPED_METRIC record (then `desc.metric_type.is_typed()`).
    Metric {
        /// Its id: the number of records of its kind before it.
        id: u32,
        /// What it describes.
        desc: MetricDesc,
    },
    /// A SERIES record.
    Series {
        /// The METRIC record it belongs to.
        metric_id: u32,
        /// Label values, one per label name of the metric.
        label_values: Vec<String>,
        /// Number of value slots.
        slots: u32,
        /// Offset of the first slot from the record start.
        slots_offset: u32,
    },
    /// A TYPED_SERIES record: the fields of [`Record::Series`], `metric_id` a TYPED_METRIC id.
    /// An info series' `label_values` are the metric's label values followed by its key/value
    /// pairs.
    TypedSeries {
        /// The TYPED_METRIC record it belongs to.
        metric_id: u32,
        /// Label values, then (info) the keys and values of its pairs.
        label_values: Vec<String>,
        /// Number of value slots.
        slots: u32,
        /// Offset of the first slot from the record start.
        slots_offset: u32,
    },
    /// A record of a kind this version does not know; skipped by its length (forward compatibility).
    Unknown,
}

/// A cursor over untrusted record bytes: every read is bounds-checked and reports corruption.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| corrupt("a field runs past the end of its record"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn f64(&mut self) -> Result<f64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, Error> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(corrupt("a string is longer than 64 KiB"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("a string is not valid UTF-8"))
    }
    fn align8(&mut self) {
        self.pos = align8(self.pos);
    }
}

fn corrupt(what: &str) -> Error {
    Error::Corrupt(what.to_string())
}

/// Reads the `len` field of the record starting at `buf[0]`, checking it is usable.
pub fn record_len(buf: &[u8]) -> Result<usize, Error> {
    if buf.len() < RECORD_HEADER {
        return Err(corrupt("a record header runs past `used`"));
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len < RECORD_HEADER || !len.is_multiple_of(8) || len > buf.len() {
        return Err(corrupt("a record length is not a multiple of 8 inside `used`"));
    }
    Ok(len)
}

/// Decodes one record; `buf` must be exactly the record (`record_len` bytes).
///
/// Slot bytes are never interpreted here, so `buf` may be a copy taken while slots were changing.
pub fn decode_record(buf: &[u8]) -> Result<Record, Error> {
    let mut c = Cursor { buf, pos: 4 };
    let kind = c.u16()?;
    let _reserved = c.u16()?;
    match kind {
        kind::METRIC | kind::TYPED_METRIC => {
            let id = c.u32()?;
            let metric_type = MetricType::from_code(c.u8()?, kind == kind::TYPED_METRIC)
                .ok_or_else(|| corrupt("unknown metric type"))?;
            let value_type = match c.u8()? {
                0 => ValueType::U64,
                1 => ValueType::F64,
                _ => return Err(corrupt("unknown value type")),
            };
            let mode = c.u8()?;
            let _ = c.u8()?;
            let n_labels = c.u16()? as usize;
            let n_buckets = c.u16()? as usize;
            let _ = c.u32()?;
            if n_labels > MAX_LABELS || n_buckets > MAX_BUCKETS {
                return Err(corrupt("too many labels or buckets"));
            }
            let gauge_mode = match (metric_type, mode) {
                (MetricType::Gauge, m) => {
                    Some(GaugeMode::from_code(m).ok_or_else(|| corrupt("unknown gauge mode"))?)
                }
                (_, 0) => None,
                _ => return Err(corrupt("gauge mode on a metric that is not a gauge")),
            };
            let name = c.string()?;
            let help = c.string()?;
            let mut label_names = Vec::with_capacity(n_labels);
            for _ in 0..n_labels {
                label_names.push(c.string()?);
            }
            // An enum's `n_buckets` counts its states, stored as strings after the label names.
            let is_enum = metric_type == MetricType::Enum;
            let mut states = Vec::with_capacity(if is_enum { n_buckets } else { 0 });
            for _ in 0..if is_enum { n_buckets } else { 0 } {
                states.push(c.string()?);
            }
            c.align8();
            let mut buckets = Vec::with_capacity(if is_enum { 0 } else { n_buckets });
            for _ in 0..if is_enum { 0 } else { n_buckets } {
                buckets.push(c.f64()?);
            }
            let desc =
                MetricDesc { name, help, metric_type, value_type, gauge_mode, label_names, buckets, states };
            validate_desc(&desc)?;
            Ok(Record::Metric { id, desc })
        }
        kind::SERIES | kind::TYPED_SERIES => {
            let metric_id = c.u32()?;
            let slots = c.u32()?;
            let slots_offset = c.u32()?;
            let n_values = c.u32()? as usize;
            // An info series holds its label values and up to MAX_LABELS key/value strings more.
            let most = if kind == kind::SERIES { MAX_LABELS } else { 2 * MAX_LABELS };
            if n_values > most {
                return Err(corrupt("too many label values"));
            }
            let mut label_values = Vec::with_capacity(n_values);
            for _ in 0..n_values {
                label_values.push(c.string()?);
            }
            let end = (slots_offset as usize).checked_add(8 * slots as usize);
            if slots_offset % 8 != 0
                || align8(c.pos) != slots_offset as usize
                || end.is_none_or(|e| e > buf.len())
            {
                return Err(corrupt("value slots run past the end of their record"));
            }
            Ok(if kind == kind::SERIES {
                Record::Series { metric_id, label_values, slots, slots_offset }
            } else {
                Record::TypedSeries { metric_id, label_values, slots, slots_offset }
            })
        }
        _ => Ok(Record::Unknown),
    }
}

/// Checks the invariants of a metric description (names, label names, buckets, states, mode).
pub(crate) fn validate_desc(d: &MetricDesc) -> Result<(), Error> {
    if !valid_metric_name(&d.name) || d.name.len() > MAX_STRING {
        return Err(Error::InvalidName(d.name.clone()));
    }
    let value_type_ok = match d.metric_type {
        MetricType::Counter => true,
        MetricType::Gauge | MetricType::Histogram | MetricType::Summary => d.value_type == ValueType::F64,
        MetricType::Info | MetricType::Enum => d.value_type == ValueType::U64,
    };
    if !value_type_ok {
        return Err(corrupt("gauges, histograms and summaries hold f64 values, info and enum u64"));
    }
    if d.help.len() > MAX_STRING {
        return Err(Error::InvalidName(format!("{}: help text over 64 KiB", d.name)));
    }
    if d.label_names.len() > MAX_LABELS {
        return Err(Error::InvalidLabelName(format!("{}: more than {MAX_LABELS} labels", d.name)));
    }
    for (i, l) in d.label_names.iter().enumerate() {
        let reserved = (l == "pid" && d.gauge_mode.is_some_and(GaugeMode::per_process))
            || (l == "le" && d.metric_type == MetricType::Histogram)
            || (*l == d.name && d.metric_type == MetricType::Enum);
        if !valid_label_name(l) || l.len() > MAX_STRING || reserved {
            return Err(Error::InvalidLabelName(format!("{}: {l:?}", d.name)));
        }
        if d.label_names[..i].contains(l) {
            return Err(Error::InvalidLabelName(format!("{}: {l:?} twice", d.name)));
        }
    }
    if d.metric_type == MetricType::Histogram {
        if d.buckets.len() > MAX_BUCKETS {
            return Err(Error::InvalidBuckets(format!("{}: more than {MAX_BUCKETS}", d.name)));
        }
        let increasing = d.buckets.windows(2).all(|w| w[0] < w[1]);
        if !increasing || d.buckets.iter().any(|b| !b.is_finite()) {
            return Err(Error::InvalidBuckets(format!(
                "{}: bounds must be finite and strictly increasing ({:?})",
                d.name, d.buckets
            )));
        }
    } else if !d.buckets.is_empty() {
        return Err(Error::InvalidBuckets(format!("{}: only histograms have buckets", d.name)));
    }
    if d.metric_type == MetricType::Enum {
        let unique = d.states.iter().enumerate().all(|(i, s)| !d.states[..i].contains(s));
        let sizes = d.states.iter().all(|s| !s.is_empty() && s.len() <= MAX_STRING);
        if d.states.is_empty() || d.states.len() > MAX_STATES || !unique || !sizes {
            return Err(Error::InvalidValue(format!(
                "{}: an enum needs 1 to {MAX_STATES} states, unique, non-empty and at most 64 KiB \
                 each ({:?})",
                d.name, d.states
            )));
        }
    } else if !d.states.is_empty() {
        return Err(Error::InvalidValue(format!("{}: only enums have states", d.name)));
    }
    if (d.metric_type == MetricType::Gauge) != d.gauge_mode.is_some() {
        return Err(corrupt("gauge mode must be set exactly for gauges"));
    }
    Ok(())
}

/// Checks the values of an info series: the metric's label values followed by key/value pairs
/// whose keys are valid label names, unique, not among the metric's label names, with at most
/// [`MAX_LABELS`] labels and keys together.
pub(crate) fn check_info_values<S: AsRef<str>>(d: &MetricDesc, values: &[S]) -> Result<(), Error> {
    let n = d.label_names.len();
    let pairs = values.get(n..).filter(|p| p.len() % 2 == 0);
    let pairs = pairs.ok_or_else(|| corrupt("an info series needs its label values and key/value pairs"))?;
    if n + pairs.len() / 2 > MAX_LABELS {
        return Err(Error::InvalidLabelName(format!(
            "{}: more than {MAX_LABELS} labels and info keys together",
            d.name
        )));
    }
    for (i, kv) in pairs.chunks_exact(2).enumerate() {
        let k = kv[0].as_ref();
        let taken =
            d.label_names.iter().any(|l| l == k) || pairs.chunks_exact(2).take(i).any(|p| p[0].as_ref() == k);
        if !valid_label_name(k) || taken {
            return Err(Error::InvalidLabelName(format!("{}: info key {k:?}", d.name)));
        }
        if kv[1].as_ref().len() > MAX_STRING {
            return Err(Error::InvalidLabelValue(d.name.clone()));
        }
    }
    Ok(())
}

/// Builds the bytes of a fresh header (`used` = [`HEADER_SIZE`], flags clear).
pub(crate) fn encode_header(
    pid: u64,
    parent_pid: u64,
    start_time_ns: u64,
    file_id: [u8; 16],
    reserve: u64,
) -> [u8; header::END as usize] {
    let mut h = [0u8; header::END as usize];
    let mut put = |off: u64, b: &[u8]| h[off as usize..off as usize + b.len()].copy_from_slice(b);
    put(header::MAGIC, &MAGIC);
    put(header::VERSION, &VERSION.to_le_bytes());
    put(header::HEADER_SIZE, &(HEADER_SIZE as u32).to_le_bytes());
    put(header::USED, &HEADER_SIZE.to_le_bytes());
    put(header::PID, &pid.to_le_bytes());
    put(header::START_TIME_NS, &start_time_ns.to_le_bytes());
    put(header::FILE_ID, &file_id);
    put(header::RESERVE, &reserve.to_le_bytes());
    put(header::PARENT_PID, &parent_pid.to_le_bytes());
    h
}

/// Checks the magic, version and header size of a header copy (at least [`header::END`] bytes).
pub fn check_header(b: &[u8]) -> Result<(), Error> {
    if b.len() < header::END as usize {
        return Err(corrupt("file is shorter than its header"));
    }
    if b[0..8] != MAGIC {
        return Err(Error::Foreign);
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let hs = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    if u64::from(hs) != HEADER_SIZE {
        return Err(corrupt("header size is not 4096"));
    }
    Ok(())
}

/// Formats a file id as 32 lowercase hex digits (as in file names).
pub fn file_id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Name of a writer's file: `w-<pid>-<file id hex>.shm`.
pub(crate) fn file_name(pid: u64, file_id: &[u8; 16]) -> String {
    format!("w-{pid}-{}.shm", file_id_hex(file_id))
}

/// Whether a directory entry name is a published writer file of ours.
pub fn is_writer_file(name: &str) -> bool {
    name.starts_with("w-") && name.ends_with(".shm")
}

/// Whether a directory entry name is a writer file still being created (`.w-…​.tmp`).
pub fn is_writer_temp(name: &str) -> bool {
    name.starts_with(".w-") && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_record_round_trips() {
        let d = MetricDesc {
            name: "lat".into(),
            help: "Latency.".into(),
            metric_type: MetricType::Histogram,
            value_type: ValueType::F64,
            gauge_mode: None,
            label_names: vec!["method".into()],
            buckets: vec![0.1, 1.0],
            states: vec![],
        };
        let rec = encode_metric(3, &d);
        assert_eq!(rec.len() % 8, 0);
        assert_eq!(record_len(&rec).unwrap(), rec.len());
        assert_eq!(decode_record(&rec).unwrap(), Record::Metric { id: 3, desc: d });
    }

    #[test]
    fn series_record_round_trips() {
        let (rec, off) = encode_series(false, 7, &["GET", "200"], 3);
        assert_eq!(off, 40);
        assert_eq!(rec.len(), 64);
        let r = decode_record(&rec).unwrap();
        assert_eq!(
            r,
            Record::Series {
                metric_id: 7,
                label_values: vec!["GET".into(), "200".into()],
                slots: 3,
                slots_offset: 40
            }
        );
        let (rec, off) = encode_series(false, 0, &[], 1);
        assert_eq!((rec.len(), off), (32, 24));
        assert!(
            matches!(decode_record(&rec).unwrap(), Record::Series { ref label_values, .. } if label_values.is_empty())
        );
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let (mut rec, _) = encode_series(false, 0, &["abc"], 1);
        rec[24] = 0xff; // label value length far past the record
        assert!(decode_record(&rec).is_err());
        assert!(record_len(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(record_len(&[16, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn gauge_modes_round_trip() {
        for m in GaugeMode::ALL {
            assert_eq!(GaugeMode::from_code(m.code()), Some(m));
            assert_eq!(GaugeMode::parse(m.as_str()), Some(m));
        }
    }
}
