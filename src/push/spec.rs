//! One `[[push]]` section, parsed once when the file is loaded ("parse, don't validate").
//!
//! The section is read as a plain TOML table and parsed here by hand rather than by serde's
//! derive: then every mistake — an unknown key, a missing `address`, `freq_seconds = 0`, a
//! `database` on a statsd pusher — is one message that names the `[[push]]` (by its `name`, or
//! `type:address`), the key, and what to write instead. A pusher task never meets a value it
//! would have to refuse later.

use crate::parsed::{Seconds, Selector};

/// The wire a pusher speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Etsy's statsd over UDP: counters as deltas (`name:delta|c`), gauges (`name:value|g`).
    Statsd,
    /// Graphite's plaintext protocol over TCP (`path value timestamp`).
    Carbon,
    /// uWSGI's socket pusher format over UDP (`name type value`).
    Socket,
    /// InfluxDB 1.x line protocol, over UDP or HTTP.
    Influx,
}

impl Kind {
    /// As written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Statsd => "statsd",
            Kind::Carbon => "carbon",
            Kind::Socket => "socket",
            Kind::Influx => "influx",
        }
    }
}

/// How labels become dotted name parts (statsd, carbon, socket; influx uses tags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabelStyle {
    /// `name.value1.value2…`, in label order.
    #[default]
    Values,
    /// `name.label1.value1.label2.value2…`.
    Pairs,
}

/// InfluxDB transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Datagrams to an `[[udp]]` listener (which picks the database).
    #[default]
    Udp,
    /// `POST /write?db=<database>&precision=s`.
    Http,
}

/// One `[[push]]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct PushSpec {
    /// `statsd`, `carbon`, `socket` or `influx`.
    pub kind: Kind,
    /// The `pusher` label of the pusher's own counters (default `type:address`).
    pub name: String,
    /// `host:port`, resolved at every push.
    pub address: String,
    /// Dotted parts every pushed name starts with (none by default).
    pub prefix: Option<String>,
    /// Time between pushes.
    pub freq: Seconds,
    /// How labels become name parts.
    pub labels: LabelStyle,
    /// Only samples matching one of these (all when empty).
    pub series: Vec<Selector>,
    /// InfluxDB: UDP or HTTP.
    pub transport: Transport,
    /// InfluxDB over HTTP: the database.
    pub database: Option<String>,
    /// Bound of one push (resolving, connecting, sending, the answer).
    pub timeout: Seconds,
}

const KEYS: &[&str] = &[
    "type",
    "name",
    "address",
    "prefix",
    "freq_seconds",
    "labels",
    "series",
    "transport",
    "database",
    "timeout_seconds",
];

impl<'de> serde::Deserialize<'de> for PushSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PushSpec, D::Error> {
        let table = toml::Table::deserialize(d)?;
        PushSpec::parse(&table).map_err(serde::de::Error::custom)
    }
}

fn string<'a>(t: &'a toml::Table, key: &str, what: &str) -> Result<Option<&'a str>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!("{key} = {v} is not allowed (a {}): {what}", v.type_str())),
    }
}

/// `host:port` with a port from 1 to 65535 (`[::1]:8125` for IPv6).
fn check_address(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else { return false };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace) && !host.contains('/')
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Dotted parts of `[A-Za-z0-9_-]`.
fn check_prefix(p: &str) -> bool {
    p.split('.').all(|part| {
        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

impl PushSpec {
    /// Parses one section; the error names the section (`[[push]] "name"`) and the key.
    pub fn parse(t: &toml::Table) -> Result<PushSpec, String> {
        // The section's name for messages: as early as it can be known.
        let given_name = t.get("name").and_then(toml::Value::as_str);
        let kind_text = t.get("type").and_then(toml::Value::as_str);
        let addr_text = t.get("address").and_then(toml::Value::as_str);
        let label = match (given_name, kind_text, addr_text) {
            (Some(n), _, _) => format!("[[push]] {n:?}"),
            (None, Some(k), Some(a)) => format!("[[push]] \"{k}:{a}\""),
            _ => "[[push]]".to_string(),
        };
        let err = |m: String| format!("{label}: {m}");
        for key in t.keys() {
            if !KEYS.contains(&key.as_str()) {
                return Err(err(format!("unknown key {key:?}; the keys are {}", KEYS.join(", "))));
            }
        }
        let kinds = "write type = \"statsd\", \"carbon\", \"socket\" or \"influx\"";
        let kind = match string(t, "type", kinds).map_err(err)? {
            Some("statsd") => Kind::Statsd,
            Some("carbon") => Kind::Carbon,
            Some("socket") => Kind::Socket,
            Some("influx") => Kind::Influx,
            Some(other) => return Err(err(format!("type = {other:?} is not a pusher: {kinds}"))),
            None => return Err(err(format!("type is missing: {kinds}"))),
        };
        let addr_what = "write address = \"host:port\" (e.g. \"127.0.0.1:8125\", \"[::1]:2003\")";
        let address = match string(t, "address", addr_what).map_err(err)? {
            Some(a) if check_address(a) => a.to_string(),
            Some(a) => return Err(err(format!("address = {a:?} is not host:port: {addr_what}"))),
            None => return Err(err(format!("address is missing: {addr_what}"))),
        };
        let name_what = "write a name of letters, digits and _ . : - (the pusher label)";
        let name = match string(t, "name", name_what).map_err(err)? {
            Some(n)
                if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-[]".contains(c)) =>
            {
                n.to_string()
            }
            Some(n) => return Err(err(format!("name = {n:?} is not allowed: {name_what}"))),
            None => format!("{}:{address}", kind.as_str()),
        };
        let prefix_what = "write dotted parts of letters, digits, _ and - (e.g. \"shmetrics.web1\")";
        let prefix = match string(t, "prefix", prefix_what).map_err(err)? {
            Some(p) if check_prefix(p) => Some(p.to_string()),
            Some(p) => return Err(err(format!("prefix = {p:?} is not allowed: {prefix_what}"))),
            None => None,
        };
        let seconds = |key: &str, default: u64| -> Result<Seconds, String> {
            let secs = match t.get(key) {
                None => return Ok(Seconds::from_secs(default)),
                Some(toml::Value::Float(x)) => *x,
                Some(toml::Value::Integer(n)) => *n as f64,
                Some(v) => {
                    let what = Seconds::allowed(true);
                    return Err(err(format!("{key} = {v} is not allowed (a {}): {what}", v.type_str())));
                }
            };
            Seconds::new(secs, true).map_err(|m| err(format!("{key} = {m}")))
        };
        let freq = seconds("freq_seconds", 10)?;
        let timeout = seconds("timeout_seconds", 5)?;
        let labels_what = "write labels = \"values\" (name.value1.value2) or \"pairs\" (name.label1.value1)";
        let labels = match string(t, "labels", labels_what).map_err(err)? {
            None | Some("values") => LabelStyle::Values,
            Some("pairs") => LabelStyle::Pairs,
            Some(o) => return Err(err(format!("labels = {o:?} is not allowed: {labels_what}"))),
        };
        let series_what = "write series = [\"name\", 'name{label=\"value\"}', …]";
        let series = match t.get("series") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    let parsed = item.as_str().and_then(Selector::parse);
                    match parsed {
                        Some(s) => out.push(s),
                        None => return Err(err(format!("series: {item} is not a selector: {series_what}"))),
                    }
                }
                out
            }
            Some(v) => return Err(err(format!("series = {v} is not a list: {series_what}"))),
        };
        let transport_what = "write transport = \"udp\" or \"http\"";
        let transport = match string(t, "transport", transport_what).map_err(err)? {
            _ if kind != Kind::Influx && t.contains_key("transport") => {
                return Err(err("transport is only for type = \"influx\"".into()))
            }
            None | Some("udp") => Transport::Udp,
            Some("http") => Transport::Http,
            Some(o) => return Err(err(format!("transport = {o:?} is not allowed: {transport_what}"))),
        };
        let db_what = "write database = \"name\" (letters, digits, _ and -)";
        let database = match string(t, "database", db_what).map_err(err)? {
            Some(_) if transport != Transport::Http => {
                return Err(err(
                    "database is only for type = \"influx\" with transport = \"http\" (an InfluxDB \
                     [[udp]] listener writes into the database of its own section)"
                        .into(),
                ))
            }
            Some(d)
                if !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                Some(d.to_string())
            }
            Some(d) => return Err(err(format!("database = {d:?} is not allowed: {db_what}"))),
            None if transport == Transport::Http => {
                return Err(err(format!("transport = \"http\" needs a database: {db_what}")))
            }
            None => None,
        };
        Ok(PushSpec { kind, name, address, prefix, freq, labels, series, transport, database, timeout })
    }
}

/// Checks the sections together: every pusher's name (its `pusher` label) is unique.
pub fn check_all(specs: &[PushSpec]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(format!(
                "[[push]] {:?}: two pushers have this name; give one a name = \"…\" of its own",
                s.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PushSpec, String> {
        let t: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        PushSpec::parse(&t)
    }

    #[test]
    fn defaults() {
        let s = parse("type = \"statsd\"\naddress = \"127.0.0.1:8125\"").expect("spec");
        assert_eq!(s.name, "statsd:127.0.0.1:8125");
        assert_eq!(s.freq, Seconds::from_secs(10));
        assert_eq!(s.timeout, Seconds::from_secs(5));
        assert_eq!(
            (s.labels, s.transport, s.prefix, s.database),
            (LabelStyle::Values, Transport::Udp, None, None)
        );
        let s = parse("type = \"influx\"\naddress = \"[::1]:8086\"\ntransport = \"http\"\ndatabase = \"d\"\nfreq_seconds = 0.5\nlabels = \"pairs\"\nseries = ['x_total{a=\"b\"}']\nprefix = \"a.b-c\"\nname = \"i\"").expect("spec");
        assert_eq!(
            (s.kind, s.transport, s.database.as_deref(), s.name.as_str()),
            (Kind::Influx, Transport::Http, Some("d"), "i")
        );
        assert_eq!(s.freq.get(), std::time::Duration::from_millis(500));
        assert_eq!(s.series[0].labels, vec![("a".to_string(), "b".to_string())]);
    }

    #[test]
    fn mistakes_name_the_section_and_the_key() {
        let cases = [
            ("address = \"h:1\"", "[[push]]: type is missing: write type = \"statsd\", \"carbon\", \"socket\" or \"influx\""),
            ("type = \"graphite\"\naddress = \"h:1\"", "[[push]] \"graphite:h:1\": type = \"graphite\" is not a pusher: write type = \"statsd\", \"carbon\", \"socket\" or \"influx\""),
            ("type = \"carbon\"", "[[push]]: address is missing: write address = \"host:port\" (e.g. \"127.0.0.1:8125\", \"[::1]:2003\")"),
            ("type = \"carbon\"\naddress = \"h\"", "[[push]] \"carbon:h\": address = \"h\" is not host:port: write address = \"host:port\" (e.g. \"127.0.0.1:8125\", \"[::1]:2003\")"),
            ("type = \"carbon\"\naddress = \"h:0\"", "address = \"h:0\" is not host:port"),
            ("type = \"carbon\"\naddress = \"h:1\"\nfreq_seconds = 0", "[[push]] \"carbon:h:1\": freq_seconds = 0 is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)"),
            ("type = \"carbon\"\naddress = \"h:1\"\ntimeout_seconds = \"5\"", "[[push]] \"carbon:h:1\": timeout_seconds = \"5\" is not allowed (a string): write a number of seconds more than 0"),
            ("type = \"carbon\"\naddress = \"h:1\"\nadress = 1", "[[push]] \"carbon:h:1\": unknown key \"adress\"; the keys are type, name, address, prefix, freq_seconds, labels, series, transport, database, timeout_seconds"),
            ("type = \"carbon\"\naddress = \"h:1\"\nprefix = \"a..b\"", "[[push]] \"carbon:h:1\": prefix = \"a..b\" is not allowed: write dotted parts of letters, digits, _ and - (e.g. \"shmetrics.web1\")"),
            ("type = \"carbon\"\naddress = \"h:1\"\nlabels = \"names\"", "labels = \"names\" is not allowed: write labels = \"values\" (name.value1.value2) or \"pairs\" (name.label1.value1)"),
            ("type = \"carbon\"\naddress = \"h:1\"\nseries = [\"a b\"]", "series: \"a b\" is not a selector"),
            ("type = \"statsd\"\naddress = \"h:1\"\ntransport = \"http\"", "[[push]] \"statsd:h:1\": transport is only for type = \"influx\""),
            ("type = \"influx\"\naddress = \"h:1\"\ntransport = \"http\"", "[[push]] \"influx:h:1\": transport = \"http\" needs a database: write database = \"name\" (letters, digits, _ and -)"),
            ("type = \"influx\"\naddress = \"h:1\"\ndatabase = \"d\"", "database is only for type = \"influx\" with transport = \"http\""),
            ("type = \"influx\"\naddress = \"h:1\"\ntransport = \"tcp\"", "transport = \"tcp\" is not allowed: write transport = \"udp\" or \"http\""),
            ("type = \"influx\"\naddress = \"h:1\"\nname = \"a b\"", "[[push]] \"a b\": name = \"a b\" is not allowed"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text:?}:\n got {e}\nwant {want}");
        }
        let a = parse("type = \"statsd\"\naddress = \"h:1\"").expect("a");
        let e = check_all(&[a.clone(), a]).expect_err("dup");
        assert_eq!(
            e,
            "[[push]] \"statsd:h:1\": two pushers have this name; give one a name = \"…\" of its own"
        );
    }
}
