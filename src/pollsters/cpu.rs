//! The `cpu` pollster: `/proc/stat`'s times per cpu and mode, and `/proc/cpuinfo`'s model and
//! frequency, with node_exporter's names (`node_cpu_seconds_total{cpu="0",mode="idle"}`, …).
//!
//! The `cpuN` lines of `/proc/stat` are read here rather than through procfs's `KernelStats`:
//! that one numbers the cpus by their position, which is wrong as soon as a cpu is offline (the
//! kernel leaves its line out), and it fails the whole file on one field it cannot parse. Here
//! the `cpu` label is the kernel's number, as node_exporter's is, and a field that is not a
//! number only loses its own series. `/proc/cpuinfo` goes through procfs's `CpuInfo`; what it
//! lacks (ARM has no `cpu MHz`, no `vendor_id`) gives empty labels or no frequency series, never
//! an error, and a cpuinfo that cannot be read at all leaves the times alone.

use procfs::FromRead;

use super::families::{decimal, finish, lines, read_proc, Fam};
use crate::merge::SnapFamily;

/// `/proc/stat`'s columns after the cpu name, in order, with node_exporter's mode names; the
/// last two are the guest times (`node_cpu_guest_seconds_total`).
const MODES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];
const GUEST_MODES: [&str; 2] = ["user", "nice"];

/// cpuinfo's fields behind `node_cpu_info`'s labels, in label order: sorted by name, as
/// node_exporter exposes them (Go's client sorts labels), so the text is the same as theirs.
const INFO_LABELS: [&str; 10] = [
    "cachesize",
    "core",
    "cpu",
    "family",
    "microcode",
    "model",
    "model_name",
    "package",
    "stepping",
    "vendor",
];
const INFO_FIELDS: [&str; 10] = [
    "cache size",
    "core id",
    "processor",
    "cpu family",
    "microcode",
    "model",
    "model name",
    "physical id",
    "stepping",
    "vendor_id",
];

/// Reads the families now.
pub fn read() -> Result<Vec<SnapFamily>, String> {
    let stat = read_proc("/proc/stat")?;
    // cpuinfo adds to the times; without it (or unparsable) the times still count.
    let info = read_proc("/proc/cpuinfo").ok().and_then(|b| procfs::CpuInfo::from_read(&b[..]).ok());
    let fams = families(&stat, info.as_ref(), procfs::ticks_per_second());
    if fams.is_empty() {
        return Err("/proc/stat has no cpuN line with times".into());
    }
    Ok(fams)
}

/// The families of `/proc/stat`'s text, `/proc/cpuinfo` parsed, and USER_HZ (ticks per second).
pub(crate) fn families(
    stat: &[u8],
    info: Option<&procfs::CpuInfo>,
    ticks_per_second: u64,
) -> Vec<SnapFamily> {
    let hz = ticks_per_second.max(1) as f64;
    let mut seconds =
        Fam::counter("node_cpu_seconds", "Seconds the CPUs spent in each mode.", &["cpu", "mode"]);
    let mut guest = Fam::counter(
        "node_cpu_guest_seconds",
        "Seconds the CPUs spent in guests (VMs) for each mode.",
        &["cpu", "mode"],
    );
    for line in lines(stat) {
        let mut words = line.split_ascii_whitespace();
        let Some(cpu) = words.next().and_then(|w| w.strip_prefix("cpu")) else { continue };
        if cpu.is_empty() || !cpu.bytes().all(|b| b.is_ascii_digit()) {
            continue; // the `cpu` total line, or not a cpu
        }
        let ticks: Vec<Option<f64>> = words.map(|w| decimal(w, 0).filter(|_| !w.contains('.'))).collect();
        for (mode, t) in MODES.iter().zip(&ticks) {
            if let Some(t) = t {
                seconds.push(&[cpu, mode], t / hz);
            }
        }
        for (mode, t) in GUEST_MODES.iter().zip(ticks.iter().skip(MODES.len())) {
            if let Some(t) = t {
                guest.push(&[cpu, mode], t / hz);
            }
        }
    }
    let mut info_fam = Fam::gauge("node_cpu_info", "CPU information from /proc/cpuinfo.", &INFO_LABELS);
    let mut freq = Fam::gauge(
        "node_cpu_frequency_hertz",
        "CPU frequency in hertz, from /proc/cpuinfo's cpu MHz.",
        &["cpu"],
    );
    if let Some(info) = info {
        for i in 0..info.num_cores() {
            let Some(cpu) = info.get_field(i, "processor") else { continue };
            let values = INFO_FIELDS.map(|f| info.get_field(i, f).unwrap_or(""));
            info_fam.push(&values, 1.0);
            if let Some(hz) = info.get_field(i, "cpu MHz").and_then(|m| decimal(m, 6)) {
                freq.push(&[cpu], hz);
            }
        }
    }
    finish([seconds, guest, info_fam, freq])
}

#[cfg(test)]
mod tests {
    use super::super::families::dump;
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/data/proc/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn cpuinfo(name: &str) -> procfs::CpuInfo {
        procfs::CpuInfo::from_read(&fixture(name)[..]).expect("cpuinfo fixture parses")
    }

    #[test]
    fn recorded_stat_and_x86_cpuinfo() {
        let info = cpuinfo("cpuinfo-x86");
        let got = dump(&families(&fixture("stat"), Some(&info), 100));
        let want = [
            "counter node_cpu_seconds{cpu=\"0\",mode=\"user\"} 98.69",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"nice\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"system\"} 44.37",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"idle\"} 464.53",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"iowait\"} 2.5",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"irq\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"softirq\"} 0.13",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"steal\"} 2.54",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"user\"} 131.57",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"nice\"} 0",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"system\"} 51.68",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"idle\"} 421.27",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"iowait\"} 5.36",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"irq\"} 0",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"softirq\"} 0.73",
            "counter node_cpu_seconds{cpu=\"1\",mode=\"steal\"} 2.59",
            "counter node_cpu_guest_seconds{cpu=\"0\",mode=\"user\"} 0",
            "counter node_cpu_guest_seconds{cpu=\"0\",mode=\"nice\"} 0",
            "counter node_cpu_guest_seconds{cpu=\"1\",mode=\"user\"} 0.17",
            "counter node_cpu_guest_seconds{cpu=\"1\",mode=\"nice\"} 0.03",
            "gauge node_cpu_info{cachesize=\"1024 KB\",core=\"0\",cpu=\"0\",family=\"26\",microcode=\"0x1000065\",\
             model=\"2\",model_name=\"AMD EPYC\",package=\"0\",stepping=\"1\",vendor=\"AuthenticAMD\"} 1",
            "gauge node_cpu_info{cachesize=\"1024 KB\",core=\"1\",cpu=\"1\",family=\"26\",microcode=\"0x1000065\",\
             model=\"2\",model_name=\"AMD EPYC\",package=\"0\",stepping=\"1\",vendor=\"AuthenticAMD\"} 1",
            "gauge node_cpu_frequency_hertz{cpu=\"0\"} 2596122000",
            "gauge node_cpu_frequency_hertz{cpu=\"1\"} 2596122000",
        ];
        assert_eq!(got, want);
    }

    /// An offline cpu (no `cpu2` line), huge and odd fields, a kernel without the guest columns.
    #[test]
    fn odd_stat_lines() {
        let stat = b"cpu  1 2 3 4\n\
            cpu0 100 0 50 18446744073709551615 0 0 0 0 0 0\n\
            cpu3 250 x 1.5 -1\n\
            cpu 7 7\n\
            cpufreq 1 2 3\n\
            cpu4\n\
            intr 1 2 3\n";
        let got = dump(&families(stat, None, 100));
        let want = [
            "counter node_cpu_seconds{cpu=\"0\",mode=\"user\"} 1",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"nice\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"system\"} 0.5",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"idle\"} 184467440737095520",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"iowait\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"irq\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"softirq\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"steal\"} 0",
            "counter node_cpu_seconds{cpu=\"3\",mode=\"user\"} 2.5",
            "counter node_cpu_guest_seconds{cpu=\"0\",mode=\"user\"} 0",
            "counter node_cpu_guest_seconds{cpu=\"0\",mode=\"nice\"} 0",
        ];
        assert_eq!(got, want);
    }

    /// ARM's cpuinfo: no `cpu MHz`, `vendor_id`, `model name`, `physical id`, …: empty labels, no
    /// frequency family, and the trailing `Hardware` block is not a cpu.
    #[test]
    fn arm_cpuinfo_without_mhz() {
        let info = cpuinfo("cpuinfo-arm");
        let got = dump(&families(b"cpu0 1 0 0 0\n", Some(&info), 100));
        let want = [
            "counter node_cpu_seconds{cpu=\"0\",mode=\"user\"} 0.01",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"nice\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"system\"} 0",
            "counter node_cpu_seconds{cpu=\"0\",mode=\"idle\"} 0",
            "gauge node_cpu_info{cachesize=\"\",core=\"\",cpu=\"0\",family=\"\",microcode=\"\",model=\"\",\
             model_name=\"\",package=\"\",stepping=\"\",vendor=\"\"} 1",
            "gauge node_cpu_info{cachesize=\"\",core=\"\",cpu=\"1\",family=\"\",microcode=\"\",model=\"\",\
             model_name=\"\",package=\"\",stepping=\"\",vendor=\"\"} 1",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn nothing_readable_is_no_family() {
        assert!(families(b"", None, 100).is_empty());
        assert!(families(b"\xff\xfe garbage\n", None, 0).is_empty());
    }

    /// On this machine: 8 modes and 2 guest modes per online cpu, one info series per cpu.
    #[test]
    fn reads_this_machine() {
        let fams = read().expect("/proc/stat is readable");
        let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let count = |name: &str| fams.iter().find(|f| f.meta.desc.name == name).map_or(0, |f| f.series.len());
        // available_parallelism honours the affinity mask; /proc/stat lists every online cpu.
        let cpus = count("node_cpu_seconds") / MODES.len();
        assert_eq!(count("node_cpu_seconds"), MODES.len() * cpus);
        assert!(cpus >= online, "{cpus} cpus in /proc/stat, {online} usable");
        assert_eq!(count("node_cpu_guest_seconds"), GUEST_MODES.len() * cpus);
        assert_eq!(count("node_cpu_info"), cpus);
    }
}
