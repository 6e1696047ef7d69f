//! Etsy's statsd over UDP: counters as deltas, gauges as values.
//!
//! statsd adds up every `name:n|c` it gets between two flushes, then starts again from 0. A
//! cumulative counter re-sent as `|c` at every push (what uWSGI's statsd pusher does, its issue
//! #1248) is therefore counted again at every push. So a counter is sent as its **delta since the
//! last successful push**: a series seen for the first time sends its whole value, and a counter
//! that went down (the job restarted, a derived metric was reset) sends its new value, which is
//! what it counted since.
//!
//! "Cumulative" means the families of type counter, and the `_count`, `_sum` and `_bucket`
//! samples of histograms and summaries: all of them only add up (a `_sum` of negative
//! observations going down is taken as a restart, as for a counter). Everything else is a gauge,
//! `name:value|g`. statsd reads a signed gauge value (`-5|g`, `+4|g`) as a change of the gauge,
//! so a negative gauge goes as `name:0|g` then `name:-5|g`, in the same datagram so that they stay
//! in order.
//!
//! The baseline of a counter only moves for what was sent: a push's new baselines are *pending*
//! until the next push finds no refusal on the socket (see [`super::net`]); when a send fails, or
//! the receiver refused the datagrams (it was down), they are dropped and the next push sends
//! those increments again. (A receiver that comes up half way through one push may count that
//! push's other datagrams twice: UDP cannot tell which ones it got. And the kernel sends at most
//! about one ICMP error a second to a host, so with `freq_seconds` under a second some pushes
//! into a closed port go unnoticed and their increments are lost.)

use std::collections::{HashMap, HashSet};

use super::names::{dotted, number};
use super::net::{pack, Udp, MAX_DATAGRAM};
use super::spec::PushSpec;
use super::{Batch, Flavor};

/// The value each counter had at its last successful push, by statsd name, and the values of
/// the last push, not yet known to have arrived.
#[derive(Debug, Default)]
pub struct Deltas {
    last: HashMap<String, f64>,
    pending: Vec<(String, f64)>,
}

impl Deltas {
    /// What a counter at `value` sends now.
    pub fn delta(&self, name: &str, value: f64) -> f64 {
        match self.last.get(name) {
            Some(&last) if value >= last => value - last,
            _ => value,
        }
    }

    /// The last push arrived (`true`) or not: its baselines are committed or dropped.
    fn settle(&mut self, arrived: bool) {
        let pending = std::mem::take(&mut self.pending);
        if arrived {
            self.last.extend(pending);
        }
    }
}

/// A line to send and, for a counter, the baseline it moves to once sent.
type Line = (String, Option<(String, f64)>);

/// The statsd lines of a batch, in its order (NaN and infinite values left out).
pub fn lines(batch: &Batch, spec: &PushSpec, deltas: &Deltas) -> Vec<Line> {
    let mut out = Vec::with_capacity(batch.points.len());
    for p in &batch.points {
        let v = p.sample.value;
        if !v.is_finite() {
            continue;
        }
        let name = dotted(spec.prefix.as_deref(), &p.sample, spec.labels);
        match p.flavor {
            Flavor::Counter => {
                let d = deltas.delta(&name, v);
                let Some(text) = number(d) else { continue };
                out.push((format!("{name}:{text}|c"), Some((name, v))));
            }
            Flavor::Gauge | Flavor::Absolute => {
                let Some(text) = number(v) else { continue };
                let line =
                    if v < 0.0 { format!("{name}:0|g\n{name}:{text}|g") } else { format!("{name}:{text}|g") };
                out.push((line, None));
            }
        }
    }
    out
}

/// Sends a batch; returns the lines left out for being longer than a datagram. A refusal of the
/// previous push's datagrams makes this push an error too (after sending it: that is how the
/// next push learns whether the receiver is back).
pub async fn send(
    batch: &Batch,
    spec: &PushSpec,
    deltas: &mut Deltas,
    udp: &mut Udp,
) -> Result<Vec<String>, String> {
    let refused = udp.refusal();
    deltas.settle(refused.is_none());
    udp.connect(&spec.address).await?;
    let (grams, too_long) = pack(lines(batch, spec, deltas), MAX_DATAGRAM);
    for (bytes, sent) in grams {
        if let Err(e) = udp.send(&bytes).await {
            deltas.pending.clear();
            return Err(e);
        }
        deltas.pending.extend(sent.into_iter().flatten());
    }
    // Forget counters that are gone (the map stays as large as the job).
    let now: HashSet<String> = batch
        .points
        .iter()
        .filter(|p| p.flavor == Flavor::Counter)
        .map(|p| dotted(spec.prefix.as_deref(), &p.sample, spec.labels))
        .collect();
    deltas.last.retain(|k, _| now.contains(k));
    refused.map_or(Ok(too_long), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::{Point, PushSpec};
    use crate::samples::Sample;

    fn spec() -> PushSpec {
        let t: toml::Table =
            toml::from_str("type = \"statsd\"\naddress = \"127.0.0.1:1\"\nprefix = \"p\"").expect("toml");
        PushSpec::parse(&t).expect("spec")
    }

    fn batch(points: &[(&str, Flavor, f64)]) -> Batch {
        Batch {
            at: 0.0,
            points: points
                .iter()
                .map(|(n, f, v)| Point {
                    sample: Sample {
                        name: n.to_string(),
                        labels: vec![("k".into(), "a.b".into())],
                        value: *v,
                    },
                    flavor: *f,
                })
                .collect(),
        }
    }

    fn texts(b: &Batch, d: &Deltas) -> Vec<String> {
        lines(b, &spec(), d).into_iter().map(|(l, _)| l).collect()
    }

    #[test]
    fn counters_send_deltas_gauges_values() {
        let mut d = Deltas::default();
        let b = batch(&[
            ("c_total", Flavor::Counter, 5.0),
            ("g", Flavor::Gauge, -2.5),
            ("a", Flavor::Absolute, 7.0),
        ]);
        assert_eq!(texts(&b, &d), vec!["p.c_total.a_b:5|c", "p.g.a_b:0|g\np.g.a_b:-2.5|g", "p.a.a_b:7|g"]);
        d.pending = lines(&b, &spec(), &d).into_iter().filter_map(|(_, c)| c).collect();
        d.settle(true);
        let b = batch(&[("c_total", Flavor::Counter, 12.0), ("h_sum", Flavor::Counter, f64::NAN)]);
        assert_eq!(texts(&b, &d), vec!["p.c_total.a_b:7|c"]);
        // Sent, but refused (the receiver was down): the next push sends the whole difference.
        d.pending = lines(&b, &spec(), &d).into_iter().filter_map(|(_, c)| c).collect();
        d.settle(false);
        let b = batch(&[("c_total", Flavor::Counter, 20.0)]);
        assert_eq!(texts(&b, &d), vec!["p.c_total.a_b:15|c"]);
        // A restart: the counter went down, its new value is what it counted since.
        let b = batch(&[("c_total", Flavor::Counter, 3.0)]);
        assert_eq!(texts(&b, &d), vec!["p.c_total.a_b:3|c"]);
    }
}
