//! uWSGI's `socket` stats pusher format over UDP: `<prefix.metric> <type> <value>`, with uWSGI's
//! numeric types (counter 0, gauge 1, absolute 2) and current values.
//!
//! As uWSGI's `plugins/stats_pusher_socket/plugin.c` does, each metric is one datagram of its
//! own, without a trailing newline, so that a receiver written for uWSGI reads ours. uWSGI's
//! values are int64; ours may have decimals (`0.25`), which such a receiver reads as their
//! integer part if it parses with `strtoll`.

use super::names::{dotted, number};
use super::net::{Udp, MAX_DATAGRAM};
use super::spec::PushSpec;
use super::{Batch, Flavor};

/// One datagram per sample (NaN and infinite values left out).
pub fn datagrams(batch: &Batch, spec: &PushSpec) -> Vec<String> {
    let mut out = Vec::with_capacity(batch.points.len());
    for p in &batch.points {
        let Some(v) = number(p.sample.value) else { continue };
        let code = match p.flavor {
            Flavor::Counter => 0,
            Flavor::Gauge => 1,
            Flavor::Absolute => 2,
        };
        out.push(format!("{} {code} {v}", dotted(spec.prefix.as_deref(), &p.sample, spec.labels)));
    }
    out
}

/// Sends a batch; returns the lines left out for being longer than a datagram.
/// A refusal of the previous push's datagrams makes this push an error too (after sending it).
pub async fn send(batch: &Batch, spec: &PushSpec, udp: &mut Udp) -> Result<Vec<String>, String> {
    let refused = udp.refusal();
    udp.connect(&spec.address).await?;
    let mut too_long = Vec::new();
    for d in datagrams(batch, spec) {
        if d.len() > MAX_DATAGRAM {
            too_long.push(d);
            continue;
        }
        udp.send(d.as_bytes()).await?;
    }
    refused.map_or(Ok(too_long), Err)
}
