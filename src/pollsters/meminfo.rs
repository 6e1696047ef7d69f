//! The `meminfo` pollster: every line of `/proc/meminfo` as a node_exporter gauge,
//! `node_memory_<Field>_bytes` (kB × 1024), or `node_memory_<Field>` for a count without a unit
//! (`HugePages_Total`).
//!
//! The lines are read generically, as node_exporter's original collector read them, not
//! through procfs's `Meminfo` (a fixed struct): a field a newer kernel adds still shows up, under
//! the name node_exporter gives it. The name is the field with its parenthesis turned into an
//! underscore (`Active(anon)` → `Active_anon`); a character a metric name cannot hold becomes
//! `_` too. A line that does not parse is left out, the others stay.

use std::collections::HashSet;

use super::families::{decimal, lines, read_proc, Fam};
use crate::merge::SnapFamily;

/// Reads the families now.
pub fn read() -> Result<Vec<SnapFamily>, String> {
    let fams = families(&read_proc("/proc/meminfo")?);
    if fams.is_empty() {
        return Err("/proc/meminfo has no line that parses".into());
    }
    Ok(fams)
}

/// The families of `/proc/meminfo`'s text, in the file's order.
pub(crate) fn families(text: &[u8]) -> Vec<SnapFamily> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in lines(text) {
        let Some((key, value)) = line.split_once(':') else { continue };
        let words: Vec<&str> = value.split_ascii_whitespace().collect();
        let (value, unit) = match words[..] {
            [v] => (v, None),
            [v, u] => (v, Some(u)),
            _ => continue,
        };
        let Some(mut v) = decimal(value, 0) else { continue };
        let mut name = format!("node_memory_{}", field_name(key.trim()));
        if unit.is_some() {
            // node_exporter presumes kB whatever the unit says; the kernel only prints kB.
            v *= 1024.0;
            name.push_str("_bytes");
        }
        if name == "node_memory_" || !seen.insert(name.clone()) {
            continue;
        }
        let help = format!("Memory information field {}.", &name["node_memory_".len()..]);
        let mut f = Fam::gauge(&name, &help, &[]);
        f.push(&[], v);
        out.extend(f.done());
    }
    out
}

/// node_exporter's name for a field: `Active(anon)` → `Active_anon`, and anything else that
/// is not a letter, digit or `_` → `_`.
fn field_name(key: &str) -> String {
    let key = match (key.find('('), key.rfind(')')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}_{}{}", &key[..open], &key[open + 1..close], &key[close + 1..])
        }
        _ => key.to_string(),
    };
    key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::super::families::{dump, fixture};
    use super::*;

    #[test]
    fn recorded_meminfo() {
        let (text, want) = fixture("meminfo");
        assert_eq!(dump(&families(&text)), want);
    }

    #[test]
    fn names_units_and_odd_lines() {
        let text = b"MemTotal:       24683772 kB\n\
            Active(anon):     123 kB\n\
            HugePages_Total:       7\n\
            Hugepagesize:       2048 kB\n\
            NewField(x)y:  1 kB\n\
            Weird.Field-2:  3\n\
            Huge:  18446744073709551615 kB\n\
            \n\
            NoValue:\n\
            Words: a lot\n\
            TooMany: 1 kB more\n\
            MemTotal:  5 kB\n\
            Negative: -5 kB\n\
            \xff\xfeBin(ary): 9\n\
            no colon 5\n";
        let want = [
            "gauge node_memory_MemTotal_bytes{} 25276182528",
            "gauge node_memory_Active_anon_bytes{} 125952",
            "gauge node_memory_HugePages_Total{} 7",
            "gauge node_memory_Hugepagesize_bytes{} 2097152",
            "gauge node_memory_NewField_xy_bytes{} 1024",
            "gauge node_memory_Weird_Field_2{} 3",
            "gauge node_memory_Huge_bytes{} 18889465931478580000000",
            "gauge node_memory___Bin_ary{} 9",
        ];
        assert_eq!(dump(&families(text)), want);
        let fams = families(text);
        assert_eq!(fams[0].meta.desc.help, "Memory information field MemTotal_bytes.");
        assert!(families(b"").is_empty());
    }

    #[test]
    fn reads_this_machine() {
        let fams = read().expect("/proc/meminfo is readable");
        let lines = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo").lines().count();
        assert_eq!(fams.len(), lines);
        let names: Vec<&str> = fams.iter().map(|f| f.meta.desc.name.as_str()).collect();
        for name in
            ["node_memory_MemTotal_bytes", "node_memory_MemAvailable_bytes", "node_memory_Active_anon_bytes"]
        {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }
}
