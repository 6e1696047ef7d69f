//! The monitor port: zc.monitor's line protocol, with ftw.monitor's commands.
//!
//! Existing tooling talks to it unchanged: HAProxy's `tcp-check send health_check\r\n` /
//! `expect string OK`, `echo health_check | nc host port`, ftw.monitor's `bin/instance monitor`
//! (and `shmetrics ctl`), scripts that parse `perf_metrics`.
//!
//! # Protocol
//!
//! - A command is one line ended by `\n`. The line is stripped and split on whitespace (Python's
//!   `line.strip().split()`, so a trailing `\r` is ignored): the first word is the command, the
//!   others its arguments. A command without its terminating `\n` is never run.
//! - One command per connection: the reply is written and the connection closed. There is no
//!   length prefix or terminator; clients read until EOF. `interactive` keeps the connection open
//!   until `quit`; there, an empty line repeats the last command. An empty line before any command
//!   is ignored.
//! - Unknown command: `Invalid command 'x'` and `Try "help".`, the name quoted as Python's `repr`
//!   does (bytes that are not UTF-8 are shown as `\xNN`).
//! - Errors of our own (bad arguments, limits) are one line starting with `Error: `.
//!
//! Commands: `health_check` (the health message, `OK` when the job can serve, see
//! `crate::health`), `perf_metrics [db|-] [interval]` (one line of JSON), `monitor` (what is
//! running), `pollsters` (the system pollsters in force, see `crate::pollsters`), `set_interval
//! SECONDS` and `set_pollsters NAME,...` (change them at runtime; refused unless the aggregator
//! was started with `--allow-control`, since the port has no authentication), `help [command]`,
//! `interactive`, `quit`.
//!
//! # Limits
//!
//! The monitor port must never hurt the aggregator, whatever its clients do, and must keep
//! answering `health_check` while hostile clients hold connections open (a load balancer that
//! gets no answer takes a healthy job out of service):
//!
//! - [`MAX_LINE`]: a longer line gets an `Error:` line and the connection is closed;
//! - [`LINE_TIMEOUT`]: time allowed for the command line after connecting (slow or silent clients
//!   get an `Error:` line and are closed); [`IDLE_TIMEOUT`] replaces it in interactive mode, for
//!   each line;
//! - [`WRITE_TIMEOUT`]: a client that does not read its reply is dropped;
//! - [`MAX_CONNECTIONS`] connections at once ([`super::slots`]). An idle connection costs a
//!   descriptor and a few hundred bytes, so the limit is high; when it is reached, the connection
//!   idle the longest is closed to make room for the newcomer. Idle is everything but running a
//!   command: waiting for the first complete line, waiting for the next one in interactive mode,
//!   writing the reply, lingering after it. So silent, slow or non-reading clients, however many
//!   and however often they reconnect, cannot keep a `health_check` out (the newcomer sends its
//!   line at once, so it is the newest idle connection while it is idle). Only when every slot is
//!   running a command is the newcomer told `Error: too many connections …` and closed
//!   ([`MAX_REJECTING`] of those at a time, beyond which connections are closed without a word);
//! - commands are short, except `perf_metrics` with an interval (up to [`MAX_INTERVAL`]): at most
//!   [`MAX_MEASUREMENTS`] of those run at once, the next ones get an `Error:` line, so they cannot
//!   hold the slots;
//! - after the reply, the connection's write side is shut and unread input is drained for at most
//!   [`LINGER`] (so pipelined input does not turn the close into a reset that would destroy the
//!   reply);
//! - at shutdown, idle connections are closed at once and commands in progress get
//!   [`SHUTDOWN_GRACE`].
//!
//! The process needs a descriptor per connection: `shmetrics serve` and `run` raise their
//! `RLIMIT_NOFILE` soft limit to the hard limit at start and log a warning if it stays below what
//! both ports may hold at once.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::slots::{Admit, Slot, Slots};
use super::State;
pub use super::MAX_INTERVAL;

/// Longest command line, in bytes, without its `\n`.
pub const MAX_LINE: usize = 4096;
/// Time allowed, from connecting, to send a complete command line (one-shot mode).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for each line in interactive mode, from the previous reply.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to write a reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; beyond, the one idle the longest is closed to make room.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections being told "too many connections" at once (when every slot runs a command);
/// further ones are closed without a reply.
pub const MAX_REJECTING: usize = 64;
/// `perf_metrics` measurements (with an interval) running at once.
pub const MAX_MEASUREMENTS: usize = 4;
/// How long unread input is drained after the reply before the connection is closed.
pub const LINGER: Duration = Duration::from_secs(1);
/// At most this much unread input is drained after the reply.
const LINGER_BYTES: usize = 64 * 1024;
/// How long commands in progress get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// At most one "too many connections" (or eviction) warning in the log per this period.
const REJECT_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Told to a connection closed to make room, when it was waiting for a command line.
const EVICTED: &str = "Error: closed to make room for new connections (too many open); \
                       send the command right after connecting\n";

/// A command of the monitor port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    HealthCheck,
    Help,
    Interactive,
    Monitor,
    PerfMetrics,
    Pollsters,
    Quit,
    SetInterval,
    SetPollsters,
}

/// The commands, their names and descriptions (first line: the summary `help` lists).
const COMMANDS: &[(&str, Command, &str)] = &[
    (
        "health_check",
        Command::HealthCheck,
        "Tell whether the job is able to serve requests\n\n\
         Replies \"OK\" when it is, otherwise one line saying why not: \"Instance is booting\",\n\
         \"Warmup in progress\", \"No live workers\" or \"Only N of M required workers are ready\".\n\
         Load balancers send \"health_check\\r\\n\" and expect the string \"OK\".",
    ),
    (
        "help",
        Command::Help,
        "List the commands, or describe one\n\n\
         Without an argument, every command is listed with a one-line summary. With a command\n\
         name, that command's description is shown.",
    ),
    (
        "interactive",
        Command::Interactive,
        "Keep the connection open for more commands\n\n\
         Without it, the connection is closed after one command. In interactive mode it stays\n\
         open until \"quit\", and an empty line runs the last command again.",
    ),
    (
        "monitor",
        Command::Monitor,
        "Show what is running: the aggregator, the workers and this port\n\n\
         Usage: monitor [long]  (the argument is accepted for compatibility and ignored)",
    ),
    (
        "perf_metrics",
        Command::PerfMetrics,
        "Performance figures of the job, as one line of JSON\n\n\
         Usage: perf_metrics [db|-] [interval]\n\
         With an interval (seconds, at most 10), CPU use is also measured over that time. The\n\
         database argument of ftw.monitor's form is accepted and ignored.",
    ),
    (
        "pollsters",
        Command::Pollsters,
        "Show the system pollsters in force and their interval\n\n\
         Replies one line: pollsters NAMES interval SECONDS (pollsters: ORIGIN; interval: ORIGIN)\n\
         NAMES: the enabled pollsters, comma-separated (cpu,loadavg,meminfo,netdev,diskstats,\n\
         filesystem), or \"none\". ORIGIN: \"configuration file\" ([pollsters] of --config),\n\
         \"default\" (no [pollsters] section: none enabled, interval 10) or \"runtime change\"\n\
         (set_interval / set_pollsters, kept in the multiproc directory's pollsters.state.json).",
    ),
    (
        "quit",
        Command::Quit,
        "Close the connection\n\nMostly useful in interactive mode (see \"interactive\").",
    ),
    (
        "set_interval",
        Command::SetInterval,
        "Set the seconds between two polls of the system pollsters\n\n\
         Usage: set_interval SECONDS  (more than 0, at most 31536000; procagent's setintvl)\n\
         Takes effect at once and is kept across restarts (pollsters.state.json), until the\n\
         configuration file's interval_seconds is changed and reloaded (SIGHUP): then the file's\n\
         wins. Replies \"OK pollsters ...\" (as \"pollsters\" does) or \"Error: ...\". Refused unless\n\
         the aggregator was started with --allow-control (the monitor port has no authentication).",
    ),
    (
        "set_pollsters",
        Command::SetPollsters,
        "Set which system pollsters run\n\n\
         Usage: set_pollsters NAME,NAME,...  (or \"none\"; procagent's setpoll)\n\
         Names: cpu, loadavg, meminfo, netdev, diskstats, filesystem. Takes effect at once (a\n\
         disabled pollster's series are gone from the next scrape) and is kept across restarts,\n\
         until the configuration file's enabled is changed and reloaded (SIGHUP). Replies\n\
         \"OK pollsters ...\" or \"Error: ...\". Refused unless the aggregator was started with\n\
         --allow-control (the monitor port has no authentication).",
    ),
];

/// Serves the monitor protocol on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let slots = Slots::new(MAX_CONNECTIONS);
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let measuring = Arc::new(Semaphore::new(MAX_MEASUREMENTS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut last_reject_log: Option<Instant> = None;
    let mut last_evict_log: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!("monitor connection task failed: {e}");
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!("monitor port: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.admit() {
            Admit::Free(slot) => slot,
            Admit::Evicted(slot) => {
                if last_evict_log.is_none_or(|t| t.elapsed() >= REJECT_LOG_PERIOD) {
                    tracing::warn!(
                        %peer,
                        "monitor port: {MAX_CONNECTIONS} connections open; closing the one idle the longest"
                    );
                    last_evict_log = Some(Instant::now());
                }
                slot
            }
            Admit::Full => {
                if last_reject_log.is_none_or(|t| t.elapsed() >= REJECT_LOG_PERIOD) {
                    tracing::warn!(%peer, "monitor port: {MAX_CONNECTIONS} commands running; refusing");
                    last_reject_log = Some(Instant::now());
                }
                if let Ok(permit) = Arc::clone(&rejecting).try_acquire_owned() {
                    conns.spawn(reject(stream, permit));
                }
                // Else the stream is dropped: closed without a word.
                continue;
            }
        };
        tracing::debug!(%peer, "monitor connection");
        let ctx = Context {
            state: Arc::clone(&state),
            measuring: Arc::clone(&measuring),
            slots: Arc::clone(&slots),
        };
        conns.spawn(connection(stream, ctx, stop_rx.clone(), slot));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("monitor port: commands still running after {SHUTDOWN_GRACE:?}; cut off");
    }
}

/// Tells an over-limit client so and closes.
async fn reject(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let line = format!("Error: too many connections (limit {MAX_CONNECTIONS}); try again later\n");
    if tokio::time::timeout(LINGER, stream.write_all(line.as_bytes())).await.is_ok() {
        close(stream).await;
    }
}

/// Shuts the write side (the client sees EOF after the reply), drains unread input for a while so
/// the close is not a reset, and closes.
async fn close(mut stream: TcpStream) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.shutdown()).await;
    drain(&mut stream).await;
}

/// Reads and drops unread input for at most [`LINGER`] and [`LINGER_BYTES`].
async fn drain(stream: &mut TcpStream) {
    super::drain(stream, LINGER, LINGER_BYTES).await;
}

/// What reading a line gave.
enum Read {
    Line(Vec<u8>),
    Eof,
    TooLong,
    TimedOut,
    Shutdown,
    Evicted,
    Failed(std::io::Error),
}

/// A connection's input: bytes received and not consumed yet.
struct Input {
    buf: Vec<u8>,
}

impl Input {
    /// The next line (without its `\n`), reading until `deadline`. Never buffers much more than
    /// [`MAX_LINE`].
    async fn line(
        &mut self,
        stream: &mut TcpStream,
        deadline: tokio::time::Instant,
        stop: &mut watch::Receiver<bool>,
        slot: &Slot,
    ) -> Read {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                if end > MAX_LINE {
                    return Read::TooLong;
                }
                let line = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                return Read::Line(line);
            }
            scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Read::TooLong;
            }
            let mut chunk = [0u8; 1024];
            tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => match r {
                    Err(_) => return Read::TimedOut,
                    Ok(Ok(0)) => return Read::Eof,
                    Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                    Ok(Err(e)) => return Read::Failed(e),
                },
                _ = stop.wait_for(|s| *s) => return Read::Shutdown,
                () = slot.evicted() => return Read::Evicted,
            }
        }
    }
}

/// What a connection needs besides its socket.
struct Context {
    state: Arc<State>,
    /// Permits for `perf_metrics` measurements ([`MAX_MEASUREMENTS`]).
    measuring: Arc<Semaphore>,
    /// The connection slots, for the `monitor` command's account of this port.
    slots: Arc<Slots>,
}

/// The last line of `monitor`: how full this port is, so an operator (or a test) can see it without
/// taking a slot or a measurement permit of its own beyond this connection.
fn port_line(ctx: &Context) -> String {
    let running = MAX_MEASUREMENTS.saturating_sub(ctx.measuring.available_permits());
    format!(
        "monitor port: {} of {MAX_CONNECTIONS} connections open, {running} of {MAX_MEASUREMENTS} \
         perf_metrics measurements running\n",
        ctx.slots.in_use()
    )
}

/// Serves one connection. The slot is busy (cannot be evicted) only while a command runs.
async fn connection(mut stream: TcpStream, ctx: Context, mut stop: watch::Receiver<bool>, slot: Slot) {
    let mut input = Input { buf: Vec::new() };
    let mut interactive = false;
    let mut last: Option<Vec<Token>> = None;
    let mut deadline = tokio::time::Instant::now() + LINE_TIMEOUT;
    loop {
        let reply = match input.line(&mut stream, deadline, &mut stop, &slot).await {
            Read::Line(line) => {
                let words = split(&line);
                let words = if words.is_empty() {
                    match &last {
                        Some(w) => w.clone(),
                        // Nothing to repeat: ignored, as zc.monitor does.
                        None => continue,
                    }
                } else {
                    last = Some(words.clone());
                    words
                };
                if !slot.busy() {
                    // Evicted just before: the newcomer has the slot; nothing runs.
                    return;
                }
                let (text, mode) = execute(&ctx, &words).await;
                slot.idle();
                match mode {
                    Mode::Same => {}
                    Mode::Interactive => interactive = true,
                    Mode::Quit => interactive = false,
                }
                text
            }
            Read::TooLong => {
                interactive = false;
                format!("Error: line too long (more than {MAX_LINE} bytes); closing\n")
            }
            Read::TimedOut => {
                let limit = if interactive { IDLE_TIMEOUT } else { LINE_TIMEOUT };
                interactive = false;
                format!("Error: no complete command line within {} s; closing\n", limit.as_secs())
            }
            Read::Evicted => {
                // Best effort, never waiting: the client may not read at all.
                let _ = stream.try_write(EVICTED.as_bytes());
                return;
            }
            // The client went away (or we are stopping) before ending its line: nothing runs.
            Read::Eof | Read::Shutdown => return,
            Read::Failed(e) => {
                tracing::debug!("monitor connection: {e}");
                return;
            }
        };
        let write = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(reply.as_bytes()));
        let written = tokio::select! {
            w = write => w,
            () = slot.evicted() => {
                tracing::debug!("monitor connection: evicted while writing its reply");
                return;
            }
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("monitor connection: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("monitor connection: client did not read its reply; dropped");
                return;
            }
        }
        if !interactive {
            break;
        }
        deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    }
    tokio::select! {
        () = close(stream) => {}
        () = slot.evicted() => {}
    }
}

/// How a command changes the connection's mode.
enum Mode {
    Same,
    Interactive,
    Quit,
}

/// Runs a command (`words` is not empty) and returns its reply.
async fn execute(ctx: &Context, words: &[Token]) -> (String, Mode) {
    let state = &ctx.state;
    let Some((name, args)) = words.split_first() else {
        return (String::new(), Mode::Same);
    };
    let Some(command) = lookup(name) else {
        return (invalid(name), Mode::Same);
    };
    let arity = |max: usize| -> Option<String> {
        (args.len() > max).then(|| {
            let plural = if max == 1 { "" } else { "s" };
            format!("Error: {} takes at most {max} argument{plural} ({} given)\n", name.text(), args.len())
        })
    };
    match command {
        Command::HealthCheck => {
            if let Some(e) = arity(0) {
                return (e, Mode::Same);
            }
            (format!("{}\n", state.health().message), Mode::Same)
        }
        Command::Help => {
            if let Some(e) = arity(1) {
                return (e, Mode::Same);
            }
            (help(args.first()), Mode::Same)
        }
        Command::Interactive => {
            if let Some(e) = arity(0) {
                return (e, Mode::Same);
            }
            ("Interactive mode on.  Use \"quit\" To exit.\n".into(), Mode::Interactive)
        }
        Command::Quit => {
            if let Some(e) = arity(0) {
                return (e, Mode::Same);
            }
            ("Goodbye.\n".into(), Mode::Quit)
        }
        Command::Monitor => {
            if let Some(e) = arity(1) {
                return (e, Mode::Same);
            }
            let mut text = crate::report::monitor_text(&state.job().view());
            text.push_str(&port_line(ctx));
            (text, Mode::Same)
        }
        Command::PerfMetrics => {
            if let Some(e) = arity(2) {
                return (e, Mode::Same);
            }
            let interval = match perf_interval(args) {
                Ok(i) => i,
                Err(e) => return (e, Mode::Same),
            };
            // A measurement holds its connection (busy, so not evictable) for its interval.
            let permit = match interval {
                None => None,
                Some(_) => match Arc::clone(&ctx.measuring).try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let e = format!(
                            "Error: too many perf_metrics measurements at once (limit {MAX_MEASUREMENTS}); \
                             try again later, or without an interval\n"
                        );
                        return (e, Mode::Same);
                    }
                },
            };
            let state = Arc::clone(state);
            let run = async move {
                let doc = state.perf_metrics(interval).await;
                drop(permit);
                doc
            };
            match tokio::spawn(run).await {
                // serde_json's compact form escapes newlines in strings: one line.
                Ok(doc) => (format!("{doc}\n"), Mode::Same),
                Err(e) => (failed("perf_metrics", &e), Mode::Same),
            }
        }
        Command::Pollsters => {
            if let Some(e) = arity(0) {
                return (e, Mode::Same);
            }
            match state.pollsters() {
                Some(p) => (format!("{}\n", p.describe()), Mode::Same),
                None => (no_pollsters(), Mode::Same),
            }
        }
        Command::SetInterval | Command::SetPollsters => (control(state, command, args), Mode::Same),
    }
}

fn no_pollsters() -> String {
    "Error: this aggregator runs no system pollsters\n".into()
}

/// `set_interval SECONDS` and `set_pollsters NAME,...`: refused without `--allow-control`; the
/// reply line otherwise.
fn control(state: &State, command: Command, args: &[Token]) -> String {
    let name = if command == Command::SetInterval { "set_interval" } else { "set_pollsters" };
    if !state.allow_control() {
        return format!(
            "Error: {name} is refused: the aggregator was not started with --allow-control (the \
             monitor port has no authentication)\n"
        );
    }
    let Some(pollsters) = state.pollsters() else { return no_pollsters() };
    let reply = match command {
        Command::SetInterval => match interval_arg(args) {
            Ok(secs) => pollsters.set_interval(secs),
            Err(e) => Err(e),
        },
        _ => match pollsters_arg(args) {
            Ok(list) => pollsters.set_enabled(&list),
            Err(e) => Err(e),
        },
    };
    let mut line = reply.unwrap_or_else(|e| e);
    line.push('\n');
    line
}

/// `set_interval`'s one argument, parsed like the configuration's `interval_seconds`.
fn interval_arg(args: &[Token]) -> Result<crate::parsed::Seconds, String> {
    let [one] = args else {
        return Err(format!(
            "Error: set_interval takes one argument, the seconds between two polls ({} given), \
             e.g. set_interval 30",
            args.len()
        ));
    };
    let text = one.text();
    let secs: f64 = text.trim().parse().map_err(|_| {
        format!("Error: set_interval {}: {}", one.repr(), crate::parsed::Seconds::allowed(true))
    })?;
    crate::parsed::Seconds::new(secs, true).map_err(|e| format!("Error: set_interval {}: {e}", one.repr()))
}

/// `set_pollsters`'s names: the arguments joined (`cpu,loadavg` or `cpu, loadavg`), `none` for
/// none.
fn pollsters_arg(args: &[Token]) -> Result<Vec<crate::pollsters::Pollster>, String> {
    if args.is_empty() {
        return Err("Error: set_pollsters takes the pollsters to run, comma-separated (e.g. \
                    set_pollsters cpu,loadavg), or none"
            .into());
    }
    let joined = args.iter().map(Token::text).collect::<Vec<_>>().join(" ");
    crate::pollsters::parse_list(&joined).map_err(|e| format!("Error: set_pollsters: {e}"))
}

fn failed(what: &str, e: &tokio::task::JoinError) -> String {
    tracing::error!("monitor port: {what} failed: {e}");
    format!("Error: {what} failed; see the aggregator's log\n")
}

/// The `perf_metrics` interval from its arguments: `[interval]` or `[db|-] [interval]`. A single
/// argument that is not a number is ftw.monitor's database name, which does not apply: ignored.
fn perf_interval(args: &[Token]) -> Result<Option<f64>, String> {
    let given = match args {
        [] => return Ok(None),
        [one] if one.text().trim().parse::<f64>().is_err() => return Ok(None),
        [one] => one,
        [_, two, ..] => two,
    };
    match given.text().trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_INTERVAL => Ok(Some(v)),
        _ => Err(format!(
            "Error: perf_metrics interval must be a number of seconds in (0, {MAX_INTERVAL}], not {}\n",
            given.repr()
        )),
    }
}

fn lookup(name: &Token) -> Option<Command> {
    let name = name.to_utf8()?;
    COMMANDS.iter().find(|(n, _, _)| *n == name).map(|(_, c, _)| *c)
}

fn invalid(name: &Token) -> String {
    format!("Invalid command {}\nTry \"help\".\n", name.repr())
}

/// `help` and `help COMMAND`.
fn help(topic: Option<&Token>) -> String {
    match topic {
        None => {
            let mut lines: Vec<String> = COMMANDS
                .iter()
                .map(|(name, _, doc)| format!("{name} -- {}", doc.split('\n').next().unwrap_or("?")))
                .collect();
            lines.sort();
            let mut out = String::from("Supported commands:\n");
            for l in lines {
                let _ = writeln!(out, "  {l}");
            }
            out
        }
        Some(topic) => match topic.to_utf8().and_then(|t| COMMANDS.iter().find(|(n, _, _)| *n == t)) {
            Some((name, _, doc)) => format!("Help for {name}:\n\n{doc}\n"),
            None => invalid(topic),
        },
    }
}

/// One unit of a received line: a character, or a byte that is not part of valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Char(char),
    Byte(u8),
}

/// A word of a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Token(Vec<Unit>);

impl Token {
    /// The word as a string, if it is valid UTF-8.
    fn to_utf8(&self) -> Option<String> {
        self.0.iter().map(|u| if let Unit::Char(c) = u { Some(*c) } else { None }).collect()
    }

    /// The word as a string, invalid bytes replaced by U+FFFD.
    fn text(&self) -> String {
        self.0.iter().map(|u| if let Unit::Char(c) = u { *c } else { char::REPLACEMENT_CHARACTER }).collect()
    }

    /// Python 3's `repr` of the word as a `str`; bytes that are not UTF-8 are shown as `\xNN`
    /// (as Python 2's `repr` of a byte string does).
    fn repr(&self) -> String {
        let has = |q: char| self.0.contains(&Unit::Char(q));
        let quote = if has('\'') && !has('"') { '"' } else { '\'' };
        let mut s = String::with_capacity(self.0.len() + 2);
        s.push(quote);
        for u in &self.0 {
            match *u {
                Unit::Byte(b) => {
                    let _ = write!(s, "\\x{b:02x}");
                }
                Unit::Char(c) => match c {
                    '\\' => s.push_str("\\\\"),
                    '\t' => s.push_str("\\t"),
                    '\n' => s.push_str("\\n"),
                    '\r' => s.push_str("\\r"),
                    c if c == quote => {
                        s.push('\\');
                        s.push(c);
                    }
                    c if py_printable(c) => s.push(c),
                    c => {
                        let n = u32::from(c);
                        let _ = if n < 0x100 {
                            write!(s, "\\x{n:02x}")
                        } else if n < 0x10000 {
                            write!(s, "\\u{n:04x}")
                        } else {
                            write!(s, "\\U{n:08x}")
                        };
                    }
                },
            }
        }
        s.push(quote);
        s
    }
}

/// Python's `str.isprintable` for one character: exact for ASCII and Latin-1; for the rest, the
/// control, space-separator and common format characters, private use and noncharacters (not
/// unassigned code points, which would need Unicode tables).
fn py_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let n = u32::from(c);
    let format = matches!(n,
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2 | 0x180e
        | 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff
        | 0xfff9..=0xfffb | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3
        | 0x1d173..=0x1d17a | 0xe0001 | 0xe0020..=0xe007f);
    let private = matches!(n, 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd);
    let nonchar = (0xfdd0..=0xfdef).contains(&n) || n & 0xfffe == 0xfffe;
    !(format || private || nonchar)
}

/// Python's `str.isspace`: Unicode white space plus the information separators `\x1c`–`\x1f`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Decodes a line: UTF-8 characters, and the bytes that are not valid UTF-8 as themselves.
fn decode(mut bytes: &[u8]) -> Vec<Unit> {
    let mut out = Vec::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.extend(s.chars().map(Unit::Char));
                return out;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                out.extend(String::from_utf8_lossy(valid).chars().map(Unit::Char));
                let bad = e.error_len().unwrap_or(rest.len()).min(rest.len());
                out.extend(rest[..bad].iter().map(|&b| Unit::Byte(b)));
                bytes = &rest[bad..];
            }
        }
    }
}

/// `line.strip().split()`.
fn split(line: &[u8]) -> Vec<Token> {
    let mut words = Vec::new();
    let mut word = Vec::new();
    for u in decode(line) {
        if matches!(u, Unit::Char(c) if py_space(c)) {
            if !word.is_empty() {
                words.push(Token(std::mem::take(&mut word)));
            }
        } else {
            word.push(u);
        }
    }
    if !word.is_empty() {
        words.push(Token(word));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection evicted before it ever ran (a fresh one, on a runtime that has not polled it
    /// yet) is told so, then closed.
    #[tokio::test(flavor = "current_thread")]
    async fn an_evicted_connection_is_told_before_it_is_closed() {
        use std::io::Read;
        let tmp = tempfile::tempdir().expect("tempdir");
        let options = crate::aggregator::Options::default();
        let agg = crate::aggregator::Aggregator::open(&tmp.path().join("m"), &options).expect("open");
        let job = crate::job::Job::new(agg, Duration::from_secs(3600));
        let health = crate::health::HealthConfig { min_workers: 1, warmup_url: None };
        let state = State::new(job, health, crate::report::ProcessMetrics::All, None, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let slots = Slots::new(1);
        let Admit::Free(old) = slots.admit() else { panic!("a free slot") };
        let Admit::Evicted(_newcomer) = slots.admit() else { panic!("an eviction") };
        let ctx = Context { state, measuring: Arc::new(Semaphore::new(1)), slots: Arc::clone(&slots) };
        let (_stop_tx, stop) = watch::channel(false);
        connection(stream, ctx, stop, old).await;
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = String::new();
        client.read_to_string(&mut got).expect("read");
        assert_eq!(got, EVICTED);
    }

    fn words(line: &[u8]) -> Vec<String> {
        split(line).iter().map(Token::repr).collect()
    }

    #[test]
    fn splitting_is_python_strip_split() {
        assert_eq!(words(b"  health_check \r"), ["'health_check'"]);
        assert_eq!(words(b"perf_metrics\t-\x0b2"), ["'perf_metrics'", "'-'", "'2'"]);
        assert_eq!(words(b"a\x1cb"), ["'a'", "'b'"]);
        assert_eq!(words("a\u{a0}b\u{3000}c".as_bytes()), ["'a'", "'b'", "'c'"]);
        assert!(words(b" \r\t").is_empty());
    }

    #[test]
    fn repr_is_pythons() {
        let r = |b: &[u8]| Token(decode(b)).repr();
        assert_eq!(r(b"x"), "'x'");
        assert_eq!(r(b"it's"), "\"it's\"");
        assert_eq!(r(b"'\""), "'\\'\"'");
        assert_eq!(r(b"a\\b"), "'a\\\\b'");
        assert_eq!(r(b"\x00\x01\x7f"), "'\\x00\\x01\\x7f'");
        assert_eq!(r("héllo€".as_bytes()), "'héllo€'");
        assert_eq!(r("\u{85}\u{a0}\u{ad}\u{200b}\u{e000}".as_bytes()), "'\\x85\\xa0\\xad\\u200b\\ue000'");
        assert_eq!(r("\u{10ffff}".as_bytes()), "'\\U0010ffff'");
        assert_eq!(r(b"\xff\xfeok\xc3"), "'\\xff\\xfeok\\xc3'");
        assert_eq!(r("é".as_bytes()), "'é'");
    }

    #[test]
    fn perf_metrics_arguments() {
        let t = |s: &str| split(s.as_bytes());
        assert_eq!(perf_interval(&t("")), Ok(None));
        assert_eq!(perf_interval(&t("main")), Ok(None));
        assert_eq!(perf_interval(&t("-")), Ok(None));
        assert_eq!(perf_interval(&t("2.5")), Ok(Some(2.5)));
        assert_eq!(perf_interval(&t("- 10")), Ok(Some(10.0)));
        assert_eq!(perf_interval(&t("main 0.1")), Ok(Some(0.1)));
        for bad in ["0", "-1", "10.5", "nan", "inf", "- x"] {
            assert!(perf_interval(&t(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn set_interval_and_set_pollsters_arguments() {
        use crate::pollsters::Pollster;
        let t = |s: &str| split(s.as_bytes());
        assert_eq!(interval_arg(&t("30")), Ok(crate::parsed::Seconds::from_secs(30)));
        assert_eq!(interval_arg(&t("0.5")).map(|s| s.get()), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "1e20", "31536001", "x", ""] {
            let e = interval_arg(&t(bad)).unwrap_err();
            assert!(e.starts_with("Error: set_interval"), "{bad}: {e}");
        }
        assert_eq!(
            interval_arg(&t("0")).unwrap_err(),
            "Error: set_interval '0': 0 is not allowed: write a number of seconds more than 0 and \
             at most 31536000 (one year)"
        );
        assert!(interval_arg(&t("1 2")).unwrap_err().contains("takes one argument"));
        assert_eq!(pollsters_arg(&t("cpu,loadavg")), Ok(vec![Pollster::Cpu, Pollster::Loadavg]));
        assert_eq!(pollsters_arg(&t("cpu, filesystem")), Ok(vec![Pollster::Cpu, Pollster::Filesystem]));
        assert_eq!(pollsters_arg(&t("none")), Ok(vec![]));
        assert!(pollsters_arg(&t("")).unwrap_err().contains("or none"));
        let e = pollsters_arg(&t("cpu,gpu")).unwrap_err();
        assert!(e.starts_with("Error: set_pollsters: unknown pollster \"gpu\""), "{e}");
        assert!(pollsters_arg(&t("cpu,cpu")).unwrap_err().contains("twice"));
    }

    #[test]
    fn help_lists_sorted_commands() {
        let h = help(None);
        assert!(h.starts_with("Supported commands:\n  health_check -- "), "{h}");
        let names: Vec<&str> =
            h.lines().skip(1).map(|l| l.trim_start().split(" -- ").next().unwrap_or("")).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), COMMANDS.len());
    }
}
