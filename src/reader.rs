//! The aggregator side of one worker file: incremental parsing, value reads, liveness.
//!
//! A [`WorkerFile`] stays open across scrapes. Each [`WorkerFile::refresh`] parses only the records
//! appended since the previous one (records are immutable once published), so the steady-state cost
//! of a scrape is reading value slots. Everything in the file is untrusted: a record that breaks the
//! format makes the whole file "bad" (skipped and counted by the caller, never a panic), and a file
//! truncated under our feet is caught by the SIGBUS guard of [`crate::layout::region`].

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::layout::{self, header, region, region::Region, MetricDesc, Record, HEADER_SIZE};
use crate::trust::Trust;

/// One parsed SERIES record.
#[derive(Clone, Debug)]
pub struct SeriesRef {
    /// Index into [`WorkerFile::metrics`].
    pub metric_id: u32,
    /// Label values in the metric's label-name order.
    pub label_values: Vec<String>,
    /// Offset of the first value slot in the file.
    pub slots_at: u64,
    /// Number of slots.
    pub slots: u32,
}

/// Why a file could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadReason {
    /// Not ours (bad magic).
    Foreign,
    /// A format version this build does not read.
    Version,
    /// Shorter than its header or than `used`, or truncated while being read.
    Truncated,
    /// A record breaks the format.
    Corrupt,
    /// Not a regular file: a symbolic link, FIFO, socket, device or directory (never opened).
    NotRegular,
    /// Owned by a user that is neither the aggregator's nor the directory's owner (never read).
    Owner,
}

impl BadReason {
    /// Label value used in self metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BadReason::Foreign => "foreign",
            BadReason::Version => "version",
            BadReason::Truncated => "truncated",
            BadReason::Corrupt => "corrupt",
            BadReason::NotRegular => "not_regular",
            BadReason::Owner => "owner",
        }
    }

    /// Every reason, in label order.
    pub const ALL: [BadReason; 6] = [
        BadReason::Corrupt,
        BadReason::Foreign,
        BadReason::NotRegular,
        BadReason::Owner,
        BadReason::Truncated,
        BadReason::Version,
    ];

    /// Why `crate::trust::open_read` refused a file, as a reason and a message.
    pub fn refused(r: &crate::trust::Refused) -> (BadReason, String) {
        use crate::trust::Refused;
        let reason = match r {
            Refused::NotRegular(_) => BadReason::NotRegular,
            Refused::Owner(_) => BadReason::Owner,
            Refused::Gone => BadReason::Truncated,
            Refused::Io(_) => BadReason::Corrupt,
        };
        (reason, r.to_string())
    }

    fn of(e: &Error) -> BadReason {
        match e {
            Error::Foreign => BadReason::Foreign,
            Error::Version(_) => BadReason::Version,
            _ => BadReason::Corrupt,
        }
    }
}

/// An open file mapped read-only at its current size, read under the SIGBUS guard — what both our
/// files and Python's are read through.
pub struct MappedFile {
    file: File,
    region: Option<Region>,
    mapped: u64,
}

impl MappedFile {
    /// Wraps an open file; nothing is mapped yet.
    pub fn new(file: File) -> MappedFile {
        MappedFile { file, region: None, mapped: 0 }
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped (the file's size when it was last mapped).
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// Whether a mapping is in place.
    pub fn is_mapped(&self) -> bool {
        self.region.is_some()
    }

    /// Drops the mapping (the next [`MappedFile::remap`] maps afresh).
    pub fn unmap(&mut self) {
        self.region = None;
    }

    /// Maps the file at its current size when that changed (or nothing is mapped); returns the size.
    pub fn remap(&mut self) -> std::result::Result<u64, (BadReason, String)> {
        let size = self.file.metadata().map_err(|e| (BadReason::Corrupt, e.to_string()))?.len();
        if size != self.mapped || self.region.is_none() {
            self.region = None;
            let r = Region::map_file(self.file.as_fd(), size as usize, false)
                .map_err(|e| (BadReason::Corrupt, format!("mmap: {e}")))?;
            self.region = Some(r);
            self.mapped = size;
        }
        Ok(size)
    }

    /// Runs `f` on the mapping under the SIGBUS guard. A file truncated during `f` is an error, and
    /// the mapping is dropped.
    pub fn read<R>(&mut self, f: impl FnOnce(&Region) -> R) -> std::result::Result<R, (BadReason, String)> {
        let region = self.region.as_ref().ok_or_else(|| truncated("not mapped"))?;
        let (r, faulted) = region::guarded(region, || f(region));
        if faulted {
            self.region = None;
            return Err(truncated("truncated while being read"));
        }
        Ok(r)
    }

    /// Whether no process holds the file's `flock` any more (an error counts as held).
    pub fn lock_is_free(&self) -> bool {
        crate::trust::lock_is_free(&self.file)
    }
}

/// An open worker file.
pub struct WorkerFile {
    path: PathBuf,
    /// Our own open file description, mapped.
    mf: MappedFile,
    parsed_to: u64,
    /// Writer pid (from the header).
    pub pid: u64,
    /// Writer's parent pid, 0 if none.
    pub parent_pid: u64,
    /// File creation time, unix ns.
    pub start_time_ns: u64,
    /// Random file id.
    pub file_id: [u8; 16],
    /// METRIC and TYPED_METRIC records, in file order ([`SeriesRef::metric_id`] indexes this).
    pub metrics: Vec<MetricDesc>,
    /// Index into `metrics` of each METRIC record, by its id.
    plain_ids: Vec<u32>,
    /// Index into `metrics` of each TYPED_METRIC record, by its id (a sequence of its own).
    typed_ids: Vec<u32>,
    /// SERIES records, in file order.
    pub series: Vec<SeriesRef>,
    buf: Vec<u8>,
}

fn truncated(what: &str) -> (BadReason, String) {
    (BadReason::Truncated, what.to_string())
}

impl WorkerFile {
    /// Opens a worker file (a regular file of a trusted owner, see [`crate::trust`]) and checks its
    /// header.
    pub fn open(path: &Path, trust: &Trust) -> std::result::Result<WorkerFile, (BadReason, String)> {
        let (file, _) = crate::trust::open_read(path, trust).map_err(|r| BadReason::refused(&r))?;
        let mut wf = WorkerFile {
            path: path.to_path_buf(),
            mf: MappedFile::new(file),
            parsed_to: HEADER_SIZE,
            pid: 0,
            parent_pid: 0,
            start_time_ns: 0,
            file_id: [0; 16],
            metrics: Vec::new(),
            plain_ids: Vec::new(),
            typed_ids: Vec::new(),
            series: Vec::new(),
            buf: Vec::new(),
        };
        wf.map()?;
        let mut head = Vec::new();
        let copied = wf.with_region(|r| r.copy_out(0, header::END as usize, &mut head).is_ok())?;
        if !copied {
            return Err(truncated("shorter than its header"));
        }
        layout::check_header(&head).map_err(|e| (BadReason::of(&e), e.to_string()))?;
        let u64_at = |off: u64| {
            let o = off as usize;
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_le_bytes(b)
        };
        wf.pid = u64_at(header::PID);
        wf.parent_pid = u64_at(header::PARENT_PID);
        wf.start_time_ns = u64_at(header::START_TIME_NS);
        wf.file_id.copy_from_slice(&head[header::FILE_ID as usize..header::FILE_ID as usize + 16]);
        // The name repeats the header's pid and id; a file renamed or copied under another name is
        // not what it claims to be, and counting it would count a worker twice.
        let expected = layout::file_name(wf.pid, &wf.file_id);
        if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
            return Err((
                BadReason::Corrupt,
                format!("header says it is {expected} (renamed or copied file)"),
            ));
        }
        Ok(wf)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (Re)maps the file at its current size.
    fn map(&mut self) -> std::result::Result<(), (BadReason, String)> {
        if self.mf.remap()? < HEADER_SIZE {
            return Err(truncated("shorter than its header"));
        }
        Ok(())
    }

    /// Runs `f` on the mapping under the SIGBUS guard.
    fn with_region<R>(
        &mut self,
        f: impl FnOnce(&Region) -> R,
    ) -> std::result::Result<R, (BadReason, String)> {
        self.mf.read(f)
    }

    /// Parses records appended since the last call. Returns the index of the first new series.
    pub fn refresh(&mut self) -> std::result::Result<usize, (BadReason, String)> {
        let first_new = self.series.len();
        let used = self.with_region(|r| r.atomic(header::USED).map(|a| a.load(Ordering::Acquire)))?;
        let used = used.ok_or_else(|| truncated("no header"))?;
        if used < HEADER_SIZE {
            return Err((BadReason::Corrupt, "`used` is inside the header".into()));
        }
        if used == self.parsed_to {
            return Ok(first_new);
        }
        if used < self.parsed_to {
            return Err((BadReason::Corrupt, "`used` went backwards".into()));
        }
        if used > self.mf.mapped() {
            self.map()?;
            if used > self.mf.mapped() {
                return Err(truncated("`used` is past the end of the file"));
            }
        }
        let (from, len) = (self.parsed_to, (used - self.parsed_to) as usize);
        let mut buf = std::mem::take(&mut self.buf);
        let copied = self.with_region(|r| r.copy_out(from, len, &mut buf).is_ok());
        let result = match copied {
            Ok(true) => self.parse(&buf, from),
            Ok(false) => Err(truncated("records past the mapping")),
            Err(e) => Err(e),
        };
        buf.clear();
        self.buf = buf;
        result?;
        self.parsed_to = used;
        Ok(first_new)
    }

    fn parse(&mut self, mut buf: &[u8], mut at: u64) -> std::result::Result<(), (BadReason, String)> {
        let bad = |e: Error| (BadReason::Corrupt, e.to_string());
        while !buf.is_empty() {
            let len = layout::record_len(buf).map_err(bad)?;
            match layout::decode_record(&buf[..len]).map_err(bad)? {
                Record::Metric { id, desc } => {
                    // Kinds 1 and 3 each number their records 0, 1, 2, ...
                    let ids =
                        if desc.metric_type.is_typed() { &mut self.typed_ids } else { &mut self.plain_ids };
                    if id as usize != ids.len() {
                        return Err((BadReason::Corrupt, format!("metric id {id} out of sequence")));
                    }
                    ids.push(self.metrics.len() as u32);
                    self.metrics.push(desc);
                }
                Record::Series { metric_id, label_values, slots, slots_offset } => {
                    let s =
                        self.series_of(false, metric_id, label_values, slots, at + u64::from(slots_offset))?;
                    self.series.push(s);
                }
                Record::TypedSeries { metric_id, label_values, slots, slots_offset } => {
                    let s =
                        self.series_of(true, metric_id, label_values, slots, at + u64::from(slots_offset))?;
                    self.series.push(s);
                }
                Record::Unknown => {}
            }
            buf = &buf[len..];
            at += len as u64;
        }
        Ok(())
    }

    /// Checks a series record against its metric (of kind 3 if `typed`, else of kind 1).
    fn series_of(
        &self,
        typed: bool,
        metric_id: u32,
        label_values: Vec<String>,
        slots: u32,
        slots_at: u64,
    ) -> std::result::Result<SeriesRef, (BadReason, String)> {
        let ids = if typed { &self.typed_ids } else { &self.plain_ids };
        let index = ids.get(metric_id as usize).copied();
        let desc = index.and_then(|i| self.metrics.get(i as usize));
        let (Some(index), Some(desc)) = (index, desc) else {
            return Err((BadReason::Corrupt, format!("series of unknown metric {metric_id}")));
        };
        let values_ok = if desc.metric_type == layout::MetricType::Info {
            layout::check_info_values(desc, &label_values).is_ok()
        } else {
            label_values.len() == desc.label_names.len()
        };
        if !values_ok || slots as usize != desc.slots() {
            return Err((BadReason::Corrupt, format!("series of {} does not match its metric", desc.name)));
        }
        Ok(SeriesRef { metric_id: index, label_values, slots_at, slots })
    }

    /// Calls `f(series index, slots)` for every parsed series, reading slots atomically.
    pub fn for_each_values(
        &mut self,
        mut f: impl FnMut(usize, &[AtomicU64]),
    ) -> std::result::Result<(), (BadReason, String)> {
        let series = &self.series;
        let ok = self.mf.read(|region| {
            for (i, s) in series.iter().enumerate() {
                match region.atomics(s.slots_at, s.slots as usize) {
                    Some(slots) => f(i, slots),
                    None => return false,
                }
            }
            true
        })?;
        if !ok {
            return Err(truncated("value slots past the mapping"));
        }
        Ok(())
    }

    /// A header counter (flags, dropped_series, dropped_updates), 0 if unreadable.
    pub fn header_word(&mut self, off: u64) -> u64 {
        self.with_region(|r| r.atomic(off).map_or(0, |a| a.load(Ordering::Acquire))).unwrap_or(0)
    }

    /// [`WorkerFile::is_dead`] for a caller that cannot act on errors: an error counts as alive.
    pub fn is_dead_now(&self) -> bool {
        self.mf.lock_is_free()
    }

    /// Whether the writer is gone: no process holds the file's lock any more.
    ///
    /// Tries `flock(LOCK_EX|LOCK_NB)` on our own open file description and releases it at once.
    pub fn is_dead(&mut self) -> Result<bool> {
        crate::trust::try_lock_free(self.mf.file()).map_err(|e| Error::io(&self.path, e))
    }
}
