//! The alarm configuration file (TOML, `--config FILE`, example in `conf/shmetrics.toml`).
//!
//! ```toml
//! check_interval_seconds = 5          # how often memory and thresholds are evaluated
//!
//! [actions.ops-mail]                   # named actions, referred to by the rules
//! type = "command"                     # command | webhook | log
//! command = ["/usr/sbin/sendmail", "-t"]
//! headers = true                       # stdin starts with To:/Subject: lines (sendmail -t)
//! to = "ops@example.com"
//! batch_seconds = 60                   # crashmailbatch: one message per window
//! timeout_seconds = 10
//! retries = 3
//!
//! [actions.alertmanager]
//! type = "webhook"
//! url = "http://127.0.0.1:9093/api/v2/alerts"
//! format = "alertmanager"              # json | alertmanager
//!
//! [crash]                              # a worker died without a clean exit
//! actions = ["ops-mail"]
//!
//! [fatal]
//! no_live_workers_seconds = 30         # no live workers for this long
//! max_crashes = 5                      # more crashes than this …
//! window_seconds = 60                  # … within this window (a restart storm)
//! actions = ["ops-mail", "alertmanager"]
//!
//! [[memory]]
//! measure = "rss"                      # rss | uss | pss
//! limit = "512MB"                      # bytes, or with kb/mb/gb (1024-based, like memmon)
//! scope = "worker"                     # worker | job (summed)
//! signal = "SIGTERM"                   # optional: sent to the worker (job scope: the largest)
//! grace_seconds = 60                   # at most one signal per worker per grace period
//! actions = ["ops-mail"]
//!
//! [[threshold]]
//! series = 'http_requests_in_flight'   # a sample name, optionally {label="value",…}
//! op = ">="                            # >= or <=
//! value = 100
//! rate_seconds = 60                    # at most one alarm per series per this many seconds
//! message = "{series} is {value} (limit {threshold})"
//! actions = ["alertmanager"]
//! ```
//!
//! Every `*_seconds` key is parsed into a [`Seconds`] (a `Duration` of 0 to one year) when the
//! file is loaded: a value out of range is a configuration error naming the key, never a panic
//! in the alarm task later.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::parsed::{one_line, seconds_key};
pub use crate::parsed::{Seconds, Selector};

/// The whole configuration file (`--config`): the alarm sections, and the sections of the
/// features that share the file and its SIGHUP reload — `[[metric]]` ([`crate::derived`]),
/// `[[push]]` ([`crate::push`]) and `[[uwsgi_stats]]` ([`crate::uwsgi_stats`]), whose types live in
/// their modules.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlarmConfig {
    /// Seconds between evaluations of memory and threshold rules.
    #[serde(default = "default_check", deserialize_with = "check_interval_seconds")]
    pub check_interval_seconds: Seconds,
    /// Named actions.
    #[serde(default)]
    pub actions: BTreeMap<String, ActionConfig>,
    /// Crash alarms.
    pub crash: Option<CrashRule>,
    /// Fatal alarms.
    pub fatal: Option<FatalRule>,
    /// Memory alarms.
    #[serde(default)]
    pub memory: Vec<MemoryRule>,
    /// Threshold alarms.
    #[serde(default)]
    pub threshold: Vec<ThresholdRule>,
    /// Derived metrics (uWSGI's `--metric`), computed on the merged view.
    #[serde(default)]
    pub metric: Vec<crate::derived::MetricSpec>,
    /// Stats pushers (uWSGI's `--stats-push`).
    #[serde(default)]
    pub push: Vec<crate::push::PushSpec>,
    /// uWSGI stats servers to poll.
    #[serde(default)]
    pub uwsgi_stats: Vec<crate::uwsgi_stats::StatsSpec>,
    /// System pollsters (procagent's; node_exporter's names).
    pub pollsters: Option<crate::pollsters::PollstersSpec>,
    /// URLs to check, and what to do when they fail (superlance's httpok).
    #[serde(default)]
    pub httpok: Vec<super::httpok::HttpokRule>,
}

fn default_check() -> Seconds {
    Seconds::from_secs(5)
}

/// One action.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ActionConfig {
    /// Run a command with the message on its standard input.
    Command {
        /// Program and arguments.
        command: Vec<String>,
        /// Start stdin with `To:` and `Subject:` lines and a blank line (for `sendmail -t`).
        #[serde(default)]
        headers: bool,
        /// The `To:` address when `headers` is set.
        #[serde(default)]
        to: Option<String>,
        /// Delivery settings.
        #[serde(flatten)]
        delivery: Delivery,
    },
    /// POST JSON to a URL.
    Webhook {
        /// The URL (http://).
        url: String,
        /// `json` (our events) or `alertmanager` (Alertmanager's `/api/v2/alerts` body).
        #[serde(default)]
        format: WebhookFormat,
        /// Delivery settings.
        #[serde(flatten)]
        delivery: Delivery,
    },
    /// Write the alarm to the aggregator's log.
    Log {
        /// Delivery settings.
        #[serde(flatten)]
        delivery: Delivery,
    },
}

impl ActionConfig {
    /// Its delivery settings.
    pub fn delivery(&self) -> &Delivery {
        match self {
            ActionConfig::Command { delivery, .. }
            | ActionConfig::Webhook { delivery, .. }
            | ActionConfig::Log { delivery } => delivery,
        }
    }
}

/// Body formats of a webhook.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"events": [...]}`.
    #[default]
    Json,
    /// Prometheus Alertmanager's v2 API: an array of alerts.
    Alertmanager,
}

/// How an action delivers: batching, timeout, retries.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Delivery {
    /// Collect events for this many seconds and send them as one message (0: send each at once).
    #[serde(default, deserialize_with = "batch_seconds")]
    pub batch_seconds: Seconds,
    /// Give up one attempt after this many seconds.
    #[serde(default = "default_timeout", deserialize_with = "timeout_seconds")]
    pub timeout_seconds: Seconds,
    /// Retries after a failed attempt, with back-off (1 s, 2 s, 4 s, …).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout() -> Seconds {
    Seconds::from_secs(10)
}

fn default_retries() -> u32 {
    3
}

/// Crash alarms: a worker died without its clean-exit flag (killed, crashed, OOM).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CrashRule {
    /// Actions to run.
    pub actions: Vec<String>,
}

/// Fatal alarms: the job cannot stay up.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FatalRule {
    /// Alarm when no worker has been alive for this many seconds.
    #[serde(default, deserialize_with = "no_live_workers_seconds")]
    pub no_live_workers_seconds: Option<Seconds>,
    /// Alarm when more than this many crashes happen within `window_seconds`.
    pub max_crashes: Option<u32>,
    /// The window for `max_crashes`.
    #[serde(default = "default_window", deserialize_with = "window_seconds")]
    pub window_seconds: Seconds,
    /// Actions to run.
    pub actions: Vec<String>,
}

fn default_window() -> Seconds {
    Seconds::from_secs(60)
}

/// Which memory figure a rule watches.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Resident set size.
    Rss,
    /// Unique set size.
    Uss,
    /// Proportional set size.
    Pss,
}

/// Per worker or summed over the job.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each worker against the limit.
    #[default]
    Worker,
    /// The sum over the job's processes against the limit.
    Job,
}

/// Memory alarms (memmon).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRule {
    /// Which figure.
    pub measure: Measure,
    /// The limit: bytes, or a string with kb/mb/gb (1024-based).
    pub limit: Size,
    /// Per worker or job.
    #[serde(default)]
    pub scope: Scope,
    /// A signal to send to the offending worker (job scope: the largest), e.g. `SIGTERM`.
    pub signal: Option<SignalName>,
    /// At most one signal (and one alarm) per worker per this many seconds.
    #[serde(default = "default_grace", deserialize_with = "grace_seconds")]
    pub grace_seconds: Seconds,
    /// Actions to run.
    pub actions: Vec<String>,
}

fn default_grace() -> Seconds {
    Seconds::from_secs(60)
}

/// A size in bytes, written as a number or as `"512MB"`, `"2gb"`, `"100kb"` (1024-based).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(try_from = "SizeRepr")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = String;
    fn try_from(r: SizeRepr) -> std::result::Result<Size, String> {
        match r {
            SizeRepr::Bytes(b) => Ok(Size(b)),
            SizeRepr::Text(t) => parse_size(&t).map(Size).ok_or_else(|| {
                format!("{t:?} is not a size: write bytes, or a number with kb, mb or gb (1024-based)")
            }),
        }
    }
}

/// Parses `512`, `512b`, `100kb`, `512MB`, `2 gb`, `1.5GB` (1024-based, like superlance's memmon).
pub fn parse_size(t: &str) -> Option<u64> {
    let t = t.trim().to_ascii_lowercase();
    let (num, mult) = [
        ("gb", 1u64 << 30),
        ("mb", 1 << 20),
        ("kb", 1 << 10),
        ("g", 1 << 30),
        ("m", 1 << 20),
        ("k", 1 << 10),
        ("b", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some((v * mult as f64) as u64)
}

seconds_key!(check_interval_seconds, true);
seconds_key!(batch_seconds, false);
seconds_key!(timeout_seconds, true);
seconds_key!(no_live_workers_seconds, false, opt);
seconds_key!(window_seconds, false);
seconds_key!(grace_seconds, false);
seconds_key!(rate_seconds, false);

/// Comparison of a threshold rule.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Op {
    /// Alarm when the value is at least the threshold.
    #[serde(rename = ">=")]
    AtLeast,
    /// Alarm when the value is at most the threshold.
    #[serde(rename = "<=")]
    AtMost,
}

/// Threshold alarms on any merged series (uWSGI's `metric-alarm`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// The sample, as exposed: `name` or `name{label="value",…}` (a subset of its labels).
    pub series: Selector,
    /// `>=` or `<=`.
    pub op: Op,
    /// The threshold.
    pub value: f64,
    /// At most one alarm per matching series per this many seconds.
    #[serde(default, deserialize_with = "rate_seconds")]
    pub rate_seconds: Seconds,
    /// Message template: `{series}`, `{value}`, `{threshold}`, `{op}`.
    #[serde(default = "default_message")]
    pub message: String,
    /// Actions to run.
    pub actions: Vec<String>,
}

fn default_message() -> String {
    "{series} is {value} ({op} {threshold})".into()
}

impl AlarmConfig {
    /// Parses and checks a configuration (every referenced action exists, signals are known,
    /// intervals are positive, series selectors parse).
    pub fn parse(text: &str) -> Result<AlarmConfig> {
        let c: AlarmConfig = toml::from_str(text).map_err(|e| Error::Config(one_line(text, &e)))?;
        c.check()?;
        Ok(c)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<AlarmConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        AlarmConfig::parse(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        crate::derived::check(&self.metric).map_err(Error::Config)?;
        crate::uwsgi_stats::check(&self.uwsgi_stats).map_err(Error::Config)?;
        crate::push::check_all(&self.push).map_err(Error::Config)?;
        super::httpok::check(&self.httpok, &self.actions).map_err(Error::Config)?;
        let mut refs: Vec<(&str, &Vec<String>)> = Vec::new();
        if let Some(c) = &self.crash {
            refs.push(("[crash]", &c.actions));
        }
        if let Some(f) = &self.fatal {
            // Actions alone are fine: they route supervisord's FATAL events (supervisor-listener).
            refs.push(("[fatal]", &f.actions));
        }
        for m in &self.memory {
            refs.push(("[[memory]]", &m.actions));
        }
        for t in &self.threshold {
            refs.push(("[[threshold]]", &t.actions));
        }
        for (section, actions) in refs {
            if actions.is_empty() {
                return bad(format!("{section} has no actions"));
            }
            for a in actions {
                if !self.actions.contains_key(a) {
                    return bad(format!(
                        "{section} refers to action {a:?}, which is not defined under [actions]"
                    ));
                }
            }
        }
        for (name, a) in &self.actions {
            if let ActionConfig::Command { command, headers, to, .. } = a {
                if command.is_empty() {
                    return bad(format!("[actions.{name}]: command is empty"));
                }
                if *headers && to.as_deref().is_none_or(str::is_empty) {
                    return bad(format!("[actions.{name}]: headers = true needs a `to` address"));
                }
            }
            if let ActionConfig::Webhook { url, .. } = a {
                if !url.starts_with("http://") {
                    return bad(format!("[actions.{name}]: only http:// URLs are supported"));
                }
            }
        }
        Ok(())
    }
}

/// Parses a signal name (`SIGTERM`, `TERM`, `sigterm`).
pub fn parse_signal(s: &str) -> Option<nix::sys::signal::Signal> {
    let up = s.trim().to_ascii_uppercase();
    let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
    name.parse().ok()
}

/// A signal, parsed when the configuration is loaded (`SIGTERM`, `TERM`, `sigterm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SignalName(pub nix::sys::signal::Signal);

impl TryFrom<String> for SignalName {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<SignalName, String> {
        parse_signal(&s)
            .map(SignalName)
            .ok_or_else(|| format!("{s:?} is not a signal name (e.g. \"SIGTERM\")"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signals_and_selectors_are_parsed_once_at_load() {
        let text = "[actions.a]\ntype = \"log\"\n[[memory]]\nmeasure = \"rss\"\nlimit = \"1GB\"\nsignal = \"term\"\nactions = [\"a\"]\n[[threshold]]\nseries = 'x_total{a=\"b\"}'\nop = \">=\"\nvalue = 1\nactions = [\"a\"]\n";
        let c = AlarmConfig::parse(text).expect("config");
        assert_eq!(c.memory[0].signal, Some(SignalName(nix::sys::signal::Signal::SIGTERM)));
        let sel = &c.threshold[0].series;
        assert_eq!(
            (sel.name.as_str(), sel.labels.clone()),
            ("x_total", vec![("a".to_string(), "b".to_string())])
        );
        let bad = AlarmConfig::parse(&text.replace("\"term\"", "\"SIGFOO\"")).expect_err("signal");
        assert!(bad.to_string().contains("\"SIGFOO\" is not a signal name (e.g. \"SIGTERM\")"), "{bad}");
        let bad = AlarmConfig::parse(&text.replace("x_total{a=\"b\"}", "x{a=b}")).expect_err("series");
        assert!(bad.to_string().contains("write name or name{label=\"value\"}"), "{bad}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MB"), Some(512 << 20));
        assert_eq!(parse_size("2 gb"), Some(2 << 30));
        assert_eq!(parse_size("100kb"), Some(102400));
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.strip_prefix("//! ").or_else(|| l.strip_prefix("//!")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = AlarmConfig::parse(&example).expect("example");
        assert_eq!(c.memory[0].limit, Size(512 << 20));
        assert_eq!(c.threshold[0].op, Op::AtLeast);
        assert_eq!(c.actions.len(), 2);
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = AlarmConfig::parse(include_str!("../../conf/shmetrics.toml")).expect("conf/shmetrics.toml");
        assert_eq!(c.threshold.len(), 4);
        assert_eq!(c.fatal.as_ref().and_then(|f| f.max_crashes), Some(5));
        assert_eq!(c.metric.len(), 6, "every collector and an alias");
        assert_eq!(c.uwsgi_stats.len(), 2);
        assert_eq!(c.push.len(), 3);
        assert_eq!(c.httpok.len(), 1);
        assert_eq!(c.httpok[0].failures, crate::alarm::httpok::Failures(3));
        let p = c.pollsters.as_ref().expect("[pollsters]");
        assert_eq!((p.interval_seconds, p.enabled.len()), (crate::parsed::Seconds::from_secs(10), 6));
    }

    /// Each seconds key, in a file where it is the only mistake (`{}` is its value).
    const SECONDS_KEYS: [(&str, &str, bool); 7] = [
        ("check_interval_seconds", "check_interval_seconds = {}\n", true),
        ("batch_seconds", "[actions.a]\ntype = \"log\"\nbatch_seconds = {}\n", false),
        ("timeout_seconds", "[actions.a]\ntype = \"log\"\ntimeout_seconds = {}\n", true),
        ("no_live_workers_seconds", "[actions.a]\ntype = \"log\"\n[fatal]\nno_live_workers_seconds = {}\nactions = [\"a\"]\n", false),
        ("window_seconds", "[actions.a]\ntype = \"log\"\n[fatal]\nmax_crashes = 1\nwindow_seconds = {}\nactions = [\"a\"]\n", false),
        ("grace_seconds", "[actions.a]\ntype = \"log\"\n[[memory]]\nmeasure = \"rss\"\nlimit = 1\ngrace_seconds = {}\nactions = [\"a\"]\n", false),
        ("rate_seconds", "[actions.a]\ntype = \"log\"\n[[threshold]]\nseries = \"x\"\nop = \">=\"\nvalue = 1\nrate_seconds = {}\nactions = [\"a\"]\n", false),
    ];

    #[test]
    fn seconds_out_of_range_are_refused_at_load_naming_the_key() {
        for (key, template, positive) in SECONDS_KEYS {
            AlarmConfig::parse(&template.replace("{}", "1.5")).unwrap_or_else(|e| panic!("{key} = 1.5: {e}"));
            let mut bad = vec!["inf", "-inf", "1e20", "-1", "nan", "31536000.5", "\"60\""];
            if positive {
                bad.push("0");
            }
            let allowed = if positive {
                "write a number of seconds more than 0 and at most 31536000 (one year)"
            } else {
                "write a number of seconds from 0 to 31536000 (one year)"
            };
            for v in bad {
                let e = match AlarmConfig::parse(&template.replace("{}", v)) {
                    Ok(c) => panic!("{key} = {v} accepted: {c:?}"),
                    Err(e) => e.to_string(),
                };
                assert!(e.contains(&format!("{key} = {v} is not allowed")), "{key} = {v}: {e}");
                assert!(e.contains(allowed), "{key} = {v}: {e}");
            }
        }
    }

    #[test]
    fn seconds_are_durations() {
        let c = AlarmConfig::parse(
            "check_interval_seconds = 0.25\n[actions.a]\ntype = \"log\"\nbatch_seconds = 31536000\n\
             timeout_seconds = 1e-3\n[fatal]\nno_live_workers_seconds = 0\nwindow_seconds = 90\n\
             actions = [\"a\"]\n",
        )
        .expect("config");
        assert_eq!(c.check_interval_seconds.get(), Duration::from_millis(250));
        let d = c.actions["a"].delivery();
        assert_eq!((d.batch_seconds, d.timeout_seconds.get()), (Seconds::MAX, Duration::from_millis(1)));
        let f = c.fatal.expect("fatal");
        assert_eq!(f.no_live_workers_seconds, Some(Seconds::from_secs(0)));
        assert_eq!(f.window_seconds.get(), Duration::from_secs(90));
        // Defaults.
        let c = AlarmConfig::parse("").expect("empty");
        assert_eq!(c.check_interval_seconds, Seconds::from_secs(5));
        assert_eq!(Seconds::from_secs(u64::MAX), Seconds::MAX);
        assert_eq!(Seconds::parse_positive("2"), Ok(Duration::from_secs(2)));
        for bad in ["0", "-1", "inf", "nan", "1e20", "x"] {
            let e = Seconds::parse_positive(bad).expect_err(bad);
            assert!(e.contains("more than 0 and at most 31536000 (one year)"), "{bad}: {e}");
        }
    }

    #[test]
    fn mistakes_are_explained() {
        let e = AlarmConfig::parse("[crash]\nactions = [\"nope\"]\n").unwrap_err().to_string();
        assert!(e.contains("\"nope\", which is not defined"), "{e}");
        let e = AlarmConfig::parse("[crash]\nactoins = []\n").unwrap_err().to_string();
        assert!(e.contains("actoins"), "{e}");
    }
}
