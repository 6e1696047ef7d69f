//! Turning what the aggregator sees into alarms. (Being written.)

/// A series selector: `name` or `name{label="value",…}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// Sample name as exposed.
    pub name: String,
    /// Labels that must match.
    pub labels: Vec<(String, String)>,
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
