//! `shmetrics dump`: aggregate a directory once and print it. (Being written.)

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `shmetrics dump`.
#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// The multiproc directory.
    #[arg(long, env = "SHMETRICS_DIR")]
    dir: PathBuf,
}

pub fn main(args: DumpArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not written yet")
}
