//! The aggregator's HTTP endpoint: `/metrics` on its own port, separate from the application's.
//!
//! Built on hyper 1 with a header-read timeout (a client that never finishes its request is cut off
//! instead of holding a connection), content negotiation (Prometheus text 0.0.4 by default,
//! OpenMetrics 1.0.0 when `Accept` asks for it) and gzip when `Accept-Encoding` allows. Scrapes run
//! on the blocking pool, one at a time (the aggregator is behind a mutex); encoding and compression
//! happen outside the lock.

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::aggregator::Aggregator;
use crate::expose::{self, Format};
use crate::merge::Snapshot;
use crate::ops::Ops;

/// How long a client may take to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by all connections.
pub struct Shared {
    aggregator: Mutex<Aggregator>,
}

impl Shared {
    /// Wraps an aggregator for serving.
    pub fn new(aggregator: Aggregator) -> Arc<Shared> {
        Arc::new(Shared { aggregator: Mutex::new(aggregator) })
    }

    /// Runs `f` with the aggregator locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Aggregator) -> R) -> R {
        let mut guard = self.aggregator.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    /// Scrapes on the blocking pool.
    pub async fn scrape(self: &Arc<Self>) -> Option<Snapshot> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.with(Aggregator::scrape)).await.ok()
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

async fn handle(ops: Arc<Ops>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let shared = Arc::clone(ops.shared());
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut().insert("allow", HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let resp = match req.uri().path() {
        "/metrics" => metrics(&ops, &shared, &req).await,
        "/healthz" => {
            let h = ops.health().await;
            let status = if h.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            text(status, format!("{}\n", h.message))
        }
        "/perf_metrics" => {
            let interval = req.uri().query().and_then(|q| {
                q.split('&').find_map(|kv| kv.strip_prefix("interval=")).and_then(|v| v.parse::<f64>().ok())
            });
            let doc = ops.perf_metrics(interval).await;
            let mut r = Response::new(Full::new(Bytes::from(format!("{doc}\n"))));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        "/" => text(StatusCode::OK, INDEX),
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
    };
    Ok(if head { resp.map(|_| Full::new(Bytes::new())) } else { resp })
}

async fn metrics(ops: &Arc<Ops>, shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let format = Format::from_accept(header(ACCEPT));
    let gzip = accepts_gzip(header(ACCEPT_ENCODING));
    // Who is a worker and the job's CPU time come from /proc (at most perf::TTL old).
    ops.procs().await;
    let Some(mut snapshot) = shared.scrape().await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "scrape failed; see the aggregator's log\n");
    };
    crate::perf::process_families(ops, &mut snapshot, ops.process_metrics()).await;
    crate::perf::alarm_families(ops, &mut snapshot);
    let body = expose::encode(&snapshot, format).into_bytes();
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
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    r.headers_mut().insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    if let Some(e) = encoding {
        r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    r
}

/// Serves HTTP on `listener` until `shutdown` resolves, then gives in-flight requests a few
/// seconds to finish.
pub async fn http(listener: TcpListener, ops: Arc<Ops>, shutdown: impl std::future::Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
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
        let ops = Arc::clone(&ops);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |req| handle(Arc::clone(&ops), req)),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
    }
}

/// Runs directory upkeep (folding dead workers) every `every`, so the directory stays bounded even
/// when nobody scrapes.
pub async fn upkeep(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || me.with(Aggregator::compact)).await;
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
