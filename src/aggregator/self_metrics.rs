//! The aggregator's own metrics (`shmetrics_*`): what it follows, what it folded, what it had
//! to skip or drop, and how its scrapes and merges went. Appended to every merged snapshot.

use std::sync::Arc;

use super::Aggregator;
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Snapshot, Value};
use crate::reader::BadReason;

impl Aggregator {
    pub(super) fn self_metrics(&self, snap: &mut Snapshot) {
        let s = &self.stats;
        let m = &self.self_meta;
        let one = |meta: &Arc<FamilyMeta>, v: Value| SnapFamily {
            meta: Arc::clone(meta),
            series: vec![(Arc::clone(&m.no_labels), v)],
        };
        let mut fams = vec![
            one(&m.scrape_seconds, Value::F64(s.last_scrape.as_secs_f64())),
            one(&m.scrapes, Value::U64(s.scrapes)),
            one(&m.merges, Value::U64(s.merges)),
            one(&m.files, Value::F64(s.files as f64)),
            one(&m.live, Value::F64(s.live_workers as f64)),
            one(&m.dead, Value::U64(s.totals.dead_workers)),
            one(&m.crashed, Value::U64(s.totals.crashed_workers)),
            one(&m.series, Value::F64(s.series as f64)),
            one(&m.conflicts, Value::F64(s.conflicts as f64)),
            one(&m.bad_events, Value::U64(s.bad_file_events)),
            one(&m.dropped_series, Value::U64(s.totals.dropped_series + s.live_dropped_series)),
            one(&m.dropped_updates, Value::U64(s.totals.dropped_updates + s.live_dropped_updates)),
            one(&m.shared_forks, Value::U64(s.totals.shared_forks + s.live_shared_forks)),
            one(&m.python_files, Value::F64(s.python_files as f64)),
            one(&m.python_processes, Value::F64(s.python_processes as f64)),
            one(&m.python_folded, Value::U64(s.totals.python_files_compacted)),
            one(&m.save_errors, Value::U64(s.archive_save_errors)),
            one(&m.corrupt_archives, Value::F64(s.corrupt_archives as f64)),
            one(&m.pending_removal, Value::F64(s.pending_removal as f64)),
            one(&m.invalid_values, Value::F64(s.invalid_values as f64)),
        ];
        let mut bad = SnapFamily { meta: Arc::clone(&m.bad_files), series: Vec::new() };
        for reason in BadReason::ALL {
            let n = s.bad_files.get(&reason).copied().unwrap_or(0);
            let labels = Arc::new(LabelSet::new(vec![("reason".to_string(), reason.as_str().to_string())]));
            bad.series.push((labels, Value::F64(n as f64)));
        }
        fams.push(bad);
        fams.sort_by(|a, b| a.meta.desc.name.cmp(&b.meta.desc.name));
        snap.families.extend(fams);
    }
}

/// Descriptions of the aggregator's own metrics.
pub(super) struct SelfMeta {
    no_labels: Arc<LabelSet>,
    scrape_seconds: Arc<FamilyMeta>,
    scrapes: Arc<FamilyMeta>,
    merges: Arc<FamilyMeta>,
    files: Arc<FamilyMeta>,
    live: Arc<FamilyMeta>,
    dead: Arc<FamilyMeta>,
    crashed: Arc<FamilyMeta>,
    series: Arc<FamilyMeta>,
    conflicts: Arc<FamilyMeta>,
    bad_files: Arc<FamilyMeta>,
    bad_events: Arc<FamilyMeta>,
    dropped_series: Arc<FamilyMeta>,
    dropped_updates: Arc<FamilyMeta>,
    shared_forks: Arc<FamilyMeta>,
    python_files: Arc<FamilyMeta>,
    python_processes: Arc<FamilyMeta>,
    python_folded: Arc<FamilyMeta>,
    save_errors: Arc<FamilyMeta>,
    corrupt_archives: Arc<FamilyMeta>,
    pending_removal: Arc<FamilyMeta>,
    invalid_values: Arc<FamilyMeta>,
}

fn meta(name: &str, help: &str, t: MetricType, labels: &[&str]) -> Arc<FamilyMeta> {
    let v = if t == MetricType::Counter { ValueType::U64 } else { ValueType::F64 };
    FamilyMeta::own(name, help, t, v, labels)
}

impl SelfMeta {
    pub(super) fn new() -> SelfMeta {
        use MetricType::{Counter, Gauge};
        SelfMeta {
            no_labels: Arc::new(LabelSet::default()),
            scrape_seconds: meta(
                "shmetrics_scrape_duration_seconds",
                "Time the last scrape took to read and merge all files.",
                Gauge,
                &[],
            ),
            scrapes: meta("shmetrics_scrapes", "Scrapes served by this aggregator.", Counter, &[]),
            merges: meta(
                "shmetrics_merges",
                "Merges of every file: concurrent scrapes share one (at most one runs at a time).",
                Counter,
                &[],
            ),
            files: meta("shmetrics_files", "Worker files followed in the last scrape.", Gauge, &[]),
            live: meta("shmetrics_workers_live", "Workers alive in the last scrape.", Gauge, &[]),
            dead: meta(
                "shmetrics_workers_dead",
                "Workers that exited and were folded into the archive.",
                Counter,
                &[],
            ),
            crashed: meta(
                "shmetrics_workers_crashed",
                "Dead workers that did not exit cleanly (killed or crashed).",
                Counter,
                &[],
            ),
            series: meta(
                "shmetrics_series",
                "Merged series exposed in the last scrape, without these self metrics.",
                Gauge,
                &[],
            ),
            conflicts: meta(
                "shmetrics_metric_conflicts",
                "Metric definitions skipped because another process defined the same name differently.",
                Gauge,
                &[],
            ),
            bad_files: meta(
                "shmetrics_bad_files",
                "Files in the directory skipped in the last scrape, by reason.",
                Gauge,
                &["reason"],
            ),
            bad_events: meta("shmetrics_bad_file_events", "Times a file was found unreadable.", Counter, &[]),
            dropped_series: meta(
                "shmetrics_dropped_series",
                "Series workers could not register because a file or the disk was full.",
                Counter,
                &[],
            ),
            dropped_updates: meta(
                "shmetrics_dropped_updates",
                "Updates workers dropped because their series had no room.",
                Counter,
                &[],
            ),
            shared_forks: meta(
                "shmetrics_shared_forks",
                "Forked workers that could not create their own file (disk full) and write into their parent's.",
                Counter,
                &[],
            ),
            python_files: meta(
                "shmetrics_python_files",
                "Python prometheus_client files followed in the last scrape.",
                Gauge,
                &[],
            ),
            python_processes: meta(
                "shmetrics_python_processes",
                "Live processes among the Python prometheus_client files.",
                Gauge,
                &[],
            ),
            python_folded: meta(
                "shmetrics_python_files_compacted",
                "Dead Python processes' files folded into the archive (--compact-python).",
                Counter,
                &[],
            ),
            save_errors: meta(
                "shmetrics_archive_save_errors",
                "Archive saves that failed (disk full, I/O errors); dead workers' files are kept until one works.",
                Counter,
                &[],
            ),
            corrupt_archives: meta(
                "shmetrics_archive_corrupt_files",
                "Unusable archives set aside at start-up (archive.json.corrupt-*) still in the directory.",
                Gauge,
                &[],
            ),
            pending_removal: meta(
                "shmetrics_files_pending_removal",
                "Dead workers' files folded into the archive and waiting for it to be saved before removal.",
                Gauge,
                &[],
            ),
            invalid_values: meta(
                "shmetrics_invalid_values",
                "Series of live workers ignored in the last scrape because their slots hold an invalid value (an enum state index out of range).",
                Gauge,
                &[],
            ),
        }
    }
}
