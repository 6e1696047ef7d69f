//! supervisord's event-listener protocol, and its process events as alarms: the library side of
//! `shmetrics supervisor-listener`, a drop-in for superlance's crashmail, crashmailbatch and
//! fatalmailbatch.
//!
//! The protocol, as the listener sees it on its standard input and output:
//!
//! 1. the listener writes `READY\n`;
//! 2. supervisord writes a header line of space-separated `key:value` tokens
//!    (`ver:3.0 server:supervisor serial:21 pool:listener poolserial:10
//!    eventname:PROCESS_STATE_EXITED len:84\n`), then exactly `len` bytes of payload, which need
//!    not end with a newline (`processname:x groupname:y from_state:RUNNING expected:0 pid:2766`);
//! 3. the listener answers `RESULT 2\nOK` (taken) or `RESULT 4\nFAIL` (supervisord buffers the
//!    event again), and goes back to 1.
//!
//! Anything else on the listener's standard output puts it in supervisord's UNKNOWN state for
//! good, so this module writes only [`Reply`] tokens and [`READY`] there; everything else is
//! logged (to standard error).
//!
//! The events become alarms ([`map`]):
//!
//! * `PROCESS_STATE_EXITED` with `expected:0` → [`EventKind::Crash`], delivered through
//!   `[crash].actions`, with crashmail's message (`Process x in group y exited unexpectedly (pid
//!   2766) from state RUNNING`); `expected:1` is a normal exit and is ignored;
//! * `PROCESS_STATE_FATAL` → [`EventKind::Fatal`] through `[fatal].actions`;
//! * `TICK_5`, `TICK_60`, `TICK_3600` → the pending batches are delivered (crashmailbatch and
//!   fatalmailbatch send one message per TICK interval);
//! * every other event is answered `OK` and ignored, and so are crash (fatal) events when the
//!   configuration has no `[crash]` (`[fatal]`) section.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;

use super::{AlarmConfig, Event, EventKind, Pipeline};

/// What the listener writes when it can take an event.
pub const READY: &[u8] = b"READY\n";

/// The longest header line taken (supervisord's are about 100 bytes).
pub const MAX_HEADER: usize = 8 * 1024;

/// The longest payload kept in memory; longer ones (large `PROCESS_COMMUNICATION` or
/// `PROCESS_LOG` events, which we do not handle) are read and discarded.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// An event's header line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `eventname`, e.g. `PROCESS_STATE_EXITED`.
    pub eventname: String,
    /// `len`: the payload's length in bytes.
    pub len: usize,
    /// Every token, `eventname` and `len` included (`ver`, `server`, `serial`, `pool`,
    /// `poolserial`).
    pub fields: BTreeMap<String, String>,
}

impl Header {
    /// Parses a header line (without or with its line end). Every token must be `key:value`, and
    /// `eventname` and a numeric `len` must be there.
    pub fn parse(line: &str) -> Result<Header, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let mut fields = BTreeMap::new();
        for token in line.split_whitespace() {
            let Some((k, v)) = token.split_once(':') else {
                return Err(format!("token {token:?} is not key:value"));
            };
            if k.is_empty() {
                return Err(format!("token {token:?} has no key"));
            }
            fields.insert(k.to_string(), v.to_string());
        }
        if fields.is_empty() {
            return Err("empty header line".into());
        }
        let eventname = match fields.get("eventname") {
            Some(e) if !e.is_empty() => e.clone(),
            _ => return Err("no eventname".into()),
        };
        let len = match fields.get("len") {
            Some(l) => l.parse::<usize>().map_err(|_| format!("len {l:?} is not a byte count"))?,
            None => return Err("no len".into()),
        };
        Ok(Header { eventname, len, fields })
    }
}

/// An event's payload: the `key:value` tokens of its first line, and what follows that line
/// (the data of `PROCESS_LOG_*` and `PROCESS_COMMUNICATION_*` events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    /// The tokens of the first line (tokens without a `:` are left out).
    pub fields: BTreeMap<String, String>,
    /// The bytes after the first line's `\n`.
    pub data: Vec<u8>,
}

impl Payload {
    /// Parses a payload (never fails: what is missing is found missing by [`map`]).
    pub fn parse(bytes: &[u8]) -> Payload {
        let (first, data) = match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[..i], bytes[i + 1..].to_vec()),
            None => (bytes, Vec::new()),
        };
        let fields = String::from_utf8_lossy(first)
            .split_whitespace()
            .filter_map(|t| t.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Payload { fields, data }
    }

    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// What was read from supervisord.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole event.
    Event {
        /// Its header.
        header: Header,
        /// Exactly `header.len` bytes.
        payload: Vec<u8>,
    },
    /// A header line that does not parse (its payload length is unknown: only the line was
    /// consumed).
    Malformed {
        /// Why.
        reason: String,
    },
    /// An event whose payload was longer than [`MAX_PAYLOAD`]: read and discarded.
    TooLong {
        /// Its header.
        header: Header,
    },
}

/// Reads one event: a header line, then exactly `len` bytes of payload. `Ok(None)` at the end of
/// the input before a header; an `UnexpectedEof` error when the input ends inside an event.
pub fn read_frame<R: BufRead>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(MAX_HEADER as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() <= MAX_HEADER {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "input ended inside an event header"));
        }
        r.skip_until(b'\n')?;
        return Ok(Some(Frame::Malformed { reason: format!("header line longer than {MAX_HEADER} bytes") }));
    }
    let header = match std::str::from_utf8(&line) {
        Ok(text) => Header::parse(text),
        Err(_) => Err("header line is not UTF-8".into()),
    };
    let header = match header {
        Ok(h) => h,
        Err(reason) => {
            let shown = String::from_utf8_lossy(&line);
            let shown: String = shown.trim_end().chars().take(200).collect();
            return Ok(Some(Frame::Malformed { reason: format!("{reason} in {shown:?}") }));
        }
    };
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "input ended inside an event payload");
    if header.len > MAX_PAYLOAD {
        let skipped = io::copy(&mut r.by_ref().take(header.len as u64), &mut io::sink())?;
        if skipped < header.len as u64 {
            return Err(eof());
        }
        return Ok(Some(Frame::TooLong { header }));
    }
    let mut payload = vec![0; header.len];
    r.read_exact(&mut payload)
        .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { eof() } else { e })?;
    Ok(Some(Frame::Event { header, payload }))
}

/// The listener's answer to an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `RESULT 2\nOK`: taken.
    Ok,
    /// `RESULT 4\nFAIL`: not taken (supervisord buffers it again).
    Fail,
}

impl Reply {
    /// The bytes written for it.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Reply::Ok => b"RESULT 2\nOK",
            Reply::Fail => b"RESULT 4\nFAIL",
        }
    }
}

/// Writes `READY\n` and flushes.
pub fn write_ready<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(READY)?;
    w.flush()
}

/// Writes a reply followed by `READY\n` (in one write) and flushes.
pub fn write_reply<W: Write>(w: &mut W, reply: Reply) -> io::Result<()> {
    let mut buf = Vec::with_capacity(32);
    buf.extend_from_slice(reply.bytes());
    buf.extend_from_slice(READY);
    w.write_all(&buf)?;
    w.flush()
}

/// What an event means for the alarms.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Raise this alarm.
    Alarm(Event),
    /// An alarm of this kind, but the configuration has no section for it: ignored.
    Unrouted(EventKind),
    /// A TICK: deliver the pending batches.
    Flush,
    /// Nothing to do (an expected exit, an event we do not handle).
    Ignored,
    /// An event we handle whose payload lacks what we need: answered FAIL.
    Invalid(String),
}

impl Outcome {
    /// The answer to give supervisord.
    pub fn reply(&self) -> Reply {
        match self {
            Outcome::Invalid(_) => Reply::Fail,
            _ => Reply::Ok,
        }
    }
}

/// Maps one event to an [`Outcome`] under a configuration.
pub fn map(eventname: &str, payload: &Payload, config: &AlarmConfig) -> Outcome {
    match eventname {
        "PROCESS_STATE_EXITED" => {
            let Some(name) = payload.get("processname") else {
                return Outcome::Invalid(format!("{eventname} without processname"));
            };
            match payload.get("expected") {
                Some("1") => return Outcome::Ignored,
                Some("0") => {}
                other => {
                    return Outcome::Invalid(format!("{eventname} of {name} with expected {other:?}"));
                }
            }
            let Some(rule) = &config.crash else {
                return Outcome::Unrouted(EventKind::Crash);
            };
            let group = payload.get("groupname").unwrap_or(name);
            let pid = payload.get("pid");
            let message = format!(
                "Process {name} in group {group} exited unexpectedly (pid {}) from state {}",
                pid.unwrap_or("?"),
                payload.get("from_state").unwrap_or("?"),
            );
            let mut e = Event::now(EventKind::Crash, name, message, &rule.actions)
                .label("program", name)
                .label("group", group);
            if let Some(pid) = pid {
                e = e.label("pid", pid);
            }
            Outcome::Alarm(e)
        }
        "PROCESS_STATE_FATAL" => {
            let Some(name) = payload.get("processname") else {
                return Outcome::Invalid(format!("{eventname} without processname"));
            };
            let Some(rule) = &config.fatal else {
                return Outcome::Unrouted(EventKind::Fatal);
            };
            let group = payload.get("groupname").unwrap_or(name);
            let message = format!("Process {name} in group {group} has entered the FATAL state");
            Outcome::Alarm(
                Event::now(EventKind::Fatal, name, message, &rule.actions)
                    .label("program", name)
                    .label("group", group),
            )
        }
        "TICK_5" | "TICK_60" | "TICK_3600" => Outcome::Flush,
        _ => Outcome::Ignored,
    }
}

/// What the listener did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handled {
    /// The answer to write.
    pub reply: Reply,
    /// Whether the pending batches should be delivered now (a TICK).
    pub flush: bool,
}

/// The listener's state: the pipeline it feeds, and which "no section for this" warnings were
/// already logged.
pub struct Listener {
    pipeline: Arc<Pipeline>,
    unrouted_logged: BTreeSet<EventKind>,
}

impl Listener {
    /// A listener feeding `pipeline` (whose configuration routes the events).
    pub fn new(pipeline: Arc<Pipeline>) -> Listener {
        Listener { pipeline, unrouted_logged: BTreeSet::new() }
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Takes one frame: submits its alarm, logs what is worth logging, and says what to answer.
    /// Flushing is left to the caller (it is async and must not hold up the answer).
    pub fn handle(&mut self, frame: &Frame) -> Handled {
        let (header, payload) = match frame {
            Frame::Event { header, payload } => (header, payload),
            Frame::Malformed { reason } => {
                tracing::warn!("supervisor-listener: malformed event header ({reason}); answered FAIL");
                return Handled { reply: Reply::Fail, flush: false };
            }
            Frame::TooLong { header } => {
                let handled = matches!(
                    header.eventname.as_str(),
                    "PROCESS_STATE_EXITED" | "PROCESS_STATE_FATAL" | "TICK_5" | "TICK_60" | "TICK_3600"
                );
                tracing::warn!(
                    "supervisor-listener: {} event with a {}-byte payload (over {MAX_PAYLOAD}) discarded",
                    header.eventname,
                    header.len
                );
                return Handled { reply: if handled { Reply::Fail } else { Reply::Ok }, flush: false };
            }
        };
        let payload = Payload::parse(payload);
        let config = self.pipeline.config();
        let outcome = map(&header.eventname, &payload, &config);
        let reply = outcome.reply();
        match outcome {
            Outcome::Alarm(event) => {
                tracing::info!("supervisor-listener: {}", event.message);
                self.pipeline.submit(event);
            }
            Outcome::Unrouted(kind) => {
                if self.unrouted_logged.insert(kind) {
                    tracing::warn!(
                        "supervisor-listener: {} events are ignored: the configuration has no [{}] \
                         section (logged once)",
                        header.eventname,
                        kind.as_str()
                    );
                }
            }
            Outcome::Flush => {
                tracing::debug!("supervisor-listener: {}: delivering pending batches", header.eventname);
                return Handled { reply, flush: true };
            }
            Outcome::Ignored => {
                tracing::debug!("supervisor-listener: {} ignored", header.eventname);
            }
            Outcome::Invalid(why) => {
                tracing::warn!("supervisor-listener: {why}; answered FAIL");
            }
        }
        Handled { reply, flush: false }
    }

    /// Puts a new configuration in force (and logs the missing sections again when met).
    pub fn reload(&mut self, config: AlarmConfig) {
        self.pipeline.reload(config);
        self.unrouted_logged.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const EXITED: &str = "processname:cat groupname:cat from_state:RUNNING expected:0 pid:2766";

    fn frame(eventname: &str, payload: &str) -> String {
        format!(
            "ver:3.0 server:supervisor serial:21 pool:listener poolserial:10 eventname:{eventname} len:{}\n{payload}",
            payload.len()
        )
    }

    fn config(text: &str) -> AlarmConfig {
        AlarmConfig::parse(text).expect("config")
    }

    fn both() -> AlarmConfig {
        config(
            "[actions.a]\ntype = \"log\"\n[actions.b]\ntype = \"log\"\n[crash]\nactions = [\"a\"]\n\
             [fatal]\nmax_crashes = 5\nactions = [\"b\"]\n",
        )
    }

    #[test]
    fn header_parses() {
        let h = Header::parse(
            "ver:3.0 server:supervisor serial:21 pool:listener poolserial:10 eventname:PROCESS_STATE_EXITED len:84\n",
        )
        .expect("header");
        assert_eq!(h.eventname, "PROCESS_STATE_EXITED");
        assert_eq!(h.len, 84);
        assert_eq!(h.fields["pool"], "listener");
        assert_eq!(h.fields["ver"], "3.0");
        assert_eq!(h.fields.len(), 7);
    }

    #[test]
    fn bad_headers_are_explained() {
        for (line, why) in [
            ("", "empty"),
            ("hello world\n", "not key:value"),
            ("ver:3.0 eventname:TICK_5\n", "no len"),
            ("ver:3.0 len:5\n", "no eventname"),
            ("eventname:TICK_5 len:-1\n", "not a byte count"),
            ("eventname:TICK_5 len:five\n", "not a byte count"),
            ("eventname:TICK_5 :x len:3\n", "no key"),
        ] {
            let e = Header::parse(line).expect_err(line);
            assert!(e.contains(why), "{line:?}: {e}");
        }
    }

    #[test]
    fn payload_first_line_and_data() {
        let p = Payload::parse(EXITED.as_bytes());
        assert_eq!(p.get("processname"), Some("cat"));
        assert_eq!(p.get("pid"), Some("2766"));
        assert!(p.data.is_empty());
        let p = Payload::parse(b"processname:foo groupname:bar channel:stdout pid:1\nline one\nline: two");
        assert_eq!(p.get("channel"), Some("stdout"));
        assert_eq!(p.data, b"line one\nline: two");
        assert_eq!(p.get("line"), None);
    }

    #[test]
    fn frames_are_read_by_exact_length() {
        // Payloads without a trailing newline, back to back: the next header starts right after
        // `len` bytes.
        let input =
            format!("{}{}", frame("PROCESS_STATE_EXITED", EXITED), frame("TICK_5", "when:1201063880"));
        let mut r = Cursor::new(input.into_bytes());
        match read_frame(&mut r).expect("read") {
            Some(Frame::Event { header, payload }) => {
                assert_eq!(header.eventname, "PROCESS_STATE_EXITED");
                assert_eq!(payload, EXITED.as_bytes());
            }
            other => panic!("{other:?}"),
        }
        match read_frame(&mut r).expect("read") {
            Some(Frame::Event { header, payload }) => {
                assert_eq!(header.eventname, "TICK_5");
                assert_eq!(payload, b"when:1201063880");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(read_frame(&mut r).expect("eof"), None);
    }

    #[test]
    fn payload_with_newlines_and_zero_length() {
        let data = "processname:p groupname:p pid:7\nhello\n\nworld\n";
        let input = format!(
            "{}{}",
            frame("PROCESS_COMMUNICATION_STDOUT", data),
            frame("SUPERVISOR_STATE_CHANGE_RUNNING", "")
        );
        let mut r = Cursor::new(input.into_bytes());
        let Some(Frame::Event { payload, .. }) = read_frame(&mut r).expect("read") else { panic!() };
        assert_eq!(payload, data.as_bytes());
        let Some(Frame::Event { header, payload }) = read_frame(&mut r).expect("read") else { panic!() };
        assert_eq!((header.eventname.as_str(), payload.len()), ("SUPERVISOR_STATE_CHANGE_RUNNING", 0));
        assert_eq!(read_frame(&mut r).expect("eof"), None);
    }

    #[test]
    fn malformed_headers_consume_one_line_and_reading_goes_on() {
        let input = format!("this is not a header\n\n{}", frame("TICK_5", "when:1"));
        let mut r = Cursor::new(input.into_bytes());
        let Some(Frame::Malformed { reason }) = read_frame(&mut r).expect("read") else { panic!() };
        assert!(reason.contains("not key:value") && reason.contains("this is not a header"), "{reason}");
        let Some(Frame::Malformed { reason }) = read_frame(&mut r).expect("read") else { panic!() };
        assert!(reason.contains("empty"), "{reason}");
        let Some(Frame::Event { header, .. }) = read_frame(&mut r).expect("read") else { panic!() };
        assert_eq!(header.eventname, "TICK_5");
    }

    #[test]
    fn overlong_lines_and_payloads_are_skipped() {
        let long = "x".repeat(MAX_HEADER * 3);
        let big = "y".repeat(MAX_PAYLOAD + 10);
        let input = format!("{long}\n{}{}", frame("PROCESS_LOG_STDOUT", &big), frame("TICK_60", "when:2"));
        let mut r = Cursor::new(input.into_bytes());
        let Some(Frame::Malformed { reason }) = read_frame(&mut r).expect("read") else { panic!() };
        assert!(reason.contains("longer than"), "{reason}");
        let Some(Frame::TooLong { header }) = read_frame(&mut r).expect("read") else { panic!() };
        assert_eq!(header.len, MAX_PAYLOAD + 10);
        let Some(Frame::Event { header, .. }) = read_frame(&mut r).expect("read") else { panic!() };
        assert_eq!(header.eventname, "TICK_60");
    }

    #[test]
    fn truncated_input_is_an_unexpected_eof() {
        for input in ["eventname:TICK_5 len:10\nwhen:", "eventname:TICK_5 len:1"] {
            let e = read_frame(&mut Cursor::new(input.as_bytes().to_vec())).expect_err(input);
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{input}");
        }
    }

    #[test]
    fn replies_are_the_protocol_tokens() {
        let mut out = Vec::new();
        write_ready(&mut out).expect("write");
        write_reply(&mut out, Reply::Ok).expect("write");
        write_reply(&mut out, Reply::Fail).expect("write");
        assert_eq!(out, b"READY\nRESULT 2\nOKREADY\nRESULT 4\nFAILREADY\n");
    }

    #[test]
    fn unexpected_exit_is_a_crash() {
        let Outcome::Alarm(e) = map("PROCESS_STATE_EXITED", &Payload::parse(EXITED.as_bytes()), &both())
        else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::Crash);
        assert_eq!(e.subject, "cat");
        assert_eq!(e.message, "Process cat in group cat exited unexpectedly (pid 2766) from state RUNNING");
        assert_eq!(e.actions, vec!["a".to_string()]);
        let labels: Vec<(&str, &str)> = e.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, [("group", "cat"), ("pid", "2766"), ("program", "cat")]);
        assert!(e.at > 1.5e9);
    }

    #[test]
    fn expected_exit_is_ignored() {
        let p = Payload::parse(b"processname:cat groupname:cat from_state:RUNNING expected:1 pid:2766");
        assert_eq!(map("PROCESS_STATE_EXITED", &p, &both()), Outcome::Ignored);
        assert_eq!(Outcome::Ignored.reply(), Reply::Ok);
    }

    #[test]
    fn fatal_is_fatal() {
        let p = Payload::parse(b"processname:web groupname:site from_state:BACKOFF");
        let Outcome::Alarm(e) = map("PROCESS_STATE_FATAL", &p, &both()) else { panic!() };
        assert_eq!(e.kind, EventKind::Fatal);
        assert_eq!(e.subject, "web");
        assert_eq!(e.message, "Process web in group site has entered the FATAL state");
        assert_eq!(e.actions, vec!["b".to_string()]);
        assert_eq!(e.labels.get("group").map(String::as_str), Some("site"));
        assert_eq!(e.labels.get("pid"), None);
    }

    #[test]
    fn ticks_flush_and_others_are_ignored() {
        let p = Payload::parse(b"when:1201063880");
        for t in ["TICK_5", "TICK_60", "TICK_3600"] {
            assert_eq!(map(t, &p, &both()), Outcome::Flush, "{t}");
        }
        let p = Payload::parse(b"processname:cat groupname:cat from_state:STARTING tries:0");
        for e in ["PROCESS_STATE_BACKOFF", "PROCESS_STATE_RUNNING", "SUPERVISOR_STATE_CHANGE_RUNNING"] {
            assert_eq!(map(e, &p, &both()), Outcome::Ignored, "{e}");
        }
    }

    #[test]
    fn missing_sections_leave_events_unrouted() {
        let none = config("");
        let p = Payload::parse(EXITED.as_bytes());
        assert_eq!(map("PROCESS_STATE_EXITED", &p, &none), Outcome::Unrouted(EventKind::Crash));
        assert_eq!(map("PROCESS_STATE_FATAL", &p, &none), Outcome::Unrouted(EventKind::Fatal));
        assert_eq!(Outcome::Unrouted(EventKind::Crash).reply(), Reply::Ok);
    }

    #[test]
    fn payloads_without_what_we_need_fail() {
        for (name, payload) in [
            ("PROCESS_STATE_EXITED", "groupname:cat expected:0 pid:1"),
            ("PROCESS_STATE_EXITED", "processname:cat groupname:cat pid:1"),
            ("PROCESS_STATE_EXITED", "processname:cat expected:yes"),
            ("PROCESS_STATE_FATAL", "groupname:cat"),
        ] {
            let o = map(name, &Payload::parse(payload.as_bytes()), &both());
            assert!(matches!(o, Outcome::Invalid(_)), "{payload}: {o:?}");
            assert_eq!(o.reply(), Reply::Fail);
        }
        // Missing details are shown, not fatal.
        let p = Payload::parse(b"processname:cat expected:0");
        let Outcome::Alarm(e) = map("PROCESS_STATE_EXITED", &p, &both()) else { panic!() };
        assert_eq!(e.message, "Process cat in group cat exited unexpectedly (pid ?) from state ?");
    }

    #[tokio::test]
    async fn the_listener_submits_and_answers() {
        let pipeline = Pipeline::start(both());
        let mut l = Listener::new(Arc::clone(&pipeline));
        let read = |s: String| read_frame(&mut Cursor::new(s.into_bytes())).expect("read").expect("frame");
        let ok = Handled { reply: Reply::Ok, flush: false };
        assert_eq!(l.handle(&read(frame("PROCESS_STATE_EXITED", EXITED))), ok);
        let expected = EXITED.replace("expected:0", "expected:1");
        assert_eq!(l.handle(&read(frame("PROCESS_STATE_EXITED", &expected))), ok);
        let fatal = "processname:cat groupname:cat from_state:BACKOFF";
        assert_eq!(l.handle(&read(frame("PROCESS_STATE_FATAL", fatal))), ok);
        assert_eq!(l.handle(&read(frame("TICK_5", "when:1"))), Handled { reply: Reply::Ok, flush: true });
        assert_eq!(l.handle(&read("nonsense\n".into())), Handled { reply: Reply::Fail, flush: false });
        let kinds: Vec<EventKind> = pipeline.recent().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Crash, EventKind::Fatal]);

        // Without a [crash] section, crashes are answered OK and not raised.
        l.reload(config("[actions.b]\ntype = \"log\"\n[fatal]\nmax_crashes = 5\nactions = [\"b\"]\n"));
        assert_eq!(l.handle(&read(frame("PROCESS_STATE_EXITED", EXITED))), ok);
        assert_eq!(l.handle(&read(frame("PROCESS_STATE_EXITED", EXITED))), ok);
        assert_eq!(pipeline.recent().len(), 2);
        pipeline.flush().await;
    }
}
