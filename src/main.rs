//! The `shmetrics` command: the aggregator (`serve`) and the one-command wrapper (`run`).
//!
//! The commands live in the library ([`shmetrics::cli`]), so that everything they use can stay
//! private to it.
#![deny(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    shmetrics::cli::main()
}
