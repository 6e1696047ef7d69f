//! The one HTTP request the aggregator makes: GET the application's warmup URL.
//!
//! Like ftw.monitor's automatic `@@warmup`, the aggregator requests `--warmup-url` once at start
//! (again every second until it answers 2xx), and health says `Warmup in progress` until then.
//! `SHMETRICS_AUTOWARMUP=0` (or `false`, `no`, `off`) disables it.

use std::time::Duration;

/// Whether `SHMETRICS_AUTOWARMUP` disables the warmup request.
pub fn disabled_by_env() -> bool {
    std::env::var("SHMETRICS_AUTOWARMUP")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "false" | "no" | "off"))
}

/// GETs an `http://` URL (through `crate::client`) and returns the status code.
pub async fn get(url: &str, timeout: Duration) -> Result<u16, String> {
    let answer = crate::client::send(hyper::Method::GET, url, None, "shmetrics-warmup", timeout).await?;
    Ok(answer.status)
}
