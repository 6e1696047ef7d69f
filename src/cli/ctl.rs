//! `shmetrics ctl`: send one command to a monitor port and print the reply.
//!
//! The counterpart of ftw.monitor's `bin/instance monitor <cmd> [args]`: it sends
//! `' '.join(args) + '\n'` (default `help`) and prints the reply as received. Its exit status says
//! whether the reply is an OK-type one, so `shmetrics ctl health_check` serves as a container
//! health probe (see [`EXIT_CODES`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit statuses, as `--help` shows them.
const EXIT_CODES: &str = "\
Exit status (so that `shmetrics ctl health_check` serves as a container health probe):
  0  an OK-type reply: health_check said \"OK\"; perf_metrics replied valid JSON;
     set_interval and set_pollsters replied \"OK ...\"; help, monitor, pollsters and other
     commands replied
  1  a negative reply: health_check said anything but \"OK\" (\"Instance is booting\",
     \"Warmup in progress\", \"No live workers\", \"Only N of M required workers are ready\"),
     perf_metrics did not reply JSON, or the reply is an \"Error: …\" line (bad arguments,
     too many connections, set_interval or set_pollsters refused without --allow-control or
     not saved, …)
  2  \"Invalid command …\": the monitor port does not know the command (also: bad usage of ctl)
  3  no reply: connection refused, timed out, or closed without a reply (the message on stderr
     names the address)

Examples:
  shmetrics ctl health_check
  shmetrics ctl --monitor 127.0.0.1:8161 perf_metrics 1
  shmetrics ctl set_pollsters cpu,loadavg,filesystem   # needs serve/run --allow-control
  echo health_check | nc -q 1 127.0.0.1 9181      # the same protocol, without shmetrics";

/// Largest reply read; the rest is ignored.
const MAX_REPLY: u64 = 16 * 1024 * 1024;

/// Arguments of `shmetrics ctl`.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct CtlArgs {
    /// The monitor port to talk to.
    #[arg(long, env = "SHMETRICS_MONITOR", default_value = "127.0.0.1:9181")]
    monitor: SocketAddr,
    /// Seconds allowed for connecting and receiving the whole reply.
    #[arg(long, default_value = "15", value_parser = super::positive_secs)]
    timeout: Duration,
    /// The command and its arguments (default: help), e.g. `health_check`, `perf_metrics 1`,
    /// `monitor`, `pollsters`, `set_interval 30`, `help perf_metrics`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub fn main(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let line = if args.command.iter().all(|a| a.trim().is_empty()) {
        "help".to_string()
    } else {
        args.command.join(" ")
    };
    let timeout = args.timeout;
    let reply = match exchange(args.monitor, &line, timeout) {
        Ok(r) if r.is_empty() => {
            eprintln!(
                "shmetrics ctl: the monitor port at {} closed the connection without a reply",
                args.monitor
            );
            return Ok(ExitCode::from(3));
        }
        Ok(r) => r,
        Err(e) => {
            eprintln!("shmetrics ctl: {e}");
            return Ok(ExitCode::from(3));
        }
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) does not change what the reply says.
    let _ = out.write_all(&reply).and_then(|()| out.flush());
    Ok(ExitCode::from(classify(&line, &reply)))
}

/// Sends `line` + `\n`, half-closes, and reads the reply until EOF.
fn exchange(addr: SocketAddr, line: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            format!("cannot connect to the monitor port at {addr}: timed out after {timeout:?}")
        } else {
            format!(
                "cannot connect to the monitor port at {addr}: {e} (is the aggregator running? \
                 --monitor ADDR sets the address)"
            )
        }
    })?;
    let remaining = |what: &str| {
        timeout.checked_sub(start.elapsed()).filter(|d| !d.is_zero()).ok_or_else(|| {
            format!("no complete reply from the monitor port at {addr} within {timeout:?} ({what})")
        })
    };
    let io_err = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            format!("no complete reply from the monitor port at {addr} within {timeout:?}")
        } else {
            format!("talking to the monitor port at {addr}: {e}")
        }
    };
    stream.set_write_timeout(Some(remaining("sending")?)).map_err(io_err)?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(io_err)?;
    // EOF after the command: the server runs it, replies and closes (also after `interactive`).
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(remaining("reading")?)).map_err(io_err)?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(reply),
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.len() as u64 >= MAX_REPLY {
                    return Ok(reply);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Reset after a complete reply (the server closed with our input unread): keep it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !reply.is_empty() => {
                return Ok(reply)
            }
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// The exit status for `reply` to `line` (see [`EXIT_CODES`]).
fn classify(line: &str, reply: &[u8]) -> u8 {
    let text = String::from_utf8_lossy(reply);
    if text.starts_with("Invalid command ") {
        return 2;
    }
    if text.starts_with("Error:") {
        return 1;
    }
    match line.split_whitespace().next() {
        Some("health_check") => u8::from(text.trim_end() != "OK"),
        Some("perf_metrics") => u8::from(serde_json::from_str::<serde_json::Value>(text.trim()).is_err()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn exit_statuses() {
        assert_eq!(classify("health_check", b"OK\n"), 0);
        assert_eq!(classify("health_check", b"OK\r\n"), 0);
        assert_eq!(classify("health_check", b"Instance is booting\n"), 1);
        assert_eq!(classify("health_check", b"Only 2 of 3 required workers are ready\n"), 1);
        assert_eq!(classify("health_check", b"OKAY\n"), 1);
        assert_eq!(classify("perf_metrics 1", b"{\"instance\":{\"uptime\":1.5}}\n"), 0);
        assert_eq!(classify("perf_metrics 99", b"Error: perf_metrics interval must be...\n"), 1);
        assert_eq!(classify("perf_metrics", b"{\"trunc"), 1);
        assert_eq!(classify("help", b"Supported commands:\n"), 0);
        assert_eq!(classify("monitor", b"aggregator pid 1\n"), 0);
        assert_eq!(classify("nope", b"Invalid command 'nope'\nTry \"help\".\n"), 2);
        assert_eq!(classify("help nope", b"Invalid command 'nope'\nTry \"help\".\n"), 2);
        assert_eq!(classify("health_check", b"Error: too many connections (limit 64)\n"), 1);
        let refused = b"Error: set_interval is refused: the aggregator was not started with \
                        --allow-control (the monitor port has no authentication)\n";
        assert_eq!(classify("set_interval 5", refused), 1);
        assert_eq!(classify("set_interval 0", b"Error: set_interval '0': write a number...\n"), 1);
        let ok = b"OK pollsters cpu interval 5 (pollsters: configuration file; interval: runtime change)\n";
        assert_eq!(classify("set_interval 5", ok), 0);
        assert_eq!(classify("set_pollsters cpu", ok), 0);
        assert_eq!(classify("set_pollsters gpu", b"Error: set_pollsters: unknown pollster \"gpu\"\n"), 1);
        let unsaved = b"Error: interval 5 is in force but not saved (No space left on device)\n";
        assert_eq!(classify("set_interval 5", unsaved), 1);
        assert_eq!(
            classify("pollsters", b"pollsters none interval 10 (pollsters: default; interval: default)\n"),
            0
        );
    }
}
