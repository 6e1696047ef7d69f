//! Forked workers on a full disk (issue 8, item 2): a child that cannot create its own file writes
//! into its parent's, so every update is either in the merged total or counted as dropped, exactly,
//! and the operator is told (one stderr line per such child, the log, `shmetrics_shared_forks_total`).
//!
//! Each test mounts a 512 KiB tmpfs; the `workload` master creates its file, then fills the file
//! system (`--fill`) before it forks, so no worker's 64 KiB file fits. Without the permission to
//! mount, a test fails, unless `SHMETRICS_TEST_NO_MOUNT=1` says to skip it (it then prints why).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use shmetrics::layout::{self, flags, header};

use crate::util::{self, Proc, Served, Tmpfs};

const LONG: Duration = Duration::from_secs(20);

impl Tmpfs {
    /// A metrics directory (mode 0700) on the tmpfs.
    fn metrics_dir(&self) -> PathBuf {
        let d = self.mnt.join("metrics");
        std::fs::DirBuilder::new().mode(0o700).create(&d).expect("metrics dir");
        d
    }

    /// The file `workload --fill` fills the tmpfs with.
    fn filler(&self) -> PathBuf {
        self.mnt.join("filler")
    }
}

/// A `workload` run with its stderr collected.
struct Run {
    proc: Proc,
    pids: Vec<i32>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Run {
    fn start(dir: &Path, args: &[&str]) -> Run {
        let mut child = Command::new(util::example_bin("workload"))
            .args(args)
            .env("SHMETRICS_DIR", dir)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("workload: {line}");
                lines.lock().expect("stderr lines").push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("READY line");
        let pids = util::parse_ready(&line);
        Run { proc: Proc { child }, pids, stderr }
    }

    /// The stderr lines so far.
    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lines").clone()
    }
}

/// Workers that outlive their master (`--orphan`): SIGKILLed on drop if the test did not stop them.
struct Orphans(Vec<i32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

/// A live scrape as `name{labels}` → value.
fn scrape(agg: &Served) -> BTreeMap<String, f64> {
    util::samples(&util::scrape(agg.addr))
}

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key} in the scrape"))
}

/// The sum of every sample of metric `name` (any labels).
fn sum_of(s: &BTreeMap<String, f64>, name: &str) -> f64 {
    s.iter().filter(|(k, _)| util::split_labels(k).0 == name).map(|(_, v)| *v).sum()
}

/// What the workload's parameters say was sent (see `examples/workload.rs`).
struct Sent {
    workers: u64,
    series: u64,
    incs: u64,
    new_series: u64,
    /// Rounds per worker, grandchildren's included.
    rounds: u64,
}

impl Sent {
    /// `T`: the sum of `w+1` over workers.
    fn t(&self) -> u64 {
        self.workers * (self.workers + 1) / 2
    }
    /// Total of the increments of `wl_requests_total` to series registered before the fork.
    fn inherited_requests(&self) -> u64 {
        self.rounds * self.incs * self.t() * self.series * (self.series + 1) / 2
    }
    /// Unit increments to series registered after the fork (new label sets and `wl_late_total`).
    fn new_updates(&self) -> u64 {
        self.rounds * self.workers * self.incs * (self.new_series + 1)
    }
    /// Series each worker registers after the fork: its label sets, the new metric and its series.
    fn new_registrations(&self) -> u64 {
        self.workers * (self.new_series + 2)
    }
}

/// Checks the scrape against what was sent, when every registration after the fork was refused:
/// inherited series counted exactly, new ones dropped and counted exactly, and the sum of both is
/// what was sent.
fn check_totals(s: &BTreeMap<String, f64>, sent: &Sent, shared: u64) {
    let counted = sum_of(s, "wl_requests_total") + sum_of(s, "wl_late_total");
    let dropped = get(s, "shmetrics_dropped_updates_total");
    assert_eq!(
        counted + dropped,
        (sent.inherited_requests() + sent.new_updates()) as f64,
        "sent == counted + dropped (counted {counted}, dropped {dropped})"
    );
    assert_eq!(counted, sent.inherited_requests() as f64, "every update to an inherited series is counted");
    assert_eq!(dropped, sent.new_updates() as f64, "every update to a refused series is counted as dropped");
    assert_eq!(get(s, "shmetrics_dropped_series_total"), sent.new_registrations() as f64);
    assert_eq!(
        get(s, "wl_latency_seconds_count{route=\"/h0\"}"),
        (sent.rounds * sent.incs * sent.workers) as f64,
        "histogram observations"
    );
    assert_eq!(get(s, "wl_bytes_total"), (sent.rounds * sent.incs * sent.t()) as f64 / 2.0, "f64 counter");
    assert_eq!(get(s, "shmetrics_shared_forks_total"), shared as f64, "children that shared a file");
}

/// The raw stderr lines (`shmetrics: pid P cannot create …`) and the tracing log lines saying so.
fn notices(lines: &[String]) -> (Vec<&String>, Vec<&String>) {
    let about = |l: &&String| l.contains(" cannot create a metrics file of its own in ");
    let raw = lines.iter().filter(about).filter(|l| l.starts_with("shmetrics: pid ")).collect();
    let logged = lines.iter().filter(about).filter(|l| l.contains(" ERROR ")).collect();
    (raw, logged)
}

/// Each worker in `pids` said exactly once, on stderr, that it writes into its parent's file, and
/// `total` processes said so in all (grandchildren included); the log says the same.
fn check_notices(run: &Run, pids: &[i32], total: usize) {
    let lines = run.stderr();
    let (raw, logged) = notices(&lines);
    for pid in pids {
        let prefix = format!("shmetrics: pid {pid} cannot create");
        let mine: Vec<_> = raw.iter().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(mine.len(), 1, "one stderr line for worker {pid}, got {mine:?}");
        assert!(mine[0].contains("No space left on device"), "the reason: {}", mine[0]);
        assert!(mine[0].contains("its updates go into the file it inherited"), "what happens: {}", mine[0]);
    }
    assert_eq!(raw.len(), total, "stderr lines {raw:?}");
    // Every such process registers new series, which is when the deferred log line is written.
    assert_eq!(logged.len(), total, "log lines {logged:?}");
}

fn workload_args<'a>(filler: &'a str, w: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--workers",
        w,
        "--series",
        "4",
        "--histograms",
        "1",
        "--incs",
        "7",
        "--new-series",
        "2",
        "--fill",
        filler,
        "--fill-leave-kib",
        "56",
        "--hold",
    ];
    args.extend_from_slice(extra);
    args
}

/// The stderr line of the master after filling: how much room is left.
fn filled_free(run: &Run) -> u64 {
    let lines = run.stderr();
    let line = lines.iter().find(|l| l.starts_with("workload: filled ")).expect("the fill line");
    line.rsplit(": ")
        .next()
        .and_then(|r| r.strip_suffix(" bytes free"))
        .expect("bytes free")
        .parse()
        .expect("n")
}

/// Stops a `--hold` workload (SIGTERM, forwarded to the workers) and waits for it.
fn stop(run: &mut Run) {
    run.proc.signal(Signal::SIGTERM);
    let status = run.proc.wait_timeout(LONG);
    assert!(status.success(), "workload: {status}");
}

/// The header word at `off` of the one writer file in `dir`.
fn header_word(dir: &Path, off: u64) -> u64 {
    let files: Vec<String> = util::ls(dir).into_iter().filter(|n| layout::is_writer_file(n)).collect();
    assert_eq!(files.len(), 1, "one writer file in {files:?}");
    let bytes = std::fs::read(dir.join(&files[0])).expect("read the writer file");
    let o = off as usize;
    u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
}

/// Waits until the aggregator has folded `n` dead writers' files.
fn wait_dead(agg: &Served, n: f64) -> BTreeMap<String, f64> {
    util::wait_for(LONG, "dead workers folded", || {
        let s = scrape(agg);
        (s.get("shmetrics_workers_dead_total") == Some(&n)).then_some(s)
    })
}

#[test]
fn full_disk_children_write_into_the_parents_file() {
    let Some(fs) = Tmpfs::mount("full_disk_children_write_into_the_parents_file", "size=512k") else {
        return;
    };
    let dir = fs.metrics_dir();
    let agg = util::spawn_shmetrics(&["serve", "--dir", dir.to_str().expect("utf-8")], &[], fs.root.path());
    let filler = fs.filler();
    let args = workload_args(filler.to_str().expect("utf-8"), "3", &["--ready"]);
    let mut run = Run::start(&dir, &args);
    // The master's file fits, a child's 64 KiB do not (the case of the issue: 56 KiB free).
    assert_eq!(filled_free(&run), 56 << 10);

    let sent = Sent { workers: 3, series: 4, incs: 7, new_series: 2, rounds: 1 };
    let s = scrape(&agg);
    check_totals(&s, &sent, 3);
    assert_eq!(get(&s, "shmetrics_files"), 1.0, "only the master has a file");
    assert_eq!(util::worker_files(&dir), 1);
    assert!(!s.keys().any(|k| k.contains("/new")), "refused series are not exported");
    check_notices(&run, &run.pids, 3);
    // In the file: each worker counted itself, and none set the master's READY flag (the workers
    // called `set_ready(true)`; the master never did).
    assert_eq!(header_word(&dir, header::SHARED_FORKS), 3);
    assert_eq!(header_word(&dir, header::FLAGS) & flags::READY, 0, "READY is the master's");
    let perf = util::http_get(agg.addr, "/perf_metrics", &[]);
    let doc: serde_json::Value = serde_json::from_slice(&perf.body).expect("perf_metrics JSON");
    assert_eq!(doc["metrics"]["shared_forks"], 3, "perf_metrics: {doc}");
    assert_eq!(doc["metrics"]["dropped_updates"], sent.new_updates(), "perf_metrics: {doc}");

    // Free the disk (so the archive can be saved), stop everyone: the file is folded with
    // everything the workers wrote into it.
    std::fs::remove_file(&filler).expect("remove the filler");
    stop(&mut run);
    let s = wait_dead(&agg, 1.0);
    check_totals(&s, &sent, 3);
    assert_eq!(get(&s, "shmetrics_workers_crashed_total"), 0.0, "the master exited cleanly");
    assert_eq!(util::worker_files(&dir), 0);
    // Still exactly one line per worker: nothing more was said at exit.
    check_notices(&run, &run.pids, 3);
}

#[test]
fn full_disk_master_exits_before_its_sharing_workers() {
    let test = "full_disk_master_exits_before_its_sharing_workers";
    let Some(fs) = Tmpfs::mount(test, "size=512k") else { return };
    let filler = fs.filler();
    let filler = filler.to_str().expect("utf-8");
    // The master exits normally, then (second run) is killed; either way before its workers.
    for crash in [false, true] {
        let dir = fs.metrics_dir();
        let agg =
            util::spawn_shmetrics(&["serve", "--dir", dir.to_str().expect("utf-8")], &[], fs.root.path());
        let extra: &[&str] = if crash { &["--orphan", "--master-crash"] } else { &["--orphan"] };
        let mut run = Run::start(&dir, &workload_args(filler, "2", extra));
        let workers = Orphans(run.pids.clone());
        // The master is gone at once; the workers then do a second round into its file.
        let status = run.proc.wait_timeout(LONG);
        assert_eq!(status.success(), !crash, "workload master: {status}");

        let sent = Sent { workers: 2, series: 4, incs: 7, new_series: 2, rounds: 2 };
        let s = util::wait_for(LONG, "the workers' second round", || {
            let s = scrape(&agg);
            (s.get("shmetrics_dropped_updates_total") == Some(&(sent.new_updates() as f64))).then_some(s)
        });
        check_totals(&s, &sent, 2);
        // The workers keep the master's file locked: it is not folded while they live.
        assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0);
        assert_eq!(get(&s, "shmetrics_files"), 1.0);
        check_notices(&run, &workers.0, 2);

        std::fs::remove_file(filler).expect("remove the filler");
        for pid in &workers.0 {
            kill(Pid::from_raw(*pid), Signal::SIGTERM).expect("SIGTERM a worker");
        }
        let s = wait_dead(&agg, 1.0);
        check_totals(&s, &sent, 2);
        // The workers exit cleanly, but the clean-exit flag is the master's to set.
        let crashed = if crash { 1.0 } else { 0.0 };
        assert_eq!(get(&s, "shmetrics_workers_crashed_total"), crashed, "crash {crash}");
        assert_eq!(util::worker_files(&dir), 0);
        drop(agg);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}

#[test]
fn full_disk_grandchildren_share_too_or_get_their_own_file_once_there_is_room() {
    let Some(fs) = Tmpfs::mount(
        "full_disk_grandchildren_share_too_or_get_their_own_file_once_there_is_room",
        "size=512k",
    ) else {
        return;
    };
    let filler = fs.filler();
    let filler = filler.to_str().expect("utf-8");
    let root = fs.root.path().to_path_buf();

    // The disk stays full: two grandchildren of each worker share the master's file as well.
    let dir = fs.metrics_dir();
    let agg = util::spawn_shmetrics(&["serve", "--dir", dir.to_str().expect("utf-8")], &[], &root);
    let mut run = Run::start(&dir, &workload_args(filler, "2", &["--grandchildren", "2"]));
    let sent = Sent { workers: 2, series: 4, incs: 7, new_series: 2, rounds: 3 };
    let s = scrape(&agg);
    check_totals(&s, &sent, 2 * 3);
    assert_eq!(get(&s, "shmetrics_files"), 1.0);
    check_notices(&run, &run.pids, 2 * 3);
    std::fs::remove_file(filler).expect("remove the filler");
    stop(&mut run);
    check_totals(&wait_dead(&agg, 1.0), &sent, 2 * 3);
    drop(agg);
    std::fs::remove_dir_all(&dir).expect("clean up");

    // The workers free the disk before forking: each grandchild creates a file of its own (with
    // the records its worker knew), so only the workers share. Worker 1 is slow in its fork
    // handlers: the first worker to free the disk must not do it before every worker has decided
    // (it did, before the workload waited for that, and worker 1 then got a file of its own).
    let dir = fs.metrics_dir();
    let agg = util::spawn_shmetrics(&["serve", "--dir", dir.to_str().expect("utf-8")], &[], &root);
    let mut run = Run::start(
        &dir,
        &workload_args(
            filler,
            "2",
            &["--grandchildren", "1", "--free-before-grandchildren", "--slow-fork-handler-ms", "200"],
        ),
    );
    let sent = Sent { workers: 2, series: 4, incs: 7, new_series: 2, rounds: 2 };
    // The grandchildren have exited: their own files are folded (or about to be).
    let s = wait_dead(&agg, 2.0);
    check_totals(&s, &sent, 2);
    check_notices(&run, &run.pids, 2);
    stop(&mut run);
    check_totals(&wait_dead(&agg, 3.0), &sent, 2);
}
