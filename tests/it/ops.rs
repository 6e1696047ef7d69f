//! Operations surface: perf_metrics JSON, per-process metrics, /healthz, and `dump` in every
//! format, with real forked workers.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util;

/// `shmetrics run -- prefork_server --workers 2`: the metrics address and the app's address.
struct Job {
    _proc: util::Proc,
    metrics: std::net::SocketAddr,
    app: std::net::SocketAddr,
    _tmp: tempfile::TempDir,
}

fn job() -> Job {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(util::shmetrics_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--"])
        .arg(util::example_bin("prefork_server"))
        .args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .env("XDG_RUNTIME_DIR", tmp.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let proc = util::Proc { child };
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving http://").nth(1) {
                let _ = tx.send(("metrics", rest.split('/').next().unwrap_or("").to_string()));
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let _ = tx2.send(("app", rest.split(' ').next().unwrap_or("").to_string()));
            }
        }
    });
    let (mut metrics, mut app) = (None, None);
    while metrics.is_none() || app.is_none() {
        let (k, v) = rx.recv_timeout(Duration::from_secs(20)).expect("run did not start");
        let addr = v.parse().expect("address");
        if k == "metrics" {
            metrics = Some(addr);
        } else {
            app = Some(addr);
        }
    }
    Job { _proc: proc, metrics: metrics.expect("metrics"), app: app.expect("app"), _tmp: tmp }
}

fn pid_of_worker(app: std::net::SocketAddr) -> i64 {
    util::http_get(app, "/pid", &[]).text().trim().parse().expect("pid")
}

#[test]
fn perf_metrics_describe_every_worker() {
    let job = job();
    // Both workers ready (prefork_server workers call set_ready) and answering.
    util::wait_for(Duration::from_secs(10), "health OK", || {
        (util::http_get(job.metrics, "/healthz", &[]).status == 200).then_some(())
    });
    let mut pids = std::collections::BTreeSet::new();
    util::wait_for(Duration::from_secs(10), "both workers answering", || {
        pids.insert(pid_of_worker(job.app));
        (pids.len() == 2).then_some(())
    });
    // Health is OK with one ready worker: the other may not have said so yet (it had not, in CI).
    let (r, doc) = util::wait_for(Duration::from_secs(10), "both workers ready", || {
        let r = util::http_get(job.metrics, "/perf_metrics", &[]);
        let doc: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let ready =
            doc["workers"].as_array()?.iter().filter(|w| w["kind"] == "shmetrics" && w["ready"] == true);
        (ready.count() == 2).then_some((r, doc))
    });
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(doc["instance"]["uptime"].as_f64().expect("uptime") > 0.0);
    assert_eq!(doc["instance"]["health"], "OK");
    assert_eq!(doc["instance"]["healthy"], true);
    let workers = doc["workers"].as_array().expect("workers");
    let kinds: Vec<&str> = workers.iter().map(|w| w["kind"].as_str().expect("kind")).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "master").count(), 1, "{doc}");
    let shm: Vec<&serde_json::Value> = workers.iter().filter(|w| w["kind"] == "shmetrics").collect();
    let listed: std::collections::BTreeSet<i64> =
        shm.iter().map(|w| w["pid"].as_i64().expect("pid")).collect();
    assert_eq!(listed, pids, "the workers listed are the ones answering");
    for w in &shm {
        assert_eq!(w["ready"], true);
        for k in ["rss", "uss", "pss", "open_fds", "threads"] {
            assert!(w[k].as_i64().expect(k) > 0, "{k} of {w}");
        }
        assert!(w["cpu_seconds"].as_f64().expect("cpu") >= 0.0);
        let uptime = w["uptime"].as_f64().expect("uptime");
        assert!((0.0..60.0).contains(&uptime), "uptime {uptime}");
        assert!(w["rss"].as_i64() >= w["uss"].as_i64(), "RSS ≥ USS");
    }
    let sum = |k: &str| workers.iter().map(|w| w[k].as_i64().expect(k)).sum::<i64>();
    for k in ["rss", "uss", "pss"] {
        assert_eq!(doc["memory"][k].as_i64(), Some(sum(k)), "job {k} is the sum over processes");
    }
    assert_eq!(doc["metrics"]["live_workers"], 2);
    assert_eq!(doc["metrics"]["files"], 3, "two workers and the master");
    // With an interval, CPU use is measured over it.
    let r = util::http_get(job.metrics, "/perf_metrics?interval=0.2", &[]);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(doc["cpu"]["interval"], 0.2);
    assert!(doc["cpu"]["percent"].as_f64().expect("percent") >= 0.0);

    // The same processes in /metrics, per pid and as a job total.
    let s = util::samples(&util::scrape(job.metrics));
    for pid in &pids {
        assert!(s[&format!("process_resident_memory_bytes{{pid=\"{pid}\"}}")] > 0.0);
        assert!(s.contains_key(&format!("process_start_time_seconds{{pid=\"{pid}\"}}")));
    }
    let per_pid: f64 = s.iter().filter(|(k, _)| k.starts_with("process_open_fds{pid=")).map(|(_, v)| v).sum();
    assert_eq!(s["shmetrics_job_open_fds"], per_pid, "job total = sum over pids");
    assert!(!s.contains_key("process_open_fds"), "job totals have names of their own: {s:?}");
}

/// `dump` reads a directory next to nothing (no server, no lock) in every format, and each
/// format parses back to the same values.
#[test]
fn dump_formats_parse_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    // Workers that exited: a dump must still count them, and leave the files alone.
    let mut wl =
        util::workload(&dir, &["--workers", "3", "--series", "2", "--histograms", "1", "--incs", "2"]);
    assert!(wl.proc.wait_timeout(Duration::from_secs(10)).success());
    let before = util::ls(&dir);
    let dump = |format: &str| {
        let out = Command::new(util::shmetrics_bin())
            .args(["dump", "--dir"])
            .arg(&dir)
            .args(["--format", format])
            .output()
            .expect("dump");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    // K=2, T=6: wl_requests_total{/r1} = 2·2·6 = 24; latency: 3 workers × 2 observations.
    let prom = util::samples(&dump("prometheus"));
    assert_eq!(prom["wl_requests_total{route=\"/r1\"}"], 24.0);
    assert_eq!(prom["wl_latency_seconds_count{route=\"/h0\"}"], 6.0);
    assert_eq!(prom["wl_max{route=\"/r1\"}"], 6.0);
    assert!(!prom.contains_key("wl_inflight{route=\"/r1\"}"), "live gauges of dead workers are dropped");

    let json: serde_json::Value = serde_json::from_str(&dump("json")).expect("JSON");
    let fam = |name: &str| {
        json["families"]
            .as_array()
            .expect("families")
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .expect(name)
    };
    let req = fam("wl_requests_total");
    assert_eq!(req["type"], "counter");
    let r1 =
        req["series"].as_array().expect("series").iter().find(|s| s["labels"]["route"] == "/r1").cloned();
    assert_eq!(r1.expect("/r1")["value"], 24);
    let lat = fam("wl_latency_seconds");
    let series = &lat["series"][0];
    assert_eq!(series["count"], 6);
    let buckets: Vec<(String, u64)> = series["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| (b["le"].as_str().expect("le").to_string(), b["count"].as_u64().expect("count")))
        .collect();
    // 0.05·(w+1) for w = 0..3: 0.05, 0.1 ≤ 0.1; 0.15 ≤ 0.5; twice each.
    let want: Vec<(String, u64)> =
        [("0.1", 4), ("0.5", 6), ("1.0", 6), ("+Inf", 6)].map(|(l, c)| (l.to_string(), c)).into();
    assert_eq!(buckets, want);

    let influx = dump("influx");
    let line = |prefix: &str| {
        influx.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}\n{influx}"))
    };
    assert_eq!(line("wl_requests_total,route=/r1 "), "wl_requests_total,route=/r1 value=24");
    let l = line("wl_latency_seconds,route=/h0 ");
    assert!(l.contains("le_0.1=4,le_0.5=6,le_1.0=6,le_inf=6,count=6,sum="), "{l}");
    for l in influx.lines() {
        // measurement[,tags] fields — exactly one unescaped space separating the two parts.
        assert_eq!(l.matches(' ').count() - l.matches("\\ ").count(), 1, "{l}");
    }
    assert_eq!(util::ls(&dir), before, "dump changed the directory");
}

/// `--instance-port P` puts /metrics on P+80 and the monitor port on P+81, both on 127.0.0.1.
#[test]
fn instance_port_derives_both_ports() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    // A P whose P+80 and P+81 are free right now.
    let p = (0..200)
        .map(|i| 21000 + i * 97)
        .find(|p| {
            std::net::TcpListener::bind(("127.0.0.1", p + 80)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 81)).is_ok()
        })
        .expect("a free pair of ports");
    let mut child = util::Proc {
        child: Command::new(util::shmetrics_bin())
            .args(["serve", "--dir"])
            .arg(&dir)
            .args(["--instance-port", &p.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    };
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", p + 80).parse().expect("addr");
    let r = util::wait_for(Duration::from_secs(10), "metrics port", || {
        std::net::TcpStream::connect(metrics).ok().map(|_| util::http_get(metrics, "/healthz", &[]))
    });
    assert_eq!((r.status, r.text()), (503, "Instance is booting\n".to_string()));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p + 81)).expect("monitor port");
    s.write_all(b"health_check\n").expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    assert_eq!(reply, "Instance is booting\n");
    child.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(10)).success());
}
