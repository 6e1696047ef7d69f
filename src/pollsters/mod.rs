//! System pollsters (procagent's, with node_exporter's names): the host's CPU, load, memory,
//! network, disks and the multiproc directory's filesystem, read from `/proc` (through the
//! `procfs` crate) and `statvfs(2)` on an interval, and added to every merge as a job
//! [`Source`], so `/metrics`, threshold rules, pushers and the text dir all see them.
//!
//! # Why here
//!
//! The aggregator already runs on every host of the job, and the filesystem under the multiproc
//! directory is what fills up under the workers: a separate node agent is one more daemon to
//! deploy for figures that belong next to the job's. Names and labels are node_exporter's
//! (`node_load1`, `node_cpu_seconds_total{cpu="0",mode="idle"}`, …), values in seconds and bytes,
//! so existing dashboards and alerts work unchanged.
//!
//! # Runtime control
//!
//! Like procagent's `setintvl` and `setpoll`, the interval and the set of pollsters can be changed
//! while the aggregator runs (the monitor port's `set_interval` and `set_pollsters`, also through
//! `shmetrics ctl`, refused without `--allow-control`). A change is kept in a state file of ours
//! in the multiproc directory ([`state`]), which the start-up rules keep: it survives a restart of
//! the aggregator and a fresh start of the job. The configuration file stays the base: a SIGHUP
//! reload (or a start) with a file whose `interval_seconds` or `enabled` differs from the one the
//! change was made against drops that key's change — the file wins only for what it changed.
//!
//! The task and the control are in [`run`], the state file in [`state`].
//!
//! Readers ([`cpu`], [`loadavg`], [`meminfo`], [`netdev`], [`diskstats`], [`filesystem`]) are
//! plain functions from `/proc` text to families; each is tested on recorded files.

pub mod cpu;
pub mod diskstats;
mod families;
pub mod filesystem;
pub mod loadavg;
pub mod meminfo;
mod monotonic;
pub mod netdev;
pub mod run;
pub mod state;

pub use run::Pollsters;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use crate::merge::SnapFamily;
use crate::parsed::{seconds_key, Seconds};

/// One pollster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Pollster {
    /// `/proc/stat` times per cpu and mode, `/proc/cpuinfo`'s model and MHz.
    Cpu,
    /// `/proc/loadavg`.
    Loadavg,
    /// `/proc/meminfo`.
    Meminfo,
    /// `/proc/net/dev`.
    Netdev,
    /// `/proc/diskstats`.
    Diskstats,
    /// `statvfs(2)` of the multiproc directory's filesystem.
    Filesystem,
}

impl Pollster {
    /// Every pollster, in the order they are listed.
    pub const ALL: [Pollster; 6] = [
        Pollster::Cpu,
        Pollster::Loadavg,
        Pollster::Meminfo,
        Pollster::Netdev,
        Pollster::Diskstats,
        Pollster::Filesystem,
    ];

    /// Its name in the configuration and on the monitor port.
    pub fn name(self) -> &'static str {
        match self {
            Pollster::Cpu => "cpu",
            Pollster::Loadavg => "loadavg",
            Pollster::Meminfo => "meminfo",
            Pollster::Netdev => "netdev",
            Pollster::Diskstats => "diskstats",
            Pollster::Filesystem => "filesystem",
        }
    }

    /// Reads its families now (blocking: file reads and `statvfs`). `dir` is the multiproc
    /// directory (for [`Pollster::Filesystem`]). The error says what could not be read.
    pub fn read(self, dir: &Path) -> Result<Vec<SnapFamily>, String> {
        match self {
            Pollster::Cpu => cpu::read(),
            Pollster::Loadavg => loadavg::read(),
            Pollster::Meminfo => meminfo::read(),
            Pollster::Netdev => netdev::read(),
            Pollster::Diskstats => diskstats::read(),
            Pollster::Filesystem => filesystem::read(dir),
        }
    }
}

impl fmt::Display for Pollster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The names, comma-separated, as the monitor port shows them.
pub fn names(list: &[Pollster]) -> String {
    list.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
}

impl FromStr for Pollster {
    type Err = String;
    fn from_str(s: &str) -> Result<Pollster, String> {
        let t = s.trim();
        Pollster::ALL.into_iter().find(|p| p.name() == t).ok_or_else(|| {
            format!("unknown pollster {t:?}: the pollsters are {}", names(&Pollster::ALL).replace(',', ", "))
        })
    }
}

impl TryFrom<String> for Pollster {
    type Error = String;
    fn try_from(s: String) -> Result<Pollster, String> {
        s.parse()
    }
}

/// Parses `cpu,loadavg` (the monitor port's `set_pollsters`): names separated by commas (and
/// spaces), each known, none twice; an empty list (`""` or `none`) disables every pollster.
pub fn parse_list(text: &str) -> Result<Vec<Pollster>, String> {
    let t = text.trim();
    if t.is_empty() || t == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for word in t.split([',', ' ']).filter(|w| !w.is_empty()) {
        let p: Pollster = word.parse()?;
        if out.contains(&p) {
            return Err(format!("pollster {:?} is named twice", p.name()));
        }
        out.push(p);
    }
    Ok(out)
}

/// `[pollsters]` of the configuration file.
///
/// ```toml
/// [pollsters]
/// interval_seconds = 10              # default 10
/// enabled = ["cpu", "loadavg", "meminfo", "netdev", "diskstats", "filesystem"]   # default: all
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PollstersSpec {
    /// Seconds between two polls.
    #[serde(default = "default_interval", deserialize_with = "interval_seconds")]
    pub interval_seconds: Seconds,
    /// The pollsters to run.
    #[serde(default = "all", deserialize_with = "enabled")]
    pub enabled: Vec<Pollster>,
}

seconds_key!(interval_seconds, true);

fn default_interval() -> Seconds {
    Seconds::from_secs(10)
}

fn all() -> Vec<Pollster> {
    Pollster::ALL.to_vec()
}

/// `enabled`: known names, none twice.
fn enabled<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Pollster>, D::Error> {
    let list = Vec::<Pollster>::deserialize(d)?;
    for (i, p) in list.iter().enumerate() {
        if list[..i].contains(p) {
            return Err(serde::de::Error::custom(format!("enabled names pollster {:?} twice", p.name())));
        }
    }
    Ok(list)
}

/// The settings in force: the configuration file's `[pollsters]` with the runtime changes that
/// still apply. Without a `[pollsters]` section, none are enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Seconds between two polls.
    pub interval: Seconds,
    /// The pollsters that run.
    pub enabled: Vec<Pollster>,
}

impl Settings {
    /// What a configuration file says (`None`: no `[pollsters]` section).
    pub fn from_spec(spec: Option<&PollstersSpec>) -> Settings {
        match spec {
            Some(s) => Settings { interval: s.interval_seconds, enabled: s.enabled.clone() },
            None => Settings { interval: default_interval(), enabled: Vec::new() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<PollstersSpec, String> {
        toml::from_str::<PollstersSpec>(text).map_err(|e| e.message().to_string())
    }

    #[test]
    fn the_section_has_defaults_and_refuses_mistakes_naming_them() {
        assert_eq!(
            spec("").expect("empty"),
            PollstersSpec { interval_seconds: Seconds::from_secs(10), enabled: Pollster::ALL.to_vec() }
        );
        let s = spec("interval_seconds = 2.5\nenabled = [\"filesystem\", \"cpu\"]").expect("spec");
        assert_eq!(s.interval_seconds.get(), std::time::Duration::from_millis(2500));
        assert_eq!(s.enabled, [Pollster::Filesystem, Pollster::Cpu]);
        assert_eq!(spec("enabled = []").expect("none").enabled, []);
        let allowed = "write a number of seconds more than 0 and at most 31536000 (one year)";
        for (text, want) in [
            ("interval_seconds = 0", format!("interval_seconds = 0 is not allowed: {allowed}")),
            ("interval_seconds = inf", format!("interval_seconds = inf is not allowed: {allowed}")),
            ("interval_seconds = -1", format!("interval_seconds = -1 is not allowed: {allowed}")),
            (
                "enabled = [\"gpu\"]",
                "unknown pollster \"gpu\": the pollsters are cpu, loadavg, meminfo, netdev, diskstats, filesystem"
                    .to_string(),
            ),
            ("enabled = [\"cpu\", \"cpu\"]", "enabled names pollster \"cpu\" twice".to_string()),
        ] {
            assert_eq!(spec(text).expect_err(text), want, "{text}");
        }
        assert!(spec("intervall_seconds = 5")
            .expect_err("unknown key")
            .contains("unknown field `intervall_seconds`"));
    }

    #[test]
    fn lists_of_names() {
        assert_eq!(parse_list("cpu,loadavg"), Ok(vec![Pollster::Cpu, Pollster::Loadavg]));
        assert_eq!(parse_list(" cpu, filesystem "), Ok(vec![Pollster::Cpu, Pollster::Filesystem]));
        assert_eq!(parse_list("none"), Ok(vec![]));
        assert_eq!(parse_list(""), Ok(vec![]));
        assert_eq!(parse_list("cpu,,meminfo"), Ok(vec![Pollster::Cpu, Pollster::Meminfo]));
        assert_eq!(parse_list("cpu,cpu"), Err("pollster \"cpu\" is named twice".to_string()));
        assert_eq!(
            parse_list("cpu,CPU"),
            Err("unknown pollster \"CPU\": the pollsters are cpu, loadavg, meminfo, netdev, diskstats, filesystem"
                .to_string())
        );
        for p in Pollster::ALL {
            assert_eq!(p.name().parse::<Pollster>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(names(&Pollster::ALL), "cpu,loadavg,meminfo,netdev,diskstats,filesystem");
        assert_eq!(Settings::from_spec(None).enabled, []);
        assert_eq!(Settings::from_spec(None).interval, Seconds::from_secs(10));
    }
}
