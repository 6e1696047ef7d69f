//! uWSGI's own statistics: polling its stats server (`[[uwsgi_stats]]`) into labelled metrics.
//!
//! # Why
//!
//! uWSGI knows per-worker figures that no application writes: requests, exceptions, status,
//! respawns, average response time, RSS/VSZ, listen queue. Its stats server (`stats =
//! 127.0.0.1:1717`, or a unix socket) writes them as one JSON document to whoever connects, then
//! closes. uwsgi_exporter turns that into Prometheus metrics, but as a second exporter with a
//! second port and a second scrape; here the same figures join the application's merged metrics in
//! the one `/metrics` of the job, and the threshold rules, pushers and text dir see them too.
//!
//! # How
//!
//! - One poller per `[[uwsgi_stats]]` section, on a tokio task of its own: every `freq_seconds`
//!   it connects, reads the whole reply (at most [`MAX_REPLY`] bytes, connect and read together
//!   within `timeout_seconds`), parses it into typed structs (missing fields are 0, unknown fields
//!   are ignored) and converts it into series, which it stores. The job asks [`Pollers`] for its
//!   families inside every merge, so [`Source::families`] only copies what was stored: no I/O,
//!   and a stats server that hangs, floods or lies never delays a scrape.
//! - Names and labels are uwsgi_exporter's (`uwsgi_worker_requests_total{worker_id="1"}`, …), so
//!   its dashboards work, with one difference: its constant label `stats_uri` is `stats` here,
//!   holding the section's `name` (default: its address), and `uwsgi_up` carries it too (one
//!   aggregator may poll several stats servers).
//! - A failed poll (refused, timed out, not JSON, not uWSGI's, too large) sets `uwsgi_up` to 0,
//!   counts `shmetrics_uwsgi_stats_errors_total`, is logged (the first failure at once, then at
//!   most one line a minute while it keeps failing, and one line when it answers again), and
//!   removes every other series of that server, as uwsgi_exporter does: the last good values are
//!   not served as if they were current (a worker's `uwsgi_worker_busy` of an hour ago is a lie
//!   now). Counters of uWSGI's start again from uWSGI's own values when it answers again.
//!   Before a server's first poll has ended it has no `uwsgi_up` at all (not a false 0); its
//!   `shmetrics_uwsgi_stats_polls_total` and `_errors_total` are there from the start.
//! - A host name is resolved on tokio's blocking pool, which the scrapes share: at most one look-up
//!   per poller is in flight, so a resolver that hangs costs one thread, not one per poll.
//!
//! Reload (SIGHUP): a section that stays the same keeps its poller; a changed one is restarted
//! (its counters continue); a removed one stops and its series go.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::de::{IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::job::{Job, Source};
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Value};
use crate::parsed::{seconds_key, Seconds};

/// The largest reply read from a stats server: 16 MiB. uWSGI's reply is a few kB per worker (with
/// cores and apps), so this leaves room for thousands of workers and stops an endless stream.
pub(crate) const MAX_REPLY: usize = 16 << 20;

/// The most workers (and sockets, and caches) taken from one reply: more is not uWSGI's (and
/// would make a hostile reply a flood of series).
const MAX_ITEMS: usize = 10_000;

/// Shortest time between two log lines about a stats server that keeps failing.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// One `[[uwsgi_stats]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatsSpec {
    /// `host:port`, a unix socket path (starting with `/`) or an abstract unix socket (`@name`).
    pub address: StatsAddress,
    /// The value of the `stats` label of its series (default: the address as written).
    #[serde(default)]
    pub name: Option<StatsName>,
    /// Seconds between polls (default 5).
    #[serde(default = "default_freq", deserialize_with = "freq_seconds")]
    pub freq_seconds: Seconds,
    /// Connecting and reading the whole reply must take at most this many seconds (default 2).
    #[serde(default = "default_timeout", deserialize_with = "timeout_seconds")]
    pub timeout_seconds: Seconds,
    /// The stats server was started with `--stats-http`: ask with `GET /` and read the JSON
    /// after the HTTP headers.
    #[serde(default, deserialize_with = "http")]
    pub http: bool,
}

fn default_freq() -> Seconds {
    Seconds::from_secs(5)
}

fn default_timeout() -> Seconds {
    Seconds::from_secs(2)
}

seconds_key!(freq_seconds, true);
seconds_key!(timeout_seconds, true);

/// `http`: a boolean, or an error naming the key.
fn http<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Boolean(b) => Ok(b),
        other => Err(serde::de::Error::custom(format!(
            "http = {other} is not allowed: write http = true (uWSGI runs with --stats-http) or \
             http = false"
        ))),
    }
}

impl StatsSpec {
    /// The `stats` label of its series: `name`, or the address as written.
    pub fn label(&self) -> &str {
        match &self.name {
            Some(n) => &n.0,
            None => &self.address.text,
        }
    }
}

/// Checks a whole list of sections: each `stats` label (`name`, default the address) is used
/// once, or their series would be one another's.
pub(crate) fn check(specs: &[StatsSpec]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for s in specs {
        if !seen.insert(s.label()) {
            return Err(format!(
                "[[uwsgi_stats]]: two sections are named {:?} (name, or else address): give each \
                 a name of its own",
                s.label()
            ));
        }
    }
    Ok(())
}

/// Where a stats server listens, parsed when the configuration is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StatsAddress {
    /// As written in the configuration.
    pub text: String,
    kind: AddressKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AddressKind {
    /// `host:port` (the host may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp { host: String, port: u16 },
    /// A unix socket path.
    Unix(std::path::PathBuf),
    /// A Linux abstract unix socket name (without the `@`).
    Abstract(String),
}

impl TryFrom<String> for StatsAddress {
    type Error = String;
    fn try_from(text: String) -> Result<StatsAddress, String> {
        let bad = || {
            format!(
                "address = {text:?}: write host:port (\"127.0.0.1:1717\"), a unix socket path \
                 starting with / (\"/run/uwsgi/stats.sock\"), or @name for an abstract socket"
            )
        };
        let kind = if text.starts_with('/') {
            AddressKind::Unix(text.clone().into())
        } else if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() || name.contains('\0') {
                return Err(bad());
            }
            AddressKind::Abstract(name.to_string())
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
            let host = match host.strip_prefix('[') {
                Some(h) => h.strip_suffix(']').filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok()),
                None => Some(host).filter(|h| !h.contains(':')),
            }
            .filter(|h| !h.is_empty() && !h.chars().any(char::is_whitespace))
            .ok_or_else(bad)?;
            AddressKind::Tcp { host: host.to_string(), port }
        };
        Ok(StatsAddress { text, kind })
    }
}

/// The `stats` label value of a section: not empty.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StatsName(String);

impl TryFrom<String> for StatsName {
    type Error = String;
    fn try_from(s: String) -> Result<StatsName, String> {
        if s.is_empty() {
            return Err("name = \"\": write a name for the stats label, or leave name out (the \
                        address is the default)"
                .into());
        }
        Ok(StatsName(s))
    }
}

// ---------------------------------------------------------------------------------------------
// The stats server's JSON (uWSGI's `uwsgi_stats` in core/master_utils.c): only what is exposed.

/// A JSON number as uWSGI writes them: unsigned mostly (`%llu`), signed in places; `null` is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Num(Option<u64>, f64);

impl Num {
    fn u64(self) -> u64 {
        // A negative or fractional value as an unsigned count: its integer part, at least 0.
        self.0.unwrap_or(self.1 as u64)
    }
    fn f64(self) -> f64 {
        self.1
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Num, E> {
                Ok(Num(Some(v), v as f64))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Num, E> {
                Ok(Num(u64::try_from(v).ok(), v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Num, E> {
                Ok(Num(None, v))
            }
            fn visit_unit<E>(self) -> Result<Num, E> {
                Ok(Num::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON string, or `null` (empty).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Option<String>")]
struct Text(String);

impl From<Option<String>> for Text {
    fn from(s: Option<String>) -> Text {
        Text(s.unwrap_or_default())
    }
}

/// The whole reply. `workers` is required: a JSON object without it is not uWSGI's.
#[derive(Debug, Deserialize)]
struct Stats {
    #[serde(default)]
    listen_queue: Num,
    #[serde(default)]
    listen_queue_errors: Num,
    #[serde(default)]
    signal_queue: Num,
    #[serde(default)]
    sockets: Vec<Socket>,
    workers: Vec<Worker>,
    #[serde(default)]
    caches: Vec<Cache>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Socket {
    name: Text,
    proto: Text,
    queue: Num,
    max_queue: Num,
    shared: Num,
    can_offload: Num,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Worker {
    id: Num,
    accepting: Num,
    requests: Num,
    delta_requests: Num,
    exceptions: Num,
    harakiri_count: Num,
    signals: Num,
    signal_queue: Num,
    status: Text,
    rss: Num,
    vsz: Num,
    /// Microseconds.
    running_time: Num,
    /// Unix seconds.
    last_spawn: Num,
    respawn_count: Num,
    tx: Num,
    /// Microseconds.
    avg_rt: Num,
    apps: Vec<IgnoredAny>,
    cores: Vec<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Cache {
    name: Text,
    hits: Num,
    misses: Num,
    full: Num,
    items: Num,
    max_items: Num,
}

// ---------------------------------------------------------------------------------------------
// The metrics: uwsgi_exporter's names, helps and labels (`stats` for its `stats_uri`).

/// One exposed family.
struct Def {
    name: &'static str,
    help: &'static str,
    counter: bool,
    labels: &'static [&'static str],
}

const TOP: &[&str] = &["stats"];
const WORKER: &[&str] = &["stats", "worker_id"];
const NAMED: &[&str] = &["stats", "name"];
const SOCKET: &[&str] = &["stats", "name", "proto"];

const fn g(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Def {
    Def { name, help, counter: false, labels }
}

const fn c(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Def {
    Def { name, help, counter: true, labels }
}

// Indexes into DEFS.
const UP: usize = 0;
const ERRORS: usize = 1;
const POLLS: usize = 2;
const LISTEN_QUEUE: usize = 3;
const LISTEN_QUEUE_ERRORS: usize = 4;
const SIGNAL_QUEUE: usize = 5;
const WORKERS: usize = 6;
const SOCKET_FIRST: usize = 7;
const WORKER_FIRST: usize = SOCKET_FIRST + 4;
const CACHE_FIRST: usize = WORKER_FIRST + 19;

/// Counter names without `_total` (the exposition adds it).
const DEFS: &[Def] = &[
    g("uwsgi_up", "Whether the last poll of the uWSGI stats server worked (1) or not (0).", TOP),
    c("shmetrics_uwsgi_stats_errors", "Polls of the uWSGI stats server that failed.", TOP),
    c("shmetrics_uwsgi_stats_polls", "Polls of the uWSGI stats server, failed or not.", TOP),
    g("uwsgi_listen_queue_length", "Length of listen queue.", TOP),
    g("uwsgi_listen_queue_errors", "Number of listen queue errors.", TOP),
    g("uwsgi_signal_queue_length", "Length of signal queue.", TOP),
    g("uwsgi_workers", "Number of workers.", TOP),
    // Sockets (SOCKET_FIRST..).
    g("uwsgi_socket_queue_length", "Length of socket queue.", SOCKET),
    g("uwsgi_socket_max_queue_length", "Max length of socket queue.", SOCKET),
    g("uwsgi_socket_shared", "Is shared socket?", SOCKET),
    g("uwsgi_socket_can_offload", "Can socket offload?", SOCKET),
    // Workers (WORKER_FIRST..), in the order of `worker_values`.
    g("uwsgi_worker_accepting", "Is this worker accepting requests?", WORKER),
    g("uwsgi_worker_delta_requests", "Number of delta requests", WORKER),
    g("uwsgi_worker_signal_queue_length", "Length of signal queue.", WORKER),
    g("uwsgi_worker_rss_bytes", "Worker RSS bytes.", WORKER),
    g("uwsgi_worker_vsz_bytes", "Worker VSZ bytes.", WORKER),
    g("uwsgi_worker_running_time_seconds", "Worker running time in seconds.", WORKER),
    g("uwsgi_worker_last_spawn_time_seconds", "Last spawn time in seconds since epoch.", WORKER),
    g("uwsgi_worker_average_response_time_seconds", "Average response time in seconds.", WORKER),
    g("uwsgi_worker_apps", "Number of apps.", WORKER),
    g("uwsgi_worker_cores", "Number of cores.", WORKER),
    g("uwsgi_worker_busy", "Is core in busy", WORKER),
    g("uwsgi_worker_idle", "Is core in idle", WORKER),
    g("uwsgi_worker_cheap", "Is core in cheap mode", WORKER),
    c("uwsgi_worker_requests", "Total number of requests.", WORKER),
    c("uwsgi_worker_exceptions", "Total number of exceptions.", WORKER),
    c("uwsgi_worker_harakiri_count", "Total number of harakiri count.", WORKER),
    c("uwsgi_worker_signals", "Total number of signals.", WORKER),
    c("uwsgi_worker_respawn_count", "Total number of respawn count.", WORKER),
    c("uwsgi_worker_transmitted_bytes", "Worker transmitted bytes.", WORKER),
    // Caches (CACHE_FIRST..).
    c("uwsgi_cache_hits", "Total number of hits.", NAMED),
    c("uwsgi_cache_misses", "Total number of misses.", NAMED),
    c("uwsgi_cache_full", "Total Number of times cache full was hit.", NAMED),
    g("uwsgi_cache_items", "Items in cache.", NAMED),
    g("uwsgi_cache_max_items", "Max items for this cache.", NAMED),
];

const USEC: f64 = 1e6;

/// A worker's values, in the order of its families in [`DEFS`] from [`WORKER_FIRST`].
fn worker_values(w: &Worker) -> [Value; 19] {
    let gauge = |n: Num| Value::F64(n.f64());
    let counter = |n: Num| Value::U64(n.u64());
    let status = |s: &str| Value::F64(if w.status.0 == s { 1.0 } else { 0.0 });
    [
        gauge(w.accepting),
        gauge(w.delta_requests),
        gauge(w.signal_queue),
        gauge(w.rss),
        gauge(w.vsz),
        Value::F64(w.running_time.f64() / USEC),
        gauge(w.last_spawn),
        Value::F64(w.avg_rt.f64() / USEC),
        Value::F64(w.apps.len() as f64),
        Value::F64(w.cores.len() as f64),
        status("busy"),
        status("idle"),
        status("cheap"),
        counter(w.requests),
        counter(w.exceptions),
        counter(w.harakiri_count),
        counter(w.signals),
        counter(w.respawn_count),
        counter(w.tx),
    ]
}

/// Series of one poller, by index into [`DEFS`].
type Series = Vec<Vec<(Arc<LabelSet>, Value)>>;

/// The series of one good reply (without `uwsgi_up` and the poller's own counters), labelled
/// `stats="<name>"`. Workers with id 0 (uWSGI's stand-by slots in cheaper mode) are left out, as
/// uwsgi_exporter does; of workers, sockets and caches listed twice, the first one counts.
fn convert(stats: &Stats, name: &str) -> Series {
    let mut out: Series = DEFS.iter().map(|_| Vec::new()).collect();
    let top = LabelSet::shared(&[("stats", name)]);
    let mut put = |i: usize, l: &Arc<LabelSet>, v: Value| out[i].push((Arc::clone(l), v));
    let workers: Vec<&Worker> = {
        let mut seen = HashSet::new();
        stats.workers.iter().filter(|w| w.id.u64() != 0 && seen.insert(w.id.u64())).collect()
    };
    put(LISTEN_QUEUE, &top, Value::F64(stats.listen_queue.f64()));
    put(LISTEN_QUEUE_ERRORS, &top, Value::F64(stats.listen_queue_errors.f64()));
    put(SIGNAL_QUEUE, &top, Value::F64(stats.signal_queue.f64()));
    put(WORKERS, &top, Value::F64(workers.len() as f64));
    let mut seen = HashSet::new();
    for s in stats.sockets.iter().filter(|s| seen.insert((&s.name.0, &s.proto.0))) {
        let l = LabelSet::shared(&[("stats", name), ("name", &s.name.0), ("proto", &s.proto.0)]);
        for (i, n) in [s.queue, s.max_queue, s.shared, s.can_offload].into_iter().enumerate() {
            put(SOCKET_FIRST + i, &l, Value::F64(n.f64()));
        }
    }
    for w in workers {
        let l = LabelSet::shared(&[("stats", name), ("worker_id", &w.id.u64().to_string())]);
        for (i, v) in worker_values(w).into_iter().enumerate() {
            put(WORKER_FIRST + i, &l, v);
        }
    }
    let mut seen = HashSet::new();
    for cache in stats.caches.iter().filter(|c| seen.insert(&c.name.0)) {
        let l = LabelSet::shared(&[("stats", name), ("name", &cache.name.0)]);
        let counters = [cache.hits, cache.misses, cache.full].map(|n| Value::U64(n.u64()));
        let gauges = [cache.items, cache.max_items].map(|n| Value::F64(n.f64()));
        for (i, v) in counters.into_iter().chain(gauges).enumerate() {
            put(CACHE_FIRST + i, &l, v);
        }
    }
    out
}

/// Parses a reply body (the JSON) and converts it.
fn parse(body: &[u8], name: &str) -> Result<Series, String> {
    let stats: Stats = serde_json::from_slice(body).map_err(|e| {
        if e.is_eof() {
            format!("the reply ends in the middle of the JSON ({} bytes): {e}", body.len())
        } else {
            format!("the reply is not uWSGI's stats JSON: {e}")
        }
    })?;
    let most = stats.workers.len().max(stats.sockets.len()).max(stats.caches.len());
    if most > MAX_ITEMS {
        return Err(format!(
            "the reply lists {most} workers, sockets or caches (at most {MAX_ITEMS} are taken)"
        ));
    }
    Ok(convert(&stats, name))
}

/// The JSON of an HTTP reply (`--stats-http`): status 200, body after the headers.
fn http_body(reply: &[u8]) -> Result<&[u8], String> {
    let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if reply.starts_with(b"HTTP/") {
            "the HTTP reply ends before its headers do".into()
        } else {
            "the reply is not HTTP (is the stats server started without --stats-http? then set \
             http = false)"
                .into()
        });
    };
    let status_line = String::from_utf8_lossy(reply.split(|b| *b == b'\r').next().unwrap_or_default());
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(&reply[end + 4..]),
        (Some(v), Some(_)) if v.starts_with("HTTP/") => {
            Err(format!("the stats server answered {status_line:?}"))
        }
        _ => Err("the reply is not HTTP (is the stats server started without --stats-http? then set \
                  http = false)"
            .into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Polling.

/// Reads the whole reply of a connected stats server, at most [`MAX_REPLY`] bytes. In HTTP mode,
/// sends the request first.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, http: bool) -> Result<Vec<u8>, String> {
    if http {
        s.write_all(b"GET / HTTP/1.0\r\nHost: uwsgi\r\nUser-Agent: shmetrics\r\n\r\n")
            .await
            .map_err(|e| format!("cannot send the HTTP request: {e}"))?;
    }
    let mut reply = Vec::new();
    (&mut s)
        .take(MAX_REPLY as u64 + 1)
        .read_to_end(&mut reply)
        .await
        .map_err(|e| format!("cannot read the reply: {e}"))?;
    if reply.len() > MAX_REPLY {
        return Err(format!("the reply is longer than {} MiB", MAX_REPLY >> 20));
    }
    if reply.is_empty() {
        return Err(if http {
            "the stats server closed the connection without a reply".into()
        } else {
            "the stats server closed the connection without a reply (is it started with \
             --stats-http? then set http = true)"
                .into()
        });
    }
    Ok(reply)
}

/// A look-up of a host name in flight: kept across polls when it outlives a poll's timeout.
type Lookup = tokio::task::JoinHandle<std::io::Result<Vec<std::net::SocketAddr>>>;

/// The state a poller keeps between polls (also httpok's checkers': [`crate::alarm::httpok`]).
#[derive(Default)]
pub(crate) struct Conn {
    lookup: Option<Lookup>,
}

impl Conn {
    /// The addresses of `host:port`: an IP address at once, a name through the resolver (one
    /// look-up in flight at most, see the module doc).
    pub(crate) async fn resolve(
        &mut self,
        host: &str,
        port: u16,
    ) -> Result<Vec<std::net::SocketAddr>, String> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![std::net::SocketAddr::new(ip, port)]);
        }
        // Kept in `self` while it runs: when the poll's timeout drops this future, the next poll
        // waits for the same look-up instead of starting another.
        let lookup = self.lookup.get_or_insert_with(|| {
            let target = format!("{host}:{port}");
            tokio::spawn(async move { tokio::net::lookup_host(target).await.map(Iterator::collect) })
        });
        let res = lookup.await;
        self.lookup = None;
        match res {
            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Ok(Ok(_)) => Err(format!("{host} has no address")),
            Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
            Err(e) => Err(format!("cannot resolve {host}: {e}")),
        }
    }
}

/// One poll: connect, read, parse; all within `timeout`.
async fn poll_once(spec: &StatsSpec, conn: &mut Conn) -> Result<Series, String> {
    let timeout = spec.timeout_seconds.get();
    let fetch = async {
        match &spec.address.kind {
            AddressKind::Tcp { host, port } => {
                let addrs = conn.resolve(host, *port).await?;
                let mut last = String::new();
                for a in addrs {
                    match tokio::net::TcpStream::connect(a).await {
                        Ok(s) => return exchange(s, spec.http).await,
                        Err(e) => last = format!("cannot connect to {a}: {e}"),
                    }
                }
                Err(last)
            }
            AddressKind::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
                exchange(s, spec.http).await
            }
            AddressKind::Abstract(name) => {
                let s = tokio::net::UnixStream::connect(format!("\0{name}"))
                    .await
                    .map_err(|e| format!("cannot connect to @{name}: {e}"))?;
                exchange(s, spec.http).await
            }
        }
    };
    let reply = match tokio::time::timeout(timeout, fetch).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no complete reply within {} s", spec.timeout_seconds)),
    };
    let body = if spec.http { http_body(&reply)? } else { &reply };
    parse(body, spec.label())
}

/// What a poller shares with [`Pollers::families`].
struct Shared {
    label: Arc<LabelSet>,
    errors: AtomicU64,
    polls: AtomicU64,
    /// `None` before the first poll ended; then whether the last one worked and its series.
    last: Mutex<Option<(bool, Arc<Series>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rate-limits a poller's log lines about failures.
#[derive(Default)]
struct LogGate {
    /// When the last failure was logged, and failures since.
    failing: Option<(Instant, u64)>,
}

impl LogGate {
    fn failed(&mut self, spec: &StatsSpec, e: &str) {
        match &mut self.failing {
            None => {
                tracing::warn!(stats = spec.label(), "uWSGI stats server {}: {e}", spec.address.text);
                self.failing = Some((Instant::now(), 0));
            }
            Some((at, n)) => {
                *n += 1;
                if at.elapsed() >= LOG_EVERY {
                    tracing::warn!(
                        stats = spec.label(),
                        "uWSGI stats server {}: {e} ({n} failed polls since the last message)",
                        spec.address.text
                    );
                    (*at, *n) = (Instant::now(), 0);
                }
            }
        }
    }

    fn worked(&mut self, spec: &StatsSpec) {
        if self.failing.take().is_some() {
            tracing::info!(stats = spec.label(), "uWSGI stats server {} answers again", spec.address.text);
        }
    }
}

/// A poller's task: polls every `freq_seconds` until aborted.
async fn run(spec: StatsSpec, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(spec.freq_seconds.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = Conn::default();
    let mut gate = LogGate::default();
    loop {
        tick.tick().await;
        let result = poll_once(&spec, &mut conn).await;
        shared.polls.fetch_add(1, Ordering::Relaxed);
        let last = match result {
            Ok(series) => {
                gate.worked(&spec);
                (true, Arc::new(series))
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                gate.failed(&spec, &e);
                (false, Arc::new(Vec::new()))
            }
        };
        *lock(&shared.last) = Some(last);
    }
}

/// One running poller.
struct Poller {
    spec: StatsSpec,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The pollers of every configured stats server; a [`Source`] of the job.
pub struct Pollers {
    runtime: Option<tokio::runtime::Handle>,
    metas: Vec<Arc<FamilyMeta>>,
    pollers: Mutex<Vec<Poller>>,
}

impl Pollers {
    /// Starts polling (on the current tokio runtime) and registers with the job.
    pub fn start(job: &Arc<Job>, specs: &[StatsSpec]) -> Arc<Pollers> {
        let pollers = Arc::new(Pollers::new(tokio::runtime::Handle::try_current().ok()));
        pollers.reload(specs);
        job.add_source(Arc::clone(&pollers) as Arc<dyn Source>);
        pollers
    }

    fn new(runtime: Option<tokio::runtime::Handle>) -> Pollers {
        let metas = DEFS
            .iter()
            .map(|d| {
                let (t, v) = if d.counter {
                    (MetricType::Counter, ValueType::U64)
                } else {
                    (MetricType::Gauge, ValueType::F64)
                };
                FamilyMeta::own(d.name, d.help, t, v, d.labels)
            })
            .collect();
        Pollers { runtime, metas, pollers: Mutex::new(Vec::new()) }
    }

    /// Replaces the configuration (SIGHUP): unchanged sections keep their pollers, changed ones
    /// restart (their counters continue), removed ones stop, new ones start.
    pub fn reload(&self, specs: &[StatsSpec]) {
        let mut pollers = lock(&self.pollers);
        let mut old: HashMap<String, Poller> =
            pollers.drain(..).map(|p| (p.spec.label().to_string(), p)).collect();
        for spec in specs {
            let poller = match old.remove(spec.label()) {
                Some(p) if p.spec == *spec => p,
                Some(p) => self.spawn(spec.clone(), Arc::clone(&p.shared)),
                None => {
                    let shared = Arc::new(Shared {
                        label: LabelSet::shared(&[("stats", spec.label())]),
                        errors: AtomicU64::new(0),
                        polls: AtomicU64::new(0),
                        last: Mutex::new(None),
                    });
                    self.spawn(spec.clone(), shared)
                }
            };
            if pollers.iter().all(|p| p.spec.label() != spec.label()) {
                pollers.push(poller);
            }
        }
        // What is left in `old` is dropped here: those tasks are aborted.
    }

    fn spawn(&self, spec: StatsSpec, shared: Arc<Shared>) -> Poller {
        let task = match &self.runtime {
            Some(rt) => Some(rt.spawn(run(spec.clone(), Arc::clone(&shared)))),
            None => {
                tracing::error!(
                    stats = spec.label(),
                    "no tokio runtime: the uWSGI stats server is not polled"
                );
                None
            }
        };
        Poller { spec, shared, task }
    }
}

impl Source for Pollers {
    /// What the pollers stored last: no I/O, a copy of a few hundred series at most per server.
    fn families(&self) -> Vec<SnapFamily> {
        let mut all: Series = DEFS.iter().map(|_| Vec::new()).collect();
        for p in lock(&self.pollers).iter() {
            let s = &p.shared;
            let label = &s.label;
            all[ERRORS].push((Arc::clone(label), Value::U64(s.errors.load(Ordering::Relaxed))));
            all[POLLS].push((Arc::clone(label), Value::U64(s.polls.load(Ordering::Relaxed))));
            let last = lock(&s.last).clone();
            if let Some((up, series)) = last {
                all[UP].push((Arc::clone(label), Value::F64(if up { 1.0 } else { 0.0 })));
                for (i, fam) in series.iter().enumerate() {
                    if let Some(out) = all.get_mut(i) {
                        out.extend(fam.iter().cloned());
                    }
                }
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
