//! Limits of the HTTP endpoint with real sockets against a real `shmetrics serve`: the connection
//! cap and its `503`, the write timeout for clients that never read, hyper's header-read timeout
//! on idle keep-alive connections, and the limit on `/perf_metrics` measurements.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use shmetrics::server::http::{
    HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_MEASUREMENTS, MAX_REJECTING, WRITE_TIMEOUT,
};

use crate::util;

const T: Duration = Duration::from_secs(10);

/// An aggregator on a fresh directory with `workload --hold --workers W --series S`.
struct Env {
    _held: util::Workload,
    served: util::Served,
    _tmp: tempfile::TempDir,
}

impl Env {
    fn start(workers: u64, series: u64) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mp");
        let served = util::serve(&dir, &[]);
        let held = util::workload(
            &dir,
            &["--hold", "--workers", &workers.to_string(), "--series", &series.to_string()],
        );
        Env { _held: held, served, _tmp: tmp }
    }

    fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// The aggregator's connections on its HTTP port.
    fn connections(&self) -> usize {
        util::tcp_connections(self.served.proc.pid(), self.addr().port())
    }

    fn assert_alive(&mut self) {
        let st = self.served.proc.child.try_wait().expect("try_wait");
        let log = std::fs::read_to_string(&self.served.log).unwrap_or_default();
        assert!(st.is_none(), "the aggregator died: {st:?}; log: {log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s
}

/// A connection whose receive buffer is 4 KiB (set before connecting, so the window is small
/// from the start).
fn connect_small_window(addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let s = sock.connect(addr).await.expect("connect");
        let s = s.into_std().expect("std stream");
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        s
    })
}

/// The status of a `GET path` (Connection: close), `None` if the server closed without an answer.
fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = connect(addr);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("write");
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("read: {e}"),
    }
    let head = String::from_utf8_lossy(&raw[..raw.len().min(32)]).into_owned();
    head.split(' ').nth(1).and_then(|c| c.parse().ok())
}

/// Reads one response with a `content-length` from a keep-alive connection: status and body.
fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    let mut b = [0u8; 4096];
    let end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut b).expect("read head");
        assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body = raw[end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut b).expect("read body");
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&b[..n]);
    }
    (status, body)
}

/// The exact answer to a connection over the cap.
fn too_many() -> String {
    let body = format!("too many connections (limit {MAX_CONNECTIONS}); try again later\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// MAX_CONNECTIONS connections that send nothing take every slot: the next ones get a short 503
/// and are closed; once the load drops, /metrics answers again with exact totals.
#[test]
fn connections_over_the_cap_get_503() {
    util::raise_open_files_limit(4 * MAX_CONNECTIONS as u64);
    let mut env = Env::start(1, 2);
    let addr = env.addr();
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| connect(addr)).collect();
    util::wait_for(T, "the server to accept them all", || {
        (env.connections() == MAX_CONNECTIONS).then_some(())
    });

    // As many as may be told at once, each sending a request: all get the 503, then EOF.
    let extra = MAX_REJECTING;
    let mut answers: Vec<TcpStream> = (0..extra)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
            s
        })
        .collect();
    for (i, s) in answers.iter_mut().enumerate() {
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(String::from_utf8_lossy(&raw), too_many(), "connection {i}");
    }
    // Once those are gone, the server holds the held connections, undisturbed, and no more.
    drop(answers);
    util::wait_for(T, "the refused connections to be closed", || {
        (env.connections() == MAX_CONNECTIONS).then_some(())
    });
    env.assert_alive();

    drop(held);
    util::wait_for(T, "/metrics to answer again", || (status(addr, "/metrics") == Some(200)).then_some(()));
    let s = util::samples(&util::scrape(addr));
    assert_eq!(s.get("wl_requests_total{route=\"/r1\"}"), Some(&2.0));
    assert_eq!(s.get("wl_bytes_total"), Some(&0.5));
}

/// Clients that send a request for a response larger than the socket buffers and never read are
/// disconnected once their writes have made no progress for WRITE_TIMEOUT, keep-alive or not,
/// while a normal client is served; each stalled client got a truncated response.
#[test]
fn clients_that_never_read_are_disconnected_after_the_write_timeout() {
    // About 5.5 MB of exposition.
    let mut env = Env::start(1, 30_000);
    let addr = env.addr();
    let full = util::http_get(addr, "/metrics", &[]).body.len();
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").expect("tcp_wmem");
    let wmem_max: usize = wmem.split_whitespace().nth(2).and_then(|v| v.parse().ok()).expect("tcp_wmem max");
    assert!(
        full > wmem_max + (1 << 20),
        "the response ({full} bytes) must not fit the server's send buffer (tcp_wmem max {wmem_max})"
    );

    let n = 16;
    let mut stalled: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = connect_small_window(addr);
            let close = if i % 2 == 0 { "Connection: close\r\n" } else { "" };
            s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}\r\n").as_bytes())
                .expect("write");
            s
        })
        .collect();
    util::wait_for(T, "the stalled connections", || (env.connections() >= n).then_some(()));
    // Meanwhile others are served.
    assert_eq!(util::http_get(addr, "/healthz", &[]).status, 503);
    assert_workload_totals(&util::scrape(addr));

    // Every response is built within a few seconds; then WRITE_TIMEOUT without progress. The wait
    // is a hang guard: without a write timeout they stay connected.
    util::wait_for(WRITE_TIMEOUT + Duration::from_secs(30), "the stalled connections to be closed", || {
        (env.connections() == 0).then_some(())
    });
    for (i, s) in stalled.iter_mut().enumerate() {
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("stalled client {i}: {e}"),
        }
        // A head, and less body than it announced.
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "stalled client {i}: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        assert!(got.len() - end < len, "stalled client {i} got all {len} bytes");
    }
    env.assert_alive();
    assert_workload_totals(&util::scrape(addr));
}

/// The totals of `workload --workers 1` for a few of its series.
fn assert_workload_totals(text: &str) {
    let s = util::samples(text);
    for i in [0u32, 1, 29_999] {
        let key = format!("wl_requests_total{{route=\"/r{i}\"}}");
        assert_eq!(s.get(&key), Some(&f64::from(i + 1)), "{key}");
    }
    assert_eq!(s.get("wl_bytes_total"), Some(&0.5));
}

/// hyper's header-read timeout also closes a keep-alive connection that stays idle after its
/// response (the README says so): the connection is reused at once, then closed by the server.
#[test]
fn idle_keep_alive_connections_are_closed_by_the_header_read_timeout() {
    let env = Env::start(1, 2);
    let mut s = connect(env.addr());
    for _ in 0..2 {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let (status, body) = read_response(&mut s);
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("wl_bytes_total 0.5\n"));
    }
    // Now idle: the server closes it (a hang guard bounds the wait).
    s.set_read_timeout(Some(HEADER_READ_TIMEOUT + Duration::from_secs(20))).expect("timeout");
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest)),
        Err(e) => panic!("the idle keep-alive connection was not closed: {e}"),
    }
}

/// At most MAX_MEASUREMENTS `/perf_metrics?interval=…` at once: of one more started together,
/// one gets a 503; requests without an interval are served meanwhile.
#[test]
fn perf_metrics_measurements_are_limited() {
    let env = Env::start(1, 2);
    let addr = env.addr();
    let running: Vec<std::thread::JoinHandle<(u16, String)>> = (0..=MAX_MEASUREMENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let r = util::http_get(addr, "/perf_metrics?interval=3", &[]);
                (r.status, r.text())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(util::http_get(addr, "/perf_metrics", &[]).status, 200);
    let mut answers: Vec<(u16, String)> = running.into_iter().map(|t| t.join().expect("thread")).collect();
    answers.sort();
    let refused = format!(
        "too many perf_metrics measurements at once (limit {MAX_MEASUREMENTS}); try again later, \
         or without ?interval\n"
    );
    assert_eq!(answers.last(), Some(&(503, refused)));
    assert!(answers[..MAX_MEASUREMENTS].iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(util::http_get(addr, "/perf_metrics?interval=0.1", &[]).status, 200);
}
