//! Reader for Python prometheus_client's multiprocess files (`*.db` in `PROMETHEUS_MULTIPROC_DIR`).
//!
//! Existing Python applications (gunicorn, uWSGI) already write these files; reading them next to
//! our own lets an unchanged app get a fast aggregator. The format (see
//! `../shared/reference/python-multiproc-format.md` and prometheus_client's `mmap_dict.py`) has no
//! magic and no version: a 4-byte `used`, 4 bytes of padding, then entries of `int32 key length`,
//! a JSON key `[metric, sample, {labels}, help]`, 1–8 spaces of padding to an 8-byte boundary, and
//! the value (f64) followed, since 0.18, by a timestamp (f64). Releases before 0.18 stored only the
//! value, and releases before 0.16 wrote keys without the help text. Nothing in the file says which,
//! so [`PyFile`] detects the entry size by parsing the whole log both ways and accepts only an
//! unambiguous answer; anything else is rejected with a log line, never misparsed.
//!
//! As with our own files, a file stays open across scrapes, entries are parsed once (keys are
//! deduplicated across files by a [`KeyCache`]: 64 workers write the same keys), and a scrape only
//! reads values.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use crate::layout::GaugeMode;
use crate::reader::{BadReason, MappedFile};
use crate::trust::Trust;

/// What a Python file holds, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PyKind {
    /// `counter_<id>.db`
    Counter,
    /// `histogram_<id>.db`
    Histogram,
    /// `summary_<id>.db`
    Summary,
    /// `gauge_<mode>_<id>.db`
    Gauge(GaugeMode),
}

/// The parts of a Python file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyName {
    /// The metric kind.
    pub kind: PyKind,
    /// The process identifier (the pid unless the app chose another one).
    pub id: String,
}

impl PyName {
    /// The pid, when the identifier is one.
    pub fn pid(&self) -> Option<i32> {
        self.id.parse().ok().filter(|p| *p > 0)
    }
}

/// Parses `counter_<id>.db`, `histogram_<id>.db`, `summary_<id>.db`, `gauge_<mode>_<id>.db`.
pub fn parse_name(name: &str) -> Option<PyName> {
    let stem = name.strip_suffix(".db")?;
    let (kind, id) = if let Some(rest) = stem.strip_prefix("gauge_") {
        let (mode, id) = rest.split_once('_')?;
        (PyKind::Gauge(GaugeMode::parse(mode)?), id)
    } else {
        let (prefix, id) = stem.split_once('_')?;
        let kind = match prefix {
            "counter" => PyKind::Counter,
            "histogram" => PyKind::Histogram,
            "summary" => PyKind::Summary,
            _ => return None,
        };
        (kind, id)
    };
    (!id.is_empty()).then(|| PyName { kind, id: id.to_string() })
}

/// A parsed JSON key.
#[derive(Debug, PartialEq)]
pub struct PyKey {
    /// Metric (family) name.
    pub metric: String,
    /// Sample name (`<metric>_total`, `<metric>_bucket`, …).
    pub sample: String,
    /// Labels sorted by name (as Python sorts them).
    pub labels: Vec<(String, String)>,
    /// Help text; `None` for keys written before prometheus_client 0.16.
    pub help: Option<String>,
}

/// Parsed keys shared by all files: identical keys are parsed once.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: HashMap<Box<[u8]>, Arc<PyKey>>,
}

impl KeyCache {
    fn get(&mut self, raw: &[u8]) -> Option<Arc<PyKey>> {
        if let Some(k) = self.keys.get(raw) {
            return Some(Arc::clone(k));
        }
        let key = Arc::new(parse_key(raw)?);
        self.keys.insert(raw.into(), Arc::clone(&key));
        Some(key)
    }

    /// Number of distinct keys parsed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

fn parse_key(raw: &[u8]) -> Option<PyKey> {
    let v: Vec<serde_json::Value> = serde_json::from_slice(raw).ok()?;
    let (metric, sample, labels, help) = match v.as_slice() {
        [m, s, l] => (m, s, l, None),
        [m, s, l, h] => (m, s, l, Some(h.as_str()?.to_string())),
        _ => return None,
    };
    let mut labels: Vec<(String, String)> = labels
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect::<Option<_>>()?;
    labels.sort();
    Some(PyKey { metric: metric.as_str()?.to_string(), sample: sample.as_str()?.to_string(), labels, help })
}

/// Entry layouts, by value size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntrySize {
    /// Value and timestamp (prometheus_client ≥ 0.18).
    ValueAndTimestamp,
    /// Value only (before 0.18).
    ValueOnly,
}

impl EntrySize {
    fn bytes(self) -> usize {
        match self {
            EntrySize::ValueAndTimestamp => 16,
            EntrySize::ValueOnly => 8,
        }
    }
}

/// One entry of a Python file.
#[derive(Clone, Debug)]
pub struct PyEntry {
    /// Its key.
    pub key: Arc<PyKey>,
    /// Offset of its f64 value (8-aligned); the timestamp, if any, follows.
    pub value_at: u64,
}

/// Walks the entries in `buf` (file bytes from offset `base`) with a given value size; `None` if the
/// bytes do not parse that way from start to end exactly.
fn walk(buf: &[u8], base: u64, size: EntrySize, keys: &mut KeyCache) -> Option<Vec<PyEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let len_bytes: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        let len = usize::try_from(i32::from_le_bytes(len_bytes)).ok()?;
        let key_start = pos + 4;
        let raw = buf.get(key_start..key_start.checked_add(len)?)?;
        let padded = len + (8 - (len + 4) % 8);
        let value_at = key_start + padded;
        let end = value_at + size.bytes();
        if end > buf.len() || buf[key_start + len..value_at].iter().any(|b| *b != b' ') {
            return None;
        }
        out.push(PyEntry { key: keys.get(raw)?, value_at: base + value_at as u64 });
        pos = end;
    }
    Some(out)
}

/// An open Python file.
pub struct PyFile {
    path: PathBuf,
    mf: MappedFile,
    parsed_to: u64,
    size: Option<EntrySize>,
    /// Kind and id from the name.
    pub name: PyName,
    /// The file's creation time, when the filesystem records it.
    pub created: Option<SystemTime>,
    /// Device and inode, to recognise the file among a process's open descriptors.
    pub dev_ino: (u64, u64),
    /// Parsed entries, in file order.
    pub entries: Vec<PyEntry>,
    buf: Vec<u8>,
}

type Bad = (BadReason, String);

impl PyFile {
    /// Opens a Python file whose name parsed as `name` (a regular file of a trusted owner, see
    /// [`crate::trust`]).
    pub fn open(path: &Path, name: PyName, trust: &Trust) -> Result<PyFile, Bad> {
        let (file, meta) = crate::trust::open_read(path, trust).map_err(|r| BadReason::refused(&r))?;
        let mut head = [0u8; 16];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).unwrap_or(0);
        if n >= 16 && head.starts_with(b"SQLite format 3\0") {
            return Err((BadReason::Foreign, "an SQLite database, not a prometheus_client file".into()));
        }
        // Shorter than the header: a writer between creating and sizing the file (or killed
        // there). That is an empty file, not a bad one.
        let used = if n < 8 { 0 } else { i32::from_le_bytes([head[0], head[1], head[2], head[3]]) };
        // 0: a writer between `truncate` and its first write (prometheus_client sets 8 then).
        let fresh = used == 0;
        if !fresh && (used < 8 || used as u64 > meta.len()) || (n >= 8 && head[4..8] != [0, 0, 0, 0]) {
            return Err((BadReason::Foreign, format!("`used` = {used} does not fit the file")));
        }
        Ok(PyFile {
            path: path.to_path_buf(),
            created: meta.created().ok(),
            dev_ino: (meta.dev(), meta.ino()),
            mf: MappedFile::new(file),
            parsed_to: 8,
            size: None,
            name,
            entries: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// The path it was opened under.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the file was renamed (compaction moves it aside first).
    pub fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    /// Parses entries appended since the last call; returns the index of the first new entry.
    pub fn refresh(&mut self, keys: &mut KeyCache) -> Result<usize, Bad> {
        let first_new = self.entries.len();
        if self.parsed_to == 8 && self.mf.mapped() < 8 {
            // Nothing parsed yet and the file was too short to hold a header: look again.
            self.mf.unmap();
            let size = self.mf.file().metadata().map_err(|e| (BadReason::Corrupt, e.to_string()))?.len();
            if size < 8 {
                return Ok(first_new);
            }
        }
        if !self.mf.is_mapped() {
            self.mf.remap()?;
        }
        // `used` is a 4-byte int at offset 0; read it through the 8-byte atomic at 0.
        let word = self.mf.read(|r| r.atomic(0).map(|a| a.load(Ordering::Acquire)))?;
        let used = word.ok_or((BadReason::Truncated, String::from("no header")))? as u32 as i32;
        let used = u64::try_from(used).map_err(|_| (BadReason::Corrupt, String::from("negative `used`")))?;
        if used == 0 || used == self.parsed_to {
            return Ok(first_new);
        }
        if used < self.parsed_to {
            return Err((BadReason::Corrupt, "`used` went backwards".into()));
        }
        if used > self.mf.mapped() {
            self.mf.remap()?;
            if used > self.mf.mapped() {
                return Err((BadReason::Truncated, "`used` is past the end of the file".into()));
            }
        }
        let (from, len) = (self.parsed_to, (used - self.parsed_to) as usize);
        let mut buf = std::mem::take(&mut self.buf);
        let copied = self.mf.read(|r| r.copy_out(from, len, &mut buf).is_ok());
        let parsed = match copied {
            Ok(true) => self.parse(&buf, from, keys),
            Ok(false) => Err((BadReason::Truncated, "entries past the mapping".into())),
            Err(e) => Err(e),
        };
        buf.clear();
        self.buf = buf;
        self.entries.extend(parsed?);
        self.parsed_to = used;
        Ok(first_new)
    }

    fn parse(&mut self, buf: &[u8], base: u64, keys: &mut KeyCache) -> Result<Vec<PyEntry>, Bad> {
        if let Some(size) = self.size {
            return walk(buf, base, size, keys).ok_or((BadReason::Corrupt, "an entry does not parse".into()));
        }
        let new = walk(buf, base, EntrySize::ValueAndTimestamp, keys);
        let old = walk(buf, base, EntrySize::ValueOnly, keys);
        match (new, old) {
            (Some(e), None) => {
                self.size = Some(EntrySize::ValueAndTimestamp);
                Ok(e)
            }
            (None, Some(e)) => {
                self.size = Some(EntrySize::ValueOnly);
                tracing::info!(file = %self.path.display(),
                    "file written by prometheus_client before 0.18 (no timestamps); reading it as such");
                Ok(e)
            }
            (Some(_), Some(_)) => Err((
                BadReason::Version,
                "entries parse both as prometheus_client < 0.18 and ≥ 0.18; refusing to guess — \
                 wipe the directory when upgrading prometheus_client"
                    .into(),
            )),
            (None, None) => Err((
                BadReason::Version,
                "entries parse neither as prometheus_client ≥ 0.18 nor as an older layout; \
                 skipping the file"
                    .into(),
            )),
        }
    }

    /// Calls `f(entry index, value, timestamp)` for every parsed entry (timestamp 0 when the layout
    /// has none), reading each 8-byte word atomically.
    pub fn for_each_value(&mut self, mut f: impl FnMut(usize, f64, f64)) -> Result<(), Bad> {
        let with_ts = self.size == Some(EntrySize::ValueAndTimestamp);
        let entries = &self.entries;
        let ok = self.mf.read(|region| {
            for (i, e) in entries.iter().enumerate() {
                let Some(v) = region.atomic(e.value_at) else { return false };
                let v = f64::from_bits(v.load(Ordering::Relaxed));
                let ts = if with_ts {
                    match region.atomic(e.value_at + 8) {
                        Some(t) => f64::from_bits(t.load(Ordering::Relaxed)),
                        None => return false,
                    }
                } else {
                    0.0
                };
                f(i, v, ts);
            }
            true
        })?;
        if ok {
            Ok(())
        } else {
            Err((BadReason::Truncated, "values past the mapping".into()))
        }
    }
}

pub use crate::procs::process_start;

/// Whether the process that wrote a file with this pid is still the one running under it.
///
/// A pid is reused when the process now holding it started after the file was created — unless
/// that process has the file open, which a prometheus_client process that reused the pid does (it
/// opens the existing file and continues it). `start` is [`process_start`] of the pid (read once
/// per pid per scan: a process has several files).
pub fn file_alive(pid: i32, start: Option<f64>, created: Option<SystemTime>, dev_ino: (u64, u64)) -> bool {
    let Some(started) = start else { return false };
    let Some(created) = created else { return true };
    let created = created.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    // Slack: the start time is counted in clock ticks (10 ms).
    if started > created + 0.1 {
        has_open(pid, dev_ino)
    } else {
        true
    }
}

/// [`file_alive`] for one file, reading the process start itself.
pub fn pid_alive(pid: i32, created: Option<SystemTime>, dev_ino: (u64, u64)) -> bool {
    file_alive(pid, process_start(pid), created, dev_ino)
}

/// Whether process `pid` has the file (device, inode) open.
pub fn has_open(pid: i32, dev_ino: (u64, u64)) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == dev_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("counter_123.db"), Some(PyName { kind: PyKind::Counter, id: "123".into() }));
        assert_eq!(
            parse_name("gauge_livesum_7.db"),
            Some(PyName { kind: PyKind::Gauge(GaugeMode::LiveSum), id: "7".into() })
        );
        assert_eq!(parse_name("gauge_bogus_7.db"), None);
        assert_eq!(parse_name("data.db"), None);
        assert_eq!(parse_name("counter_.db"), None);
        assert_eq!(parse_name("w-1-00.shm"), None);
    }

    fn entry(key: &str, value: f64, ts: Option<f64>) -> Vec<u8> {
        let mut e = (key.len() as i32).to_le_bytes().to_vec();
        e.extend_from_slice(key.as_bytes());
        e.extend(std::iter::repeat_n(b' ', 8 - (key.len() + 4) % 8));
        e.extend_from_slice(&value.to_le_bytes());
        if let Some(ts) = ts {
            e.extend_from_slice(&ts.to_le_bytes());
        }
        e
    }

    #[test]
    fn entry_size_is_detected_or_refused() {
        let k4 = r#"["c", "c_total", {"a": "x"}, "Help."]"#;
        let k3 = r#"["c", "c_total", {"a": "y"}]"#;
        let mut keys = KeyCache::default();
        let new: Vec<u8> = [entry(k4, 1.0, Some(0.0)), entry(k3, 2.0, Some(0.0))].concat();
        assert_eq!(walk(&new, 8, EntrySize::ValueAndTimestamp, &mut keys).map(|e| e.len()), Some(2));
        assert!(walk(&new, 8, EntrySize::ValueOnly, &mut keys).is_none());
        let old: Vec<u8> = [entry(k3, 1.0, None), entry(k4, 2.0, None)].concat();
        assert!(walk(&old, 8, EntrySize::ValueAndTimestamp, &mut keys).is_none());
        let e = walk(&old, 8, EntrySize::ValueOnly, &mut keys).expect("old layout");
        assert_eq!(e[0].key.help, None);
        assert_eq!(e[1].key.labels, vec![("a".to_string(), "x".to_string())]);
        assert_eq!(keys.len(), 2);
    }
}
