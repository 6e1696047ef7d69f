//! InfluxDB 1.x line protocol: `measurement[,tag=value…] value=<float> <timestamp>`.
//!
//! The measurement is the prefix (joined with `.`) and the sample's name (`x_total`, `x_bucket`,
//! …); the labels are tags (sorted by key, as InfluxDB advises; a label with an empty value is
//! left out, as Prometheus reads it as absent and the line protocol refuses an empty tag value);
//! the one field is `value`, a float. Escaped as the 1.6 reference says: in measurements `,` and
//! space, in tag keys and values `,`, `=` and space, each with a backslash; a line break in a
//! label value (the line protocol has no escape for it) becomes a space.
//!
//! - Over HTTP: `POST /write?db=<database>&precision=s`, one body per push, timestamps in
//!   seconds; any answer but 2xx is an error, logged with InfluxDB's own message
//!   (`{"error":"database not found: …"}`).
//! - Over UDP: lines packed into datagrams of at most 1432 bytes. An `[[udp]]` listener reads
//!   timestamps in its `precision`, nanoseconds unless set, so they are sent in nanoseconds (whole
//!   seconds × 10⁹); leave the listener's `precision` unset. The listener answers nothing, so
//!   a database it cannot write to is only in InfluxDB's log.

use super::names::number;
use super::net::{pack, Udp, MAX_DATAGRAM};
use super::spec::PushSpec;
use super::Batch;

fn escape(out: &mut String, s: &str, specials: &[char]) {
    for c in s.chars() {
        let c = if c == '\n' || c == '\r' { ' ' } else { c };
        if specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The lines of a batch, with `ts` as the timestamp text.
pub fn lines(batch: &Batch, spec: &PushSpec, ts: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(batch.points.len());
    for p in &batch.points {
        let Some(v) = number(p.sample.value) else { continue };
        let mut line = String::with_capacity(96);
        let mut measurement = String::new();
        if let Some(prefix) = &spec.prefix {
            measurement.push_str(prefix);
            measurement.push('.');
        }
        measurement.push_str(&p.sample.name);
        escape(&mut line, &measurement, &[',', ' ']);
        let mut tags: Vec<&(String, String)> =
            p.sample.labels.iter().filter(|(_, v)| !v.is_empty()).collect();
        tags.sort();
        for (k, tv) in tags {
            line.push(',');
            escape(&mut line, k, &[',', '=', ' ']);
            line.push('=');
            escape(&mut line, tv, &[',', '=', ' ']);
        }
        line.push_str(" value=");
        line.push_str(&v);
        line.push(' ');
        line.push_str(ts);
        out.push(line);
    }
    out
}

/// Sends a batch to an `[[udp]]` listener; returns the lines left out for being longer than a
/// datagram.
/// A refusal of the previous push's datagrams makes this push an error too (after sending it).
pub async fn send_udp(batch: &Batch, spec: &PushSpec, udp: &mut Udp) -> Result<Vec<String>, String> {
    let refused = udp.refusal();
    udp.connect(&spec.address).await?;
    let ts = format!("{}000000000", batch.at as u64);
    let tagged = lines(batch, spec, &ts).into_iter().map(|l| (l, ())).collect();
    let (grams, too_long) = pack(tagged, MAX_DATAGRAM);
    for (bytes, _) in grams {
        udp.send(&bytes).await?;
    }
    refused.map_or(Ok(too_long), Err)
}

/// The `/write` URL of a pusher.
pub fn write_url(spec: &PushSpec) -> String {
    // The database was checked at load: letters, digits, `_` and `-`, nothing to encode.
    format!("http://{}/write?db={}&precision=s", spec.address, spec.database.as_deref().unwrap_or_default())
}

/// Posts a batch to `/write`, within `timeout`.
pub async fn send_http(batch: &Batch, spec: &PushSpec, timeout: std::time::Duration) -> Result<(), String> {
    let ts = (batch.at as u64).to_string();
    let mut body = lines(batch, spec, &ts).join("\n");
    body.push('\n');
    let url = write_url(spec);
    let body = crate::client::Body { content_type: "text/plain; charset=utf-8", bytes: body.into_bytes() };
    let agent = concat!("shmetrics/", env!("CARGO_PKG_VERSION"));
    let answer = crate::client::send(hyper::Method::POST, &url, Some(body), agent, timeout).await?;
    if (200..300).contains(&answer.status) {
        return Ok(());
    }
    let message = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).chars().take(200).collect());
    Err(format!("POST {url}: {} {}", answer.status, message.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::{Flavor, Point};
    use crate::samples::Sample;

    #[test]
    fn escaped_sorted_tags_and_float_field() {
        let t: toml::Table =
            toml::from_str("type = \"influx\"\naddress = \"h:1\"\nprefix = \"shm\"").expect("toml");
        let spec = PushSpec::parse(&t).expect("spec");
        let labels = vec![
            ("path".to_string(), "/a b,c=d".to_string()),
            ("code".to_string(), "".to_string()),
            ("le".to_string(), "0.5".to_string()),
            ("m".to_string(), "x\ny".to_string()),
        ];
        let batch = Batch {
            at: 1.5,
            points: vec![
                Point {
                    sample: Sample { name: "h_bucket".into(), labels, value: 3.0 },
                    flavor: Flavor::Counter,
                },
                Point {
                    sample: Sample { name: "g".into(), labels: vec![], value: f64::NAN },
                    flavor: Flavor::Gauge,
                },
                Point {
                    sample: Sample { name: "g".into(), labels: vec![], value: -0.25 },
                    flavor: Flavor::Gauge,
                },
            ],
        };
        assert_eq!(
            lines(&batch, &spec, "1"),
            vec![
                r"shm.h_bucket,le=0.5,m=x\ y,path=/a\ b\,c\=d value=3 1".to_string(),
                "shm.g value=-0.25 1".to_string()
            ]
        );
    }
}
