//! Command-line front end. `anyhow` lives here only: the library returns typed errors, the binary
//! turns them into one clear message and an exit status. [`main`] is the `shmetrics` binary.

mod child;
mod ctl;
mod dump;
mod leftover;
mod listener;
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
    /// Send one command to a monitor port and print the reply (exit 0 for OK-type replies).
    Ctl(ctl::CtlArgs),
    /// Aggregate a directory once and print it (cron, Telegraf's exec input); no server, no lock.
    Dump(dump::DumpArgs),
    /// A supervisord event listener (crashmail / fatalmailbatch drop-in) feeding the alarm
    /// actions of --config. Nothing but the listener protocol goes to stdout.
    SupervisorListener(listener::ListenerArgs),
}

/// Options shared by `serve` and `run`.
#[derive(Args, Debug, Clone)]
struct AggregatorArgs {
    /// Address for /metrics, /healthz and /perf_metrics (separate from the application's port).
    /// Default 127.0.0.1:9180, or the instance port + 80.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the monitor port (zc.monitor line protocol: health_check, perf_metrics, …).
    /// Default: the metrics port + 1 (127.0.0.1:9181, or the instance port + 81).
    #[arg(long)]
    monitor: Option<SocketAddr>,
    /// The application's HTTP port: derive the metrics port (+80) and the monitor port (+81)
    /// from it, as ftw.monitor does.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=65454))]
    instance_port: Option<u16>,
    /// Ready workers needed for the health check to say OK.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Configuration file (TOML; see conf/shmetrics.toml): alarms, derived metrics ([[metric]]),
    /// stats pushers ([[push]]), uWSGI stats servers ([[uwsgi_stats]]), system pollsters
    /// ([pollsters]), URL checks ([[httpok]]). Reloaded on SIGHUP; a bad file is refused and the
    /// configuration in force kept.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep one file per merged series in DIR, holding its current value, refreshed every second
    /// (uWSGI's --metrics-dir; file names in the README).
    #[arg(long, value_name = "DIR")]
    text_dir: Option<PathBuf>,
    /// On a fresh start of the job (no live worker), counters, histograms and summaries continue
    /// from the previous run's totals instead of starting at 0 (uWSGI's --metrics-dir-restore).
    #[arg(long, conflicts_with = "wipe")]
    restore: bool,
    /// URL to GET once at start (retried until it answers 2xx); health says "Warmup in progress"
    /// until then. Disabled by SHMETRICS_AUTOWARMUP=0.
    #[arg(long)]
    warmup_url: Option<String>,
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
    /// Accept a directory owned by another user or writable by group or others (deliberately shared
    /// between users, e.g. containers running as different uids). Files in it are still used only
    /// if they belong to this user or to the directory's owner.
    #[arg(long)]
    shared_dir: bool,
    /// Process metrics in /metrics: `all` (the job's totals, shmetrics_job_*, and one process_*
    /// series per pid), `job` (totals only: no series come and go with worker pids), `none`.
    #[arg(long, value_enum, default_value_t = ProcessMetricsArg::All)]
    process_metrics: ProcessMetricsArg,
    /// Accept the monitor port's commands that change settings (`set_interval`, `set_pollsters`).
    /// The monitor port has no authentication: without this flag, anyone who can connect to it
    /// can only read.
    #[arg(long)]
    allow_control: bool,
    /// Seconds between upkeep passes: folding dead workers' files, and the view of the job
    /// (workers, readiness, memory, CPU) that health checks, perf_metrics, monitor and alarms
    /// read.
    #[arg(long, default_value = "1", value_parser = positive_secs)]
    upkeep_interval: Duration,
    /// Not an option: set by `run` when it uses a private directory removed at exit (runtime
    /// changes cannot outlive it; the monitor port's replies say so).
    #[arg(skip)]
    private_dir: bool,
}

/// `--process-metrics`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ProcessMetricsArg {
    All,
    Job,
    None,
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

/// A number of seconds, more than 0 and at most a year (`1e20` or `inf` would panic in
/// `Duration::from_secs_f64`).
fn positive_secs(s: &str) -> Result<Duration, String> {
    crate::alarm::config::Seconds::parse_positive(s)
}

impl AggregatorArgs {
    fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| local(self.instance_port.map_or(9180, |p| p + 80)))
    }

    /// The monitor address: given, or the metrics port + 1 (so the instance port + 81), or an
    /// ephemeral port when the metrics port is ephemeral.
    fn monitor(&self) -> SocketAddr {
        self.monitor.unwrap_or_else(|| {
            let http = self.listen();
            let port = if http.port() == 0 { 0 } else { http.port().saturating_add(1) };
            SocketAddr::new(http.ip(), port)
        })
    }

    fn health(&self) -> crate::health::HealthConfig {
        let warmup_url = self.warmup_url.clone().filter(|_| !crate::server::warmup::disabled_by_env());
        crate::health::HealthConfig { min_workers: self.min_workers, warmup_url }
    }

    fn options(&self) -> crate::aggregator::Options {
        crate::aggregator::Options {
            read_only: false,
            wipe: self.wipe,
            keep: self.keep,
            compact_python: self.compact_python,
            shared_dir: self.shared_dir,
            restore: self.restore,
        }
    }

    fn upkeep(&self) -> Duration {
        self.upkeep_interval
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
        Command::Ctl(a) => ctl::main(a),
        Command::Dump(a) => dump::main(a),
        Command::SupervisorListener(a) => listener::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmetrics: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The servers of a running aggregator: HTTP, the monitor port, upkeep and warmup.
struct Servers {
    /// Where /metrics is served (the bound address, also when the port was 0).
    http_addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    job: std::sync::Arc<crate::job::Job>,
    alarms: Option<std::sync::Arc<crate::alarm::Pipeline>>,
    pushers: std::sync::Arc<crate::push::Pushers>,
    uwsgi: std::sync::Arc<crate::uwsgi_stats::Pollers>,
    httpok: std::sync::Arc<crate::alarm::httpok::Checkers>,
    pollsters: std::sync::Arc<crate::pollsters::Pollsters>,
    config: Option<PathBuf>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Servers {
    /// Binds both ports (a clear error if one is taken) and starts everything. `child`: under
    /// `shmetrics run`, the handle `run` fills with its command's pid (httpok's signal target).
    async fn start(
        agg: crate::aggregator::Aggregator,
        args: &AggregatorArgs,
        child: Option<std::sync::Arc<crate::alarm::httpok::ChildPid>>,
    ) -> anyhow::Result<Servers> {
        use anyhow::Context;
        // Checked (and locked) before anything is served: a hostile --text-dir is refused at start.
        let text_dir =
            args.text_dir.as_deref().map(|d| crate::textdir::TextDir::open(d, agg.dir())).transpose()?;
        let (http_addr, mon_addr) = (args.listen(), args.monitor());
        let http = listen(http_addr).with_context(|| {
            format!("cannot listen on {http_addr} (use --listen to pick another address)")
        })?;
        let mon = listen(mon_addr).with_context(|| {
            format!("cannot listen on {mon_addr} (use --monitor to pick another address)")
        })?;
        let config = args.config.as_deref().map(crate::alarm::AlarmConfig::load).transpose()?;
        if let (Some(c), Some(path)) = (&config, &args.config) {
            crate::alarm::httpok::check_targets(&c.httpok, child.is_some())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let (dir, trust) = (agg.dir().to_path_buf(), agg.trust());
        let job = crate::job::Job::new(agg, args.upkeep());
        let sections = config.clone().unwrap_or_default();
        job.set_derived(sections.metric.clone());
        let pushers = crate::push::Pushers::start(&job, &sections.push);
        let uwsgi = crate::uwsgi_stats::Pollers::start(&job, &sections.uwsgi_stats);
        let spec = sections.pollsters.as_ref();
        let pollsters = crate::pollsters::Pollsters::start(&job, &dir, &trust, spec, args.private_dir);
        let control = crate::server::Control { pollsters: pollsters.clone(), allow: args.allow_control };
        let alarms = config.map(crate::alarm::Pipeline::start);
        let httpok = crate::alarm::httpok::Checkers::start(&job, alarms.clone(), child, &sections.httpok)
            .map_err(anyhow::Error::msg)?;
        let process_metrics = match args.process_metrics {
            ProcessMetricsArg::All => crate::report::ProcessMetrics::All,
            ProcessMetricsArg::Job => crate::report::ProcessMetrics::Job,
            ProcessMetricsArg::None => crate::report::ProcessMetrics::None,
        };
        let state = crate::server::State::new(
            job.clone(),
            args.health(),
            process_metrics,
            alarms.clone(),
            Some(control),
        );
        let (stop, rx) = tokio::sync::watch::channel(false);
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (http_addr, monitor_addr) = (http.local_addr()?, mon.local_addr()?);
        tracing::info!("monitor port on {monitor_addr}");
        let tasks = vec![
            tokio::spawn(crate::server::http::serve(http, state.clone(), until(rx.clone()))),
            tokio::spawn(crate::server::monitor::serve(mon, state.clone(), until(rx))),
        ];
        let mut background =
            vec![tokio::spawn(job.clone().run_upkeep()), tokio::spawn(state.clone().run_warmup())];
        if let Some(p) = &alarms {
            background.push(tokio::spawn(crate::alarm::rules::run(job.clone(), p.clone())));
        }
        if let Some(dir) = text_dir {
            background.push(tokio::spawn(crate::textdir::run(job.clone(), dir)));
        }
        let config = args.config.clone();
        Ok(Servers {
            http_addr,
            stop,
            job,
            tasks,
            background,
            alarms,
            pushers,
            uwsgi,
            httpok,
            pollsters,
            config,
        })
    }

    /// Reloads the configuration file (SIGHUP). A bad file is refused with an error in the log,
    /// and the configuration in force is kept; rule state, pending alarms, derived metrics'
    /// values and pushers' deltas are kept either way.
    fn reload(&self) {
        let (Some(p), Some(path)) = (&self.alarms, &self.config) else { return };
        match crate::alarm::AlarmConfig::load(path) {
            Ok(c) => {
                // Checked before anything changes: a rule without a target refuses the whole file.
                if let Err(e) = self.httpok.check(&c.httpok) {
                    tracing::error!("{}: {e}; keeping the configuration in force", path.display());
                    return;
                }
                self.job.set_derived(c.metric.clone());
                if let Err(e) = self.httpok.reload(&c.httpok) {
                    tracing::error!("{}: {e}", path.display());
                }
                self.pushers.reload(&c.push);
                self.uwsgi.reload(&c.uwsgi_stats);
                self.pollsters.reload(c.pollsters.as_ref());
                p.reload(c);
                tracing::info!(config = %path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!("{e}; keeping the configuration in force"),
        }
    }

    /// Stops accepting, lets in-flight requests finish, stops background work.
    async fn shutdown(self) {
        if let Some(p) = &self.alarms {
            // Deliver what is batched, but do not hang shutdown on a stuck action.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), p.flush()).await;
        }
        // The last values go out before we exit (bounded: a receiver that is down does not hang us).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.pushers.shutdown()).await;
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for t in self.background {
            t.abort();
        }
        // What only the in-memory archive holds goes to disk before we exit.
        self.job.flush();
    }
}

/// Length of the listen queues. A burst of connections (a flood, or many clients at once) waits
/// there for `accept` instead of having its handshakes dropped, which makes clients (a load
/// balancer's health check among them) retry only a second later. std, mio and so tokio use 128;
/// the kernel caps it at `net.core.somaxconn` (4096 by default).
const BACKLOG: u32 = 1024;

/// A listening socket on `addr` with a [`BACKLOG`]-long queue.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std and tokio's `bind` do: a restarted aggregator can rebind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises the soft limit on open files to the hard limit. Both ports hold a descriptor per
/// connection (up to `monitor::MAX_CONNECTIONS` + `http::MAX_CONNECTIONS`, plus those being told
/// "too many"), besides one per worker file: with the usual soft limit of 1024, a flood of
/// connections would make `accept` fail, and refuse health checks with it. Children started
/// before this keep the limit they inherited (`run` calls it after starting its command).
fn raise_open_files_limit() {
    use crate::server::{http, monitor};
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Both ports full, plus worker files, listeners, logs and pipes.
    let wanted = (monitor::MAX_CONNECTIONS
        + monitor::MAX_REJECTING
        + http::MAX_CONNECTIONS
        + http::MAX_REJECTING
        + 1024) as u64;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot read the open-files limit (RLIMIT_NOFILE): {e}");
            return;
        }
    };
    let mut now = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => now = hard,
            Err(e) => tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}"),
        }
    }
    if now < wanted {
        tracing::warn!(
            "the open-files limit (RLIMIT_NOFILE) is {now}, below the {wanted} a flood of connections \
             may need; raise the hard limit (`ulimit -Hn`, systemd `LimitNOFILE=`, supervisord `minfds`)"
        );
    } else {
        tracing::debug!("open-files limit {now}");
    }
}

/// Threads of tokio's blocking pool (scrapes, health checks, /proc reads, DNS). Everything there
/// takes the one aggregator lock or is short, so more threads add no throughput; tokio's default
/// (512) let a burst of scrapes start hundreds of threads, each with its own malloc arena, and
/// the memory stayed resident after the burst.
const BLOCKING_THREADS: usize = 8;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()?)
}
