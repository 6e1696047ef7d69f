//! The binary's only `unsafe`: making the application die with `shmetrics run`.
//!
//! `run` starts the application in a process group of its own (so that a terminal's Ctrl-C reaches
//! it once, through us). When `run` dies without forwarding anything — SIGKILL from the OOM killer,
//! or from supervisord after `stopwaitsecs` — nothing would stop the application: it would live on,
//! reparented, keeping its port, and every replacement `run` would fail with "address in use".
//! So the child asks the kernel for `PR_SET_PDEATHSIG`: a SIGKILL when its parent goes away.
//!
//! SIGKILL rather than SIGTERM: the case this exists for is a `run` that was itself SIGKILLed,
//! often because the application did not stop on SIGTERM in time (supervisord's `stopwaitsecs`);
//! a master that ignores SIGTERM, or is stuck in its shutdown, must still go. What happens to the
//! application's own workers is up to the application (they do not inherit the setting): see the
//! README (gunicorn's workers exit when their master is gone, uWSGI needs `no-orphans`, the
//! bundled `prefork_server` sets the same signal in its workers).
//!
//! Setting it needs code between `fork` and `exec` (`CommandExt::pre_exec`, an `unsafe fn`), so
//! `main.rs` denies `unsafe_code` and this module alone allows it, for the one call below.
#![allow(unsafe_code)]

use std::io;

use nix::sys::signal::Signal;

/// Makes `cmd`'s process receive SIGKILL when the thread calling `spawn` exits.
///
/// The kernel sends the parent-death signal when the *thread* that forked the child exits, not
/// the process. The caller must therefore spawn from a thread that lives as long as `run`: `run`
/// spawns from the future passed to `Runtime::block_on`, which runs on the main thread (never on
/// a runtime worker thread, which tokio may stop at any time), and the main thread only ends when
/// the process does.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // Our pid, read before the fork: the child compares its parent with it.
    let parent = std::process::id();
    let set_up = move || -> io::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        // `run` may have died between the fork and the prctl: then no signal will come, and the
        // child has been reparented already. Do not start the application at all.
        if nix::unistd::getppid().as_raw() as u32 != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between `fork` and `exec`, where only async-signal-
    // safe operations are allowed (the parent has other threads, whose locks may be held forever
    // in the child's copy of memory). It makes two system calls, prctl(2) and getppid(2), both
    // async-signal-safe, through nix's thin wrappers, which neither allocate nor lock; it
    // captures one integer; the error values are built from an errno without allocating
    // (`io::Error::from_raw_os_error`). It touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(set_up);
    }
}
