//! Summary, info and enum end to end: forked writers (`examples/typed_workers.rs`) behind the real
//! `shmetrics` binary, exact text in both formats, last-live-writer-wins for info and enum (also
//! after the winner is killed), summaries kept through a SIGKILL, and the output read by
//! prometheus_client's two parsers and by promtool.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{self, Proc};

const LONG: Duration = Duration::from_secs(20);

/// `typed_workers --workers n` with `SHMETRICS_DIR=dir`; returns it and its workers' pids in fork
/// order (worker `n-1` wrote last).
fn typed_workers(dir: &std::path::Path, n: usize) -> (Proc, Vec<i32>) {
    let mut child = Command::new(util::example_bin("typed_workers"))
        .args(["--workers", &n.to_string()])
        .env("SHMETRICS_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn typed_workers");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("READY line");
    (Proc { child }, util::parse_ready(&line))
}

/// The lines of the `tw_*` families (comments included), from a text exposition.
fn tw_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("tw_") || l.starts_with("# HELP tw_") || l.starts_with("# TYPE tw_"))
        .map(|l| format!("{l}\n"))
        .collect()
}

pub(crate) fn openmetrics(addr: std::net::SocketAddr) -> String {
    let r = util::http_get(addr, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]);
    assert_eq!(r.status, 200);
    r.text()
}

/// What the aggregator shows when worker `w` (of 3) set the info and enums last: the summary
/// always holds all three workers' observations (count 2 each, sums 1.5, 2.5, 3.5).
fn expected(w: usize, om: bool) -> String {
    let states = ["idle", "busy", "down"];
    let job = if w.is_multiple_of(2) { "idle" } else { "down" };
    let mut s = String::new();
    if om {
        s.push_str("# TYPE tw_build info\n# HELP tw_build Build.\n");
    } else {
        s.push_str("# HELP tw_build_info Build.\n# TYPE tw_build_info gauge\n");
    }
    s.push_str(&format!("tw_build_info{{version=\"1.{w}\",worker=\"w{w}\"}} 1\n"));
    let stateset = |s: &mut String, name: &str, help: &str, labels: &str, set: &str| {
        if om {
            s.push_str(&format!("# TYPE {name} stateset\n# HELP {name} {help}\n"));
        } else {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        }
        for st in states {
            let v = u8::from(st == set);
            s.push_str(&format!("{name}{{{labels}{name}=\"{st}\"}} {v}\n"));
        }
    };
    stateset(&mut s, "tw_job_state", "Job state.", "job=\"j\",", job);
    if om {
        s.push_str("# TYPE tw_latency_seconds summary\n# HELP tw_latency_seconds Latency.\n");
    } else {
        s.push_str("# HELP tw_latency_seconds Latency.\n# TYPE tw_latency_seconds summary\n");
    }
    s.push_str("tw_latency_seconds_count 6.0\ntw_latency_seconds_sum 7.5\n");
    stateset(&mut s, "tw_state", "State.", "", states[w % 3]);
    s
}

fn samples_of(addr: std::net::SocketAddr) -> std::collections::BTreeMap<String, f64> {
    util::samples(&util::scrape(addr))
}

#[test]
fn forked_writers_merge_summary_info_and_enum_and_the_last_live_writer_wins() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let (mut master, pids) = typed_workers(&dir, 3);
    assert_eq!(pids.len(), 3);

    let text = util::scrape(served.addr);
    assert_eq!(tw_lines(&text), expected(2, false), "{text}");
    let om = openmetrics(served.addr);
    assert_eq!(tw_lines(&om), expected(2, true), "{om}");

    // The winner dies: its info and enum values go with it, the next most recent live writer's
    // show; its summary observations stay (archived).
    kill(Pid::from_raw(pids[2]), Signal::SIGKILL).expect("kill");
    util::wait_for(LONG, "the killed worker folded", || {
        (samples_of(served.addr).get("shmetrics_workers_dead_total") == Some(&1.0)).then_some(())
    });
    let text = util::scrape(served.addr);
    assert_eq!(tw_lines(&text), expected(1, false), "{text}");
    assert_eq!(tw_lines(&openmetrics(served.addr)), expected(1, true));

    kill(Pid::from_raw(pids[1]), Signal::SIGKILL).expect("kill");
    util::wait_for(LONG, "the second worker folded", || {
        (samples_of(served.addr).get("shmetrics_workers_dead_total") == Some(&2.0)).then_some(())
    });
    assert_eq!(tw_lines(&util::scrape(served.addr)), expected(0, false));
    let s = samples_of(served.addr);
    assert_eq!(s.get("shmetrics_invalid_values"), Some(&0.0));
    assert_eq!(s.get("shmetrics_metric_conflicts"), Some(&0.0));

    // The last worker dies too: only the master lives, which registered the enums and never set
    // them, so they show their first state (as prometheus_client shows an enum nobody set); no
    // live process set the info, so it has no sample.
    kill(Pid::from_raw(pids[0]), Signal::SIGKILL).expect("kill");
    let s = util::wait_for(LONG, "the third worker folded", || {
        let s = samples_of(served.addr);
        (s.get("shmetrics_workers_dead_total") == Some(&3.0)).then_some(s)
    });
    let tw: Vec<(String, f64)> =
        s.iter().filter(|(k, _)| k.starts_with("tw_")).map(|(k, v)| (k.clone(), *v)).collect();
    let want: Vec<(String, f64)> = [
        ("tw_job_state{job=\"j\",tw_job_state=\"busy\"}", 0.0),
        ("tw_job_state{job=\"j\",tw_job_state=\"down\"}", 0.0),
        ("tw_job_state{job=\"j\",tw_job_state=\"idle\"}", 1.0),
        ("tw_latency_seconds_count", 6.0),
        ("tw_latency_seconds_sum", 7.5),
        ("tw_state{tw_state=\"busy\"}", 0.0),
        ("tw_state{tw_state=\"down\"}", 0.0),
        ("tw_state{tw_state=\"idle\"}", 1.0),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_string(), *v))
    .collect();
    assert_eq!(tw, want);

    master.signal(Signal::SIGTERM);
    master.wait_timeout(LONG);
}

/// Runs `code` with the test Python, `input` on its stdin; its output.
pub(crate) fn python(code: &str, input: &str) -> String {
    let py = util::require_python();
    let (ok, out) = util::run_with_stdin(Command::new(&py).args(["-c", code]), input.as_bytes());
    assert!(ok, "the parser rejected:\n{out}\n{input}");
    out
}

/// Prints `family|type|sample{labels} value` for every `tw_` sample, labels sorted.
pub(crate) const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as p004
parse = om if sys.argv[1] == "om" else p004
for fam in parse(sys.stdin.read()):
    if not fam.name.startswith("tw_"):
        continue
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s|%s|%s{%s} %r" % (fam.name, fam.type, s.name, labels, float(s.value)))
"#;

#[test]
fn prometheus_client_parsers_and_promtool_read_info_stateset_and_summary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    let served = util::serve(&dir, &[]);
    let (mut master, _pids) = typed_workers(&dir, 3);

    let om = python(&PARSE.replace("sys.argv[1]", "\"om\""), &openmetrics(served.addr));
    let want_om = "\
tw_build|info|tw_build_info{version=\"1.2\",worker=\"w2\"} 1.0
tw_job_state|stateset|tw_job_state{job=\"j\",tw_job_state=\"idle\"} 1.0
tw_job_state|stateset|tw_job_state{job=\"j\",tw_job_state=\"busy\"} 0.0
tw_job_state|stateset|tw_job_state{job=\"j\",tw_job_state=\"down\"} 0.0
tw_latency_seconds|summary|tw_latency_seconds_count{} 6.0
tw_latency_seconds|summary|tw_latency_seconds_sum{} 7.5
tw_state|stateset|tw_state{tw_state=\"idle\"} 0.0
tw_state|stateset|tw_state{tw_state=\"busy\"} 0.0
tw_state|stateset|tw_state{tw_state=\"down\"} 1.0
";
    assert_eq!(om, want_om);

    // The same samples in 0.0.4, where info and stateset are gauges (`tw_build_info`).
    let text = util::scrape(served.addr);
    let p004 = python(&PARSE.replace("sys.argv[1]", "\"004\""), &text);
    let want_004 = want_om.replace("tw_build|info|", "tw_build_info|gauge|").replace("|stateset|", "|gauge|");
    assert_eq!(p004, want_004);

    let (ok, said) =
        util::run_with_stdin(Command::new("promtool").args(["check", "metrics"]), text.as_bytes());
    assert!(ok, "promtool check metrics failed (apt-get install prometheus):\n{said}\n{text}");
    assert_eq!(said.trim(), "", "promtool printed lint findings:\n{text}");

    master.signal(Signal::SIGTERM);
    master.wait_timeout(LONG);
}

/// `shmetrics dump` in JSON names the state and gives the info's labels.
#[test]
fn dump_shows_the_state_and_the_info_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    let (mut master, _pids) = typed_workers(&dir, 2);
    let out = Command::new(util::shmetrics_bin())
        .args(["dump", "--format", "json", "--dir", dir.to_str().expect("utf-8")])
        .output()
        .expect("dump");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let fam = |name: &str| {
        doc["families"].as_array().expect("families").iter().find(|f| f["name"] == name).cloned()
    };
    let state = fam("tw_state").expect("tw_state");
    assert_eq!(state["type"], "stateset");
    assert_eq!(state["series"], serde_json::json!([{ "labels": {}, "state": "busy" }]));
    let build = fam("tw_build_info").expect("tw_build_info");
    assert_eq!(build["type"], "info");
    assert_eq!(
        build["series"],
        serde_json::json!([{ "labels": { "version": "1.1", "worker": "w1" }, "value": 1 }])
    );
    let lat = fam("tw_latency_seconds").expect("summary");
    assert_eq!(lat["series"], serde_json::json!([{ "labels": {}, "count": 4.0, "sum": 4.0 }]));
    master.signal(Signal::SIGTERM);
    master.wait_timeout(LONG);
}
