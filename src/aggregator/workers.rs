//! Who is alive in the directory: the live writers (and which of them are masters), readiness,
//! and what the job's processes look like to [`crate::procs`] (masters, CPU time, workers
//! without a file).

use std::collections::HashMap;

use super::{Aggregator, WorkerInfo};
use crate::layout::{self, header};
use crate::procs;

impl Aggregator {
    /// Live workers as of the last scan.
    pub fn workers(&self) -> &[WorkerInfo] {
        &self.workers
    }

    /// Whether any worker (a shmetrics file or a live Python process) was seen since start.
    pub fn workers_ever_seen(&self) -> bool {
        self.ever_seen
    }

    /// Ready workers: shmetrics workers that set their ready flag (as of the last scan), plus the
    /// other workers found at the last [`Aggregator::account`] that count as ready (Python workers,
    /// which have no way to say so, and workers forked without a file; see `procs`). Masters are
    /// not workers.
    pub fn ready_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.ready && !w.master).count() + self.other_workers.1
    }

    /// Live workers (masters not included), ready or not: see [`Aggregator::ready_workers`].
    pub fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| !w.master).count() + self.other_workers.0
    }

    /// What `procs::collect` needs to know of the job.
    pub fn job_input(&self) -> procs::JobInput {
        procs::JobInput {
            files: self
                .workers
                .iter()
                .map(|w| procs::FileProc {
                    pid: w.pid,
                    start_time_ns: w.start_time_ns,
                    master: w.master,
                    ready: w.ready,
                    shared_forks: w.shared_forks,
                })
                .collect(),
            python: self.python_pids(),
            masters: self.cpu.masters().clone(),
        }
    }

    /// Takes in a fresh look at the job's processes (`procs::collect` of `Aggregator::job_input`):
    /// who the masters are, workers without files, and the job's CPU time. Returns the job's CPU
    /// seconds, which never go down (see `procs`).
    pub fn account(&mut self, table: &[procs::ProcStats]) -> f64 {
        if self.cpu.account(table, procs::exists) {
            self.totals.cpu_seconds = self.cpu.archived();
            self.totals.cpu_bases = self.cpu.bases();
            self.folds.touch();
        }
        let files: std::collections::HashSet<i32> =
            self.workers.iter().filter_map(|w| i32::try_from(w.pid).ok()).collect();
        let others = table.iter().filter(|p| p.kind.is_worker() && !files.contains(&p.pid));
        self.other_workers = others.fold((0, 0), |(l, r), p| (l + 1, r + usize::from(p.ready)));
        self.stats.live_workers = self.live_workers();
        self.ever_seen |= self.stats.live_workers > 0;
        self.cpu.total()
    }

    /// Pids of the live Python processes as of the last scan.
    pub fn python_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> =
            self.py.values().filter(|t| t.alive).filter_map(|t| t.file.name.pid()).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub(super) fn collect_workers(&mut self) {
        // A file that another file names as its parent is a master's, for as long as it lives.
        let by_pid: HashMap<u64, [u8; 16]> =
            self.files.values().filter(|t| !t.dead).map(|t| (t.file.pid, t.file.file_id)).collect();
        for t in self.files.values().filter(|t| t.file.parent_pid != 0) {
            if let Some(id) = by_pid.get(&t.file.parent_pid) {
                self.master_files.insert(*id);
            }
        }
        let live_ids: std::collections::HashSet<[u8; 16]> = by_pid.values().copied().collect();
        self.master_files.retain(|id| live_ids.contains(id));
        let masters = &self.master_files;
        let mut workers: Vec<WorkerInfo> = self
            .files
            .values_mut()
            .filter(|t| !t.dead)
            .map(|t| WorkerInfo {
                pid: t.file.pid,
                start_time_ns: t.file.start_time_ns,
                parent_pid: t.file.parent_pid,
                ready: t.file.header_word(header::FLAGS) & layout::flags::READY != 0,
                path: t.file.path().to_path_buf(),
                master: masters.contains(&t.file.file_id),
                shared_forks: t.file.header_word(header::SHARED_FORKS),
            })
            .collect();
        workers.sort_by_key(|w| (w.start_time_ns, w.pid));
        self.stats.live_dropped_series =
            self.files.values_mut().map(|t| t.file.header_word(header::DROPPED_SERIES)).sum();
        self.stats.live_dropped_updates =
            self.files.values_mut().map(|t| t.file.header_word(header::DROPPED_UPDATES)).sum();
        self.stats.live_shared_forks =
            self.files.values_mut().map(|t| t.file.header_word(header::SHARED_FORKS)).sum();
        self.stats.totals = self.totals.clone();
        self.workers = workers;
        self.stats.live_workers = self.live_workers();
        self.ever_seen |= self.stats.live_workers > 0;
    }
}
