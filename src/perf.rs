//! What the job is doing, from the last scan and `/proc`: `perf_metrics` (JSON), `monitor` (text)
//! and the per-process metrics added to `/metrics`.
//!
//! Python's multiprocess mode cannot report per-process memory or CPU; the aggregator can, because
//! it knows every worker's pid. Memory follows ftw.monitor: RSS from `statm`, USS (private pages)
//! and PSS (proportional share) from `smaps_rollup`, in bytes, `-1` where unavailable (another
//! user's process, a kernel without `smaps_rollup`, another pid namespace). Reading `smaps_rollup`
//! walks a process's page tables, so figures are cached for [`TTL`].

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::layout::{GaugeMode, MetricDesc, MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::ops::Ops;

/// How long process figures are reused.
pub const TTL: Duration = Duration::from_secs(2);

/// Figures about one process. Bytes and counts are `-1` where unavailable.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcStats {
    /// The pid.
    pub pid: i32,
    /// What it is: `shmetrics` or `python` (a worker), or `master` (a worker's parent).
    pub kind: &'static str,
    /// Resident set size, bytes.
    pub rss: i64,
    /// Unique set size (private pages), bytes.
    pub uss: i64,
    /// Proportional set size, bytes.
    pub pss: i64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: i64,
    /// Threads.
    pub threads: i64,
    /// Start time, unix seconds.
    pub start_time: f64,
    /// Whether the worker declared itself ready (Python workers: alive).
    pub ready: bool,
}

/// Wall-clock time of boot, unix seconds.
fn boot_time() -> f64 {
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9);
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    now - since_boot
}

/// Reads `/proc/<pid>`. `not_after`: the process must have started by then (unix seconds) — a
/// later start means the pid belongs to another process now (or another pid namespace).
fn read(pid: i32, kind: &'static str, ready: bool, not_after: Option<f64>) -> Option<ProcStats> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let tps = procfs::ticks_per_second() as f64;
    let start_time = boot_time() + stat.starttime as f64 / tps;
    if not_after.is_some_and(|t| start_time > t + 0.1) {
        return None;
    }
    let page = procfs::page_size() as i64;
    let rss = p.statm().map_or(-1, |m| m.resident as i64 * page);
    let (uss, pss) = match p.smaps_rollup() {
        Ok(r) => {
            let (mut uss, mut pss) = (0i64, 0i64);
            for m in r.memory_map_rollup.iter() {
                let get = |k: &str| m.extension.map.get(k).copied().unwrap_or(0) as i64;
                uss += get("Private_Clean") + get("Private_Dirty");
                pss += get("Pss");
            }
            (uss, pss)
        }
        Err(_) => (-1, -1),
    };
    Some(ProcStats {
        pid,
        kind,
        rss,
        uss,
        pss,
        cpu_seconds: (stat.utime + stat.stime) as f64 / tps,
        open_fds: p.fd_count().map_or(-1, |n| n as i64),
        threads: stat.num_threads,
        start_time,
        ready,
    })
}

/// The job's processes as of the last scan: workers, then their parents (the master), once each.
fn collect(ops: &Ops) -> Vec<ProcStats> {
    let (workers, python) = ops.shared().with(|a| (a.workers().to_vec(), a.python_pids()));
    let mut out: Vec<ProcStats> = Vec::new();
    for w in &workers {
        let Ok(pid) = i32::try_from(w.pid) else { continue };
        // The file was created by the process: a process that started later is not that worker.
        let created = w.start_time_ns as f64 / 1e9;
        // A writer that others were forked from is the master, not a worker.
        let kind = if workers.iter().any(|o| o.parent_pid == w.pid) { "master" } else { "shmetrics" };
        if let Some(s) = read(pid, kind, w.ready, Some(created)) {
            out.push(s);
        }
    }
    for pid in python {
        if let Some(s) = read(pid, "python", true, None) {
            out.push(s);
        }
    }
    let me = std::process::id() as i32;
    let mut parents: Vec<i32> = out
        .iter()
        .filter_map(|s| procfs::process::Process::new(s.pid).and_then(|p| p.stat()).ok().map(|st| st.ppid))
        .filter(|pp| *pp > 1 && *pp != me)
        .collect();
    parents.sort_unstable();
    parents.dedup();
    for pp in parents {
        if out.iter().any(|s| s.pid == pp) {
            continue;
        }
        if let Some(s) = read(pp, "master", true, None) {
            out.push(s);
        }
    }
    out
}

/// Cached process figures.
#[derive(Default)]
pub struct ProcCache {
    cached: Mutex<Option<(Instant, Arc<Vec<ProcStats>>)>>,
}

impl ProcCache {
    /// The job's process figures, at most [`TTL`] old.
    pub async fn get(&self, ops: &Arc<Ops>) -> Arc<Vec<ProcStats>> {
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

/// Sums a field over processes, `-1` if any value is unavailable.
fn total(procs: &[ProcStats], f: impl Fn(&ProcStats) -> i64) -> i64 {
    procs.iter().map(&f).try_fold(0i64, |acc, v| (v >= 0).then_some(acc + v)).unwrap_or(-1)
}

/// The `perf_metrics` document. With `interval` (seconds, at most 10), CPU use is measured over
/// that interval and reported as a percentage of one core.
pub async fn document(ops: &Arc<Ops>, interval: Option<f64>) -> serde_json::Value {
    let health = ops.health().await;
    let procs = ops.procs().await;
    let cpu_percent: Option<Vec<(i32, f64)>> = match interval.filter(|i| *i > 0.0 && *i <= 10.0) {
        Some(secs) => {
            let before: Vec<(i32, f64)> = procs.iter().map(|p| (p.pid, p.cpu_seconds)).collect();
            // Filtered to (0, 10] above (NaN too); `try_` all the same: it comes from a client.
            tokio::time::sleep(Duration::try_from_secs_f64(secs).unwrap_or_default()).await;
            let ops2 = Arc::clone(ops);
            let after = tokio::task::spawn_blocking(move || collect(&ops2)).await.unwrap_or_default();
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
                "kind": p.kind,
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
            "rss": total(&procs, |p| p.rss),
            "uss": total(&procs, |p| p.uss),
            "pss": total(&procs, |p| p.pss),
        },
        "cpu": { "seconds": procs.iter().fold(0.0, |a, p| a + p.cpu_seconds) },
        "workers": workers,
        "metrics": {
            "files": stats.files,
            "python_files": stats.python_files,
            "series": stats.series,
            "live_workers": procs.iter().filter(|p| p.kind != "master").count(),
            "dead_workers_archived": stats.totals.dead_workers,
            "crashed_workers": stats.totals.crashed_workers,
            "python_files_compacted": stats.totals.python_files_compacted,
            "bad_files": bad,
            "dropped_series": stats.totals.dropped_series + stats.live_dropped_series,
            "dropped_updates": stats.totals.dropped_updates + stats.live_dropped_updates,
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
    let procs = ops.procs().await;
    let me = read(std::process::id() as i32, "aggregator", true, None);
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut out = format!(
        "aggregator pid {} rss {} uptime {:.0} s\n",
        std::process::id(),
        mib(me.map_or(-1, |m| m.rss)),
        ops.uptime().as_secs_f64()
    );
    let workers = procs.iter().filter(|p| p.kind != "master").count();
    let ready = procs.iter().filter(|p| p.kind != "master" && p.ready).count();
    out.push_str(&format!("workers: {workers} live, {ready} ready\n"));
    for p in procs.iter() {
        out.push_str(&format!(
            "  {:<9} pid {:<7} rss {:>10}  uptime {:>6.0} s{}\n",
            p.kind,
            p.pid,
            mib(p.rss),
            now - p.start_time,
            if p.kind != "master" && !p.ready { "  not ready" } else { "" }
        ));
    }
    out
}

fn meta(name: &str, help: &str, t: MetricType) -> Arc<FamilyMeta> {
    Arc::new(FamilyMeta {
        desc: MetricDesc {
            name: name.into(),
            help: help.into(),
            metric_type: t,
            value_type: ValueType::F64,
            gauge_mode: (t == MetricType::Gauge).then_some(GaugeMode::Sum),
            label_names: vec!["pid".into()],
            buckets: Vec::new(),
        },
        label_names: vec!["pid".into()],
    })
}

/// Appends per-process metrics (labelled `pid`) and job totals (no `pid` label) to a scrape:
/// `process_resident_memory_bytes`, `process_unique_memory_bytes`, `process_proportional_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, `process_start_time_seconds`. Families the
/// application already exposes under those names are left alone.
pub async fn process_families(ops: &Arc<Ops>, snap: &mut Snapshot) {
    let procs = ops.procs().await;
    if procs.is_empty() {
        return;
    }
    type Field = fn(&ProcStats) -> f64;
    let fams: [(&str, &str, MetricType, Field, bool); 6] = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes (job total without pid).",
            MetricType::Gauge,
            |p| p.rss as f64,
            true,
        ),
        (
            "process_unique_memory_bytes",
            "Unique set size (private memory) in bytes (job total without pid).",
            MetricType::Gauge,
            |p| p.uss as f64,
            true,
        ),
        (
            "process_proportional_memory_bytes",
            "Proportional set size in bytes (job total without pid).",
            MetricType::Gauge,
            |p| p.pss as f64,
            true,
        ),
        (
            "process_cpu_seconds_total",
            "User and system CPU time spent in seconds (job total without pid).",
            MetricType::Counter,
            |p| p.cpu_seconds,
            true,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors (job total without pid).",
            MetricType::Gauge,
            |p| p.open_fds as f64,
            true,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            MetricType::Gauge,
            |p| p.start_time,
            false,
        ),
    ];
    for (name, help, t, field, with_total) in fams {
        let base = name.strip_suffix("_total").unwrap_or(name);
        if snap.families.iter().any(|f| f.meta.desc.name == base) {
            continue;
        }
        let mut series: Vec<(Arc<LabelSet>, Value)> = Vec::new();
        let mut sum = 0.0;
        let mut complete = true;
        for p in procs.iter() {
            let v = field(p);
            if v < 0.0 {
                complete = false;
                continue;
            }
            sum += v;
            series.push((Arc::new(LabelSet::new(vec![("pid".into(), p.pid.to_string())])), Value::F64(v)));
        }
        if with_total && complete {
            series.insert(0, (Arc::new(LabelSet::default()), Value::F64(sum)));
        }
        if !series.is_empty() {
            snap.families.push(SnapFamily { meta: meta(base, help, t), series });
        }
    }
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
