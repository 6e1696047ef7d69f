//! Shared helpers: locating binaries, running the aggregator and workloads, scraping, parsing.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of an example binary built by cargo for this test run.
pub fn example_bin(name: &str) -> PathBuf {
    // target/<profile>/deps/it-<hash> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let p = profile_dir.join("examples").join(name);
    assert!(p.exists(), "{} not built: run the tests with `cargo test` (which builds examples)", p.display());
    p
}

/// Path of the `shmetrics` binary.
pub fn shmetrics_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shmetrics"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot be told port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind").port()
}

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped on drop, unless already reaped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }
    /// Waits for exit (with a timeout) and returns the status.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for(timeout, "process exit", || self.child.try_wait().expect("try_wait"))
    }
}

impl Drop for Proc {
    /// SIGTERM first (so a master can stop its workers), SIGKILL after 3 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.pid());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running aggregator (`shmetrics serve` or `shmetrics run`) and the address it serves on.
pub struct Served {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// Everything the process wrote to stderr so far is drained into this file by a thread.
    pub log: PathBuf,
}

/// Starts `shmetrics <args>` with `--listen 127.0.0.1:0` appended before any `--`, and waits for
/// the "serving http://ADDR/metrics" log line. Extra environment in `env`.
pub fn spawn_shmetrics(args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Served {
    let mut full: Vec<String> = Vec::new();
    let mut inserted = false;
    for a in args {
        if *a == "--" && !inserted {
            full.extend(["--listen".into(), "127.0.0.1:0".into()]);
            inserted = true;
        }
        full.push((*a).to_string());
    }
    if !inserted {
        full.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    let mut cmd = Command::new(shmetrics_bin());
    cmd.args(&full).stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::piped());
    cmd.env("SHMETRICS_LOG", "info").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc { child: cmd.spawn().expect("spawn shmetrics") };
    let child = &mut proc.child;
    let stderr = child.stderr.take().expect("stderr");
    std::fs::create_dir_all(log_dir).expect("log dir");
    let log = log_dir.join(format!("shmetrics-{}.log", child.id()));
    // What stderr says before "serving http://ADDR/": the address, or the lines that mention an
    // error (kept for the message if it never serves), or the end (it exited). An error line
    // alone is not a failed start: a pusher or a poller may log one before the line is printed.
    enum Said {
        Serving(String),
        Error(String),
        Exited,
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.clone();
    std::thread::spawn(move || {
        let mut out = std::fs::File::create(&log_path).expect("log file");
        let mut serving = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(out, "{line}");
            if !serving {
                if let Some(rest) = line.split("serving http://").nth(1) {
                    let _ = tx.send(Said::Serving(rest.split('/').next().unwrap_or("").to_string()));
                    serving = true;
                } else if line.contains("error") {
                    let _ = tx.send(Said::Error(line.clone()));
                }
            }
        }
        if !serving {
            let _ = tx.send(Said::Exited);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut errors = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Said::Serving(a)) => break a.parse().expect("addr"),
            Ok(Said::Error(line)) => errors.push(line),
            Ok(Said::Exited) => panic!("shmetrics did not start: it exited: {}", errors.join("\n")),
            Err(_) => panic!("shmetrics did not start within 20 s: {}", errors.join("\n")),
        }
    };
    Served { proc, addr, log }
}

/// Starts `shmetrics serve --dir DIR [extra]`.
pub fn serve(dir: &Path, extra: &[&str]) -> Served {
    let d = dir.to_str().expect("utf-8 path");
    let mut args = vec!["serve", "--dir", d];
    args.extend_from_slice(extra);
    spawn_shmetrics(&args, &[], dir.parent().unwrap_or(dir))
}

/// A tmpfs mounted on `mnt` (`root`/mnt, mode 0700), unmounted (lazily) on drop; `root`, the
/// temporary directory holding the mount point, is there for files that must stay off the tmpfs.
pub struct Tmpfs {
    pub root: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` (what `mount -o` takes, without the mode: `size=512k`,
    /// `size=64m,nr_inodes=1000`; `mode=0700` is always added). Where mounting is impossible it
    /// panics (naming `test` and why), unless `SHMETRICS_TEST_NO_MOUNT=1` asks to skip: then it
    /// prints `SKIPPED {test}: …` to stderr and returns `None`.
    pub fn mount(test: &str, options: &str) -> Option<Tmpfs> {
        let root = tempfile::tempdir().expect("tempdir");
        let mnt = root.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("{options},mode=0700"), "tmpfs"])
            .arg(&mnt)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { root, mnt }),
            Ok(o) => {
                format!("mount -t tmpfs failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(e) => format!("cannot run mount: {e}"),
        };
        if std::env::var("SHMETRICS_TEST_NO_MOUNT").as_deref() == Ok("1") {
            // Straight to stderr, past the test harness's output capture: a skip must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why} (SHMETRICS_TEST_NO_MOUNT=1)");
            return None;
        }
        panic!(
            "{test} needs a tmpfs: {why}. Run the tests as root, or set SHMETRICS_TEST_NO_MOUNT=1 to skip it"
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process of a failed test may still hold a file there.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8 body")
    }
}

/// A minimal HTTP/1.1 GET (Connection: close) with extra request headers.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = std::str::from_utf8(&raw[..end]).expect("head utf-8");
    let mut lines = head.split("\r\n");
    let status: u16 =
        lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).expect("hex").trim(), 16).expect("hex");
        b = &b[nl + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// GET /metrics as Prometheus text.
pub fn scrape(addr: SocketAddr) -> String {
    let r = http_get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200, "scrape status");
    r.text()
}

/// Samples of a Prometheus text exposition: `name{labels}` exactly as written → value.
/// Comment lines are skipped; the line key keeps label order and escaping as exposed.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = split_value(line);
        out.insert(key.to_string(), value);
    }
    out
}

/// Splits a sample line into `name{labels}` and its value (`+Inf`, `-Inf`, `NaN` included).
pub fn split_value(line: &str) -> (&str, f64) {
    let (head, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    (head, v)
}

/// Splits `name{labels}` into the name and the inside of the braces (`None` without labels).
pub fn split_labels(head: &str) -> (&str, Option<&str>) {
    match head.split_once('{') {
        None => (head, None),
        Some((name, rest)) => {
            (name, Some(rest.strip_suffix('}').unwrap_or_else(|| panic!("labels of {head:?}"))))
        }
    }
}

/// The pids of a `READY <pid> <pid> …` line (workload's).
pub fn parse_ready(line: &str) -> Vec<i32> {
    line.strip_prefix("READY")
        .unwrap_or_else(|| panic!("unexpected workload output {line:?}"))
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect()
}

/// A `workload` example run: the process and the pids it printed in its READY line.
pub struct Workload {
    pub proc: Proc,
    pub pids: Vec<i32>,
    pub stdout: BufReader<ChildStdout>,
}

/// Starts `workload` with SHMETRICS_DIR=dir and `args`, waits for its READY line.
pub fn workload(dir: &Path, args: &[&str]) -> Workload {
    let mut child = Command::new(example_bin("workload"))
        .args(args)
        .env("SHMETRICS_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn workload");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("READY line");
    let pids = parse_ready(&line);
    Workload { proc: Proc { child }, pids, stdout }
}

/// Names of the entries of a directory, sorted.
pub fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    v.sort();
    v
}

/// Number of worker files (`w-*.shm`) in a directory.
pub fn worker_files(dir: &Path) -> usize {
    ls(dir).iter().filter(|n| n.starts_with("w-") && n.ends_with(".shm")).count()
}

/// The Python interpreter with prometheus_client (`$SHMETRICS_TEST_PYTHON`, set by `.ci/run`).
pub fn python() -> String {
    std::env::var("SHMETRICS_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// [`python`], failing with instructions when it cannot import prometheus_client: these checks must
/// not silently pass.
pub fn require_python() -> String {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import prometheus_client"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{py} cannot import prometheus_client: run `bash .ci/run`, or create a venv with \
         `pip install prometheus_client==0.26.0` and set SHMETRICS_TEST_PYTHON to its python"
    );
    py
}

/// Runs `cmd` with `input` on its stdin; whether it succeeded, and its stdout and stderr.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Scrapes `/metrics` as OpenMetrics (what Prometheus asks for) and checks that
/// prometheus_client's OpenMetrics parser accepts all of it (the parser checks more than
/// Prometheus does: counter-like samples neither NaN nor negative, histogram `_sum`/`_count`
/// rules, bucket order). Panics with the parser's error and the text. Returns the text.
pub fn assert_openmetrics_parses(addr: SocketAddr) -> String {
    const PARSE: &str = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as f\n\
        n = sum(len(m.samples) for m in f(sys.stdin.read()))\n\
        print(n)\n";
    let py = require_python();
    let r = http_get(addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]);
    assert_eq!(r.status, 200, "OpenMetrics scrape");
    let text = r.text();
    let mut child = Command::new(&py)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the OpenMetrics parser");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "prometheus_client's OpenMetrics parser rejected the exposition:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Parses the inside of `{…}` of an exposition line (`a="x",b="y\n"`) into a map, unescaping
/// values.
pub fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (k, rest) = s.split_once("=\"").unwrap_or_else(|| panic!("label in {s:?}"));
        let mut v = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c)) => v.push(c),
                    None => panic!("escape at end of {s:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label value in {s:?}"),
            }
        };
        labels.insert(k.to_string(), v);
        s = rest[end + 1..].strip_prefix(',').unwrap_or(&rest[end + 1..]);
    }
    labels
}

/// Raises this process's soft open-files limit to the hard limit, and panics with instructions if
/// it stays below `need` (tests opening hundreds of sockets run beside others in this process).
pub fn raise_open_files_limit(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    assert!(
        hard >= need,
        "this test needs {need} open files, the hard limit is {hard}: raise it (`ulimit -Hn {need}` as root)"
    );
}

/// Established TCP connections of process `pid` on its local port `port` (its listening socket
/// excluded), from /proc/net/tcp{,6} and the process's descriptors.
pub fn tcp_connections(pid: i32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            // 0A is LISTEN; everything else is a connection (ESTABLISHED, CLOSE_WAIT, …).
            if local_port == Some(port) && *state != "0A" && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    n
}

/// Opens an aggregator on `dir` in this test process, right after another one in this process
/// was dropped.
///
/// The test binary runs tests on many threads, and other tests spawn children: between a spawn's
/// `fork` and its `exec` (where `O_CLOEXEC` closes it), the child holds a copy of every descriptor
/// of this process — the dropped aggregator's lock among them, which then stays locked for that
/// moment. So a `Locked` error whose holder is this very process is retried for a while; any other
/// error, or another holder, fails at once.
pub fn reopen_aggregator(dir: &Path) -> shmetrics::aggregator::Aggregator {
    let me = format!("pid {}", std::process::id());
    wait_for(Duration::from_secs(10), "the dropped aggregator's lock to be free", || {
        match shmetrics::aggregator::Aggregator::open(dir, &Default::default()) {
            Ok(a) => Some(a),
            Err(shmetrics::Error::Locked { holder, .. }) if holder == me => None,
            Err(e) => panic!("aggregator: {e:?}"),
        }
    })
}

/// The sections of a supervisord.conf that runs in `d` (socket, log, pid file, child logs there;
/// debug log level; in the foreground) and that `supervisorctl -c` can talk to: add programs.
pub fn supervisord_sections(d: &Path) -> String {
    format!(
        "[unix_http_server]\nfile = {d}/supervisor.sock\n\n\
         [supervisord]\nlogfile = {d}/supervisord.log\npidfile = {d}/supervisord.pid\n\
         childlogdir = {d}\nloglevel = debug\nnodaemon = true\n\n\
         [rpcinterface:supervisor]\n\
         supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
         [supervisorctl]\nserverurl = unix://{d}/supervisor.sock\n\n",
        d = d.display()
    )
}

/// [`spawn_shmetrics`] waits for "serving" past lines that mention an error: the aggregator logs
/// its directory before serving, and a directory named `error-reports` (or a pusher whose
/// receiver is down at start) put "error" in a line before it, which used to count as a failed
/// start.
#[test]
fn spawn_waits_for_serving_past_lines_that_mention_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("error-reports");
    let served = spawn_shmetrics(&["serve", "--dir", dir.to_str().expect("utf-8")], &[], tmp.path());
    let log = std::fs::read_to_string(&served.log).expect("log");
    assert!(log.lines().next().is_some_and(|l| l.contains("error-reports")), "{log}");
    assert_eq!(http_get(served.addr, "/healthz", &[]).status, 503);
}
