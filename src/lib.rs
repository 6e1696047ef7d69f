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
//!     &shmetrics::DEFAULT_BUCKETS,
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
//! ## Cargo features
//!
//! * `aggregator` (on by default): everything the aggregator needs — reading and merging the
//!   directory, the archive, the encoders, HTTP, the monitor port, alarms — and the `shmetrics`
//!   command, which requires it. A worker that only writes metrics depends on
//!   `shmetrics = { version = "…", default-features = false }`: it then builds the writer alone
//!   ([`Registry`] and its handles), without tokio, hyper, clap, procfs, flate2, toml or
//!   tracing-subscriber. The file format is the same either way.
//!
//! ## The data flow, module by module
//!
#![cfg_attr(
    feature = "aggregator",
    doc = "`layout` (the on-disk format; the crate's `unsafe` code is in `layout::region`, the C ABI `ffi` and one call in `cli`) → \
           `writer` (worker side) and `reader`, `python` (aggregator side) → `merge` (job-wide \
           view) with `archive` (dead workers) → `aggregator` (one directory, followed; `dir` \
           holds its rules) → `job` (owns the aggregator and the only upkeep task, publishes \
           views and exits, shares one merge among concurrent scrapes) → `health`, `report` \
           and `alarm` (pure functions and consumers of views) → `server` (HTTP and the \
           monitor port) → `cli`. `expose` encodes snapshots (Prometheus text, OpenMetrics). \
           Nothing imports a module to its right.\n\n\
           ## The aggregator's API\n\n\
           Besides the writer, the public modules are the aggregator's, for embedding it or \
           testing against it: [`aggregator`] (follow a directory, scrape it: [`aggregator::Aggregator`]), \
           [`expose`] (encode a snapshot), [`alarm`] (alarm configuration and pipeline), \
           [`server`] (the ports' limits) and [`cli`] (the `shmetrics` command). \
           Everything else is private to the crate."
)]
#![cfg_attr(
    not(feature = "aggregator"),
    doc = "[`layout`] (the on-disk format; the crate's `unsafe` code is in `layout::region`) → \
           [`writer`] (worker side). The aggregator's modules come with the `aggregator` feature."
)]
#![deny(missing_docs)]
#![deny(unsafe_code)]

// The writer: all a worker needs, built with or without the `aggregator` feature.
mod error;
pub mod ffi;
pub mod layout;
pub mod writer;

// The aggregator side (feature `aggregator`, on by default), in the order data flows.
#[cfg(feature = "aggregator")]
pub mod aggregator;
#[cfg(feature = "aggregator")]
pub mod alarm;
#[cfg(feature = "aggregator")]
pub(crate) mod archive;
#[cfg(feature = "aggregator")]
pub mod cli;
#[cfg(feature = "aggregator")]
pub(crate) mod client;
#[cfg(feature = "aggregator")]
pub(crate) mod derived;
#[cfg(feature = "aggregator")]
pub(crate) mod dir;
#[cfg(feature = "aggregator")]
pub mod expose;
#[cfg(feature = "aggregator")]
pub(crate) mod health;
#[cfg(feature = "aggregator")]
pub(crate) mod job;
#[cfg(feature = "aggregator")]
pub(crate) mod merge;
#[cfg(feature = "aggregator")]
pub(crate) mod parsed;
#[cfg(feature = "aggregator")]
pub(crate) mod pollsters;
#[cfg(feature = "aggregator")]
pub(crate) mod procs;
#[cfg(feature = "aggregator")]
pub(crate) mod push;
#[cfg(feature = "aggregator")]
pub(crate) mod python;
#[cfg(feature = "aggregator")]
pub(crate) mod reader;
#[cfg(feature = "aggregator")]
pub(crate) mod report;
#[cfg(feature = "aggregator")]
pub(crate) mod samples;
#[cfg(feature = "aggregator")]
pub mod server;
#[cfg(feature = "aggregator")]
pub(crate) mod textdir;
#[cfg(feature = "aggregator")]
pub(crate) mod trust;
#[cfg(feature = "aggregator")]
pub(crate) mod uwsgi_stats;

pub use error::{Error, Result};
pub use layout::GaugeMode;
pub use writer::{
    Counter, CounterF64, Enum, Family, Gauge, Histogram, HistogramTimer, Info, Registry, Summary,
    SummaryTimer, Timer, DEFAULT_BUCKETS,
};
