//! One process's file: creating it, appending records, and moving to a new file after `fork`.
//!
//! Lifecycle of a file, as `shm-layout.md` specifies it:
//! 1. create `.w-<pid>-<id>.shm.tmp` with `O_EXCL`, take an exclusive `flock` on it, allocate 64 KiB,
//!    write the header, then rename it to `w-<pid>-<id>.shm`. The aggregator ignores temp names, so
//!    it never sees a published file whose writer does not hold the lock yet.
//! 2. append records under the registration lock: grow the file with `posix_fallocate` (which fails
//!    with ENOSPC instead of raising SIGBUS later), copy the record in, release-store `used`.
//! 3. on `fork`, the child repeats step 1 with a copy of the parent's records and zeroed slots, and
//!    maps it over the parent's mapping at the same address.
//! 4. on a normal exit, set the clean-exit flag. The lock goes away with the process, however it dies;
//!    that is how the aggregator knows the writer is gone, even across pid reuse and pid namespaces.
//!
//! When step 3 fails (typically a full disk: the child's 64 KiB cannot be allocated) the child
//! *shares* its parent's file instead of losing its updates: it keeps the inherited `MAP_SHARED`
//! mapping, so every update of a series registered before the fork is an atomic add into the one
//! copy of the slots the aggregator merges — counted once, never lost. It keeps the inherited
//! descriptor open too: the `flock` belongs to the open file description, so the file stays
//! locked, and its final values unfolded, until the parent *and* every sharing child are gone.
//! A sharing child never appends (its registration lock is not the parent's, so two appenders would
//! corrupt the log): a new metric or label set is refused and counted in the shared header's
//! `dropped_series`, and its updates in `dropped_updates`. It never touches the parent's flags
//! (`READY`, `CLEAN_EXIT`) and counts itself in the header's `shared_forks`. It says so on stderr
//! once, with a raw `write(2)`: after a fork only the forking thread exists, and a lock another
//! thread held at that moment (stderr's, a tracing subscriber's) stays locked in the child forever.
//! The `tracing` event is therefore deferred to the child's next registration, outside any lock.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

use crate::layout::{self, header, region::Region, HEADER_SIZE};

/// Bytes of address space a writer reserves by default (the most its file can grow to).
pub const DEFAULT_RESERVE: u64 = 1 << 30;
/// Initial file size.
const INITIAL_SIZE: u64 = 64 * 1024;
/// Largest single growth step.
const MAX_GROWTH: u64 = 8 << 20;

/// Where a store's records live.
enum Backing {
    /// A published file in a multiproc directory, locked for the process's lifetime.
    File { dir: PathBuf, lock: File, file_id: [u8; 16] },
    /// A forked child that could not create a file of its own: it writes into the file it
    /// inherited (named after `owner_pid`, its parent or an earlier ancestor) through the inherited
    /// mapping, and keeps the inherited descriptor — and with it the file's lock — open. Nothing is
    /// ever appended to that file from here.
    Shared { dir: PathBuf, lock: File, file_id: [u8; 16], owner_pid: u64 },
    /// Private memory: no directory configured, or the file could not be created.
    Memory,
}

/// The mutable part of a store, behind its registration lock.
pub(crate) struct StoreState {
    backing: Backing,
    /// Mirror of the header's `used`.
    used: u64,
    /// Bytes allocated in the file (or the reserve, for memory).
    size: u64,
    /// Pid of the process this state belongs to.
    pid: u64,
    /// Why the store has no file of its own (private memory, or sharing its parent's), if so.
    pub(crate) degraded: Option<String>,
    /// A message for `tracing` that the fork hook could not log safely; see [`Store::flush_log`].
    pending_log: Option<String>,
    /// Registry data (metric table); lives under the same lock so fork sees it consistent.
    pub(crate) registry: super::RegistryState,
}

/// A writer's mapping plus its state. Leaked for the life of the process (see [`Store::leak`]).
pub(crate) struct Store {
    pub(crate) region: Region,
    reserve: u64,
    state: Mutex<StoreState>,
    /// The store shares its parent's file ([`Backing::Shared`]). Outside the lock, for the exit
    /// hook (which must not block) and `set_ready`.
    shared: AtomicBool,
    /// `pending_log` holds a message; checked without the lock on registration.
    log_pending: AtomicBool,
}

/// Every store of this process, for the fork and exit hooks.
static STORES: Mutex<Vec<&'static Store>> = Mutex::new(Vec::new());
static HOOKS: Once = Once::new();

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Creates, locks, sizes and publishes a new file holding `records` after a fresh header.
fn create_file(
    dir: &Path,
    pid: u64,
    parent_pid: u64,
    reserve: u64,
    records: &[u8],
) -> io::Result<(File, [u8; 16], u64)> {
    let file_id = layout::region::random_id();
    let name = layout::file_name(pid, &file_id);
    let mut tmp = OsString::from(".").into_vec();
    tmp.extend_from_slice(name.as_bytes());
    tmp.extend_from_slice(b".tmp");
    let tmp_path = dir.join(OsString::from_vec(tmp));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp_path)?;
    let result = (|| {
        // std's try_lock is flock(LOCK_EX|LOCK_NB) on Linux; the lock lives as long as any
        // descriptor of this open file description, i.e. as long as the writer process.
        file.try_lock().map_err(io::Error::from)?;
        let lock = file;
        let used = HEADER_SIZE + records.len() as u64;
        let size = round_up(used.max(INITIAL_SIZE), INITIAL_SIZE);
        if size > reserve {
            return Err(io::Error::other("records do not fit in the reserve"));
        }
        nix::fcntl::posix_fallocate(lock.as_fd(), 0, size as i64).map_err(io::Error::from)?;
        let mut head = layout::encode_header(pid, parent_pid, now_ns(), file_id, reserve);
        head[header::USED as usize..header::USED as usize + 8].copy_from_slice(&used.to_le_bytes());
        lock.write_all_at(records, HEADER_SIZE)?;
        lock.write_all_at(&head, 0)?;
        std::fs::rename(&tmp_path, dir.join(&name))?;
        Ok((lock, file_id, size))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result
}

impl Store {
    /// Opens a new store in `dir` (creating its file now) or, with `None`, in private memory.
    pub(crate) fn open(dir: Option<&Path>, reserve: u64) -> io::Result<&'static Store> {
        let reserve = round_up(reserve.max(2 * INITIAL_SIZE), INITIAL_SIZE);
        let pid = u64::from(std::process::id());
        let (backing, region, size) = match dir {
            Some(dir) => {
                let (lock, file_id, size) = create_file(dir, pid, 0, reserve, &[])?;
                let region = Region::map_file(lock.as_fd(), reserve as usize, true)?;
                let backing = Backing::File { dir: dir.to_path_buf(), lock, file_id };
                (backing, region, size)
            }
            None => {
                let region = Region::anonymous(reserve as usize)?;
                let head = layout::encode_header(pid, 0, now_ns(), [0; 16], reserve);
                // SAFETY: the mapping was created on the line above and is private memory: no
                // other thread or process can see it yet.
                #[allow(unsafe_code)]
                unsafe { region.write_bytes(0, &head) }?;
                (Backing::Memory, region, reserve)
            }
        };
        let store = Store {
            region,
            reserve,
            state: Mutex::new(StoreState {
                backing,
                used: HEADER_SIZE,
                size,
                pid,
                degraded: None,
                pending_log: None,
                registry: super::RegistryState::default(),
            }),
            shared: AtomicBool::new(false),
            log_pending: AtomicBool::new(false),
        };
        Ok(Store::leak(store))
    }

    /// Leaks the store so handles can point into it for the rest of the process, and registers it
    /// with the fork and exit hooks.
    fn leak(store: Store) -> &'static Store {
        let store: &'static Store = Box::leak(Box::new(store));
        HOOKS.call_once(|| {
            // If registration fails we can only lose fork-safety, not correctness of this process.
            // SAFETY: `prepare` takes the store list and every store's state lock, so `child` finds
            // them free; `child` (see `Store::after_fork`) takes no other lock, writes to stderr with
            // raw write(2) and defers its `tracing` event to the next registration; it allocates,
            // which glibc and musl allow in a fork child. None of the three unwinds: they only
            // take locks that ignore poisoning and handle every error by value.
            #[allow(unsafe_code)]
            let registered = unsafe { layout::region::register_fork_handlers(prepare, parent, child) };
            if let Err(e) = registered {
                tracing::warn!("shmetrics: cannot register fork handlers: {e}");
            }
            if let Err(e) = layout::region::register_exit_handler(at_exit) {
                tracing::warn!("shmetrics: cannot register exit handler: {e}");
            }
        });
        lock(&STORES).push(store);
        store
    }

    /// Locks the store's state.
    pub(crate) fn lock(&self) -> MutexGuard<'_, StoreState> {
        lock(&self.state)
    }

    /// The header atomic at `off`. Header offsets are constants inside the first page.
    pub(crate) fn header_atomic(&self, off: u64) -> &AtomicU64 {
        self.region.atomic(off).unwrap_or(&SCRATCH[0])
    }

    /// The file this store writes, if any.
    pub(crate) fn path(&self) -> Option<PathBuf> {
        let st = self.lock();
        match &st.backing {
            Backing::File { dir, file_id, .. } => Some(dir.join(layout::file_name(st.pid, file_id))),
            Backing::Shared { dir, file_id, owner_pid, .. } => {
                Some(dir.join(layout::file_name(*owner_pid, file_id)))
            }
            Backing::Memory => None,
        }
    }

    /// Whether this store writes into its parent's file (see the module docs). Such a store must
    /// not change the file's flags, which belong to the file's own writer.
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Acquire)
    }

    /// Logs, through `tracing`, what the fork hook could only write to stderr. Called on the
    /// registration path, before the store lock is taken: a subscriber may itself update metrics.
    pub(crate) fn flush_log(&self) {
        if self.log_pending.load(Ordering::Relaxed) {
            let msg = {
                let mut st = self.lock();
                self.log_pending.store(false, Ordering::Relaxed);
                st.pending_log.take()
            };
            if let Some(msg) = msg {
                tracing::error!("{msg}");
            }
        }
    }

    /// Appends a record and publishes it; returns its offset, or `None` when the file (or the disk)
    /// is full — the caller then hands out a scratch handle and counts the drop.
    pub(crate) fn append(&self, st: &mut StoreState, record: &[u8]) -> Option<u64> {
        if matches!(st.backing, Backing::Shared { .. }) {
            // Another process appends to this file under its own lock.
            return None;
        }
        let off = st.used;
        let need = off.checked_add(record.len() as u64)?;
        if need > self.reserve {
            return None;
        }
        if need > st.size {
            let grow = st.size.min(MAX_GROWTH);
            let new_size = round_up(need.max(st.size + grow), INITIAL_SIZE).min(self.reserve);
            if let Backing::File { lock, .. } = &st.backing {
                let len = (new_size - st.size) as i64;
                if nix::fcntl::posix_fallocate(lock.as_fd(), st.size as i64, len).is_err() {
                    return None;
                }
            }
            st.size = new_size;
        }
        // SAFETY: `off..need` lies past the published end of the log (`used`), which no reader
        // reads before the release store below; `st` proves the registration lock is held, so no
        // other thread of this process writes the range; a `Shared` store (whose file another
        // process appends to) returned above; and the file was grown to cover the range.
        #[allow(unsafe_code)]
        let written = unsafe { self.region.write_bytes(off, record) };
        written.ok()?;
        st.used = need;
        // The release store publishes the record bytes written above to every reader that loads
        // `used` with acquire ordering.
        self.header_atomic(header::USED).store(need, Ordering::Release);
        Some(off)
    }

    /// Moves this store onto a new file after `fork` (we are the child; the state lock is held by
    /// the prepare hook, so `st` is consistent and no other thread exists). If the child's file
    /// cannot be created or mapped, the store shares the file it inherited instead.
    fn after_fork(&self, st: &mut StoreState) {
        let parent_pid = st.pid;
        st.pid = u64::from(std::process::id());
        let dir = match &st.backing {
            Backing::File { dir, .. } | Backing::Shared { dir, .. } => dir.clone(),
            Backing::Memory => return, // private memory is copied by fork; nothing is shared
        };
        // Only the records this process's registry knows, up to its own `used`: a sharing parent's
        // file may have grown since (by its owner), and copying more would put metric ids out of
        // sequence with the registry.
        let mut records = Vec::new();
        let copied = self.region.copy_out(HEADER_SIZE, (st.used - HEADER_SIZE) as usize, &mut records);
        // Zero the parent's values in the copy *before* the file is published: a reader must never
        // see the child's file holding the parent's values (they would be counted twice).
        zero_slots(&mut records);
        let created = copied.and_then(|()| create_file(&dir, st.pid, parent_pid, self.reserve, &records));
        let err = match created {
            // SAFETY: we are the fork child, so no other thread exists and only handles' atomics
            // point into the region; the new file is open read-write and sized for `used`; on
            // failure the inherited file is mapped back (or `to_memory` maps private memory)
            // before anything touches the range again.
            #[allow(unsafe_code)]
            Ok((lock, file_id, size)) => match unsafe { self.region.remap_fixed(Some(lock.as_fd())) } {
                Ok(()) => {
                    let inherited = std::mem::replace(&mut st.backing, Backing::File { dir, lock, file_id });
                    release_inherited(inherited);
                    st.size = size;
                    st.degraded = None;
                    st.pending_log = None;
                    self.log_pending.store(false, Ordering::Relaxed);
                    self.shared.store(false, Ordering::Release);
                    return;
                }
                Err(e) => {
                    // Published but not mapped: withdraw the file (it holds only zeros) and put
                    // the inherited file back under the mapping, which MAP_FIXED may have dropped.
                    let _ = std::fs::remove_file(dir.join(layout::file_name(st.pid, &file_id)));
                    drop(lock);
                    let restored = match &st.backing {
                        Backing::File { lock, .. } | Backing::Shared { lock, .. } => {
                            // SAFETY: as above, still the only thread; the inherited descriptor is
                            // read-write and its file covers our `used`, since we were writing
                            // into it until the fork. Since the failed call we only removed a file,
                            // closed a descriptor and formatted a file name: nothing can have been
                            // mapped into the range. A failure leads to `to_memory`.
                            #[allow(unsafe_code)]
                            unsafe {
                                self.region.remap_fixed(Some(lock.as_fd()))
                            }
                        }
                        Backing::Memory => Err(io::Error::other("no inherited file")),
                    };
                    if let Err(e2) = restored {
                        self.to_memory(st, parent_pid, &records, &format!("{e}; then {e2}"));
                        return;
                    }
                    e
                }
            },
            Err(e) => e,
        };
        self.share(st, parent_pid, &dir, &err);
    }

    /// Makes this (forked) store write into the file it inherited; see the module docs.
    fn share(&self, st: &mut StoreState, parent_pid: u64, dir: &Path, err: &io::Error) {
        let (lock, file_id, owner_pid) = match std::mem::replace(&mut st.backing, Backing::Memory) {
            Backing::File { lock, file_id, .. } => (lock, file_id, parent_pid),
            Backing::Shared { lock, file_id, owner_pid, .. } => (lock, file_id, owner_pid),
            Backing::Memory => return,
        };
        let name = layout::file_name(owner_pid, &file_id);
        st.backing = Backing::Shared { dir: dir.to_path_buf(), lock, file_id, owner_pid };
        self.shared.store(true, Ordering::Release);
        self.header_atomic(header::SHARED_FORKS).fetch_add(1, Ordering::Relaxed);
        let msg = format!(
            "shmetrics: pid {pid} cannot create a metrics file of its own in {dir} after fork ({err}); \
             its updates go into the file it inherited, {name} (pid {owner_pid}); metrics and label \
             sets it registers from now on are dropped and counted \
             (shmetrics_dropped_series_total, shmetrics_dropped_updates_total)",
            pid = st.pid,
            dir = dir.display(),
        );
        write_stderr(&msg);
        st.degraded = Some(msg.clone());
        st.pending_log = Some(msg);
        self.log_pending.store(true, Ordering::Relaxed);
    }

    /// Last resort after `fork`, when not even the inherited file can be mapped again: private
    /// memory, as for a process whose first file could not be created. Its values are not exported.
    fn to_memory(&self, st: &mut StoreState, parent_pid: u64, records: &[u8], why: &str) {
        // The records must be put back, since the remap may have replaced them with zeros.
        // SAFETY: we are the fork child (the only thread); the mapping becomes private memory,
        // which no other process sees, and the range is touched again only if the remap worked.
        // Since a failed remap (if any) the process has made no mapping of its own.
        #[allow(unsafe_code)]
        let remapped = unsafe { self.region.remap_fixed(None) };
        if let Err(e) = remapped {
            // Nothing is mapped under the handles any more, and the next mapping the process makes
            // may land there: an update through a handle taken before the fork would corrupt it.
            write_stderr(&format!(
                "shmetrics: pid {} cannot map even private memory under its metric handles after \
                 fork ({why}; then {e}); aborting rather than let updates corrupt memory",
                st.pid
            ));
            std::process::abort();
        }
        let head = layout::encode_header(st.pid, parent_pid, now_ns(), [0; 16], self.reserve);
        // SAFETY: private memory mapped just above, in a process with one thread.
        #[allow(unsafe_code)]
        unsafe {
            let _ = self.region.write_bytes(0, &head);
            let _ = self.region.write_bytes(HEADER_SIZE, records);
        }
        self.header_atomic(header::USED).store(st.used, Ordering::Release);
        release_inherited(std::mem::replace(&mut st.backing, Backing::Memory));
        st.size = self.reserve;
        self.shared.store(false, Ordering::Release);
        let msg = format!(
            "shmetrics: pid {} cannot map a metrics file after fork ({why}); its metrics are kept in \
             private memory and not exported",
            st.pid
        );
        write_stderr(&msg);
        st.degraded = Some(msg.clone());
        st.pending_log = Some(msg);
        self.log_pending.store(true, Ordering::Relaxed);
    }
}

/// Writes one line to stderr with plain `write(2)` calls: safe in a fork child, where the lock of
/// `std::io::stderr()` may be held forever by a thread that does not exist there.
fn write_stderr(msg: &str) {
    let mut line = Vec::with_capacity(msg.len() + 1);
    line.extend_from_slice(msg.as_bytes());
    line.push(b'\n');
    let mut rest = line.as_slice();
    while !rest.is_empty() {
        match nix::unistd::write(std::io::stderr(), rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Zeroes the value slots of every SERIES and TYPED_SERIES record in `records` (a copy of a log starting at
/// [`HEADER_SIZE`]): a forked child starts from zero so its parent's values are not counted twice.
fn zero_slots(records: &mut [u8]) {
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    let mut off = 0;
    while off + layout::SERIES_FIXED <= records.len() {
        let rec = &records[off..];
        let len = le32(rec, 0);
        if len < layout::RECORD_HEADER || len % 8 != 0 || len > rec.len() {
            return; // our own log; cannot happen, but never loop or panic on it
        }
        let kind = u16::from_le_bytes([rec[4], rec[5]]);
        if kind == layout::kind::SERIES || kind == layout::kind::TYPED_SERIES {
            let (slots, at) = (le32(rec, 12), le32(rec, 16));
            if let Some(bytes) = records.get_mut(off + at..off + at + 8 * slots) {
                bytes.fill(0);
            }
        }
        off += len;
    }
}

/// Closes a forked child's copy of its parent's file descriptor (or of the file the parent shared).
/// It must *not* unlock: `flock` locks belong to the open file description, which parent and child
/// share, so `LOCK_UN` here would release the parent's lock and make a live parent look dead.
/// Closing one descriptor does not release the lock while the parent holds another.
fn release_inherited(backing: Backing) {
    drop(backing);
}

/// Where handles of series that could not be registered (file or disk full) write. Never read.
pub(crate) static SCRATCH: [AtomicU64; layout::MAX_BUCKETS + 2] =
    [const { AtomicU64::new(0) }; layout::MAX_BUCKETS + 2];

thread_local! {
    /// The locks `prepare` took, handed to `parent`/`child` (same thread, by POSIX).
    static HELD: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

struct Held {
    _list: MutexGuard<'static, Vec<&'static Store>>,
    states: Vec<(&'static Store, MutexGuard<'static, StoreState>)>,
}

/// Locks a mutex, ignoring poisoning (a panic elsewhere must not stop metrics).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

extern "C" fn prepare() {
    // Take the store list and every store's lock, so that at the instant of fork no other thread is
    // half-way through a registration: the child then sees every store in a consistent state.
    let list = lock(&STORES);
    let states = list.iter().map(|s| (*s, lock(&s.state))).collect();
    HELD.with(|h| *h.borrow_mut() = Some(Held { _list: list, states }));
}

extern "C" fn parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn child() {
    HELD.with(|h| {
        if let Some(mut held) = h.borrow_mut().take() {
            for (store, st) in &mut held.states {
                store.after_fork(st);
            }
        }
    });
}

extern "C" fn at_exit() {
    // A normal exit: mark every file clean. try_lock, because exit may run while another thread
    // holds the list (that thread's process is going away anyway and we skip the flag). A store
    // that shares its parent's file leaves the flag to the parent: the parent may still be running,
    // or may have crashed.
    if let Ok(stores) = STORES.try_lock() {
        for s in stores.iter().filter(|s| !s.is_shared()) {
            s.header_atomic(header::FLAGS).fetch_or(layout::flags::CLEAN_EXIT, Ordering::Release);
        }
    }
}
