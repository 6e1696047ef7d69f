//! What the six readers share: reading a `/proc` file safely, and building node_exporter-shaped
//! families.
//!
//! Every value is an `f64`, as node_exporter's are: the kernel's counters are 64-bit and some
//! are scaled (sectors × 512, kB × 1024), which would overflow an integer on odd input, while a
//! float only loses digits nobody reads. A family with no series is left out (a snapshot's
//! families each have at least one), so a reader can build every family it knows and let the
//! ones this kernel does not fill disappear.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Value};

/// One family being filled: its description and its series.
pub(crate) struct Fam {
    name: String,
    help: String,
    t: MetricType,
    label_names: &'static [&'static str],
    series: Vec<(Arc<LabelSet>, Value)>,
}

impl Fam {
    /// A gauge family.
    pub(crate) fn gauge(name: &str, help: &str, label_names: &'static [&'static str]) -> Fam {
        Fam::new(name, help, MetricType::Gauge, label_names)
    }

    /// A counter family; `name` is without `_total` (the encoders add it).
    pub(crate) fn counter(name: &str, help: &str, label_names: &'static [&'static str]) -> Fam {
        Fam::new(name, help, MetricType::Counter, label_names)
    }

    fn new(name: &str, help: &str, t: MetricType, label_names: &'static [&'static str]) -> Fam {
        Fam { name: name.to_string(), help: help.to_string(), t, label_names, series: Vec::new() }
    }

    /// Adds a series; `values` are the label values, in the order of the family's label names.
    pub(crate) fn push(&mut self, values: &[&str], v: f64) {
        let pairs: Vec<(&str, &str)> = self.label_names.iter().copied().zip(values.iter().copied()).collect();
        self.series.push((LabelSet::shared(&pairs), Value::F64(v)));
    }

    /// The family, if it has a series.
    pub(crate) fn done(self) -> Option<SnapFamily> {
        if self.series.is_empty() {
            return None;
        }
        let meta: Arc<FamilyMeta> =
            FamilyMeta::own(&self.name, &self.help, self.t, ValueType::F64, self.label_names);
        Some(SnapFamily { meta, series: self.series })
    }
}

/// The families that have series, in order.
pub(crate) fn finish(fams: impl IntoIterator<Item = Fam>) -> Vec<SnapFamily> {
    fams.into_iter().filter_map(Fam::done).collect()
}

/// A decimal number as the kernel prints it (`2596.122`, `0.58`, `18446744073709551615`), as
/// the nearest `f64`; `None` for anything else (signs, exponents, `inf`, words). `scale` is a
/// power of ten applied to the decimal text itself, so `2596.122` MHz is exactly 2596122000 Hz.
pub(crate) fn decimal(text: &str, scale: u32) -> Option<f64> {
    let mut dots = 0;
    let ok = !text.is_empty()
        && text.bytes().all(|b| {
            dots += usize::from(b == b'.');
            b.is_ascii_digit() || b == b'.'
        })
        && dots <= 1
        && text.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    format!("{text}e{scale}").parse().ok()
}

/// Reads a file of `/proc` whole: not through a symbolic link at its last component, not
/// blocking on something that is not a regular file. The error names the file.
pub(crate) fn read_proc(path: &str) -> Result<Vec<u8>, String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat {path}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(bytes)
}

/// The lines of a `/proc` file, each as text (bytes that are not UTF-8, as in a device name,
/// become U+FFFD rather than losing the file).
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(String::from_utf8_lossy)
}

/// A test view of families: one line per series, `TYPE name{labels} value`, in order.
#[cfg(test)]
pub(crate) fn dump(fams: &[SnapFamily]) -> Vec<String> {
    let mut out = Vec::new();
    for f in fams {
        let t = match f.meta.desc.metric_type {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            _ => "other",
        };
        for (l, v) in &f.series {
            let v = match v {
                Value::F64(x) => format!("{x}"),
                other => format!("{other:?}"),
            };
            out.push(format!("{t} {}{{{}}} {v}", f.meta.desc.name, l.text));
        }
    }
    out
}

/// A recorded `/proc` file under `tests/data/proc/`, and the lines [`dump`] must give for it
/// (`NAME.expected`, written independently of this code).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> (Vec<u8>, Vec<String>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/proc");
    let text = std::fs::read(dir.join(name)).expect("fixture");
    let want = std::fs::read_to_string(dir.join(format!("{name}.expected"))).expect("expected fixture");
    (text, want.lines().map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_and_words_are_not_numbers() {
        assert_eq!(decimal("2596.122", 6), Some(2_596_122_000.0));
        assert_eq!(decimal("0.58", 0), Some(0.58));
        assert_eq!(decimal("18446744073709551615", 0), Some(18_446_744_073_709_551_615.0));
        assert_eq!(decimal("7", 3), Some(7000.0));
        assert_eq!(decimal("5.", 0), Some(5.0));
        assert_eq!(decimal(".5", 0), Some(0.5));
        for bad in ["", ".", "1.2.3", "-1", "1e5", "inf", "NaN", "12a", " 1"] {
            assert_eq!(decimal(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn empty_families_are_left_out() {
        let mut a = Fam::gauge("a", "A.", &["x"]);
        a.push(&["1"], 2.0);
        let b = Fam::counter("b", "B.", &[]);
        let out = finish([a, b]);
        assert_eq!(dump(&out), ["gauge a{x=\"1\"} 2"]);
    }

    #[test]
    fn read_proc_refuses_what_is_not_a_file_and_names_it() {
        assert_eq!(read_proc("/proc/self/fd"), Err("/proc/self/fd is not a regular file".to_string()));
        let e = read_proc("/proc/no-such-file").unwrap_err();
        assert!(e.starts_with("cannot open /proc/no-such-file: "), "{e}");
        // `/proc/self` is a symbolic link: not followed at the last component.
        let e = read_proc("/proc/self").unwrap_err();
        assert!(e.starts_with("cannot open /proc/self: "), "{e}");
    }
}

/// What `/metrics` shows of the readers' families: node_exporter's exposition.
#[cfg(test)]
mod exposition {
    use crate::expose::{encode, Format};
    use crate::merge::Snapshot;

    #[test]
    fn counters_get_total_and_labels_their_order() {
        let stat = b"cpu0 10 0 0 46453 0 0 0 0 17 3\n";
        let mut families = super::super::cpu::families(stat, None, 100);
        families.extend(super::super::meminfo::families(b"Active(anon): 2 kB\nHugePages_Total: 0\n"));
        let text = encode(&Snapshot { families }, Format::Prometheus);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(lines.contains(&"node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 464.53"), "{text}");
        assert!(lines.contains(&"node_cpu_guest_seconds_total{cpu=\"0\",mode=\"nice\"} 0.03"), "{text}");
        assert!(lines.contains(&"node_memory_Active_anon_bytes 2048.0"), "{text}");
        assert!(lines.contains(&"node_memory_HugePages_Total 0.0"), "{text}");
        assert!(text.contains("# TYPE node_cpu_seconds_total counter\n"), "{text}");
        assert!(text.contains("# TYPE node_memory_Active_anon_bytes gauge\n"), "{text}");
    }
}
