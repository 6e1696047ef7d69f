//! `shmetrics supervisor-listener`: supervisord event listener feeding the alarm pipeline.
//! (Being written.)

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `shmetrics supervisor-listener`.
#[derive(clap::Args, Debug)]
pub struct ListenerArgs {
    /// The alarm configuration (TOML; see conf/shmetrics.toml).
    #[arg(long)]
    config: PathBuf,
}

pub fn main(args: ListenerArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not written yet")
}
