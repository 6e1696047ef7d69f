//! Text encoders for a merged [`Snapshot`]: Prometheus text format 0.0.4 and OpenMetrics 1.0.0.
//!
//! These are ours rather than prometheus-client's because that crate encodes only its own
//! `Registry` (and only OpenMetrics); the tests check our output with `promtool` and with Python
//! prometheus_client's OpenMetrics parser. Label text is pre-rendered by the merger, so encoding is
//! mostly copying bytes and formatting numbers.
//!
//! The two formats differ on sums that are not counters. OpenMetrics 1.0 says of histograms:
//! "Semantically, Sum, and buckets values are counters so MUST NOT be NaN or negative. Negative
//! threshold buckets MAY be used, but then the Histogram MetricPoint MUST NOT contain a sum
//! value", and a `_count` comes with a `_sum` (prometheus_client's parser rejects either one
//! alone, a NaN or negative `_sum`, and a `_sum` beside a negative `le`). So in OpenMetrics a
//! histogram series whose sum is NaN or negative (a NaN or negative observation), or which has a
//! negative bucket bound, is written with its buckets only: no `_sum` and no `_count` (the count
//! is the `+Inf` bucket). A summary (Python prometheus_client files) loses a NaN or negative
//! `_sum`, or `_count`, alone. Prometheus text 0.0.4 has no such rule (Prometheus stores any
//! float), so it keeps `_sum` and `_count` as they are, as client_golang and client_python do.

use crate::layout::MetricType;
use crate::merge::{LabelSet, SnapFamily, Snapshot, Value};

/// Which exposition format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of this format.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Picks the format from an HTTP `Accept` header: OpenMetrics when it is asked for (and not
    /// with q=0), Prometheus text otherwise.
    pub(crate) fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Prometheus };
        for part in accept.split(',') {
            let mut params = part.split(';').map(str::trim);
            if params.next() != Some("application/openmetrics-text") {
                continue;
            }
            let refused = params
                .any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f64>().ok()).is_some_and(|q| q <= 0.0));
            if !refused {
                return Format::OpenMetrics;
            }
        }
        Format::Prometheus
    }
}

/// Appends a float the way Prometheus parsers read it (`NaN`, `+Inf`, `-Inf`, shortest repr).
pub fn push_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        out.push_str(ryu::Buffer::new().format_finite(v));
    }
}

/// Appends a bucket bound the way prometheus_client (`floatToGoString`) and Go clients write `le`:
/// Python's shortest `repr`, switching to an exponent (`1e+07`, `2.5e-05`) where Go would. Label
/// values are compared as strings, so `le` must be written exactly as the clients Prometheus already
/// scrapes write it, or series split.
pub fn push_go_float(out: &mut String, v: f64) {
    if !v.is_finite() {
        return push_f64(out, v);
    }
    // Shortest round-trip digits and decimal exponent: `d.ddde±x`.
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    out.push_str(sign);
    // Python's repr: scientific below 1e-4 and from 1e16; Go's formatting, which
    // floatToGoString imitates, also for positive values with more than 6 integer digits.
    if !(-4..16).contains(&exp) || (v > 0.0 && exp >= 6) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if exp < 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
}

fn push_u64(out: &mut String, v: u64) {
    out.push_str(itoa::Buffer::new().format(v));
}

fn push_help(out: &mut String, help: &str, format: Format) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Whether OpenMetrics allows a sample that is semantically a counter (`_sum`, `_count`): not NaN,
/// not negative.
fn counter_like(v: f64) -> bool {
    !v.is_nan() && v >= 0.0
}

/// Writes `name{labels[,extra]} ` (with the trailing space).
fn push_sample_head(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &LabelSet,
    extra: Option<(&str, &str)>,
) {
    out.push_str(name);
    out.push_str(suffix);
    let has_labels = !labels.text.is_empty();
    if has_labels || extra.is_some() {
        out.push('{');
        out.push_str(&labels.text);
        if let Some((k, v)) = extra {
            if has_labels {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
}

/// Writes `# KIND name ` (with the trailing space).
fn push_meta(out: &mut String, kind: &str, name: &str, suffix: &str) {
    out.push_str("# ");
    out.push_str(kind);
    out.push(' ');
    out.push_str(name);
    out.push_str(suffix);
    out.push(' ');
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::U64(n) => push_u64(out, *n),
        Value::F64(f) | Value::Recent { v: f, .. } => push_f64(out, *f),
        Value::Info { .. } => out.push('1'),
        Value::State { index, .. } => push_u64(out, u64::from(*index)),
        Value::Hist { .. } | Value::Summary { .. } | Value::Unset => out.push_str("NaN"),
    }
}

fn encode_family(out: &mut String, f: &SnapFamily, format: Format) {
    let d = &f.meta.desc;
    let name = d.name.as_str();
    // Prometheus text names the counter family by its sample name; OpenMetrics by the base name.
    // Likewise an info family (0.0.4 has no info type: it is the gauge `<name>_info` there).
    let family_name_suffix = match (d.metric_type, format) {
        (MetricType::Counter, Format::Prometheus) => "_total",
        (MetricType::Info, Format::Prometheus) => "_info",
        _ => "",
    };
    let type_word = match format {
        Format::OpenMetrics => d.metric_type.as_str(),
        Format::Prometheus => d.metric_type.as_str_004(),
    };
    if format == Format::OpenMetrics {
        push_meta(out, "TYPE", name, family_name_suffix);
        out.push_str(type_word);
        out.push('\n');
        if !d.help.is_empty() {
            push_meta(out, "HELP", name, family_name_suffix);
            push_help(out, &d.help, format);
            out.push('\n');
        }
    } else {
        push_meta(out, "HELP", name, family_name_suffix);
        push_help(out, &d.help, format);
        out.push('\n');
        push_meta(out, "TYPE", name, family_name_suffix);
        out.push_str(type_word);
        out.push('\n');
    }
    for (labels, value) in &f.series {
        match (d.metric_type, value) {
            (MetricType::Histogram, Value::Hist { buckets, sum }) => {
                let mut cum: u64 = 0;
                let mut le = String::new();
                for (bound, c) in labels.cumulative(buckets) {
                    cum = c;
                    le.clear();
                    match bound {
                        Some(b) => push_go_float(&mut le, b),
                        None => le.push_str("+Inf"),
                    }
                    push_sample_head(out, name, "_bucket", labels, Some(("le", &le)));
                    push_u64(out, cum);
                    out.push('\n');
                }
                // OpenMetrics: no sum (and so no count) unless the sum is a counter (module docs).
                let with_sum = format == Format::Prometheus
                    || (counter_like(*sum) && !labels.bounds.iter().any(|b| *b < 0.0));
                if with_sum {
                    push_sample_head(out, name, "_count", labels, None);
                    push_u64(out, cum);
                    out.push('\n');
                    push_sample_head(out, name, "_sum", labels, None);
                    push_f64(out, *sum);
                    out.push('\n');
                }
            }
            (MetricType::Summary, Value::Summary { count, sum }) => {
                if format == Format::Prometheus || counter_like(*count) {
                    push_sample_head(out, name, "_count", labels, None);
                    push_f64(out, *count);
                    out.push('\n');
                }
                if format == Format::Prometheus || counter_like(*sum) {
                    push_sample_head(out, name, "_sum", labels, None);
                    push_f64(out, *sum);
                    out.push('\n');
                }
            }
            (MetricType::Counter, v) => {
                push_sample_head(out, name, "_total", labels, None);
                push_value(out, v);
                out.push('\n');
            }
            (MetricType::Info, v) => {
                push_sample_head(out, name, "_info", labels, None);
                push_value(out, v);
                out.push('\n');
            }
            (MetricType::Enum, Value::State { index, .. }) => {
                // One sample per state, labelled with the metric's own name (prometheus_client).
                let mut state = String::new();
                for (i, s) in d.states.iter().enumerate() {
                    state.clear();
                    crate::merge::escape_label_value(s, &mut state);
                    push_sample_head(out, name, "", labels, Some((name, &state)));
                    out.push(if i == *index as usize { '1' } else { '0' });
                    out.push('\n');
                }
            }
            (_, v) => {
                push_sample_head(out, name, "", labels, None);
                push_value(out, v);
                out.push('\n');
            }
        }
    }
}

/// Encodes a snapshot in `format`.
pub fn encode(snapshot: &Snapshot, format: Format) -> String {
    encode_with(snapshot, &[], format)
}

/// Encodes a snapshot followed by `extra` families (added by the aggregator: process figures,
/// alarm counters) in `format`, without copying the snapshot.
pub fn encode_with(snapshot: &Snapshot, extra: &[SnapFamily], format: Format) -> String {
    // Histograms write one line per bucket plus two: size the buffer for the lines, not the series.
    let lines: usize = snapshot
        .families
        .iter()
        .chain(extra)
        .map(|f| {
            f.series.len()
                * match f.meta.desc.metric_type {
                    MetricType::Histogram => f.meta.desc.buckets.len() + 3,
                    MetricType::Enum => f.meta.desc.states.len(),
                    _ => 1,
                }
        })
        .sum();
    let mut out = String::with_capacity(lines * 72 + 1024);
    for f in snapshot.families.iter().chain(extra) {
        encode_family(&mut out, f, format);
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MetricDesc, ValueType};
    use crate::merge::Merger;

    fn snap() -> Snapshot {
        let mut m = Merger::new();
        let c = m
            .family_for(&MetricDesc {
                name: "req".into(),
                help: "Requests \"x\"\\.".into(),
                metric_type: MetricType::Counter,
                value_type: ValueType::U64,
                gauge_mode: None,
                label_names: vec!["code".into()],
                buckets: vec![],
                states: Vec::new(),
            })
            .unwrap();
        let h = m
            .family_for(&MetricDesc {
                name: "lat".into(),
                help: "Latency.".into(),
                metric_type: MetricType::Histogram,
                value_type: ValueType::F64,
                gauge_mode: None,
                label_names: vec![],
                buckets: vec![0.5, 1.0],
                states: Vec::new(),
            })
            .unwrap();
        let a = m.series_for(c, vec![("code".into(), "2\"0\n0".into())]);
        let b = m.series_for(h, vec![]);
        m.widen(b, &[0.5, 1.0]);
        m.archive_value(a, &Value::U64(7));
        m.archive_value(b, &Value::Hist { buckets: vec![1, 2, 3], sum: 9.25 });
        let mut accs = Vec::new();
        m.begin(&mut accs);
        m.snapshot(accs)
    }

    #[test]
    fn prometheus_text() {
        let text = encode(&snap(), Format::Prometheus);
        assert_eq!(
            text,
            "# HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{le=\"0.5\"} 1\nlat_bucket{le=\"1.0\"} 3\n\
             lat_bucket{le=\"+Inf\"} 6\nlat_count 6\nlat_sum 9.25\n\
             # HELP req_total Requests \"x\"\\\\.\n# TYPE req_total counter\nreq_total{code=\"2\\\"0\\n0\"} 7\n"
        );
    }

    #[test]
    fn openmetrics_text() {
        let text = encode(&snap(), Format::OpenMetrics);
        assert!(text.starts_with("# TYPE lat histogram\n# HELP lat Latency.\n"));
        assert!(text.contains("# TYPE req counter\n# HELP req Requests \\\"x\\\"\\\\.\nreq_total{"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// Histograms whose sum is not a counter, and a summary whose sum is negative.
    fn odd_sums() -> Snapshot {
        let mut m = Merger::new();
        let desc = |name: &str, metric_type, buckets: Vec<f64>| MetricDesc {
            name: name.into(),
            help: String::new(),
            metric_type,
            value_type: ValueType::F64,
            gauge_mode: None,
            label_names: vec!["k".into()],
            buckets,
            states: Vec::new(),
        };
        let h = m.family_for(&desc("h", MetricType::Histogram, vec![1.0])).unwrap();
        let nb = m.family_for(&desc("nb", MetricType::Histogram, vec![-1.0, 1.0])).unwrap();
        let sm = m.family_for(&desc("sm", MetricType::Summary, vec![])).unwrap();
        for (k, sum) in
            [("neg", -2.5), ("nan", f64::NAN), ("ok", 2.5), ("negzero", -0.0), ("inf", f64::INFINITY)]
        {
            let s = m.series_for(h, vec![("k".into(), k.into())]);
            m.widen(s, &[1.0]);
            m.archive_value(s, &Value::Hist { buckets: vec![1, 1], sum });
        }
        let s = m.series_for(nb, vec![("k".into(), "pos".into())]);
        m.widen(s, &[-1.0, 1.0]);
        m.archive_value(s, &Value::Hist { buckets: vec![0, 1, 1], sum: 3.0 });
        for (k, count, sum) in [("neg", 2.0, -1.0), ("nan", f64::NAN, f64::NAN), ("ok", 2.0, 1.0)] {
            let s = m.series_for(sm, vec![("k".into(), k.into())]);
            m.archive_value(s, &Value::Summary { count, sum });
        }
        let mut accs = Vec::new();
        m.begin(&mut accs);
        m.snapshot(accs)
    }

    #[test]
    fn openmetrics_has_no_sum_that_is_not_a_counter() {
        let text = encode(&odd_sums(), Format::OpenMetrics);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "h_bucket{k=\"neg\",le=\"1.0\"} 1",
                "h_bucket{k=\"neg\",le=\"+Inf\"} 2",
                "h_bucket{k=\"nan\",le=\"1.0\"} 1",
                "h_bucket{k=\"nan\",le=\"+Inf\"} 2",
                "h_bucket{k=\"ok\",le=\"1.0\"} 1",
                "h_bucket{k=\"ok\",le=\"+Inf\"} 2",
                "h_count{k=\"ok\"} 2",
                "h_sum{k=\"ok\"} 2.5",
                "h_bucket{k=\"negzero\",le=\"1.0\"} 1",
                "h_bucket{k=\"negzero\",le=\"+Inf\"} 2",
                "h_count{k=\"negzero\"} 2",
                "h_sum{k=\"negzero\"} -0.0",
                "h_bucket{k=\"inf\",le=\"1.0\"} 1",
                "h_bucket{k=\"inf\",le=\"+Inf\"} 2",
                "h_count{k=\"inf\"} 2",
                "h_sum{k=\"inf\"} +Inf",
                "nb_bucket{k=\"pos\",le=\"-1.0\"} 0",
                "nb_bucket{k=\"pos\",le=\"1.0\"} 1",
                "nb_bucket{k=\"pos\",le=\"+Inf\"} 2",
                "sm_count{k=\"neg\"} 2.0",
                "sm_count{k=\"ok\"} 2.0",
                "sm_sum{k=\"ok\"} 1.0",
            ],
            "{text}"
        );
        // Prometheus text keeps every sum and count.
        let text = encode(&odd_sums(), Format::Prometheus);
        for line in [
            "h_count{k=\"nan\"} 2\nh_sum{k=\"nan\"} NaN\n",
            "h_count{k=\"neg\"} 2\nh_sum{k=\"neg\"} -2.5\n",
            "nb_count{k=\"pos\"} 2\nnb_sum{k=\"pos\"} 3.0\n",
            "sm_count{k=\"nan\"} NaN\nsm_sum{k=\"nan\"} NaN\n",
            "sm_sum{k=\"neg\"} -1.0\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("application/openmetrics-text; q=0")), Format::Prometheus);
    }

    #[test]
    fn bucket_bounds_like_prometheus_client() {
        // Expected strings: prometheus_client.utils.floatToGoString of the same floats.
        let cases = [
            (0.005, "0.005"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (10.0, "10.0"),
            (123456.0, "123456.0"),
            (1234567.0, "1.234567e+06"),
            (1e7, "1e+07"),
            (2.5e-05, "2.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e22, "1e+22"),
            (0.1, "0.1"),
            (-1.5, "-1.5"),
            (f64::INFINITY, "+Inf"),
        ];
        for (v, want) in cases {
            let mut s = String::new();
            push_go_float(&mut s, v);
            assert_eq!(s, want, "{v}");
        }
    }

    #[test]
    fn floats() {
        let mut s = String::new();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.1, 1e300, 3.0] {
            push_f64(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "NaN +Inf -Inf 0.1 1e300 3.0 ");
    }
}
