//! Memory mappings of shmetrics files, and the process hooks they need. The crate's only `unsafe`.
//!
//! Why it is built this way:
//! - A writer maps a large *reserve* of address space once over a small file that grows in place, so
//!   the address of every value slot stays fixed for the life of the process: handles are plain
//!   pointers and never need to be re-resolved (no lock, no remap check on the hot path).
//! - After `fork` the child must stop writing to its parent's file. [`Region::remap_fixed`] puts the
//!   child's own file at the *same* address (`MAP_FIXED`), so every handle the application cached
//!   before the fork silently starts writing to the child's file.
//! - A reader maps files read-only and loads slots with atomic loads, so a value is never torn. A
//!   file that someone truncates while it is being read would normally raise SIGBUS; [`guarded`]
//!   turns that into "this file is bad" for the one read in progress.

#![allow(unsafe_code)] // The one module allowed to: see the module docs.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Once;

/// Size of a page on every platform we map on; used to align SIGBUS repairs.
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
    pub fn map_file(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Region> {
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
    pub fn anonymous(len: usize) -> io::Result<Region> {
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
    /// The caller must have copied whatever it needs out of the old mapping first.
    pub fn remap_fixed(&self, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED, -1),
        };
        // SAFETY: MAP_FIXED replaces exactly the range this Region owns, atomically; no other
        // Rust object lives in it, and all references into it are to atomics (whose addresses stay
        // valid, now backed by the new file) or to the Region itself.
        let ret = unsafe {
            libc::mmap(self.base.as_ptr().cast(), self.len, libc::PROT_READ | libc::PROT_WRITE, flags, raw, 0)
        };
        let got = check(ret)?;
        if got != self.base {
            return Err(io::Error::other("MAP_FIXED returned another address"));
        }
        Ok(())
    }

    /// Bytes of address space mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings are at least one byte).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The 8-byte atomic at byte offset `off`, or `None` if it is not 8-aligned inside the mapping.
    #[inline]
    pub fn atomic(&self, off: u64) -> Option<&AtomicU64> {
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
    pub fn atomics(&self, off: u64, n: usize) -> Option<&[AtomicU64]> {
        let off = usize::try_from(off).ok()?;
        if off % 8 != 0 || off.checked_add(n.checked_mul(8)?)? > self.len {
            return None;
        }
        // SAFETY: as in `atomic`, for the whole checked range.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(off).cast::<AtomicU64>(), n) })
    }

    /// Copies `bytes` into the mapping at `off`.
    ///
    /// Only for a writer filling a record past `used`, under its registration lock: no reader reads
    /// that range before the release store of `used`, and no other writer shares the file.
    pub fn write_bytes(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        let off = usize::try_from(off).map_err(io::Error::other)?;
        if off.checked_add(bytes.len()).is_none_or(|e| e > self.len) {
            return Err(io::Error::other("write past the end of the mapping"));
        }
        // SAFETY: bounds checked above; source is a distinct Rust slice so they do not overlap; see
        // the doc comment for why no one else accesses the destination concurrently.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(off), bytes.len()) };
        Ok(())
    }

    /// Copies `len` bytes at `off` out of the mapping into `out` (replacing its contents).
    ///
    /// The copy may race with atomic slot updates of other processes; callers treat it as untrusted
    /// input and read values only through [`Region::atomic`].
    pub fn copy_out(&self, off: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
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

thread_local! {
    /// The mapping the current thread is reading under [`guarded`], as (start, end).
    static GUARDED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Set by the SIGBUS handler when it repaired a page of the guarded mapping.
    static FAULTED: Cell<bool> = const { Cell::new(false) };
}

static SIGBUS_ONCE: Once = Once::new();

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
pub fn guarded<R>(region: &Region, f: impl FnOnce() -> R) -> (R, bool) {
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

/// Registers process-wide fork handlers once (`pthread_atfork`).
pub fn register_fork_handlers(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the handlers are plain `extern "C"` functions with static lifetime.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Registers a handler run by `exit(3)` (normal process exit, including return from `main`).
pub fn register_exit_handler(f: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `f` is a static `extern "C"` function.
    if unsafe { libc::atexit(f) } != 0 {
        return Err(io::Error::other("atexit failed"));
    }
    Ok(())
}

/// 16 random bytes from the kernel, without allocating (safe to call in a fork child).
pub fn random_id() -> [u8; 16] {
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
        assert!(r.write_bytes(4095, &[1, 2]).is_err());
    }

    #[test]
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
