//! The private directories that `run`s killed by SIGKILL left behind, removed at the next start.
//!
//! Without `--dir`, `run` works in a fresh private directory (`shmetrics-XXXXXX` under
//! `$XDG_RUNTIME_DIR`, or the temporary directory) and removes it at exit. A `run` killed by
//! SIGKILL (the OOM killer, supervisord after `stopwaitsecs`) cannot, so at start-up `run` looks
//! for such directories and removes those that are certainly dead. A directory is removed only if
//! all of this holds, and is left alone (logged at debug level) otherwise:
//!
//! - its name is ours (`shmetrics-` and six letters or digits, as [`create`] makes them) and it is
//!   a real directory (not a symlink), owned by our effective uid, with mode 0700;
//! - every entry in it is a regular file (no symlink, FIFO, subdirectory …) owned by us, with a name
//!   we know ([`crate::dir::is_ours`]): we never delete what we do not understand;
//! - nobody holds its `aggregator.lock` (we take the lock ourselves, and keep it while removing), and
//!   the lock file names the pid of the aggregator that held it (`pid N`). An aggregator writes
//!   that only once it holds the lock, so a free lock with a pid in it belongs to an aggregator that
//!   is gone — never to a `run` that has just created its directory and not locked it yet. A
//!   directory without a lock file, or with an empty one, is removed only when it is empty (apart
//!   from that lock file) and was last modified more than [`YOUNG`] ago;
//! - no writer in it is alive: no `w-*.shm` file is locked (a worker that outlived its master),
//!   and no process of a Python `*.db` file is running.
//!
//! Every file is opened relative to the directory's descriptor with `O_NOFOLLOW | O_NONBLOCK` (a
//! planted symlink is not followed, a FIFO does not block) and removed with `unlinkat`, which never
//! follows a link; the directory itself is removed last, by name, with `rmdir` semantics (it fails
//! on anything that is no longer an empty directory).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::dir::{is_ours, LOCK_FILE};
use anyhow::Context;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// The name of a private directory: this prefix and [`RANDOM`] random letters or digits.
const PREFIX: &str = "shmetrics-";
/// Random characters after [`PREFIX`].
const RANDOM: usize = 6;
/// A directory without a locked-once lock file is left alone while it is this young: it may be
/// a `run` starting right now.
pub const YOUNG: Duration = Duration::from_secs(60);

/// Where private directories go: `$XDG_RUNTIME_DIR` if it is a directory, else the temporary
/// directory.
pub fn base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Creates a fresh private directory in `base` (mode 0700), removed when the value is dropped.
pub fn create(base: &Path) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(PREFIX)
        .rand_bytes(RANDOM)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
        .with_context(|| format!("cannot create a private directory in {}", base.display()))
}

/// Whether a name is one [`create`] makes.
fn is_private_name(name: &[u8]) -> bool {
    name.strip_prefix(PREFIX.as_bytes())
        .is_some_and(|r| r.len() == RANDOM && r.iter().all(u8::is_ascii_alphanumeric))
}

/// Removes the private directories in `base` that `run`s killed by SIGKILL left behind (see the
/// module docs); returns how many. Problems are logged, never fatal: this is housekeeping.
pub fn clean(base: &Path) -> usize {
    let dir = match open_dir(None, base.as_os_str()) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!("not looking for left-behind private directories in {}: {e}", base.display());
            return 0;
        }
    };
    let names = match entries(&dir) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!("cannot list {}: {e}", base.display());
            return 0;
        }
    };
    let mut removed = 0;
    for name in names.iter().filter(|n| is_private_name(n.as_bytes())) {
        let path = base.join(name);
        match remove_if_stale(&dir, name) {
            Ok(Ok(files)) => {
                removed += 1;
                tracing::info!(
                    "removed {}, the private directory of a `shmetrics run` that was killed \
                     ({files} files in it)",
                    path.display()
                );
            }
            Ok(Err(why)) => tracing::debug!("leaving {} alone: {why}", path.display()),
            Err(e) => tracing::warn!("cannot remove the left-behind directory {}: {e}", path.display()),
        }
    }
    removed
}

/// Opens a directory (relative to `at`, or by path) without following a symlink.
fn open_dir(at: Option<&OwnedFd>, name: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match at {
        Some(fd) => openat(fd, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    }
}

/// The entry names of an open directory, without `.` and `..`.
fn entries(dir: &OwnedFd) -> nix::Result<Vec<std::ffi::OsString>> {
    // A descriptor of its own ("." of the open directory): `Dir` closes it.
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut d = nix::dir::Dir::openat(dir.as_fd(), ".", flags, Mode::empty())?;
    let mut names = Vec::new();
    for e in d.iter() {
        let name = e?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Opens a file in `dir` without following a symlink or blocking, and checks it is a regular file
/// of ours.
fn open_file(dir: &OwnedFd, name: &OsStr, uid: u32) -> Result<(File, std::fs::Metadata), String> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(dir.as_fd(), name, flags, Mode::empty())
        .map_err(|e| format!("{name:?} cannot be opened as a file ({e})"))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| format!("{name:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{name:?} is not a regular file"));
    }
    if meta.uid() != uid {
        return Err(format!("{name:?} belongs to uid {}", meta.uid()));
    }
    Ok((file, meta))
}

/// Whether a file's `flock` is held by someone (we can take it ourselves only if not).
fn held(file: &File) -> bool {
    !matches!(file.try_lock(), Ok(()))
}

/// Removes `base/name` if it is a dead `run`'s directory: `Ok(Ok(files removed))`, or
/// `Ok(Err(why it stays))`.
fn remove_if_stale(base: &OwnedFd, name: &OsStr) -> anyhow::Result<Result<usize, String>> {
    let dir = match open_dir(Some(base), name) {
        Ok(d) => d,
        Err(e) => return Ok(Err(format!("not a directory we can open without following links ({e})"))),
    };
    let uid = nix::unistd::geteuid().as_raw();
    let meta = File::from(dir.try_clone()?).metadata()?;
    if meta.uid() != uid {
        return Ok(Err(format!("owned by uid {}, not ours ({uid})", meta.uid())));
    }
    if meta.mode() & 0o7777 != 0o700 {
        return Ok(Err(format!("mode {:o}, not 0700", meta.mode() & 0o7777)));
    }
    let age = meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok());
    let young = age.is_none_or(|a| a < YOUNG);
    let names = entries(&dir)?;
    if let Some(n) = names.iter().find(|n| !n.to_str().is_some_and(is_ours)) {
        return Ok(Err(format!("it holds {n:?}, which is not ours")));
    }
    let others: Vec<&str> = names.iter().filter_map(|n| n.to_str()).filter(|n| *n != LOCK_FILE).collect();
    // The aggregator's lock first. Its content is read before any attempt to lock it: a `run`
    // that has created its directory but not locked it yet must never find it locked by us.
    let lock = match open_file(&dir, OsStr::new(LOCK_FILE), uid) {
        Ok((mut file, _)) => {
            let mut content = String::new();
            let _ = (&mut file).take(64).read_to_string(&mut content);
            let pid = content
                .trim()
                .strip_prefix("pid ")
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if pid.is_none() && (young || !others.is_empty()) {
                return Ok(Err(not_locked_yet(young)));
            }
            if held(&file) {
                return Ok(Err("its aggregator.lock is held: it is in use".into()));
            }
            // Kept, and so held, until everything is removed.
            Some(file)
        }
        Err(_) if names.is_empty() && !young => None,
        Err(why) if names.iter().any(|n| n.as_bytes() == LOCK_FILE.as_bytes()) => return Ok(Err(why)),
        Err(_) => return Ok(Err(not_locked_yet(young))),
    };
    for text in others {
        let (file, meta) = match open_file(&dir, OsStr::new(text), uid) {
            Ok(f) => f,
            Err(why) => return Ok(Err(why)),
        };
        if crate::layout::is_writer_file(text) || crate::layout::is_writer_temp(text) {
            if held(&file) {
                return Ok(Err(format!("a live process still writes {text}")));
            }
        } else if let Some(pid) = crate::python::parse_name(text).as_ref().and_then(|p| p.pid()) {
            if crate::python::pid_alive(pid, meta.created().ok(), (meta.dev(), meta.ino())) {
                return Ok(Err(format!("process {pid} of {text} is alive")));
            }
        }
    }
    for n in &names {
        match unlinkat(dir.as_fd(), n.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {n:?}")),
        }
    }
    match unlinkat(base.as_fd(), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(e).context("removing the directory"),
    }
    drop(lock);
    Ok(Ok(names.len()))
}

fn not_locked_yet(young: bool) -> String {
    if young {
        "no aggregator has locked it yet, and it is younger than a minute: a `run` may be starting".into()
    } else {
        "no aggregator ever locked it, and it is not empty".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_private_name(b"shmetrics-a1B2c3"));
        assert!(!is_private_name(b"shmetrics-a1B2c"));
        assert!(!is_private_name(b"shmetrics-a1B2c3d"));
        assert!(!is_private_name(b"shmetrics-a1B2.3"));
        assert!(!is_private_name(b"xshmetrics-a1B2c3"));
        let base = tempfile::tempdir().expect("tempdir");
        let made = create(base.path()).expect("create");
        let name = made.path().file_name().expect("name");
        assert!(is_private_name(name.as_bytes()), "{name:?}");
    }
}
