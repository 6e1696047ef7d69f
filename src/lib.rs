//! # shmetrics — job-wide Prometheus metrics for pre-fork servers
//!
//! A pre-fork server (gunicorn, uWSGI, Unicorn, Puma, or a Rust server that forks) runs one
//! process per worker. Prometheus scrapes one endpoint per job, so each scrape lands on a different
//! worker and sees only that worker's counters. shmetrics fixes that without a push gateway and
//! without slowing the workers down:
//!
//! * each process writes its metrics through this library into its **own fixed-layout, mmap'd
//!   file** in a multiproc directory (`SHMETRICS_DIR`); an update is one atomic instruction on the
//!   mapping — no syscall, no lock, no allocation;
//! * **one aggregator** (`shmetrics serve`, or `shmetrics run -- your-server …`) owns the directory,
//!   merges every file into one job-wide view on each scrape, folds the files of dead workers into
//!   an archive (totals never go backwards, the directory stays bounded), and serves `/metrics` on
//!   its own port.
//!
//! The file format is a public, versioned specification (`shm-layout.md`), so writers in other
//! languages can take part.
//!
//! ## Instrumenting a worker
//!
//! ```
//! use shmetrics::{GaugeMode, Registry};
//!
//! # fn main() -> Result<(), shmetrics::Error> {
//! // The process-wide registry: a file in $SHMETRICS_DIR, or private memory when it is unset
//! // (so the application runs unchanged where nobody aggregates).
//! let reg = Registry::global();
//!
//! let requests = reg.counter_family("http_requests_total", "HTTP requests.", &["method", "code"])?;
//! let latency = reg.histogram_family(
//!     "http_request_duration_seconds",
//!     "Request latency.",
//!     &shmetrics::writer::DEFAULT_BUCKETS,
//!     &["method"],
//! )?;
//! let in_flight = reg.gauge("http_requests_in_flight", "Requests being served.", GaugeMode::LiveSum)?;
//!
//! // Resolve a label set once and keep the handle: updating it is a single atomic operation.
//! let ok = requests.with_labels(&["GET", "200"])?;
//! in_flight.inc();
//! ok.inc();
//! latency.with_labels(&["GET"])?.observe(0.012);
//! in_flight.dec();
//! # Ok(())
//! # }
//! ```
//!
//! Register metrics before or after forking, as you like: a process that forks gets a file of its
//! own for each child automatically (handles taken before the fork keep working in the child, and
//! nothing is counted twice). Declare readiness with [`Registry::set_ready`].
//!
//! Gauges are merged across processes by a [`GaugeMode`]: `sum`, `max`, `min`, `mostrecent`, `all`
//! (one series per process, labelled `pid`), and their `live*` variants, which drop the values of
//! dead processes.
//!
//! Invalid names, wrong label counts and conflicting re-registrations return an [`Error`]. A full
//! file or a full disk never takes the application down: the update is dropped and counted, and the
//! aggregator exposes the count (`shmetrics_dropped_series_total`, `shmetrics_dropped_updates_total`).
//! A forked child that cannot create its file on a full disk writes into its parent's instead (see
//! [`writer`]).
//!
//! ## The data flow, module by module
//!
//! [`layout`] (the on-disk format; the crate's only `unsafe`) → [`writer`] (worker side) and
//! [`reader`] (aggregator side) → [`merge`] (job-wide view) with [`archive`] (dead workers) →
//! [`aggregator`] (one directory, followed; [`dir`] holds its rules) → [`job`] (owns the
//! aggregator and the only upkeep task, publishes views and exits, shares merges among scrapes)
//! → [`health`], [`report`] and [`alarm`] (pure functions and consumers of views) → [`server`]
//! (HTTP and the monitor port). [`expose`] encodes snapshots (Prometheus text, OpenMetrics).
//! Nothing imports a module to its right.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod aggregator;
pub mod alarm;
pub mod archive;
pub mod dir;
pub mod error;
pub mod expose;
pub mod health;
pub mod job;
pub mod layout;
pub mod merge;
pub mod procs;
pub mod python;
pub mod reader;
pub mod report;
pub mod server;
pub mod trust;
pub mod writer;

pub use error::{Error, Result};
pub use layout::GaugeMode;
pub use writer::{Counter, CounterF64, Family, Gauge, Histogram, Registry};
