//! The archive: what dead workers contributed, persisted in the directory.
//!
//! When a worker dies its file is folded into the archive and removed, so totals never go backwards
//! and the directory stays proportional to live workers. The archive lists the ids of files folded
//! but perhaps not yet removed; a file whose id is listed is removed at the next pass without being
//! folded again, so a crash between "save archive" and "remove file" never counts a worker twice.
//! The caller removes a folded file only after an archive listing it has been saved durably
//! (`save` returns only once the new archive is on disk under its name), so a full disk or a
//! crash never loses a dead worker's totals either.
//!
//! The archive is untrusted input like every file in the directory: it is opened without
//! following links or blocking ([`crate::trust`]), and one that is not a regular file of ours, does
//! not parse, or has another version is **set aside** (renamed to `archive.json.corrupt-<time>`,
//! never deleted) with a loud log line, and the aggregator starts with empty totals instead of
//! refusing to start: a crash loop would lose more than the archive.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{Merger, Value};
use crate::trust::{Refused, Trust};

/// Name of the archive file in the multiproc directory.
pub const FILE: &str = "archive.json";

/// Archive format version.
const VERSION: u32 = 1;

/// Largest archive read back: a larger file is set aside as corrupt, not read into memory.
const MAX_SIZE: u64 = 1 << 30;

/// Prefix of archives set aside as corrupt (`archive.json.corrupt-<unix secs>`).
pub(crate) const CORRUPT_PREFIX: &str = "archive.json.corrupt-";

/// Totals that outlive worker files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Workers whose files were folded.
    pub dead_workers: u64,
    /// Of those, workers that had not exited cleanly.
    pub crashed_workers: u64,
    /// Dropped series reported by folded files.
    pub dropped_series: u64,
    /// Dropped updates reported by folded files.
    pub dropped_updates: u64,
    /// Python prometheus_client files removed by `--compact-python`.
    #[serde(default)]
    pub python_files_compacted: u64,
    /// CPU seconds of the job's processes that are gone (see `crate::procs`).
    #[serde(default)]
    pub cpu_seconds: f64,
    /// CPU seconds of children that live masters had reaped before they were first seen, by
    /// process (pid and start time in clock ticks): not the job's, so left out of its total.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_bases: Vec<(i32, u64, f64)>,
    /// Forked children that wrote into folded files because they could not create their own
    /// (header `shared_forks`).
    #[serde(default)]
    pub shared_forks: u64,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    totals: Totals,
    /// Hex ids of files folded into this archive that may still exist.
    folded: Vec<String>,
    families: Vec<Family>,
}

#[derive(Serialize, Deserialize)]
struct Family {
    name: String,
    help: String,
    #[serde(rename = "type")]
    metric_type: String,
    value_type: String,
    gauge_mode: Option<String>,
    series: Vec<Series>,
}

/// Values are stored with floats as their bit patterns, so NaN and infinities survive JSON.
#[derive(Serialize, Deserialize)]
struct Series {
    /// Label names and values.
    labels: Vec<(String, String)>,
    /// Histogram bucket bounds of this series.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bounds: Vec<f64>,
    #[serde(flatten)]
    value: Stored,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stored {
    U64(u64),
    F64Bits(u64),
    Recent { ts: u64, bits: u64 },
    Hist { buckets: Vec<u64>, sum_bits: u64 },
    Summary { count_bits: u64, sum_bits: u64 },
}

impl Stored {
    fn of(v: &Value) -> Option<Stored> {
        Some(match v {
            // Info and enum values die with their writers: never archived.
            Value::Unset | Value::Info { .. } | Value::State { .. } => return None,
            Value::U64(n) => Stored::U64(*n),
            Value::F64(f) => Stored::F64Bits(f.to_bits()),
            Value::Recent { ts, v } => Stored::Recent { ts: *ts, bits: v.to_bits() },
            Value::Hist { buckets, sum } => {
                Stored::Hist { buckets: buckets.clone(), sum_bits: sum.to_bits() }
            }
            Value::Summary { count, sum } => {
                Stored::Summary { count_bits: count.to_bits(), sum_bits: sum.to_bits() }
            }
        })
    }
    fn value(&self) -> Value {
        match self {
            Stored::U64(n) => Value::U64(*n),
            Stored::F64Bits(b) => Value::F64(f64::from_bits(*b)),
            Stored::Recent { ts, bits } => Value::Recent { ts: *ts, v: f64::from_bits(*bits) },
            Stored::Hist { buckets, sum_bits } => {
                Value::Hist { buckets: buckets.clone(), sum: f64::from_bits(*sum_bits) }
            }
            Stored::Summary { count_bits, sum_bits } => {
                Value::Summary { count: f64::from_bits(*count_bits), sum: f64::from_bits(*sum_bits) }
            }
        }
    }
}

fn desc_of(f: &Family) -> Option<MetricDesc> {
    let metric_type = match f.metric_type.as_str() {
        "counter" => MetricType::Counter,
        "gauge" => MetricType::Gauge,
        "histogram" => MetricType::Histogram,
        "summary" => MetricType::Summary,
        _ => return None,
    };
    let value_type = match f.value_type.as_str() {
        "u64" => ValueType::U64,
        "f64" => ValueType::F64,
        _ => return None,
    };
    let gauge_mode = match &f.gauge_mode {
        Some(m) => Some(GaugeMode::parse(m)?),
        None => None,
    };
    Some(MetricDesc {
        name: f.name.clone(),
        help: f.help.clone(),
        metric_type,
        value_type,
        gauge_mode,
        label_names: Vec::new(),
        buckets: Vec::new(),
        states: Vec::new(),
    })
}

/// What a loaded archive contained besides the merged values.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Totals.
    pub totals: Totals,
    /// Hex ids of files already folded.
    pub folded: Vec<String>,
    /// Where an unusable archive was moved, and why it was unusable.
    pub set_aside: Option<(PathBuf, String)>,
}

/// Loads `dir/archive.json` into `merger`. A missing archive is empty. One that cannot be used (not
/// a regular file of ours, unparsable, another version, larger than 1 GiB) is set aside (see the
/// module docs) and reported in [`Loaded::set_aside`]; only an archive that cannot even be opened
/// or moved (permissions) is an error.
pub(crate) fn load(dir: &Path, trust: &Trust, merger: &mut Merger) -> Result<Loaded> {
    let path = dir.join(FILE);
    let file = match read(&path, trust) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(Loaded::default()),
        Err(why) => return set_aside(dir, &path, why),
    };
    if file.version != VERSION {
        let why = format!("archive version {}, this build reads version {VERSION}", file.version);
        return set_aside(dir, &path, why);
    }
    Ok(fill(file, merger))
}

/// [`load`] for an aggregator that changes nothing in the directory (`shmetrics dump`): an unusable
/// archive is only reported in the log, and read as empty.
pub(crate) fn load_read_only(dir: &Path, trust: &Trust, merger: &mut Merger) -> Loaded {
    let path = dir.join(FILE);
    match read(&path, trust) {
        Ok(Some(file)) if file.version == VERSION => fill(file, merger),
        Ok(None) => Loaded::default(),
        Ok(Some(file)) => {
            tracing::warn!(archive = %path.display(), "archive version {}; dead workers' totals left out", file.version);
            Loaded::default()
        }
        Err(why) => {
            tracing::warn!(archive = %path.display(), "unusable archive ({why}); dead workers' totals left out");
            Loaded::default()
        }
    }
}

fn fill(file: File, merger: &mut Merger) -> Loaded {
    for f in &file.families {
        let Some(desc) = desc_of(f) else { continue };
        let Some(fam) = merger.family_for(&desc) else { continue };
        for s in &f.series {
            let idx = merger.series_for(fam, s.labels.clone());
            merger.widen(idx, &s.bounds);
            merger.archive_value(idx, &s.value.value());
        }
    }
    Loaded { totals: file.totals, folded: file.folded, set_aside: None }
}

/// Reads and parses the archive; `Ok(None)` when there is none, `Err` with the reason it is unusable.
fn read(path: &Path, trust: &Trust) -> std::result::Result<Option<File>, String> {
    let (f, meta) = match crate::trust::open_read(path, trust) {
        Ok(f) => f,
        Err(Refused::Gone) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if meta.len() > MAX_SIZE {
        return Err(format!("{} bytes, more than an archive can hold", meta.len()));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SIZE + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("does not parse: {e}"))
}

/// Whether an open file is a usable archive (it parses and has our version).
pub(crate) fn parses(file: std::fs::File, meta: &std::fs::Metadata) -> bool {
    let mut bytes = Vec::new();
    meta.len() <= MAX_SIZE
        && file.take(MAX_SIZE + 1).read_to_end(&mut bytes).is_ok()
        && serde_json::from_slice::<File>(&bytes).is_ok_and(|f| f.version == VERSION)
}

fn set_aside(dir: &Path, path: &Path, why: String) -> Result<Loaded> {
    let aside = crate::trust::aside_name(dir, FILE, "corrupt");
    std::fs::rename(path, &aside).map_err(|e| Error::io(path, e))?;
    Ok(Loaded { set_aside: Some((aside, why)), ..Loaded::default() })
}

/// Writes the archive durably: when this returns `Ok`, the new archive is on disk under its name
/// (temporary file, fsync, rename, directory fsync; see [`crate::trust::replace`]).
pub(crate) fn save(dir: &Path, merger: &Merger, totals: &Totals, folded: &[String]) -> Result<()> {
    let mut families: Vec<Family> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (desc, labels, value) in merger.archived() {
        let Some(stored) = Stored::of(value) else { continue };
        let i = *index.entry(desc.name.as_str()).or_insert_with(|| {
            families.push(Family {
                name: desc.name.clone(),
                help: desc.help.clone(),
                metric_type: desc.metric_type.as_str().to_string(),
                value_type: match desc.value_type {
                    ValueType::U64 => "u64".into(),
                    ValueType::F64 => "f64".into(),
                },
                gauge_mode: desc.gauge_mode.map(|m| m.as_str().to_string()),
                series: Vec::new(),
            });
            families.len() - 1
        });
        families[i].series.push(Series {
            labels: labels.pairs.clone(),
            bounds: labels.bounds.clone(),
            value: stored,
        });
    }
    let file = File { version: VERSION, totals: totals.clone(), folded: folded.to_vec(), families };
    let bytes = serde_json::to_vec(&file).map_err(|e| Error::Corrupt(format!("archive: {e}")))?;
    crate::trust::replace(dir, FILE, &bytes)
}
