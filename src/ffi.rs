//! The C ABI: what C, and through it PHP (FFI), Ruby (fiddle), Node (ffi) or Perl, call to write
//! metrics into the native format. Declared in `include/shmetrics.h`; built as
//! `libshmetrics.so` and `libshmetrics.a` by `cargo build --release`.
//!
//! # Why a thin layer over the writer
//!
//! Everything that makes the Rust writer right — one file per process, a file of its own for each
//! forked child (fork handlers), the clean-exit flag at `exit()`, drops counted on a full disk —
//! holds for C callers too, because these functions call it and nothing else. What this layer adds
//! is what the boundary needs: opaque handles (`Box`es the caller frees), error codes plus a
//! per-thread message ([`shm_last_error`]), no panic crossing into C (every entry point catches
//! them), and null or non-UTF-8 arguments refused instead of trusted.
//!
//! # Thread and fork safety
//!
//! Every function may be called from any thread. Updates through a handle are single atomic
//! operations on shared memory (no lock, no allocation, no syscall). A process that forks keeps
//! its handles: in the child they write into the child's own file (or, on a full disk, into the
//! parent's, counted), exactly as for Rust workers. Free a handle once, from one thread, when no
//! other thread uses it.
//!
//! The only `unsafe` outside `layout` and `cli::child` is here: reading C strings and arrays
//! through the pointers the caller passes, and taking back the `Box`es it frees. Each function's
//! contract (valid, NUL-terminated strings; arrays of the stated length; handles from this
//! library, freed once) is in the header.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ffi::{c_char, c_double, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::writer::{Counter, Enum, Gauge, Histogram, Info, Registry, Summary};
use crate::{Error, GaugeMode};

/// Success.
pub const SHM_OK: c_int = 0;
/// A required pointer was null, or a string was not UTF-8.
pub const SHM_ERR_ARGUMENT: c_int = 1;
/// An invalid metric name, label name or value, bucket list, gauge mode, info key, enum state
/// list, or a state an enum does not have.
pub const SHM_ERR_INVALID: c_int = 2;
/// The number of label values does not match the metric's label names. Reserved: every `*_new`
/// takes label names and values with one count, so another label set for a registered name is
/// [`SHM_ERR_CONFLICT`].
pub const SHM_ERR_LABELS: c_int = 3;
/// The name is already registered with another type, help, labels or buckets.
pub const SHM_ERR_CONFLICT: c_int = 4;
/// Anything else (a bug: the message says what); the process is not harmed.
pub const SHM_ERR_INTERNAL: c_int = 99;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(code: c_int, msg: String) -> c_int {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
    code
}

fn code_of(e: &Error) -> c_int {
    match e {
        Error::InvalidName(_)
        | Error::InvalidLabelName(_)
        | Error::InvalidLabelValue(_)
        | Error::InvalidBuckets(_)
        | Error::InvalidValue(_) => SHM_ERR_INVALID,
        Error::LabelCount { .. } => SHM_ERR_LABELS,
        Error::Conflict { .. } => SHM_ERR_CONFLICT,
        _ => SHM_ERR_INTERNAL,
    }
}

/// Runs `f`, turning its error or panic into a code and the thread's message.
fn guarded(f: impl FnOnce() -> Result<(), (c_int, String)>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SHM_OK,
        Ok(Err((code, msg))) => fail(code, msg),
        Err(_) => fail(SHM_ERR_INTERNAL, "internal error (a panic, caught); please report it".into()),
    }
}

/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, (c_int, String)> {
    if p.is_null() {
        return Err((SHM_ERR_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| (SHM_ERR_ARGUMENT, format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is null (then `n` must be 0) or points to `n` valid NUL-terminated strings.
unsafe fn texts<'a>(p: *const *const c_char, n: usize, what: &str) -> Result<Vec<&'a str>, (c_int, String)> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err((SHM_ERR_ARGUMENT, format!("{what} is NULL but {n} are expected")));
    }
    // SAFETY: the caller promises `n` pointers.
    let ptrs = unsafe { std::slice::from_raw_parts(p, n) };
    ptrs.iter().enumerate().map(|(i, s)| unsafe { text(*s, &format!("{what}[{i}]")) }).collect()
}

fn registry() -> &'static Registry {
    Registry::global()
}

/// The writer's error as a code and message.
fn err(e: Error) -> (c_int, String) {
    (code_of(&e), e.to_string())
}

/// The arguments every `*_new` function takes, read and checked.
struct Series<'a> {
    name: &'a str,
    help: &'a str,
    label_names: Vec<&'a str>,
    label_values: Vec<&'a str>,
}

/// # Safety
/// As the `*_new` functions: strings NUL-terminated (or null: refused), arrays of `n` strings.
unsafe fn series<'a>(
    name: *const c_char,
    help: *const c_char,
    label_names: *const *const c_char,
    label_values: *const *const c_char,
    n: usize,
) -> Result<Series<'a>, (c_int, String)> {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        Ok(Series {
            name: text(name, "name")?,
            help: text(help, "help")?,
            label_names: texts(label_names, n, "label_names")?,
            label_values: texts(label_values, n, "label_values")?,
        })
    }
}

/// The handle behind `p`, refused if null (for the update functions that return a code).
///
/// # Safety
/// `p` is null or a live handle from this library.
unsafe fn handle<'a, T>(p: *const T) -> Result<&'a T, (c_int, String)> {
    // SAFETY: a live handle, or null.
    unsafe { p.as_ref() }.ok_or_else(|| (SHM_ERR_ARGUMENT, "the handle is NULL".into()))
}

/// Runs `f` on the handle behind `p` (null: nothing).
///
/// # Safety
/// `p` is null or a live handle from this library.
unsafe fn with<T>(p: *const T, f: impl FnOnce(&T)) {
    // SAFETY: a live handle, or null.
    if let Some(h) = unsafe { p.as_ref() } {
        f(h);
    }
}

/// Frees a handle (null: nothing).
///
/// # Safety
/// `p` is null or a handle from this library, freed once.
unsafe fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: a Box this library made, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
}

fn put<T>(out: *mut *mut T, v: T) -> Result<(), (c_int, String)> {
    if out.is_null() {
        return Err((SHM_ERR_ARGUMENT, "the output pointer is NULL".into()));
    }
    // SAFETY: `out` is non-null and, by the header's contract, points to writable storage.
    unsafe { *out = Box::into_raw(Box::new(v)) };
    Ok(())
}

/// Defines a `*_new` function that takes only name, help and labels (counter, summary, info):
/// registers (or finds) the family with the registry's `$family` and puts the handle of the
/// series with the label values in `*out`. Its doc comment (with `# Safety`) goes before the name.
macro_rules! labelled_new {
    ($(#[$doc:meta])* $fn:ident, $handle:ident, $family:ident) => {
        $(#[$doc])*
        #[no_mangle]
        pub unsafe extern "C" fn $fn(
            name: *const c_char,
            help: *const c_char,
            label_names: *const *const c_char,
            label_values: *const *const c_char,
            n_labels: usize,
            out: *mut *mut $handle,
        ) -> c_int {
            guarded(|| {
                // SAFETY: forwarded from this function's contract.
                let s = unsafe { series(name, help, label_names, label_values, n_labels)? };
                let family = registry().$family(s.name, s.help, &s.label_names).map_err(err)?;
                put(out, $handle(family.with_labels(&s.label_values).map_err(err)?))
            })
        }
    };
}

/// An opaque counter series (`shm_counter` in the header).
pub struct ShmCounter(Counter);
/// An opaque gauge series (`shm_gauge`).
pub struct ShmGauge(Gauge);
/// An opaque histogram series (`shm_histogram`).
pub struct ShmHistogram(Histogram);
/// An opaque summary series (`shm_summary`).
pub struct ShmSummary(Summary);
/// An opaque info series (`shm_info`).
pub struct ShmInfo(Info);
/// An opaque enum series (`shm_enum`).
pub struct ShmEnum(Enum);

labelled_new!(
    /// Registers (or finds) the counter `name` with `n_labels` label names and returns the handle of
    /// the series with these label values.
    ///
    /// # Safety
    /// As in `include/shmetrics.h`: strings NUL-terminated, arrays of `n_labels` strings, `out` writable.
    shm_counter_new,
    ShmCounter,
    counter_family
);

/// Adds `v` to a counter.
///
/// # Safety
/// `c` is a handle from [`shm_counter_new`], not freed (NULL is ignored).
#[no_mangle]
pub unsafe extern "C" fn shm_counter_inc(c: *const ShmCounter, v: u64) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(c, |h| h.0.inc_by(v)) }
}

/// Frees a counter handle (the series stays; NULL is ignored).
///
/// # Safety
/// `c` is a handle from [`shm_counter_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_counter_free(c: *mut ShmCounter) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(c) }
}

/// Registers (or finds) the gauge `name` merged by `mode` (`sum`, `max`, `min`, `mostrecent`,
/// `all` and their `live` variants) and returns the handle of the series with these label values.
///
/// # Safety
/// As [`shm_counter_new`]; `mode` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_new(
    name: *const c_char,
    help: *const c_char,
    mode: *const c_char,
    label_names: *const *const c_char,
    label_values: *const *const c_char,
    n_labels: usize,
    out: *mut *mut ShmGauge,
) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        let (s, mode) =
            unsafe { (series(name, help, label_names, label_values, n_labels)?, text(mode, "mode")?) };
        let mode = GaugeMode::parse(mode).ok_or_else(|| {
            (
                SHM_ERR_INVALID,
                format!("gauge mode {mode:?}: use sum, max, min, mostrecent, all or live<mode>"),
            )
        })?;
        let family = registry().gauge_family(s.name, s.help, mode, &s.label_names).map_err(err)?;
        put(out, ShmGauge(family.with_labels(&s.label_values).map_err(err)?))
    })
}

/// Sets a gauge.
///
/// # Safety
/// `g` is a handle from [`shm_gauge_new`], not freed (NULL is ignored).
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_set(g: *const ShmGauge, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(g, |h| h.0.set(v)) }
}

/// Adds `v` (negative to subtract) to a gauge.
///
/// # Safety
/// As [`shm_gauge_set`].
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_add(g: *const ShmGauge, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(g, |h| h.0.add(v)) }
}

/// Raises a gauge to `v` if `v` is larger (atomically; uWSGI's `metric_set_max`).
///
/// # Safety
/// As [`shm_gauge_set`].
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_set_max(g: *const ShmGauge, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(g, |h| h.0.set_max(v)) }
}

/// Lowers a gauge to `v` if `v` is smaller (atomically; uWSGI's `metric_set_min`).
///
/// # Safety
/// As [`shm_gauge_set`].
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_set_min(g: *const ShmGauge, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(g, |h| h.0.set_min(v)) }
}

/// Frees a gauge handle (NULL is ignored).
///
/// # Safety
/// `g` is a handle from [`shm_gauge_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_gauge_free(g: *mut ShmGauge) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(g) }
}

/// Registers (or finds) the histogram `name` with `n_buckets` increasing finite upper bounds and
/// returns the handle of the series with these label values.
///
/// # Safety
/// As [`shm_counter_new`]; `buckets` points to `n_buckets` doubles.
#[no_mangle]
pub unsafe extern "C" fn shm_histogram_new(
    name: *const c_char,
    help: *const c_char,
    buckets: *const c_double,
    n_buckets: usize,
    label_names: *const *const c_char,
    label_values: *const *const c_char,
    n_labels: usize,
    out: *mut *mut ShmHistogram,
) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        let s = unsafe { series(name, help, label_names, label_values, n_labels)? };
        let bounds: &[f64] = match (buckets.is_null(), n_buckets) {
            (_, 0) => &[],
            (true, n) => return Err((SHM_ERR_ARGUMENT, format!("buckets is NULL but {n} are expected"))),
            // SAFETY: the caller promises `n_buckets` doubles.
            (false, n) => unsafe { std::slice::from_raw_parts(buckets, n) },
        };
        let family = registry().histogram_family(s.name, s.help, bounds, &s.label_names).map_err(err)?;
        put(out, ShmHistogram(family.with_labels(&s.label_values).map_err(err)?))
    })
}

/// Records one observation.
///
/// # Safety
/// `h` is a handle from [`shm_histogram_new`], not freed (NULL is ignored).
#[no_mangle]
pub unsafe extern "C" fn shm_histogram_observe(h: *const ShmHistogram, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(h, |h| h.0.observe(v)) }
}

/// Frees a histogram handle (NULL is ignored).
///
/// # Safety
/// `h` is a handle from [`shm_histogram_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_histogram_free(h: *mut ShmHistogram) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(h) }
}

labelled_new!(
    /// Registers (or finds) the summary `name` (count and sum of observations, no quantiles) and
    /// returns the handle of the series with these label values.
    ///
    /// # Safety
    /// As [`shm_counter_new`].
    shm_summary_new,
    ShmSummary,
    summary_family
);

/// Records one observation: one more in the count, `v` more in the sum.
///
/// # Safety
/// `s` is a handle from [`shm_summary_new`], not freed (NULL is ignored).
#[no_mangle]
pub unsafe extern "C" fn shm_summary_observe(s: *const ShmSummary, v: c_double) {
    // SAFETY: forwarded from this function's contract.
    unsafe { with(s, |h| h.0.observe(v)) }
}

/// Frees a summary handle (NULL is ignored).
///
/// # Safety
/// `s` is a handle from [`shm_summary_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_summary_free(s: *mut ShmSummary) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(s) }
}

labelled_new!(
    /// Registers (or finds) the info `name` (a trailing `_info` is dropped: the exposition adds it)
    /// and returns the handle of the series with these label values. It shows no sample until set.
    ///
    /// # Safety
    /// As [`shm_counter_new`].
    shm_info_new,
    ShmInfo,
    info_family
);

/// Replaces the info's value with the `n` pairs `keys[i]`=`values[i]`, in this order.
///
/// # Safety
/// `i` is a handle from [`shm_info_new`], not freed (NULL is refused); `keys` and `values` are
/// arrays of `n` NUL-terminated strings (NULL if `n` is 0).
#[no_mangle]
pub unsafe extern "C" fn shm_info_set(
    i: *const ShmInfo,
    keys: *const *const c_char,
    values: *const *const c_char,
    n: usize,
) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        let (h, keys, values) = unsafe { (handle(i)?, texts(keys, n, "keys")?, texts(values, n, "values")?) };
        let pairs: Vec<(&str, &str)> = keys.into_iter().zip(values).collect();
        h.0.set(&pairs).map_err(err)
    })
}

/// Frees an info handle (NULL is ignored).
///
/// # Safety
/// `i` is a handle from [`shm_info_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_info_free(i: *mut ShmInfo) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(i) }
}

/// Registers (or finds) the enum `name` with `n_states` distinct, non-empty states and returns
/// the handle of the series with these label values, in the first state until set.
///
/// # Safety
/// As [`shm_counter_new`]; `states` is an array of `n_states` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn shm_enum_new(
    name: *const c_char,
    help: *const c_char,
    states: *const *const c_char,
    n_states: usize,
    label_names: *const *const c_char,
    label_values: *const *const c_char,
    n_labels: usize,
    out: *mut *mut ShmEnum,
) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        let (s, states) = unsafe {
            (series(name, help, label_names, label_values, n_labels)?, texts(states, n_states, "states")?)
        };
        let family = registry().enum_family(s.name, s.help, &s.label_names, &states).map_err(err)?;
        put(out, ShmEnum(family.with_labels(&s.label_values).map_err(err)?))
    })
}

/// Sets the enum's state by name; `SHM_ERR_INVALID` if it is not one of its states.
///
/// # Safety
/// `e` is a handle from [`shm_enum_new`], not freed (NULL is refused); `state` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn shm_enum_set(e: *const ShmEnum, state: *const c_char) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        let (h, state) = unsafe { (handle(e)?, text(state, "state")?) };
        h.0.set(state).map_err(err)
    })
}

/// Sets the enum's state by its index in the states; `SHM_ERR_INVALID` if out of range.
///
/// # Safety
/// `e` is a handle from [`shm_enum_new`], not freed (NULL is refused).
#[no_mangle]
pub unsafe extern "C" fn shm_enum_set_index(e: *const ShmEnum, i: usize) -> c_int {
    guarded(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { handle(e)? }.0.set_index(i).map_err(err)
    })
}

/// Frees an enum handle (NULL is ignored).
///
/// # Safety
/// `e` is a handle from [`shm_enum_new`], freed once.
#[no_mangle]
pub unsafe extern "C" fn shm_enum_free(e: *mut ShmEnum) {
    // SAFETY: forwarded from this function's contract.
    unsafe { free(e) }
}

/// Declares this process ready (non-zero) or not (0): the aggregator's health check counts it.
#[no_mangle]
pub extern "C" fn shm_set_ready(ready: c_int) {
    let _ = catch_unwind(|| registry().set_ready(ready != 0));
}

/// The message of the last error on this thread (empty if none), valid until the next failing
/// call on this thread.
#[no_mangle]
pub extern "C" fn shm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    fn last() -> String {
        // SAFETY: shm_last_error returns a valid string.
        unsafe { CStr::from_ptr(shm_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn handles_update_and_errors_are_codes_with_messages() {
        let (name, help) = (c("ffi_requests"), c("Requests."));
        let (ln, lv) = ([c("code")], [c("200")]);
        let names = [ln[0].as_ptr()];
        let values = [lv[0].as_ptr()];
        let mut h: *mut ShmCounter = std::ptr::null_mut();
        // SAFETY: valid strings and arrays, writable out.
        let rc = unsafe {
            shm_counter_new(name.as_ptr(), help.as_ptr(), names.as_ptr(), values.as_ptr(), 1, &mut h)
        };
        assert_eq!(rc, SHM_OK);
        unsafe { shm_counter_inc(h, 3) };
        unsafe { shm_counter_inc(h, 4) };
        // SAFETY: h is a live handle.
        assert_eq!(unsafe { &*h }.0.get(), 7);
        unsafe { shm_counter_free(h) };

        // Wrong label count, bad name, NULL, bad mode, conflicting type: codes and messages.
        let mut h2: *mut ShmCounter = std::ptr::null_mut();
        let rc = unsafe {
            shm_counter_new(name.as_ptr(), help.as_ptr(), names.as_ptr(), values.as_ptr(), 0, &mut h2)
        };
        assert_ne!(rc, SHM_OK);
        assert!(h2.is_null());
        let bad = c("1bad");
        let rc = unsafe {
            shm_counter_new(bad.as_ptr(), help.as_ptr(), std::ptr::null(), std::ptr::null(), 0, &mut h2)
        };
        assert_eq!(rc, SHM_ERR_INVALID, "{}", last());
        let rc = unsafe {
            shm_counter_new(std::ptr::null(), help.as_ptr(), std::ptr::null(), std::ptr::null(), 0, &mut h2)
        };
        assert_eq!((rc, last()), (SHM_ERR_ARGUMENT, "name is NULL".to_string()));
        let mut g: *mut ShmGauge = std::ptr::null_mut();
        let mode = c("loudest");
        let rc = unsafe {
            shm_gauge_new(
                c("ffi_g").as_ptr(),
                help.as_ptr(),
                mode.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut g,
            )
        };
        assert_eq!(rc, SHM_ERR_INVALID);
        assert!(last().contains("loudest"), "{}", last());
        let sum = c("sum");
        let rc = unsafe {
            shm_gauge_new(
                name.as_ptr(),
                help.as_ptr(),
                sum.as_ptr(),
                names.as_ptr(),
                values.as_ptr(),
                1,
                &mut g,
            )
        };
        assert_eq!(rc, SHM_ERR_CONFLICT, "{}", last());
        let max = c("max");
        let rc = unsafe {
            shm_gauge_new(
                c("ffi_peak").as_ptr(),
                help.as_ptr(),
                max.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut g,
            )
        };
        assert_eq!(rc, SHM_OK, "{}", last());
        unsafe {
            shm_gauge_set_max(g, 3.0);
            shm_gauge_set_max(g, 1.0);
        }
        assert_eq!(unsafe { &*g }.0.get(), 3.0);
        unsafe {
            shm_gauge_set_min(g, 2.0);
        }
        assert_eq!(unsafe { &*g }.0.get(), 2.0);
        unsafe { shm_gauge_free(g) };

        let mut hist: *mut ShmHistogram = std::ptr::null_mut();
        let b = [0.1, 1.0];
        let rc = unsafe {
            shm_histogram_new(
                c("ffi_h").as_ptr(),
                help.as_ptr(),
                b.as_ptr(),
                2,
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut hist,
            )
        };
        assert_eq!(rc, SHM_OK, "{}", last());
        unsafe { shm_histogram_observe(hist, 0.5) };
        assert_eq!(unsafe { &*hist }.0.get(), (1, 0.5));
        unsafe { shm_histogram_free(hist) };
        // NULL handles are ignored, not dereferenced.
        unsafe {
            shm_counter_inc(std::ptr::null(), 1);
            shm_gauge_set(std::ptr::null(), 1.0);
            shm_counter_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn summary_info_and_enum_handles_and_their_error_codes() {
        let help = c("Help.");
        let (ln, lv) = (c("kind"), c("task"));
        let (names, values) = ([ln.as_ptr()], [lv.as_ptr()]);
        let mut s: *mut ShmSummary = std::ptr::null_mut();
        let name = c("ffi_work_seconds");
        // Registered with one label; again with none is a conflict (names and values always come
        // in equal numbers here, so a wrong count shows as another label set).
        let rc = unsafe {
            shm_summary_new(name.as_ptr(), help.as_ptr(), names.as_ptr(), values.as_ptr(), 1, &mut s)
        };
        assert_eq!(rc, SHM_OK, "{}", last());
        let mut s2: *mut ShmSummary = std::ptr::null_mut();
        let rc = unsafe {
            shm_summary_new(name.as_ptr(), help.as_ptr(), names.as_ptr(), values.as_ptr(), 0, &mut s2)
        };
        assert_eq!((rc, s2.is_null()), (SHM_ERR_CONFLICT, true), "{}", last());
        unsafe {
            shm_summary_observe(s, 0.25);
            shm_summary_observe(s, 0.5);
            shm_summary_observe(std::ptr::null(), 1.0);
        }
        assert_eq!(unsafe { &*s }.0.get(), (2, 0.75));
        unsafe { shm_summary_free(s) };

        let mut i: *mut ShmInfo = std::ptr::null_mut();
        let rc = unsafe {
            shm_info_new(c("ffi_build").as_ptr(), help.as_ptr(), names.as_ptr(), values.as_ptr(), 1, &mut i)
        };
        assert_eq!(rc, SHM_OK, "{}", last());
        let (k, v, bad, kind) = (c("version"), c("1.0"), c("1bad"), c("kind"));
        let rc = unsafe { shm_info_set(i, [k.as_ptr()].as_ptr(), [v.as_ptr()].as_ptr(), 1) };
        assert_eq!(rc, SHM_OK, "{}", last());
        for key in [&bad, &kind] {
            let rc = unsafe { shm_info_set(i, [key.as_ptr()].as_ptr(), [v.as_ptr()].as_ptr(), 1) };
            assert_eq!(rc, SHM_ERR_INVALID, "{}", last());
        }
        assert!(last().contains("kind"), "{}", last());
        let rc = unsafe { shm_info_set(i, std::ptr::null(), [v.as_ptr()].as_ptr(), 1) };
        assert_eq!((rc, last()), (SHM_ERR_ARGUMENT, "keys is NULL but 1 are expected".to_string()));
        let rc = unsafe { shm_info_set(std::ptr::null(), std::ptr::null(), std::ptr::null(), 0) };
        assert_eq!((rc, last()), (SHM_ERR_ARGUMENT, "the handle is NULL".to_string()));
        unsafe { shm_info_free(i) };

        let st = [c("idle"), c("busy")];
        let states = [st[0].as_ptr(), st[1].as_ptr()];
        let mut e: *mut ShmEnum = std::ptr::null_mut();
        let ename = c("ffi_state");
        let rc = unsafe {
            shm_enum_new(
                ename.as_ptr(),
                help.as_ptr(),
                states.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut e,
            )
        };
        assert_eq!((rc, e.is_null()), (SHM_ERR_INVALID, true), "{}", last());
        let rc = unsafe {
            shm_enum_new(
                ename.as_ptr(),
                help.as_ptr(),
                states.as_ptr(),
                2,
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut e,
            )
        };
        assert_eq!(rc, SHM_OK, "{}", last());
        assert_eq!(unsafe { &*e }.0.get(), 0);
        assert_eq!(unsafe { shm_enum_set(e, st[1].as_ptr()) }, SHM_OK);
        assert_eq!(unsafe { &*e }.0.get(), 1);
        assert_eq!(unsafe { shm_enum_set(e, c("lost").as_ptr()) }, SHM_ERR_INVALID);
        assert!(last().contains("lost"), "{}", last());
        assert_eq!(unsafe { shm_enum_set_index(e, 2) }, SHM_ERR_INVALID);
        assert_eq!(unsafe { shm_enum_set(e, std::ptr::null()) }, SHM_ERR_ARGUMENT);
        assert_eq!(unsafe { &*e }.0.get(), 1, "failed calls leave the state");
        assert_eq!(unsafe { shm_enum_set_index(e, 0) }, SHM_OK);
        assert_eq!(unsafe { &*e }.0.get(), 0);
        assert_eq!(unsafe { shm_enum_set_index(std::ptr::null(), 0) }, SHM_ERR_ARGUMENT);
        unsafe {
            shm_enum_free(e);
            shm_enum_free(std::ptr::null_mut());
            shm_info_free(std::ptr::null_mut());
            shm_summary_free(std::ptr::null_mut());
        }
    }
}
