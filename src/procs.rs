//! The job's processes: which are workers and which are masters, their figures from `/proc`, and
//! the job's CPU time, which never goes backwards.
//!
//! # Who is who
//!
//! The job's processes are found from the directory: every live shmetrics file names its writer
//! (and the writer it was forked from), every live Python prometheus_client file its process. Then:
//!
//! - a **master** is a process the job's workers were forked from: a shmetrics writer that other
//!   files name as their parent, or any process that has forked one of the job's processes
//!   *without exec* — the child still runs its parent's program image (the same code and stack
//!   addresses in `/proc/<pid>/stat`, which an exec would have re-randomised). Once a master,
//!   always a master (a master whose workers all died is not a worker). The process that
//!   started the server (a shell, `timeout`, supervisord, `shmetrics run`) exec'd it, so it is never
//!   taken for a master;
//! - a **worker** is every other process of the job, plus the children a master forked that have
//!   no file (yet): a Python worker writes its first file only when it first updates a metric,
//!   and a forked worker on a full disk has none (it writes into its master's). Such workers count
//!   as ready while they live, like Python workers, which have no way to say they are ready.
//!
//! One window is left: a master that loaded the application before forking (gunicorn's
//! `preload_app`, uWSGI without `lazy-apps`) has written its files before it forks, and until then
//! looks exactly like a single-process app. So a Python process that no other process of the job
//! forked counts as ready only once it has run [`LONE_GRACE`] without forking: a preloading master
//! forks its workers well within that, a single-process app is ready a few seconds late.
//!
//! # CPU time that never goes backwards
//!
//! A job-wide CPU counter summed over live processes drops whenever a worker dies. Instead each
//! process contributes its own CPU time plus the CPU time of the children it reaped since it was
//! first seen (`cutime` + `cstime` grow by a child's final CPU time when its parent reaps it).
//! When a worker disappears, its parent's reaped-children time already holds its final CPU time
//! — including CPU used after the last look, and workers that lived and died between two looks.
//! A process that disappears without a tracked parent (a master, an orphan) has its last
//! contribution folded into the archive ([`CpuLedger`]), like a dead worker's counters. The total
//! only grows: each process's contribution grows while it lives and is then carried by its parent
//! or the archive.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// What a process is to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A worker writing shmetrics files (or forked from a shmetrics master without a file).
    Shmetrics,
    /// A worker writing Python prometheus_client files (or forked from a Python master).
    Python,
    /// A master: the job's workers were forked from it.
    Master,
}

impl Kind {
    /// The word used in `perf_metrics` and the `monitor` command.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Shmetrics => "shmetrics",
            Kind::Python => "python",
            Kind::Master => "master",
        }
    }

    /// Whether the process is a worker (not a master).
    pub fn is_worker(self) -> bool {
        self != Kind::Master
    }
}

/// How long a Python process that no process of the job forked must run without forking before it
/// counts as a ready worker (see the module docs).
pub const LONE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A process, as the kernel knows it across its life: pid and start time in clock ticks.
pub type ProcKey = (i32, u64);

/// Figures about one process. Bytes and counts are `-1` where unavailable.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcStats {
    /// The pid.
    pub pid: i32,
    /// Worker or master.
    pub kind: Kind,
    /// Resident set size, bytes.
    pub rss: i64,
    /// Unique set size (private pages), bytes.
    pub uss: i64,
    /// Proportional set size, bytes.
    pub pss: i64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// User + system CPU time of the children it reaped, seconds.
    pub children_cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: i64,
    /// Threads.
    pub threads: i64,
    /// Start time, unix seconds.
    pub start_time: f64,
    /// Start time, clock ticks since boot (with the pid, the process's identity).
    pub start_ticks: u64,
    /// Parent pid.
    pub ppid: i32,
    /// Whether the worker declared itself ready (Python workers and workers without a file: alive).
    pub ready: bool,
}

impl ProcStats {
    /// The process's identity.
    pub fn key(&self) -> ProcKey {
        (self.pid, self.start_ticks)
    }
}

/// A live shmetrics file, as the aggregator knows it.
#[derive(Clone, Debug)]
pub struct FileProc {
    /// The writer's pid.
    pub pid: u64,
    /// When it created the file, unix ns: a process that started later is not that writer.
    pub start_time_ns: u64,
    /// Whether other files name it as their parent.
    pub master: bool,
    /// Whether it declared itself ready.
    pub ready: bool,
    /// Children that write into this file, not having one of their own (header `shared_forks`).
    pub shared_forks: u64,
}

/// What the aggregator knows of the job, for [`collect`].
#[derive(Clone, Debug, Default)]
pub struct JobInput {
    /// Live shmetrics files.
    pub files: Vec<FileProc>,
    /// Pids of live Python processes (from their files).
    pub python: Vec<i32>,
    /// Processes known to be masters (sticky, see the module docs).
    pub masters: HashSet<ProcKey>,
}

/// Now, unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This process's resident memory in bytes, `-1` if `/proc` cannot tell.
pub fn own_rss() -> i64 {
    procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map_or(-1, |m| m.resident as i64 * procfs::page_size() as i64)
}

/// Wall-clock time of boot, unix seconds, to sub-millisecond precision (`/proc/stat`'s `btime` is
/// whole seconds).
pub fn boot_time() -> Option<f64> {
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    Some(now - (since_boot.tv_sec() as f64 + since_boot.tv_nsec() as f64 * 1e-9))
}

/// Start time of a process in clock ticks since boot, as unix seconds.
fn ticks_to_unix(ticks: u64, boot: f64) -> f64 {
    boot + ticks as f64 / procfs::ticks_per_second() as f64
}

/// When process `pid` started (unix seconds), or `None` if there is no such process.
pub fn process_start(pid: i32) -> Option<f64> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    Some(ticks_to_unix(stat.starttime, boot_time()?))
}

/// The parts of `/proc/<pid>/stat` that tell who forked whom.
#[derive(Clone, Copy, Debug)]
struct Image {
    ppid: i32,
    zombie: bool,
    code: (u64, u64, u64),
}

impl Image {
    fn of(stat: &procfs::process::Stat) -> Image {
        Image {
            ppid: stat.ppid,
            zombie: stat.state == 'Z' || stat.state == 'X',
            code: (stat.startcode, stat.endcode, stat.startstack),
        }
    }

    /// Whether `self` was forked from `parent` and exec'd nothing since: the same program image at
    /// the same (randomised) addresses. Zombies and unreadable images (zeros) never match.
    fn forked_from(&self, parent: &Image) -> bool {
        !self.zombie && !parent.zombie && self.code != (0, 0, 0) && self.code == parent.code
    }
}

/// Reads `/proc/<pid>`. `not_after`: the process must have started by then (unix seconds) — a
/// later start means the pid belongs to another process now (or another pid namespace).
fn read(pid: i32, kind: Kind, ready: bool, not_after: Option<f64>) -> Option<(ProcStats, Image)> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let image = Image::of(&stat);
    if image.zombie {
        return None; // dead, waiting for its parent: its memory is gone, its CPU time is final
    }
    let tps = procfs::ticks_per_second() as f64;
    let start_time = ticks_to_unix(stat.starttime, boot_time().unwrap_or(0.0));
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
    let stats = ProcStats {
        pid,
        kind,
        rss,
        uss,
        pss,
        cpu_seconds: (stat.utime + stat.stime) as f64 / tps,
        children_cpu_seconds: (stat.cutime.max(0) + stat.cstime.max(0)) as f64 / tps,
        open_fds: p.fd_count().map_or(-1, |n| n as i64),
        threads: stat.num_threads,
        start_time,
        start_ticks: stat.starttime,
        ppid: stat.ppid,
        ready,
    };
    Some((stats, image))
}

/// Every process's pid, parent and image: the only way to find children on kernels without
/// `/proc/<pid>/task/<tid>/children`.
fn all_images() -> Vec<(i32, Image)> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten().filter_map(|p| p.stat().ok().map(|s| (s.pid, Image::of(&s)))).collect()
}

/// The job's processes: workers, then masters, once each (see the module docs for who is who).
pub fn collect(input: &JobInput) -> Vec<ProcStats> {
    let me = std::process::id() as i32;
    let mut out: Vec<ProcStats> = Vec::new();
    let mut images: HashMap<i32, Image> = HashMap::new();
    for f in &input.files {
        let Ok(pid) = i32::try_from(f.pid) else { continue };
        let kind = if f.master { Kind::Master } else { Kind::Shmetrics };
        if let Some((s, img)) = read(pid, kind, f.ready, Some(f.start_time_ns as f64 / 1e9)) {
            images.insert(pid, img);
            out.push(s);
        }
    }
    for &pid in &input.python {
        if images.contains_key(&pid) {
            continue;
        }
        if let Some((s, img)) = read(pid, Kind::Python, true, None) {
            images.insert(pid, img);
            out.push(s);
        }
    }
    for s in &mut out {
        if input.masters.contains(&s.key()) {
            s.kind = Kind::Master;
        }
    }
    // Python masters and workers that have no file yet are found among the children of the job's
    // processes; so are workers on a full disk (no file of their own). Listing every process is
    // the price, paid only when such processes can exist.
    let scan = !input.python.is_empty() || input.files.iter().any(|f| f.shared_forks > 0);
    if scan {
        let all = all_images();
        let mut children: HashMap<i32, Vec<(i32, Image)>> = HashMap::new();
        for (pid, img) in &all {
            children.entry(img.ppid).or_default().push((*pid, *img));
        }
        let listed: Vec<(usize, i32)> = out.iter().enumerate().map(|(i, s)| (i, s.pid)).collect();
        for (i, pid) in listed {
            let Some(img) = images.get(&pid).copied() else { continue };
            let forked: Vec<(i32, Image)> = children
                .get(&pid)
                .map(|c| c.iter().filter(|(_, ci)| ci.forked_from(&img)).copied().collect())
                .unwrap_or_default();
            if forked.is_empty() {
                continue;
            }
            let python = out[i].kind == Kind::Python || input.python.contains(&pid);
            out[i].kind = Kind::Master;
            let worker_kind = if python { Kind::Python } else { Kind::Shmetrics };
            for (cpid, _) in forked {
                if images.contains_key(&cpid) {
                    continue;
                }
                if let Some((s, cimg)) = read(cpid, worker_kind, true, None) {
                    images.insert(cpid, cimg);
                    out.push(s);
                }
            }
        }
    }
    // Masters that have no file: the parents the job's workers were forked from.
    let mut parents: Vec<(i32, Image, Kind)> = out
        .iter()
        .filter(|s| s.kind.is_worker())
        .filter(|s| s.ppid > 1 && s.ppid != me && !images.contains_key(&s.ppid))
        .filter_map(|s| images.get(&s.pid).map(|img| (s.ppid, *img, s.kind)))
        .collect();
    parents.sort_by_key(|(pid, _, _)| *pid);
    parents.dedup_by_key(|(pid, _, _)| *pid);
    for (ppid, child_img, _) in parents {
        if images.contains_key(&ppid) {
            continue;
        }
        if let Some((s, img)) = read(ppid, Kind::Master, true, None) {
            if child_img.forked_from(&img) {
                images.insert(ppid, img);
                out.push(s);
            }
        }
    }
    // A lone Python process may be a preloading master about to fork (see the module docs).
    let now = unix_now();
    for s in &mut out {
        let lone = s.kind == Kind::Python && !images.contains_key(&s.ppid);
        if lone && now - s.start_time < LONE_GRACE.as_secs_f64() {
            s.ready = false;
        }
    }
    out
}

/// Sums a field over processes, `-1` if any value is unavailable.
pub fn total(procs: &[ProcStats], f: impl Fn(&ProcStats) -> i64) -> i64 {
    procs.iter().map(&f).try_fold(0i64, |acc, v| (v >= 0).then_some(acc + v)).unwrap_or(-1)
}

/// One process's part of the job's CPU time.
#[derive(Clone, Copy, Debug)]
struct Seen {
    own: f64,
    children: f64,
    /// Reaped-children time it had when first seen: not the job's.
    base: f64,
    ppid: i32,
}

impl Seen {
    fn contribution(&self) -> f64 {
        self.own + (self.children - self.base).max(0.0)
    }
}

/// The job's CPU time (see the module docs): gone processes' time (persisted in the archive) plus
/// each live process's own time and the time of the children it reaped since it was first seen.
#[derive(Clone, Debug, Default)]
pub struct CpuLedger {
    /// CPU seconds of gone processes whose parent did not carry them.
    archived: f64,
    live: HashMap<ProcKey, Seen>,
    /// Bases of masters, persisted so that a restarted aggregator continues their deltas.
    bases: HashMap<ProcKey, f64>,
    /// Masters, sticky while they live.
    masters: HashSet<ProcKey>,
}

impl CpuLedger {
    /// A ledger continuing an archive's totals.
    pub fn restore(archived: f64, bases: &[(i32, u64, f64)]) -> CpuLedger {
        let archived = if archived.is_finite() && archived > 0.0 { archived } else { 0.0 };
        let bases = bases.iter().filter(|b| b.2.is_finite()).map(|&(p, t, b)| ((p, t), b)).collect();
        CpuLedger { archived, bases, ..CpuLedger::default() }
    }

    /// Gone processes' CPU seconds, for the archive.
    pub fn archived(&self) -> f64 {
        self.archived
    }

    /// Masters' bases, for the archive.
    pub fn bases(&self) -> Vec<(i32, u64, f64)> {
        let mut v: Vec<(i32, u64, f64)> = self.bases.iter().map(|(&(p, t), &b)| (p, t, b)).collect();
        v.sort_by_key(|&(p, t, _)| (p, t));
        v
    }

    /// Processes known to be masters.
    pub fn masters(&self) -> &HashSet<ProcKey> {
        &self.masters
    }

    /// Takes a new look at the job's processes. `alive` tells whether a process that is no longer
    /// listed still exists (it is then kept as it was). Returns whether what the archive holds
    /// changed.
    pub fn account(&mut self, procs: &[ProcStats], alive: impl Fn(ProcKey) -> bool) -> bool {
        let mut changed = false;
        let now: HashMap<ProcKey, &ProcStats> = procs.iter().map(|p| (p.key(), p)).collect();
        let listed_pids: HashSet<i32> = procs.iter().map(|p| p.pid).collect();
        let gone: Vec<ProcKey> = self.live.keys().filter(|k| !now.contains_key(k)).copied().collect();
        for k in gone {
            if alive(k) {
                continue;
            }
            let Some(seen) = self.live.remove(&k) else { continue };
            // Reaped by a parent we follow: its final time is in that parent's children time.
            if !listed_pids.contains(&seen.ppid) {
                let c = seen.contribution();
                if c.is_finite() && c > 0.0 {
                    self.archived += c;
                    changed = true;
                }
            }
            if self.bases.remove(&k).is_some() {
                changed = true;
            }
            self.masters.remove(&k);
        }
        for p in procs {
            let k = p.key();
            let base = self.bases.get(&k).copied().unwrap_or(p.children_cpu_seconds);
            let seen = self.live.entry(k).or_insert(Seen { own: 0.0, children: base, base, ppid: p.ppid });
            seen.own = seen.own.max(p.cpu_seconds);
            seen.children = seen.children.max(p.children_cpu_seconds);
            seen.ppid = p.ppid;
            if p.kind == Kind::Master {
                self.masters.insert(k);
                // Saved, so that a restarted aggregator continues this master's delta.
                if let std::collections::hash_map::Entry::Vacant(e) = self.bases.entry(k) {
                    e.insert(seen.base);
                    changed = true;
                }
            }
        }
        changed
    }

    /// The job's CPU seconds: never less than at any earlier call.
    pub fn total(&self) -> f64 {
        self.archived + self.live.values().map(Seen::contribution).sum::<f64>()
    }
}

/// Whether the process `key` still exists (a zombie counts: its parent has not reaped it yet).
pub fn exists(key: ProcKey) -> bool {
    procfs::process::Process::new(key.0).and_then(|p| p.stat()).is_ok_and(|s| s.starttime == key.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, kind: Kind, own: f64, children: f64) -> ProcStats {
        ProcStats {
            pid,
            kind,
            rss: 0,
            uss: 0,
            pss: 0,
            cpu_seconds: own,
            children_cpu_seconds: children,
            open_fds: 0,
            threads: 1,
            start_time: 0.0,
            start_ticks: pid as u64,
            ppid,
            ready: true,
        }
    }

    #[test]
    fn cpu_never_goes_backwards_as_workers_die() {
        let mut l = CpuLedger::default();
        let gone = |_| false;
        // A master (pid 10, 5 s of its children reaped before we looked) and two workers.
        l.account(
            &[
                p(10, 1, Kind::Master, 1.0, 5.0),
                p(11, 10, Kind::Shmetrics, 2.0, 0.0),
                p(12, 10, Kind::Shmetrics, 3.0, 0.0),
            ],
            gone,
        );
        assert_eq!(l.total(), 6.0);
        // Worker 11 dies after 2.5 s of CPU and is reaped; a worker 13 lives and dies unseen (4 s).
        l.account(
            &[p(10, 1, Kind::Master, 1.0, 5.0 + 2.5 + 4.0), p(12, 10, Kind::Shmetrics, 3.5, 0.0)],
            gone,
        );
        assert_eq!(l.total(), 1.0 + 6.5 + 3.5);
        assert_eq!(l.archived(), 0.0, "the master carries its reaped workers");
        // The master dies (its workers too): its contribution goes to the archive, not lost.
        assert!(l.account(&[], gone));
        assert_eq!(l.archived(), 1.0 + 6.5 + 3.5);
        assert_eq!(l.total(), 11.0);
    }

    #[test]
    fn orphans_and_unlisted_live_processes() {
        let mut l = CpuLedger::default();
        l.account(&[p(20, 1, Kind::Python, 2.0, 0.0)], |_| false);
        // Still alive but not listed this time (a transient): kept as it was.
        l.account(&[], |_| true);
        assert_eq!(l.total(), 2.0);
        // Gone with no tracked parent: archived.
        l.account(&[], |_| false);
        assert_eq!((l.archived(), l.total()), (2.0, 2.0));
    }

    #[test]
    fn a_restarted_aggregator_continues_a_masters_delta() {
        let mut a = CpuLedger::default();
        a.account(&[p(10, 1, Kind::Master, 1.0, 5.0)], |_| false);
        a.account(&[p(10, 1, Kind::Master, 1.0, 9.0)], |_| false);
        assert_eq!(a.total(), 5.0);
        let mut b = CpuLedger::restore(a.archived(), &a.bases());
        b.account(&[p(10, 1, Kind::Master, 1.0, 9.0)], |_| false);
        assert_eq!(b.total(), 5.0, "the base survives the restart");
    }

    #[test]
    fn images() {
        let a = Image { ppid: 1, zombie: false, code: (1, 2, 3) };
        let b = Image { ppid: 5, zombie: false, code: (1, 2, 3) };
        let c = Image { ppid: 5, zombie: false, code: (7, 8, 9) };
        assert!(b.forked_from(&a));
        assert!(!c.forked_from(&a));
        assert!(!Image { zombie: true, ..b }.forked_from(&a));
        assert!(!Image { code: (0, 0, 0), ..b }.forked_from(&Image { code: (0, 0, 0), ..a }));
    }
}
