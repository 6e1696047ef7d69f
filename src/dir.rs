//! The multiproc directory: creating it, owning it, and deciding what to clear at start-up.
//!
//! The start-up rule (the analogue of uWSGI's exec-asap wipe hook, without the hook): if any writer
//! file in the directory is still locked by a live process, only the aggregator restarted, and
//! everything is kept, so Prometheus sees totals continue. If no writer is alive, the job itself is
//! starting afresh: files of the previous run (dead writers' files, temp files, the archive) are
//! removed and totals start from zero. `--wipe` removes everything of ours regardless.
//!
//! Only one aggregator may own a directory: it holds an exclusive `flock` on `aggregator.lock`, and
//! is the only process that ever removes or compacts files, so compaction never races.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::layout;

/// Name of the lock file the aggregator holds.
pub const LOCK_FILE: &str = "aggregator.lock";
/// Name of the persisted archive of dead workers.
pub const ARCHIVE_FILE: &str = "archive.json";

/// What start-up found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// No live writer: the previous run's files were removed.
    Fresh,
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
}

impl DirLock {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether a name in the directory is one of ours (writer, temp, archive, lock, and Python
/// prometheus_client files, which the aggregator manages for the app).
pub fn is_ours(name: &str) -> bool {
    crate::python::parse_name(name).is_some()
        || name.strip_prefix(".compact-").is_some_and(|n| crate::python::parse_name(n).is_some())
        || layout::is_writer_file(name)
        || layout::is_writer_temp(name)
        || name == ARCHIVE_FILE
        || name == LOCK_FILE
        || (name.starts_with(".archive.json.") && name.ends_with(".tmp"))
}

/// Creates `dir` (mode 0700) if missing and takes its aggregator lock.
pub fn lock(dir: &Path) -> Result<DirLock> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let mut lock = file;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "pid unknown".to_string() } else { holder.to_string() };
            return Err(Error::Locked { dir: dir.to_path_buf(), holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    let me = format!("pid {}\n", std::process::id());
    let written = lock.set_len(0).and_then(|()| lock.rewind()).and_then(|()| lock.write_all(me.as_bytes()));
    written.map_err(|e| Error::io(&path, e))?;
    Ok(DirLock { _lock: lock, dir: dir.to_path_buf() })
}

/// Applies the start-up rule (see the module docs) to a directory we hold the lock of.
pub fn startup(lock: &DirLock, wipe: bool) -> Result<Startup> {
    let dir = lock.dir();
    let names = list(dir)?;
    // Liveness is the lock alone, never whether we can parse a file: a live writer's file must
    // not be removed because it looks odd to this build.
    let any_live = !wipe
        && names.iter().any(|n| {
            let path = dir.join(n);
            if layout::is_writer_file(n) || layout::is_writer_temp(n) {
                return is_locked(&path);
            }
            // Python files have no lock: their process must be alive (and not a reuse of the pid).
            let pyname = crate::python::parse_name(n);
            match (pyname.as_ref().and_then(crate::python::PyName::pid), std::fs::metadata(&path)) {
                (Some(pid), Ok(m)) => {
                    use std::os::unix::fs::MetadataExt;
                    crate::python::pid_alive(pid, m.created().ok(), (m.dev(), m.ino()))
                }
                _ => false,
            }
        });
    if any_live {
        return Ok(Startup::Restart);
    }
    for n in names.iter().filter(|n| is_ours(n) && n.as_str() != LOCK_FILE) {
        let p = dir.join(n);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::io(&p, e));
            }
        }
    }
    Ok(if wipe { Startup::Wiped } else { Startup::Fresh })
}

/// Whether some process holds the `flock` of a file (an error opening or locking it counts as
/// held: when in doubt, keep the file).
fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return true };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
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
