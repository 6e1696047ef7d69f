//! The one HTTP request the aggregator makes: GET the application's warmup URL.
//!
//! Like ftw.monitor's automatic `@@warmup`, the aggregator requests `--warmup-url` once at start
//! (again every second until it answers 2xx), and health says `Warmup in progress` until then.
//! `SHMETRICS_AUTOWARMUP=0` (or `false`, `no`, `off`) disables it.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Whether `SHMETRICS_AUTOWARMUP` disables the warmup request.
pub fn disabled_by_env() -> bool {
    std::env::var("SHMETRICS_AUTOWARMUP")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off"))
}

/// GETs an `http://` URL and returns the status code (the body is read and dropped).
pub async fn get(url: &str, timeout: Duration) -> Result<u16, String> {
    tokio::time::timeout(timeout, get_inner(url))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn get_inner(url: &str) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are supported (the app's own port)"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = Request::get(path)
        .header(hyper::header::HOST, uri.authority().map_or(host.clone(), |a| a.to_string()))
        .header(hyper::header::USER_AGENT, "shmetrics-warmup")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}
