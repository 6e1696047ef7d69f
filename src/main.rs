//! The `shmetrics` command: the aggregator (`serve`) and the one-command wrapper (`run`).
//!
//! No `unsafe` here, except in `cli/child.rs` (the parent-death signal set between `fork` and
//! `exec`), which allows it for that one call.
#![deny(unsafe_code)]

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
