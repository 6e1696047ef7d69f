//! The archive: what dead workers contributed, persisted in the directory.
//!
//! When a worker dies its file is folded into the archive and removed, so totals never go backwards
//! and the directory stays proportional to live workers. The archive is written to a temp file and
//! renamed over `archive.json`, so a crash leaves the old or the new one, never half of one. It lists
//! the ids of files folded but perhaps not yet removed; a file whose id is listed is removed at the
//! next pass without being folded again, so a crash between "write archive" and "remove file" never
//! counts a worker twice.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{Merger, Value};

/// Archive format version.
const VERSION: u32 = 1;

/// Totals that outlive worker files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
            Value::Unset => return None,
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
    })
}

/// What a loaded archive contained besides the merged values.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Totals.
    pub totals: Totals,
    /// Hex ids of files already folded.
    pub folded: Vec<String>,
}

/// Loads `dir/archive.json` into `merger`. A missing archive is empty; an unreadable one is an
/// error that tells the operator what to do (we never silently drop totals).
pub fn load(dir: &Path, merger: &mut Merger) -> Result<Loaded> {
    let path = dir.join(crate::dir::ARCHIVE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Corrupt(format!(
            "{}: {e}; move it away (totals of dead workers restart from zero) or restore it",
            path.display()
        ))
    })?;
    if file.version != VERSION {
        return Err(Error::Corrupt(format!("{}: archive version {}", path.display(), file.version)));
    }
    for f in &file.families {
        let Some(desc) = desc_of(f) else { continue };
        let Some(fam) = merger.family_for(&desc) else { continue };
        for s in &f.series {
            let idx = merger.series_for(fam, s.labels.clone());
            merger.widen(idx, &s.bounds);
            merger.archive_value(idx, &s.value.value());
        }
    }
    Ok(Loaded { totals: file.totals, folded: file.folded })
}

/// Writes the archive atomically (temp file, fsync, rename).
pub fn save(dir: &Path, merger: &Merger, totals: &Totals, folded: &[String]) -> Result<()> {
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
    let path = dir.join(crate::dir::ARCHIVE_FILE);
    let tmp = dir.join(format!(".archive.json.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, &file).map_err(std::io::Error::other)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&path, e)
    })
}
