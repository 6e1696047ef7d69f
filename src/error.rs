//! The library's one error type.
//!
//! Every message says what was wrong and what to do about it, because most of them end up in an
//! operator's log, not in front of the programmer who wrote the call.

use std::path::PathBuf;

/// Errors returned by the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A metric name does not match `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    #[error("invalid metric name {0:?}: names must match [a-zA-Z_:][a-zA-Z0-9_:]*")]
    InvalidName(String),
    /// A label name is malformed, reserved (`__*`, `le` on histograms, `pid` on per-process
    /// gauges) or repeated.
    #[error(
        "invalid label name in {0}: label names must match [a-zA-Z_][a-zA-Z0-9_]*, must not start \
         with __, must be unique, and `le` (histograms), `pid` (gauges in mode all/liveall) and the \
         metric's own name (enums) are reserved; info keys must not repeat the metric's label names"
    )]
    InvalidLabelName(String),
    /// A label value is too long (over 64 KiB).
    #[error("label value for {0} is longer than 64 KiB")]
    InvalidLabelValue(String),
    /// A value a handle was given, or a definition's states, is not allowed (an enum state that is
    /// not one of its states, an index out of range, states that are empty or repeated).
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// Histogram bucket bounds are not finite and strictly increasing.
    #[error("invalid histogram buckets for {0}")]
    InvalidBuckets(String),
    /// `with_labels` got the wrong number of values.
    #[error("{metric} has {expected} label(s) but {got} value(s) were given")]
    LabelCount {
        /// Metric name.
        metric: String,
        /// Number of label names the metric was registered with.
        expected: usize,
        /// Number of values passed.
        got: usize,
    },
    /// A name was registered again with another type, labels, buckets or gauge mode.
    #[error(
        "metric {name} is already registered as {existing}; it cannot be registered again as \
         {requested} — use one definition per name"
    )]
    Conflict {
        /// Metric name.
        name: String,
        /// The first registration.
        existing: String,
        /// The conflicting one.
        requested: String,
    },
    /// A file's bytes break the format.
    #[error("corrupt shmetrics file: {0}")]
    Corrupt(String),
    /// A file in the directory is not a shmetrics file.
    #[error("not a shmetrics file (bad magic)")]
    Foreign,
    /// A file of a format version this build cannot read.
    #[error("shmetrics file format version {0}; this build reads version 1 — upgrade the aggregator")]
    Version(u32),
    /// A configuration file is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// An I/O error on a path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A directory or file the aggregator must not trust (another user's, writable by others, a
    /// link or a special file where a regular file belongs).
    #[error("{}: {why}; {fix}", path.display())]
    Untrusted {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
        /// What the operator can do.
        fix: String,
    },
    /// Another aggregator holds the directory's lock.
    #[error(
        "{} is already served by another shmetrics aggregator ({holder}); stop it first, or give \
         this one another --dir",
        dir.display()
    )]
    Locked {
        /// The multiproc directory.
        dir: PathBuf,
        /// Who holds it, as written in the lock file.
        holder: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
