//! superlance's httpok: GET a URL on an interval and, when the answer is wrong or late too many
//! times in a row, signal the application and raise an alarm (`[[httpok]]`).
//!
//! # Why
//!
//! A process can be alive and still useless: deadlocked, every worker stuck on a dead database, an
//! event loop blocked. Exits and memory do not show it; only asking it over HTTP does. superlance's
//! httpok asks on supervisord's TICK events and restarts the processes through supervisord's
//! XML-RPC, as one more event listener to deploy per URL. The aggregator already runs next to the
//! application (under `shmetrics run` it is its parent, and knows its pid), so it asks itself, and
//! the answers become metrics like any other: thresholds and pushers see them.
//!
//! # How
//!
//! - One checker task per `[[httpok]]` section. Every `interval_seconds` (the first check
//!   `start_seconds` after the aggregator started, by default one interval: the application's time
//!   to come up, as supervisord checks only RUNNING processes) it GETs the URL; resolving,
//!   connecting and reading the answer must all end within `timeout_seconds`. The result is one of
//!   a fixed set, the `result` label of `shmetrics_httpok_checks_total{url,result}`:
//!   `ok`; `connect_error` (refused, unreachable, unknown host); `timeout` (no whole answer in
//!   time: an application that accepts and never answers); `status` (not in `expect_status`,
//!   by default any 2xx); `body` (the first [`MAX_BODY`] bytes of the body do not contain
//!   `expect_body`); `protocol_error` (the connection closed without an answer, or it is not HTTP).
//! - After `failures` failed checks in a row, and at every failed check after that, the rule
//!   *acts*: it sends `signal` to the target and raises an `httpok` alarm to `actions` — at most
//!   once per `grace_seconds`, the application's time to restart. An act held back by the grace
//!   period is counted as suppressed (`shmetrics_alarms_suppressed_total{kind="httpok"}`); every
//!   failure is still counted and logged. A success resets the count of failures in a row.
//! - The target: the pid in `pidfile`, read at each act (opened without following a link or
//!   blocking, a regular file of ours or root's — a pid file another user can write could name
//!   any process — at most [`MAX_PIDFILE`] bytes, a whole number that is neither 0, 1 nor our own
//!   pid); else, under `shmetrics run`, the command's pid ([`ChildPid`], filled in by `run` once it
//!   started the command and emptied when it exited). A pid that cannot be had, or a signal that
//!   cannot be sent, is logged and counted (`shmetrics_httpok_signal_errors_total`), and the alarm
//!   says why. Under `shmetrics serve` there is no command: a rule with `signal` and no `pidfile`
//!   is refused at start, and at a reload (which keeps the configuration in force) ([`check_targets`]).
//! - [`Checkers`] is a job [`Source`]: the counters are copied from memory inside each merge, so a
//!   check that hangs never delays a scrape, and each rule's own task never delays another rule.
//!
//! Reload (SIGHUP): a rule (known by its URL) that stays the same keeps its task; a changed one
//! restarts, keeping its counters, its count of failures in a row and its grace period; a removed
//! one stops and its series go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Deserialize;

use super::config::{ActionConfig, SignalName};
use super::rules::{in_grace, send_signal};
use super::{Event, EventKind, Pipeline};
use crate::client::{Answer, Exchange};
use crate::job::{Job, Source};
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Value};
use crate::parsed::{seconds_key, Seconds};
use crate::uwsgi_stats::Conn;

/// The most bytes of a body searched for `expect_body`: 1 MiB. A health page is small; this keeps
/// an endless or huge answer from filling memory.
pub const MAX_BODY: usize = 1 << 20;

/// The longest pid file read: a pid and a newline, with room for spaces.
pub const MAX_PIDFILE: usize = 32;

/// The `User-Agent` of the checks.
const USER_AGENT: &str = "shmetrics-httpok";

/// One `[[httpok]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpokRule {
    /// The URL to GET (http://).
    pub url: HttpUrl,
    /// Seconds between checks (default 60, supervisord's TICK_60).
    #[serde(default = "default_interval", deserialize_with = "interval_seconds")]
    pub interval_seconds: Seconds,
    /// A check (resolve, connect, the whole answer) must end within this many seconds (default 10).
    #[serde(default = "default_timeout", deserialize_with = "timeout_seconds")]
    pub timeout_seconds: Seconds,
    /// Seconds from the aggregator's start to the first check (default: one interval).
    #[serde(default, deserialize_with = "start_seconds")]
    pub start_seconds: Option<Seconds>,
    /// The status codes that pass (default: any 2xx).
    #[serde(default)]
    pub expect_status: ExpectStatus,
    /// Text the body must contain (default: any body).
    #[serde(default)]
    pub expect_body: Option<BodyText>,
    /// Failed checks in a row before acting (default 3).
    #[serde(default)]
    pub failures: Failures,
    /// A signal for the target (the command under `shmetrics run`, or the pid in `pidfile`), e.g.
    /// `SIGHUP` for gunicorn's graceful reload.
    pub signal: Option<SignalName>,
    /// A file holding the pid to signal.
    pub pidfile: Option<PidfilePath>,
    /// At most one act (signal and alarm) per this many seconds (default 60).
    #[serde(default = "default_grace", deserialize_with = "grace_seconds")]
    pub grace_seconds: Seconds,
    /// Alarm actions (names under `[actions]`); may be empty when `signal` is given.
    #[serde(default)]
    pub actions: Vec<String>,
}

fn default_interval() -> Seconds {
    Seconds::from_secs(60)
}

fn default_timeout() -> Seconds {
    Seconds::from_secs(10)
}

fn default_grace() -> Seconds {
    Seconds::from_secs(60)
}

seconds_key!(interval_seconds, true);
seconds_key!(timeout_seconds, true);
seconds_key!(start_seconds, false, opt);
seconds_key!(grace_seconds, false);

/// An `http://` URL, taken apart when the configuration is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HttpUrl {
    /// As written (the `url` label).
    pub text: String,
    /// `host:port` as written (the `Host` header).
    authority: String,
    /// The host to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// Path and query, `/` at least.
    path: String,
}

impl TryFrom<String> for HttpUrl {
    type Error = String;
    fn try_from(text: String) -> Result<HttpUrl, String> {
        let example = "e.g. url = \"http://127.0.0.1:8000/health\"";
        let uri: hyper::Uri =
            text.parse().map_err(|e| format!("url = {text:?} is not a URL ({e}): write one, {example}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "url = {text:?}: only http:// URLs are supported (the aggregator carries no TLS \
                 stack; check the application's local port), {example}"
            ));
        }
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
            return Err(format!("url = {text:?} has no host: {example}"));
        };
        if authority.as_str().contains('@') {
            return Err(format!("url = {text:?}: user names and passwords are not supported, {example}"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Ok(HttpUrl {
            authority: authority.as_str().to_string(),
            host,
            port: uri.port_u16().unwrap_or(80),
            path: if path.is_empty() { "/".into() } else { path.to_string() },
            text,
        })
    }
}

/// The status codes that pass; empty: any 2xx.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct ExpectStatus(Vec<u16>);

impl TryFrom<toml::Value> for ExpectStatus {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<ExpectStatus, String> {
        let bad = |what: &dyn std::fmt::Display| {
            format!(
                "expect_status = {what} is not allowed: write a list of HTTP status codes from 100 \
                 to 599, e.g. expect_status = [200, 204] (leave it out for any 2xx)"
            )
        };
        let items = match &v {
            toml::Value::Integer(_) => vec![v.clone()],
            toml::Value::Array(a) if !a.is_empty() => a.clone(),
            _ => return Err(bad(&v)),
        };
        let mut codes = Vec::new();
        for item in &items {
            match item.as_integer().and_then(|n| u16::try_from(n).ok()).filter(|n| (100..=599).contains(n)) {
                Some(code) => codes.push(code),
                None => return Err(bad(&v)),
            }
        }
        Ok(ExpectStatus(codes))
    }
}

impl ExpectStatus {
    /// Whether `status` passes.
    pub fn allows(&self, status: u16) -> bool {
        if self.0.is_empty() {
            (200..=299).contains(&status)
        } else {
            self.0.contains(&status)
        }
    }
}

impl std::fmt::Display for ExpectStatus {
    /// `2xx`, or `200 or 204`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("2xx");
        }
        let codes: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&codes.join(" or "))
    }
}

/// Text the body must contain: not empty.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BodyText(pub String);

impl TryFrom<String> for BodyText {
    type Error = String;
    fn try_from(s: String) -> Result<BodyText, String> {
        if s.is_empty() {
            return Err("expect_body = \"\" is not allowed: write the text the answer must contain, \
                        or leave expect_body out"
                .into());
        }
        Ok(BodyText(s))
    }
}

/// Failed checks in a row before acting: 1 or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct Failures(pub u32);

impl Default for Failures {
    fn default() -> Failures {
        Failures(3)
    }
}

impl TryFrom<toml::Value> for Failures {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Failures, String> {
        v.as_integer().and_then(|n| u32::try_from(n).ok()).filter(|n| *n >= 1).map(Failures).ok_or_else(
            || {
                format!(
                    "failures = {v} is not allowed: write how many checks in a row must fail before \
                 acting, a whole number from 1 to {}",
                    u32::MAX
                )
            },
        )
    }
}

/// A pid file's path: absolute (the aggregator's working directory is not the application's).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PidfilePath(pub PathBuf);

impl TryFrom<String> for PidfilePath {
    type Error = String;
    fn try_from(s: String) -> Result<PidfilePath, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "pidfile = {s:?}: write an absolute path, e.g. pidfile = \"/run/app/app.pid\""
            ));
        }
        Ok(PidfilePath(PathBuf::from(s)))
    }
}

/// Checks the sections against each other and the actions (from `AlarmConfig::check`): each has
/// `actions` or `signal` (or both), every action exists, `pidfile` comes with a `signal`, and no
/// URL is checked twice (its series would be one another's).
pub(crate) fn check(rules: &[HttpokRule], actions: &BTreeMap<String, ActionConfig>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for r in rules {
        let url = &r.url.text;
        if !seen.insert(url.as_str()) {
            return Err(format!("[[httpok]] url = {url:?} is checked by two sections: merge them into one"));
        }
        if r.actions.is_empty() && r.signal.is_none() {
            return Err(format!(
                "[[httpok]] url = {url:?} does nothing when it fails: give actions = [\"…\"] (alarm \
                 actions), signal = \"SIGHUP\" (or another signal), or both"
            ));
        }
        if r.pidfile.is_some() && r.signal.is_none() {
            return Err(format!(
                "[[httpok]] url = {url:?} has a pidfile but no signal: add signal = \"SIGHUP\" (or \
                 another signal), or remove pidfile"
            ));
        }
        for a in &r.actions {
            if !actions.contains_key(a) {
                return Err(format!(
                    "[[httpok]] url = {url:?} refers to action {a:?}, which is not defined under \
                     [actions]"
                ));
            }
        }
    }
    Ok(())
}

/// Checks that every rule with a signal has a target: a `pidfile`, or the command of `shmetrics
/// run` (`under_run`).
pub(crate) fn check_targets(rules: &[HttpokRule], under_run: bool) -> Result<(), String> {
    if under_run {
        return Ok(());
    }
    match rules.iter().find(|r| r.signal.is_some() && r.pidfile.is_none()) {
        Some(r) => Err(format!(
            "[[httpok]] url = {:?} has signal = \"{}\" but nothing to send it to: under `shmetrics \
             serve` there is no command, so give pidfile = \"/path/to/app.pid\", or run the \
             application under `shmetrics run`",
            r.url.text,
            r.signal.map_or(String::new(), |s| s.0.to_string())
        )),
        None => Ok(()),
    }
}

/// The pid of `shmetrics run`'s command, shared with the checkers: 0 while there is none (before
/// it started, after it exited: a pid of a process gone may already be another's).
#[derive(Debug, Default)]
pub(crate) struct ChildPid(AtomicI32);

impl ChildPid {
    /// The command runs as `pid`.
    pub(crate) fn set(&self, pid: u32) {
        self.0.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
    }

    /// The command has exited.
    pub(crate) fn clear(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    fn get(&self) -> Option<i32> {
        Some(self.0.load(Ordering::SeqCst)).filter(|p| *p > 0)
    }
}

/// Reads the pid in a pid file (see the module doc for what is refused).
pub(crate) fn read_pidfile(path: &Path) -> Result<i32, String> {
    use crate::trust::{open_read, Refused, Trust};
    let name = path.display();
    // Ours, or root's.
    let (file, _) = open_read(path, &Trust::new(0)).map_err(|e| match e {
        Refused::Gone => format!("pidfile {name} does not exist (is the application running?)"),
        e => format!("pidfile {name}: {e}"),
    })?;
    let mut text = Vec::new();
    file.take(MAX_PIDFILE as u64 + 1).read_to_end(&mut text).map_err(|e| format!("pidfile {name}: {e}"))?;
    if text.len() > MAX_PIDFILE {
        return Err(format!("pidfile {name} is longer than {MAX_PIDFILE} bytes: not a pid file"));
    }
    let s = String::from_utf8_lossy(&text);
    let s = s.trim();
    let pid = s
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse::<i32>().ok())
        .flatten()
        .ok_or_else(|| format!("pidfile {name} holds {s:?}, not a pid"))?;
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(format!("pidfile {name} holds pid {pid}, which is never signalled"));
    }
    Ok(pid)
}

/// What a check found: the `result` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The answer passed.
    Ok,
    /// Could not connect: refused, unreachable, unknown host.
    ConnectError,
    /// No whole answer within `timeout_seconds`.
    Timeout,
    /// A status not in `expect_status`.
    Status,
    /// The body lacks `expect_body`.
    Body,
    /// The connection closed without an answer, or the answer is not HTTP.
    ProtocolError,
}

impl Outcome {
    /// Every outcome, in the order of the counters.
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::ConnectError,
        Outcome::Timeout,
        Outcome::Status,
        Outcome::Body,
        Outcome::ProtocolError,
    ];

    /// The `result` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ConnectError => "connect_error",
            Outcome::Timeout => "timeout",
            Outcome::Status => "status",
            Outcome::Body => "body",
            Outcome::ProtocolError => "protocol_error",
        }
    }
}

/// A failed check: what kind, and why, for the log and the alarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) outcome: Outcome,
    pub(crate) reason: String,
}

fn fail(outcome: Outcome, reason: String) -> Failure {
    Failure { outcome, reason }
}

/// GETs the URL: the answer (status and at most [`MAX_BODY`] bytes of body), without a timeout.
async fn fetch(url: &HttpUrl, conn: &mut Conn) -> Result<Answer, Failure> {
    let addrs = conn.resolve(&url.host, url.port).await.map_err(|e| fail(Outcome::ConnectError, e))?;
    let mut last = format!("{} has no address", url.host);
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(stream) => {
                let exchange = Exchange {
                    method: hyper::Method::GET,
                    authority: &url.authority,
                    path: &url.path,
                    user_agent: USER_AGENT,
                    body_limit: Some(MAX_BODY),
                };
                return exchange
                    .run(stream, None)
                    .await
                    .map_err(|e| fail(Outcome::ProtocolError, format!("no HTTP answer: {e}")));
            }
            Err(e) => last = format!("cannot connect to {a}: {e}"),
        }
    }
    Err(fail(Outcome::ConnectError, last))
}

/// One check of a rule: GET within the timeout, then the status and the body.
pub(crate) async fn check_once(rule: &HttpokRule, conn: &mut Conn) -> Result<(), Failure> {
    let answer = match tokio::time::timeout(rule.timeout_seconds.get(), fetch(&rule.url, conn)).await {
        Ok(a) => a?,
        Err(_) => return Err(fail(Outcome::Timeout, format!("no answer within {} s", rule.timeout_seconds))),
    };
    if !rule.expect_status.allows(answer.status) {
        return Err(fail(
            Outcome::Status,
            format!("status {}, expected {}", answer.status, rule.expect_status),
        ));
    }
    if let Some(BodyText(text)) = &rule.expect_body {
        let needle = text.as_bytes();
        if !answer.body.windows(needle.len()).any(|w| w == needle) {
            return Err(fail(Outcome::Body, format!("the body does not contain {text:?}")));
        }
    }
    Ok(())
}

/// A rule's counters and state, shared by its task and [`Checkers::families`], kept across
/// reloads.
struct Shared {
    created: Instant,
    url: Arc<LabelSet>,
    /// `{url, result}` for each of [`Outcome::ALL`].
    results: Vec<Arc<LabelSet>>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    checks: [u64; Outcome::ALL.len()],
    signals: u64,
    signal_errors: u64,
    /// `None` before the first check ended.
    up: Option<bool>,
    in_a_row: u32,
    last_act: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(url: &str) -> Shared {
        Shared {
            created: Instant::now(),
            url: LabelSet::shared(&[("url", url)]),
            results: Outcome::ALL
                .iter()
                .map(|o| LabelSet::shared(&[("url", url), ("result", o.as_str())]))
                .collect(),
            counts: Mutex::new(Counts::default()),
        }
    }
}

/// What a checker needs besides its rule.
#[derive(Clone, Default)]
struct Ctx {
    pipeline: Option<Arc<Pipeline>>,
    child: Option<Arc<ChildPid>>,
}

impl Ctx {
    /// The pid to signal: the pid file's, or the command's.
    fn target(&self, rule: &HttpokRule) -> Result<i32, String> {
        if let Some(PidfilePath(path)) = &rule.pidfile {
            return read_pidfile(path);
        }
        match &self.child {
            Some(c) => c.get().ok_or_else(|| "the command is not running".to_string()),
            None => Err("no pidfile, and no command (`shmetrics serve`)".into()),
        }
    }
}

/// Counts a check's result, and acts when it is time to (see the module doc).
fn record(rule: &HttpokRule, shared: &Shared, ctx: &Ctx, result: Result<(), Failure>) {
    let url = &rule.url.text;
    let mut c = lock(&shared.counts);
    let f = match result {
        Ok(()) => {
            c.checks[0] += 1;
            if c.up == Some(false) {
                tracing::info!(url = %url, "httpok: GET {url} answers again ({} failed checks in a row before)", c.in_a_row);
            }
            c.up = Some(true);
            c.in_a_row = 0;
            return;
        }
        Err(f) => f,
    };
    if let Some(i) = Outcome::ALL.iter().position(|o| *o == f.outcome) {
        c.checks[i] += 1;
    }
    c.up = Some(false);
    c.in_a_row = c.in_a_row.saturating_add(1);
    let n = c.in_a_row;
    let needed = rule.failures.0;
    tracing::warn!(url = %url, "httpok: GET {url}: {} ({n} failed checks in a row; {needed} act)", f.reason);
    if n < needed {
        return;
    }
    let now = Instant::now();
    if in_grace(c.last_act, now, rule.grace_seconds.get()) {
        drop(c);
        tracing::info!(
            url = %url,
            "httpok: {url}: no signal and no alarm within grace_seconds = {} of the last",
            rule.grace_seconds
        );
        if let Some(p) = &ctx.pipeline {
            p.suppressed(EventKind::Httpok);
        }
        return;
    }
    c.last_act = Some(now);
    let checks = if n == 1 { "check" } else { "checks" };
    let mut msg = format!("GET {url}: {n} failed {checks} in a row, the last: {}", f.reason);
    let mut pid = None;
    if let Some(SignalName(sig)) = rule.signal {
        let sent = ctx.target(rule).and_then(|p| {
            pid = Some(p);
            send_signal(p, sig)
        });
        match sent {
            Ok(note) => {
                c.signals += 1;
                tracing::warn!(url = %url, "httpok: {url}: {note}");
                msg.push_str(&format!("; {note}"));
            }
            Err(e) => {
                c.signal_errors += 1;
                tracing::error!(url = %url, "httpok: {url}: no {sig} sent: {e}");
                msg.push_str(&format!("; no {sig} sent: {e}"));
            }
        }
    }
    drop(c);
    if rule.actions.is_empty() {
        return;
    }
    let Some(p) = &ctx.pipeline else { return };
    let mut ev = Event::now(EventKind::Httpok, url.clone(), msg, &rule.actions)
        .label("url", url.clone())
        .label("reason", f.outcome.as_str());
    if let Some(pid) = pid {
        ev = ev.label("pid", pid.to_string());
    }
    p.submit(ev);
}

/// A checker's task: checks every `interval_seconds` until aborted.
async fn run(rule: HttpokRule, shared: Arc<Shared>, ctx: Ctx) {
    let first = shared.created + rule.start_seconds.unwrap_or(rule.interval_seconds).get();
    tokio::time::sleep_until(first.into()).await;
    let mut tick = tokio::time::interval(rule.interval_seconds.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = Conn::default();
    loop {
        tick.tick().await;
        let result = check_once(&rule, &mut conn).await;
        record(&rule, &shared, &ctx, result);
    }
}

/// One running checker.
struct Checker {
    rule: HttpokRule,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

// Indexes into the metas of [`Checkers`].
const CHECKS: usize = 0;
const SIGNALS: usize = 1;
const SIGNAL_ERRORS: usize = 2;
const UP: usize = 3;

/// The checkers of every `[[httpok]]` section; a [`Source`] of the job.
pub(crate) struct Checkers {
    runtime: Option<tokio::runtime::Handle>,
    metas: [Arc<FamilyMeta>; 4],
    ctx: Ctx,
    checkers: Mutex<Vec<Checker>>,
}

impl Checkers {
    /// Starts checking (on the current tokio runtime) and registers with the job. `child` is
    /// `shmetrics run`'s handle on its command's pid (`None` under `serve`); a rule without a
    /// target is refused ([`check_targets`]).
    pub(crate) fn start(
        job: &Arc<Job>,
        pipeline: Option<Arc<Pipeline>>,
        child: Option<Arc<ChildPid>>,
        rules: &[HttpokRule],
    ) -> Result<Arc<Checkers>, String> {
        check_targets(rules, child.is_some())?;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            FamilyMeta::own(name, help, MetricType::Counter, ValueType::U64, labels)
        };
        let metas = [
            counter("shmetrics_httpok_checks", "httpok checks of a URL, by result.", &["url", "result"]),
            counter("shmetrics_httpok_signals", "Signals sent because a URL failed its checks.", &["url"]),
            counter(
                "shmetrics_httpok_signal_errors",
                "Signals not sent (no pid, a bad pid file, kill failed) when a URL failed its checks.",
                &["url"],
            ),
            FamilyMeta::own(
                "shmetrics_httpok_up",
                "Whether the last httpok check of a URL passed (1) or not (0).",
                MetricType::Gauge,
                ValueType::F64,
                &["url"],
            ),
        ];
        let checkers = Arc::new(Checkers {
            runtime: tokio::runtime::Handle::try_current().ok(),
            metas,
            ctx: Ctx { pipeline, child },
            checkers: Mutex::new(Vec::new()),
        });
        checkers.reload(rules)?;
        job.add_source(Arc::clone(&checkers) as Arc<dyn Source>);
        Ok(checkers)
    }

    /// Replaces the rules (SIGHUP): unchanged ones keep their tasks, changed ones restart (their
    /// counters and state continue), removed ones stop, new ones start. Refused, with nothing
    /// changed, when a rule has no target ([`check_targets`]).
    pub(crate) fn reload(&self, rules: &[HttpokRule]) -> Result<(), String> {
        self.check(rules)?;
        let mut checkers = lock(&self.checkers);
        let mut old: HashMap<String, Checker> =
            checkers.drain(..).map(|c| (c.rule.url.text.clone(), c)).collect();
        for rule in rules {
            let checker = match old.remove(&rule.url.text) {
                Some(c) if c.rule == *rule => c,
                Some(c) => self.spawn(rule.clone(), Arc::clone(&c.shared)),
                None => self.spawn(rule.clone(), Arc::new(Shared::new(&rule.url.text))),
            };
            checkers.push(checker);
        }
        // What is left in `old` is dropped here: those tasks are aborted.
        Ok(())
    }

    /// Whether `rules` can be loaded: every rule with a signal has a target.
    pub(crate) fn check(&self, rules: &[HttpokRule]) -> Result<(), String> {
        check_targets(rules, self.ctx.child.is_some())
    }

    fn spawn(&self, rule: HttpokRule, shared: Arc<Shared>) -> Checker {
        let task = match &self.runtime {
            Some(rt) => Some(rt.spawn(run(rule.clone(), Arc::clone(&shared), self.ctx.clone()))),
            None => {
                tracing::error!(url = %rule.url.text, "no tokio runtime: the URL is not checked");
                None
            }
        };
        Checker { rule, shared, task }
    }
}

impl Source for Checkers {
    /// The counters, copied: no I/O.
    fn families(&self) -> Vec<SnapFamily> {
        let mut all: [Vec<(Arc<LabelSet>, Value)>; 4] = Default::default();
        for ch in lock(&self.checkers).iter() {
            let s = &ch.shared;
            let c = lock(&s.counts);
            for (l, n) in s.results.iter().zip(c.checks) {
                all[CHECKS].push((Arc::clone(l), Value::U64(n)));
            }
            all[SIGNALS].push((Arc::clone(&s.url), Value::U64(c.signals)));
            all[SIGNAL_ERRORS].push((Arc::clone(&s.url), Value::U64(c.signal_errors)));
            if let Some(up) = c.up {
                all[UP].push((Arc::clone(&s.url), Value::F64(if up { 1.0 } else { 0.0 })));
            }
        }
        all.into_iter()
            .zip(&self.metas)
            .filter(|(series, _)| !series.is_empty())
            .map(|(series, meta)| SnapFamily { meta: Arc::clone(meta), series })
            .collect()
    }
}

#[cfg(test)]
mod tests;
