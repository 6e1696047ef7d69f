//! What the job is doing, as text and figures: the `perf_metrics` JSON document, the `monitor`
//! command's text, and the families `/metrics` adds to the merged snapshot (process figures,
//! alarm counters).
//!
//! Pure functions of the job's latest view ([`JobView`]) and the alarm pipeline's counters:
//! nothing here scans, sleeps or locks, so it is all tested without a runtime.
//!
//! Python's multiprocess mode cannot report per-process memory or CPU; the aggregator can, because
//! it knows every worker's pid ([`crate::procs`] tells workers from masters). Memory follows
//! ftw.monitor: RSS from `statm`, USS (private pages) and PSS (proportional share) from
//! `smaps_rollup`, in bytes, `-1` where unavailable (another user's process, a kernel without
//! `smaps_rollup`, another pid namespace).
//!
//! In `/metrics`, the job as a whole has families of its own (`shmetrics_job_*`), apart from the
//! per-process `process_*{pid}` series, so that `sum(process_resident_memory_bytes)` is the job's
//! memory and `shmetrics_job_cpu_seconds_total` a counter that never goes backwards (the CPU time of
//! workers that are gone stays in it). Per-process series come and go with the processes (under
//! `max_requests` churn, a few hundred pids an hour); `--process-metrics job` leaves them out.

use std::sync::Arc;

use serde_json::json;

use crate::alarm::{AlarmStats, Event, EventKind};
use crate::health::Health;
use crate::job::JobView;
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::procs::{total, ProcStats};

/// Which process metrics `/metrics` carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProcessMetrics {
    /// The job's totals (`shmetrics_job_*`) and one `process_*` series per process (`pid` label).
    #[default]
    All,
    /// Only the job's totals: no per-process series (no series churn as workers come and go).
    Job,
    /// None.
    None,
}

/// What the alarm pipeline has to say, for reports.
#[derive(Clone, Debug, Default)]
pub struct Alarms {
    /// Its counters.
    pub stats: AlarmStats,
    /// The most recent events, oldest first.
    pub recent: Vec<Event>,
    /// The configured action names.
    pub actions: Vec<String>,
}

/// CPU use measured over an interval: the view at its start, the view at its end, its length.
pub struct Measured<'a> {
    /// The view when the interval started.
    pub before: &'a JobView,
    /// A view taken after it ended.
    pub after: &'a JobView,
    /// The time between the two views, seconds (> 0).
    pub seconds: f64,
    /// The interval asked for, seconds.
    pub interval: f64,
}

/// Per process in `before` still there in `after`: (pid, CPU % of one core over the interval).
fn cpu_percent(m: &Measured<'_>) -> Vec<(i32, f64)> {
    m.before
        .procs
        .iter()
        .filter_map(|b| {
            let a = m.after.procs.iter().find(|a| a.pid == b.pid && a.start_time == b.start_time)?;
            Some((b.pid, 100.0 * (a.cpu_seconds - b.cpu_seconds) / m.seconds))
        })
        .collect()
}

/// The `perf_metrics` document. With a measurement, CPU use over its interval is reported as a
/// percentage of one core, per process and for the job.
pub fn document(
    view: &JobView,
    health: &Health,
    alarms: Option<&Alarms>,
    measured: Option<&Measured<'_>>,
) -> serde_json::Value {
    let procs = &view.procs;
    let cpu_percent = measured.map(cpu_percent);
    let stats = &view.stats;
    let workers: Vec<serde_json::Value> = procs
        .iter()
        .map(|p| {
            let mut w = json!({
                "pid": p.pid,
                "kind": p.kind.as_str(),
                "start_time": p.start_time,
                "uptime": view.at - p.start_time,
                "rss": p.rss,
                "uss": p.uss,
                "pss": p.pss,
                "cpu_seconds": p.cpu_seconds,
                "open_fds": p.open_fds,
                "threads": p.threads,
                "ready": p.ready,
            });
            if let Some(cp) = cpu_percent.as_ref().and_then(|c| c.iter().find(|(pid, _)| *pid == p.pid)) {
                w["cpu_percent"] = json!(cp.1);
            }
            w
        })
        .collect();
    let bad: usize = stats.bad_files.values().sum();
    let mut doc = json!({
        "instance": {
            "uptime": view.uptime,
            "pid": view.aggregator_pid,
            "dir": view.dir.display().to_string(),
            "health": health.message,
            "healthy": health.ok,
        },
        "memory": {
            "rss": total(procs, |p| p.rss),
            "uss": total(procs, |p| p.uss),
            "pss": total(procs, |p| p.pss),
        },
        "cpu": { "seconds": view.cpu_seconds },
        "workers": workers,
        "metrics": {
            "files": stats.files,
            "python_files": stats.python_files,
            "series": stats.series,
            "live_workers": procs.iter().filter(|p| p.kind.is_worker()).count(),
            "dead_workers_archived": stats.totals.dead_workers,
            "crashed_workers": stats.totals.crashed_workers,
            "python_files_compacted": stats.totals.python_files_compacted,
            "bad_files": bad,
            "dropped_series": stats.totals.dropped_series + stats.live_dropped_series,
            "dropped_updates": stats.totals.dropped_updates + stats.live_dropped_updates,
            "shared_forks": stats.totals.shared_forks + stats.live_shared_forks,
            "conflicts": stats.conflicts,
        },
        "scrape": {
            "last_duration_seconds": stats.last_scrape.as_secs_f64(),
            "scrapes": view.scrapes,
            "merges": stats.merges,
        },
    });
    if let Some(a) = alarms {
        doc["alarms"] = json!({
            "fired": a.stats.fired.values().sum::<u64>(),
            "suppressed": a.stats.suppressed.values().sum::<u64>(),
            "failed": a.stats.failed.values().sum::<u64>(),
            "recent": a.recent,
        });
    }
    if let (Some(c), Some(m)) = (&cpu_percent, measured) {
        doc["cpu"]["percent"] = json!(c.iter().fold(0.0, |a, (_, p)| a + p.max(0.0)));
        doc["cpu"]["interval"] = json!(m.interval);
    }
    doc
}

fn mib(b: i64) -> String {
    if b < 0 {
        "?".into()
    } else {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    }
}

/// The `monitor` command's text: the aggregator, then each process of the job.
pub fn monitor_text(view: &JobView) -> String {
    let procs = &view.procs;
    let now = view.at;
    let mut out = format!(
        "aggregator pid {} rss {} uptime {:.0} s\n",
        view.aggregator_pid,
        mib(view.aggregator_rss),
        view.uptime
    );
    let workers = procs.iter().filter(|p| p.kind.is_worker()).count();
    let ready = procs.iter().filter(|p| p.kind.is_worker() && p.ready).count();
    out.push_str(&format!("workers: {workers} live, {ready} ready\n"));
    for p in procs.iter() {
        out.push_str(&format!(
            "  {:<9} pid {:<7} rss {:>10}  uptime {:>6.0} s{}\n",
            p.kind.as_str(),
            p.pid,
            mib(p.rss),
            now - p.start_time,
            if p.kind.is_worker() && !p.ready { "  not ready" } else { "" }
        ));
    }
    out
}

fn meta(name: &str, help: &str, t: MetricType, labels: &[&str]) -> Arc<FamilyMeta> {
    FamilyMeta::own(name, help, t, ValueType::F64, labels)
}

/// Appends the process metrics that `which` asks for to a scrape.
///
/// Per process (label `pid`, workers and masters): `process_resident_memory_bytes`,
/// `process_unique_memory_bytes`, `process_proportional_memory_bytes`, `process_cpu_seconds_total`,
/// `process_open_fds`, `process_start_time_seconds`. Families the application already exposes under
/// those names are left alone.
///
/// For the job (no labels): `shmetrics_job_resident_memory_bytes`,
/// `shmetrics_job_unique_memory_bytes`, `shmetrics_job_proportional_memory_bytes`,
/// `shmetrics_job_open_fds` (sums over the live processes; left out while any process's figure is
/// unavailable) and `shmetrics_job_cpu_seconds_total` (including processes that are gone).
/// Returns the families to add to `snap` (which it only reads, to leave the application's alone).
pub fn process_families(view: &JobView, snap: &Snapshot, which: ProcessMetrics) -> Vec<SnapFamily> {
    if which == ProcessMetrics::None {
        return Vec::new();
    }
    let procs = &view.procs;
    type Field = fn(&ProcStats) -> f64;
    let fams: [(&str, &str, &str, MetricType, Field); 6] = [
        (
            "process_resident_memory_bytes",
            "shmetrics_job_resident_memory_bytes",
            "Resident memory size in bytes",
            MetricType::Gauge,
            |p| p.rss as f64,
        ),
        (
            "process_unique_memory_bytes",
            "shmetrics_job_unique_memory_bytes",
            "Unique set size (private memory) in bytes",
            MetricType::Gauge,
            |p| p.uss as f64,
        ),
        (
            "process_proportional_memory_bytes",
            "shmetrics_job_proportional_memory_bytes",
            "Proportional set size in bytes",
            MetricType::Gauge,
            |p| p.pss as f64,
        ),
        ("process_cpu_seconds", "", "User and system CPU time spent in seconds", MetricType::Counter, |p| {
            p.cpu_seconds
        }),
        (
            "process_open_fds",
            "shmetrics_job_open_fds",
            "Number of open file descriptors",
            MetricType::Gauge,
            |p| p.open_fds as f64,
        ),
        (
            "process_start_time_seconds",
            "",
            "Start time of the process since unix epoch in seconds",
            MetricType::Gauge,
            |p| p.start_time,
        ),
    ];
    let mut added = Vec::new();
    for (name, job_name, help, t, field) in fams {
        if which == ProcessMetrics::All && !procs.is_empty() && snap.family(name).is_none() {
            let series: Vec<(Arc<LabelSet>, Value)> = procs
                .iter()
                .map(|p| (field(p), p.pid))
                .filter(|(v, _)| *v >= 0.0)
                .map(|(v, pid)| {
                    (Arc::new(LabelSet::new(vec![("pid".into(), pid.to_string())])), Value::F64(v))
                })
                .collect();
            if !series.is_empty() {
                let help = format!("{help}, per process of the job (workers and masters).");
                added.push(SnapFamily { meta: meta(name, &help, t, &["pid"]), series });
            }
        }
        let complete = procs.iter().all(|p| field(p) >= 0.0);
        if !job_name.is_empty() && complete {
            let sum: f64 = procs.iter().map(field).sum();
            let help = format!("{help}, summed over the job's live processes (workers and masters).");
            let series = vec![(Arc::new(LabelSet::default()), Value::F64(sum))];
            added.push(SnapFamily { meta: meta(job_name, &help, t, &[]), series });
        }
    }
    added.push(SnapFamily {
        meta: meta(
            "shmetrics_job_cpu_seconds",
            "User and system CPU time of the job's processes, in seconds, including processes that \
             are gone (never decreases).",
            MetricType::Counter,
            &[],
        ),
        series: vec![(Arc::new(LabelSet::default()), Value::F64(view.cpu_seconds))],
    });
    added
}

/// The alarm counters: `shmetrics_alarms_fired_total{kind,action}`,
/// `shmetrics_alarms_suppressed_total{kind}`, `shmetrics_alarm_actions_failed_total{action}`.
pub fn alarm_families(alarms: &Alarms) -> Vec<SnapFamily> {
    let st = &alarms.stats;
    let counter = |name: &str, help: &str, labels: &[&str]| {
        FamilyMeta::own(name, help, MetricType::Counter, ValueType::U64, labels)
    };
    let pairs = |v: &[(&str, &str)]| {
        Arc::new(LabelSet::new(v.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()))
    };
    let kinds =
        [EventKind::Crash, EventKind::Fatal, EventKind::Memory, EventKind::Threshold, EventKind::Httpok];
    let actions = &alarms.actions;
    let mut out = Vec::new();
    let mut fired = Vec::new();
    for k in kinds {
        for a in actions {
            let n = st.fired.get(&(k, a.clone())).copied().unwrap_or(0);
            fired.push((pairs(&[("kind", k.as_str()), ("action", a)]), Value::U64(n)));
        }
    }
    let suppressed = kinds
        .iter()
        .map(|k| (pairs(&[("kind", k.as_str())]), Value::U64(st.suppressed.get(k).copied().unwrap_or(0))))
        .collect();
    let failed = actions
        .iter()
        .map(|a| (pairs(&[("action", a)]), Value::U64(st.failed.get(a).copied().unwrap_or(0))))
        .collect();
    for (meta, series) in [
        (
            counter("shmetrics_alarms_fired", "Alarm deliveries, by kind and action.", &["kind", "action"]),
            fired,
        ),
        (
            counter(
                "shmetrics_alarms_suppressed",
                "Alarms not raised because of a rate limit or grace period.",
                &["kind"],
            ),
            suppressed,
        ),
        (
            counter(
                "shmetrics_alarm_actions_failed",
                "Alarm deliveries that failed after all retries.",
                &["action"],
            ),
            failed,
        ),
    ] {
        if !series.is_empty() {
            out.push(SnapFamily { meta, series });
        }
    }
    out
}
