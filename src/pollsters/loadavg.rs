//! The `loadavg` pollster: `/proc/loadavg`'s three load averages as node_exporter's
//! `node_load1`, `node_load5` and `node_load15` gauges.
//!
//! procfs parses the file into `f32`s; the kernel prints two decimals, and an `f32` widened to
//! `f64` would show `0.5799999833106995` for `0.58`, so each value goes back through its
//! shortest decimal form (which an `f32` round-trips) to the `f64` nearest what the kernel wrote.

use procfs::FromRead;

use super::families::{decimal, finish, read_proc, Fam};
use crate::merge::SnapFamily;

/// Reads the families now.
pub fn read() -> Result<Vec<SnapFamily>, String> {
    let bytes = read_proc("/proc/loadavg")?;
    let load =
        procfs::LoadAverage::from_read(&bytes[..]).map_err(|e| format!("cannot parse /proc/loadavg: {e}"))?;
    Ok(families(&load))
}

/// The families of `/proc/loadavg` parsed.
pub(crate) fn families(load: &procfs::LoadAverage) -> Vec<SnapFamily> {
    let all = [
        ("node_load1", "1m", load.one),
        ("node_load5", "5m", load.five),
        ("node_load15", "15m", load.fifteen),
    ];
    finish(all.map(|(name, span, v)| {
        let mut f = Fam::gauge(name, &format!("{span} load average."), &[]);
        if let Some(v) = widen(v) {
            f.push(&[], v);
        }
        f
    }))
}

/// The `f64` nearest the decimal an `f32` stands for; `None` if it is not a finite,
/// non-negative number.
fn widen(v: f32) -> Option<f64> {
    if !v.is_finite() {
        return None;
    }
    decimal(&v.to_string(), 0)
}

#[cfg(test)]
mod tests {
    use super::super::families::dump;
    use super::*;

    fn parse(text: &str) -> Result<Vec<String>, String> {
        let load = procfs::LoadAverage::from_read(text.as_bytes()).map_err(|e| e.to_string())?;
        Ok(dump(&families(&load)))
    }

    #[test]
    fn recorded_loadavg() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/proc/loadavg");
        let text = std::fs::read_to_string(path).expect("fixture");
        assert_eq!(text, "0.08 0.45 0.29 1/117 11345\n");
        assert_eq!(
            parse(&text),
            Ok(vec![
                "gauge node_load1{} 0.08".to_string(),
                "gauge node_load5{} 0.45".to_string(),
                "gauge node_load15{} 0.29".to_string(),
            ])
        );
    }

    #[test]
    fn big_loads_and_bad_files() {
        assert_eq!(
            parse("1234.58 99999.99 0.00 120/4000 4194304\n"),
            Ok(vec![
                "gauge node_load1{} 1234.58".to_string(),
                "gauge node_load5{} 99999.99".to_string(),
                "gauge node_load15{} 0".to_string(),
            ])
        );
        assert!(parse("").is_err());
        assert!(parse("0.1 0.2\n").is_err());
        assert!(parse("a b c 1/2 3\n").is_err());
    }

    #[test]
    fn reads_this_machine() {
        let fams = read().expect("/proc/loadavg is readable");
        let names: Vec<&str> = fams.iter().map(|f| f.meta.desc.name.as_str()).collect();
        assert_eq!(names, ["node_load1", "node_load5", "node_load15"]);
        assert!(fams.iter().all(|f| f.series.len() == 1));
    }
}
