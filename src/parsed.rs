//! Configuration values parsed once, when a file is loaded ("parse, don't validate"): a number of
//! seconds ([`Seconds`]) and a series selector ([`Selector`]), shared by every section of the
//! configuration file (alarms, derived metrics, pushers, uWSGI stats). A value out of range is an
//! error naming its key when the file is read, never a panic in a task later.

use std::time::Duration;

use serde::Deserialize;

/// A duration in the configuration, written as a number of seconds (`60`, `0.5`).
///
/// Finite, at least 0 and at most [`Seconds::MAX_SECS`] (one year). TOML accepts `inf`, `nan`,
/// `-1` and `1e20`, and turning those into a [`Duration`] when a rule is checked would panic the
/// alarm task (alarms would stop, silently). So the number is parsed into a `Duration` once, when
/// the file is loaded, and a bad one is a configuration error like any other: the file is refused
/// (at a reload the old configuration stays in force), with a message naming the key and saying
/// what is allowed. Rules and actions only ever see `Duration`s.
///
/// Every seconds field of a configuration section is read through `seconds_key!`, which adds the key to
/// the message (toml cannot point at keys inside `[actions.*]`: their sections are buffered for
/// the `type` tag) and, for the fields that must be more than 0, refuses 0.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(try_from = "f64")]
pub struct Seconds(Duration);

impl Seconds {
    /// The largest number of seconds accepted: one year (365 days). A longer window, timeout or
    /// grace period is a mistake; the bound also keeps `Instant + Duration` far from overflowing.
    pub const MAX_SECS: u64 = 365 * 86_400;

    /// The largest value.
    pub const MAX: Seconds = Seconds(Duration::from_secs(Seconds::MAX_SECS));

    /// Whole seconds (more than [`Seconds::MAX_SECS`] is taken as the maximum).
    pub const fn from_secs(secs: u64) -> Seconds {
        if secs > Seconds::MAX_SECS {
            Seconds::MAX
        } else {
            Seconds(Duration::from_secs(secs))
        }
    }

    /// Parses a number of seconds, at least 0 (or, with `positive`, more than 0) and at most
    /// [`Seconds::MAX_SECS`]; the error shows the number and says what is allowed.
    pub fn new(secs: f64, positive: bool) -> std::result::Result<Seconds, String> {
        let in_range = secs.is_finite() && secs <= Seconds::MAX_SECS as f64;
        let ok = in_range && if positive { secs > 0.0 } else { secs >= 0.0 };
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if ok && !(positive && d.is_zero()) => Ok(Seconds(d)),
            _ => Err(format!("{} is not allowed: {}", toml_float(secs), Seconds::allowed(positive))),
        }
    }

    /// What [`Seconds::new`] accepts, in words.
    pub fn allowed(positive: bool) -> String {
        let range = if positive { "more than 0 and at most" } else { "from 0 to" };
        format!("write a number of seconds {range} {} (one year)", Seconds::MAX_SECS)
    }

    /// Parses a command-line option: a number of seconds more than 0 and at most
    /// [`Seconds::MAX_SECS`].
    pub fn parse_positive(text: &str) -> std::result::Result<Duration, String> {
        let secs = text.trim().parse::<f64>().map_err(|_| Seconds::allowed(true))?;
        Seconds::new(secs, true).map(Seconds::get)
    }

    /// A duration as it is (exact, unlike a float of seconds), in the range of [`Seconds::new`].
    pub fn from_duration(d: Duration, positive: bool) -> std::result::Result<Seconds, String> {
        if d > Seconds::MAX.get() || (positive && d.is_zero()) {
            return Err(format!("{} is not allowed: {}", d.as_secs_f64(), Seconds::allowed(positive)));
        }
        Ok(Seconds(d))
    }

    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Whether it is 0.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl TryFrom<f64> for Seconds {
    type Error = String;
    fn try_from(secs: f64) -> std::result::Result<Seconds, String> {
        Seconds::new(secs, false)
    }
}

/// As written in the configuration: `60`, `0.5`.
impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

/// A float as TOML writes it (`nan`, `inf`, `-inf`, `1e20`), for messages.
pub(crate) fn toml_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{x:?}").replace(".0e", "e").trim_end_matches(".0").to_string()
    }
}

/// Defines `fn $key(deserializer)`, reading the key `$key` as [`Seconds`] (`positive`: more than
/// 0) with an error that names the key; `opt` makes it an `Option<Seconds>` (used with
/// `#[serde(default)]`).
macro_rules! seconds_key {
    ($key:ident, $positive:expr) => {
        fn $key<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> std::result::Result<$crate::parsed::Seconds, D::Error> {
            $crate::parsed::read_seconds(d, stringify!($key), $positive)
        }
    };
    ($key:ident, $positive:expr, opt) => {
        fn $key<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> std::result::Result<Option<$crate::parsed::Seconds>, D::Error> {
            $crate::parsed::read_seconds(d, stringify!($key), $positive).map(Some)
        }
    };
}

pub(crate) use seconds_key;

/// Reads a number (integer or float) as [`Seconds`]; anything else, or a number out of range, is
/// an error naming `key` and saying what is allowed.
pub(crate) fn read_seconds<'de, D: serde::Deserializer<'de>>(
    d: D,
    key: &str,
    positive: bool,
) -> std::result::Result<Seconds, D::Error> {
    let err = |what: String| serde::de::Error::custom(format!("{key} = {what}"));
    let secs = match toml::Value::deserialize(d)? {
        toml::Value::Float(x) => x,
        toml::Value::Integer(n) => n as f64,
        other => {
            let (t, n) = (other.type_str(), Seconds::allowed(positive));
            return Err(err(format!("{other} is not allowed (a {t}): {n}")));
        }
    };
    Seconds::new(secs, positive).map_err(err)
}

/// A TOML error on one line (`line 2, column 18: …`), for the log: toml's own rendering spans
/// several lines.
pub(crate) fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

/// A series selector: `name` or `name{label="value",…}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Selector {
    /// Sample name as exposed.
    pub name: String,
    /// Labels that must match.
    pub labels: Vec<(String, String)>,
}

impl TryFrom<String> for Selector {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Selector, String> {
        Selector::parse(&s).ok_or_else(|| format!("series {s:?}: write name or name{{label=\"value\"}}"))
    }
}

impl Selector {
    /// Parses a selector.
    pub fn parse(s: &str) -> Option<Selector> {
        let s = s.trim();
        let (name, rest) = match s.find('{') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        if !crate::layout::valid_metric_name(name) {
            return None;
        }
        let mut labels = Vec::new();
        if let Some(rest) = rest {
            let inner = rest.strip_suffix('}')?;
            for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=')?;
                let v = v.trim().strip_prefix('"')?.strip_suffix('"')?;
                labels.push((k.trim().to_string(), v.to_string()));
            }
        }
        Some(Selector { name: name.to_string(), labels })
    }
}

impl Selector {
    /// Whether a sample (name and labels) matches.
    pub fn matches(&self, name: &str, labels: &[(String, String)]) -> bool {
        self.name == name && self.labels.iter().all(|l| labels.contains(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let s = Selector::parse(r#"http_requests_total{code="500", method="GET"}"#).expect("selector");
        assert_eq!(s.name, "http_requests_total");
        let l =
            |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert!(s.matches("http_requests_total", &l(&[("code", "500"), ("method", "GET"), ("path", "/")])));
        assert!(!s.matches("http_requests_total", &l(&[("code", "200"), ("method", "GET")])));
        assert!(Selector::parse("bad name").is_none());
        assert!(Selector::parse("x{a=b}").is_none());
        assert_eq!(Selector::parse("up").map(|s| s.labels.len()), Some(0));
    }
}
