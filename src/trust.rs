//! What the aggregator lets in: the directory it owns, the files in it, and how it opens and
//! replaces them.
//!
//! Every worker can write into the multiproc directory, and the aggregator reads, removes and
//! (for the archive and its lock) writes files there, so a file in it is untrusted input and a
//! name in it may be a trap:
//!
//! - a **symbolic link** would make the aggregator read, truncate or overwrite whatever it points
//!   at with the aggregator's privileges: nothing is ever opened through a link (`O_NOFOLLOW`);
//! - a **FIFO** or a device would block `open(2)` (and with it every scrape and health check) or
//!   feed endless data: everything is opened with `O_NONBLOCK` and used only if `fstat` says it
//!   is a regular file;
//! - a **file of another user** could inject metrics: a file is used only if it belongs to us or
//!   to the directory's owner ([`Trust`]);
//! - a **directory** that another user owns or may write to makes all of the above possible in
//!   the first place: [`check_dir`] refuses it unless the operator says the sharing is deliberate
//!   (`--shared-dir`, e.g. containers running as different uids);
//! - a file the aggregator **writes** (the archive) goes to a temporary file with a random name
//!   created with `O_EXCL` (a planted name cannot redirect it), is fsync'd, renamed over the old
//!   one, and the directory is fsync'd, so that after [`replace`] returns the new content is on
//!   disk under its name ([`replace`]).

use std::fs::{File, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The owners whose files the aggregator uses: its own user and the directory's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    me: u32,
    dir_owner: u32,
}

impl Trust {
    /// Trust for files owned by `dir_owner` or by the effective user of this process.
    pub fn new(dir_owner: u32) -> Trust {
        Trust { me: nix::unistd::geteuid().as_raw(), dir_owner }
    }

    /// Whether a file owned by `uid` may be used.
    pub fn owner_ok(&self, uid: u32) -> bool {
        uid == self.me || uid == self.dir_owner
    }
}

/// Why a directory entry was not opened.
#[derive(Debug)]
pub enum Refused {
    /// A symbolic link, FIFO, socket, device or directory.
    NotRegular(&'static str),
    /// Owned by a user the aggregator does not trust.
    Owner(u32),
    /// The entry vanished before it could be opened.
    Gone,
    /// Any other error from `open` or `fstat`.
    Io(std::io::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotRegular(what) => write!(f, "{what}, not a regular file; not opened"),
            Refused::Owner(uid) => write!(
                f,
                "owned by uid {uid}, neither this aggregator's user nor the directory's owner; \
                 not read"
            ),
            Refused::Gone => write!(f, "vanished"),
            Refused::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What kind of non-regular file `m` describes.
fn kind(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "a special file"
    }
}

/// Checks what `open` gave: a regular file of a trusted owner.
fn checked(file: File, trust: &Trust) -> std::result::Result<(File, Metadata), Refused> {
    let meta = file.metadata().map_err(Refused::Io)?;
    if !meta.is_file() {
        return Err(Refused::NotRegular(kind(&meta)));
    }
    if !trust.owner_ok(meta.uid()) {
        return Err(Refused::Owner(meta.uid()));
    }
    Ok((file, meta))
}

fn refused(e: std::io::Error) -> Refused {
    match e.raw_os_error() {
        Some(libc::ELOOP) => Refused::NotRegular("a symbolic link"),
        Some(libc::ENOENT) => Refused::Gone,
        _ => Refused::Io(e),
    }
}

/// Opens a directory entry read-only without following a link or blocking, and returns it only if
/// it is a regular file of a trusted owner.
pub fn open_read(path: &Path, trust: &Trust) -> std::result::Result<(File, Metadata), Refused> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(refused)?;
    checked(file, trust)
}

/// Opens (creating it, mode 0600, if missing) a file the aggregator writes in place — its lock
/// file — with the same rules as [`open_read`].
pub fn open_rw(path: &Path, trust: &Trust) -> std::result::Result<(File, Metadata), Refused> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(refused)?;
    checked(file, trust)
}

/// Whether some process holds the `flock` of the regular, trusted file at `path`. `None` when the
/// entry is not such a file (a link, a FIFO, another user's file, gone) — it is nobody's lock.
/// An error while testing the lock counts as held: when in doubt, keep the file.
pub fn is_locked(path: &Path, trust: &Trust) -> Option<bool> {
    let (file, _) = open_read(path, trust).ok()?;
    Some(!lock_is_free(&file))
}

/// The one liveness test of a writer: whether no process holds the `flock` of `file` — tried
/// with `flock(LOCK_EX|LOCK_NB)` on our own open file description and released at once. Errors
/// are returned; [`lock_is_free`] counts them as held.
pub fn try_lock_free(file: &std::fs::File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => file.unlock().map(|()| true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// [`try_lock_free`], an error counting as held: when in doubt, the writer is alive.
pub fn lock_is_free(file: &std::fs::File) -> bool {
    try_lock_free(file).unwrap_or(false)
}

/// Replaces `dir/name` durably with `bytes`: written to a fresh temporary file
/// (`.<name>.<random>.tmp`, created with `O_EXCL`, mode 0600), fsync'd, renamed over `name`,
/// and the directory fsync'd. On error the temporary file is removed and `name` is unchanged.
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .rand_bytes(12)
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let written = tmp.write_all(bytes).and_then(|()| tmp.flush()).and_then(|()| tmp.as_file().sync_all());
    written.map_err(|e| Error::io(tmp.path(), e))?;
    // `persist` renames; on failure the temporary file is removed when the error is dropped.
    tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
    sync_dir(dir)
}

/// fsyncs a directory, so that renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| Error::io(dir, e))?;
    d.sync_all().map_err(|e| Error::io(dir, e))
}

/// Whether `name` is a temporary file of [`replace`] for `target`.
pub fn is_replace_temp(name: &str, target: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(target))
        .is_some_and(|rest| rest.starts_with('.') && rest.ends_with(".tmp"))
}

/// Checks that `dir` (an existing directory, links followed) is safe to own: a directory owned by
/// this process's user and not writable by group or others, unless `shared` says the sharing is
/// deliberate. Returns the trust for its files.
pub fn check_dir(dir: &Path, shared: bool) -> Result<Trust> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Untrusted {
            path: dir.to_path_buf(),
            why: format!("is {}, not a directory", kind(&meta)),
            fix: "give --dir a directory".into(),
        });
    }
    let trust = Trust::new(meta.uid());
    if shared {
        return Ok(trust);
    }
    let me = trust.me;
    let fix = |what: &str| {
        format!(
            "{what}, or pass --shared-dir if the directory is deliberately shared between users \
             (e.g. containers running as different uids)"
        )
    };
    if meta.uid() != me {
        return Err(Error::Untrusted {
            path: dir.to_path_buf(),
            why: format!(
                "is owned by uid {}, not by this user (uid {me}): its owner could plant files that \
                 the aggregator reads, follows or removes",
                meta.uid()
            ),
            fix: fix(&format!("use a directory of your own (chown {me} {})", dir.display())),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::Untrusted {
            path: dir.to_path_buf(),
            why: format!(
                "is writable by {} (mode {mode:04o}): other users could plant files that the \
                 aggregator reads, follows or removes",
                if mode & 0o002 != 0 { "all users" } else { "its group" }
            ),
            fix: fix(&format!("chmod go-w {}", dir.display())),
        });
    }
    Ok(trust)
}

/// A name for setting `dir/name` aside that does not exist yet: `name.<what>-<unix secs>[-n]`.
pub fn aside_name(dir: &Path, name: &str, what: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut n = 0u32;
    loop {
        let candidate =
            if n == 0 { format!("{name}.{what}-{secs}") } else { format!("{name}.{what}-{secs}-{n}") };
        let p = dir.join(candidate);
        if std::fs::symlink_metadata(&p).is_err() {
            return p;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::DirBuilderExt;

    fn trust() -> Trust {
        Trust::new(nix::unistd::geteuid().as_raw())
    }

    #[test]
    fn links_fifos_and_directories_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let t = trust();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("f"), d.path().join("l")).unwrap();
        nix::unistd::mkfifo(&d.path().join("p"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::DirBuilder::new().mode(0o700).create(d.path().join("d")).unwrap();
        assert!(open_read(&d.path().join("f"), &t).is_ok());
        assert!(matches!(open_read(&d.path().join("l"), &t), Err(Refused::NotRegular("a symbolic link"))));
        assert!(matches!(open_read(&d.path().join("p"), &t), Err(Refused::NotRegular("a FIFO"))));
        assert!(matches!(open_read(&d.path().join("d"), &t), Err(Refused::NotRegular("a directory"))));
        assert!(matches!(open_read(&d.path().join("none"), &t), Err(Refused::Gone)));
        assert!(matches!(open_rw(&d.path().join("p"), &t), Err(Refused::NotRegular("a FIFO"))));
        assert!(matches!(open_rw(&d.path().join("l"), &t), Err(Refused::NotRegular("a symbolic link"))));
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"x", "the link's target is untouched");
        assert_eq!(is_locked(&d.path().join("p"), &t), None);
        assert_eq!(is_locked(&d.path().join("f"), &t), Some(false));
    }

    #[test]
    fn other_owners_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let t = Trust { me: u32::MAX - 1, dir_owner: u32::MAX - 2 };
        assert!(matches!(open_read(&f, &t), Err(Refused::Owner(_))));
    }

    #[test]
    fn replace_is_atomic_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        replace(d.path(), "a.json", b"one").unwrap();
        replace(d.path(), "a.json", b"two").unwrap();
        assert_eq!(std::fs::read(d.path().join("a.json")).unwrap(), b"two");
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.json".to_string()]);
        assert!(is_replace_temp(".a.json.Xy12ab.tmp", "a.json"));
        assert!(!is_replace_temp(".a.jsonx.tmp", "a.json"));
        assert!(!is_replace_temp("a.json", "a.json"));
    }

    #[test]
    fn replace_never_writes_through_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("a.json")).unwrap();
        replace(d.path(), "a.json", b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let m = std::fs::symlink_metadata(d.path().join("a.json")).unwrap();
        assert!(m.is_file(), "the link itself was replaced by a regular file");
    }

    #[test]
    fn directories_of_others_or_writable_by_others_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        std::fs::DirBuilder::new().mode(0o700).create(&p).unwrap();
        assert!(check_dir(&p, false).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = check_dir(&p, false).unwrap_err().to_string();
        assert!(e.contains("writable by its group") && e.contains("--shared-dir"), "{e}");
        assert!(check_dir(&p, true).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_dir(&p, false).unwrap_err().to_string();
        assert!(e.contains("writable by all users"), "{e}");
    }
}
