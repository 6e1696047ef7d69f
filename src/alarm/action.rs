//! Delivering alarms: a command with the message on stdin, a webhook (our JSON or Alertmanager's
//! v2 alerts), the log; batching, timeouts and retries.
//!
//! The dispatcher ([`run`]) owns the pending batches and never waits for a delivery: every
//! message is delivered on its own task, so a slow or hanging action delays neither the other
//! actions nor whoever submitted the event. At most [`MAX_CONCURRENT`] deliveries of one action
//! run at once; the others wait their turn (a crash storm without batching does not start
//! hundreds of `sendmail`s).
//!
//! - **Messages** are crashmail-like. One event: subject `shmetrics: <kind> <subject>`, body the
//!   event's message, then its kind, subject, time and labels. A batch of several events (an
//!   action with `batch_seconds > 0`, like crashmailbatch and fatalmailbatch): one message per
//!   window with subject `shmetrics: N alarms (kinds…)` and one body line per event.
//! - **Commands** get the message on stdin (with `headers = true`, preceded by `To:` and
//!   `Subject:` lines and a blank line, for `sendmail -t`), and the subject in the environment
//!   (`SHMETRICS_ALARM_SUBJECT`, also `SHMETRICS_ALARM_COUNT` and `SHMETRICS_ALARM_KINDS`), so
//!   `["sh", "-c", "mail -s \"$SHMETRICS_ALARM_SUBJECT\" ops@example.com"]` works. A command runs
//!   in its own process group, which is killed (SIGKILL) when an attempt exceeds
//!   `timeout_seconds`. A non-zero exit is a failure.
//! - **Webhooks** get an HTTP/1.1 POST of JSON: `{"events": [{kind, subject, message, at,
//!   labels}]}`, or with `format = "alertmanager"` the body of Alertmanager's `POST
//!   /api/v2/alerts` (an array of `postableAlert`s). Anything but a 2xx answer is a failure.
//! - **The log** gets a `WARN` line per message; it never fails.
//! - **Batching**: the window starts at the first event; `Msg::Flush` delivers every pending batch
//!   at once and answers when everything submitted before it has been delivered or given up.
//! - **Retries**: a failed attempt is retried after 1 s, 2 s, 4 s … (at most 60 s), `retries`
//!   times; then the message counts once in `failed[action]`. A delivered message counts once per
//!   event it carried in `fired[(kind, action)]`. An event naming an action that is not
//!   configured (any more) counts in `failed[action]` and is logged.
//! - **Reloads** take effect for the next delivery; a batch pending across a reload is still
//!   delivered at the end of its window, with the action's new settings if it still exists and
//!   with the ones it started with otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use super::config::{ActionConfig, Seconds, WebhookFormat};
use super::{AlarmConfig, AlarmStats, Event, EventKind, Msg};

/// Deliveries of one action running at once; more wait their turn.
pub const MAX_CONCURRENT: usize = 4;

/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How much of a failing command's stderr or a failing webhook's answer goes into the log.
const ERROR_TEXT: usize = 512;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Later than any batch deadline: a batch window is at most [`Seconds::MAX`] (one year).
fn far_future() -> Instant {
    Instant::now() + Seconds::MAX.get() + Seconds::MAX.get()
}

/// The pause before retry number `attempt + 1`: 1 s, 2 s, 4 s …, at most 60 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempt)).min(MAX_BACKOFF)
}

/// Runs the dispatcher until the pipeline is dropped; then delivers what is pending and waits for
/// the deliveries under way.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    config: watch::Receiver<Arc<AlarmConfig>>,
    stats: Arc<Mutex<AlarmStats>>,
) {
    let (in_flight, in_flight_rx) = mpsc::channel(1);
    let mut d = Dispatcher {
        config,
        stats,
        pending: BTreeMap::new(),
        permits: HashMap::new(),
        in_flight,
        in_flight_rx,
    };
    loop {
        let next = d.pending.values().map(|b| b.deadline).min();
        let due = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Event(e)) => d.event(e),
                Some(Msg::Flush(done)) => d.flush(done),
                None => break,
            },
            () = due => d.deliver_due(Instant::now()),
        }
    }
    d.deliver_due(far_future());
    let Dispatcher { in_flight, mut in_flight_rx, .. } = d;
    drop(in_flight);
    // `None` once every delivery task has dropped its guard.
    let _ = in_flight_rx.recv().await;
}

/// Events waiting for the end of their action's window.
struct Batch {
    events: Vec<Event>,
    deadline: Instant,
    /// The action's settings when the window started (used if a reload removes the action).
    action: ActionConfig,
}

struct Dispatcher {
    config: watch::Receiver<Arc<AlarmConfig>>,
    stats: Arc<Mutex<AlarmStats>>,
    pending: BTreeMap<String, Batch>,
    permits: HashMap<String, Arc<Semaphore>>,
    /// Every delivery task holds a clone until it ends; a flush swaps in a new channel and waits
    /// for the old one to close (see [`Dispatcher::flush`]).
    in_flight: mpsc::Sender<()>,
    in_flight_rx: mpsc::Receiver<()>,
}

impl Dispatcher {
    fn event(&mut self, e: Event) {
        let config = Arc::clone(&self.config.borrow());
        if e.actions.is_empty() {
            tracing::debug!(kind = e.kind.as_str(), "alarm without actions: {}", e.message);
        }
        let names: BTreeSet<&String> = e.actions.iter().collect();
        for name in names {
            let Some(action) = config.actions.get(name) else {
                tracing::warn!(
                    action = %name,
                    kind = e.kind.as_str(),
                    "alarm for action {name:?}, which is not configured (any more): not delivered, \
                     counted as failed: {} {}: {}",
                    e.kind.as_str(),
                    e.subject,
                    e.message
                );
                *lock(&self.stats).failed.entry(name.clone()).or_default() += 1;
                continue;
            };
            let window = action.delivery().batch_seconds.get();
            if !window.is_zero() {
                if let Some(b) = self.pending.get_mut(name) {
                    b.events.push(e.clone());
                } else {
                    let batch = Batch {
                        events: vec![e.clone()],
                        deadline: Instant::now() + window,
                        action: action.clone(),
                    };
                    self.pending.insert(name.clone(), batch);
                }
            } else {
                self.spawn(name.clone(), action.clone(), vec![e.clone()]);
            }
        }
    }

    /// Delivers the batches whose window ended by `now`.
    fn deliver_due(&mut self, now: Instant) {
        let due: Vec<String> =
            self.pending.iter().filter(|(_, b)| b.deadline <= now).map(|(n, _)| n.clone()).collect();
        if due.is_empty() {
            return;
        }
        let config = Arc::clone(&self.config.borrow());
        for name in due {
            if let Some(b) = self.pending.remove(&name) {
                let action = config.actions.get(&name).cloned().unwrap_or(b.action);
                self.spawn(name, action, b.events);
            }
        }
    }

    /// Delivers every pending batch, and answers `done` once every delivery started so far (by
    /// this or an earlier message) has ended.
    fn flush(&mut self, done: oneshot::Sender<()>) {
        self.deliver_due(far_future());
        let (tx, rx) = mpsc::channel(1);
        let old = std::mem::replace(&mut self.in_flight, tx);
        let mut old_rx = std::mem::replace(&mut self.in_flight_rx, rx);
        drop(old);
        // A later flush also waits for this one, hence for everything before it.
        let chain = self.in_flight.clone();
        tokio::spawn(async move {
            let _ = old_rx.recv().await;
            drop(chain);
            let _ = done.send(());
        });
    }

    fn spawn(&mut self, name: String, action: ActionConfig, events: Vec<Event>) {
        let permits = Arc::clone(
            self.permits.entry(name.clone()).or_insert_with(|| Arc::new(Semaphore::new(MAX_CONCURRENT))),
        );
        let stats = Arc::clone(&self.stats);
        let guard = self.in_flight.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            deliver(&name, &action, &Message::new(events), &stats).await;
            drop(guard);
        });
    }
}

/// One delivery, retried; counts `fired` or `failed`.
async fn deliver(name: &str, action: &ActionConfig, msg: &Message, stats: &Mutex<AlarmStats>) {
    let retries = action.delivery().retries;
    let mut attempt = 0;
    loop {
        match attempt_once(name, action, msg).await {
            Ok(()) => {
                if attempt > 0 {
                    tracing::info!(action = %name, "alarm delivered on attempt {}: {}", attempt + 1, msg.subject);
                }
                let mut s = lock(stats);
                for e in &msg.events {
                    *s.fired.entry((e.kind, name.to_string())).or_default() += 1;
                }
                return;
            }
            Err(err) if attempt < retries => {
                let wait = backoff(attempt);
                tracing::warn!(
                    action = %name,
                    "alarm delivery failed ({err}); retry {}/{retries} in {wait:?}: {}",
                    attempt + 1,
                    msg.subject
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(err) => {
                tracing::warn!(
                    action = %name,
                    "alarm delivery failed ({err}) after {} attempt(s); giving up: {}",
                    attempt + 1,
                    msg.subject
                );
                *lock(stats).failed.entry(name.to_string()).or_default() += 1;
                return;
            }
        }
    }
}

async fn attempt_once(name: &str, action: &ActionConfig, msg: &Message) -> Result<(), String> {
    let timeout = action.delivery().timeout_seconds.get();
    match action {
        ActionConfig::Command { command, headers, to, .. } => {
            let input = command_input(msg, *headers, to.as_deref());
            run_command(command, input.as_bytes(), msg, timeout).await
        }
        ActionConfig::Webhook { url, format, .. } => {
            let body = match format {
                WebhookFormat::Json => json_body(&msg.events),
                WebhookFormat::Alertmanager => alertmanager_body(&msg.events),
            };
            let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            // The client's own limit is a backstop: this one fires first, with this message.
            tokio::time::timeout(timeout, post(url, body, timeout + Duration::from_secs(1)))
                .await
                .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
        }
        ActionConfig::Log { .. } => {
            log(name, msg);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// What one delivery carries: one event, or a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// One line: `shmetrics: crash pid 1234`, `shmetrics: 3 alarms (crash, fatal)`.
    pub subject: String,
    /// The text, ending with a newline.
    pub body: String,
    /// The events.
    pub events: Vec<Event>,
}

impl Message {
    /// The message for these events (one event: its own subject; several: a batch).
    pub fn new(events: Vec<Event>) -> Message {
        let (subject, body) = match events.as_slice() {
            [e] => {
                let mut body = format!(
                    "{}\n\nkind: {}\nsubject: {}\nat: {}\n",
                    e.message,
                    e.kind.as_str(),
                    one_line(&e.subject),
                    rfc3339(e.at)
                );
                if !e.labels.is_empty() {
                    let _ = writeln!(body, "labels: {}", labels_text(&e.labels));
                }
                (single_subject(e), body)
            }
            _ => {
                let subject = format!("shmetrics: {} alarms ({})", events.len(), kinds(&events));
                let body = events.iter().map(|e| event_line(e) + "\n").collect();
                (subject, body)
            }
        };
        Message { subject, body, events }
    }
}

/// The subject of one event: `shmetrics: <kind> <subject>`, on one line.
pub fn single_subject(e: &Event) -> String {
    one_line(&format!("shmetrics: {} {}", e.kind.as_str(), e.subject))
}

/// One line for an event in a batch: `<time> <kind> <subject>: <message> {labels}`.
pub fn event_line(e: &Event) -> String {
    let mut line = format!("{} {} {}: {}", rfc3339(e.at), e.kind.as_str(), e.subject, e.message);
    if !e.labels.is_empty() {
        line.push(' ');
        line.push_str(&labels_text(&e.labels));
    }
    one_line(&line)
}

/// The distinct kinds of the events, in [`EventKind`] order: `crash, fatal`.
fn kinds(events: &[Event]) -> String {
    let kinds: BTreeSet<EventKind> = events.iter().map(|e| e.kind).collect();
    kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Control characters (newlines in particular: header injection) become spaces.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// `{pid="1234",program="web"}`, values escaped as in the Prometheus text format.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// What a command gets on stdin: the body, after `To:`/`Subject:` lines and a blank line when
/// `headers` is set.
pub fn command_input(msg: &Message, headers: bool, to: Option<&str>) -> String {
    if !headers {
        return msg.body.clone();
    }
    let mut s = String::new();
    if let Some(to) = to {
        let _ = writeln!(s, "To: {}", one_line(to));
    }
    let _ = write!(s, "Subject: {}\n\n{}", msg.subject, msg.body);
    s
}

/// Unix seconds as RFC 3339 in UTC with milliseconds: `2023-11-14T22:13:20.250Z`.
pub fn rfc3339(at: f64) -> String {
    let ms = if at.is_finite() { (at.clamp(0.0, 253_402_300_799.999) * 1000.0).round() as i64 } else { 0 };
    let (secs, ms) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------------
// Webhook bodies

/// Our JSON: `{"events": [{"kind", "subject", "message", "at", "labels"}]}`.
pub fn json_body(events: &[Event]) -> Value {
    json!({ "events": events })
}

/// Alertmanager's severity for a kind.
pub fn severity(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Fatal => "critical",
        EventKind::Crash | EventKind::Memory | EventKind::Threshold | EventKind::Httpok => "warning",
    }
}

/// The body of Alertmanager's `POST /api/v2/alerts`: an array of `postableAlert`s, each with
/// `labels` (the event's, plus `alertname="shmetrics_<kind>"` and `severity`), `annotations`
/// (`summary`: the subject line, `description`: the message) and `startsAt`. `endsAt` is left
/// out: Alertmanager resolves the alert after its `resolve_timeout`.
pub fn alertmanager_body(events: &[Event]) -> Value {
    let alerts = events
        .iter()
        .map(|e| {
            let mut labels = serde_json::Map::new();
            for (k, v) in &e.labels {
                // An empty value is the same as no label to Alertmanager.
                if !v.is_empty() {
                    labels.insert(label_name(k), Value::from(v.as_str()));
                }
            }
            labels.insert("alertname".into(), Value::from(format!("shmetrics_{}", e.kind.as_str())));
            labels.insert("severity".into(), Value::from(severity(e.kind)));
            json!({
                "labels": labels,
                "annotations": {
                    "summary": single_subject(e),
                    "description": e.message,
                },
                "startsAt": rfc3339(e.at),
            })
        })
        .collect();
    Value::Array(alerts)
}

/// A valid Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`): other characters become `_`.
fn label_name(k: &str) -> String {
    let mut s: String =
        k.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, '_');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Delivery

fn truncate(s: &str) -> &str {
    let s = s.trim();
    match s.char_indices().nth(ERROR_TEXT) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Runs `argv` with `input` on stdin; fails on a non-zero exit, kills its process group at
/// `timeout`.
async fn run_command(argv: &[String], input: &[u8], msg: &Message, timeout: Duration) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("the command is empty")?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .env("SHMETRICS_ALARM_SUBJECT", &msg.subject)
        .env("SHMETRICS_ALARM_COUNT", msg.events.len().to_string())
        .env("SHMETRICS_ALARM_KINDS", kinds(&msg.events));
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {prog:?}: {e}"))?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let mut stderr = tokio::spawn(async move {
        let mut kept = Vec::new();
        if let Some(mut stderr) = stderr {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                let room = (4 * ERROR_TEXT).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
        kept
    });
    let work = async {
        if let Some(mut stdin) = stdin {
            // A command that exits without reading all of it (EPIPE) is judged by its exit status.
            if let Err(e) = stdin.write_all(input).await {
                tracing::debug!("alarm command {prog:?} did not read its input: {e}");
            }
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(timeout, work).await {
        Ok(status) => status.map_err(|e| format!("waiting for {prog:?}: {e}"))?,
        Err(_) => {
            // The child is not reaped yet, so its pid still names its process group.
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            stderr.abort();
            return Err(format!("{prog:?} killed: still running after {timeout:?}"));
        }
    };
    // What the command left running in the background may keep stderr open: wait a moment only.
    let err = match tokio::time::timeout(Duration::from_millis(200), &mut stderr).await {
        Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        _ => String::new(),
    };
    stderr.abort();
    if status.success() {
        return Ok(());
    }
    let err = truncate(&err);
    Err(if err.is_empty() { format!("{prog:?} {status}") } else { format!("{prog:?} {status}: {err}") })
}

/// POSTs JSON to an `http://` URL (through [`crate::client`]); fails unless the answer is 2xx.
async fn post(url: &str, body: Vec<u8>, timeout: Duration) -> Result<(), String> {
    let json = crate::client::Body { content_type: "application/json", bytes: body };
    let agent = concat!("shmetrics/", env!("CARGO_PKG_VERSION"));
    let answer = crate::client::send(hyper::Method::POST, url, Some(json), agent, timeout).await?;
    if (200..300).contains(&answer.status) {
        return Ok(());
    }
    let status =
        hyper::StatusCode::from_u16(answer.status).map_or(answer.status.to_string(), |s| s.to_string());
    let text = String::from_utf8_lossy(&answer.body);
    let text = truncate(&text);
    Err(if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") })
}

/// The log action: one `WARN` line per message.
fn log(name: &str, msg: &Message) {
    match msg.events.as_slice() {
        [e] => tracing::warn!(action = %name, kind = e.kind.as_str(), "alarm: {}", event_line(e)),
        events => {
            let lines: Vec<String> = events.iter().map(event_line).collect();
            tracing::warn!(action = %name, "alarm: {}: {}", msg.subject, lines.join("; "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, subject: &str, message: &str) -> Event {
        let mut e = Event::now(kind, subject, message, &[]);
        e.at = 1_700_000_000.25;
        e
    }

    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000.25), "2023-11-14T22:13:20.250Z");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_107_542_399.5), "2100-02-28T23:59:59.500Z");
        assert_eq!(rfc3339(4_107_542_399.999_6), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339(f64::NAN), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1e300), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn one_event_message() {
        let e = event(EventKind::Crash, "pid 12", "worker 12 was killed by SIGKILL").label("pid", "12");
        let m = Message::new(vec![e]);
        assert_eq!(m.subject, "shmetrics: crash pid 12");
        assert_eq!(
            m.body,
            "worker 12 was killed by SIGKILL\n\nkind: crash\nsubject: pid 12\nat: 2023-11-14T22:13:20.250Z\n\
             labels: {pid=\"12\"}\n"
        );
        assert_eq!(
            command_input(&m, true, Some("ops@example.com")),
            format!("To: ops@example.com\nSubject: shmetrics: crash pid 12\n\n{}", m.body)
        );
        assert_eq!(command_input(&m, false, Some("ops@example.com")), m.body);
    }

    #[test]
    fn batch_message() {
        let m = Message::new(vec![
            event(EventKind::Fatal, "job", "no live workers"),
            event(EventKind::Crash, "pid 1", "a\nb").label("pid", "1"),
            event(EventKind::Crash, "pid 2", "c"),
        ]);
        assert_eq!(m.subject, "shmetrics: 3 alarms (crash, fatal)");
        assert_eq!(
            m.body,
            "2023-11-14T22:13:20.250Z fatal job: no live workers\n\
             2023-11-14T22:13:20.250Z crash pid 1: a b {pid=\"1\"}\n\
             2023-11-14T22:13:20.250Z crash pid 2: c\n"
        );
    }

    #[test]
    fn subjects_cannot_inject_headers() {
        let m = Message::new(vec![event(EventKind::Threshold, "x\nBcc: evil@example.com", "m")]);
        assert!(!m.subject.contains('\n'));
        let input = command_input(&m, true, Some("a@b\nBcc: c@d"));
        assert_eq!(input.lines().take_while(|l| !l.is_empty()).count(), 2, "{input}");
    }

    #[test]
    fn alertmanager_alerts() {
        let e = event(EventKind::Fatal, "job", "no live workers").label("program", "web").label("a.b-c", "x");
        let v = alertmanager_body(&[e, event(EventKind::Memory, "pid 3", "big")]);
        let a = &v[0];
        assert_eq!(a["labels"]["alertname"], "shmetrics_fatal");
        assert_eq!(a["labels"]["severity"], "critical");
        assert_eq!(a["labels"]["program"], "web");
        assert_eq!(a["labels"]["a_b_c"], "x");
        assert_eq!(a["annotations"]["summary"], "shmetrics: fatal job");
        assert_eq!(a["annotations"]["description"], "no live workers");
        assert_eq!(a["startsAt"], "2023-11-14T22:13:20.250Z");
        assert_eq!(v[1]["labels"]["severity"], "warning");
        assert_eq!(label_name("9lives"), "_9lives");
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let b: Vec<u64> = (0..8).map(|i| backoff(i).as_secs()).collect();
        assert_eq!(b, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(200), MAX_BACKOFF);
    }
}
