//! The pollsters' state file: the runtime changes (`set_interval`, `set_pollsters`) that must
//! outlive the aggregator, as procagent's `conf` file keeps what `setintvl` and `setpoll` set.
//!
//! # Why a file of its own, and why "made against"
//!
//! A change made on the monitor port is an operator's decision that a restart must not undo: an
//! aggregator restarted by its supervisor, or a fresh start of the whole job, polls as it was told
//! to. So the change is written to `pollsters.state.json` in the multiproc directory, which every
//! start-up rule keeps (`crate::dir`), and read back at start.
//!
//! But the configuration file stays the base, and it may be edited too. Each recorded change
//! (per key: `interval_seconds`, `enabled`) carries the file's value it was made against.
//! The settings in force are the file's, with each change applied only while the file still says
//! what it said when the change was made. An edited key in the file (seen at a SIGHUP reload or at
//! a start) means someone decided again, later: the file wins for that key and its change is
//! dropped from the state file; a key the file did not change keeps its runtime value.
//!
//! # Trust
//!
//! The directory is shared with the workers, so the file is untrusted input like every other
//! there: it is opened with [`crate::trust::open_read`] (regular file, no link followed, trusted
//! owner, no blocking), read only up to [`MAX_BYTES`], and must parse strictly. An unusable file
//! (corrupt, foreign, a link, too large) is set aside under `pollsters.state.json.corrupt-<secs>`
//! with an error in the log, and the file's settings are used: a bad state file never stops a
//! start. It is written only through [`crate::trust::replace`] (mode 0600, `O_EXCL` temporary,
//! fsync, rename, directory fsync), so a crash leaves the old file or the new one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Pollster, Settings};
use crate::parsed::Seconds;
use crate::trust::{self, Refused, Trust};

/// The file's name in the multiproc directory.
pub const FILE: &str = crate::dir::POLLSTERS_STATE_FILE;

/// The largest state file read: a few hundred bytes are enough for every key.
pub const MAX_BYTES: u64 = 64 * 1024;

/// The format version written and accepted.
const VERSION: u32 = 1;

/// A key's runtime change: its value, and the configuration file's value it was made against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Change<T> {
    value: T,
    against: T,
}

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    version: u32,
    /// Exact (seconds and nanoseconds), so that "the file's value equals the one the change was
    /// made against" never depends on rounding a float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval_seconds: Option<Change<Duration>>,
    /// Sorted, each once: the set matters, not the order the names were written in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<Change<Vec<Pollster>>>,
}

impl Default for Recorded {
    fn default() -> Recorded {
        Recorded { version: VERSION, interval_seconds: None, enabled: None }
    }
}

impl Serialize for Pollster {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A set of pollsters in its one form: sorted, each once.
pub(crate) fn normal(list: &[Pollster]) -> Vec<Pollster> {
    let mut v = list.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Checks what parsed: the values the commands could have set.
fn check(r: &Recorded) -> Result<(), String> {
    if r.version != VERSION {
        return Err(format!("format version {} (this build reads version {VERSION})", r.version));
    }
    if let Some(c) = &r.interval_seconds {
        Seconds::from_duration(c.value, true).map_err(|e| format!("interval_seconds {e}"))?;
    }
    if let Some(c) = &r.enabled {
        if c.value != normal(&c.value) || c.against != normal(&c.against) {
            return Err("enabled is not a sorted list of distinct pollsters".into());
        }
    }
    Ok(())
}

/// The settings in force, and which of them are runtime changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    /// What the pollsters do now (`enabled` sorted).
    pub settings: Settings,
    /// Whether the interval is a runtime change (else the configuration file's, or the default).
    pub interval_changed: bool,
    /// Whether the set of pollsters is a runtime change.
    pub enabled_changed: bool,
}

/// The state file of one directory and what it records.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    recorded: Recorded,
}

impl Store {
    /// Reads the state file of `dir` (which this aggregator holds the lock of). Missing: no
    /// changes. Unusable: set aside, with an error in the log; no changes. Temporaries of an
    /// earlier aggregator's writes are removed.
    pub fn load(dir: &Path, trust: &Trust) -> Store {
        remove_temps(dir, trust);
        let path = dir.join(FILE);
        let recorded = match read(&path, trust) {
            Ok(Some(r)) => r,
            Ok(None) => Recorded::default(),
            Err(why) => {
                let aside = trust::aside_name(dir, FILE, "corrupt");
                match std::fs::rename(&path, &aside) {
                    Ok(()) => tracing::error!(
                        file = %path.display(),
                        "the pollsters' state file is unusable ({why}); set aside as {} — the \
                         configuration file's [pollsters] settings are in force, and the next \
                         set_interval or set_pollsters writes a new state file",
                        aside.display()
                    ),
                    Err(e) => tracing::error!(
                        file = %path.display(),
                        "the pollsters' state file is unusable ({why}) and cannot be set aside \
                         ({e}); the configuration file's [pollsters] settings are in force"
                    ),
                }
                Recorded::default()
            }
        };
        Store { dir: dir.to_path_buf(), recorded }
    }

    /// The settings in force given the configuration file's `file`. Changes made against another
    /// value of their key than `file`'s are dropped (the file changed that key since): returns
    /// whether any was, and so whether the state file needs saving.
    pub fn apply(&mut self, file: &Settings) -> (Effective, bool) {
        let mut dropped = false;
        let mut settings = Settings { interval: file.interval, enabled: normal(&file.enabled) };
        let (mut interval_changed, mut enabled_changed) = (false, false);
        if let Some(c) = &self.recorded.interval_seconds {
            if c.against == file.interval.get() {
                // Checked at load (and set by `set_interval` from a parsed value): in range.
                settings.interval = Seconds::from_duration(c.value, true).unwrap_or(file.interval);
                interval_changed = true;
            } else {
                self.recorded.interval_seconds = None;
                dropped = true;
            }
        }
        if let Some(c) = &self.recorded.enabled {
            if c.against == normal(&file.enabled) {
                settings.enabled = c.value.clone();
                enabled_changed = true;
            } else {
                self.recorded.enabled = None;
                dropped = true;
            }
        }
        (Effective { settings, interval_changed, enabled_changed }, dropped)
    }

    /// Records `interval` as a runtime change against the file's `file` (no change when they are
    /// equal: the file's value is in force).
    pub fn set_interval(&mut self, file: &Settings, interval: Seconds) {
        self.recorded.interval_seconds = (interval != file.interval)
            .then(|| Change { value: interval.get(), against: file.interval.get() });
    }

    /// Records `enabled` as a runtime change against the file's `file`, as
    /// [`Store::set_interval`] does.
    pub fn set_enabled(&mut self, file: &Settings, enabled: &[Pollster]) {
        let (value, against) = (normal(enabled), normal(&file.enabled));
        self.recorded.enabled = (value != against).then_some(Change { value, against });
    }

    /// Writes the file durably. The error says what failed.
    pub fn save(&self) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(&self.recorded).map_err(|e| e.to_string())?;
        trust::replace(&self.dir, FILE, &json).map_err(|e| e.to_string())
    }
}

/// The recorded changes of `path`: `None` if there is no file, `Err(why)` if it is unusable.
fn read(path: &Path, trust: &Trust) -> Result<Option<Recorded>, String> {
    let (file, meta) = match trust::open_read(path, trust) {
        Ok(f) => f,
        Err(Refused::Gone) => return Ok(None),
        Err(r) => return Err(format!("{r}")),
    };
    if meta.len() > MAX_BYTES {
        return Err(format!("{} bytes, more than the {MAX_BYTES} a state file may have", meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!("more than the {MAX_BYTES} bytes a state file may have"));
    }
    let r: Recorded =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a pollsters state file: {e}"))?;
    check(&r)?;
    Ok(Some(r))
}

/// Removes the temporaries a write of an earlier aggregator left (only the lock's holder writes
/// them, and we hold it now).
fn remove_temps(dir: &Path, trust: &Trust) {
    let Ok(names) = crate::dir::list(dir) else { return };
    for n in names.iter().filter(|n| trust::is_replace_temp(n, FILE)) {
        let p = dir.join(n);
        if trust::open_read(&p, trust).is_ok() {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), "cannot remove a temporary of the pollsters' state file: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn trust() -> Trust {
        Trust::new(nix::unistd::geteuid().as_raw())
    }

    fn file(interval: u64, enabled: &[Pollster]) -> Settings {
        Settings { interval: Seconds::from_secs(interval), enabled: enabled.to_vec() }
    }

    use Pollster::{Cpu, Filesystem, Loadavg, Meminfo};

    #[test]
    fn a_change_survives_a_reload_until_the_file_changes_that_key() {
        let d = tempfile::tempdir().unwrap();
        let base = file(10, &[Loadavg, Cpu]);
        let mut s = Store::load(d.path(), &trust());
        assert_eq!(
            s.apply(&base),
            (
                Effective {
                    settings: file(10, &[Cpu, Loadavg]),
                    interval_changed: false,
                    enabled_changed: false
                },
                false
            )
        );
        s.set_interval(&base, Seconds::from_secs(2));
        s.set_enabled(&base, &[Filesystem, Meminfo]);
        s.save().unwrap();
        let mode = std::fs::metadata(d.path().join(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A restart with the same file: both changes in force.
        let mut s = Store::load(d.path(), &trust());
        let both = Effective {
            settings: file(2, &[Meminfo, Filesystem]),
            interval_changed: true,
            enabled_changed: true,
        };
        assert_eq!(s.apply(&base), (both.clone(), false));
        // The file lists the same set in another order: not a change of the file.
        assert_eq!(s.apply(&file(10, &[Cpu, Loadavg])), (both, false));

        // The file's `enabled` changed: it wins for `enabled`, the interval stays the runtime one.
        let edited = file(10, &[Cpu]);
        let (e, dropped) = s.apply(&edited);
        assert!(dropped);
        assert_eq!(
            e,
            Effective { settings: file(2, &[Cpu]), interval_changed: true, enabled_changed: false }
        );
        s.save().unwrap();
        let text = std::fs::read_to_string(d.path().join(FILE)).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({"version": 1, "interval_seconds": {
                "value": {"secs": 2, "nanos": 0}, "against": {"secs": 10, "nanos": 0}}})
        );
        // Going back to the old file does not bring the dropped change back.
        assert_eq!(s.apply(&base).0.settings, file(2, &[Cpu, Loadavg]));

        // Setting the file's own value is no change.
        s.set_interval(&base, Seconds::from_secs(10));
        assert_eq!(
            s.apply(&base).0,
            Effective {
                settings: file(10, &[Cpu, Loadavg]),
                interval_changed: false,
                enabled_changed: false
            }
        );
    }

    #[test]
    fn fractional_intervals_are_exact() {
        let d = tempfile::tempdir().unwrap();
        let spec: super::super::PollstersSpec = toml::from_str("interval_seconds = 0.1").unwrap();
        let base = Settings::from_spec(Some(&spec));
        let mut s = Store::load(d.path(), &trust());
        let v: Seconds = serde_json::from_str("2.7").unwrap();
        s.set_interval(&base, v);
        s.save().unwrap();
        let mut s = Store::load(d.path(), &trust());
        let (e, dropped) = s.apply(&base);
        assert!(!dropped);
        assert_eq!(e.settings.interval, v);
        assert!(e.interval_changed);
    }

    #[test]
    fn an_unusable_file_is_set_aside_and_the_file_settings_used() {
        let base = file(10, &[Cpu]);
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("not json", b"{{{".to_vec()),
            ("another version", br#"{"version":2}"#.to_vec()),
            ("an unknown key", br#"{"version":1,"x":1}"#.to_vec()),
            ("an unknown pollster", br#"{"version":1,"enabled":{"value":["gpu"],"against":[]}}"#.to_vec()),
            (
                "a zero interval",
                br#"{"version":1,"interval_seconds":{"value":{"secs":0,"nanos":0},"against":{"secs":10,"nanos":0}}}"#.to_vec(),
            ),
            ("too large", vec![b' '; MAX_BYTES as usize + 1]),
        ];
        for (what, bytes) in bad {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(FILE), &bytes).unwrap();
            let mut s = Store::load(d.path(), &trust());
            assert_eq!(s.apply(&base).0.settings, base, "{what}");
            let names = crate::dir::list(d.path()).unwrap();
            assert_eq!(names.len(), 1, "{what}: {names:?}");
            assert!(names[0].starts_with(crate::dir::POLLSTERS_STATE_ASIDE_PREFIX), "{what}: {names:?}");
            assert_eq!(std::fs::read(d.path().join(&names[0])).unwrap(), bytes, "{what}: kept as it was");
        }
    }

    #[test]
    fn a_planted_link_is_neither_followed_nor_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, br#"{"version":1}"#).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(FILE)).unwrap();
        let base = file(10, &[Cpu]);
        let mut s = Store::load(d.path(), &trust());
        assert_eq!(s.apply(&base).0.settings, base);
        s.set_interval(&base, Seconds::from_secs(3));
        s.save().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), br#"{"version":1}"#);
        assert!(std::fs::symlink_metadata(d.path().join(FILE)).unwrap().is_file());
    }

    #[test]
    fn a_fifo_does_not_block_the_start() {
        let d = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&d.path().join(FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut s = Store::load(d.path(), &trust());
        assert_eq!(s.apply(&file(5, &[])).0.settings, file(5, &[]));
        assert!(std::fs::symlink_metadata(d.path().join(FILE)).is_err(), "set aside");
    }

    #[test]
    fn leftover_temporaries_are_removed_at_load() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join(format!(".{FILE}.Ab12Cd34Ef56.tmp"));
        std::fs::write(&tmp, "half").unwrap();
        std::fs::write(d.path().join("other"), "x").unwrap();
        let _ = Store::load(d.path(), &trust());
        assert_eq!(crate::dir::list(d.path()).unwrap(), vec!["other".to_string()]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let base = file(10, &[Cpu]);
        let mut s = Store::load(d.path(), &trust());
        s.set_interval(&base, Seconds::from_secs(3));
        s.save().unwrap();
        let before = std::fs::read(d.path().join(FILE)).unwrap();
        // A store whose directory is gone cannot write.
        let gone = Store { dir: d.path().join("gone"), recorded: s.recorded.clone() };
        let e = gone.save().unwrap_err();
        assert!(e.contains("gone"), "{e}");
        assert_eq!(std::fs::read(d.path().join(FILE)).unwrap(), before);
    }
}
