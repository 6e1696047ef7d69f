//! Dotted names for the receivers without labels (statsd, Graphite, uWSGI's socket format).
//!
//! statsd and Graphite know only a path of dot-separated parts, so a labelled series must become
//! parts of its name. The parts are the prefix's, the sample's name (`x_total`, `x_bucket`, …),
//! then the labels, in exposition order (`le` last for buckets):
//!
//! - `labels = "values"` (the default): `name.value1.value2`, which reads well in Graphite's tree
//!   (`http_requests_total.GET.200`);
//! - `labels = "pairs"`: `name.label1.value1.label2.value2`, unambiguous when label sets differ.
//!
//! Every part is sanitised to `[A-Za-z0-9_-]`: any other character becomes `_`, because `.` would
//! split a part in two, `:` and `|` are statsd's separators, and space ends a Graphite path. An
//! empty value is written `_` (an empty part would vanish in Graphite's tree), and the `le` bound
//! `+Inf` is written `Inf` (so `0.25` is `0_25`). Sanitising can make two series one (`a.b` and
//! `a_b`): label values that differ only in those characters then push to the same name.

use super::spec::LabelStyle;
use crate::samples::Sample;

/// Appends `s` sanitised to `[A-Za-z0-9_-]` (`_` for an empty string).
pub fn push_part(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('_');
        return;
    }
    out.extend(s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }));
}

/// The dotted name of a sample.
pub fn dotted(prefix: Option<&str>, sample: &Sample, style: LabelStyle) -> String {
    let mut out = String::with_capacity(64);
    if let Some(p) = prefix {
        out.push_str(p);
        out.push('.');
    }
    push_part(&mut out, &sample.name);
    for (k, v) in &sample.labels {
        out.push('.');
        if style == LabelStyle::Pairs {
            push_part(&mut out, k);
            out.push('.');
        }
        let v = if k == "le" && v == "+Inf" { "Inf" } else { v.as_str() };
        push_part(&mut out, v);
    }
    out
}

/// A value as every receiver reads it: the shortest text that reads back as the same `f64`
/// (`3`, `0.25`, `-1.5`; never an exponent); `None` for NaN and infinities, which none of them
/// accepts.
pub fn number(v: f64) -> Option<String> {
    if !v.is_finite() {
        return None;
    }
    // -0 as 0.
    let v = if v == 0.0 { 0.0 } else { v };
    Some(format!("{v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)]) -> Sample {
        Sample {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            value: 1.0,
        }
    }

    #[test]
    fn values_and_pairs_sanitised() {
        let s = sample("http_requests_total", &[("method", "GET"), ("path", "/a.b c"), ("code", "")]);
        assert_eq!(dotted(None, &s, LabelStyle::Values), "http_requests_total.GET._a_b_c._");
        assert_eq!(
            dotted(Some("shm.web-1"), &s, LabelStyle::Pairs),
            "shm.web-1.http_requests_total.method.GET.path._a_b_c.code._"
        );
        let b = sample("lat_bucket", &[("le", "0.25")]);
        assert_eq!(dotted(None, &b, LabelStyle::Values), "lat_bucket.0_25");
        let inf = sample("lat_bucket", &[("le", "+Inf")]);
        assert_eq!(dotted(None, &inf, LabelStyle::Pairs), "lat_bucket.le.Inf");
        assert_eq!(dotted(None, &sample("a:b", &[("k", "é|x")]), LabelStyle::Values), "a_b.__x");
    }

    #[test]
    fn numbers() {
        assert_eq!(number(3.0).as_deref(), Some("3"));
        assert_eq!(number(0.25).as_deref(), Some("0.25"));
        assert_eq!(number(-0.0).as_deref(), Some("0"));
        assert_eq!(number(1e20).as_deref(), Some("100000000000000000000"));
        assert_eq!(number(f64::NAN), None);
        assert_eq!(number(f64::INFINITY), None);
    }
}
