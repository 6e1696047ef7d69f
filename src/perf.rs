//! What the job is doing, from the last scan and `/proc`: `perf_metrics` (JSON), `monitor` (text)
//! and the process metrics added to `/metrics`.
//!
//! Python's multiprocess mode cannot report per-process memory or CPU; the aggregator can, because
//! it knows every worker's pid ([`crate::procs`] tells workers from masters). Memory follows
//! ftw.monitor: RSS from `statm`, USS (private pages) and PSS (proportional share) from
//! `smaps_rollup`, in bytes, `-1` where unavailable (another user's process, a kernel without
//! `smaps_rollup`, another pid namespace). Reading `smaps_rollup` walks a process's page tables, so
//! figures are cached for [`TTL`].
//!
//! In `/metrics`, the job as a whole has families of its own (`shmetrics_job_*`), apart from the
//! per-process `process_*{pid}` series, so that `sum(process_resident_memory_bytes)` is the job's
//! memory and `shmetrics_job_cpu_seconds_total` a counter that never goes backwards (the CPU time of
//! workers that are gone stays in it). Per-process series come and go with the processes (under
//! `max_requests` churn, a few hundred pids an hour); `--process-metrics job` leaves them out.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::ops::Ops;
use crate::procs;
pub use crate::procs::ProcStats;

/// How long process figures are reused.
pub const TTL: Duration = Duration::from_secs(2);

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

/// The job's processes and CPU time, as of one look at `/proc`.
#[derive(Clone, Debug, Default)]
pub struct JobProcs {
    /// Workers and masters.
    pub procs: Vec<ProcStats>,
    /// The job's CPU seconds, including processes that are gone (never goes down).
    pub cpu_seconds: f64,
}

/// One look at `/proc` for the job, accounted in the aggregator (masters, CPU time).
fn collect(ops: &Ops) -> JobProcs {
    // A fresh scan first: the processes are those of the files in the directory now.
    let input = ops.shared().with(|a| {
        a.compact();
        a.job_input()
    });
    let procs = procs::collect(&input);
    let cpu_seconds = ops.shared().with(|a| a.account(&procs));
    JobProcs { procs, cpu_seconds }
}

/// Cached process figures.
#[derive(Default)]
pub struct ProcCache {
    cached: Mutex<Option<(Instant, Arc<JobProcs>)>>,
}

impl ProcCache {
    /// The job's process figures, at most [`TTL`] old.
    pub async fn get(&self, ops: &Arc<Ops>) -> Arc<JobProcs> {
        if let Some((at, v)) = self.cached.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            if at.elapsed() < TTL {
                return Arc::clone(v);
            }
        }
        let ops2 = Arc::clone(ops);
        let fresh = Arc::new(tokio::task::spawn_blocking(move || collect(&ops2)).await.unwrap_or_default());
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), Arc::clone(&fresh)));
        fresh
    }
}

use crate::procs::total;

/// The `perf_metrics` document. With `interval` (seconds, at most 10), CPU use is measured over
/// that interval and reported as a percentage of one core.
pub async fn document(ops: &Arc<Ops>, interval: Option<f64>) -> serde_json::Value {
    let health = ops.health().await;
    let job = ops.procs().await;
    let procs = &job.procs;
    let cpu_percent: Option<Vec<(i32, f64)>> = match interval.filter(|i| *i > 0.0 && *i <= 10.0) {
        Some(secs) => {
            let before: Vec<(i32, f64)> = procs.iter().map(|p| (p.pid, p.cpu_seconds)).collect();
            // Filtered to (0, 10] above (NaN too); `try_` all the same: it comes from a client.
            tokio::time::sleep(Duration::try_from_secs_f64(secs).unwrap_or_default()).await;
            let ops2 = Arc::clone(ops);
            let after = tokio::task::spawn_blocking(move || collect(&ops2)).await.unwrap_or_default().procs;
            Some(
                before
                    .iter()
                    .filter_map(|(pid, c0)| {
                        after
                            .iter()
                            .find(|a| a.pid == *pid)
                            .map(|a| (*pid, 100.0 * (a.cpu_seconds - c0) / secs))
                    })
                    .collect(),
            )
        }
        None => None,
    };
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let (stats, dir) = ops.shared().with(|a| (a.stats().clone(), a.dir().display().to_string()));
    let workers: Vec<serde_json::Value> = procs
        .iter()
        .map(|p| {
            let mut w = json!({
                "pid": p.pid,
                "kind": p.kind.as_str(),
                "start_time": p.start_time,
                "uptime": now - p.start_time,
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
            "uptime": ops.uptime().as_secs_f64(),
            "pid": std::process::id(),
            "dir": dir,
            "health": health.message,
            "healthy": health.ok,
        },
        "memory": {
            "rss": total(procs, |p| p.rss),
            "uss": total(procs, |p| p.uss),
            "pss": total(procs, |p| p.pss),
        },
        "cpu": { "seconds": job.cpu_seconds },
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
            "scrapes": stats.scrapes,
        },
    });
    if let Some(p) = ops.alarms() {
        let st = p.stats();
        doc["alarms"] = json!({
            "fired": st.fired.values().sum::<u64>(),
            "suppressed": st.suppressed.values().sum::<u64>(),
            "failed": st.failed.values().sum::<u64>(),
            "recent": p.recent(),
        });
    }
    if let Some(c) = &cpu_percent {
        doc["cpu"]["percent"] = json!(c.iter().fold(0.0, |a, (_, p)| a + p.max(0.0)));
        doc["cpu"]["interval"] = json!(interval);
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
pub async fn monitor_text(ops: &Arc<Ops>) -> String {
    let job = ops.procs().await;
    let procs = &job.procs;
    let me = procfs::process::Process::new(std::process::id() as i32).and_then(|p| p.statm()).ok();
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut out = format!(
        "aggregator pid {} rss {} uptime {:.0} s\n",
        std::process::id(),
        mib(me.map_or(-1, |m| m.resident as i64 * procfs::page_size() as i64)),
        ops.uptime().as_secs_f64()
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
    let label_names: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
    Arc::new(FamilyMeta {
        desc: MetricDesc {
            name: name.into(),
            help: help.into(),
            metric_type: t,
            value_type: ValueType::F64,
            gauge_mode: (t == MetricType::Gauge).then_some(GaugeMode::Sum),
            label_names: label_names.clone(),
            buckets: Vec::new(),
        },
        label_names,
    })
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
pub async fn process_families(ops: &Arc<Ops>, snap: &mut Snapshot, which: ProcessMetrics) {
    if which == ProcessMetrics::None {
        return;
    }
    let job = ops.procs().await;
    let procs = &job.procs;
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
        series: vec![(Arc::new(LabelSet::default()), Value::F64(job.cpu_seconds))],
    });
    snap.families.extend(added);
}

/// Appends the alarm counters to a scrape: `shmetrics_alarms_fired_total{kind,action}`,
/// `shmetrics_alarms_suppressed_total{kind}`, `shmetrics_alarm_actions_failed_total{action}`.
pub fn alarm_families(ops: &Ops, snap: &mut Snapshot) {
    let Some(p) = ops.alarms() else { return };
    let st = p.stats();
    let counter = |name: &str, help: &str, labels: &[&str]| {
        let label_names: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        Arc::new(FamilyMeta {
            desc: MetricDesc {
                name: name.into(),
                help: help.into(),
                metric_type: MetricType::Counter,
                value_type: ValueType::U64,
                gauge_mode: None,
                label_names: label_names.clone(),
                buckets: Vec::new(),
            },
            label_names,
        })
    };
    let pairs = |v: &[(&str, &str)]| {
        Arc::new(LabelSet::new(v.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()))
    };
    let kinds = [
        crate::alarm::EventKind::Crash,
        crate::alarm::EventKind::Fatal,
        crate::alarm::EventKind::Memory,
        crate::alarm::EventKind::Threshold,
    ];
    let actions: Vec<String> = p.config().actions.keys().cloned().collect();
    let mut fired = Vec::new();
    for k in kinds {
        for a in &actions {
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
            snap.families.push(SnapFamily { meta, series });
        }
    }
}
