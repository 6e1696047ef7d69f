//! The aggregator's HTTP endpoint: `/metrics` on its own port, separate from the application's.
//!
//! Built on hyper 1 with content negotiation (Prometheus text 0.0.4 by default, OpenMetrics 1.0.0
//! when `Accept` asks for it) and gzip when `Accept-Encoding` allows.
//!
//! # Many scrapers, one merge
//!
//! A scrape asks the job core (`crate::job::Job::scrape`), which shares one merge among every
//! scrape that arrives while it runs. The response body is shared the same way: it is built once
//! per merged snapshot, view and wire format (`Bodies`), and every request that got the same
//! snapshot sends the same bytes. So 1,000 concurrent scrapers cost a few merges and encodings, not
//! 1,000 (BENCHMARKS.md, section (f)).
//!
//! # Limits
//!
//! Every connection holds a descriptor, buffers and, while its response is being written, the
//! whole response body; without limits, 2,000 concurrent scrapers took the aggregator from 16 to
//! 720 MiB resident, 486 MiB of it still there 30 s later (BENCHMARKS.md, section (e)). So:
//!
//! - [`MAX_CONNECTIONS`] connections at once (their response bodies shared). The next ones get a
//!   short `503` ("too many
//!   connections", `Retry-After: 1`) and are closed, [`MAX_REJECTING`] at a time (further ones are
//!   closed without a word), so refusing costs no more than serving;
//! - [`HEADER_READ_TIMEOUT`]: a request head must arrive within it, or the connection is closed.
//!   hyper (1.x) starts that timer whenever it waits for a request head, so it also closes a
//!   keep-alive connection that stays idle that long after its last response;
//! - [`WRITE_TIMEOUT`]: a connection whose writes make no progress for that long (a client that
//!   does not read its response) is closed. hyper has no write timeout, so the socket is wrapped
//!   in [`WriteTimeout`];
//! - `/perf_metrics?interval=…` holds its connection for the interval: at most
//!   [`MAX_MEASUREMENTS`] at once, the next ones get a `503`;
//! - at most [`MAX_BUILDING`] `/metrics` responses are built at once, the other requests wait
//!   their turn. Merges are serialized by the aggregator's lock anyway, but each request held its
//!   own snapshot and encoded body while dozens of them took turns on two runtime threads: memory
//!   grew with the number of requests waiting, and encoding them all delayed everything else on
//!   those threads (the monitor port's `health_check` included). Four at a time keep the lock and
//!   both threads busy: as many scrapes per second as without a bound (2 cost 10 %), at a third
//!   less memory than without (BENCHMARKS.md, section (e)).
//!
//! These are limits of the connection and request layers only; how scrapes are computed (and
//! shared) is up to the job core.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::State;
use crate::expose::{self, Format};
use crate::job::JobView;
use crate::merge::Snapshot;

/// How long a client may take to send its request head (also: how long a keep-alive connection
/// may stay idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response write may make no progress before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once. Connections that got the same merge share one response body (see
/// `Bodies`), so a connection costs its descriptor and hyper's buffers, not a copy of
/// `/metrics`: 1,000 scrapers at once are all served (the limit was 64 while every connection
/// held a body of its own).
pub const MAX_CONNECTIONS: usize = 1024;
/// Over-limit connections being sent their `503` at once; further ones are closed without a word.
pub const MAX_REJECTING: usize = 32;
/// `/perf_metrics?interval=…` measurements running at once.
pub const MAX_MEASUREMENTS: usize = 4;
/// `/metrics` responses being built (merged, encoded, compressed) at once; the other requests
/// wait their turn.
pub const MAX_BUILDING: usize = 4;
/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time allowed to write a `503` to an over-limit connection, and then to drain its request.
const REJECT_TIMEOUT: Duration = Duration::from_secs(1);
/// At most this much of an over-limit connection's request is drained before closing.
const REJECT_DRAIN_BYTES: usize = 64 * 1024;
/// At most one "too many connections" warning in the log per this period.
const REJECT_LOG_PERIOD: Duration = Duration::from_secs(10);

/// A `/metrics` body, and what it was built from.
struct Body {
    snapshot: Arc<Snapshot>,
    view: Arc<JobView>,
    format: Format,
    gzip: bool,
    bytes: Bytes,
    /// `Content-Encoding` (`gzip`), if compressed.
    encoding: Option<&'static str>,
}

/// The latest body of each wire format: requests that got the same merged snapshot (and view) send
/// the same bytes instead of encoding and compressing them again.
#[derive(Default)]
struct Bodies {
    latest: Mutex<Vec<Arc<Body>>>,
}

impl Bodies {
    fn get(
        &self,
        snapshot: &Arc<Snapshot>,
        view: &Arc<JobView>,
        format: Format,
        gzip: bool,
    ) -> Option<Arc<Body>> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest
            .iter()
            .find(|b| {
                Arc::ptr_eq(&b.snapshot, snapshot)
                    && Arc::ptr_eq(&b.view, view)
                    && b.format == format
                    && b.gzip == gzip
            })
            .cloned()
    }

    fn put(&self, body: Arc<Body>) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest.retain(|b| !(b.format == body.format && b.gzip == body.gzip));
        latest.push(body);
    }
}

/// Whether `Accept-Encoding` allows gzip (present and not `q=0`).
pub fn accepts_gzip(header: Option<&str>) -> bool {
    header.is_some_and(|h| {
        h.split(',').any(|part| {
            let mut p = part.split(';').map(str::trim);
            let coding = p.next().unwrap_or("");
            (coding.eq_ignore_ascii_case("gzip") || coding == "*")
                && !p.any(|q| q.strip_prefix("q=").and_then(|q| q.parse::<f64>().ok()) == Some(0.0))
        })
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

const INDEX: &str = "shmetrics aggregator\n\n\
/metrics       job-wide metrics (Prometheus text 0.0.4, OpenMetrics 1.0.0 by Accept)\n\
/healthz       200 OK, or 503 with the reason\n\
/perf_metrics  JSON: memory, workers, metrics statistics (?interval=SECONDS adds CPU %)\n";

/// Permits and caches shared by a server's connections.
struct Limits {
    /// [`MAX_MEASUREMENTS`].
    measuring: Arc<Semaphore>,
    /// [`MAX_BUILDING`].
    building: Semaphore,
    bodies: Bodies,
}

async fn handle(
    state: Arc<State>,
    limits: Arc<Limits>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut().insert("allow", HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let resp = match req.uri().path() {
        "/metrics" => metrics(&state, &limits, &req).await,
        "/healthz" => {
            let h = state.health();
            let status = if h.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            text(status, format!("{}\n", h.message))
        }
        "/perf_metrics" => {
            let interval = req.uri().query().and_then(|q| {
                q.split('&').find_map(|kv| kv.strip_prefix("interval=")).and_then(|v| v.parse::<f64>().ok())
            });
            // Intervals out of range are ignored (no measurement), as `perf::document` does.
            let measures = interval.is_some_and(|i| i > 0.0 && i <= super::MAX_INTERVAL);
            let permit = match measures.then(|| Arc::clone(&limits.measuring).try_acquire_owned()) {
                Some(Err(_)) => {
                    return Ok(text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "too many perf_metrics measurements at once (limit {MAX_MEASUREMENTS}); \
                             try again later, or without ?interval\n"
                        ),
                    ));
                }
                Some(Ok(p)) => Some(p),
                None => None,
            };
            let doc = state.perf_metrics(interval).await;
            drop(permit);
            let mut r = Response::new(Full::new(Bytes::from(format!("{doc}\n"))));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        "/" => text(StatusCode::OK, INDEX),
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    };
    Ok(if head { resp.map(|_| Full::new(Bytes::new())) } else { resp })
}

async fn metrics(state: &State, limits: &Limits, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let format = Format::from_accept(header(ACCEPT));
    let gzip = accepts_gzip(header(ACCEPT_ENCODING));
    let Some(snapshot) = state.job().scrape().await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "scrape failed; see the aggregator's log\n");
    };
    // Who is a worker, their figures and the job's CPU time: the latest view.
    let view = state.job().view();
    let body = match limits.bodies.get(&snapshot, &view, format, gzip) {
        Some(b) => b,
        None => {
            // Never closed, so `acquire` cannot fail.
            let _building = limits.building.acquire().await.ok();
            // Another request may have built it while this one waited.
            match limits.bodies.get(&snapshot, &view, format, gzip) {
                Some(b) => b,
                None => {
                    let b = Arc::new(build(state, snapshot, view, format, gzip));
                    limits.bodies.put(Arc::clone(&b));
                    b
                }
            }
        }
    };
    let mut r = Response::new(Full::new(body.bytes.clone()));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    r.headers_mut().insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    if let Some(e) = body.encoding {
        r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    r
}

/// Encodes (and compresses) a merged snapshot with the process and alarm families of `view`.
fn build(state: &State, snapshot: Arc<Snapshot>, view: Arc<JobView>, format: Format, gzip: bool) -> Body {
    let mut extra = crate::report::process_families(&view, &snapshot, state.process_metrics());
    if let Some(a) = state.alarms() {
        extra.extend(crate::report::alarm_families(&a));
    }
    let body = expose::encode_with(&snapshot, &extra, format).into_bytes();
    let (body, encoding) = if gzip {
        let mut enc =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        match enc.write_all(&body).and_then(|()| enc.finish()) {
            Ok(z) => (z, Some("gzip")),
            Err(_) => (body, None),
        }
    } else {
        (body, None)
    };
    Body { snapshot, view, format, gzip, bytes: Bytes::from(body), encoding }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then gives in-flight requests a few
/// seconds to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let serving = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let limits = Arc::new(Limits {
        measuring: Arc::new(Semaphore::new(MAX_MEASUREMENTS)),
        building: Semaphore::new(MAX_BUILDING),
        bodies: Bodies::default(),
    });
    let mut last_reject_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&serving).try_acquire_owned() else {
            if last_reject_log.is_none_or(|t| t.elapsed() >= REJECT_LOG_PERIOD) {
                tracing::warn!(%peer, "HTTP: more than {MAX_CONNECTIONS} connections; refusing");
                last_reject_log = Some(Instant::now());
            }
            if let Ok(p) = Arc::clone(&rejecting).try_acquire_owned() {
                tokio::spawn(reject(stream, p));
            }
            // Else the stream is dropped: closed without a word.
            continue;
        };
        let (state, limits) = (Arc::clone(&state), Arc::clone(&limits));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(WriteTimeout::new(stream, WRITE_TIMEOUT)),
                hyper::service::service_fn(move |req| handle(Arc::clone(&state), Arc::clone(&limits), req)),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
    }
}

/// Tells an over-limit client so (before reading its request: it needs no answer but this one),
/// then drains what it sends for a moment so the close does not reset the connection before the
/// client has read the answer.
async fn reject(mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let body = format!("too many connections (limit {MAX_CONNECTIONS}); try again later\n");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = [head, body].concat();
    if tokio::time::timeout(REJECT_TIMEOUT, stream.write_all(answer.as_bytes())).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(REJECT_TIMEOUT, stream.shutdown()).await;
    super::drain(&mut stream, REJECT_TIMEOUT, REJECT_DRAIN_BYTES).await;
}

/// A socket whose writes fail with [`std::io::ErrorKind::TimedOut`] once they have made no progress
/// for a while: hyper has no write timeout, and a client that never reads would otherwise hold
/// its connection and its response body forever. The clock starts when a write (or flush, or
/// shutdown) would block and restarts at every write that goes through; reads are not affected
/// (hyper's header-read timeout covers those).
pub struct WriteTimeout {
    stream: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    /// Wraps `stream`; writes stalled for `limit` fail.
    pub fn new(stream: TcpStream, limit: Duration) -> WriteTimeout {
        WriteTimeout { stream, limit, stalled: None }
    }

    /// Passes a write's result on, starting or checking the stall clock when it would block.
    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let clock = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s; closing", limit.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.progress(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("deflate, gzip;q=1.0, *;q=0.5")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(None));
    }
}
