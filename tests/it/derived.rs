//! Derived metrics (`[[metric]]`) end to end: real workers (`examples/workload.rs`) write exact
//! counts, a real `shmetrics serve --config` computes the derived metrics on the merged view, and
//! the tests read them back from `/metrics`, from a threshold alarm's command and from `dump`.
//!
//! With `--workers 2 --series 2 --hold`: `wl_requests_total{route="/r0"}` = 3, `{route="/r1"}` = 6,
//! `wl_bytes_total` = 1.5, `wl_max{route="/r0"}` = 2, `{route="/r1"}` = 4, `wl_recent` = 2 (see
//! the workload's table). The workload is started first and holds its values, so every merge the
//! aggregator makes sees the final ones: an accumulator grows by exactly 9 a round.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util;

const T: Duration = Duration::from_secs(20);

/// The derived metrics of these tests; `{file}` is the file collector's file.
const METRICS: &str = r#"
[[metric]]
name = "requests_all_total"
collector = "sum"
children = ["wl_requests_total"]

[[metric]]
name = "r0_plus_bytes"
type = "gauge"
collector = "sum"
children = ['wl_requests_total{route="/r0"}', "wl_bytes_total"]

[[metric]]
name = "requests_avg"
type = "gauge"
collector = "avg"
children = ['wl_requests_total{route="/r0"}', 'wl_requests_total{route="/r1"}']

[[metric]]
name = "max_scaled"
type = "absolute"
collector = "multiplier"
factor = 0.5
initial_value = 100
children = ["wl_max"]

[[metric]]
name = "r0_requests"
type = "alias"
alias = 'wl_requests_total{route="/r0"}'

[[metric]]
name = "latest"
type = "alias"
alias = "wl_recent"

[[metric]]
name = "acc"
type = "gauge"
collector = "accumulator"
initial_value = 7
freq_seconds = 0.2
children = ["wl_requests_total"]

[[metric]]
name = "from_file"
type = "gauge"
collector = "file"
path = "{file}"
split = 1
help = "The second token of a file."

[[metric]]
name = "ghost"
type = "gauge"
collector = "sum"
children = ["wl_nothing_total"]
"#;

/// A temp dir with a multiproc directory (workers running), a value file, an alarm log and a
/// configuration.
struct Setup {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    file: PathBuf,
    out: PathBuf,
    config: PathBuf,
    _wl: util::Workload,
}

fn setup(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mp");
    std::fs::create_dir(&dir).expect("mkdir");
    let file = tmp.path().join("value");
    std::fs::write(&file, "x 2.5\n").expect("value file");
    let out = tmp.path().join("alarms.txt");
    let config = tmp.path().join("shmetrics.toml");
    let wl = util::workload(&dir, &["--workers", "2", "--series", "2", "--hold"]);
    let s = Setup { tmp, dir, file, out, config, _wl: wl };
    write_config(&s, extra);
    s
}

/// Writes the configuration: an action appending to `out`, [`METRICS`], then `extra`.
fn write_config(s: &Setup, extra: &str) {
    let out = s.out.display();
    let text = format!(
        "check_interval_seconds = 0.5\n\n[actions.file]\ntype = \"command\"\n\
         command = [\"sh\", \"-c\", \"cat >> '{out}'; echo >> '{out}'\"]\ntimeout_seconds = 5\nretries = 1\n\
         {}\n{extra}",
        METRICS.replace("{file}", &s.file.display().to_string())
    );
    std::fs::write(&s.config, text).expect("config");
}

fn serve(s: &Setup) -> util::Served {
    let d = s.dir.to_str().expect("utf-8");
    let c = s.config.to_str().expect("utf-8");
    util::spawn_shmetrics(
        &["serve", "--dir", d, "--config", c, "--upkeep-interval", "0.2"],
        &[],
        s.tmp.path(),
    )
}

fn scrape(served: &util::Served) -> std::collections::BTreeMap<String, f64> {
    util::samples(&util::scrape(served.addr))
}

/// Waits until a scrape has `key`, returns its value.
fn wait_sample(served: &util::Served, key: &str) -> f64 {
    util::wait_for(T, key, || scrape(served).get(key).copied())
}

/// Whether `v` is the accumulator's value after a whole number of rounds (at least one): 7 + 9k.
fn rounds(v: f64) -> Option<f64> {
    let k = (v - 7.0) / 9.0;
    (k >= 1.0 && k.fract() == 0.0).then_some(k)
}

fn log(served: &util::Served) -> String {
    std::fs::read_to_string(&served.log).unwrap_or_default()
}

#[test]
fn derived_metrics_are_served_with_exact_values() {
    let s = setup("");
    let served = serve(&s);
    let first = wait_sample(&served, "requests_all_total");
    let text = util::scrape(served.addr);
    let got = util::samples(&text);
    assert_eq!(first, 9.0);
    assert_eq!(got["r0_plus_bytes"], 3.0 + 1.5);
    assert_eq!(got["requests_avg"], (3.0 + 6.0) / 2.0);
    assert_eq!(got["max_scaled"], 100.0 + (2.0 + 4.0) * 0.5);
    assert_eq!(got["r0_requests_total"], 3.0);
    assert_eq!(got["latest"], 2.0);
    assert_eq!(got["from_file"], 2.5);
    assert_eq!(got["ghost"], 0.0);
    for line in [
        "# TYPE requests_all_total counter",
        "# TYPE r0_plus_bytes gauge",
        "# TYPE max_scaled gauge",
        "# TYPE r0_requests_total counter",
        "# TYPE latest gauge",
        "# HELP from_file The second token of a file.",
        "# HELP requests_avg Derived ([[metric]]): average of wl_requests_total{route=\"/r0\"}, wl_requests_total{route=\"/r1\"}.",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // The accumulator: 7 + 9 per round, growing.
    let a = wait_sample(&served, "acc");
    let ka = rounds(a).unwrap_or_else(|| panic!("acc = {a} is not 7 + 9k"));
    let b = util::wait_for(T, "acc to grow", || scrape(&served).get("acc").copied().filter(|b| *b > a));
    let kb = rounds(b).unwrap_or_else(|| panic!("acc = {b} is not 7 + 9k"));
    assert!(kb > ka, "{a} then {b}");
    // The file changes (replaced atomically): the metric follows.
    let tmp = s.tmp.path().join("value.new");
    std::fs::write(&tmp, "x 4\n").expect("write");
    std::fs::rename(&tmp, &s.file).expect("rename");
    util::wait_for(T, "from_file = 4", || (scrape(&served).get("from_file") == Some(&4.0)).then_some(()));
    // A child that matches nothing: shown while it lasts, logged once.
    let problem = r#"shmetrics_derived_problems{metric="ghost",problem="no_match"}"#;
    assert_eq!(scrape(&served).get(problem), Some(&1.0));
    let warning = "derived metric ghost: child wl_nothing_total matches no series";
    util::wait_for(T, "the warning in the log", || log(&served).contains(warning).then_some(()));
    let merges = scrape(&served)["shmetrics_merges_total"];
    util::wait_for(T, "five more merges", || {
        (scrape(&served)["shmetrics_merges_total"] >= merges + 5.0).then_some(())
    });
    assert_eq!(log(&served).matches(warning).count(), 1, "{}", log(&served));
    // The file goes away: reported, the last value kept.
    std::fs::remove_file(&s.file).expect("rm");
    let unreadable = r#"shmetrics_derived_problems{metric="from_file",problem="unreadable"}"#;
    wait_sample(&served, unreadable);
    assert_eq!(scrape(&served)["from_file"], 4.0);
    // Every derived sample is valid OpenMetrics (the counters' _total, the problems gauge).
    util::assert_openmetrics_parses(served.addr);
}

#[test]
fn sighup_adds_a_metric_and_a_bad_file_keeps_the_old_ones() {
    let s = setup("");
    let served = serve(&s);
    // Some rounds first, so that an accumulator started again would show it.
    let before = util::wait_for(T, "acc after 3 rounds", || {
        scrape(&served).get("acc").copied().filter(|v| rounds(*v).is_some_and(|k| k >= 3.0))
    });
    write_config(
        &s,
        "[[metric]]\nname = \"r1_doubled\"\ntype = \"gauge\"\ncollector = \"multiplier\"\nfactor = 2\n\
         children = ['wl_requests_total{route=\"/r1\"}']\n",
    );
    served.proc.signal(Signal::SIGHUP);
    assert_eq!(wait_sample(&served, "r1_doubled"), 12.0);
    let got = scrape(&served);
    // The unchanged accumulator kept its state.
    assert!(got["acc"] >= before && rounds(got["acc"]).is_some(), "acc {before} then {}", got["acc"]);
    assert_eq!(got["requests_all_total"], 9.0);
    // A bad file: refused, the metrics in force kept (the one added too).
    write_config(&s, "[[metric]]\nname = \"broken\"\ntype = \"gauge\"\ncollector = \"file\"\n");
    served.proc.signal(Signal::SIGHUP);
    let refusal = util::wait_for(T, "the refusal in the log", || {
        log(&served).lines().find(|l| l.contains("keeping the configuration in force")).map(str::to_string)
    });
    assert!(
        refusal.contains(r#"[[metric]] "broken": collector = "file" needs path = "/absolute/path""#),
        "{refusal}"
    );
    let merges = scrape(&served)["shmetrics_merges_total"];
    util::wait_for(T, "two more merges", || {
        (scrape(&served)["shmetrics_merges_total"] >= merges + 2.0).then_some(())
    });
    let got = scrape(&served);
    assert_eq!((got["r1_doubled"], got["requests_all_total"]), (12.0, 9.0));
    assert!(!got.contains_key("broken"), "{got:?}");
}

#[test]
fn a_threshold_on_a_derived_metric_fires() {
    let s = setup(
        "[[threshold]]\nseries = \"requests_all_total\"\nop = \">=\"\nvalue = 9\nrate_seconds = 3600\n\
         message = \"{series} is {value} ({op} {threshold})\"\nactions = [\"file\"]\n",
    );
    let served = serve(&s);
    let text = util::wait_for(T, "the alarm", || {
        std::fs::read_to_string(&s.out).ok().filter(|a| a.contains("requests_all_total is 9 (>= 9)"))
    });
    assert_eq!(text.matches("requests_all_total is").count(), 1, "{text}");
    let fired = r#"shmetrics_alarms_fired_total{kind="threshold",action="file"}"#;
    assert_eq!(wait_sample(&served, fired), 1.0);
}

/// `shmetrics dump --dir DIR [--config FILE]`: its standard output, after checking it succeeded.
fn dump(dir: &Path, config: Option<&Path>) -> String {
    let mut cmd = Command::new(util::shmetrics_bin());
    cmd.arg("dump").arg("--dir").arg(dir);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("run dump");
    assert!(out.status.success(), "dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn dump_config_shows_derived_metrics() {
    let s = setup("");
    let got = util::samples(&dump(&s.dir, Some(&s.config)));
    assert_eq!(got["requests_all_total"], 9.0);
    assert_eq!(got["r0_plus_bytes"], 4.5);
    assert_eq!(got["requests_avg"], 4.5);
    assert_eq!(got["max_scaled"], 103.0);
    assert_eq!(got["r0_requests_total"], 3.0);
    assert_eq!(got["latest"], 2.0);
    assert_eq!(got["from_file"], 2.5);
    // One round: the initial value plus the children once.
    assert_eq!(got["acc"], 16.0);
    assert_eq!(got[r#"shmetrics_derived_problems{metric="ghost",problem="no_match"}"#], 1.0);
    // Without --config, none of them; a bad file is an error naming the mistake.
    let plain = util::samples(&dump(&s.dir, None));
    assert!(
        !plain.contains_key("requests_all_total") && plain.contains_key(r#"wl_requests_total{route="/r0"}"#)
    );
    std::fs::write(&s.config, "[[metric]]\nname = \"x\"\ncollector = \"sum\"\n").expect("config");
    let out = Command::new(util::shmetrics_bin())
        .args(["dump", "--dir"])
        .arg(&s.dir)
        .arg("--config")
        .arg(&s.config)
        .output()
        .expect("run dump");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"[[metric]] "x": collector = "sum" needs children = ["<series>", …]"#), "{err}");
}
