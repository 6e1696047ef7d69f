//! `shmetrics ctl`: send one command to a monitor port and print the reply. (Being written.)

use std::net::SocketAddr;
use std::process::ExitCode;

/// Arguments of `shmetrics ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The monitor port to talk to.
    #[arg(long, default_value = "127.0.0.1:9181")]
    monitor: SocketAddr,
    /// The command and its arguments (default: help).
    command: Vec<String>,
}

pub fn main(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not written yet")
}
