//! The `netdev` pollster: `/proc/net/dev`'s sixteen counters per interface, as node_exporter's
//! `node_network_{receive,transmit}_<stat>_total{device}` counters.
//!
//! The set is node_exporter's default one (its names after its "legacy" renaming, which are the
//! file's own column names): receive bytes, packets, errs, drop, fifo, frame, compressed,
//! multicast; transmit bytes, packets, errs, drop, fifo, colls, carrier, compressed. Like
//! node_exporter's, no device is excluded by default.
//!
//! The file is read here rather than through procfs's `DeviceStatus`: an interface name may hold
//! any byte but `/`, `:` and white space, and procfs reads the file as UTF-8 and fails it whole
//! on one odd name or field. Here a name that is not UTF-8 keeps its other characters (the
//! others become U+FFFD, a label value must be UTF-8) and a field that is not a number loses
//! only its own series.

use super::families::{decimal, finish, lines, read_proc, Fam};
use crate::merge::SnapFamily;

/// The columns after `name:`, in order.
const STATS: [&str; 16] = [
    "receive_bytes",
    "receive_packets",
    "receive_errs",
    "receive_drop",
    "receive_fifo",
    "receive_frame",
    "receive_compressed",
    "receive_multicast",
    "transmit_bytes",
    "transmit_packets",
    "transmit_errs",
    "transmit_drop",
    "transmit_fifo",
    "transmit_colls",
    "transmit_carrier",
    "transmit_compressed",
];

/// Reads the families now.
pub fn read() -> Result<Vec<SnapFamily>, String> {
    Ok(families(&read_proc("/proc/net/dev")?))
}

/// The families of `/proc/net/dev`'s text.
pub(crate) fn families(text: &[u8]) -> Vec<SnapFamily> {
    let mut fams: Vec<Fam> = STATS
        .iter()
        .map(|s| {
            Fam::counter(&format!("node_network_{s}"), &format!("Network device statistic {s}."), &["device"])
        })
        .collect();
    for line in lines(text) {
        // The two header lines have no `:`; names cannot hold one.
        let Some((name, values)) = line.split_once(':') else { continue };
        let device = name.trim();
        if device.is_empty() {
            continue;
        }
        for (fam, word) in fams.iter_mut().zip(values.split_ascii_whitespace()) {
            if let Some(v) = decimal(word, 0).filter(|_| !word.contains('.')) {
                fam.push(&[device], v);
            }
        }
    }
    finish(fams)
}

#[cfg(test)]
mod tests {
    use super::super::families::{dump, fixture};
    use super::*;

    #[test]
    fn recorded_net_dev() {
        let (text, want) = fixture("net-dev");
        assert_eq!(dump(&families(&text)), want);
    }

    /// An old kernel's `eth0:123` (no space), a name that is not UTF-8, huge and bad fields, a
    /// short line.
    #[test]
    fn odd_lines() {
        let text = b"Inter-|   Receive |  Transmit\n face |bytes packets|bytes\n\
            eth0:123 4 0 0 0 0 0 0 18446744073709551615 6 0 0 0 0 0 0\n\
            we\xffird: x 5\n\
            short: 1\n\
            : 9 9\n";
        let got = dump(&families(text));
        let mut want = vec![
            "counter node_network_receive_bytes{device=\"eth0\"} 123".to_string(),
            "counter node_network_receive_bytes{device=\"short\"} 1".to_string(),
            "counter node_network_receive_packets{device=\"eth0\"} 4".to_string(),
            "counter node_network_receive_packets{device=\"we\u{fffd}ird\"} 5".to_string(),
        ];
        for s in &STATS[2..8] {
            want.push(format!("counter node_network_{s}{{device=\"eth0\"}} 0"));
        }
        want.push("counter node_network_transmit_bytes{device=\"eth0\"} 18446744073709552000".to_string());
        want.push("counter node_network_transmit_packets{device=\"eth0\"} 6".to_string());
        for s in &STATS[10..] {
            want.push(format!("counter node_network_{s}{{device=\"eth0\"}} 0"));
        }
        assert_eq!(got, want);
        assert!(families(b"").is_empty());
    }

    /// On this machine: every interface of `/proc/net/dev` in each of the sixteen families.
    #[test]
    fn reads_this_machine() {
        let fams = read().expect("/proc/net/dev is readable");
        let devices =
            std::fs::read_to_string("/proc/net/dev").expect("/proc/net/dev").lines().skip(2).count();
        assert!(devices >= 1, "at least lo");
        assert_eq!(fams.len(), STATS.len());
        assert!(fams.iter().all(|f| f.series.len() == devices));
        assert_eq!(fams[0].meta.desc.name, "node_network_receive_bytes");
    }
}
