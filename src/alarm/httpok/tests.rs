//! Unit tests of httpok: the section's values, the pid file, one check against real sockets, and
//! the acting logic against a real process.

use super::*;
use crate::alarm::AlarmConfig;
use std::os::unix::fs::symlink;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOG: &str = "[actions.a]\ntype = \"log\"\n";

fn parse(section: &str) -> Result<AlarmConfig, String> {
    AlarmConfig::parse(&format!("{LOG}[[httpok]]\n{section}")).map_err(|e| e.to_string())
}

fn rule(section: &str) -> HttpokRule {
    parse(section).unwrap_or_else(|e| panic!("{section}: {e}")).httpok.remove(0)
}

fn refusal(section: &str) -> String {
    match parse(section) {
        Ok(c) => panic!("accepted {section:?}: {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn defaults_and_values_are_parsed_at_load() {
    let r = rule("url = \"http://127.0.0.1:8000/health?x=1\"\nactions = [\"a\"]\n");
    assert_eq!(
        (r.url.text.as_str(), r.url.authority.as_str(), r.url.host.as_str(), r.url.port, r.url.path.as_str()),
        ("http://127.0.0.1:8000/health?x=1", "127.0.0.1:8000", "127.0.0.1", 8000, "/health?x=1")
    );
    assert_eq!(r.interval_seconds, Seconds::from_secs(60));
    assert_eq!(r.timeout_seconds, Seconds::from_secs(10));
    assert_eq!(r.grace_seconds, Seconds::from_secs(60));
    assert_eq!((r.start_seconds, r.failures, r.signal, r.pidfile.clone()), (None, Failures(3), None, None));
    assert_eq!(r.expect_status, ExpectStatus(Vec::new()));
    assert!(r.expect_status.allows(200) && r.expect_status.allows(299) && !r.expect_status.allows(301));
    assert_eq!(r.expect_status.to_string(), "2xx");

    let r = rule(
        "url = \"http://[::1]/\"\ninterval_seconds = 0.2\ntimeout_seconds = 0.5\nstart_seconds = 0\n\
         expect_status = [200, 204]\nexpect_body = \"OK\"\nfailures = 1\nsignal = \"hup\"\n\
         pidfile = \"/run/app.pid\"\ngrace_seconds = 0\n",
    );
    assert_eq!((r.url.host.as_str(), r.url.port, r.url.path.as_str()), ("::1", 80, "/"));
    assert_eq!(r.interval_seconds.get(), Duration::from_millis(200));
    assert_eq!(r.start_seconds, Some(Seconds::from_secs(0)));
    assert_eq!(r.expect_status, ExpectStatus(vec![200, 204]));
    assert_eq!(r.expect_status.to_string(), "200 or 204");
    assert!(!r.expect_status.allows(201));
    assert_eq!(r.expect_body, Some(BodyText("OK".into())));
    assert_eq!(r.failures, Failures(1));
    assert_eq!(r.signal, Some(SignalName(nix::sys::signal::Signal::SIGHUP)));
    assert_eq!(r.pidfile, Some(PidfilePath("/run/app.pid".into())));
    assert!(r.actions.is_empty());
    // One code alone is a list of one; the URL without a path asks for `/`.
    let r = rule("url = \"http://localhost:81\"\nexpect_status = 503\nactions = [\"a\"]\n");
    assert_eq!((r.expect_status, r.url.path.as_str()), (ExpectStatus(vec![503]), "/"));
}

#[test]
fn bad_values_are_refused_with_what_to_write() {
    let ok = "url = \"http://127.0.0.1:1/\"\nactions = [\"a\"]\n";
    let with = |line: &str| format!("{ok}{line}\n");
    let cases: Vec<(String, &str)> = vec![
        (
            "url = \"https://example.com/\"\nactions = [\"a\"]\n".into(),
            "url = \"https://example.com/\": only http:// URLs are supported (the aggregator carries no \
             TLS stack; check the application's local port), e.g. url = \"http://127.0.0.1:8000/health\"",
        ),
        ("url = \"not a url\"\nactions = [\"a\"]\n".into(), "url = \"not a url\" is not a URL ("),
        (
            "url = \"/health\"\nactions = [\"a\"]\n".into(),
            "url = \"/health\": only http:// URLs are supported",
        ),
        (
            "url = \"http://u:p@127.0.0.1/\"\nactions = [\"a\"]\n".into(),
            "url = \"http://u:p@127.0.0.1/\": user names and passwords are not supported",
        ),
        (
            with("expect_status = [200, 700]"),
            "expect_status = [200, 700] is not allowed: write a list of HTTP status codes from 100 to \
             599, e.g. expect_status = [200, 204] (leave it out for any 2xx)",
        ),
        (with("expect_status = 99"), "expect_status = 99 is not allowed: write a list of HTTP status codes"),
        (with("expect_status = []"), "expect_status = [] is not allowed"),
        (with("expect_status = \"200\""), "expect_status = \"200\" is not allowed"),
        (
            with("failures = 0"),
            "failures = 0 is not allowed: write how many checks in a row must fail before acting, a \
             whole number from 1 to 4294967295",
        ),
        (with("failures = -1"), "failures = -1 is not allowed"),
        (with("failures = 1.5"), "failures = 1.5 is not allowed"),
        (
            with("expect_body = \"\""),
            "expect_body = \"\" is not allowed: write the text the answer must contain, or leave \
             expect_body out",
        ),
        (
            with("interval_seconds = 0"),
            "interval_seconds = 0 is not allowed: write a number of seconds more than 0",
        ),
        (with("timeout_seconds = -1"), "timeout_seconds = -1 is not allowed"),
        (with("grace_seconds = inf"), "grace_seconds = inf is not allowed"),
        (with("signal = \"SIGNOPE\""), "\"SIGNOPE\" is not a signal name (e.g. \"SIGTERM\")"),
        (
            with("signal = \"HUP\"\npidfile = \"app.pid\""),
            "pidfile = \"app.pid\": write an absolute path, e.g. pidfile = \"/run/app/app.pid\"",
        ),
        (with("retries = 3"), "unknown field `retries`"),
        (
            "url = \"http://127.0.0.1:1/\"\n".into(),
            "[[httpok]] url = \"http://127.0.0.1:1/\" does nothing when it fails: give actions = \
             [\"…\"] (alarm actions), signal = \"SIGHUP\" (or another signal), or both",
        ),
        (
            "url = \"http://127.0.0.1:1/\"\nactions = [\"mail\"]\n".into(),
            "[[httpok]] url = \"http://127.0.0.1:1/\" refers to action \"mail\", which is not defined \
             under [actions]",
        ),
        (
            with("pidfile = \"/run/app.pid\""),
            "[[httpok]] url = \"http://127.0.0.1:1/\" has a pidfile but no signal: add signal = \
             \"SIGHUP\" (or another signal), or remove pidfile",
        ),
        (
            format!("{ok}[[httpok]]\n{ok}"),
            "[[httpok]] url = \"http://127.0.0.1:1/\" is checked by two sections: merge them into one",
        ),
    ];
    for (section, expected) in cases {
        let e = refusal(&section);
        assert!(e.contains(expected), "{section:?}:\n got {e}\nwant {expected}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn a_signal_needs_a_target_under_serve() {
    let rules = parse("url = \"http://127.0.0.1:1/x\"\nsignal = \"SIGHUP\"\n").expect("config").httpok;
    assert_eq!(check_targets(&rules, true), Ok(()));
    assert_eq!(
        check_targets(&rules, false),
        Err("[[httpok]] url = \"http://127.0.0.1:1/x\" has signal = \"SIGHUP\" but nothing to send it \
             to: under `shmetrics serve` there is no command, so give pidfile = \"/path/to/app.pid\", \
             or run the application under `shmetrics run`"
            .into())
    );
    let rules = parse("url = \"http://127.0.0.1:1/x\"\nsignal = \"SIGHUP\"\npidfile = \"/p\"\n")
        .expect("config")
        .httpok;
    assert_eq!(check_targets(&rules, false), Ok(()));
}

#[test]
fn pid_files_are_read_safely() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| tmp.path().join(name);
    let write = |name: &str, text: &str| std::fs::write(p(name), text).expect("write");
    write("good", "4242\n");
    assert_eq!(read_pidfile(&p("good")), Ok(4242));
    write("spaced", "  77 \n");
    assert_eq!(read_pidfile(&p("spaced")), Ok(77));
    let show = |name: &str| p(name).display().to_string();
    let err = |name: &str| read_pidfile(&p(name)).expect_err(name);
    assert_eq!(
        err("missing"),
        format!("pidfile {} does not exist (is the application running?)", show("missing"))
    );
    symlink(p("good"), p("link")).expect("symlink");
    assert_eq!(
        err("link"),
        format!("pidfile {}: a symbolic link, not a regular file; not opened", show("link"))
    );
    nix::unistd::mkfifo(&p("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    assert_eq!(err("fifo"), format!("pidfile {}: a FIFO, not a regular file; not opened", show("fifo")));
    std::fs::create_dir(p("dir")).expect("mkdir");
    assert_eq!(err("dir"), format!("pidfile {}: a directory, not a regular file; not opened", show("dir")));
    write("long", &format!("{}\n", "1".repeat(40)));
    assert_eq!(err("long"), format!("pidfile {} is longer than 32 bytes: not a pid file", show("long")));
    for (name, text, why) in [
        ("zero", "0\n", "holds pid 0, which is never signalled"),
        ("init", "1", "holds pid 1, which is never signalled"),
        ("neg", "-5", "holds \"-5\", not a pid"),
        ("word", "abc", "holds \"abc\", not a pid"),
        ("plus", "+12", "holds \"+12\", not a pid"),
        ("empty", "", "holds \"\", not a pid"),
        ("huge", "99999999999", "holds \"99999999999\", not a pid"),
    ] {
        write(name, text);
        assert_eq!(err(name), format!("pidfile {} {why}", show(name)));
    }
    write("me", &std::process::id().to_string());
    assert_eq!(
        err("me"),
        format!("pidfile {} holds pid {}, which is never signalled", show("me"), std::process::id())
    );
}

/// A server on 127.0.0.1 answering each connection with `reply` (`None`: accept, read, never
/// answer; `Some(b"")`: close at once).
async fn server(reply: Option<&'static [u8]>) -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            match reply {
                Some(r) => {
                    let _ = s.write_all(r).await;
                }
                None => held.push(s),
            }
        }
    });
    (port, task)
}

fn rule_for(port: u16, extra: &str) -> HttpokRule {
    rule(&format!(
        "url = \"http://127.0.0.1:{port}/health\"\ntimeout_seconds = 0.3\nactions = [\"a\"]\n{extra}"
    ))
}

#[tokio::test]
async fn each_kind_of_failure_is_told_apart() {
    let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nall is well";
    let (port, _s) = server(Some(ok)).await;
    let mut conn = Conn::default();
    assert_eq!(check_once(&rule_for(port, ""), &mut conn).await, Ok(()));
    assert_eq!(check_once(&rule_for(port, "expect_body = \"is well\""), &mut conn).await, Ok(()));
    assert_eq!(
        check_once(&rule_for(port, "expect_body = \"ready\""), &mut conn).await,
        Err(fail(Outcome::Body, "the body does not contain \"ready\"".into()))
    );
    assert_eq!(
        check_once(&rule_for(port, "expect_status = [204]"), &mut conn).await,
        Err(fail(Outcome::Status, "status 200, expected 204".into()))
    );
    let (port, _s) = server(Some(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")).await;
    assert_eq!(
        check_once(&rule_for(port, ""), &mut conn).await,
        Err(fail(Outcome::Status, "status 500, expected 2xx".into()))
    );
    let (port, _s) = server(None).await;
    assert_eq!(
        check_once(&rule_for(port, ""), &mut conn).await,
        Err(fail(Outcome::Timeout, "no answer within 0.3 s".into()))
    );
    let (port, _s) = server(Some(b"")).await;
    let e = check_once(&rule_for(port, ""), &mut conn).await.expect_err("closed");
    assert_eq!(e.outcome, Outcome::ProtocolError, "{e:?}");
    assert!(e.reason.starts_with("no HTTP answer: "), "{e:?}");
    let (port, _s) = server(Some(b"SSH-2.0-OpenSSH\r\n")).await;
    let e = check_once(&rule_for(port, ""), &mut conn).await.expect_err("not HTTP");
    assert_eq!(e.outcome, Outcome::ProtocolError, "{e:?}");
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    let e = check_once(&rule_for(port, ""), &mut conn).await.expect_err("refused");
    assert_eq!(e.outcome, Outcome::ConnectError, "{e:?}");
    assert_eq!(e.reason, format!("cannot connect to 127.0.0.1:{port}: Connection refused (os error 111)"));
}

#[tokio::test]
async fn a_huge_body_is_read_only_up_to_the_limit() {
    // 2 MiB of `x`, then the text: not within the first MiB.
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let mut body = vec![b'x'; 2 << 20];
        body.extend_from_slice(b"READY");
        let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        r.extend_from_slice(&body);
        r
    });
    let (port, _s) = server(Some(big.as_slice())).await;
    let mut conn = Conn::default();
    assert_eq!(
        check_once(
            &rule(&format!(
                "url = \"http://127.0.0.1:{port}/\"\nexpect_body = \"READY\"\nactions = [\"a\"]\n"
            )),
            &mut conn
        )
        .await,
        Err(fail(Outcome::Body, "the body does not contain \"READY\"".into()))
    );
}

/// Counts of one rule: checks by result, signals, signal errors, up.
fn counts(s: &Shared) -> (Vec<u64>, u64, u64, Option<bool>) {
    let c = lock(&s.counts);
    (c.checks.to_vec(), c.signals, c.signal_errors, c.up)
}

#[tokio::test]
async fn acts_after_failures_in_a_row_once_per_grace_period() {
    // A real process to signal (SIGCONT changes nothing for it), named by a pid file.
    let mut target = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pidfile = tmp.path().join("app.pid");
    std::fs::write(&pidfile, format!("{}\n", target.id())).expect("pidfile");
    let r = rule(&format!(
        "url = \"http://127.0.0.1:1/\"\nfailures = 2\nsignal = \"SIGCONT\"\npidfile = \"{}\"\n\
         grace_seconds = 3600\nactions = [\"a\"]\n",
        pidfile.display()
    ));
    let pipeline = Pipeline::start(AlarmConfig::parse(LOG).expect("config"));
    let ctx = Ctx { pipeline: Some(Arc::clone(&pipeline)), child: None };
    let shared = Shared::new(&r.url.text);
    let timeout = || Err(fail(Outcome::Timeout, "no answer within 0.3 s".into()));
    // fail, ok (resets), fail: no act yet.
    record(&r, &shared, &ctx, timeout());
    record(&r, &shared, &ctx, Ok(()));
    record(&r, &shared, &ctx, timeout());
    assert_eq!(counts(&shared), (vec![1, 0, 2, 0, 0, 0], 0, 0, Some(false)));
    assert!(pipeline.recent().is_empty());
    // The second in a row acts; the next two are within grace.
    record(&r, &shared, &ctx, Err(fail(Outcome::Status, "status 500, expected 2xx".into())));
    record(&r, &shared, &ctx, timeout());
    record(&r, &shared, &ctx, timeout());
    assert_eq!(counts(&shared), (vec![1, 0, 4, 1, 0, 0], 1, 0, Some(false)));
    let events = pipeline.recent();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    let pid = target.id();
    assert_eq!((e.kind, e.subject.as_str()), (EventKind::Httpok, "http://127.0.0.1:1/"));
    assert_eq!(
        e.message,
        format!("GET http://127.0.0.1:1/: 2 failed checks in a row, the last: status 500, expected 2xx; sent SIGCONT to pid {pid}")
    );
    let want: BTreeMap<String, String> =
        [("pid", pid.to_string()), ("reason", "status".into()), ("url", r.url.text.clone())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(e.labels, want);
    assert_eq!(pipeline.stats().suppressed.get(&EventKind::Httpok), Some(&2));
    let _ = target.kill();
    let _ = target.wait();

    // Without grace, each failure in a row acts; a pid file naming a process gone is an error,
    // counted and told in the alarm.
    let r = rule(&format!(
        "url = \"http://127.0.0.1:2/\"\nfailures = 1\nsignal = \"SIGCONT\"\npidfile = \"{}\"\n\
         grace_seconds = 0\nactions = [\"a\"]\n",
        pidfile.display()
    ));
    let shared = Shared::new(&r.url.text);
    record(&r, &shared, &ctx, timeout());
    assert_eq!(counts(&shared), (vec![0, 0, 1, 0, 0, 0], 0, 1, Some(false)));
    let last = pipeline.recent().pop().expect("event");
    assert_eq!(
        last.message,
        format!(
            "GET http://127.0.0.1:2/: 1 failed check in a row, the last: no answer within 0.3 s; no SIGCONT sent: \
             could not send SIGCONT to pid {pid}: ESRCH: No such process"
        )
    );
    std::fs::remove_file(&pidfile).expect("rm");
    record(&r, &shared, &ctx, timeout());
    assert_eq!(counts(&shared), (vec![0, 0, 2, 0, 0, 0], 0, 2, Some(false)));
    record(&r, &shared, &ctx, Ok(()));
    assert_eq!(counts(&shared), (vec![1, 0, 2, 0, 0, 0], 0, 2, Some(true)));
}

#[test]
fn the_command_pid_is_there_only_while_the_command_runs() {
    let child = Arc::new(ChildPid::default());
    let r = rule("url = \"http://127.0.0.1:1/\"\nsignal = \"SIGHUP\"\n");
    let ctx = Ctx { pipeline: None, child: Some(Arc::clone(&child)) };
    assert_eq!(ctx.target(&r), Err("the command is not running".into()));
    child.set(4321);
    assert_eq!(ctx.target(&r), Ok(4321));
    child.clear();
    assert_eq!(ctx.target(&r), Err("the command is not running".into()));
    let serve = Ctx::default();
    assert_eq!(serve.target(&r), Err("no pidfile, and no command (`shmetrics serve`)".into()));
}
