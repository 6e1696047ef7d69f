//! The `diskstats` pollster: `/proc/diskstats` as node_exporter's `node_disk_*{device}`
//! families, in seconds and bytes (sectors are 512 bytes whatever the device's, times are ms).
//!
//! Devices node_exporter's default `--collector.diskstats.device-exclude` leaves out are left out
//! here too: partitions and RAM, loop and floppy disks,
//! `^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$`, matched by hand ([`excluded`]) rather
//! than with a regex engine for one fixed pattern. Each line goes through procfs's `DiskStat`;
//! a line it cannot parse is left out, not the whole file, and a device name that is not UTF-8
//! keeps its other characters. The discard (kernel 4.18) and flush (5.5) columns give their
//! families only where the kernel prints them. node_exporter's udev-based families
//! (`node_disk_info`, `node_disk_ata_*`, device-mapper) are not here: they read `/run/udev`, not
//! `/proc`.

use procfs::DiskStat;

use super::families::{finish, lines, read_proc, Fam};
use crate::merge::SnapFamily;

/// Bytes per sector in `/proc/diskstats`.
const SECTOR: f64 = 512.0;
/// Milliseconds per second (times are divided, not multiplied by 0.001, to give the `f64`
/// nearest the decimal: 11 ms is 0.011 s, not 0.011000000000000001).
const MS: f64 = 1000.0;

/// Reads the families now.
pub fn read() -> Result<Vec<SnapFamily>, String> {
    Ok(families(&read_proc("/proc/diskstats")?))
}

/// The families of `/proc/diskstats`'s text.
pub(crate) fn families(text: &[u8]) -> Vec<SnapFamily> {
    type Get = fn(&DiskStat) -> Option<f64>;
    let defs: [(&str, &str, bool, Get); 17] = [
        ("node_disk_reads_completed", "The total number of reads completed successfully.", true, |d| {
            Some(d.reads as f64)
        }),
        ("node_disk_reads_merged", "The total number of reads merged.", true, |d| Some(d.merged as f64)),
        ("node_disk_read_bytes", "The total number of bytes read successfully.", true, |d| {
            Some(d.sectors_read as f64 * SECTOR)
        }),
        ("node_disk_read_time_seconds", "The total number of seconds spent by all reads.", true, |d| {
            Some(d.time_reading as f64 / MS)
        }),
        ("node_disk_writes_completed", "The total number of writes completed successfully.", true, |d| {
            Some(d.writes as f64)
        }),
        ("node_disk_writes_merged", "The number of writes merged.", true, |d| Some(d.writes_merged as f64)),
        ("node_disk_written_bytes", "The total number of bytes written successfully.", true, |d| {
            Some(d.sectors_written as f64 * SECTOR)
        }),
        (
            "node_disk_write_time_seconds",
            "This is the total number of seconds spent by all writes.",
            true,
            |d| Some(d.time_writing as f64 / MS),
        ),
        ("node_disk_io_now", "The number of I/Os currently in progress.", false, |d| {
            Some(d.in_progress as f64)
        }),
        ("node_disk_io_time_seconds", "Total seconds spent doing I/Os.", true, |d| {
            Some(d.time_in_progress as f64 / MS)
        }),
        ("node_disk_io_time_weighted_seconds", "The weighted # of seconds spent doing I/Os.", true, |d| {
            Some(d.weighted_time_in_progress as f64 / MS)
        }),
        ("node_disk_discards_completed", "The total number of discards completed successfully.", true, |d| {
            d.discards.map(|n| n as f64)
        }),
        ("node_disk_discards_merged", "The total number of discards merged.", true, |d| {
            d.discards_merged.map(|n| n as f64)
        }),
        ("node_disk_discarded_sectors", "The total number of sectors discarded successfully.", true, |d| {
            d.sectors_discarded.map(|n| n as f64)
        }),
        (
            "node_disk_discard_time_seconds",
            "This is the total number of seconds spent by all discards.",
            true,
            |d| d.time_discarding.map(|n| n as f64 / MS),
        ),
        (
            "node_disk_flush_requests",
            "The total number of flush requests completed successfully",
            true,
            |d| d.flushes.map(|n| n as f64),
        ),
        (
            "node_disk_flush_requests_time_seconds",
            "This is the total number of seconds spent by all flush requests.",
            true,
            |d| d.time_flushing.map(|n| n as f64 / MS),
        ),
    ];
    let mut fams: Vec<(Fam, Get)> = defs
        .iter()
        .map(|&(name, help, counter, get)| {
            let fam = if counter {
                Fam::counter(name, help, &["device"])
            } else {
                Fam::gauge(name, help, &["device"])
            };
            (fam, get)
        })
        .collect();
    for line in lines(text) {
        let Ok(disk) = DiskStat::from_line(&line) else { continue };
        if excluded(&disk.name) {
            continue;
        }
        for (fam, get) in &mut fams {
            if let Some(v) = get(&disk) {
                fam.push(&[&disk.name], v);
            }
        }
    }
    finish(fams.into_iter().map(|(f, _)| f))
}

/// Whether node_exporter's default device exclusion,
/// `^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$`, matches `name`.
pub(crate) fn excluded(name: &str) -> bool {
    /// `s` is one or more ASCII digits.
    fn digits(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }
    /// `s` starts with one or more digits; the rest after them.
    fn after_digits(s: &str) -> Option<&str> {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        (n > 0).then(|| &s[n..])
    }
    let plain = ["ram", "zram", "loop", "fd"].iter().any(|p| name.strip_prefix(p).is_some_and(digits));
    let lettered = ["hd", "sd", "vd", "xvd"].iter().any(|p| {
        name.strip_prefix(p).is_some_and(|rest| {
            let mut chars = rest.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase()) && digits(chars.as_str())
        })
    });
    let nvme = name
        .strip_prefix("nvme")
        .and_then(after_digits)
        .and_then(|s| s.strip_prefix('n'))
        .and_then(after_digits)
        .and_then(|s| s.strip_prefix('p'))
        .is_some_and(digits);
    plain || lettered || nvme
}

#[cfg(test)]
mod tests {
    use super::super::families::{dump, fixture};
    use super::*;

    #[test]
    fn the_default_exclusion() {
        for name in [
            "ram0",
            "zram0",
            "zram12",
            "loop7",
            "fd0",
            "sda1",
            "sdz15",
            "hda3",
            "vda1",
            "xvda2",
            "nvme0n1p1",
            "nvme12n3p45",
        ] {
            assert!(excluded(name), "{name} excluded");
        }
        for name in [
            "sda",
            "vda",
            "xvda",
            "nvme0n1",
            "dm-0",
            "md0",
            "mmcblk0",
            "mmcblk0p1",
            "sr0",
            "loop",
            "ram",
            "sdaa1",
            "sdA1",
            "zzram0",
            "nvme0n1p",
            "nvmen1p1",
            "nvme0p1",
            "loop1a",
            "",
            "sd1",
            "xvd1",
        ] {
            assert!(!excluded(name), "{name} kept");
        }
    }

    #[test]
    fn recorded_diskstats() {
        let (text, want) = fixture("diskstats");
        assert_eq!(dump(&families(&text)), want);
    }

    /// A kernel without the discard and flush columns, a bad line, a huge field, an odd name.
    #[test]
    fn old_kernels_and_odd_lines() {
        let text = b"   8       0 sda 1 2 3 4 5 6 7 8 9 10 11\n\
            8 1 sda1 1 2 3 4 5 6 7 8 9 10 11\n\
            8 16 sdb x 2 3 4 5 6 7 8 9 10 11\n\
            8 32 sdc 1 2\n\
            253 0 dm\xff0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 1 2 3 4\n";
        let got = dump(&families(text));
        let want = [
            "counter node_disk_reads_completed{device=\"sda\"} 1",
            "counter node_disk_reads_completed{device=\"dm\u{fffd}0\"} 18446744073709552000",
            "counter node_disk_reads_merged{device=\"sda\"} 2",
            "counter node_disk_reads_merged{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_read_bytes{device=\"sda\"} 1536",
            "counter node_disk_read_bytes{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_read_time_seconds{device=\"sda\"} 0.004",
            "counter node_disk_read_time_seconds{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_writes_completed{device=\"sda\"} 5",
            "counter node_disk_writes_completed{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_writes_merged{device=\"sda\"} 6",
            "counter node_disk_writes_merged{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_written_bytes{device=\"sda\"} 3584",
            "counter node_disk_written_bytes{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_write_time_seconds{device=\"sda\"} 0.008",
            "counter node_disk_write_time_seconds{device=\"dm\u{fffd}0\"} 0",
            "gauge node_disk_io_now{device=\"sda\"} 9",
            "gauge node_disk_io_now{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_io_time_seconds{device=\"sda\"} 0.01",
            "counter node_disk_io_time_seconds{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_io_time_weighted_seconds{device=\"sda\"} 0.011",
            "counter node_disk_io_time_weighted_seconds{device=\"dm\u{fffd}0\"} 0",
            "counter node_disk_discards_completed{device=\"dm\u{fffd}0\"} 1",
            "counter node_disk_discards_merged{device=\"dm\u{fffd}0\"} 2",
            "counter node_disk_discarded_sectors{device=\"dm\u{fffd}0\"} 3",
            "counter node_disk_discard_time_seconds{device=\"dm\u{fffd}0\"} 0.004",
        ];
        assert_eq!(got, want);
        assert!(families(b"").is_empty());
    }

    /// On this machine: one series per kept device of `/proc/diskstats` in each of the basic
    /// families.
    #[test]
    fn reads_this_machine() {
        let fams = read().expect("/proc/diskstats is readable");
        let text = std::fs::read_to_string("/proc/diskstats").expect("/proc/diskstats");
        let kept = text.lines().filter_map(|l| l.split_whitespace().nth(2)).filter(|n| !excluded(n)).count();
        let count = |name: &str| fams.iter().find(|f| f.meta.desc.name == name).map_or(0, |f| f.series.len());
        for name in [
            "node_disk_reads_completed",
            "node_disk_written_bytes",
            "node_disk_io_now",
            "node_disk_io_time_seconds",
        ] {
            assert_eq!(count(name), kept, "{name}");
        }
    }
}
