//! Memory mappings of shmetrics files, and the process hooks they need. The crate's `unsafe` code.
//!
//! Why it is built this way:
//! - A writer maps a large *reserve* of address space once over a small file that grows in place, so
//!   the address of every value slot stays fixed for the life of the process: handles are plain
//!   pointers and never need to be re-resolved (no lock, no remap check on the hot path).
//! - After `fork` the child must stop writing to its parent's file. `Region::remap_fixed` puts the
//!   child's own file at the *same* address (`MAP_FIXED`), so every handle the application cached
//!   before the fork silently starts writing to the child's file.
//! - A reader maps files read-only and loads slots with atomic loads, so a value is never torn. A
//!   file that someone truncates while it is being read would normally raise SIGBUS; `guarded`
//!   turns that into "this file is bad" for the one read in progress.
//!
//! Only [`Region`] itself is public (readers pass `&Region` around); its methods and the functions
//! here are for this crate. Everything is safe to call except what only the writer may do, whose
//! contracts the type system cannot check: `Region::write_bytes` (a plain copy into shared memory),
//! `Region::remap_fixed` (moving the mapping under live handles) and `register_fork_handlers` (code
//! run in a fork child). Those are `unsafe fn`s with a `# Safety` section; their one caller, the
//! writer's store (`writer/store.rs`), says at each call why the contract holds. The SIGBUS guard
//! exists only with the `aggregator` feature: a writer never reads a file it does not own.

#![allow(unsafe_code)] // The one module allowed to: see the module docs.

#[cfg(feature = "aggregator")]
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "aggregator")]
use std::sync::Once;

/// Size of a page on every platform we map on; used to align SIGBUS repairs.
#[cfg(feature = "aggregator")] // The SIGBUS guard is for readers, i.e. the aggregator.
const PAGE: usize = 4096;

/// A fixed range of address space mapped from a file or anonymous memory, unmapped on drop.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region is a range of shared memory; all concurrent access to it goes through atomics
// (slots, `used`, flags) or through writes that the owning writer serialises under its lock to bytes
// no reader looks at yet (past `used`). The pointer itself is never re-seated.
unsafe impl Send for Region {}
// SAFETY: see `Send`; `&Region` only hands out atomics and bounds-checked copies.
unsafe impl Sync for Region {}

fn check(ret: *mut libc::c_void) -> io::Result<NonNull<u8>> {
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ret.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Region {
    /// Maps `len` bytes of `fd` shared, read-write (writer) or read-only (reader).
    ///
    /// `len` may exceed the file's size: only the part inside the file may be touched, which the
    /// writer guarantees by growing the file before it writes past its end.
    pub(crate) fn map_file(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Region> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh mapping at an address the kernel chooses aliases no Rust object; the fd
        // is valid for the duration of the call (BorrowedFd).
        let ret = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        Ok(Region { base: check(ret)?, len: len.max(1) })
    }

    /// Maps `len` bytes of private anonymous memory (a writer without a directory).
    pub(crate) fn anonymous(len: usize) -> io::Result<Region> {
        // SAFETY: as in `map_file`, a fresh mapping aliases nothing.
        let ret = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Ok(Region { base: check(ret)?, len: len.max(1) })
    }

    /// Replaces the whole mapping, at the same address, with `fd` (read-write, shared), or with
    /// anonymous memory when `fd` is `None`. Used by a forked child to move onto its own file.
    ///
    /// On success every atomic handed out by [`Region::atomic`] and [`Region::atomics`] stays valid
    /// and now reads and writes the new backing.
    ///
    /// # Safety
    ///
    /// The caller must ensure that:
    ///
    /// - no other thread accesses the region during the call, and nothing but atomics obtained from
    ///   this region points into it (in a fork child, where only the calling thread exists, this
    ///   holds by construction);
    /// - `fd`, if given, is open for reading and writing and its file is at least as long as every
    ///   part of the region that will be touched afterwards;
    /// - if the call fails, the range is not touched again (through atomics or anything else) until
    ///   a later call succeeds, because a failed `MAP_FIXED` may already have unmapped it: the
    ///   kernel may then place an unrelated mapping there, and a write through a live atomic would
    ///   corrupt it. For the same reason a later call after a failure is sound only if nothing can
    ///   have been mapped into the range in between (it would be replaced).
    ///
    /// It is the caller's business, not a safety matter, to copy whatever it still needs out of the
    /// old mapping first.
    pub(crate) unsafe fn remap_fixed(&self, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED, -1),
        };
        // SAFETY: MAP_FIXED replaces exactly the range this Region owns, atomically; no other
        // Rust object lives in it, and all references into it are to atomics (whose addresses stay
        // valid, now backed by the new file) or to the Region itself. The caller guarantees that
        // nobody accesses the range concurrently, and that it is not touched after a failure.
        let ret = unsafe {
            libc::mmap(self.base.as_ptr().cast(), self.len, libc::PROT_READ | libc::PROT_WRITE, flags, raw, 0)
        };
        let got = check(ret)?;
        if got != self.base {
            return Err(io::Error::other("MAP_FIXED returned another address"));
        }
        Ok(())
    }

    /// The 8-byte atomic at byte offset `off`, or `None` if it is not 8-aligned inside the mapping.
    #[inline]
    pub(crate) fn atomic(&self, off: u64) -> Option<&AtomicU64> {
        let off = usize::try_from(off).ok()?;
        if off % 8 != 0 || off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above), 8-aligned (mappings are
        // page-aligned and off % 8 == 0), and lives as long as `&self`. AtomicU64 has the size and
        // alignment of u64; other processes touch these bytes only through atomics too.
        Some(unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() })
    }

    /// The `n` consecutive 8-byte atomics starting at byte offset `off`, with the same checks as
    /// [`Region::atomic`].
    #[inline]
    pub(crate) fn atomics(&self, off: u64, n: usize) -> Option<&[AtomicU64]> {
        let off = usize::try_from(off).ok()?;
        if off % 8 != 0 || off.checked_add(n.checked_mul(8)?)? > self.len {
            return None;
        }
        // SAFETY: as in `atomic`, for the whole checked range.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(off).cast::<AtomicU64>(), n) })
    }

    /// Copies `bytes` into the mapping at `off`: a plain, non-atomic copy.
    ///
    /// Returns an error, and writes nothing, if the range does not lie inside the mapping.
    ///
    /// # Safety
    ///
    /// Nobody may access `off..off + bytes.len()` while the copy runs: no other thread of this
    /// process (through this region, an atomic obtained from it, or another mapping of the same
    /// file), and no other process that maps the file. For a writer that means: the range lies past
    /// the published end of the log (`used`), the copy happens under the registration lock, and no
    /// other writer appends to the file; readers look past `used` only after its release store,
    /// which comes after the copy. In private memory that no other thread can reach (freshly
    /// mapped, or in a fork child, which has a single thread) any range qualifies.
    ///
    /// The range must also lie inside the part of the mapping that the backing file covers, or the
    /// write raises `SIGBUS`.
    pub(crate) unsafe fn write_bytes(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        let off = usize::try_from(off).map_err(io::Error::other)?;
        if off.checked_add(bytes.len()).is_none_or(|e| e > self.len) {
            return Err(io::Error::other("write past the end of the mapping"));
        }
        // SAFETY: bounds checked above; source is a distinct Rust slice so they do not overlap; the
        // caller guarantees that no one else accesses the destination concurrently.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(off), bytes.len()) };
        Ok(())
    }

    /// Copies `len` bytes at `off` out of the mapping into `out` (replacing its contents).
    ///
    /// The copy may race with atomic slot updates of other processes; callers treat it as untrusted
    /// input and read values only through [`Region::atomic`].
    pub(crate) fn copy_out(&self, off: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let off = usize::try_from(off).map_err(io::Error::other)?;
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::other("read past the end of the mapping"));
        }
        out.clear();
        out.reserve(len);
        // SAFETY: bounds checked; `out` has capacity for `len` bytes and is not aliased by the
        // mapping. Bytes of slots may change during the copy; the result is only parsed as
        // untrusted data, never used to form references.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(())
    }

    #[cfg(feature = "aggregator")]
    fn range(&self) -> (usize, usize) {
        let start = self.base.as_ptr() as usize;
        (start, start + self.len)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by us and nothing borrows it any more (`&mut self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(feature = "aggregator")]
thread_local! {
    /// The mapping the current thread is reading under [`guarded`], as (start, end).
    static GUARDED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Set by the SIGBUS handler when it repaired a page of the guarded mapping.
    static FAULTED: Cell<bool> = const { Cell::new(false) };
}

#[cfg(feature = "aggregator")]
static SIGBUS_ONCE: Once = Once::new();

#[cfg(feature = "aggregator")]
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = GUARDED.with(Cell::get);
    if addr >= start && addr < end {
        let page = addr & !(PAGE - 1);
        // SAFETY: the page lies in a read-only mapping that the faulting thread is reading under
        // `guarded`; replacing it with a zero page (mmap is async-signal-safe) lets the faulting
        // load complete. The Region is discarded by the caller, who sees FAULTED.
        unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
        }
        FAULTED.with(|f| f.set(true));
        return;
    }
    // Not a guarded read: restore the default action; the faulting access repeats and the process
    // dies with SIGBUS as it would have without this handler.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Runs `f`, which reads `region`; returns its result and whether the file backing the region
/// vanished under it (truncated by someone) during the read. After `true` the region holds zero
/// pages and must be dropped.
#[cfg(feature = "aggregator")]
pub(crate) fn guarded<R>(region: &Region, f: impl FnOnce() -> R) -> (R, bool) {
    SIGBUS_ONCE.call_once(|| {
        // SAFETY: installing a handler with a zeroed, then filled, sigaction is the documented use;
        // the handler only touches thread-locals without destructors and calls mmap/signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
    GUARDED.with(|g| g.set(region.range()));
    FAULTED.with(|f| f.set(false));
    let r = f();
    GUARDED.with(|g| g.set((0, 0)));
    (r, FAULTED.with(Cell::get))
}

/// Registers process-wide fork handlers (`pthread_atfork`).
///
/// # Safety
///
/// `prepare` runs in the forking thread just before `fork`, `parent` in the parent and `child` in
/// the child just after it. The child of a multi-threaded process has only the forking thread, and
/// POSIX allows it nothing but async-signal-safe functions until it calls `exec` (as for
/// `std::os::unix::process::CommandExt::pre_exec`). The caller must ensure that `child` does only
/// what is sound there: in particular, it must not take a lock that another thread may have held
/// at the moment of the fork (stderr's, a logger's, any mutex of its own) unless `prepare` took
/// that same lock and so guarantees it is free, and it may allocate only because the C library
/// makes its allocator usable in a fork child (glibc and musl do). The handlers must not unwind.
pub(crate) unsafe fn register_fork_handlers(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the handlers are plain `extern "C"` functions with static lifetime; what they may do
    // after the fork is the caller's obligation (see above).
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Registers a handler run by `exit(3)` (normal process exit, including return from `main`).
pub(crate) fn register_exit_handler(f: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `f` is a static `extern "C"` function.
    if unsafe { libc::atexit(f) } != 0 {
        return Err(io::Error::other("atexit failed"));
    }
    Ok(())
}

/// 16 random bytes from the kernel, without allocating (safe to call in a fork child).
pub(crate) fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 16 {
        // No entropy syscall: fall back to time and pid, unique enough for a file name that is
        // also created with O_EXCL.
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        id.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn atomics_are_bounds_checked() {
        let r = Region::anonymous(4096).unwrap();
        assert!(r.atomic(4088).is_some());
        assert!(r.atomic(4090).is_none());
        assert!(r.atomic(4096).is_none());
        r.atomic(8).unwrap().store(42, Ordering::Relaxed);
        let mut v = Vec::new();
        r.copy_out(8, 8, &mut v).unwrap();
        assert_eq!(v, 42u64.to_le_bytes());
        // SAFETY (both calls): the region is private to this test and nothing else touches it.
        assert!(unsafe { r.write_bytes(4095, &[1, 2]) }.is_err());
        assert!(unsafe { r.write_bytes(16, &7u64.to_le_bytes()) }.is_ok());
        assert_eq!(r.atomic(16).unwrap().load(Ordering::Relaxed), 7);
    }

    #[test]
    #[cfg(feature = "aggregator")]
    fn guarded_read_survives_truncation() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(3 * 4096).unwrap();
        use std::os::fd::AsFd;
        let r = Region::map_file(f.as_fd(), 3 * 4096, false).unwrap();
        let (v, faulted) = guarded(&r, || r.atomic(8192).unwrap().load(Ordering::Relaxed));
        assert_eq!((v, faulted), (0, false));
        f.set_len(4096).unwrap();
        let (v, faulted) = guarded(&r, || r.atomic(8192).unwrap().load(Ordering::Relaxed));
        assert_eq!((v, faulted), (0, true));
    }
}
