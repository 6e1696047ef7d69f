//! One flattening of a merged snapshot into samples: the lines the Prometheus text format shows,
//! as data (name with its suffix, labels with `le` for buckets, value).
//!
//! The threshold rules match selectors against these, and `dump` prints them; the encoders in
//! [`crate::expose`] write the same lines straight into their buffer. All of them take the two
//! things that are easy to get subtly different — the cumulative bucket counts
//! ([`LabelSet::cumulative`]) and a counter's `_total` ([`MetricDesc::sample_name`]) — from one
//! place, and bounds are printed as Prometheus' Go client does ([`crate::expose::push_go_float`]).
//!
//! [`LabelSet::cumulative`]: crate::merge::LabelSet::cumulative
//! [`MetricDesc::sample_name`]: crate::layout::MetricDesc::sample_name

use crate::layout::MetricType;
use crate::merge::{LabelSet, Snapshot, Value};

/// One sample as exposed.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Sample name: `x_total`, `x_bucket`, `x_count`, `x_sum` or the family name.
    pub name: String,
    /// Labels in exposition order, `le` last for buckets.
    pub labels: Vec<(String, String)>,
    /// The value (`NaN` for a value that has none).
    pub value: f64,
}

impl Sample {
    /// `name{k="v",…}` as in the text format (values escaped), `name` without labels.
    pub fn selector(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        format!("{}{{{}}}", self.name, crate::merge::render_labels(&self.labels))
    }
}

/// A bucket bound as the `le` label shows it: Go's float format, `+Inf` for the last bucket.
pub fn le_text(bound: Option<f64>) -> String {
    let mut s = String::new();
    match bound {
        Some(b) => crate::expose::push_go_float(&mut s, b),
        None => s.push_str("+Inf"),
    }
    s
}

/// A plain value as a number (`NaN` for histograms, summaries and unset values; 1 for info, the
/// state index for an enum).
pub fn number(v: &Value) -> f64 {
    match v {
        Value::U64(n) => *n as f64,
        Value::Info { .. } => 1.0,
        Value::State { index, .. } => f64::from(*index),
        Value::F64(x) | Value::Recent { v: x, .. } => *x,
        Value::Hist { .. } | Value::Summary { .. } | Value::Unset => f64::NAN,
    }
}

fn with(base: &LabelSet, extra: Option<(&str, String)>) -> Vec<(String, String)> {
    let mut l = base.pairs.clone();
    if let Some((k, v)) = extra {
        l.push((k.to_string(), v));
    }
    l
}

/// Every sample of a snapshot, in exposition order (Prometheus text: histograms with `_count`
/// and `_sum`, summaries with both, info as `_info`, an enum as one 0/1 sample per state,
/// unset values left out).
pub fn flatten(snap: &Snapshot) -> Vec<Sample> {
    let mut out = Vec::new();
    for f in &snap.families {
        let d = &f.meta.desc;
        let sample =
            |suffix: &str, labels, value| Sample { name: format!("{}{suffix}", d.name), labels, value };
        for (labels, v) in &f.series {
            match (d.metric_type, v) {
                (_, Value::Unset) => {}
                (MetricType::Histogram, Value::Hist { buckets, sum }) => {
                    let mut count = 0;
                    for (bound, cum) in labels.cumulative(buckets) {
                        count = cum;
                        out.push(sample("_bucket", with(labels, Some(("le", le_text(bound)))), cum as f64));
                    }
                    out.push(sample("_count", with(labels, None), count as f64));
                    out.push(sample("_sum", with(labels, None), *sum));
                }
                (_, Value::Summary { count, sum }) => {
                    out.push(sample("_count", with(labels, None), *count));
                    out.push(sample("_sum", with(labels, None), *sum));
                }
                (MetricType::Enum, Value::State { index, .. }) => {
                    for (i, s) in d.states.iter().enumerate() {
                        let value = if i == *index as usize { 1.0 } else { 0.0 };
                        out.push(sample("", with(labels, Some((&d.name, s.clone()))), value));
                    }
                }
                (_, v) => out.push(Sample {
                    name: d.sample_name().into_owned(),
                    labels: with(labels, None),
                    value: number(v),
                }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MetricDesc, ValueType};
    use crate::merge::{FamilyMeta, SnapFamily};
    use std::sync::Arc;

    fn family(name: &str, t: MetricType, series: Vec<(LabelSet, Value)>) -> SnapFamily {
        let desc = MetricDesc {
            name: name.into(),
            help: String::new(),
            metric_type: t,
            value_type: ValueType::F64,
            gauge_mode: None,
            label_names: vec!["k".into()],
            buckets: vec![0.5, 1.0],
            states: Vec::new(),
        };
        SnapFamily {
            meta: Arc::new(FamilyMeta { label_names: desc.label_names.clone(), desc }),
            series: series.into_iter().map(|(l, v)| (Arc::new(l), v)).collect(),
        }
    }

    #[test]
    fn counters_get_total_buckets_accumulate_and_labels_are_escaped() {
        let mut h = LabelSet::new(vec![("k".into(), "a\"b".into())]);
        h.bounds = vec![0.5, 1.0];
        let snap = Snapshot {
            families: vec![
                family(
                    "c",
                    MetricType::Counter,
                    vec![(LabelSet::new(vec![("k".into(), "x".into())]), Value::U64(3))],
                ),
                family(
                    "h",
                    MetricType::Histogram,
                    vec![(h, Value::Hist { buckets: vec![1, 2, u64::MAX], sum: 2.5 })],
                ),
                family("g", MetricType::Gauge, vec![(LabelSet::default(), Value::Unset)]),
            ],
        };
        let got: Vec<(String, f64)> = flatten(&snap).iter().map(|s| (s.selector(), s.value)).collect();
        let want: Vec<(String, f64)> = vec![
            (r#"c_total{k="x"}"#.into(), 3.0),
            (r#"h_bucket{k="a\"b",le="0.5"}"#.into(), 1.0),
            (r#"h_bucket{k="a\"b",le="1.0"}"#.into(), 3.0),
            // Wrapping, as the counters do: no overflow panic on a hostile file's counts.
            (r#"h_bucket{k="a\"b",le="+Inf"}"#.into(), 2.0),
            (r#"h_count{k="a\"b"}"#.into(), 2.0),
            (r#"h_sum{k="a\"b"}"#.into(), 2.5),
        ];
        assert_eq!(got, want);
    }
}
