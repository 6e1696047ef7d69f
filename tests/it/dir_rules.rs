//! The multiproc directory's rules, with real files, real processes and real sockets: creation
//! mode, the single-aggregator lock, the start-up rule (fresh start vs. aggregator restart vs.
//! `--wipe`), folding dead workers into the archive, the archive's idempotence, and dropped updates.
//!
//! Expected values come from the closed forms in `examples/workload.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use shmetrics::aggregator::Startup;
use shmetrics::aggregator::{Aggregator, Options};
use shmetrics::expose::{self, Format};
use shmetrics::writer::Registry;

use crate::util;

const T: Duration = Duration::from_secs(10);

/// A fresh temp dir and the multiproc directory inside it (not created), so the aggregator's log
/// lands in the temp dir too.
fn tmp_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    (tmp, dir)
}

fn mkdir(dir: &Path) {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).expect("mkdir");
}

/// A `workload --hold` run that is stopped (SIGTERM to the master, which forwards it) on drop.
struct Held {
    wl: util::Workload,
}

impl Held {
    fn start(dir: &Path, args: &[&str]) -> Held {
        let mut all = vec!["--hold"];
        all.extend_from_slice(args);
        Held { wl: util::workload(dir, &all) }
    }

    /// SIGTERM to the master; waits for it (and so for every worker) to exit, status 0.
    fn stop(mut self) {
        self.wl.proc.signal(Signal::SIGTERM);
        let st = self.wl.proc.wait_timeout(T);
        assert!(st.success(), "workload master exited with {st}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(None) = self.wl.proc.child.try_wait() {
            self.wl.proc.signal(Signal::SIGTERM);
            for _ in 0..250 {
                if !matches!(self.wl.proc.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Runs `workload` without `--hold` and waits for the master to exit: every file it and its
/// workers wrote is then a dead writer's file.
fn run_to_exit(dir: &Path, args: &[&str]) {
    let mut wl = util::workload(dir, args);
    let st = wl.proc.wait_timeout(T);
    assert!(st.success(), "workload exited with {st}");
}

/// Whether nobody holds the writer lock of `path` (the writer is dead).
fn lock_free(path: &Path) -> bool {
    let f = std::fs::File::open(path).expect("open worker file");
    match f.try_lock() {
        Ok(()) => {
            f.unlock().expect("unlock");
            true
        }
        Err(std::fs::TryLockError::WouldBlock) => false,
        Err(std::fs::TryLockError::Error(e)) => panic!("flock {}: {e}", path.display()),
    }
}

/// Writer file names (`w-*.shm`) in `dir`.
fn writer_files(dir: &Path) -> Vec<String> {
    util::ls(dir).into_iter().filter(|n| n.starts_with("w-") && n.ends_with(".shm")).collect()
}

/// The writer file of process `pid`.
fn file_of(dir: &Path, pid: i32) -> String {
    let prefix = format!("w-{pid}-");
    let files: Vec<String> = writer_files(dir).into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert_eq!(files.len(), 1, "expected one file of pid {pid} in {:?}", util::ls(dir));
    files.into_iter().next().expect("one")
}

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}; have {:?}", s.keys().collect::<Vec<_>>()))
}

/// Samples of the families whose values outlive their writers (not live-mode gauges).
fn durable(s: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    s.iter()
        .filter(|(k, _)| {
            ["wl_requests_total", "wl_bytes_total", "wl_max{", "wl_latency_seconds_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Every `wl_*` sample.
fn wl(s: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    s.iter().filter(|(k, _)| k.starts_with("wl_")).map(|(k, v)| (k.clone(), *v)).collect()
}

/// Asserts the durable families hold the closed forms of `workload --workers w --series s`
/// (K = 1, M = 0, H = 1).
fn assert_workload_totals(s: &BTreeMap<String, f64>, w: u64, series: u64) {
    let t = (w * (w + 1) / 2) as f64;
    let wf = w as f64;
    for i in 0..series {
        let i1 = (i + 1) as f64;
        assert_eq!(get(s, &format!("wl_requests_total{{route=\"/r{i}\"}}")), i1 * t, "/r{i}");
        assert_eq!(get(s, &format!("wl_max{{route=\"/r{i}\"}}")), wf * i1, "/r{i}");
    }
    assert_eq!(get(s, "wl_bytes_total"), t / 2.0);
    let h = |le: &str| get(s, &format!("wl_latency_seconds_bucket{{route=\"/h0\",le=\"{le}\"}}"));
    assert_eq!(h("0.1"), wf.min(2.0));
    assert_eq!(h("0.5"), wf.min(10.0));
    assert_eq!(h("1.0"), wf.min(20.0));
    assert_eq!(h("+Inf"), wf);
    assert_eq!(get(s, "wl_latency_seconds_count{route=\"/h0\"}"), wf);
    let sum = get(s, "wl_latency_seconds_sum{route=\"/h0\"}");
    assert!((sum - 0.05 * t).abs() < 1e-9, "_sum {sum} vs {}", 0.05 * t);
}

/// `a` and `b` have the same keys and values; `_sum` samples (float additions in another order)
/// within 1e-9, everything else exactly.
fn assert_same(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: series differ");
    for (k, va) in a {
        let vb = b[k];
        if k.contains("_sum") {
            assert!((va - vb).abs() < 1e-9, "{what}: {k}: {va} vs {vb}");
        } else {
            assert_eq!(*va, vb, "{what}: {k}");
        }
    }
}

fn scrape_samples(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    util::samples(&util::scrape(addr))
}

/// One in-process aggregator pass (scrape), as samples.
fn pass(agg: &mut Aggregator) -> BTreeMap<String, f64> {
    util::samples(&expose::encode(&agg.scrape(), Format::Prometheus))
}

#[test]
fn directory_is_created_with_mode_0700() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("a").join("b").join("metrics");
    assert!(!dir.exists());
    // Logs go to the temp dir: `util::serve` would put them in the directory's (missing) parent.
    let d = dir.to_str().expect("utf-8 path");
    let served = util::spawn_shmetrics(&["serve", "--dir", d], &[], tmp.path());
    let meta = std::fs::metadata(&dir).expect("the aggregator created the directory");
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "mode of {}", dir.display());
    // It serves (an empty directory has only self metrics).
    let s = scrape_samples(served.addr);
    assert_eq!(get(&s, "shmetrics_files"), 0.0);
    assert_eq!(util::ls(&dir), vec!["aggregator.lock".to_string()]);
}

#[test]
fn second_aggregator_on_the_same_directory_is_refused() {
    let (tmp, dir) = tmp_dir();
    let first = util::serve(&dir, &[]);
    let err_path = tmp.path().join("second.stderr");
    let mut second = Command::new(util::shmetrics_bin())
        .args(["serve", "--dir", dir.to_str().expect("utf-8"), "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn second aggregator");
    let status = util::wait_for(T, "the second aggregator to exit", || second.try_wait().expect("try_wait"));
    let stderr = std::fs::read_to_string(&err_path).expect("stderr");
    assert!(!status.success(), "second aggregator exited with {status}; stderr: {stderr}");
    let expected = format!(
        "{} is already served by another shmetrics aggregator (pid {})",
        dir.display(),
        first.proc.pid()
    );
    assert!(stderr.contains(&expected), "stderr should contain {expected:?}, got: {stderr}");
    // The first one is untouched: still serving, still named in the lock file.
    assert_eq!(
        std::fs::read_to_string(dir.join("aggregator.lock")).expect("lock file"),
        format!("pid {}\n", first.proc.pid())
    );
    let s = scrape_samples(first.addr);
    assert_eq!(get(&s, "shmetrics_files"), 0.0);
}

#[test]
fn fresh_start_removes_the_previous_runs_files() {
    let (_tmp, dir) = tmp_dir();
    // A previous run with an aggregator: its dead workers are folded into archive.json.
    {
        let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
        run_to_exit(&dir, &["--workers", "2", "--series", "3"]);
        util::wait_for(T, "the previous run to be folded", || {
            (writer_files(&dir).is_empty() && dir.join("archive.json").exists()).then_some(())
        });
        let s = scrape_samples(served.addr);
        assert_workload_totals(&s, 2, 3);
        // The aggregator dies; the next run starts without one.
        served.proc.signal(Signal::SIGKILL);
    }
    // The next run exits before any aggregator starts: its files stay, all dead.
    run_to_exit(&dir, &["--workers", "3", "--series", "3"]);
    let dead = writer_files(&dir);
    assert_eq!(dead.len(), 4, "master + 3 workers: {:?}", util::ls(&dir));
    assert!(dead.iter().all(|n| lock_free(&dir.join(n))));
    std::fs::write(dir.join("notes.txt"), "not ours\n").expect("notes");
    std::fs::write(dir.join(".archive.json.12345.tmp"), "{").expect("archive temp");
    assert!(dir.join("archive.json").exists());

    let served = util::serve(&dir, &[]);
    // Everything of ours from the previous run is gone; foreign files stay.
    assert_eq!(util::ls(&dir), vec!["aggregator.lock".to_string(), "notes.txt".to_string()]);
    let s = scrape_samples(served.addr);
    assert!(wl(&s).is_empty(), "totals must start from zero, got {:?}", wl(&s));
    assert!(!s.contains_key("wl_requests_total{route=\"/r0\"}"));
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0);
    assert_eq!(get(&s, "shmetrics_workers_crashed_total"), 0.0);
    assert_eq!(get(&s, "shmetrics_files"), 0.0);
    assert_eq!(get(&s, "shmetrics_bad_files{reason=\"foreign\"}"), 1.0);
}

#[test]
fn aggregator_restart_is_invisible() {
    let (_tmp, dir) = tmp_dir();
    let first = util::serve(&dir, &[]);
    let held = Held::start(&dir, &["--workers", "3", "--series", "4"]);
    let pids = held.wl.pids.clone();
    let master = held.wl.proc.pid();
    let before = scrape_samples(first.addr);
    assert_workload_totals(&before, 3, 4);
    assert_eq!(get(&before, "shmetrics_workers_live"), 3.0, "3 workers; the master is not one");

    // The aggregator is killed; meanwhile worker 1 dies too.
    let mut first_proc = first.proc;
    first_proc.signal(Signal::SIGKILL);
    first_proc.wait_timeout(T);
    let victim = file_of(&dir, pids[1]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[1]), Signal::SIGKILL).expect("kill worker");
    util::wait_for(T, "worker 1's lock to be released", || lock_free(&dir.join(&victim)).then_some(()));
    let live: Vec<String> = [master, pids[0], pids[2]].iter().map(|p| file_of(&dir, *p)).collect();

    let second = util::serve(&dir, &[]);
    // Start-up kept every file: live writers mean only the aggregator restarted.
    for f in &live {
        assert!(dir.join(f).exists(), "live worker file {f} was removed at start-up");
    }
    let after = scrape_samples(second.addr);
    // The dead worker's contribution is folded, not lost: durable totals are exactly the same.
    assert_same(&durable(&before), &durable(&after), "totals across the restart");
    assert_workload_totals(&after, 3, 4);
    assert_eq!(get(&after, "shmetrics_workers_dead_total"), 1.0);
    assert_eq!(get(&after, "shmetrics_workers_crashed_total"), 1.0);
    assert_eq!(get(&after, "shmetrics_workers_live"), 2.0, "2 workers left; the master is not one");
    assert!(!dir.join(&victim).exists(), "the dead worker's file is folded and removed");
    assert!(dir.join("archive.json").exists());
    for f in &live {
        assert!(dir.join(f).exists(), "live worker file {f} was removed");
    }
    // Live-mode gauges lose exactly the dead worker (w = 1): workers 0 and 2 remain.
    for i in 0..4u64 {
        let i1 = (i + 1) as f64;
        let inflight = get(&after, &format!("wl_inflight{{route=\"/r{i}\"}}"));
        assert_eq!(inflight, (i1 + 1.0) + (i1 + 3.0), "wl_inflight /r{i}");
        assert!(!after.contains_key(&format!("wl_all{{route=\"/r{i}\",pid=\"{}\"}}", pids[1])));
        assert_eq!(get(&after, &format!("wl_all{{route=\"/r{i}\",pid=\"{}\"}}", pids[2])), 3.0);
    }
    held.stop();
}

#[test]
fn wipe_removes_everything_of_ours_even_with_live_workers() {
    let (_tmp, dir) = tmp_dir();
    mkdir(&dir);
    let held = Held::start(&dir, &["--workers", "2", "--series", "2"]);
    assert_eq!(writer_files(&dir).len(), 3);
    // An archive that would show if it survived (5 dead workers).
    std::fs::write(
        dir.join("archive.json"),
        r#"{"version":1,"totals":{"dead_workers":5,"crashed_workers":0,"dropped_series":0,"dropped_updates":0},"folded":[],"families":[]}"#,
    )
    .expect("archive");
    std::fs::write(dir.join("notes.txt"), "not ours\n").expect("notes");

    let served = util::serve(&dir, &["--wipe"]);
    assert_eq!(util::ls(&dir), vec!["aggregator.lock".to_string(), "notes.txt".to_string()]);
    let s = scrape_samples(served.addr);
    assert!(wl(&s).is_empty(), "wiped: {:?}", wl(&s));
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0);
    assert_eq!(get(&s, "shmetrics_files"), 0.0);
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).expect("notes"), "not ours\n");
    held.stop();
}

#[test]
fn dead_workers_are_folded_without_scrapes() {
    let (_tmp, dir) = tmp_dir();
    let served = util::serve(&dir, &["--upkeep-interval", "0.2"]);
    let w = 3;
    let held = Held::start(&dir, &["--workers", "3", "--series", "5"]);
    let before = scrape_samples(served.addr);
    assert_workload_totals(&before, w, 5);
    assert_eq!(get(&before, "shmetrics_workers_dead_total"), 0.0);

    // Worker 0 is SIGKILLed; the others and the master exit cleanly.
    let pids = held.wl.pids.clone();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).expect("kill worker");
    held.stop();

    // No scrape: the upkeep pass folds them.
    util::wait_for(T, "dead workers' files to be folded and removed", || {
        (writer_files(&dir).is_empty() && dir.join("archive.json").exists()).then_some(())
    });
    let after = scrape_samples(served.addr);
    assert_same(&durable(&before), &durable(&after), "totals after every writer died");
    assert_workload_totals(&after, w, 5);
    assert_eq!(get(&after, "shmetrics_workers_dead_total"), (w + 1) as f64, "W workers + the master");
    assert_eq!(get(&after, "shmetrics_workers_crashed_total"), 1.0, "only the SIGKILLed worker");
    assert_eq!(get(&after, "shmetrics_workers_live"), 0.0);
    assert_eq!(get(&after, "shmetrics_files"), 0.0);
    // Live-mode gauges have no live contributor left.
    for k in after.keys() {
        assert!(
            !(k.starts_with("wl_inflight") || k.starts_with("wl_all") || k.starts_with("wl_recent")),
            "live-mode gauge {k} survived its writers"
        );
    }
    // Only two scrapes ever happened (before and after): the folding was the upkeep pass's work.
    assert_eq!(get(&after, "shmetrics_scrapes_total"), 2.0);
}

/// Reads `archive.json`'s `folded` list, sorted.
fn archive_folded(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("archive.json")).expect("archive.json");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("archive json");
    let mut ids: Vec<String> = v["folded"]
        .as_array()
        .expect("folded list")
        .iter()
        .map(|x| x.as_str().expect("hex id").to_string())
        .collect();
    ids.sort();
    ids
}

/// The hex id in a writer file name `w-<pid>-<id>.shm`.
fn id_of(name: &str) -> String {
    name.trim_end_matches(".shm").rsplit('-').next().expect("id").to_string()
}

/// Names and bytes of the writer files in `dir`.
fn backup(dir: &Path) -> Vec<(String, Vec<u8>)> {
    writer_files(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).expect("read"))).collect()
}

fn restore(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (n, b) in files {
        std::fs::write(dir.join(n), b).expect("restore");
    }
}

/// The state a crash between "archive saved" and "files removed" leaves: the archive lists the
/// folded ids and their files are still there. A restarted aggregator must not count them again.
#[test]
fn archive_is_idempotent_across_a_crash_between_save_and_unlink() {
    let (_tmp, dir) = tmp_dir();
    mkdir(&dir);
    // A live writer (this process), so the restart below is an aggregator restart, not a fresh
    // start of the job (which would rightly start from zero).
    let live = Registry::open(&dir).expect("registry");
    run_to_exit(&dir, &["--workers", "2", "--series", "3"]);
    let dead = backup(&dir);
    let dead: Vec<(String, Vec<u8>)> =
        dead.into_iter().filter(|(n, _)| Some(dir.join(n)) != live.path()).collect();
    assert_eq!(dead.len(), 3, "master + 2 workers");

    let mut a = Aggregator::open(&dir, &Options::default()).expect("aggregator");
    assert_eq!(a.startup(), Startup::Restart);
    let first = pass(&mut a);
    assert_workload_totals(&first, 2, 3);
    assert_eq!(get(&first, "shmetrics_workers_dead_total"), 3.0);
    for (n, _) in &dead {
        assert!(!dir.join(n).exists(), "{n} folded and removed");
    }
    let mut ids: Vec<String> = dead.iter().map(|(n, _)| id_of(n)).collect();
    ids.sort();
    assert_eq!(archive_folded(&dir), ids, "the archive lists the ids it folded");

    // Crash right after the save: the aggregator is gone and the files are still there.
    drop(a);
    restore(&dir, &dead);
    let mut b = util::reopen_aggregator(&dir);
    assert_eq!(b.startup(), Startup::Restart);
    let second = pass(&mut b);
    assert_eq!(wl(&second), wl(&first), "a listed file must not be folded twice");
    assert_eq!(get(&second, "shmetrics_workers_dead_total"), 3.0);
    assert_eq!(get(&second, "shmetrics_workers_crashed_total"), 0.0);
    for (n, _) in &dead {
        assert!(!dir.join(n).exists(), "{n} removed without folding");
    }
    // And a third aggregator still sees the same totals (from the archive alone).
    drop(b);
    let mut c = util::reopen_aggregator(&dir);
    let third = pass(&mut c);
    assert_eq!(wl(&third), wl(&first));
    assert_eq!(get(&third, "shmetrics_workers_dead_total"), 3.0);
}

/// The brief's simulation, literally: the folded file is put back under its name before the same
/// aggregator's next pass. The archive's promise ("a file whose id is listed is removed at the next
/// pass without being folded again") must hold here too.
#[test]
fn folded_file_reappearing_before_the_next_pass_is_not_counted_twice() {
    let (_tmp, dir) = tmp_dir();
    let mut agg = Aggregator::open(&dir, &Options::default()).expect("aggregator");
    run_to_exit(&dir, &["--workers", "2", "--series", "3"]);
    let dead = backup(&dir);
    assert_eq!(dead.len(), 3);
    let first = pass(&mut agg);
    assert_workload_totals(&first, 2, 3);
    assert_eq!(get(&first, "shmetrics_workers_dead_total"), 3.0);
    assert!(writer_files(&dir).is_empty());

    restore(&dir, &dead);
    let second = pass(&mut agg);
    assert!(writer_files(&dir).is_empty(), "the reappeared files are removed");
    assert_eq!(get(&second, "shmetrics_workers_dead_total"), 3.0, "dead workers counted twice");
    assert_eq!(wl(&second), wl(&first), "totals counted twice");
}

const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Sets or clears the immutable attribute (root, ext2/3/4 and friends). Returns false if the
/// filesystem or our privileges do not allow it.
fn set_immutable(path: &Path, on: bool) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else { return false };
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one int through the pointer, which is valid.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return false;
        }
        flags = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
        libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) == 0
    }
}

/// Clears the immutable attribute on drop, so the temp dir can be removed.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        set_immutable(&self.0, false);
    }
}

/// A dead worker's file that cannot be removed (unlink fails with EPERM) after it was folded must
/// not be folded again at every later pass.
#[test]
fn dead_file_that_cannot_be_removed_is_not_folded_again() {
    let (_tmp, dir) = tmp_dir();
    let mut agg = Aggregator::open(&dir, &Options::default()).expect("aggregator");
    run_to_exit(&dir, &["--workers", "2", "--series", "3"]);
    let files = writer_files(&dir);
    assert_eq!(files.len(), 3);
    let stuck = dir.join(&files[0]);
    if !set_immutable(&stuck, true) {
        eprintln!("skipping: cannot set the immutable attribute here (needs root on ext4-like fs)");
        return;
    }
    let _guard = Immutable(stuck.clone());
    assert!(std::fs::remove_file(&stuck).is_err(), "immutable file must resist unlink");

    let first = pass(&mut agg);
    assert_workload_totals(&first, 2, 3);
    assert_eq!(get(&first, "shmetrics_workers_dead_total"), 3.0);
    assert!(stuck.exists());
    for _ in 0..2 {
        let next = pass(&mut agg);
        assert_eq!(get(&next, "shmetrics_workers_dead_total"), 3.0, "the stuck file was folded again");
        assert_eq!(wl(&next), wl(&first), "the stuck file's values were counted again");
    }
}

#[test]
fn dropped_series_and_updates_are_counted_and_exposed() {
    let (_tmp, dir) = tmp_dir();
    let served = util::serve(&dir, &[]);
    let reg = Registry::open_with_reserve(&dir, 128 * 1024).expect("registry");
    let fam =
        reg.counter_family("dr_series_total", "Series until the file is full.", &["i"]).expect("family");
    let mut kept = Vec::new();
    let mut dropped = None;
    for i in 0..100_000u32 {
        let h = fam.with_labels(&[i.to_string().as_str()]).expect("with_labels never fails when full");
        if reg.dropped_series() > 0 {
            dropped = Some((i, h));
            break;
        }
        kept.push(h);
    }
    let (dropped_i, dropped) = dropped.expect("a 128 KiB reserve fills up");
    assert!(kept.len() > 100, "only {} series fit", kept.len());
    assert_eq!(reg.dropped_series(), 1);
    assert_eq!(reg.dropped_updates(), 0);

    // Updating a registered handle is not a drop; updating the dropped one is, once per update.
    kept[0].inc_by(7);
    kept[kept.len() - 1].inc();
    assert_eq!(reg.dropped_updates(), 0);
    dropped.inc();
    dropped.inc_by(5);
    dropped.inc();
    assert_eq!(reg.dropped_updates(), 3);
    // Asking again for the dropped label set is not another dropped series.
    let again = fam.with_labels(&[dropped_i.to_string().as_str()]).expect("with_labels");
    again.inc();
    assert_eq!((reg.dropped_series(), reg.dropped_updates()), (1, 4));
    // A new metric finds no room: the metric and its series are dropped, updates counted.
    let g = reg.gauge("dr_gauge", "No room.", shmetrics::layout::GaugeMode::Max).expect("gauge");
    g.set(3.0);
    g.inc();
    let h = reg.histogram("dr_hist_seconds", "No room.", &[0.1, 1.0]).expect("histogram");
    h.observe(0.5);
    assert_eq!(reg.dropped_series(), 1 + 2 + 2);
    assert_eq!(reg.dropped_updates(), 4 + 2 + 1);

    let s = scrape_samples(served.addr);
    assert_eq!(get(&s, "shmetrics_dropped_series_total"), reg.dropped_series() as f64);
    assert_eq!(get(&s, "shmetrics_dropped_updates_total"), reg.dropped_updates() as f64);
    assert_eq!(get(&s, "dr_series_total{i=\"0\"}"), 7.0);
    assert_eq!(get(&s, &format!("dr_series_total{{i=\"{}\"}}", kept.len() - 1)), 1.0);
    let n = s.keys().filter(|k| k.starts_with("dr_series_total{")).count();
    assert_eq!(n, kept.len(), "every registered series and only those");
    assert!(!s.contains_key(&format!("dr_series_total{{i=\"{dropped_i}\"}}")));
    assert!(!s.keys().any(|k| k.starts_with("dr_gauge") || k.starts_with("dr_hist")));
    util::assert_openmetrics_parses(served.addr);
}

/// SIGTERM and SIGINT stop the aggregator cleanly: exit status 0, the directory is released (a new
/// aggregator can own it at once) and nothing of the workers' is lost.
#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let wl = util::workload(&dir, &["--workers", "2", "--series", "1", "--hold"]);
    for sig in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        let mut served = util::serve(&dir, &[]);
        let before = util::samples(&util::scrape(served.addr));
        assert_eq!(before["wl_requests_total{route=\"/r0\"}"], 3.0);
        served.proc.signal(sig);
        let status = served.proc.wait_timeout(std::time::Duration::from_secs(10));
        assert!(status.success(), "{sig}: {status:?}");
        assert_eq!(util::worker_files(&dir), 3, "{sig}: the live workers' files are kept");
    }
    drop(wl);
}

/// Start-up decides liveness by the lock alone: a live writer's file that this build cannot parse
/// (here: another format version) is neither removed nor folded, and is reported as bad.
#[test]
fn startup_keeps_a_live_file_it_cannot_parse() {
    use std::os::unix::fs::FileExt;
    let (_tmp, dir) = tmp_dir();
    mkdir(&dir);
    let reg = Registry::open(&dir).expect("registry");
    reg.counter("kept", "Kept.").expect("counter").inc();
    let path = reg.path().expect("file-backed");
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.write_all_at(&99u32.to_le_bytes(), 8).expect("version 99");
    let served = util::serve(&dir, &[]);
    let s = util::samples(&util::scrape(served.addr));
    assert!(path.exists(), "a live writer's file was removed at start-up");
    assert_eq!(get(&s, "shmetrics_bad_files{reason=\"version\"}"), 1.0);
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0);
}
