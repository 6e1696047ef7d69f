//! The `shmetrics` command: the aggregator (`serve`) and the one-command wrapper (`run`).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
