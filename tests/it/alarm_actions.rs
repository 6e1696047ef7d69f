//! Alarm delivery (`shmetrics::alarm::action`), driven through the library's `Pipeline` with real
//! commands (`sh`), a real HTTP listener on 127.0.0.1 and real time: exact messages (plain, with
//! `To:`/`Subject:` headers, the subject in the environment), both webhook formats parsed and
//! checked, batching windows and flushes, retries with back-off, a hanging command killed at its
//! timeout while another action goes on, reloads, unknown actions, and exact counters.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;
use shmetrics::alarm::{AlarmConfig, AlarmStats, Event, EventKind, Pipeline};

use crate::util::wait_for;

const T: Duration = Duration::from_secs(10);
const AT: f64 = 1_700_000_000.25;
const AT_TEXT: &str = "2023-11-14T22:13:20.250Z";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn start(rt: &tokio::runtime::Runtime, toml: &str) -> Arc<Pipeline> {
    let config = AlarmConfig::parse(toml).expect("config");
    let _guard = rt.enter();
    Pipeline::start(config)
}

/// An event at a fixed time, for exact messages.
fn event(kind: EventKind, subject: &str, message: &str, actions: &[&str]) -> Event {
    let actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    let mut e = Event::now(kind, subject, message, &actions);
    e.at = AT;
    e
}

fn stats(fired: &[(EventKind, &str, u64)], failed: &[(&str, u64)]) -> AlarmStats {
    AlarmStats {
        fired: fired.iter().map(|(k, a, n)| ((*k, a.to_string()), *n)).collect(),
        suppressed: BTreeMap::new(),
        failed: failed.iter().map(|(a, n)| (a.to_string(), *n)).collect(),
    }
}

/// A TOML command that stores each message it gets on stdin as its own file in `dir` (written
/// aside, then renamed, so a reader never sees half a message); names sort by time.
fn capture(dir: &Path) -> String {
    format!(
        r#"["sh", "-c", 'cat > "$0/.part$$" && mv "$0/.part$$" "$0/$(date +%s%N)-$$"', '{}']"#,
        dir.display()
    )
}

/// The messages stored by [`capture`], oldest first.
fn messages(dir: &Path) -> Vec<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read_to_string(p).expect("message")).collect()
}

fn wait_messages(dir: &Path, n: usize) -> Vec<String> {
    wait_for(T, &format!("{n} message(s) in {}", dir.display()), || {
        let m = messages(dir);
        (m.len() >= n).then_some(m)
    })
}

fn subdir(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    let d = tmp.path().join(name);
    std::fs::create_dir(&d).expect("mkdir");
    d
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver

struct Received {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// An HTTP/1.1 server on 127.0.0.1 answering each request with the next status of `statuses`
/// (200 once they run out) and handing the request to the test.
fn webhook(statuses: Vec<u16>) -> (SocketAddr, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).expect("header");
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').expect("header line");
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            let len: usize = headers.get("content-length").map_or(0, |l| l.parse().expect("length"));
            let mut body = vec![0; len];
            reader.read_exact(&mut body).expect("body");
            let status = statuses.next().unwrap_or(200);
            let answer = if status == 200 { "ok" } else { "try again later" };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            if tx.send(Received { method, path, headers, body }).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// Unix seconds of an RFC 3339 timestamp (`2023-11-14T22:13:20.250Z`, or with an offset), checking
/// its syntax strictly.
fn parse_rfc3339(s: &str) -> f64 {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> i64 {
        let t = &s[r];
        assert!(t.bytes().all(|c| c.is_ascii_digit()), "{s:?} is not RFC 3339");
        t.parse().expect("digits")
    };
    assert!(b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':');
    let (y, mo, d, h, mi, sec) =
        (digits(0..4), digits(5..7), digits(8..10), digits(11..13), digits(14..16), digits(17..19));
    assert!((1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && sec < 61, "{s:?}");
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        assert!(n > 0, "{s:?}");
        frac = format!("0.{}", &r[..n]).parse().expect("fraction");
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o => {
            assert!(o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":", "{s:?}");
            let m = o[1..3].parse::<i64>().expect("hours") * 60 + o[4..6].parse::<i64>().expect("minutes");
            if o.starts_with('-') {
                -m * 60
            } else {
                m * 60
            }
        }
    };
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86400 + h * 3600 + mi * 60 + sec - offset) as f64 + frac
}

fn is_label_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_command_gets_the_exact_message_on_stdin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (plain, mail, mail_s) = (subdir(&tmp, "plain"), subdir(&tmp, "mail"), subdir(&tmp, "mail_s"));
    let rt = runtime();
    // `mail -s "$SHMETRICS_ALARM_SUBJECT" addr` style: the subject from the environment, first.
    let mail_s_cmd = format!(
        r#"["sh", "-c", 'printf "%s\n" "$SHMETRICS_ALARM_SUBJECT $SHMETRICS_ALARM_COUNT $SHMETRICS_ALARM_KINDS" > "$0/.part$$"; cat >> "$0/.part$$" && mv "$0/.part$$" "$0/1-$$"', '{}']"#,
        mail_s.display()
    );
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.plain]
            type = "command"
            command = {}

            [actions.sendmail]
            type = "command"
            command = {}
            headers = true
            to = "ops@example.com"

            [actions.mail-s]
            type = "command"
            command = {mail_s_cmd}

            [actions.log]
            type = "log"
            "#,
            capture(&plain),
            capture(&mail)
        ),
    );
    let e = event(
        EventKind::Crash,
        "pid 12",
        "worker 12 was killed by signal 9 (SIGKILL)",
        &["plain", "sendmail", "mail-s", "log"],
    )
    .label("pid", "12")
    .label("program", "web \"blue\"");
    p.submit(e);
    let body = format!(
        "worker 12 was killed by signal 9 (SIGKILL)\n\nkind: crash\nsubject: pid 12\nat: {AT_TEXT}\n\
         labels: {{pid=\"12\",program=\"web \\\"blue\\\"\"}}\n"
    );
    assert_eq!(wait_messages(&plain, 1), std::slice::from_ref(&body));
    assert_eq!(
        wait_messages(&mail, 1),
        [format!("To: ops@example.com\nSubject: shmetrics: crash pid 12\n\n{body}")]
    );
    assert_eq!(wait_messages(&mail_s, 1), [format!("shmetrics: crash pid 12 1 crash\n{body}")]);
    rt.block_on(p.flush());
    assert_eq!(messages(&plain).len(), 1);
    assert_eq!(
        p.stats(),
        stats(
            &[
                (EventKind::Crash, "log", 1),
                (EventKind::Crash, "mail-s", 1),
                (EventKind::Crash, "plain", 1),
                (EventKind::Crash, "sendmail", 1)
            ],
            &[]
        )
    );
}

#[test]
fn webhooks_get_our_json_and_alertmanager_alerts() {
    let (addr, rx) = webhook(vec![]);
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.json]
            type = "webhook"
            url = "http://{addr}/hook?x=1"

            [actions.am]
            type = "webhook"
            url = "http://{addr}/api/v2/alerts"
            format = "alertmanager"
            batch_seconds = 60
            "#
        ),
    );
    p.submit(
        event(EventKind::Fatal, "job", "no live workers for 30 s", &["json", "am"])
            .label("program", "web")
            .label("odd.name", "x")
            .label("empty", ""),
    );
    p.submit(event(EventKind::Memory, "pid 7", "rss 600 MiB > 512 MiB", &["json", "am"]).label("pid", "7"));
    rt.block_on(p.flush());

    let got: Vec<Received> = (0..3).map(|_| rx.recv_timeout(T).expect("a request")).collect();
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "more requests than expected");
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
        assert_eq!(r.headers.get("host"), Some(&addr.to_string()));
    }

    // Ours: one request per event (no batching), {"events": [...]}.
    let ours: Vec<Value> = got.iter().filter(|r| r.path == "/hook?x=1").map(Received::json).collect();
    assert_eq!(ours.len(), 2);
    let fatal = &ours.iter().find(|v| v["events"][0]["kind"] == "fatal").expect("the fatal event")["events"];
    assert_eq!(fatal.as_array().map(Vec::len), Some(1));
    assert_eq!(fatal[0]["subject"], "job");
    assert_eq!(fatal[0]["message"], "no live workers for 30 s");
    assert_eq!(fatal[0]["at"], AT);
    assert_eq!(fatal[0]["labels"], serde_json::json!({"program": "web", "odd.name": "x", "empty": ""}));
    assert!(ours
        .iter()
        .any(|v| v["events"][0]["kind"] == "memory" && v["events"][0]["labels"]["pid"] == "7"));

    // Alertmanager's: one request for the batch, an array of postableAlerts.
    let am = got.iter().find(|r| r.path == "/api/v2/alerts").expect("the alertmanager request").json();
    let alerts = am.as_array().expect("an array of alerts");
    assert_eq!(alerts.len(), 2);
    for a in alerts {
        let obj = a.as_object().expect("an alert is an object");
        for k in obj.keys() {
            assert!(
                ["labels", "annotations", "startsAt", "endsAt", "generatorURL"].contains(&k.as_str()),
                "{k}"
            );
        }
        for set in ["labels", "annotations"] {
            for (k, v) in a[set].as_object().expect("a label set") {
                assert!(is_label_name(k), "{set} name {k:?}");
                assert!(v.is_string(), "{set} value {v}");
            }
        }
        assert!((parse_rfc3339(a["startsAt"].as_str().expect("startsAt")) - AT).abs() < 1e-6);
    }
    let (f, m) = (&alerts[0], &alerts[1]);
    assert_eq!(
        f["labels"],
        serde_json::json!({"alertname": "shmetrics_fatal", "severity": "critical", "program": "web", "odd_name": "x"})
    );
    assert_eq!(f["annotations"]["summary"], "shmetrics: fatal job");
    assert_eq!(f["annotations"]["description"], "no live workers for 30 s");
    assert_eq!(f["startsAt"], AT_TEXT);
    assert_eq!(
        m["labels"],
        serde_json::json!({"alertname": "shmetrics_memory", "severity": "warning", "pid": "7"})
    );
    assert_eq!(
        p.stats(),
        stats(
            &[
                (EventKind::Fatal, "am", 1),
                (EventKind::Fatal, "json", 1),
                (EventKind::Memory, "am", 1),
                (EventKind::Memory, "json", 1)
            ],
            &[]
        )
    );
}

#[test]
fn webhook_errors_are_retried_then_counted() {
    let (addr, rx) = webhook(vec![503]);
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.flaky]
            type = "webhook"
            url = "http://{addr}/"
            retries = 1

            [actions.down]
            type = "webhook"
            url = "http://{closed}/"
            retries = 0
            "#
        ),
    );
    let t0 = Instant::now();
    p.submit(event(EventKind::Threshold, "q", "queue is 100", &["flaky", "down"]));
    rt.block_on(p.flush());
    assert!(t0.elapsed() >= Duration::from_millis(950), "the retry came after {:?}", t0.elapsed());
    assert_eq!(rx.recv_timeout(T).expect("first").json()["events"][0]["kind"], "threshold");
    assert_eq!(rx.recv_timeout(T).expect("retry").json()["events"][0]["message"], "queue is 100");
    assert_eq!(p.stats(), stats(&[(EventKind::Threshold, "flaky", 1)], &[("down", 1)]));
}

#[test]
fn a_batch_is_one_message_per_window_and_flush_sends_it_early() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = subdir(&tmp, "out");
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.batch]
            type = "command"
            command = {}
            headers = true
            to = "ops@example.com"
            batch_seconds = 1
            "#,
            capture(&out)
        ),
    );
    let split = |m: &str| -> (String, Vec<String>) {
        let (head, body) = m.split_once("\n\n").expect("headers, blank line, body");
        (head.to_string(), body.lines().map(str::to_string).collect())
    };

    let t0 = Instant::now();
    p.submit(event(EventKind::Crash, "pid 1", "one", &["batch"]).label("pid", "1"));
    p.submit(event(EventKind::Memory, "pid 2", "two", &["batch"]));
    p.submit(event(EventKind::Crash, "pid 3", "three", &["batch"]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(messages(&out).is_empty(), "delivered before the end of the window");
    let first = wait_messages(&out, 1);
    assert!(t0.elapsed() >= Duration::from_millis(950), "delivered after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(3), "delivered after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(messages(&out).len(), 1, "one message for the window");
    let (head, lines) = split(&first[0]);
    assert_eq!(head, "To: ops@example.com\nSubject: shmetrics: 3 alarms (crash, memory)");
    assert_eq!(
        lines,
        [
            format!("{AT_TEXT} crash pid 1: one {{pid=\"1\"}}"),
            format!("{AT_TEXT} memory pid 2: two"),
            format!("{AT_TEXT} crash pid 3: three"),
        ]
    );

    // After the window: a new window, a second message.
    p.submit(event(EventKind::Fatal, "job", "four", &["batch"]));
    p.submit(event(EventKind::Fatal, "job", "five", &["batch"]));
    let two = wait_messages(&out, 2);
    let (head, lines) = split(&two[1]);
    assert_eq!(head, "To: ops@example.com\nSubject: shmetrics: 2 alarms (fatal)");
    assert_eq!(lines, [format!("{AT_TEXT} fatal job: four"), format!("{AT_TEXT} fatal job: five")]);

    // A flush delivers a pending batch at once (and returns once it is delivered).
    let t1 = Instant::now();
    p.submit(event(EventKind::Crash, "pid 6", "six", &["batch"]));
    p.submit(event(EventKind::Crash, "pid 7", "seven", &["batch"]));
    rt.block_on(p.flush());
    assert!(t1.elapsed() < Duration::from_millis(900), "flush took {:?}", t1.elapsed());
    let three = messages(&out);
    assert_eq!(three.len(), 3);
    assert_eq!(split(&three[2]).1.len(), 2);
    // Nothing is left for the end of that window.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(messages(&out).len(), 3);
    assert_eq!(
        p.stats(),
        stats(
            &[
                (EventKind::Crash, "batch", 4),
                (EventKind::Memory, "batch", 1),
                (EventKind::Fatal, "batch", 2)
            ],
            &[]
        )
    );
}

#[test]
fn failing_commands_are_retried_with_back_off_then_counted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = subdir(&tmp, "out");
    let counter = tmp.path().join("flaky-count");
    let attempts = tmp.path().join("bad-attempts");
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.flaky]   # fails twice, then delivers
            type = "command"
            command = ["sh", "-c", 'n=$(cat "$0" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$0"; [ $n -ge 3 ] || exit 1; cat > "$1/.part" && mv "$1/.part" "$1/msg"', '{}', '{}']
            retries = 3

            [actions.bad]     # always fails
            type = "command"
            command = ["sh", "-c", 'cat > /dev/null; echo attempt >> "$0"; echo "no relay host" >&2; exit 1', '{}']
            retries = 1
            "#,
            counter.display(),
            out.display(),
            attempts.display()
        ),
    );
    let t0 = Instant::now();
    p.submit(event(EventKind::Crash, "pid 9", "nine", &["flaky", "bad"]));
    // The flush returns once both are delivered or given up: flaky at 0 s, 1 s, 3 s; bad at 0 s, 1 s.
    rt.block_on(p.flush());
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(std::fs::read_to_string(&counter).expect("counter").trim(), "3");
    assert_eq!(messages(&out).len(), 1);
    assert!(messages(&out)[0].starts_with("nine\n\nkind: crash\n"));
    assert_eq!(std::fs::read_to_string(&attempts).expect("attempts").lines().count(), 2);
    assert_eq!(p.stats(), stats(&[(EventKind::Crash, "flaky", 1)], &[("bad", 1)]));
}

#[test]
fn a_hanging_command_is_killed_at_its_timeout_without_delaying_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = subdir(&tmp, "out");
    let pidfile = tmp.path().join("sleep.pid");
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.hang]
            type = "command"
            command = ["sh", "-c", 'sleep 60 & echo $! > "$0"; wait', '{}']
            timeout_seconds = 1.5
            retries = 0

            [actions.fast]
            type = "command"
            command = {}
            "#,
            pidfile.display(),
            capture(&out)
        ),
    );
    let t0 = Instant::now();
    p.submit(event(EventKind::Memory, "pid 5", "five", &["hang"]));
    p.submit(event(EventKind::Crash, "pid 6", "six", &["fast"]));
    wait_messages(&out, 1);
    // The file appears just before the command exits: wait for the count too.
    wait_for(T, "fast counted", || (!p.stats().fired.is_empty()).then_some(()));
    assert!(t0.elapsed() < Duration::from_millis(1200), "the other action waited: {:?}", t0.elapsed());
    assert_eq!(p.stats(), stats(&[(EventKind::Crash, "fast", 1)], &[]), "hang given up too early");

    let sleep_pid: i32 = wait_for(T, "the pid of sleep", || {
        std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
    });
    wait_for(T, "hang counted as failed", || (p.stats().failed.get("hang") == Some(&1)).then_some(()));
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1450) && took < Duration::from_secs(4), "gave up after {took:?}");
    // The whole process group was killed: sleep is gone (or a zombie waiting for init).
    wait_for(Duration::from_secs(3), "sleep killed", || {
        match std::fs::read_to_string(format!("/proc/{sleep_pid}/stat")) {
            Err(_) => Some(()),
            Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')).then_some(()),
        }
    });
    rt.block_on(p.flush());
    assert_eq!(p.stats(), stats(&[(EventKind::Crash, "fast", 1)], &[("hang", 1)]));
}

#[test]
fn reloads_apply_to_later_deliveries_and_unknown_actions_count_as_failed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, gone, mark) =
        (subdir(&tmp, "a"), subdir(&tmp, "b"), subdir(&tmp, "gone"), subdir(&tmp, "mark"));
    let rt = runtime();
    let p = start(
        &rt,
        &format!(
            r#"
            [actions.out]
            type = "command"
            command = {}
            batch_seconds = 30

            [actions.gone]
            type = "command"
            command = {}
            batch_seconds = 30

            [actions.mark]
            type = "command"
            command = {}
            "#,
            capture(&a),
            capture(&gone),
            capture(&mark)
        ),
    );
    p.submit(event(EventKind::Crash, "pid 1", "before the reload", &["out", "gone"]));
    p.submit(event(EventKind::Crash, "pid 2", "unknown", &["nope"]));
    // The dispatcher reads the configuration when it takes an event, in order: once this marker
    // is delivered, the events above were taken under the first configuration.
    p.submit(event(EventKind::Crash, "pid 3", "marker", &["mark"]));
    wait_messages(&mark, 1);
    p.reload(
        AlarmConfig::parse(&format!(
            r#"
            [actions.out]
            type = "command"
            command = {}
            "#,
            capture(&b)
        ))
        .expect("config"),
    );
    p.submit(event(EventKind::Fatal, "job", "after the reload", &["out"]));
    p.submit(event(EventKind::Fatal, "job", "to a removed action", &["gone"]));
    // Unbatched now, with the new command.
    assert!(wait_messages(&b, 1)[0].starts_with("after the reload\n"));
    // The pending batches are still delivered: out's with its new settings, gone's with its old.
    rt.block_on(p.flush());
    let b_msgs = messages(&b);
    assert_eq!(b_msgs.len(), 2, "{b_msgs:?}");
    assert!(b_msgs[1].starts_with("before the reload\n"), "{b_msgs:?}");
    assert!(messages(&a).is_empty());
    assert_eq!(messages(&gone).len(), 1);
    assert_eq!(
        p.stats(),
        stats(
            &[
                (EventKind::Crash, "gone", 1),
                (EventKind::Crash, "mark", 1),
                (EventKind::Crash, "out", 1),
                (EventKind::Fatal, "out", 1)
            ],
            &[("gone", 1), ("nope", 1)]
        )
    );
}
