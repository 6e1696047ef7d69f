//! `shmetrics dump`: aggregate a directory once and print it — for cron jobs and Telegraf's `exec`
//! input. It takes no lock and changes nothing, so it runs next to a serving aggregator.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::aggregator::{Aggregator, Options};
use crate::expose::{self, Format};
use crate::merge::{Snapshot, Value};
use crate::samples;
use clap::ValueEnum;

/// Output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DumpFormat {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0.0 text.
    Openmetrics,
    /// One JSON document: every family with its series, plus directory statistics.
    Json,
    /// InfluxDB line protocol, one line per series plus one `shmetrics` line of statistics.
    Influx,
}

/// Arguments of `shmetrics dump`.
#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// The multiproc directory.
    #[arg(long, env = "SHMETRICS_DIR")]
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "prometheus")]
    format: DumpFormat,
    /// Accept a directory owned by another user or writable by others (see `serve --help`).
    #[arg(long)]
    shared_dir: bool,
    /// Configuration file (as `serve --config`): its derived metrics ([[metric]]) are computed
    /// once on this snapshot and printed with it (an accumulator shows one round).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn main(args: DumpArgs) -> anyhow::Result<ExitCode> {
    // The configuration first: a bad file is an error before the directory is read.
    let config = args.config.as_deref().map(crate::alarm::AlarmConfig::load).transpose()?;
    let opts = Options { read_only: true, shared_dir: args.shared_dir, ..Options::default() };
    let mut agg = Aggregator::open(&args.dir, &opts)?;
    let mut snap = agg.scrape();
    if let Some(c) = config {
        crate::derived::Engine::new(c.metric).apply(&mut snap, std::time::Instant::now());
        snap.families.sort_by(|a, b| a.meta.desc.name.cmp(&b.meta.desc.name));
    }
    let out = match args.format {
        DumpFormat::Prometheus => expose::encode(&snap, Format::Prometheus),
        DumpFormat::Openmetrics => expose::encode(&snap, Format::OpenMetrics),
        DumpFormat::Json => format!("{}\n", json(&snap)),
        DumpFormat::Influx => influx(&snap, &args.dir.display().to_string()),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn number(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v)
        .map_or_else(|| serde_json::Value::String(v.to_string()), serde_json::Value::Number)
}

/// The snapshot as JSON: `{"families": [{"name", "type", "help", "series": [{"labels", …}]}]}`.
fn json(snap: &Snapshot) -> serde_json::Value {
    let families: Vec<serde_json::Value> = snap
        .families
        .iter()
        .map(|f| {
            let d = &f.meta.desc;
            let series: Vec<serde_json::Value> = f
                .series
                .iter()
                .map(|(labels, v)| {
                    let l: serde_json::Map<String, serde_json::Value> =
                        labels.pairs.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                    let mut s = serde_json::json!({ "labels": l });
                    match v {
                        Value::U64(n) => s["value"] = (*n).into(),
                        Value::F64(x) | Value::Recent { v: x, .. } => s["value"] = number(*x),
                        Value::Info { .. } => s["value"] = 1.into(),
                        Value::State { index, .. } => {
                            s["state"] = d.states.get(*index as usize).cloned().unwrap_or_default().into();
                        }
                        Value::Summary { count, sum } => {
                            s["count"] = number(*count);
                            s["sum"] = number(*sum);
                        }
                        Value::Hist { buckets, sum } => {
                            let mut count = 0u64;
                            let b: Vec<serde_json::Value> = labels
                                .cumulative(buckets)
                                .map(|(bound, cum)| {
                                    count = cum;
                                    serde_json::json!({ "le": samples::le_text(bound), "count": cum })
                                })
                                .collect();
                            s["buckets"] = b.into();
                            s["count"] = count.into();
                            s["sum"] = number(*sum);
                        }
                        Value::Unset => {}
                    }
                    s
                })
                .collect();
            serde_json::json!({
                "name": d.sample_name(),
                "type": d.metric_type.as_str(),
                "help": d.help,
                "series": series,
            })
        })
        .collect();
    serde_json::json!({ "families": families })
}

/// Escapes a tag key or value (commas, spaces, equals signs) or a measurement (commas, spaces).
fn escape(s: &str, equals: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ',' || c == ' ' || (equals && c == '=') {
            out.push('\\');
        }
        if c == '\n' {
            out.push_str("\\n");
            continue;
        }
        out.push(c);
    }
    out
}

fn field(v: f64) -> String {
    let mut s = String::new();
    expose::push_f64(&mut s, v);
    s
}

/// InfluxDB line protocol, no timestamps (the collector adds them), like ftw.monitor's
/// `dump-perf-metrics`: `measurement,tag=value field=value`. Histograms get `count`, `sum` and
/// one `le_<bound>` field per cumulative bucket (`le_inf` for `+Inf`); summaries `count` and `sum`.
fn influx(snap: &Snapshot, dir: &str) -> String {
    let mut out = String::new();
    for f in &snap.families {
        let d = &f.meta.desc;
        let name = d.sample_name();
        for (labels, v) in &f.series {
            let mut line = escape(&name, false);
            for (k, val) in &labels.pairs {
                if !val.is_empty() {
                    line.push_str(&format!(",{}={}", escape(k, true), escape(val, true)));
                }
            }
            // NaN and infinities are not valid InfluxDB floats: such fields are left out.
            let fields = match v {
                Value::U64(n) => format!("value={n}"),
                Value::Info { .. } => "value=1".to_string(),
                // The state index, and its name as a string field.
                Value::State { index, .. } => {
                    let state = d.states.get(*index as usize).map_or("", String::as_str);
                    format!("value={index},state=\"{}\"", state.replace('\\', "\\\\").replace('"', "\\\""))
                }
                Value::F64(x) | Value::Recent { v: x, .. } if x.is_finite() => format!("value={}", field(*x)),
                Value::F64(_) | Value::Recent { .. } => continue,
                Value::Summary { count, sum } => {
                    let mut parts = vec![format!("count={}", field(*count))];
                    if sum.is_finite() {
                        parts.push(format!("sum={}", field(*sum)));
                    }
                    parts.join(",")
                }
                Value::Hist { buckets, sum } => {
                    let mut count = 0u64;
                    let mut parts = Vec::new();
                    for (bound, cum) in labels.cumulative(buckets) {
                        count = cum;
                        let le = bound.map_or_else(|| "inf".to_string(), |b| samples::le_text(Some(b)));
                        parts.push(format!("le_{}={cum}", escape(&le, true)));
                    }
                    parts.push(format!("count={count}"));
                    if sum.is_finite() {
                        parts.push(format!("sum={}", field(*sum)));
                    }
                    parts.join(",")
                }
                Value::Unset => continue,
            };
            out.push_str(&line);
            out.push(' ');
            out.push_str(&fields);
            out.push('\n');
        }
    }
    out.push_str(&format!("shmetrics,dir={} series={}\n", escape(dir, true), snap.series_count()));
    out
}
