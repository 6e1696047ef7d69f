//! Command-line front end. `anyhow` lives here only: the library returns typed errors, the binary
//! turns them into one clear message and an exit status.

mod run;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Job-wide Prometheus metrics for pre-fork servers.
#[derive(Parser, Debug)]
#[command(name = "shmetrics", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Aggregate a multiproc directory and serve /metrics.
    Serve(ServeArgs),
    /// Run a pre-fork server with SHMETRICS_DIR set, serving its metrics while it runs.
    Run(RunArgs),
}

/// Options shared by `serve` and `run`.
#[derive(Args, Debug, Clone)]
struct AggregatorArgs {
    /// Address for /metrics (separate from the application's port).
    #[arg(long, default_value = "127.0.0.1:9180")]
    listen: SocketAddr,
    /// Remove every shmetrics file in the directory at start-up, even those of live workers.
    #[arg(long, conflicts_with = "keep")]
    wipe: bool,
    /// Do not clear an earlier run's files at start-up: read the directory as it is.
    #[arg(long)]
    keep: bool,
    /// Fold dead Python processes' prometheus_client files into the archive and remove them, so the
    /// directory stays bounded under worker churn (gunicorn max_requests).
    #[arg(long)]
    compact_python: bool,
    /// Seconds between directory upkeep passes (folding dead workers) when nobody scrapes.
    #[arg(long, default_value_t = 2.0, value_parser = positive_secs)]
    upkeep_interval: f64,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The multiproc directory the workers write to (created with mode 0700 if missing).
    #[arg(long, env = "SHMETRICS_DIR")]
    dir: PathBuf,
    #[command(flatten)]
    agg: AggregatorArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The multiproc directory; default: a fresh private directory under $XDG_RUNTIME_DIR or /tmp,
    /// removed at exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    agg: AggregatorArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

impl AggregatorArgs {
    fn options(&self) -> shmetrics::aggregator::Options {
        shmetrics::aggregator::Options {
            wipe: self.wipe,
            keep: self.keep,
            compact_python: self.compact_python,
        }
    }

    fn upkeep(&self) -> Duration {
        Duration::from_secs_f64(self.upkeep_interval)
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHMETRICS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(a) => serve::main(a),
        Command::Run(a) => run::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmetrics: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}
