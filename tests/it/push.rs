//! Stats pushers (`[[push]]`) end to end: the real `shmetrics` binary pushing a real workload's
//! merged metrics to real receivers started by each test on free ports in a temp dir — Etsy's
//! statsd (read back through its management port), carbon-cache (read back with whisper-fetch),
//! InfluxDB 1.6 (its `/query` API) — and a UDP socket of the test for uWSGI's socket format.
//!
//! Requirements (installed by `.ci/run`): `carbon-cache` and `whisper-fetch` (Debian
//! `graphite-carbon`, `python3-whisper`), `influxd` (Debian `influxdb`), `node` and statsd from
//! npm (`npm install --prefix target/npm statsd@0.9.0`, found through `$SHMETRICS_TEST_STATSD`).
//! A missing receiver fails the test with these instructions: nothing is skipped.
//!
//! The workload: `--workers 2 --series 1 --histograms 1 --incs 3`, so (T = 3, K = 3)
//! `wl_requests_total{route="/r0"}` = 9, `wl_bytes_total` = 4.5, `wl_max{route="/r0"}` = 2,
//! `wl_latency_seconds{route="/h0"}` count 6 with 6 in `le="0.1"`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{self, http_get, samples, scrape, spawn_shmetrics, wait_for, workload, Proc, Served};

const LONG: Duration = Duration::from_secs(60);

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The path of `bin` on `$PATH`, or a failure saying how to install it.
fn require(bin: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{bin} is not installed: {install} (or run `bash .ci/run`)"))
}

/// Starts a receiver with its output in `log`.
fn start(cmd: &mut Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    Proc { child: cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")) }
}

fn wait_tcp(port: u16, what: &str) {
    wait_for(LONG, what, || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
}

/// A temp dir with a multiproc dir and a config file, and the aggregator serving them.
struct Setup {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
}

fn setup(config: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let path = tmp.path().join("shmetrics.toml");
    std::fs::write(&path, config).expect("config");
    Setup { tmp, dir, config: path }
}

impl Setup {
    fn serve(&self) -> Served {
        self.serve_with(&[])
    }

    fn serve_with(&self, extra: &[&str]) -> Served {
        let (d, c) = (self.dir.to_str().expect("utf-8"), self.config.to_str().expect("utf-8"));
        let mut args = vec!["serve", "--dir", d, "--config", c];
        args.extend_from_slice(extra);
        spawn_shmetrics(&args, &[], self.tmp.path())
    }

    /// Runs the workload to its end (its workers have written everything).
    fn workload(&self) {
        let mut w =
            workload(&self.dir, &["--workers", "2", "--series", "1", "--histograms", "1", "--incs", "3"]);
        assert!(w.proc.wait_timeout(LONG).success(), "workload failed");
    }
}

/// A sample of the aggregator's own `/metrics`, 0 if absent.
fn sample(s: &Served, key: &str) -> f64 {
    samples(&scrape(s.addr)).get(key).copied().unwrap_or(0.0)
}

fn log_has(s: &Served, text: &str) -> bool {
    std::fs::read_to_string(&s.log).is_ok_and(|l| l.contains(text))
}

// ---- statsd ---------------------------------------------------------------------------------

struct Statsd {
    _proc: Proc,
    port: u16,
    mgmt: u16,
}

fn statsd(tmp: &Path) -> Statsd {
    statsd_on(tmp, free_udp_port())
}

/// Starts statsd on UDP `port`.
fn statsd_on(tmp: &Path, port: u16) -> Statsd {
    let node = require("node", "apt-get install nodejs");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/npm/node_modules/statsd/stats.js");
    let js = std::env::var_os("SHMETRICS_TEST_STATSD").map_or(default, PathBuf::from);
    assert!(
        js.is_file(),
        "Etsy's statsd is not at {}: run `npm install --prefix target/npm statsd@0.9.0` (or `bash .ci/run`), \
         or set SHMETRICS_TEST_STATSD to its stats.js",
        js.display()
    );
    let mgmt = util::free_port();
    // A flush once an hour: counters add up until the test reads them.
    let conf = tmp.join("statsd.js");
    let text = format!(
        "{{ port: {port}, address: \"127.0.0.1\", mgmt_port: {mgmt}, mgmt_address: \"127.0.0.1\", \
         flushInterval: 3600000, backends: [] }}\n"
    );
    std::fs::write(&conf, text).expect("statsd config");
    let proc = start(Command::new(node).arg(&js).arg(&conf), &tmp.join("statsd.log"));
    wait_tcp(mgmt, "statsd's management port");
    Statsd { _proc: proc, port, mgmt }
}

impl Statsd {
    /// What the management command `counters` or `gauges` answers, as name → value (node's
    /// `util.inspect` of an object: `{ 'a.b': 7, c: 1 }`, over several lines when long).
    fn read(&self, what: &str) -> std::collections::BTreeMap<String, f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.mgmt)).expect("mgmt");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(format!("{what}\n").as_bytes()).expect("write");
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("END") {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "statsd closed the management connection: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let body = text.split("END").next().unwrap_or("").replace(['{', '}', '\n'], " ");
        body.split(',')
            .filter_map(|kv| {
                let (k, v) = kv.rsplit_once(':')?;
                Some((k.trim().trim_matches('\'').to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

/// Counters pushed many times as deltas add up in statsd to exactly the merged totals (sent as
/// absolute values, statsd would show N times them); gauges are values. A reload that leaves the
/// statsd section as it is keeps its baselines (a restarted pusher would send the totals again),
/// and a bad file at SIGHUP is refused while pushing goes on.
#[test]
fn statsd_deltas_add_up_to_the_exact_totals_across_pushes_and_reloads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sd = statsd(tmp.path());
    let section = format!(
        "[[push]]\ntype = \"statsd\"\nname = \"sd\"\naddress = \"127.0.0.1:{}\"\nfreq_seconds = 0.2\n",
        sd.port
    );
    let s = setup(&section);
    let served = s.serve();
    s.workload();
    let want = [
        ("wl_requests_total._r0", 9.0),
        ("wl_bytes_total", 4.5),
        ("wl_latency_seconds_count._h0", 6.0),
        ("wl_latency_seconds_bucket._h0.0_1", 6.0),
        ("wl_latency_seconds_bucket._h0.Inf", 6.0),
    ];
    let exact = |min_pushes: f64| {
        wait_for(LONG, "statsd counters equal to the merged totals after several pushes", || {
            let pushes = sample(&served, "shmetrics_pushes_total{pusher=\"sd\"}");
            let c = sd.read("counters");
            let all = want.iter().all(|(k, v)| c.get(*k) == Some(v));
            (all && pushes >= min_pushes).then_some(pushes)
        })
    };
    let pushes = exact(5.0);
    // Still exact once more pushes went out: each sent a delta of 0.
    exact(pushes + 3.0);
    let c = sd.read("counters");
    for (k, v) in want {
        assert_eq!(c.get(k), Some(&v), "{k} in {c:?}");
    }
    let g = sd.read("gauges");
    assert_eq!(g.get("wl_max._r0"), Some(&2.0), "{g:?}");
    assert_eq!(sample(&served, "shmetrics_push_errors_total{pusher=\"sd\"}"), 0.0);

    // SIGHUP with the statsd section unchanged and a second pusher: the statsd pusher keeps
    // its baselines.
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let extra = format!(
        "[[push]]\ntype = \"socket\"\nname = \"sock\"\naddress = \"127.0.0.1:{}\"\nfreq_seconds = 0.2\n",
        rx.local_addr().expect("addr").port()
    );
    std::fs::write(&s.config, format!("{section}{extra}")).expect("config");
    served.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(LONG, "the new socket pusher's pushes", || {
        (sample(&served, "shmetrics_pushes_total{pusher=\"sock\"}") >= 3.0).then_some(())
    });
    let pushes = sample(&served, "shmetrics_pushes_total{pusher=\"sd\"}");
    exact(pushes + 3.0);
    // A bad file: refused, logged, the pushers go on.
    std::fs::write(&s.config, format!("{section}freq_seconds = 0\n")).expect("config");
    served.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(LONG, "the refusal in the log", || {
        log_has(&served, "keeping the configuration in force").then_some(())
    });
    let pushes = sample(&served, "shmetrics_pushes_total{pusher=\"sock\"}");
    wait_for(LONG, "the socket pusher going on", || {
        (sample(&served, "shmetrics_pushes_total{pusher=\"sock\"}") >= pushes + 2.0).then_some(())
    });
    let c = sd.read("counters");
    assert_eq!(c.get("wl_requests_total._r0"), Some(&9.0), "{c:?}");
}

/// A statsd that is down: its refusals (ICMP port unreachable, seen at the next push) are counted
/// as errors and the increments of those pushes are not taken as sent, so once statsd is up the
/// counters it holds are exactly the merged totals — not less (lost increments), not more.
/// (`freq_seconds` over a second: the kernel sends about one ICMP error a second.)
#[test]
fn statsd_down_then_up_gets_exactly_the_totals() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_udp_port();
    let s = setup(&format!(
        "[[push]]\ntype = \"statsd\"\nname = \"sd\"\naddress = \"127.0.0.1:{port}\"\nfreq_seconds = 1.2\n"
    ));
    let served = s.serve();
    s.workload();
    wait_for(LONG, "refused pushes counted", || {
        (sample(&served, "shmetrics_push_errors_total{pusher=\"sd\"}") >= 2.0).then_some(())
    });
    assert!(log_has(&served, "refused the datagrams of the last push"), "the refusal is logged");
    let sd = statsd_on(tmp.path(), port);
    let pushes = wait_for(LONG, "pushes after statsd is up", || {
        let c = sd.read("counters");
        let p = sample(&served, "shmetrics_pushes_total{pusher=\"sd\"}");
        (c.get("wl_requests_total._r0") == Some(&9.0) && p >= 2.0).then_some(p)
    });
    wait_for(LONG, "more pushes", || {
        (sample(&served, "shmetrics_pushes_total{pusher=\"sd\"}") >= pushes + 2.0).then_some(())
    });
    let c = sd.read("counters");
    assert_eq!(c.get("wl_requests_total._r0"), Some(&9.0), "{c:?}");
    assert_eq!(c.get("wl_bytes_total"), Some(&4.5), "{c:?}");
}

// ---- carbon ---------------------------------------------------------------------------------

struct Carbon {
    proc: Option<Proc>,
    whisper: PathBuf,
}

/// Starts carbon-cache in the foreground (`--debug`) with its data in `root`, one point per
/// second kept for an hour, and no limit on new files a minute.
fn carbon(root: &Path, port: u16) -> Carbon {
    let bin = require("carbon-cache", "apt-get install graphite-carbon python3-whisper");
    let conf = root.join("conf");
    for d in ["conf", "storage/whisper", "log", "pid", "lists"] {
        std::fs::create_dir_all(root.join(d)).expect("carbon dirs");
    }
    let r = root.display();
    let text = format!(
        "[cache]\nSTORAGE_DIR = {r}/storage\nLOCAL_DATA_DIR = {r}/storage/whisper\nWHITELISTS_DIR = {r}/lists\n\
         CONF_DIR = {r}/conf\nLOG_DIR = {r}/log\nPID_DIR = {r}/pid\nUSER =\nENABLE_TAGS = False\n\
         MAX_CACHE_SIZE = inf\nMAX_UPDATES_PER_SECOND = inf\nMAX_CREATES_PER_MINUTE = inf\n\
         LINE_RECEIVER_INTERFACE = 127.0.0.1\nLINE_RECEIVER_PORT = {port}\nENABLE_UDP_LISTENER = False\n\
         PICKLE_RECEIVER_INTERFACE = 127.0.0.1\nPICKLE_RECEIVER_PORT = {}\n\
         CACHE_QUERY_INTERFACE = 127.0.0.1\nCACHE_QUERY_PORT = {}\nLOG_LISTENER_CONN_SUCCESS = False\n",
        util::free_port(),
        util::free_port()
    );
    std::fs::write(conf.join("carbon.conf"), text).expect("carbon.conf");
    std::fs::write(conf.join("storage-schemas.conf"), "[all]\npattern = .*\nretentions = 1s:1h\n")
        .expect("schemas");
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config={r}/conf/carbon.conf"))
        .arg(format!("--pidfile={r}/pid/carbon.pid"))
        .args(["--debug", "start"]);
    let proc = start(&mut cmd, &root.join("carbon.log"));
    wait_tcp(port, "carbon-cache's line receiver");
    Carbon { proc: Some(proc), whisper: root.join("storage/whisper") }
}

impl Carbon {
    /// The latest value stored for a dotted path, read with whisper-fetch.
    fn last(&self, path: &str) -> Option<f64> {
        let file = self.whisper.join(format!("{}.wsp", path.replace('.', "/")));
        if !file.exists() {
            return None;
        }
        let fetch = require("whisper-fetch", "apt-get install python3-whisper");
        let out =
            Command::new(fetch).arg("--from").arg(format!("{}", now() - 600)).arg(&file).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().filter_map(|l| l.split('\t').nth(1)).rfind(|v| *v != "None")?.parse().ok()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// A carbon-cache that is down: the pusher's errors grow and scrapes still answer; once it is up,
/// the current values arrive, exactly, under the prefix, labels as name parts.
#[test]
fn carbon_down_counts_errors_then_gets_the_exact_values_once_up() {
    let port = util::free_port();
    let s = setup(&format!(
        "[[push]]\ntype = \"carbon\"\nname = \"gr\"\naddress = \"127.0.0.1:{port}\"\nprefix = \"shm.web1\"\nfreq_seconds = 0.2\ntimeout_seconds = 2\n"
    ));
    let served = s.serve();
    s.workload();
    wait_for(LONG, "push errors while carbon is down", || {
        (sample(&served, "shmetrics_push_errors_total{pusher=\"gr\"}") >= 2.0).then_some(())
    });
    // Scrapes answer meanwhile (each of these is a full /metrics).
    for _ in 0..5 {
        assert!(scrape(served.addr).contains("wl_requests_total{route=\"/r0\"} 9"));
    }
    assert_eq!(sample(&served, "shmetrics_pushes_total{pusher=\"gr\"}"), 0.0);
    assert!(log_has(&served, "push failed: connecting to 127.0.0.1:"), "the error is logged");
    let c = carbon(&s.tmp.path().join("carbon"), port);
    let want = [
        ("shm.web1.wl_requests_total._r0", 9.0),
        ("shm.web1.wl_bytes_total", 4.5),
        ("shm.web1.wl_max._r0", 2.0),
        ("shm.web1.wl_latency_seconds_bucket._h0.0_1", 6.0),
        ("shm.web1.wl_latency_seconds_count._h0", 6.0),
    ];
    for (path, v) in want {
        wait_for(LONG, &format!("{path} = {v} in whisper"), || (c.last(path) == Some(v)).then_some(()));
    }
    assert!(sample(&served, "shmetrics_pushes_total{pusher=\"gr\"}") >= 1.0);
    wait_for(LONG, "the recovery in the log", || log_has(&served, "pushing again after").then_some(()));
    drop(c.proc);
}

// ---- InfluxDB -------------------------------------------------------------------------------

struct Influx {
    _proc: Proc,
    http: u16,
    udp: u16,
}

fn influx(root: &Path) -> Influx {
    let bin = require("influxd", "apt-get install influxdb");
    let (http, udp, rpc) = (util::free_port(), free_udp_port(), util::free_port());
    let r = root.display();
    std::fs::create_dir_all(root).expect("influx dir");
    let conf = root.join("influxdb.conf");
    let text = format!(
        "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{r}/meta\"\n\
         [data]\n  dir = \"{r}/data\"\n  wal-dir = \"{r}/wal\"\n  query-log-enabled = false\n\
         [http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n\
         [[udp]]\n  enabled = true\n  bind-address = \"127.0.0.1:{udp}\"\n  database = \"udpdb\"\n  batch-timeout = \"50ms\"\n\
         [monitor]\n  store-enabled = false\n[continuous_queries]\n  enabled = false\n"
    );
    std::fs::write(&conf, text).expect("influxdb.conf");
    let proc = start(Command::new(bin).arg("-config").arg(&conf), &root.join("influxd.log"));
    let ping = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    wait_for(LONG, "influxd's /ping", || {
        TcpStream::connect(ping).ok()?;
        (http_get(ping, "/ping", &[]).status == 204).then_some(())
    });
    Influx { _proc: proc, http, udp }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

impl Influx {
    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.http))
    }

    fn create_database(&self, db: &str) {
        let mut s = TcpStream::connect(self.addr()).expect("connect");
        let q = url_encode(&format!("CREATE DATABASE \"{db}\""));
        let req = format!(
            "POST /query?q={q} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    /// The last `value` of a measurement's series with these tags, if any.
    fn last(&self, db: &str, measurement: &str, tag: Tag) -> Option<f64> {
        let filter = tag.map_or(String::new(), |(k, v)| format!(" WHERE \"{k}\" = '{v}'"));
        let q = format!("SELECT last(\"value\") FROM \"{measurement}\"{filter}");
        let path = format!("/query?db={db}&epoch=s&q={}", url_encode(&q));
        let r = http_get(self.addr(), &path, &[]);
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        v["results"][0]["series"][0]["values"][0][1].as_f64()
    }
}

/// A tag to select a series by.
type Tag<'a> = Option<(&'a str, &'a str)>;

/// Line protocol over HTTP (into a database that does not exist at first: InfluxDB's 404 message
/// is logged and counted, then values arrive once it is created) and over UDP, read back with
/// `/query`: measurements are prefix + sample name, labels are tags.
#[test]
fn influx_http_and_udp_answer_queries_with_the_exact_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = influx(&tmp.path().join("influx"));
    let s = setup(&format!(
        "[[push]]\ntype = \"influx\"\nname = \"ih\"\naddress = \"127.0.0.1:{}\"\ntransport = \"http\"\ndatabase = \"shm\"\nprefix = \"app\"\nfreq_seconds = 0.2\n\
         [[push]]\ntype = \"influx\"\nname = \"iu\"\naddress = \"127.0.0.1:{}\"\nfreq_seconds = 0.2\n",
        db.http, db.udp
    ));
    let served = s.serve();
    s.workload();
    wait_for(LONG, "InfluxDB's refusal, counted and logged", || {
        let errors = sample(&served, "shmetrics_push_errors_total{pusher=\"ih\"}");
        (errors >= 1.0 && log_has(&served, "404 database not found: \"shm\"")).then_some(())
    });
    db.create_database("shm");
    let want: [(&str, Tag, f64); 4] = [
        ("wl_requests_total", Some(("route", "/r0")), 9.0),
        ("wl_bytes_total", None, 4.5),
        ("wl_max", Some(("route", "/r0")), 2.0),
        ("wl_latency_seconds_bucket", Some(("le", "0.1")), 6.0),
    ];
    for (m, tag, v) in want {
        let http = format!("app.{m}");
        wait_for(LONG, &format!("{http} {tag:?} = {v} over HTTP"), || {
            (db.last("shm", &http, tag) == Some(v)).then_some(())
        });
        wait_for(LONG, &format!("{m} {tag:?} = {v} over UDP"), || {
            (db.last("udpdb", m, tag) == Some(v)).then_some(())
        });
    }
    // The pushers' own counters are pushed too.
    wait_for(LONG, "shmetrics_pushes_total in InfluxDB", || {
        db.last("udpdb", "shmetrics_pushes_total", Some(("pusher", "iu"))).filter(|v| *v >= 1.0)
    });
}

/// A receiver that takes the connection but never answers (a listening socket nobody accepts
/// on): each push ends at `timeout_seconds` and counts as an error, batches beyond the bounded
/// queue are dropped and counted, and scrapes answer all the while.
#[test]
fn a_receiver_that_never_answers_times_out_and_never_holds_a_scrape() {
    let hole = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = hole.local_addr().expect("addr").port();
    let s = setup(&format!(
        "[[push]]\ntype = \"influx\"\nname = \"hole\"\naddress = \"127.0.0.1:{port}\"\ntransport = \"http\"\ndatabase = \"d\"\nfreq_seconds = 0.5\ntimeout_seconds = 1\n"
    ));
    let served = s.serve();
    let timed_out = [format!("no push to 127.0.0.1:{port} within 1 s"), "no answer within 1s".to_string()];
    wait_for(LONG, "timed-out pushes and dropped batches", || {
        let errors = sample(&served, "shmetrics_push_errors_total{pusher=\"hole\"}");
        let dropped = log_has(
            &served,
            "push failed: the receiver is slower than freq_seconds: dropped the oldest of 4 waiting batches",
        );
        let timeout = timed_out.iter().any(|t| log_has(&served, t));
        (errors >= 3.0 && dropped && timeout).then_some(())
    });
    for _ in 0..5 {
        assert!(scrape(served.addr).contains("shmetrics_push_errors_total{pusher=\"hole\"}"));
    }
    assert_eq!(sample(&served, "shmetrics_pushes_total{pusher=\"hole\"}"), 0.0);
    drop(hole);
}

// ---- uWSGI's socket format ------------------------------------------------------------------

/// uWSGI's `socket` format: one `name type value` datagram per sample (counter 0, gauge 1), and
/// one last push at shutdown.
#[test]
fn socket_pusher_sends_uwsgi_lines_and_a_last_push_at_shutdown() {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    // Once an hour: the first push is at start, the next one at shutdown.
    let s = setup(&format!(
        "[[push]]\ntype = \"socket\"\naddress = \"127.0.0.1:{}\"\nprefix = \"uwsgi\"\nlabels = \"pairs\"\nfreq_seconds = 3600\n",
        rx.local_addr().expect("addr").port()
    ));
    // The workload first (so that the first push has its values), into a directory the
    // aggregator then reads as it is.
    std::fs::DirBuilder::new().mode(0o700).create(&s.dir).expect("mkdir");
    s.workload();
    let mut served = s.serve_with(&["--keep"]);
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 2048];
    let mut read = |got: &mut Vec<String>| {
        if let Ok(n) = rx.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let line = "uwsgi.wl_requests_total.route._r0 0 9";
    wait_for(LONG, "the first push", || {
        read(&mut got);
        got.iter().any(|l| l == line).then_some(())
    });
    assert!(got.iter().all(|l| !l.contains('\n')), "one line per datagram: {got:?}");
    served.proc.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for(LONG, "the last push at shutdown", || {
        read(&mut got);
        (got.iter().filter(|l| *l == line).count() == 2).then_some(())
    });
    assert!(served.proc.wait_timeout(LONG).success());
    for want in [
        "uwsgi.wl_max.route._r0 1 2",
        "uwsgi.wl_bytes_total 0 4.5",
        "uwsgi.wl_latency_seconds_bucket.route._h0.le.0_1 0 6",
    ] {
        assert!(got.iter().any(|l| l == want), "{want} in {got:?}");
    }
}

// ---- configuration --------------------------------------------------------------------------

/// A bad `[[push]]` is refused at start, naming the file, the line, the section and the key, and
/// saying what to write.
#[test]
fn config_mistakes_are_refused_at_start_with_exact_messages() {
    let cases = [
        (
            "[[push]]\ntype = \"statsd\"\naddress = \"127.0.0.1:8125\"\nfreq_seconds = 0\n",
            "[[push]] \"statsd:127.0.0.1:8125\": freq_seconds = 0 is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)",
        ),
        (
            "[[push]]\ntype = \"influx\"\naddress = \"db:8086\"\ntransport = \"http\"\n",
            "[[push]] \"influx:db:8086\": transport = \"http\" needs a database: write database = \"name\" (letters, digits, _ and -)",
        ),
        (
            "[[push]]\ntype = \"carbon\"\naddress = \"graphite\"\n",
            "[[push]] \"carbon:graphite\": address = \"graphite\" is not host:port: write address = \"host:port\" (e.g. \"127.0.0.1:8125\", \"[::1]:2003\")",
        ),
        (
            "[[push]]\ntype = \"statsd\"\naddress = \"h:1\"\n[[push]]\ntype = \"statsd\"\naddress = \"h:1\"\n",
            "[[push]] \"statsd:h:1\": two pushers have this name; give one a name = \"…\" of its own",
        ),
    ];
    for (text, want) in cases {
        let s = setup(text);
        let out = Command::new(crate::util::shmetrics_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0", "--dir"])
            .arg(&s.dir)
            .arg("--config")
            .arg(&s.config)
            .output()
            .expect("run shmetrics");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        let line =
            err.lines().find(|l| l.starts_with("shmetrics: error: ")).unwrap_or_else(|| panic!("{err}"));
        assert!(line.contains(&s.config.display().to_string()), "names the file: {line}");
        assert!(line.ends_with(want), "{text}\n got {line}\nwant …{want}");
    }
}
