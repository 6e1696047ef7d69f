//! The aggregator's one HTTP/1 client: the warmup GET ([`crate::server::warmup`]) and the webhook
//! POST of alarm actions ([`crate::alarm::action`]).
//!
//! Both used to have a copy of their own, and the copies had diverged: only one took the brackets
//! off an IPv6 host (`http://[::1]:8080/`), so the other could not connect to it. Only `http://`
//! URLs: both talk to a local application or a collector next to it, and the aggregator carries no
//! TLS stack.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// An answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The body, read whole.
    pub body: Bytes,
}

/// A request body and its content type.
pub struct Body<'a> {
    /// `Content-Type`.
    pub content_type: &'a str,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Sends one request to an `http://` URL and reads the whole answer, all within `timeout`.
/// Errors are one line naming the URL.
pub async fn send(
    method: Method,
    url: &str,
    body: Option<Body<'_>>,
    user_agent: &str,
    timeout: Duration,
) -> Result<Answer, String> {
    match tokio::time::timeout(timeout, send_inner(method.clone(), url, body, user_agent)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{method} {url}: no answer within {timeout:?}")),
    }
}

async fn send_inner(
    method: Method,
    url: &str,
    body: Option<Body<'_>>,
    user_agent: &str,
) -> Result<Answer, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are supported"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?.clone();
    // `[::1]` in a URL, `::1` to connect.
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {}: {e}", authority.as_str()))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let request =
        Exchange { method, authority: authority.as_str(), path: &path, user_agent, body_limit: None };
    request.run(stream, body).await.map_err(|e| format!("{} {url}: {e}", request.method))
}

/// One request on a connected stream, for a caller that connects by itself
/// ([`crate::alarm::httpok`] resolves host names its own way and tells a refused connection from
/// a timeout).
pub(crate) struct Exchange<'a> {
    /// The method.
    pub method: Method,
    /// The `Host` header (`host:port` as written in the URL).
    pub authority: &'a str,
    /// The path and query (`/health?x=1`).
    pub path: &'a str,
    /// The `User-Agent` header.
    pub user_agent: &'a str,
    /// Read at most this many bytes of the body (the rest is left unread); `None`: all of it.
    pub body_limit: Option<usize>,
}

impl Exchange<'_> {
    /// Sends the request and reads the answer. Errors are hyper's, one line, without the URL.
    pub(crate) async fn run(
        &self,
        stream: tokio::net::TcpStream,
        body: Option<Body<'_>>,
    ) -> Result<Answer, String> {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header(hyper::header::HOST, self.authority)
            .header(hyper::header::USER_AGENT, self.user_agent);
        let bytes = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, b.content_type);
                b.bytes
            }
            None => Vec::new(),
        };
        let req = req.body(Full::new(Bytes::from(bytes))).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let Some(limit) = self.body_limit else {
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Ok(Answer { status, body });
        };
        let mut got = Vec::new();
        while got.len() < limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = limit - got.len();
                        got.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                // A body cut short counts as what was read of it.
                Some(Err(_)) | None => break,
            }
        }
        Ok(Answer { status, body: Bytes::from(got) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers one request with `204` and returns what it read.
    async fn one_answer(listener: tokio::net::TcpListener) -> String {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await.expect("write");
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn get_from(bind: &str, url_host: &str) -> Option<(Answer, String)> {
        let Ok(listener) = tokio::net::TcpListener::bind(bind).await else { return None };
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(one_answer(listener));
        let url = format!("http://{url_host}:{port}/ready?x=1");
        let a = send(Method::GET, &url, None, "t", Duration::from_secs(5)).await.expect("answer");
        Some((a, server.await.expect("server")))
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_hosts_with_path_query_and_host_header() {
        let (a, req) = get_from("127.0.0.1:0", "127.0.0.1").await.expect("IPv4 loopback");
        assert_eq!(a.status, 204);
        assert!(req.starts_with("GET /ready?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(req.to_ascii_lowercase().contains("\r\nhost: 127.0.0.1:"), "{req}");
        match get_from("[::1]:0", "[::1]").await {
            Some((a, req)) => {
                assert_eq!(a.status, 204);
                assert!(req.to_ascii_lowercase().contains("\r\nhost: [::1]:"), "{req}");
            }
            None => eprintln!("no IPv6 loopback on this machine: the [::1] half of this test is skipped"),
        }
    }

    #[tokio::test]
    async fn refusals_and_bad_urls_are_one_line_errors() {
        let e = send(Method::GET, "https://x/", None, "t", Duration::from_secs(1)).await.expect_err("https");
        assert!(e.contains("only http://"), "{e}");
        let e = send(Method::GET, "not a url", None, "t", Duration::from_secs(1)).await.expect_err("bad");
        assert!(e.starts_with("bad URL"), "{e}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/");
        let e = send(Method::GET, &url, None, "t", Duration::from_secs(1)).await.expect_err("refused");
        assert!(e.contains("connecting to 127.0.0.1:") && !e.contains('\n'), "{e}");
    }
}
