//! "Nothing lost, nothing hung, nobody in", tried the way an operator's bad day and an attacker
//! would: a full disk under the archive, FIFOs and symbolic links under our names, forged and
//! corrupt archives, directories and files of other users, and long churn with aggregator kills.
//!
//! Full-disk cases run on a small tmpfs mounted for the test (tests run as root in CI); where
//! mounting is impossible they say so and fail, unless `SHMETRICS_TEST_NO_MOUNT=1` asks to skip
//! them (then they print that they were skipped).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}; have {:?}", s.keys().collect::<Vec<_>>()))
}

fn pass(agg: &mut Aggregator) -> BTreeMap<String, f64> {
    util::samples(&expose::encode(&agg.scrape(), Format::Prometheus))
}

fn wl(s: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    s.iter().filter(|(k, _)| k.starts_with("wl_requests_total")).map(|(k, v)| (k.clone(), *v)).collect()
}

fn mkdir(dir: &Path) {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).expect("mkdir");
}

impl util::Tmpfs {
    /// Fills the tmpfs with a file `filler` until it is full; its path.
    fn fill(&self) -> PathBuf {
        let p = self.mnt.join("filler");
        let mut f = std::fs::File::create(&p).expect("filler");
        let block = vec![0u8; 4096];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let _ = f.flush();
        p
    }
}

/// A `workload --hold` run, stopped on drop.
struct Held {
    wl: util::Workload,
}

impl Held {
    fn start(dir: &Path, args: &[&str]) -> Held {
        let mut all = vec!["--hold"];
        all.extend_from_slice(args);
        Held { wl: util::workload(dir, &all) }
    }
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
            let _ = util::wait_for(T, "workload exit", || self.wl.proc.child.try_wait().ok().flatten());
        }
    }
}

fn writer_files(dir: &Path) -> Vec<String> {
    util::ls(dir).into_iter().filter(|n| n.starts_with("w-") && n.ends_with(".shm")).collect()
}

/// The closed form of `wl_requests_total{route="/r<i>"}` for `workload --workers w`.
fn requests(w: u64, i: u64) -> f64 {
    ((i + 1) * w * (w + 1) / 2) as f64
}

/// Item 1. A full disk makes archive saves fail: the dead workers' files must stay (their totals
/// are only in memory) until a save works, and a restart must see the same totals.
#[test]
fn a_full_disk_never_loses_dead_workers_totals() {
    let Some(fs) = util::Tmpfs::mount("a_full_disk_never_loses_dead_workers_totals", "size=512k") else {
        return;
    };
    let dir = fs.mnt.join("mp");
    mkdir(&dir);
    // A live writer (this process): restarts below are aggregator restarts, not fresh starts.
    let keeper = Registry::open(&dir).expect("registry");
    let mut agg = Aggregator::open(&dir, &Options::default()).expect("aggregator");
    let held = Held::start(&dir, &["--workers", "3", "--series", "2"]);
    let before = pass(&mut agg);
    assert_eq!(get(&before, "wl_requests_total{route=\"/r1\"}"), requests(3, 1));
    let dead_files: Vec<String> =
        writer_files(&dir).into_iter().filter(|n| Some(dir.join(n)) != keeper.path()).collect();
    assert_eq!(dead_files.len(), 4, "master + 3 workers");

    let filler = fs.fill();
    held.stop();
    for round in 0..3 {
        let s = pass(&mut agg);
        for n in &dead_files {
            assert!(
                dir.join(n).exists(),
                "round {round}: {n} removed before any archive holding it was saved"
            );
        }
        assert_eq!(wl(&s), wl(&before), "round {round}: totals while the disk is full");
        assert_eq!(get(&s, "shmetrics_workers_dead_total"), 4.0, "round {round}");
        assert_eq!(get(&s, "shmetrics_archive_save_errors_total"), (round + 1) as f64, "round {round}");
        assert_eq!(get(&s, "shmetrics_files_pending_removal"), 4.0, "round {round}");
    }
    // A restart while the disk is still full: the new aggregator folds the files again itself.
    drop(agg);
    let mut agg = util::reopen_aggregator(&dir);
    assert_eq!(agg.startup(), Startup::Restart);
    let s = pass(&mut agg);
    assert_eq!(wl(&s), wl(&before), "totals after a restart on a full disk");
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 4.0);

    std::fs::remove_file(&filler).expect("free the disk");
    let s = pass(&mut agg);
    assert_eq!(get(&s, "shmetrics_files_pending_removal"), 0.0);
    for n in &dead_files {
        assert!(!dir.join(n).exists(), "{n} removed once the archive was saved");
    }
    // Graceful restart: everything comes from the archive now.
    drop(agg);
    let mut agg = util::reopen_aggregator(&dir);
    let s = pass(&mut agg);
    assert_eq!(wl(&s), wl(&before), "totals after the restart");
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 4.0);
    assert_eq!(get(&s, "shmetrics_archive_save_errors_total"), 0.0, "a new aggregator counts anew");
    let _ = keeper; // a live writer until the end of the test (this process)
}

/// The same through `shmetrics serve`: the failure is counted and logged, and the log says when
/// saving works again.
#[test]
fn archive_save_failures_are_counted_and_logged() {
    let Some(fs) = util::Tmpfs::mount("archive_save_failures_are_counted_and_logged", "size=512k") else {
        return;
    };
    let dir = fs.mnt.join("mp");
    let served = util::spawn_shmetrics(
        &["serve", "--dir", dir.to_str().expect("utf-8"), "--upkeep-interval", "0.05"],
        &[],
        fs.root.path(),
    );
    let held = Held::start(&dir, &["--workers", "2", "--series", "1"]);
    let filler = fs.fill();
    held.stop();
    let s = util::wait_for(T, "a failed save", || {
        let s = util::samples(&util::scrape(served.addr));
        (get(&s, "shmetrics_archive_save_errors_total") >= 2.0).then_some(s)
    });
    assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0));
    assert_eq!(writer_files(&dir).len(), 3, "no dead file removed while saves fail");
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(log.contains("cannot save the archive"), "{log}");
    assert_eq!(log.matches("cannot save the archive").count(), 1, "one line, not one per pass: {log}");
    std::fs::remove_file(filler).expect("free the disk");
    util::wait_for(T, "the dead files to go", || writer_files(&dir).is_empty().then_some(()));
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0));
    // The line is logged before the files go, but reaches the log file through the test's pipe
    // reader: wait for it (asserting at once failed once).
    util::wait_for(T, "the 'saved again' log line", || {
        let log = std::fs::read_to_string(&served.log).ok()?;
        log.contains("the archive is saved again").then_some(())
    });
}

fn fifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).expect("mkfifo");
}

/// The monitor address from the `monitor port on ADDR` log line.
fn monitor_addr(served: &util::Served) -> SocketAddr {
    util::wait_for(T, "the `monitor port on` log line", || {
        let log = std::fs::read_to_string(&served.log).ok()?;
        let rest = log.split("monitor port on ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn health_check(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, T).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(b"health_check\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("health_check must be answered, not hang");
    out
}

/// Item 4. FIFOs under every name the aggregator reads must not block it — present before it
/// starts (it must still bind its ports) or planted while it runs.
#[test]
fn fifos_never_block_the_aggregator() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let zero = "00000000000000000000000000000000";
    for n in [
        format!("w-1-{zero}.shm"),
        "counter_1.db".into(),
        format!(".w-2-{zero}.shm.tmp"),
        "archive.json".into(),
    ] {
        fifo(&dir.join(n));
    }
    let held = Held::start(&dir, &["--workers", "2", "--series", "1"]);
    let served = util::serve(&dir, &["--upkeep-interval", "0.05"]);
    let mon = monitor_addr(&served);
    fifo(&dir.join(format!("w-3-{zero}.shm")));
    fifo(&dir.join("gauge_livesum_4.db"));
    fifo(&dir.join(".compact-counter_5.db"));
    for _ in 0..3 {
        let s = util::samples(&util::scrape(served.addr));
        assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0));
        assert_eq!(get(&s, "shmetrics_bad_files{reason=\"not_regular\"}"), 5.0);
        // `workload` workers never say they are ready: the answer is not OK, but it comes.
        let h = util::http_get(served.addr, "/healthz", &[]);
        assert_eq!((h.status, h.text()), (503, "Only 0 of 1 required workers are ready\n".to_string()));
        assert_eq!(health_check(mon), "Only 0 of 1 required workers are ready\n");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The FIFO archive was not read: it was set aside (it is not an archive), and is still a FIFO.
    let aside: Vec<String> =
        util::ls(&dir).into_iter().filter(|n| n.starts_with("archive.json.corrupt-")).collect();
    assert_eq!(aside.len(), 1, "{:?}", util::ls(&dir));
    assert!(std::fs::symlink_metadata(dir.join(&aside[0])).expect("aside").file_type().is_fifo_like());
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(log.contains("a FIFO, not a regular file"), "{log}");
    drop(held);
}

/// `FileType::is_fifo` through the extension trait, under a name that reads well above.
trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

/// Runs `shmetrics <args>` to completion (it must exit by itself) and returns (status, stderr).
fn run_to_end(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(util::shmetrics_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shmetrics");
    let mut err = String::new();
    let mut stderr = child.stderr.take().expect("stderr");
    let st = util::wait_for(T, "shmetrics to exit", || child.try_wait().expect("try_wait"));
    stderr.read_to_string(&mut err).expect("stderr");
    (st, err)
}

/// Item 8. A planted `aggregator.lock` link or FIFO is refused, and its target left untouched.
#[test]
fn a_planted_lock_file_is_refused_and_its_target_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious data\n").expect("victim");
    std::os::unix::fs::symlink(&victim, dir.join("aggregator.lock")).expect("symlink");
    let d = dir.to_str().expect("utf-8");
    let (st, err) = run_to_end(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(
        err.contains("aggregator.lock") && err.contains("symbolic link") && err.contains("remove it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious data\n");
    std::fs::remove_file(dir.join("aggregator.lock")).expect("rm");
    fifo(&dir.join("aggregator.lock"));
    let (st, err) = run_to_end(&["serve", "--dir", d, "--listen", "127.0.0.1:0"]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("a FIFO"), "{err}");
}

/// Item 8. The old temporary name of the archive, `.archive.json.<pid>.tmp`, planted as a link by
/// someone who knows the aggregator's pid, must not redirect the save; `archive.json` must end up a
/// regular file.
#[test]
fn a_planted_archive_temporary_does_not_redirect_the_save() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let keeper = Registry::open(&dir).expect("registry");
    let served = util::serve(&dir, &["--upkeep-interval", "0.05"]);
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious data\n").expect("victim");
    let pid = served.proc.pid();
    std::os::unix::fs::symlink(&victim, dir.join(format!(".archive.json.{pid}.tmp"))).expect("symlink");
    let mut wl = util::workload(&dir, &["--workers", "1", "--series", "1"]);
    assert!(wl.proc.wait_timeout(T).success());
    util::wait_for(T, "the fold", || {
        let s = util::samples(&util::scrape(served.addr));
        (get(&s, "shmetrics_workers_dead_total") == 2.0 && dir.join("archive.json").exists()).then_some(())
    });
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious data\n");
    let m = std::fs::symlink_metadata(dir.join("archive.json")).expect("archive");
    assert!(m.is_file(), "archive.json must be a regular file, not {:?}", m.file_type());
    let _ = keeper; // a live writer until the end of the test (this process)
}

/// An archive with `totals.dead_workers` forged to 1e9 and one series of `wl_requests_total`.
fn forged_archive() -> String {
    r#"{"version":1,"totals":{"dead_workers":1000000000,"crashed_workers":0,"dropped_series":0,
        "dropped_updates":0},"folded":[],"families":[{"name":"wl_requests","help":"Requests.",
        "type":"counter","value_type":"u64","gauge_mode":null,"series":[{"labels":[["route","/r0"]],
        "u64":1000000000}]}]}"#
        .to_string()
}

/// Item 8. `archive.json` as a link to a forged archive elsewhere is not followed: it is set aside,
/// and nothing of it reaches the totals.
#[test]
fn a_linked_archive_is_not_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let forged = tmp.path().join("forged.json");
    std::fs::write(&forged, forged_archive()).expect("forged");
    std::os::unix::fs::symlink(&forged, dir.join("archive.json")).expect("symlink");
    let held = Held::start(&dir, &["--workers", "2", "--series", "1"]);
    let served = util::serve(&dir, &[]);
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0), "nothing injected");
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0, "nothing injected");
    assert_eq!(get(&s, "shmetrics_archive_corrupt_files"), 1.0);
    assert!(forged.exists(), "the link's target is left alone");
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(
        log.contains("ARCHIVE OF DEAD WORKERS' TOTALS IS UNUSABLE") && log.contains("symbolic link"),
        "{log}"
    );
    drop(held);
}

/// Item 8. A corrupt archive neither stops the aggregator (a crash loop) nor vanishes: it is kept
/// aside, byte for byte, said loudly in the log and counted, and the aggregator serves.
#[test]
fn a_corrupt_archive_is_kept_aside_and_the_aggregator_serves() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let garbage = b"{\"version\": 1, \"totals\": {\"dead_workers\": 3, trailing garbage";
    std::fs::write(dir.join("archive.json"), garbage).expect("archive");
    let held = Held::start(&dir, &["--workers", "2", "--series", "1"]);
    let served = util::serve(&dir, &[]);
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0));
    assert_eq!(get(&s, "shmetrics_archive_corrupt_files"), 1.0);
    let aside: Vec<String> =
        util::ls(&dir).into_iter().filter(|n| n.starts_with("archive.json.corrupt-")).collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(dir.join(&aside[0])).expect("aside"), garbage);
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(log.contains("does not parse") && log.contains(&aside[0]), "{log}");
    // Restarting does not lose it either, nor count it twice.
    drop(served);
    let served = util::serve(&dir, &[]);
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "shmetrics_archive_corrupt_files"), 1.0);
    drop(held);
}

const OTHER_UID: u32 = 54_321;

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), None).expect("chown (tests run as root)");
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test changes file owners and must run as root (as CI does)"
    );
}

/// Item 9. A directory of another user, or one writable by group or others, is refused by `serve`,
/// `run` and `dump` with an error that says what to do, and accepted with `--shared-dir`.
#[test]
fn untrusted_directories_are_refused_unless_shared() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let d = dir.to_str().expect("utf-8");
    let serve = ["serve", "--dir", d, "--listen", "127.0.0.1:0"];
    let run = ["run", "--dir", d, "--listen", "127.0.0.1:0", "--", "true"];
    let dump = ["dump", "--dir", d];
    chown(&dir, OTHER_UID);
    for args in [&serve[..], &run[..], &dump[..]] {
        let (st, err) = run_to_end(args);
        assert_eq!(st.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("owned by uid {OTHER_UID}")) && err.contains("--shared-dir"), "{err}");
    }
    chown(&dir, 0);
    for mode in [0o770, 0o707, 0o777] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        for args in [&serve[..], &run[..], &dump[..]] {
            let (st, err) = run_to_end(args);
            assert_eq!(st.code(), Some(2), "{mode:o} {args:?}: {err}");
            assert!(err.contains("writable by") && err.contains("chmod go-w"), "{err}");
        }
    }
    // Deliberately shared: accepted.
    chown(&dir, OTHER_UID);
    let served = util::serve(&dir, &["--shared-dir"]);
    assert_eq!(util::http_get(served.addr, "/metrics", &[]).status, 200);
    let (st, err) = run_to_end(&["run", "--dir", d, "--shared-dir", "--listen", "127.0.0.1:0", "--", "true"]);
    assert!(err.contains("already served"), "the served directory is locked: {err} {st}");
}

/// A worker file with `wl_requests_total{route="/r0"}` = `value`, written by a real writer in a
/// scratch directory and renamed into `dir` (dead: its writer is gone).
fn dead_file_with(dir: &Path, scratch: &Path, value: u64) -> PathBuf {
    mkdir(scratch);
    let mut child = Command::new(util::example_bin("workload"))
        .args(["--workers", "1", "--series", "1", "--master-incs", &value.to_string()])
        .env("SHMETRICS_DIR", scratch)
        .stdout(Stdio::null())
        .spawn()
        .expect("workload");
    assert!(child.wait().expect("wait").success());
    let mut moved = None;
    for n in writer_files(scratch) {
        let target = dir.join(&n);
        std::fs::rename(scratch.join(&n), &target).expect("move in");
        moved.get_or_insert(target);
    }
    moved.expect("a file")
}

/// Item 9. Files of a user that is neither ours nor the directory's owner are skipped and counted
/// (`reason="owner"`), never merged and never folded into the archive.
#[test]
fn files_of_other_users_are_skipped_and_never_folded() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let held = Held::start(&dir, &["--workers", "2", "--series", "1"]);
    let served = util::serve(&dir, &["--upkeep-interval", "0.05"]);
    let scratch = tmp.path().join("scratch");
    let staging = tmp.path().join("staging");
    mkdir(&staging);
    // The injected files are owned by another uid before they appear under their names.
    let injected = dead_file_with(&staging, &scratch, 10_000_000);
    for n in writer_files(&staging) {
        chown(&staging.join(&n), OTHER_UID);
        std::fs::rename(staging.join(&n), dir.join(&n)).expect("inject");
    }
    assert!(dir.join(injected.file_name().expect("name")).exists());
    for _ in 0..5 {
        let s = util::samples(&util::scrape(served.addr));
        assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), requests(2, 0), "nothing injected");
        assert_eq!(get(&s, "shmetrics_bad_files{reason=\"owner\"}"), 2.0);
        assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0, "never folded");
        std::thread::sleep(Duration::from_millis(60));
    }
    // The archive (saved for the job's CPU time) holds nothing of the injected files.
    if let Ok(bytes) = std::fs::read(dir.join("archive.json")) {
        let archive: serde_json::Value = serde_json::from_slice(&bytes).expect("archive");
        assert_eq!(archive["totals"]["dead_workers"], 0, "{archive}");
        assert_eq!(archive["families"].as_array().map(Vec::len), Some(0), "{archive}");
    }
    drop(held);
}

/// Item 13. A fresh start never deletes what it does not understand: files of another format
/// version, with a foreign magic, renamed copies, FIFOs and links under our names, foreign `.db`
/// files and set-aside archives stay; the previous run's own files go.
#[test]
fn a_fresh_start_removes_only_what_it_understands() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    let mut wl = util::workload(&dir, &["--workers", "1", "--series", "1"]);
    assert!(wl.proc.wait_timeout(T).success());
    let ours = writer_files(&dir);
    assert_eq!(ours.len(), 2);
    let real = std::fs::read(dir.join(&ours[0])).expect("read");
    let zero = "00000000000000000000000000000000";
    let mut v2 = real.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    let keep: Vec<(String, Vec<u8>)> = vec![
        (format!("w-7-{zero}.shm"), v2),                      // another format version
        (format!("w-8-{zero}.shm"), b"NOTOURS!".repeat(600)), // foreign magic
        (format!("w-9-{zero}.shm"), real.clone()),            // a renamed copy: the header names another file
        ("counter_3999999.db".into(), b"SQLite format 3\0".repeat(40)), // no such pid
        ("archive.json.corrupt-1".into(), b"kept for the operator".to_vec()),
    ];
    for (n, b) in &keep {
        std::fs::write(dir.join(n), b).expect("write");
    }
    fifo(&dir.join(format!("w-11-{zero}.shm")));
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"x").expect("victim");
    std::os::unix::fs::symlink(&victim, dir.join(format!("w-12-{zero}.shm"))).expect("symlink");
    std::fs::write(dir.join("notes.txt"), b"not ours").expect("notes");
    std::fs::write(dir.join("archive.json"), b"{}").expect("archive"); // unusable: set aside, not deleted

    let mut agg = Aggregator::open(&dir, &Options::default()).expect("aggregator");
    assert_eq!(agg.startup(), Startup::Fresh);
    for n in &ours {
        assert!(!dir.join(n).exists(), "the previous run's {n} is removed");
    }
    for (n, b) in &keep {
        assert_eq!(&std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("{n} was removed: {e}")), b, "{n}");
    }
    for n in [format!("w-11-{zero}.shm"), format!("w-12-{zero}.shm"), "notes.txt".into()] {
        assert!(std::fs::symlink_metadata(dir.join(&n)).is_ok(), "{n} was removed");
    }
    assert!(victim.exists());
    let aside = util::ls(&dir).into_iter().filter(|n| n.starts_with("archive.json.corrupt-")).count();
    assert_eq!(aside, 2, "the unusable archive was set aside: {:?}", util::ls(&dir));
    let s = pass(&mut agg);
    assert_eq!(get(&s, "shmetrics_bad_files{reason=\"version\"}"), 1.0);
    assert_eq!(get(&s, "shmetrics_bad_files{reason=\"not_regular\"}"), 2.0);
    assert_eq!(get(&s, "shmetrics_archive_corrupt_files"), 2.0);
}

/// Item 11. Ten thousand worker deaths while two hundred aggregators are SIGKILLed one after the
/// other, at all points of their folding: every request is counted exactly once, and what the
/// archive carries stays bounded by what is in the directory — no growing list of folded ids, no
/// pile of temporary files.
#[test]
fn churn_and_aggregator_kills_keep_the_archive_bounded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    mkdir(&dir);
    // 5 live files: a master and 4 workers, alive throughout.
    let live = Held::start(&dir, &["--workers", "4", "--series", "1"]);
    // `workload` staggers its workers by 20 ms each, so many small runs at once go fastest.
    let (batches, per_batch, parallel, restarts) = (200u64, 50u64, 20usize, 200u64);
    let killer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            for round in 0..restarts {
                let served = util::serve(&dir, &["--upkeep-interval", "0.01"]);
                // Killed after 0 to 57 ms: before, during and after its passes.
                std::thread::sleep(Duration::from_millis(round * 7919 % 58));
                let mut p = served.proc;
                p.signal(Signal::SIGKILL);
                p.wait_timeout(T);
            }
        })
    };
    let mut expected = requests(4, 0);
    let mut running: Vec<util::Proc> = Vec::new();
    let spawn = || {
        let child = Command::new(util::example_bin("workload"))
            .args(["--workers", &per_batch.to_string(), "--series", "1"])
            .env("SHMETRICS_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn workload");
        util::Proc { child }
    };
    for _ in 0..batches {
        if running.len() == parallel {
            let mut wl = running.remove(0);
            assert!(wl.wait_timeout(Duration::from_secs(60)).success());
        }
        running.push(spawn());
        expected += requests(per_batch, 0);
    }
    for mut wl in running {
        assert!(wl.wait_timeout(Duration::from_secs(60)).success());
    }
    killer.join().expect("killer thread");
    let served = util::serve(&dir, &["--upkeep-interval", "0.02"]);
    util::wait_for(T, "every dead file folded", || (writer_files(&dir).len() == 5).then_some(()));
    let s = util::samples(&util::scrape(served.addr));
    assert_eq!(get(&s, "wl_requests_total{route=\"/r0\"}"), expected, "each request exactly once");
    assert_eq!(get(&s, "shmetrics_workers_dead_total"), (batches * (per_batch + 1)) as f64);
    // Once the dead files are removed, the archive's list of folded ids empties again.
    let folded = || {
        let bytes = std::fs::read(dir.join("archive.json")).ok()?;
        let archive: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        archive["folded"].as_array().map(Vec::len)
    };
    util::wait_for(T, "the archive's folded list to empty", || (folded() == Some(0)).then_some(()));
    let names = util::ls(&dir);
    let temps: Vec<&String> = names.iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    let size = std::fs::metadata(dir.join("archive.json")).expect("archive").len();
    assert!(size < 16 * 1024, "archive.json is {size} bytes");
    drop(live);
}
