//! Unit tests: configuration, parsing a reply recorded from a real uWSGI, conversion with exact
//! values, bad replies, and polls against sockets on 127.0.0.1 and unix sockets.

use super::*;
use tokio::io::AsyncWriteExt;

/// The `[[uwsgi_stats]]` sections of a configuration file, read as `AlarmConfig::parse` reads
/// them (`crate::alarm` is above this module; `tests/it/uwsgi_stats.rs` checks the real file).
fn sections(text: &str) -> Result<Vec<StatsSpec>, String> {
    #[derive(Deserialize)]
    struct File {
        uwsgi_stats: Vec<StatsSpec>,
    }
    let f: File = toml::from_str(text).map_err(|e| crate::parsed::one_line(text, &e))?;
    check(&f.uwsgi_stats)?;
    Ok(f.uwsgi_stats)
}

/// `stats = 127.0.0.1:…` of Debian's uWSGI 2.0.21 (`--master --processes 2 --memory-report`),
/// after 5 requests: worker 1 served 1, worker 2 served 4.
const FIXTURE: &[u8] = include_bytes!("../../tests/data/uwsgi-2.0.21-stats.json");

fn spec(text: &str) -> Result<StatsSpec, String> {
    sections(text).map(|mut s| s.remove(0))
}

fn value(series: &Series, name: &str, label: Option<(&str, &str)>) -> Option<Value> {
    let i = DEFS.iter().position(|d| d.name == name).expect("known family");
    series[i]
        .iter()
        .find(|(l, _)| label.is_none_or(|(k, v)| l.pairs.iter().any(|(a, b)| a == k && b == v)))
        .map(|(_, v)| v.clone())
}

#[test]
fn keys_and_defaults() {
    let s = spec("[[uwsgi_stats]]\naddress = \"127.0.0.1:1717\"\n").expect("spec");
    assert_eq!(s.address.kind, AddressKind::Tcp { host: "127.0.0.1".into(), port: 1717 });
    assert_eq!((s.label(), s.http), ("127.0.0.1:1717", false));
    assert_eq!((s.freq_seconds, s.timeout_seconds), (Seconds::from_secs(5), Seconds::from_secs(2)));
    let s = spec(
        "[[uwsgi_stats]]\naddress = \"/run/uwsgi/stats.sock\"\nname = \"app\"\nfreq_seconds = 0.5\n\
         timeout_seconds = 1\nhttp = true\n",
    )
    .expect("spec");
    assert_eq!(s.address.kind, AddressKind::Unix("/run/uwsgi/stats.sock".into()));
    assert_eq!((s.label(), s.http), ("app", true));
    assert_eq!(
        (s.freq_seconds.get(), s.timeout_seconds.get()),
        (Duration::from_millis(500), Duration::from_secs(1))
    );
    let s = spec("[[uwsgi_stats]]\naddress = \"@uwsgi-stats\"\n").expect("spec");
    assert_eq!(s.address.kind, AddressKind::Abstract("uwsgi-stats".into()));
    let s = spec("[[uwsgi_stats]]\naddress = \"[::1]:1717\"\n").expect("spec");
    assert_eq!(s.address.kind, AddressKind::Tcp { host: "::1".into(), port: 1717 });
    let s = spec("[[uwsgi_stats]]\naddress = \"uwsgi.local:1717\"\n").expect("spec");
    assert_eq!(s.address.kind, AddressKind::Tcp { host: "uwsgi.local".into(), port: 1717 });
}

#[test]
fn bad_sections_are_refused_naming_the_key() {
    let allowed = "write host:port (\"127.0.0.1:1717\"), a unix socket path starting with /";
    for bad in [
        "1717",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        ":1717",
        "::1:1717",
        "[::1]",
        "@",
        "a b:1",
        "",
    ] {
        let e = spec(&format!("[[uwsgi_stats]]\naddress = {bad:?}\n")).expect_err(bad);
        assert!(e.contains(&format!("address = {bad:?}")) && e.contains(allowed), "{bad}: {e}");
    }
    for key in ["freq_seconds", "timeout_seconds"] {
        for v in ["0", "-1", "inf", "\"5\""] {
            let e = spec(&format!("[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\n{key} = {v}\n")).expect_err(v);
            assert!(e.contains(&format!("{key} = {v} is not allowed")), "{key} = {v}: {e}");
            assert!(e.contains("write a number of seconds more than 0"), "{key} = {v}: {e}");
        }
    }
    let e = spec("[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\nname = \"\"\n").expect_err("empty name");
    assert!(e.contains("name = \"\": write a name"), "{e}");
    let e = spec("[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\nhttp = \"yes\"\n").expect_err("http");
    assert!(e.contains("http = \"yes\" is not allowed: write http = true"), "{e}");
    let e = spec("[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\nuri = \"x\"\n").expect_err("unknown");
    assert!(e.contains("uri"), "{e}");
    let e = spec("[[uwsgi_stats]]\nname = \"x\"\n").expect_err("no address");
    assert!(e.contains("address"), "{e}");
    // Two sections with one label: the second names itself after the first's address.
    let two = "[[uwsgi_stats]]\naddress = \"127.0.0.1:1\"\n[[uwsgi_stats]]\naddress = \"127.0.0.1:2\"\nname = \"127.0.0.1:1\"\n";
    let e = sections(two).expect_err("duplicate");
    assert!(e.contains("two sections are named \"127.0.0.1:1\""), "{e}");
    let ok = two.replace("name = \"127.0.0.1:1\"", "name = \"b\"");
    assert_eq!(sections(&ok).expect("distinct").len(), 2);
}

#[test]
fn a_real_reply_converts_with_exact_values() {
    let s = parse(FIXTURE, "app").expect("fixture parses");
    let w = |n: &str, id: &str| value(&s, n, Some(("worker_id", id)));
    assert_eq!(value(&s, "uwsgi_workers", None), Some(Value::F64(2.0)));
    assert_eq!(value(&s, "uwsgi_listen_queue_length", None), Some(Value::F64(0.0)));
    assert_eq!(value(&s, "uwsgi_listen_queue_errors", None), Some(Value::F64(0.0)));
    assert_eq!(
        (w("uwsgi_worker_requests", "1"), w("uwsgi_worker_requests", "2")),
        (Some(Value::U64(1)), Some(Value::U64(4)))
    );
    assert_eq!(w("uwsgi_worker_transmitted_bytes", "2"), Some(Value::U64(264)));
    assert_eq!(w("uwsgi_worker_respawn_count", "1"), Some(Value::U64(1)));
    assert_eq!(w("uwsgi_worker_exceptions", "1"), Some(Value::U64(0)));
    assert_eq!(w("uwsgi_worker_harakiri_count", "1"), Some(Value::U64(0)));
    assert_eq!(w("uwsgi_worker_delta_requests", "2"), Some(Value::F64(4.0)));
    assert_eq!(w("uwsgi_worker_accepting", "2"), Some(Value::F64(1.0)));
    assert_eq!(w("uwsgi_worker_rss_bytes", "1"), Some(Value::F64(11026432.0)));
    assert_eq!(w("uwsgi_worker_vsz_bytes", "1"), Some(Value::F64(60993536.0)));
    assert_eq!(w("uwsgi_worker_running_time_seconds", "2"), Some(Value::F64(3490.0 / 1e6)));
    assert_eq!(w("uwsgi_worker_average_response_time_seconds", "1"), Some(Value::F64(547.0 / 1e6)));
    assert_eq!(w("uwsgi_worker_last_spawn_time_seconds", "1"), Some(Value::F64(1796676936.0)));
    assert_eq!(
        (w("uwsgi_worker_apps", "1"), w("uwsgi_worker_cores", "1")),
        (Some(Value::F64(1.0)), Some(Value::F64(1.0)))
    );
    assert_eq!(
        ["busy", "idle", "cheap"].map(|st| w(&format!("uwsgi_worker_{st}"), "1")),
        [Some(Value::F64(0.0)), Some(Value::F64(1.0)), Some(Value::F64(0.0))]
    );
    let sock = Some(("name", "127.0.0.1:18555"));
    assert_eq!(value(&s, "uwsgi_socket_max_queue_length", sock), Some(Value::F64(100.0)));
    assert_eq!(value(&s, "uwsgi_socket_queue_length", sock), Some(Value::F64(0.0)));
    let i = DEFS.iter().position(|d| d.name == "uwsgi_socket_queue_length").expect("socket family");
    assert_eq!(s[i][0].0.text, r#"stats="app",name="127.0.0.1:18555",proto="http""#);
    let i = DEFS.iter().position(|d| d.name == "uwsgi_worker_requests").expect("requests family");
    assert_eq!(s[i][1].0.text, r#"stats="app",worker_id="2""#);
    // Nothing from the poll itself: uwsgi_up and the counters come from the poller.
    for n in ["uwsgi_up", "shmetrics_uwsgi_stats_errors", "shmetrics_uwsgi_stats_polls"] {
        assert_eq!(value(&s, n, None), None, "{n}");
    }
    // No caches in this reply.
    assert_eq!(value(&s, "uwsgi_cache_hits", None), None);
}

#[test]
fn the_defs_line_up_with_their_indexes() {
    assert_eq!(DEFS[UP].name, "uwsgi_up");
    assert_eq!(DEFS[ERRORS].name, "shmetrics_uwsgi_stats_errors");
    assert_eq!(DEFS[WORKERS].name, "uwsgi_workers");
    assert_eq!(DEFS[SOCKET_FIRST].name, "uwsgi_socket_queue_length");
    assert_eq!(DEFS[WORKER_FIRST].name, "uwsgi_worker_accepting");
    assert_eq!(DEFS[WORKER_FIRST + 18].name, "uwsgi_worker_transmitted_bytes");
    assert_eq!(DEFS[CACHE_FIRST].name, "uwsgi_cache_hits");
    assert_eq!(DEFS.len(), CACHE_FIRST + 5);
    let names: HashSet<&str> = DEFS.iter().map(|d| d.name).collect();
    assert_eq!(names.len(), DEFS.len());
    assert!(DEFS.iter().all(|d| crate::layout::valid_metric_name(d.name)));
}

#[test]
fn missing_fields_are_zero_unknown_ones_ignored() {
    let json = br#"{"workers":[{"id":3,"status":"busy","future_field":{"x":[1,2]},"requests":null,"tx":-5,"avg_rt":1.5},
        {"id":0,"requests":99},{"id":3,"requests":7}],
        "sockets":[{"name":"s","proto":"uwsgi","queue":2},{"name":"s","proto":"uwsgi","queue":9}],
        "caches":[{"name":"c","hits":10,"misses":3,"items":2,"max_items":100}],"new_top":true}"#;
    let s = parse(json, "x").expect("parses");
    let w = |n: &str| value(&s, n, Some(("worker_id", "3")));
    assert_eq!(value(&s, "uwsgi_workers", None), Some(Value::F64(1.0)), "id 0 left out, id 3 once");
    assert_eq!(w("uwsgi_worker_requests"), Some(Value::U64(0)), "null is 0; the duplicate id 3 is ignored");
    assert_eq!(w("uwsgi_worker_transmitted_bytes"), Some(Value::U64(0)), "negative counter is 0");
    assert_eq!(w("uwsgi_worker_average_response_time_seconds"), Some(Value::F64(1.5e-6)));
    assert_eq!(w("uwsgi_worker_busy"), Some(Value::F64(1.0)));
    assert_eq!(w("uwsgi_worker_rss_bytes"), Some(Value::F64(0.0)));
    assert_eq!(value(&s, "uwsgi_worker_requests", Some(("worker_id", "0"))), None);
    assert_eq!(value(&s, "uwsgi_socket_queue_length", None), Some(Value::F64(2.0)), "first socket wins");
    assert_eq!(s[SOCKET_FIRST].len(), 1);
    assert_eq!(value(&s, "uwsgi_cache_hits", Some(("name", "c"))), Some(Value::U64(10)));
    assert_eq!(value(&s, "uwsgi_cache_full", None), Some(Value::U64(0)));
    assert_eq!(value(&s, "uwsgi_cache_max_items", None), Some(Value::F64(100.0)));
    assert_eq!(value(&s, "uwsgi_listen_queue_length", None), Some(Value::F64(0.0)));
}

#[test]
fn bad_replies_are_errors() {
    let err = |b: &[u8]| parse(b, "x").map(|_| ()).expect_err("bad reply");
    assert!(err(b"garbage\n").contains("not uWSGI's stats JSON"), "{}", err(b"garbage\n"));
    assert!(err(b"[]").contains("not uWSGI's stats JSON"));
    assert!(err(b"{}").contains("missing field `workers`"), "{}", err(b"{}"));
    assert!(err(br#"{"workers":[{"requests":"many"}]}"#).contains("a number"));
    let truncated = &FIXTURE[..FIXTURE.len() / 2];
    let e = err(truncated);
    assert!(e.contains(&format!("ends in the middle of the JSON ({} bytes)", truncated.len())), "{e}");
    let many = format!("{{\"workers\":[{}]}}", vec!["{}"; MAX_ITEMS + 1].join(","));
    let e = err(many.as_bytes());
    assert!(e.contains(&format!("lists {} workers, sockets or caches", MAX_ITEMS + 1)), "{e}");
}

#[test]
fn http_replies() {
    let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"workers\":[]}";
    assert_eq!(http_body(ok), Ok(&b"{\"workers\":[]}"[..]));
    let e = http_body(b"HTTP/1.1 404 Not Found\r\n\r\n").expect_err("404");
    assert!(e.contains("answered \"HTTP/1.1 404 Not Found\""), "{e}");
    let e = http_body(b"{\"workers\":[]}").expect_err("plain JSON");
    assert!(e.contains("set http = false"), "{e}");
    let e = http_body(b"HTTP/1.0 200 OK\r\nContent-").expect_err("cut");
    assert!(e.contains("ends before its headers do"), "{e}");
}

/// A stats server on 127.0.0.1 that runs `serve` on each connection; its address.
async fn server<F, Fut>(serve: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

fn tcp_spec(addr: &str, extra: &str) -> StatsSpec {
    spec(&format!("[[uwsgi_stats]]\naddress = \"{addr}\"\ntimeout_seconds = 0.3\n{extra}")).expect("spec")
}

#[tokio::test]
async fn polls_a_server_on_tcp_and_on_unix_sockets() {
    let addr = server(|mut s| async move {
        let _ = s.write_all(FIXTURE).await;
    })
    .await;
    let s = poll_once(&tcp_spec(&addr, ""), &mut Conn::default()).await.expect("poll");
    assert_eq!(value(&s, "uwsgi_worker_requests", Some(("worker_id", "2"))), Some(Value::U64(4)));
    assert_eq!(value(&s, "uwsgi_workers", Some(("stats", addr.as_str()))), Some(Value::F64(2.0)));

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stats.sock");
    let l = tokio::net::UnixListener::bind(&path).expect("bind unix");
    let abstract_name = format!("shmetrics-test-{}", std::process::id());
    let la = tokio::net::UnixListener::bind(format!("\0{abstract_name}")).expect("bind abstract");
    for l in [l, la] {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(FIXTURE).await;
            }
        });
    }
    for address in [path.display().to_string(), format!("@{abstract_name}")] {
        let spec = spec(&format!("[[uwsgi_stats]]\naddress = \"{address}\"\nname = \"u\"\n")).expect("spec");
        let s = poll_once(&spec, &mut Conn::default()).await.expect("poll");
        assert_eq!(
            value(&s, "uwsgi_worker_requests", Some(("worker_id", "1"))),
            Some(Value::U64(1)),
            "{address}"
        );
    }
    let gone = spec(&format!("[[uwsgi_stats]]\naddress = \"{}\"\n", dir.path().join("none").display()))
        .expect("spec");
    let e = poll_once(&gone, &mut Conn::default()).await.map(|_| ()).expect_err("no socket");
    assert!(e.contains("cannot connect to") && e.contains("none"), "{e}");
}

#[tokio::test]
async fn polls_a_stats_http_server() {
    let addr = server(|mut s| async move {
        let mut req = vec![0u8; 1024];
        let n = s.read(&mut req).await.unwrap_or(0);
        let reply = if req[..n].starts_with(b"GET / HTTP/1.0\r\n") && req[..n].ends_with(b"\r\n\r\n") {
            [&b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n"[..], FIXTURE]
                .concat()
        } else {
            b"HTTP/1.0 400 Bad Request\r\n\r\n".to_vec()
        };
        let _ = s.write_all(&reply).await;
    })
    .await;
    let s = poll_once(&tcp_spec(&addr, "http = true\n"), &mut Conn::default()).await.expect("poll");
    assert_eq!(value(&s, "uwsgi_worker_requests", Some(("worker_id", "2"))), Some(Value::U64(4)));
    // The same server asked without http = true: it waits for a request, we for a reply.
    let e = poll_once(&tcp_spec(&addr, ""), &mut Conn::default()).await.map(|_| ()).expect_err("no http");
    assert_eq!(e, "no complete reply within 0.3 s");
}

#[tokio::test]
async fn hostile_servers_fail_within_the_timeout_or_the_size_limit() {
    let silent = server(|s| async move {
        // Accepts and never answers (holds the connection until the client goes).
        let mut s = s;
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let e = poll_once(&tcp_spec(&silent, ""), &mut Conn::default()).await.map(|_| ()).expect_err("silent");
    assert_eq!(e, "no complete reply within 0.3 s");
    let endless = server(|mut s| async move {
        let chunk = vec![b' '; 1 << 16];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let mut patient = tcp_spec(&endless, "");
    patient.timeout_seconds = Seconds::from_secs(30);
    let e = poll_once(&patient, &mut Conn::default()).await.map(|_| ()).expect_err("endless");
    assert_eq!(e, "the reply is longer than 16 MiB");
    let garbage = server(|mut s| async move {
        let _ = s.write_all(b"\x00\xff not json").await;
    })
    .await;
    let e = poll_once(&tcp_spec(&garbage, ""), &mut Conn::default()).await.map(|_| ()).expect_err("garbage");
    assert!(e.starts_with("the reply is not uWSGI's stats JSON"), "{e}");
    let closes = server(|s| async move { drop(s) }).await;
    let e = poll_once(&tcp_spec(&closes, ""), &mut Conn::default()).await.map(|_| ()).expect_err("empty");
    assert!(e.contains("without a reply (is it started with --stats-http? then set http = true)"), "{e}");
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let e = poll_once(&tcp_spec(&format!("127.0.0.1:{port}"), ""), &mut Conn::default())
        .await
        .map(|_| ())
        .expect_err("refused");
    assert!(e.starts_with(&format!("cannot connect to 127.0.0.1:{port}")), "{e}");
}

/// Polls `f` every 10 ms until it returns `Some` (10 s at most).
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn find(fams: &[SnapFamily], name: &str, stats: &str) -> Option<Value> {
    let f = fams.iter().find(|f| f.meta.desc.name == name)?;
    f.series
        .iter()
        .find(|(l, _)| l.pairs[0] == ("stats".to_string(), stats.to_string()))
        .map(|(_, v)| v.clone())
}

fn polls(p: &Pollers, stats: &str) -> u64 {
    match find(&p.families(), "shmetrics_uwsgi_stats_polls", stats) {
        Some(Value::U64(n)) => n,
        other => panic!("polls of {stats}: {other:?}"),
    }
}

#[tokio::test]
async fn pollers_store_what_they_polled_and_reload_keeps_or_restarts_them() {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = Arc::clone(&up);
    let addr = server(move |mut s| {
        let up = flag.load(Ordering::SeqCst);
        async move {
            if up {
                let _ = s.write_all(FIXTURE).await;
            }
        }
    })
    .await;
    let p = Pollers::new(Some(tokio::runtime::Handle::current()));
    assert!(p.families().is_empty());
    let a = spec(&format!("[[uwsgi_stats]]\naddress = \"{addr}\"\nname = \"a\"\nfreq_seconds = 0.05\n"))
        .expect("a");
    p.reload(std::slice::from_ref(&a));
    until("a first poll", || (polls(&p, "a") >= 1).then_some(())).await;
    let fams = p.families();
    assert_eq!(find(&fams, "uwsgi_up", "a"), Some(Value::F64(1.0)));
    assert_eq!(find(&fams, "shmetrics_uwsgi_stats_errors", "a"), Some(Value::U64(0)));
    assert_eq!(find(&fams, "uwsgi_workers", "a"), Some(Value::F64(2.0)));
    let requests = fams.iter().find(|f| f.meta.desc.name == "uwsgi_worker_requests").expect("requests");
    assert_eq!(requests.series.len(), 2);
    assert_eq!(requests.meta.desc.sample_name(), "uwsgi_worker_requests_total");

    // The server stops answering: uwsgi_up 0, errors counted, the other series gone.
    up.store(false, Ordering::SeqCst);
    let errors = until("failed polls", || match find(&p.families(), "shmetrics_uwsgi_stats_errors", "a") {
        Some(Value::U64(n)) if n >= 2 => Some(n),
        _ => None,
    })
    .await;
    let fams = p.families();
    assert_eq!(find(&fams, "uwsgi_up", "a"), Some(Value::F64(0.0)));
    assert_eq!(find(&fams, "uwsgi_workers", "a"), None);
    assert!(fams.iter().all(|f| !f.meta.desc.name.starts_with("uwsgi_worker")));
    up.store(true, Ordering::SeqCst);
    until("uwsgi_up 1 again", || {
        (find(&p.families(), "uwsgi_up", "a") == Some(Value::F64(1.0))).then_some(())
    })
    .await;

    // Reload: `a` unchanged keeps its poller; `b` is new.
    let shared_a = Arc::clone(&lock(&p.pollers)[0].shared);
    let b = spec(&format!("[[uwsgi_stats]]\naddress = \"{addr}\"\nname = \"b\"\nfreq_seconds = 0.05\n"))
        .expect("b");
    p.reload(&[a.clone(), b.clone()]);
    assert!(Arc::ptr_eq(&shared_a, &lock(&p.pollers)[0].shared));
    until("b polled", || (polls(&p, "b") >= 1).then_some(())).await;
    // `a` changed (another timeout): restarted, its counters continue.
    let mut a2 = a.clone();
    a2.timeout_seconds = Seconds::from_secs(1);
    p.reload(&[a2, b.clone()]);
    let kept = lock(&p.pollers).iter().find(|x| x.spec.label() == "a").map(|x| Arc::clone(&x.shared));
    assert!(kept.is_some_and(|k| Arc::ptr_eq(&k, &shared_a)));
    match find(&p.families(), "shmetrics_uwsgi_stats_errors", "a") {
        Some(Value::U64(n)) => assert!(n >= errors, "{n} < {errors}"),
        other => panic!("{other:?}"),
    }
    // `a` removed: its series go, `b` stays.
    p.reload(std::slice::from_ref(&b));
    let fams = p.families();
    assert_eq!(find(&fams, "uwsgi_up", "a"), None);
    assert_eq!(find(&fams, "shmetrics_uwsgi_stats_polls", "a"), None);
    assert!(find(&fams, "uwsgi_up", "b").is_some());
    p.reload(&[]);
    assert!(p.families().is_empty());
}

#[test]
fn without_a_runtime_nothing_is_polled_and_nothing_panics() {
    let p = Pollers::new(None);
    p.reload(&[tcp_spec("127.0.0.1:1", "")]);
    let fams = p.families();
    assert_eq!(find(&fams, "shmetrics_uwsgi_stats_polls", "127.0.0.1:1"), Some(Value::U64(0)));
    assert_eq!(find(&fams, "uwsgi_up", "127.0.0.1:1"), None);
}
