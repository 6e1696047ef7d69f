//! `--text-dir DIR` (uWSGI's `--metrics-dir`): one file per merged sample, holding its current
//! value, for sysadmins who `cat` and `grep`.
//!
//! # Why files, and why these rules
//!
//! uWSGI writes each of its metrics into a file of its own (`<name>` holding `<value>\n`), so
//! that shell scripts, cron jobs and `watch cat` read them without speaking HTTP. We keep that,
//! but on the merged, job-wide series, which have labels and can be anything an application
//! registered — so the file names must say which series a file is without ever letting two
//! series share a name or a name escape the directory:
//!
//! - **One file per sample** as [`crate::samples::flatten`] gives them (the lines of the
//!   Prometheus text format): a counter is `x_total`, a histogram series gives its
//!   `x_bucket{le}`, `x_count` and `x_sum`, a summary `x_count` and `x_sum`, an info
//!   `x_info{…}`, an enum one 0/1 sample per state. Content: the value and `\n`, integers as
//!   integers (as `/metrics` shows counters and bucket counts), anything else as `/metrics`
//!   writes floats ([`crate::expose::push_f64`]: shortest round trip, `NaN`, `+Inf`, `-Inf`).
//! - **Names** ([`file_name`]): the sample name, then `,label=value` for each label in the
//!   sample's order (`le` last for buckets). In the name and label names every byte outside
//!   `[A-Za-z0-9_:]`, in label values every byte outside `[A-Za-z0-9_.-]`, becomes `%XX`
//!   (upper-case hex). So `,`, `=`, `%`, `/`, NUL and `~` never appear unescaped in a part:
//!   the name parses back into one sample, and distinct samples have distinct names. A name
//!   never starts with `.` (a sample name has no `.`, and an escaped byte starts with `%`), so
//!   it is never `.` or `..`, never hidden, and never one of our own `.tmp-*` or lock files; a
//!   label value of `.` or `..` is harmless, since it is only ever a part of a name.
//!   Example: `http_requests_total,method=GET,path=%2Fapi%2Fv1`,
//!   `wl_latency_seconds_bucket,route=%2Fh0,le=%2BInf`.
//! - **Long names**: Linux allows 255 bytes. A longer name becomes its first 238 bytes (cut
//!   back so as not to split a `%XX`), `~`, and 16 hex digits of the 64-bit FNV-1a hash of the
//!   whole name: 255 bytes. `~` appears in no unshortened name, so a shortened name never
//!   equals an unshortened one; two shortened names are equal only if their first 238 bytes and
//!   their 64-bit hashes are: collision-free as far as a 64-bit hash goes (FNV-1a is not
//!   cryptographic: a hostile application could make two of its own long series collide, and
//!   then one file shows either; nothing else is affected). The hash is stable across builds
//!   and runs, so a restarted aggregator finds its files under the same names.
//! - **Atomic replacement**: a value is written to a fresh temporary in DIR (`.tmp-<pid>-<n>`,
//!   `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0644) and renamed over the target, so a reader sees the
//!   old number or the new one, never half of one. Not fsync'd: the files are a view refreshed
//!   every second, not a store (restarts restore from the archive, see `--restore`). A value that
//!   did not change since the last refresh is not written again (uWSGI also writes only on
//!   change): the files' mtimes say when a value last changed.
//! - **Never delete what we do not recognise**: a file is removed, or replaced for the first
//!   time, only if it is a regular file owned by us, not larger than 64 bytes, holding one number
//!   line — what we write. At start-up, leftovers of a previous run (names that parse as ours)
//!   stay until the first refresh, which rewrites those of series that still exist and removes
//!   the others, so a reader sees no gap across an aggregator restart; leftover `.tmp-*`
//!   temporaries of ours are removed at once. Anything else in DIR (a README, a link, a FIFO,
//!   another user's file, a file under a series' name holding something else) is left alone,
//!   and a series whose name is taken by such a file is not written (counted, logged once).
//! - **DIR** is created with mode 0755 if missing (it is meant to be read by others); a DIR that
//!   is a symbolic link, not a directory, not ours, writable by group or others, not writable by
//!   us, or the multiproc directory itself is refused at start, before anything is served. One
//!   aggregator per DIR: it holds an `flock` on `.shmetrics-text-dir.lock`.
//! - A failure (a full disk) never stops the task: the old file stays, the write is retried at
//!   the next refresh, and `shmetrics_text_dir_errors_total` counts it; the log says so at most
//!   once a minute.
//!
//! The refresh runs on its own task, once a second, on [`Job::recent`] (the latest merge when it
//! is younger than a second; the upkeep merges every pass once [`Job::merge_every_pass`] is
//! asked), with the file I/O on tokio's blocking pool: never inside a merge or a scrape.

use std::collections::{HashMap, HashSet};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::job::{Job, Source};
use crate::layout::{MetricType, ValueType};
use crate::merge::{FamilyMeta, LabelSet, SnapFamily, Value};
use crate::samples::Sample;
use crate::trust::{self, Refused, Trust};

/// Longest file name Linux file systems take.
const MAX_NAME: usize = 255;
/// Hex digits of the hash of a shortened name.
const HASH_HEX: usize = 16;
/// Bytes of the full name kept in a shortened one: `prefix ~ hash` is [`MAX_NAME`] bytes.
const SHORT_PREFIX: usize = MAX_NAME - 1 - HASH_HEX;
/// Prefix of our temporary files (no series' file name starts with `.`).
const TMP_PREFIX: &str = ".tmp-";
/// The lock that keeps two aggregators from writing (and removing) in one DIR.
const LOCK_FILE: &str = ".shmetrics-text-dir.lock";
/// How often the files are refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// Largest file we recognise as one of ours (`-1.2345678901234567e-308\n` is 26 bytes).
const MAX_CONTENT: u64 = 64;
/// While errors go on, at most one log line per this period.
const ERROR_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Bytes a metric or label name keeps as they are (everything else is `%XX`).
fn name_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Bytes a label value keeps as they are (everything else is `%XX`).
fn value_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
}

fn encode(out: &mut String, s: &str, safe: fn(u8) -> bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if safe(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// 64-bit FNV-1a: tiny, and stable across builds and runs (std's hashers promise neither).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The file name of a sample (see the module docs): `name,label=value,…`, escaped, shortened with
/// a hash beyond 255 bytes.
pub(crate) fn file_name(name: &str, labels: &[(String, String)]) -> String {
    let mut s = String::with_capacity(name.len() + labels.len() * 16);
    encode(&mut s, name, name_safe);
    for (k, v) in labels {
        s.push(',');
        encode(&mut s, k, name_safe);
        s.push('=');
        encode(&mut s, v, value_safe);
    }
    if s.len() <= MAX_NAME {
        return s;
    }
    let hash = fnv1a64(s.as_bytes());
    let bytes = s.as_bytes();
    let mut cut = SHORT_PREFIX;
    // A `%` always starts a three-byte escape (its digits are never `%`): do not split one.
    if bytes[cut - 1] == b'%' {
        cut -= 1;
    } else if bytes[cut - 2] == b'%' {
        cut -= 2;
    }
    format!("{}~{hash:016x}", &s[..cut])
}

/// Whether `part` is non-empty and made of `safe` bytes and well-formed `%XX` escapes.
fn is_encoded(part: &str, safe: fn(u8) -> bool) -> bool {
    let b = part.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
            if i + 2 >= b.len() || !(hex(b[i + 1]) && hex(b[i + 2])) {
                return false;
            }
            i += 3;
        } else if safe(b[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    !b.is_empty()
}

/// Whether a name in DIR is one [`file_name`] can give (for leftovers of a previous run).
pub(crate) fn is_our_name(n: &str) -> bool {
    if n.len() > MAX_NAME || !n.as_bytes().first().is_some_and(|&b| name_safe(b) || b == b'%') {
        return false;
    }
    if let Some((body, hash)) = n.rsplit_once('~') {
        let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        return hash.len() == HASH_HEX
            && hash.bytes().all(hex)
            && body.len() <= SHORT_PREFIX
            && body.bytes().all(|b| name_safe(b) || value_safe(b) || matches!(b, b',' | b'=' | b'%'));
    }
    let mut parts = n.split(',');
    let name_ok = parts.next().is_some_and(|p| is_encoded(p, name_safe));
    name_ok
        && parts.all(|p| {
            p.split_once('=')
                .is_some_and(|(k, v)| is_encoded(k, name_safe) && (v.is_empty() || is_encoded(v, value_safe)))
        })
}

/// A value as a file holds it: integers (up to 2^53, where every integer is exact) without a
/// fraction, as `/metrics` shows counters; other values as `/metrics` writes floats.
pub(crate) fn content(v: f64) -> String {
    let mut s = String::new();
    if v.is_finite() && v.fract() == 0.0 && v.abs() <= 9_007_199_254_740_992.0 {
        s.push_str(itoa::Buffer::new().format(v as i64));
    } else {
        crate::expose::push_f64(&mut s, v);
    }
    s.push('\n');
    s
}

/// Whether bytes are one number line, as [`content`] writes them.
fn is_one_number(bytes: &[u8]) -> bool {
    let Some(line) = bytes.strip_suffix(b"\n") else { return false };
    let Ok(text) = std::str::from_utf8(line) else { return false };
    !text.is_empty() && !text.contains('\n') && text.trim() == text && text.parse::<f64>().is_ok()
}

/// Counters of the text dir, a [`Source`] of the job (so they show in `/metrics` and the dir).
struct Stats {
    errors: AtomicU64,
    writes: AtomicU64,
    files: AtomicU64,
    errors_meta: Arc<FamilyMeta>,
    writes_meta: Arc<FamilyMeta>,
    files_meta: Arc<FamilyMeta>,
    no_labels: Arc<LabelSet>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            errors: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            errors_meta: FamilyMeta::own(
                "shmetrics_text_dir_errors",
                "Files of --text-dir that could not be written or removed (disk full, I/O errors), or \
                 whose name is taken by a file we do not recognise; retried at every refresh.",
                MetricType::Counter,
                ValueType::U64,
                &[],
            ),
            writes_meta: FamilyMeta::own(
                "shmetrics_text_dir_writes",
                "Files of --text-dir written (a value changed, or a series appeared).",
                MetricType::Counter,
                ValueType::U64,
                &[],
            ),
            files_meta: FamilyMeta::own(
                "shmetrics_text_dir_files",
                "Files of series that --text-dir holds, as of the last refresh.",
                MetricType::Gauge,
                ValueType::F64,
                &[],
            ),
            no_labels: Arc::new(LabelSet::default()),
        }
    }
}

impl Source for Stats {
    fn families(&self) -> Vec<SnapFamily> {
        let one = |meta: &Arc<FamilyMeta>, v: Value| SnapFamily {
            meta: Arc::clone(meta),
            series: vec![(Arc::clone(&self.no_labels), v)],
        };
        vec![
            one(&self.errors_meta, Value::U64(self.errors.load(Ordering::Relaxed))),
            one(&self.files_meta, Value::F64(self.files.load(Ordering::Relaxed) as f64)),
            one(&self.writes_meta, Value::U64(self.writes.load(Ordering::Relaxed))),
        ]
    }
}

/// What is at a name in DIR before we write or remove it.
enum Existing {
    /// Nothing.
    Nothing,
    /// A regular file of ours holding one number line: ours to replace or remove.
    Ours,
    /// Anything else: left alone.
    Foreign(String),
}

/// The text dir's state: what is on disk, what is to be removed.
struct Writer {
    dir: PathBuf,
    trust: Trust,
    /// Files written by this run: name → content on disk.
    written: HashMap<String, String>,
    /// Names of a previous run's files, not yet rewritten or removed.
    leftovers: HashSet<String>,
    /// Names of current series taken by something we do not recognise (counted once each).
    blocked: HashSet<String>,
    /// Next temporary file number.
    tmp_seq: u64,
    stats: Arc<Stats>,
    /// When the last error was logged, and errors since then not logged.
    logged: Option<Instant>,
    unlogged: u64,
}

impl Writer {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn error(&mut self, what: &str, name: &str, why: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.logged.is_some_and(|t| t.elapsed() < ERROR_LOG_PERIOD) {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        tracing::warn!(
            file = %self.path(name).display(),
            "text dir: cannot {what}: {why} ({more} more errors since the last message; retried at \
             every refresh, counted in shmetrics_text_dir_errors_total)"
        );
        self.logged = Some(Instant::now());
    }

    fn existing(&self, name: &str) -> Existing {
        let (mut file, meta) = match trust::open_read(&self.path(name), &self.trust) {
            Ok(f) => f,
            Err(Refused::Gone) => return Existing::Nothing,
            Err(r) => return Existing::Foreign(r.to_string()),
        };
        if meta.len() > MAX_CONTENT {
            return Existing::Foreign("larger than a value".into());
        }
        let mut bytes = Vec::new();
        match (&mut file).take(MAX_CONTENT + 1).read_to_end(&mut bytes) {
            Ok(_) if is_one_number(&bytes) => Existing::Ours,
            Ok(_) => Existing::Foreign("does not hold one number line".into()),
            Err(e) => Existing::Foreign(e.to_string()),
        }
    }

    /// Writes `content` to `name` atomically (temporary file, rename).
    fn write(&mut self, name: &str, content: &str) -> std::io::Result<()> {
        let pid = std::process::id();
        let (tmp, mut file) = loop {
            self.tmp_seq += 1;
            let tmp = self.path(&format!("{TMP_PREFIX}{pid}-{}", self.tmp_seq));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&tmp);
            match opened {
                Ok(f) => break (tmp, f),
                // Left by an earlier aggregator with our pid (and not ours to remove): next number.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let done = file.write_all(content.as_bytes()).and_then(|()| std::fs::rename(&tmp, self.path(name)));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// Removes `name` if it is still a file of ours; `Ok` when it is gone or not ours to remove.
    fn remove(&mut self, name: &str) -> std::io::Result<()> {
        match self.existing(name) {
            Existing::Ours => match std::fs::remove_file(self.path(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Existing::Nothing => Ok(()),
            Existing::Foreign(why) => {
                tracing::info!(file = %self.path(name).display(), "text dir: not removing {name}: {why}; it is left in place");
                Ok(())
            }
        }
    }

    /// Brings DIR in step with `samples`.
    fn refresh(&mut self, samples: &[Sample]) {
        let mut want: HashMap<String, String> = HashMap::with_capacity(samples.len());
        for s in samples {
            // Two samples under one name (a gauge named like another family's `_total`, as
            // /metrics would show twice): the first one wins.
            want.entry(file_name(&s.name, &s.labels)).or_insert_with(|| content(s.value));
        }
        let mut names: Vec<&String> = want.keys().collect();
        names.sort();
        for name in names {
            let content = &want[name];
            if self.written.get(name) == Some(content) {
                continue;
            }
            if !self.written.contains_key(name) {
                // The first write of this name in this run: only over nothing or one of ours.
                if let Existing::Foreign(why) = self.existing(name) {
                    if self.blocked.insert(name.clone()) {
                        self.error("write a series' file over a file that is not ours", name, &why);
                    }
                    continue;
                }
                self.blocked.remove(name);
                self.leftovers.remove(name);
            }
            match self.write(name, content) {
                Ok(()) => {
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    self.written.insert(name.clone(), content.clone());
                }
                Err(e) => self.error("write", name, &e),
            }
        }
        let mut gone: Vec<String> = self.written.keys().filter(|n| !want.contains_key(*n)).cloned().collect();
        gone.sort();
        for name in gone {
            match self.remove(&name) {
                Ok(()) => {
                    self.written.remove(&name);
                }
                Err(e) => self.error("remove", &name, &e),
            }
        }
        let mut old: Vec<String> =
            self.leftovers.iter().filter(|n| !want.contains_key(*n)).cloned().collect();
        old.sort();
        for name in old {
            match self.remove(&name) {
                Ok(()) => {
                    self.leftovers.remove(&name);
                }
                Err(e) => self.error("remove a previous run's file", &name, &e),
            }
        }
        self.blocked.retain(|n| want.contains_key(n));
        self.stats.files.store(self.written.len() as u64, Ordering::Relaxed);
    }
}

/// A text dir checked and locked at start ([`TextDir::open`]), to be kept up by [`run`].
pub(crate) struct TextDir {
    writer: Writer,
    _lock: File,
}

fn untrusted(dir: &Path, why: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::Untrusted { path: dir.to_path_buf(), why: why.into(), fix: fix.into() }
}

impl TextDir {
    /// Checks `dir` (creating it, mode 0755, if missing; see the module docs for what is
    /// refused), takes its lock, removes our leftover temporaries and notes a previous run's
    /// files. `multiproc` is the aggregator's directory, which `dir` must not be.
    pub(crate) fn open(dir: &Path, multiproc: &Path) -> Result<TextDir> {
        match std::fs::symlink_metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(|e| Error::io(dir, e))?;
                // 0755 whatever the umask: the directory is meant to be read by sysadmins.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| Error::io(dir, e))?;
            }
            Err(e) => return Err(Error::io(dir, e)),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
        if meta.file_type().is_symlink() {
            return Err(untrusted(
                dir,
                "is a symbolic link (--text-dir)",
                "give --text-dir the directory itself, so that changing the link cannot redirect \
                 where the aggregator writes and removes files",
            ));
        }
        if !meta.is_dir() {
            return Err(untrusted(
                dir,
                "is not a directory (--text-dir)",
                "give --text-dir a directory, or a path that does not exist yet (it is then created, \
                 mode 0755)",
            ));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(untrusted(
                dir,
                format!("is owned by uid {}, not by this user (uid {me}) (--text-dir)", meta.uid()),
                format!("give --text-dir a directory of your own (chown {me} {})", dir.display()),
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(untrusted(
                dir,
                format!(
                    "is writable by group or others (mode {mode:04o}) (--text-dir): they could plant \
                     files under the names of series"
                ),
                format!("chmod go-w {}", dir.display()),
            ));
        }
        if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_err()
        {
            return Err(untrusted(
                dir,
                format!("is not writable by this user (mode {mode:04o}) (--text-dir)"),
                format!("chmod u+rwx {}", dir.display()),
            ));
        }
        let same = std::fs::metadata(multiproc).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
        if same {
            return Err(untrusted(
                dir,
                "is the multiproc directory itself (--text-dir)",
                "give --text-dir a directory of its own: the multiproc directory holds the workers' \
                 files and is private (mode 0700)",
            ));
        }
        // From here on, paths under the resolved directory: a link in a parent changed later does
        // not move where we write.
        let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let trust = Trust::new(me);
        let lock_path = dir.join(LOCK_FILE);
        let (lock, _) = trust::open_rw(&lock_path, &trust).map_err(|r| match r {
            Refused::Io(e) => Error::io(&lock_path, e),
            r => {
                untrusted(&lock_path, format!("is {r}"), "remove it (the aggregator creates its lock itself)")
            }
        })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(untrusted(
                    &dir,
                    "is written by another shmetrics aggregator (it holds .shmetrics-text-dir.lock) \
                     (--text-dir)",
                    "give each aggregator a --text-dir of its own",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let mut leftovers = HashSet::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.starts_with(TMP_PREFIX) {
                // Only we write these, and we hold the lock: a previous run's, if regular and ours.
                let p = dir.join(&name);
                if trust::open_read(&p, &trust).is_ok() {
                    let _ = std::fs::remove_file(&p);
                }
            } else if is_our_name(&name) {
                leftovers.insert(name);
            }
        }
        let writer = Writer {
            dir,
            trust,
            written: HashMap::new(),
            leftovers,
            blocked: HashSet::new(),
            tmp_seq: 0,
            stats: Arc::new(Stats::new()),
            logged: None,
            unlogged: 0,
        };
        Ok(TextDir { writer, _lock: lock })
    }

    /// The directory (resolved).
    pub(crate) fn dir(&self) -> &Path {
        &self.writer.dir
    }
}

/// Keeps the text dir in step with the job's merged series, once a second, until aborted.
pub(crate) async fn run(job: Arc<Job>, dir: TextDir) {
    job.merge_every_pass();
    job.add_source(Arc::clone(&dir.writer.stats) as Arc<dyn Source>);
    tracing::info!(dir = %dir.dir().display(), "text dir: one file per series, refreshed every second");
    let dir = Arc::new(Mutex::new(dir));
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(snap) = job.recent(REFRESH).await else { continue };
        let dir = Arc::clone(&dir);
        let done = tokio::task::spawn_blocking(move || {
            let samples = crate::samples::flatten(&snap);
            dir.lock().unwrap_or_else(PoisonError::into_inner).writer.refresh(&samples);
        })
        .await;
        if let Err(e) = done {
            tracing::error!("text dir: refresh failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn names_are_the_sample_then_escaped_labels_in_order() {
        assert_eq!(file_name("up", &[]), "up");
        assert_eq!(file_name("a:b_total", &l(&[("code", "200")])), "a:b_total,code=200");
        assert_eq!(
            file_name("http_requests_total", &l(&[("method", "GET"), ("path", "/api/v1")])),
            "http_requests_total,method=GET,path=%2Fapi%2Fv1"
        );
        assert_eq!(
            file_name("h_bucket", &l(&[("route", "/h0"), ("le", "+Inf")])),
            "h_bucket,route=%2Fh0,le=%2BInf"
        );
        assert_eq!(file_name("h_bucket", &l(&[("le", "0.5")])), "h_bucket,le=0.5");
        // Separators, escapes, NUL, non-ASCII (UTF-8 bytes), `~`, spaces and quotes.
        assert_eq!(
            file_name("x", &l(&[("k", "a,b=c%d\0e/f~ \"é")])),
            "x,k=a%2Cb%3Dc%25d%00e%2Ff%7E%20%22%C3%A9"
        );
        // `.` and `..` are only ever part of a name; an empty value is kept.
        assert_eq!(file_name("x", &l(&[("k", ".")])), "x,k=.");
        assert_eq!(file_name("x", &l(&[("k", "..")])), "x,k=..");
        assert_eq!(file_name("x", &l(&[("k", "")])), "x,k=");
        // A name that is not a Prometheus name (a derived metric's, say) is escaped too.
        assert_eq!(file_name(".hidden/x", &[]), "%2Ehidden%2Fx");
    }

    #[test]
    fn distinct_samples_get_distinct_names() {
        let cases: Vec<(&str, Vec<(String, String)>)> = vec![
            ("x", vec![]),
            ("x", l(&[("k", "")])),
            ("x", l(&[("k", "a,j=b")])),
            ("x", l(&[("k", "a"), ("j", "b")])),
            ("x,k=a", vec![]),
            ("x", l(&[("k", "a=b")])),
            ("x", l(&[("k=a", "b")])),
            ("x", l(&[("k", "%2F")])),
            ("x", l(&[("k", "/")])),
        ];
        let names: HashSet<String> = cases.iter().map(|(n, ls)| file_name(n, ls)).collect();
        assert_eq!(names.len(), cases.len(), "{names:?}");
        for n in &names {
            assert!(is_our_name(n), "{n}");
            assert!(!n.starts_with('.') && !n.contains('/') && !n.contains('\0'), "{n}");
        }
    }

    #[test]
    fn long_names_are_cut_and_hashed_to_255_bytes() {
        let short = "v".repeat(255 - "x,k=".len());
        assert_eq!(file_name("x", &l(&[("k", &short)])), format!("x,k={short}"));
        let long = "v".repeat(300);
        let n = file_name("x", &l(&[("k", &long)]));
        let full = format!("x,k={long}");
        assert_eq!(n, format!("{}~{:016x}", &full[..238], fnv1a64(full.as_bytes())));
        assert_eq!(n.len(), 255);
        assert!(is_our_name(&n));
        // Another long value with the same first 238 bytes gets another name.
        let other = file_name("x", &l(&[("k", &format!("{long}w"))]));
        assert_ne!(n, other);
        assert_eq!(n[..238], other[..238]);
        // An escape is never split: the cut backs off to before its `%`.
        for pad in 0..3 {
            let v = format!("{}{}", "v".repeat(230 + pad), "/".repeat(40));
            let n = file_name("x", &l(&[("k", &v)]));
            let (prefix, hash) = n.rsplit_once('~').unwrap();
            assert_eq!(hash.len(), 16);
            assert!(prefix.len() <= 238 && prefix.len() >= 236, "{}", prefix.len());
            assert!(prefix.ends_with("%2F") || prefix.ends_with('v'), "{prefix}");
            assert!(is_our_name(&n));
        }
        // Stable: the same hash in every build and run.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn only_names_we_give_are_recognised() {
        for n in ["up", "x_total,k=v", "x,k=", "x,k=%2F", "%2Ehidden"] {
            assert!(is_our_name(n), "{n}");
        }
        let hashed = format!("x,k={}~{}", "v".repeat(10), "0123456789abcdef");
        assert!(is_our_name(&hashed));
        for n in [
            "",
            ".tmp-1-1",
            LOCK_FILE,
            "README.md",
            "notes.txt",
            "x,k",
            "x,=v",
            "x,k=v,",
            "x,k=%2",
            "x,k=%zz",
            "x,k=%2f",
            "x,k=a b",
            "x~0123",
            "x~0123456789ABCDEF",
            ",k=v",
            "-x",
        ] {
            assert!(!is_our_name(n), "{n}");
        }
    }

    #[test]
    fn values_are_written_as_metrics_shows_them() {
        assert_eq!(content(300.0), "300\n");
        assert_eq!(content(0.0), "0\n");
        assert_eq!(content(-0.0), "0\n");
        assert_eq!(content(-7.0), "-7\n");
        assert_eq!(content(2.5), "2.5\n");
        assert_eq!(content(0.1), "0.1\n");
        assert_eq!(content(9_007_199_254_740_992.0), "9007199254740992\n");
        assert_eq!(content(1e300), "1e300\n");
        assert_eq!(content(f64::NAN), "NaN\n");
        assert_eq!(content(f64::INFINITY), "+Inf\n");
        assert_eq!(content(f64::NEG_INFINITY), "-Inf\n");
        for v in [300.0, 2.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, -1.2345678901234567e-308] {
            assert!(is_one_number(content(v).as_bytes()), "{v}");
        }
        for b in [&b"3"[..], b"3\n\n", b"", b"\n", b" 3\n", b"x\n", b"3\n4\n"] {
            assert!(!is_one_number(b), "{b:?}");
        }
    }

    fn writer(dir: &Path) -> Writer {
        let td = TextDir::open(dir, Path::new("/nonexistent")).expect("open");
        // The lock goes with the TextDir; tests here use one writer per directory.
        td.writer
    }

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample { name: name.into(), labels: l(labels), value }
    }

    fn ls(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn refresh_writes_changes_removes_gone_series_and_leaves_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("text");
        let mut w = writer(&d);
        w.refresh(&[sample("a_total", &[("k", "/x")], 3.0), sample("g", &[], 0.5)]);
        assert_eq!(ls(&d), [LOCK_FILE, "a_total,k=%2Fx", "g"]);
        assert_eq!(std::fs::read_to_string(d.join("a_total,k=%2Fx")).unwrap(), "3\n");
        assert_eq!(w.stats.writes.load(Ordering::Relaxed), 2);
        // Unchanged values are not written again.
        w.refresh(&[sample("a_total", &[("k", "/x")], 3.0), sample("g", &[], 0.75)]);
        assert_eq!(w.stats.writes.load(Ordering::Relaxed), 3);
        assert_eq!(std::fs::read_to_string(d.join("g")).unwrap(), "0.75\n");
        // A foreign file and a link are left alone, also when a series' name is theirs.
        std::fs::write(d.join("README"), "hello\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("b")).unwrap();
        w.refresh(&[
            sample("a_total", &[("k", "/x")], 3.0),
            sample("b", &[], 1.0),
            sample("README", &[], 1.0),
        ]);
        assert_eq!(ls(&d), [LOCK_FILE, "README", "a_total,k=%2Fx", "b"]);
        assert_eq!(std::fs::read_to_string(d.join("README")).unwrap(), "hello\n");
        assert!(std::fs::symlink_metadata(d.join("b")).unwrap().file_type().is_symlink());
        assert_eq!(w.stats.errors.load(Ordering::Relaxed), 2, "each taken name counted once");
        w.refresh(&[sample("b", &[], 1.0), sample("README", &[], 1.0)]);
        assert_eq!(w.stats.errors.load(Ordering::Relaxed), 2);
        assert_eq!(ls(&d), [LOCK_FILE, "README", "b"], "the gone series' file is removed");
        assert_eq!(w.stats.files.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_restart_rewrites_and_removes_leftovers_of_ours_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("text");
        {
            let mut w = writer(&d);
            w.refresh(&[sample("a", &[], 1.0), sample("b", &[], 2.0)]);
        }
        std::fs::write(d.join(".tmp-1-1"), "4").unwrap();
        std::fs::write(d.join("c"), "not a number\n").unwrap();
        std::fs::write(d.join("e"), "5\n").unwrap();
        let mut w = writer(&d);
        assert_eq!(ls(&d), [LOCK_FILE, "a", "b", "c", "e"], "temporaries go at once, the rest waits");
        w.refresh(&[sample("a", &[], 7.0)]);
        assert_eq!(ls(&d), [LOCK_FILE, "a", "c"]);
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "7\n");
        assert_eq!(std::fs::read_to_string(d.join("c")).unwrap(), "not a number\n");
    }

    #[test]
    fn hostile_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = |p: &Path, m: &Path| TextDir::open(p, m).err().expect("refused").to_string();
        let none = Path::new("/nonexistent");
        assert!(err(&link, none).contains("is a symbolic link"), "{}", err(&link, none));
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(err(&file, none).contains("is not a directory"));
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(err(&real, none).contains("chmod go-w"));
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(err(&real, &real).contains("multiproc directory itself"));
        let held = TextDir::open(&real, none).expect("open");
        assert!(err(&real, none).contains("another shmetrics aggregator"));
        drop(held);
        assert!(TextDir::open(&real, none).is_ok());
        // Created 0755 when missing.
        let fresh = tmp.path().join("a/b");
        TextDir::open(&fresh, none).expect("created");
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o755);
    }
}
