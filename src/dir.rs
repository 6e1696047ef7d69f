//! The multiproc directory: creating it, owning it, and deciding what to clear at start-up.
//!
//! The start-up rule (the analogue of uWSGI's exec-asap wipe hook, without the hook): if any writer
//! file in the directory is still locked by a live process, only the aggregator restarted, and
//! everything is kept, so Prometheus sees totals continue. If no writer is alive, the job itself is
//! starting afresh: files of the previous run (dead writers' files, temp files, the archive) are
//! removed and totals start from zero. `--wipe` removes everything of ours regardless.
//!
//! With `--restore` (uWSGI's `--metrics-dir-restore`), a fresh start keeps what the previous
//! run's counters, histograms and summaries need: the dead writers' files, the archive and the
//! Python counter, histogram and summary files stay (the aggregator then folds the writers' files
//! into the archive, as if those workers had just died, and drops the gauges from it; see
//! `Aggregator::open`); Python gauge files, which hold nothing that survives a fresh start, and
//! temporaries go as on any fresh start.
//!
//! Either way the aggregator **never deletes what it does not understand**: a file is removed only
//! when it is a regular file of a trusted owner ([`crate::trust`]) that it recognises by name *and*
//! content — a writer file whose header has our magic and format version and matches its name, a
//! prometheus_client file that parses as one, an archive that parses. Anything else (a file of
//! another format version, a foreign file under one of our names, a link, a FIFO, another user's
//! file, an archive set aside as corrupt) is left in place for the operator, and counted in
//! `shmetrics_bad_files` by the scans that follow.
//!
//! Only one aggregator may own a directory: it holds an exclusive `flock` on `aggregator.lock`, and
//! is the only process that ever removes or compacts files, so compaction never races. Before that,
//! [`lock`] checks that the directory can be trusted ([`crate::trust::check_dir`]).

use std::fs::{DirBuilder, File};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout;
use crate::trust::{self, Trust};

/// Name of the lock file the aggregator holds.
pub const LOCK_FILE: &str = "aggregator.lock";
/// Name of the persisted archive of dead workers (defined by the archive, which sits below).
pub use crate::archive::FILE as ARCHIVE_FILE;
/// Name of the pollsters' runtime-control state file (`crate::pollsters::state`, which sits above
/// and uses this name): the settings changed at runtime, kept by every start-up rule.
pub const POLLSTERS_STATE_FILE: &str = "pollsters.state.json";
/// Prefix of a pollsters' state file set aside as unusable (kept for the operator, like a
/// corrupt archive).
pub const POLLSTERS_STATE_ASIDE_PREFIX: &str = "pollsters.state.json.corrupt-";
/// A writer's temporary file younger than this may belong to a writer that has not locked it yet.
pub const TEMP_GRACE: Duration = Duration::from_secs(10);

/// What start-up found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// No live writer: the previous run's files were removed.
    Fresh,
    /// No live writer, `--restore`: the previous run's files that hold counters, histograms and
    /// summaries were kept, to be folded into the archive.
    Restored,
    /// Live writers found: everything was kept (aggregator restart).
    Restart,
    /// `--wipe`: everything of ours was removed.
    Wiped,
    /// `--keep`: the start-up rule was not applied.
    Kept,
}

/// The aggregator's ownership of a directory; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _lock: File,
    dir: PathBuf,
    trust: Trust,
}

impl DirLock {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whose files in it are used.
    pub fn trust(&self) -> Trust {
        self.trust
    }
}

/// Whether a name in the directory is one of ours (writer, temp, archive and its temporaries and
/// set-aside copies, lock, the pollsters' state file and its temporaries and set-aside copies,
/// and Python prometheus_client files, which the aggregator manages for the app).
pub fn is_ours(name: &str) -> bool {
    crate::python::parse_name(name).is_some()
        || name.strip_prefix(".compact-").is_some_and(|n| crate::python::parse_name(n).is_some())
        || layout::is_writer_file(name)
        || layout::is_writer_temp(name)
        || name == ARCHIVE_FILE
        || name == LOCK_FILE
        || trust::is_replace_temp(name, ARCHIVE_FILE)
        || name.starts_with(crate::archive::CORRUPT_PREFIX)
        || name == POLLSTERS_STATE_FILE
        || trust::is_replace_temp(name, POLLSTERS_STATE_FILE)
        || name.starts_with(POLLSTERS_STATE_ASIDE_PREFIX)
}

/// Creates `dir` (mode 0700) if missing, checks that it can be trusted (`shared`: it is
/// deliberately shared between users, see [`trust::check_dir`]) and takes its aggregator lock.
pub fn lock(dir: &Path, shared: bool) -> Result<DirLock> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(dir, e))?;
    let trust = trust::check_dir(dir, shared)?;
    let path = dir.join(LOCK_FILE);
    let (mut lock, _) = trust::open_rw(&path, &trust).map_err(|r| match r {
        trust::Refused::Io(e) => Error::io(&path, e),
        r => Error::Untrusted {
            path: path.clone(),
            why: format!("is {r}"),
            fix: "remove it (an aggregator creates its lock file itself)".into(),
        },
    })?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = (&lock).take(256).read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "pid unknown".to_string() } else { holder.to_string() };
            return Err(Error::Locked { dir: dir.to_path_buf(), holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    let me = format!("pid {}\n", std::process::id());
    let written = lock.set_len(0).and_then(|()| lock.rewind()).and_then(|()| lock.write_all(me.as_bytes()));
    written.map_err(|e| Error::io(&path, e))?;
    Ok(DirLock { _lock: lock, dir: dir.to_path_buf(), trust })
}

/// Applies the start-up rule (see the module docs) to a directory we hold the lock of; `restore`
/// (ignored with `wipe`) keeps the previous run's totals on a fresh start.
pub fn startup(lock: &DirLock, wipe: bool, restore: bool) -> Result<Startup> {
    let (dir, trust) = (lock.dir(), lock.trust());
    let names = list(dir)?;
    // Liveness is the lock alone, never whether we can parse a file: a live writer's file must
    // not be removed because it looks odd to this build.
    let any_live = !wipe && names.iter().any(|n| is_live(&dir.join(n), n, &trust));
    if any_live {
        return Ok(Startup::Restart);
    }
    let restore = restore && !wipe;
    for n in &names {
        if restore && restored(n) {
            continue;
        }
        let p = dir.join(n);
        match understood(&p, n, &trust, wipe) {
            Ok(true) => {
                if let Err(e) = std::fs::remove_file(&p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(Error::io(&p, e));
                    }
                }
            }
            Ok(false) => {}
            Err(why) => {
                tracing::warn!(file = %p.display(), "start-up: not removing {n}: {why}; it is left in place");
            }
        }
    }
    Ok(if wipe {
        Startup::Wiped
    } else if restore {
        Startup::Restored
    } else {
        Startup::Fresh
    })
}

/// Whether a fresh start with `--restore` keeps `n`: a writer's file, the archive, or a Python
/// file (or one set aside for compaction) of a counter, histogram or summary.
fn restored(n: &str) -> bool {
    if layout::is_writer_file(n) || n == ARCHIVE_FILE {
        return true;
    }
    let original = n.strip_prefix(".compact-").unwrap_or(n);
    crate::python::parse_name(original).is_some_and(|p| !matches!(p.kind, crate::python::PyKind::Gauge(_)))
}

/// Whether `n` is a writer or Python file of a live process.
fn is_live(path: &Path, n: &str, trust: &Trust) -> bool {
    if layout::is_writer_file(n) || layout::is_writer_temp(n) {
        return trust::is_locked(path, trust) == Some(true);
    }
    // Python files have no lock: their process must be alive (and not a reuse of the pid).
    let Some(pid) = crate::python::parse_name(n).as_ref().and_then(crate::python::PyName::pid) else {
        return false;
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && trust.owner_ok(m.uid()) => {
            crate::python::pid_alive(pid, m.created().ok(), (m.dev(), m.ino()))
        }
        _ => false,
    }
}

/// Whether a fresh start (`wipe`: a wipe) removes `path`: `Ok(true)` for a file of ours that we
/// understand and nobody uses, `Ok(false)` for names that are not ours and for what every start
/// keeps (our lock, set-aside archives, the pollsters' state file and its set-aside copies),
/// `Err(why)` for a file under one of our names that we do not understand.
///
/// The pollsters' state file holds settings an operator changed at runtime (`set_interval`,
/// `set_pollsters`): they are meant to outlive a fresh start of the job and even `--wipe`, which
/// clears the job's metrics, not the aggregator's settings.
fn understood(path: &Path, n: &str, trust: &Trust, wipe: bool) -> std::result::Result<bool, String> {
    if n == LOCK_FILE
        || n.starts_with(crate::archive::CORRUPT_PREFIX)
        || n == POLLSTERS_STATE_FILE
        || n.starts_with(POLLSTERS_STATE_ASIDE_PREFIX)
        || !is_ours(n)
    {
        return Ok(false);
    }
    let (file, meta) = trust::open_read(path, trust).map_err(|r| r.to_string())?;
    if layout::is_writer_file(n) {
        let mut head = [0u8; layout::header::END as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
            .map_err(|_| "shorter than a shmetrics header".to_string())?;
        layout::check_header(&head).map_err(|e| e.to_string())?;
        let word = |off: u64| {
            let o = off as usize;
            u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or([0; 8]))
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&head[layout::header::FILE_ID as usize..layout::header::FILE_ID as usize + 16]);
        if layout::file_name(word(layout::header::PID), &id) != n {
            return Err("its header names another file (renamed or copied)".into());
        }
        return Ok(wipe || crate::trust::lock_is_free(&file));
    }
    if layout::is_writer_temp(n) {
        let young = meta.modified().ok().and_then(|t| t.elapsed().ok()).is_none_or(|age| age < TEMP_GRACE);
        return Ok(wipe || (!young && crate::trust::lock_is_free(&file)));
    }
    if n == ARCHIVE_FILE {
        // A valid archive of the previous run goes; an unusable one is set aside by the load that
        // follows, with a log line, never deleted.
        return Ok(crate::archive::parses(file, &meta));
    }
    if trust::is_replace_temp(n, ARCHIVE_FILE) || trust::is_replace_temp(n, POLLSTERS_STATE_FILE) {
        return Ok(true); // only an aggregator holding the lock writes these: a dead one's leftover
    }
    // A prometheus_client file, or one set aside for compaction.
    let original = n.strip_prefix(".compact-").unwrap_or(n);
    let Some(pyname) = crate::python::parse_name(original) else { return Ok(false) };
    drop(file);
    crate::python::PyFile::open(path, pyname, trust).map_err(|(_, why)| why)?;
    Ok(true)
}

/// The entry names of a directory (non-UTF-8 names are not ours and are skipped).
pub fn list(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_keeps_the_files_of_counters_histograms_and_summaries() {
        for n in [
            "w-12-0123456789abcdef0123456789abcdef.shm",
            ARCHIVE_FILE,
            "counter_12.db",
            "histogram_12.db",
            "summary_12.db",
            ".compact-counter_12.db",
        ] {
            assert!(restored(n), "{n}");
        }
        for n in [
            "gauge_all_12.db",
            "gauge_livesum_12.db",
            ".compact-gauge_max_12.db",
            LOCK_FILE,
            "notes.txt",
            ".archive.json.Xy12ab.tmp",
            ".w-12-0123456789abcdef0123456789abcdef.tmp",
        ] {
            assert!(!restored(n), "{n}");
        }
    }

    #[test]
    fn every_start_keeps_the_pollsters_state_and_clears_its_temporaries() {
        for (wipe, restore) in [(false, false), (true, false), (false, true)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("mp");
            let lock = lock(&dir, false).unwrap();
            let state = r#"{"version":1}"#;
            std::fs::write(dir.join(POLLSTERS_STATE_FILE), state).unwrap();
            std::fs::write(dir.join(format!("{POLLSTERS_STATE_ASIDE_PREFIX}1700000000")), "junk").unwrap();
            std::fs::write(dir.join(format!(".{POLLSTERS_STATE_FILE}.Ab12Cd34Ef56.tmp")), "half").unwrap();
            let expected = if wipe {
                Startup::Wiped
            } else if restore {
                Startup::Restored
            } else {
                Startup::Fresh
            };
            assert_eq!(startup(&lock, wipe, restore).unwrap(), expected);
            assert_eq!(
                list(&dir).unwrap(),
                vec![
                    LOCK_FILE.to_string(),
                    POLLSTERS_STATE_FILE.to_string(),
                    format!("{POLLSTERS_STATE_ASIDE_PREFIX}1700000000"),
                ],
                "wipe {wipe}, restore {restore}"
            );
            assert_eq!(std::fs::read_to_string(dir.join(POLLSTERS_STATE_FILE)).unwrap(), state);
        }
        assert!(is_ours(POLLSTERS_STATE_FILE));
        assert!(is_ours(".pollsters.state.json.Xy12ab.tmp"));
        assert!(is_ours("pollsters.state.json.corrupt-1700000000-1"));
        assert!(!is_ours("pollsters.state.jsonx"));
    }
}
