//! The aggregator under hostile conditions, with real files, processes and sockets: garbage and
//! truncated files in the directory, files truncated while being read (the SIGBUS guard),
//! concurrent scrapes while a writer updates, slow and malformed HTTP clients, and gzip.
//!
//! Expected values come from the closed forms in `examples/workload.rs`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use shmetrics::writer::Registry;

use crate::util;

const T: Duration = Duration::from_secs(10);

/// A `workload --hold` run, stopped (SIGTERM to the master, which forwards it) on drop.
struct Held {
    wl: util::Workload,
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

/// An aggregator on a fresh directory, optionally with live workload workers. Fields drop in
/// order: workers, aggregator, then the temp dir.
struct Env {
    held: Option<Held>,
    served: util::Served,
    dir: PathBuf,
    tmp: tempfile::TempDir,
}

impl Env {
    /// `workload`: `Some((W, S))` starts `workload --hold --workers W --series S`.
    fn start(workload: Option<(u64, u64)>, serve_args: &[&str]) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mp");
        let served = util::serve(&dir, serve_args);
        let held = workload.map(|(w, s)| {
            let (w, s) = (w.to_string(), s.to_string());
            Held { wl: util::workload(&dir, &["--hold", "--workers", &w, "--series", &s]) }
        });
        Env { held, served, dir, tmp }
    }

    fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    fn assert_alive(&mut self) {
        let st = self.served.proc.child.try_wait().expect("try_wait");
        assert!(st.is_none(), "the aggregator died: {st:?}; log: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.served.log).unwrap_or_default()
    }
}

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}; have {:?}", s.keys().collect::<Vec<_>>()))
}

/// Asserts the values of `workload --workers w --series s` (K = 1, M = 0, H = 1) with every
/// worker alive, for the families whose merged value is exact while they live.
fn assert_workload_totals(s: &BTreeMap<String, f64>, w: u64, series: u64) {
    let t = (w * (w + 1) / 2) as f64;
    let wf = w as f64;
    for i in 0..series {
        let i1 = (i + 1) as f64;
        assert_eq!(get(s, &format!("wl_requests_total{{route=\"/r{i}\"}}")), i1 * t, "/r{i}");
        assert_eq!(get(s, &format!("wl_max{{route=\"/r{i}\"}}")), wf * i1, "/r{i}");
        assert_eq!(get(s, &format!("wl_inflight{{route=\"/r{i}\"}}")), wf * i1 + t, "/r{i}");
    }
    assert_eq!(get(s, "wl_bytes_total"), t / 2.0);
    assert_eq!(get(s, "wl_recent"), wf);
    let h = |le: &str| get(s, &format!("wl_latency_seconds_bucket{{route=\"/h0\",le=\"{le}\"}}"));
    assert_eq!(h("0.1"), wf.min(2.0));
    assert_eq!(h("0.5"), wf.min(10.0));
    assert_eq!(h("1.0"), wf.min(20.0));
    assert_eq!(h("+Inf"), wf);
    assert_eq!(get(s, "wl_latency_seconds_count{route=\"/h0\"}"), wf);
}

/// The writer file of process `pid`.
fn file_of(dir: &Path, pid: i32) -> PathBuf {
    let prefix = format!("w-{pid}-");
    let files: Vec<String> = util::ls(dir).into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert_eq!(files.len(), 1, "expected one file of pid {pid} in {:?}", util::ls(dir));
    dir.join(&files[0])
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn used_of(bytes: &[u8]) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[16..24]);
    u64::from_le_bytes(b) as usize
}

#[test]
fn garbage_truncated_and_foreign_files_are_skipped_and_counted() {
    let env = Env::start(Some((2, 200)), &[]);
    let dir = &env.dir;
    let held = env.held.as_ref().expect("workload");
    let real = std::fs::read(file_of(dir, held.wl.pids[0])).expect("read a real worker file");
    let used = used_of(&real);
    assert!(real.len() / 2 < used, "half the file ({}) must cut its records (used {used})", real.len() / 2);

    // Every file is made aside and renamed in, so the aggregator never sees it half-written.
    let staging = env.tmp.path().join("staging");
    std::fs::DirBuilder::new().mode(0o700).create(&staging).expect("staging");
    let put = |name: &str, content: &[u8]| {
        std::fs::write(staging.join(name), content).expect("write");
        std::fs::rename(staging.join(name), dir.join(name)).expect("rename");
    };
    let id = "0123456789abcdef0123456789abcdef";
    let random = noise(8192, 0x9e37_79b9_7f4a_7c15);
    assert_ne!(&random[..8], b"SHMETRIC");
    // Copies carry the pid and id of their new name in their header, as a real writer's file does
    // (a file whose name and header disagree is refused as a copy, which another test covers).
    let renamed = |bytes: &[u8], pid: u64| {
        let mut b = bytes.to_vec();
        b[32..40].copy_from_slice(&pid.to_le_bytes());
        for (i, byte) in b[48..64].iter_mut().enumerate() {
            *byte = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).expect("hex");
        }
        b
    };
    put(&format!("w-900001-{id}.shm"), &random);
    put(&format!("w-900002-{id}.shm"), &real[..100]);
    put(&format!("w-900003-{id}.shm"), &renamed(&real, 900003)[..real.len() / 2]);
    let mut v99 = renamed(&real, 900004);
    v99[8..12].copy_from_slice(&99u32.to_le_bytes());
    put(&format!("w-900004-{id}.shm"), &v99);
    put("notes.txt", b"not ours\n");
    put("w-1-00000000000000000000000000000000.shm", b"");
    let subdir = "w-2-00000000000000000000000000000000.shm";
    std::fs::DirBuilder::new().mode(0o700).create(staging.join(subdir)).expect("mkdir");
    std::fs::rename(staging.join(subdir), dir.join(subdir)).expect("rename dir");

    // A directory named like a worker file is not opened at all: not a regular file.
    let expected: BTreeMap<&str, f64> = [
        ("foreign", 2.0),
        ("version", 1.0),
        ("truncated", 3.0),
        ("corrupt", 0.0),
        ("not_regular", 1.0),
        ("owner", 0.0),
    ]
    .into_iter()
    .collect();

    for round in 0..2 {
        let r = util::http_get(env.addr(), "/metrics", &[]);
        assert_eq!(r.status, 200, "round {round}");
        let s = util::samples(&r.text());
        assert_workload_totals(&s, 2, 200);
        util::assert_openmetrics_parses(env.addr());
        for (reason, n) in &expected {
            assert_eq!(get(&s, &format!("shmetrics_bad_files{{reason=\"{reason}\"}}")), *n, "{reason}");
        }
        // Master + 2 workers are followed; the 6 unreadable writer-named entries are examined once
        // each and not again while they do not change.
        assert_eq!(get(&s, "shmetrics_files"), 3.0);
        assert_eq!(get(&s, "shmetrics_workers_live"), 2.0, "the master is not a worker");
        assert_eq!(get(&s, "shmetrics_bad_file_events_total"), 6.0, "round {round}");
        assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0, "no bad file may be folded");
    }
    // Bad files are left in place for the operator.
    for n in [&format!("w-900001-{id}.shm"), &format!("w-900003-{id}.shm"), "notes.txt", subdir] {
        assert!(dir.join(n).exists(), "{n} was removed");
    }
}

#[test]
fn concurrent_truncation_never_crashes_the_aggregator() {
    let mut env = Env::start(Some((2, 20)), &["--upkeep-interval", "0.05"]);
    // A writer in this process with many series: its file, copied under another worker-style name
    // and truncated over and over, is what the aggregator reads while it shrinks. Its metric names
    // differ from the workload's, so a copy that gets folded never touches the totals checked.
    let reg = Registry::open(&env.dir).expect("registry");
    let fam = reg.counter_family("rb_copy_total", "Copied.", &["i"]).expect("family");
    for i in 0..2000u32 {
        fam.with_labels(&[i.to_string().as_str()]).expect("series").inc();
    }
    let bytes = std::fs::read(reg.path().expect("file")).expect("read");
    let used = used_of(&bytes);
    let bytes = bytes[..used.div_ceil(4096) * 4096].to_vec();
    let cuts = [0u64, 100, 4096, 4096 + (used as u64 - 4096) / 2, used as u64 - 8];

    let stop = Arc::new(AtomicBool::new(false));
    let copy = env.dir.join("w-424242-ffffffffffffffffffffffffffffffff.shm");
    let truncator = {
        let (stop, copy) = (Arc::clone(&stop), copy.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&copy);
                let Ok(f) = f else { continue };
                let _ = f.write_all_at(&bytes, 0);
                let _ = f.set_len(bytes.len() as u64);
                std::thread::sleep(Duration::from_micros(300));
                let _ = f.set_len(cuts[rounds as usize % cuts.len()]);
                std::thread::sleep(Duration::from_micros(300));
                rounds += 1;
            }
            rounds
        })
    };

    let start = Instant::now();
    let mut scrapes = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let r = util::http_get(env.addr(), "/metrics", &[]);
        assert_eq!(r.status, 200, "scrape {scrapes}");
        let s = util::samples(&r.text());
        assert_workload_totals(&s, 2, 20);
        scrapes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = truncator.join().expect("truncator thread");
    env.assert_alive();
    let s = util::samples(&util::scrape(env.addr()));
    assert_workload_totals(&s, 2, 20);
    let log = env.log();
    let guarded = log.matches("truncated while being read").count();
    eprintln!(
        "concurrent truncation: {scrapes} scrapes, {rounds} truncations, {guarded} reads cut by SIGBUS, \
         {} files folded",
        get(&s, "shmetrics_workers_dead_total")
    );
    assert!(scrapes >= 10, "only {scrapes} scrapes in 2 s");
    assert!(rounds >= 10, "only {rounds} truncations in 2 s");
}

#[test]
fn concurrent_scrapes_while_a_writer_updates_are_consistent() {
    let env = Env::start(None, &[]);
    let reg = Registry::open(&env.dir).expect("registry");
    let counter = reg.counter("rb_conc", "Updated while scraped.").expect("counter");
    let hist = reg.histogram("rb_conc_seconds", "Observed while scraped.", &[0.1, 0.5, 1.0]).expect("hist");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let values = [0.05, 0.3, 0.7, 2.0, 0.1];
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                counter.inc();
                hist.observe(values[i % values.len()]);
                i += 1;
                if i.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        })
    };
    let les = ["0.1", "0.5", "1.0", "+Inf"];
    let addr = env.addr();
    let scrapers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut prev_c, mut prev_n) = (0.0, 0.0);
                for k in 0..50 {
                    let r = util::http_get(addr, "/metrics", &[]);
                    assert_eq!(r.status, 200, "thread {t} scrape {k}");
                    let s = util::samples(&r.text());
                    let c = get(&s, "rb_conc_total");
                    assert!(c >= prev_c, "thread {t} scrape {k}: counter went from {prev_c} to {c}");
                    prev_c = c;
                    let cum: Vec<f64> = les
                        .iter()
                        .map(|le| get(&s, &format!("rb_conc_seconds_bucket{{le=\"{le}\"}}")))
                        .collect();
                    assert!(cum.windows(2).all(|w| w[0] <= w[1]), "thread {t} scrape {k}: buckets {cum:?}");
                    let non_cumulative: f64 =
                        cum.iter().zip(std::iter::once(&0.0).chain(cum.iter())).map(|(a, b)| a - b).sum();
                    let n = get(&s, "rb_conc_seconds_count");
                    assert_eq!(n, cum[3], "thread {t} scrape {k}: _count vs +Inf bucket");
                    assert_eq!(n, non_cumulative, "thread {t} scrape {k}: _count vs bucket sum");
                    assert!(n >= prev_n, "thread {t} scrape {k}: _count went from {prev_n} to {n}");
                    prev_n = n;
                }
            })
        })
        .collect();
    for s in scrapers {
        s.join().expect("scraper thread");
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    // Quiescent: the merged values are exactly this process's.
    let s = util::samples(&util::scrape(addr));
    assert_eq!(get(&s, "rb_conc_total"), counter.get() as f64);
    assert_eq!(get(&s, "rb_conc_seconds_count"), hist.get().0 as f64);
    assert!(counter.get() > 0);
}

#[test]
fn a_stalled_client_does_not_block_other_scrapes() {
    let env = Env::start(Some((1, 2)), &[]);
    let mut stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&env.addr(), Duration::from_secs(5)).expect("connect");
            s.write_all(b"GET /metr").expect("half a request line");
            s
        })
        .collect();
    for _ in 0..3 {
        let t0 = Instant::now();
        let r = util::http_get(env.addr(), "/metrics", &[]);
        assert_eq!(r.status, 200);
        assert_workload_totals(&util::samples(&r.text()), 1, 2);
        // Far below the 10 s header-read timeout a blocked server would make us wait.
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "scrape took {:?} beside stalled clients",
            t0.elapsed()
        );
    }
    // The stalled clients got nothing yet: their connections are simply pending.
    for s in &mut stalled {
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("a stalled client got {other:?} before the header-read timeout"),
        }
    }
}

/// Sends raw bytes, then reads until the server closes. `Some(status)` if it answered with an
/// HTTP status line, `None` if it closed (or reset) without one. Panics if it neither answers nor
/// closes within 10 s.
fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.set_write_timeout(Some(T)).expect("timeout");
    // The server may close before we are done writing: that is a fine answer to garbage.
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("the server neither answered nor closed within {T:?}")
        }
        Err(e) => panic!("read: {e}"),
    }
    if raw.is_empty() {
        return None;
    }
    let head = String::from_utf8_lossy(&raw[..raw.len().min(64)]).to_string();
    assert!(head.starts_with("HTTP/1."), "not an HTTP answer: {head:?}");
    Some(head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code"))
}

#[test]
fn bad_protocol_input_is_refused_and_the_next_scrape_works() {
    let mut env = Env::start(Some((1, 2)), &[]);
    let addr = env.addr();
    let long_line = {
        let mut v = b"GET /".to_vec();
        v.extend(std::iter::repeat_n(b'a', 1 << 20));
        v.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
        v
    };
    let big_header = {
        let mut v = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        v.extend(std::iter::repeat_n(b'b', 1 << 20));
        v.extend_from_slice(b"\r\n\r\n");
        v
    };
    let many_headers = {
        let mut v = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..1000 {
            v.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        v.extend_from_slice(b"\r\n");
        v
    };
    let mut garbage = noise(4096, 42);
    garbage.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", garbage),
        ("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        ("bad request line", b"HELLO\r\n\r\n".to_vec()),
        ("NUL in the method", b"G\0T /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("1 MiB request line", long_line),
        ("1 MiB header", big_header),
        ("1000 headers", many_headers),
    ];
    for (what, bytes) in &cases {
        if let Some(status) = send_raw(addr, bytes) {
            assert!((400..500).contains(&status), "{what}: answered {status}");
        }
        env.assert_alive();
        let r = util::http_get(addr, "/metrics", &[]);
        assert_eq!(r.status, 200, "scrape after {what}");
        assert_workload_totals(&util::samples(&r.text()), 1, 2);
    }
    // Well-formed but wrong requests get their proper status.
    assert_eq!(
        send_raw(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ),
        Some(405)
    );
    assert_eq!(util::http_get(addr, "/nope", &[]).status, 404);
    assert_eq!(util::http_get(addr, "/metrics", &[]).status, 200);
}

/// Samples without the ones that change from scrape to scrape.
fn stable(text: &str) -> BTreeMap<String, f64> {
    util::samples(text)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("shmetrics_scrape") && !k.starts_with("shmetrics_merges"))
        .collect()
}

#[test]
fn gzip_body_is_the_same_exposition() {
    let env = Env::start(Some((3, 5)), &[]);
    let plain = util::http_get(env.addr(), "/metrics", &[]);
    let gz = util::http_get(env.addr(), "/metrics", &[("Accept-Encoding", "gzip")]);
    assert_eq!((plain.status, gz.status), (200, 200));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("content-type"), plain.header("content-type"));
    assert!(
        gz.header("vary").is_some_and(|v| v.contains("Accept-Encoding")),
        "vary: {:?}",
        gz.header("vary")
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.body.as_slice()).read_to_string(&mut text).expect("gunzip");
    assert!(gz.body.len() < text.len(), "compressed {} vs {}", gz.body.len(), text.len());
    let (a, b) = (stable(&plain.text()), stable(&text));
    assert_workload_totals(&b, 3, 5);
    assert_eq!(a, b);
    // gzip refused with q=0: identity.
    let r = util::http_get(env.addr(), "/metrics", &[("Accept-Encoding", "gzip;q=0")]);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(stable(&r.text()), a);
}

/// A copy of a live worker's file — under any name, even one that matches its header — is one
/// worker, not two: totals stay exact and nothing is folded.
#[test]
fn copies_of_a_live_workers_file_are_not_counted_twice() {
    let env = Env::start(Some((2, 3)), &[]);
    let dir = &env.dir;
    let held = env.held.as_ref().expect("workload");
    let real_path = file_of(dir, held.wl.pids[0]);
    let real = std::fs::read(&real_path).expect("read a real worker file");
    let real_name = real_path.file_name().and_then(|n| n.to_str()).expect("name").to_string();
    let id = real_name.trim_end_matches(".shm").rsplit('-').next().expect("id").to_string();
    let staging = env.tmp.path().join("staging-copies");
    std::fs::create_dir_all(&staging).expect("staging");
    let put = |name: &str, content: &[u8]| {
        std::fs::write(staging.join(name), content).expect("write");
        std::fs::rename(staging.join(name), dir.join(name)).expect("rename");
    };
    // Plain copy under another pid: name and header disagree.
    put(&format!("w-900010-{id}.shm"), &real);
    // Copy whose header pid was rewritten to match its name: same file id as the original.
    let mut same_id = real.clone();
    same_id[32..40].copy_from_slice(&900011u64.to_le_bytes());
    put(&format!("w-900011-{id}.shm"), &same_id);
    // The same with pid 1: `w-1-…` sorts before any real worker's file, so the aggregator meets the
    // copy first; the genuine file (its lock held) must still win.
    let mut first = real.clone();
    first[32..40].copy_from_slice(&1u64.to_le_bytes());
    put(&format!("w-1-{id}.shm"), &first);
    for round in 0..3 {
        let s = util::samples(&util::scrape(env.addr()));
        assert_workload_totals(&s, 2, 3);
        assert_eq!(get(&s, "shmetrics_bad_files{reason=\"corrupt\"}"), 3.0, "round {round}");
        assert_eq!(get(&s, "shmetrics_workers_dead_total"), 0.0, "round {round}");
        assert_eq!(get(&s, "shmetrics_workers_live"), 2.0, "round {round}: 2 workers and their master");
    }
}

/// 300 clients scrape a W=4 S=1000 directory at once: every one gets the whole, right
/// exposition, and they share merges (issue 9: one merge for many scrapes). How many merges
/// depends on timing; that they are fewer than the scrapes does not (a merge of 4 files takes
/// far longer than it takes the 300 requests to arrive while it runs).
#[test]
fn concurrent_scrapes_share_one_merge() {
    const CLIENTS: usize = 300;
    util::raise_open_files_limit(4 * CLIENTS as u64);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let wl = util::workload(&dir, &["--workers", "4", "--series", "1000", "--hold"]);
    let addr = served.addr;
    let before = util::samples(&util::scrape(addr));
    let scrapes_before = before["shmetrics_scrapes_total"];
    let merges_before = before["shmetrics_merges_total"];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                util::http_get(addr, "/metrics", &[])
            })
        })
        .collect();
    for c in clients {
        let r = c.join().expect("client");
        assert_eq!(r.status, 200);
        let s = util::samples(&r.text());
        // K·(i+1)·T with K = 1, i = 999, T = 1+2+3+4.
        assert_eq!(s.get("wl_requests_total{route=\"/r999\"}"), Some(&10000.0));
        assert_eq!(s.len(), before.len(), "every series in every answer");
    }
    let after = util::samples(&util::scrape(addr));
    let scrapes = after["shmetrics_scrapes_total"] - scrapes_before;
    let merges = after["shmetrics_merges_total"] - merges_before;
    assert_eq!(scrapes, CLIENTS as f64 + 1.0, "each scrape counted");
    assert!(merges >= 1.0 && merges < scrapes / 2.0, "{merges} merges for {scrapes} scrapes");
    drop(wl);
}
