//! System pollsters (`[pollsters]`, issue 12) end to end: the real `shmetrics serve` and `run`
//! reading the real `/proc` and `statvfs(2)`, driven through the real `shmetrics ctl`.
//!
//! The multiproc directory is a tmpfs mounted by each test (`size=64m,nr_inodes=1000`), so the
//! `filesystem` pollster's figures are known exactly: `node_filesystem_size_bytes` 67108864 and
//! `node_filesystem_files` 1000. Mounting needs root; without it a test fails, unless
//! `SHMETRICS_TEST_NO_MOUNT=1` says to skip it (it then prints why).

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{self, samples, scrape, spawn_shmetrics, wait_for, Served, Tmpfs};

const LONG: Duration = Duration::from_secs(30);

/// The tmpfs is the multiproc directory itself (mode 0700); the configuration file and logs go
/// next to it, in `root`.
impl Tmpfs {
    /// The standard one: 64 MiB, 1000 inodes.
    fn standard(test: &str) -> Option<Tmpfs> {
        Tmpfs::mount(test, "size=64m,nr_inodes=1000")
    }

    /// The multiproc directory: the tmpfs itself.
    fn dir(&self) -> &Path {
        &self.mnt
    }

    fn config(&self) -> PathBuf {
        self.root.path().join("shmetrics.toml")
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.config(), text).expect("config");
    }

    /// `shmetrics serve --dir MNT --config CONFIG [extra]`.
    fn serve(&self, extra: &[&str]) -> Served {
        let (d, c) = (self.mnt.to_str().expect("utf-8"), self.config());
        let c = c.to_str().expect("utf-8").to_string();
        let mut args = vec!["serve", "--dir", d, "--config", &c, "--upkeep-interval", "0.2"];
        args.extend_from_slice(extra);
        spawn_shmetrics(&args, &[], self.root.path())
    }
}

/// The monitor address from the `monitor port on ADDR` log line.
fn monitor_addr(served: &Served) -> SocketAddr {
    wait_for(LONG, "the `monitor port on` log line", || {
        let log = std::fs::read_to_string(&served.log).ok()?;
        let rest = log.split("monitor port on ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `shmetrics ctl --monitor ADDR ARGS…`: exit status and stdout.
fn ctl(addr: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = Command::new(util::shmetrics_bin())
        .args(["ctl", "--monitor", &addr.to_string()])
        .args(args)
        .output()
        .expect("run shmetrics ctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn log(served: &Served) -> String {
    std::fs::read_to_string(&served.log).unwrap_or_default()
}

/// The samples of `/metrics` whose name (before any `{`) is `name`.
fn family(addr: SocketAddr, name: &str) -> Vec<(String, f64)> {
    samples(&scrape(addr)).into_iter().filter(|(k, _)| k.split('{').next() == Some(name)).collect()
}

/// The one sample of `name` (waiting for it), with its labels.
fn one(addr: SocketAddr, name: &str) -> (String, f64) {
    wait_for(LONG, &format!("{name} in /metrics"), || {
        let f = family(addr, name);
        (f.len() == 1).then(|| f[0].clone())
    })
}

fn sample(addr: SocketAddr, key: &str) -> Option<f64> {
    samples(&scrape(addr)).get(key).copied()
}

/// The labels node_exporter gives the multiproc tmpfs (in the order the reader writes them).
fn fs_labels(t: &Tmpfs) -> String {
    format!("{{device=\"tmpfs\",fstype=\"tmpfs\",mountpoint=\"{}\"}}", t.dir().display())
}

/// `[pollsters]` with `filesystem` on the tmpfs: its exact size and inodes, labelled as
/// node_exporter labels them, next to `node_load1`; and those series feed a threshold rule (its
/// alarm is written by a command action) and a pusher (uWSGI's socket format, to a UDP socket of
/// the test), like any series.
#[test]
fn filesystem_figures_are_exact_and_feed_thresholds_and_pushers() {
    let Some(t) = Tmpfs::standard("filesystem_figures_are_exact_and_feed_thresholds_and_pushers") else {
        return;
    };
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let alarms = t.root.path().join("alarms.txt");
    t.write_config(&format!(
        "check_interval_seconds = 0.5\n\n\
         [actions.file]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> '{a}'; echo >> '{a}'\"]\n\
         timeout_seconds = 5\n\n\
         [[threshold]]\nseries = 'node_filesystem_files{{fstype=\"tmpfs\"}}'\nop = \"<=\"\nvalue = 1000\n\
         rate_seconds = 3600\nmessage = \"{{series}} is {{value}} ({{op}} {{threshold}})\"\nactions = [\"file\"]\n\n\
         [[push]]\ntype = \"socket\"\naddress = \"127.0.0.1:{port}\"\nprefix = \"p\"\nlabels = \"pairs\"\nfreq_seconds = 0.2\n\n\
         [pollsters]\ninterval_seconds = 0.5\nenabled = [\"filesystem\", \"loadavg\"]\n",
        a = alarms.display(),
        port = rx.local_addr().expect("addr").port()
    ));
    let served = t.serve(&[]);
    let labels = fs_labels(&t);
    let (key, size) = one(served.addr, "node_filesystem_size_bytes");
    assert_eq!((key.as_str(), size), (format!("node_filesystem_size_bytes{labels}").as_str(), 67108864.0));
    assert_eq!(one(served.addr, "node_filesystem_files"), (format!("node_filesystem_files{labels}"), 1000.0));
    let load = one(served.addr, "node_load1").1;
    assert!(load >= 0.0, "node_load1 {load}");
    assert_eq!(sample(served.addr, "shmetrics_pollster_errors_total{pollster=\"filesystem\"}"), Some(0.0));
    assert_eq!(sample(served.addr, "shmetrics_pollster_errors_total{pollster=\"loadavg\"}"), Some(0.0));
    // Nothing of the pollsters that are not enabled.
    assert!(family(served.addr, "node_cpu_seconds_total").is_empty());
    assert!(family(served.addr, "node_memory_MemTotal_bytes").is_empty());

    let want = format!("node_filesystem_files{labels} is 1000 (<= 1000)");
    wait_for(LONG, "the threshold alarm on node_filesystem_files", || {
        std::fs::read_to_string(&alarms).ok().filter(|a| a.contains(&want))
    });

    let mut buf = [0u8; 4096];
    let got = wait_for(LONG, "node_filesystem_files pushed", || {
        let n = rx.recv(&mut buf).ok()?;
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        (line.starts_with("p.node_filesystem_files.") && line.contains("tmpfs")).then_some(line)
    });
    assert!(got.ends_with(" 1 1000"), "a gauge of 1000: {got:?}");
}

/// `set_interval` and `set_pollsters` are refused without `--allow-control` (exit 1, the reply
/// names the flag, nothing changes); `pollsters` reads.
#[test]
fn control_is_refused_without_allow_control() {
    let Some(t) = Tmpfs::standard("control_is_refused_without_allow_control") else { return };
    t.write_config("[pollsters]\ninterval_seconds = 3600\nenabled = [\"loadavg\"]\n");
    let served = t.serve(&[]);
    let mon = monitor_addr(&served);
    let line =
        "pollsters loadavg interval 3600 (pollsters: configuration file; interval: configuration file)\n";
    assert_eq!(ctl(mon, &["pollsters"]), (0, line.to_string()));
    for (args, name) in
        [(&["set_interval", "5"][..], "set_interval"), (&["set_pollsters", "cpu"][..], "set_pollsters")]
    {
        assert_eq!(
            ctl(mon, args),
            (
                1,
                format!(
                    "Error: {name} is refused: the aggregator was not started with --allow-control (the \
                     monitor port has no authentication)\n"
                )
            )
        );
    }
    assert_eq!(ctl(mon, &["pollsters"]), (0, line.to_string()));
    assert!(!t.dir().join("pollsters.state.json").exists());
    assert!(family(served.addr, "node_cpu_seconds_total").is_empty());
}

/// With `--allow-control`: the changes are in force at once (a disabled pollster is gone from the
/// next scrape, a new interval does not wait for the old one), bad values are refused with
/// exit 1, and the changes survive a restart of the aggregator (workers alive) and a fresh start
/// of the job (all workers dead), from the state file, which is mode 0600. A corrupt state file
/// is set aside and the configuration file's settings used.
#[test]
fn runtime_changes_take_effect_at_once_and_survive_restarts() {
    use std::os::unix::fs::PermissionsExt;
    let Some(t) = Tmpfs::standard("runtime_changes_take_effect_at_once_and_survive_restarts") else { return };
    t.write_config("[pollsters]\ninterval_seconds = 3600\nenabled = [\"loadavg\"]\n");
    let mut served = t.serve(&["--allow-control"]);
    let mon = monitor_addr(&served);
    one(served.addr, "node_load1");
    // Once an hour: the first poll at start, and no other.
    assert_eq!(sample(served.addr, "shmetrics_pollster_polls_total{pollster=\"loadavg\"}"), Some(1.0));

    assert_eq!(
        ctl(mon, &["set_pollsters", "filesystem"]),
        (0, "OK pollsters filesystem interval 3600 (pollsters: runtime change; interval: configuration file)\n".into())
    );
    // Gone at once; the new one is read at once (not in an hour).
    assert!(family(served.addr, "node_load1").is_empty());
    assert_eq!(one(served.addr, "node_filesystem_files").1, 1000.0);
    assert_eq!(
        ctl(mon, &["set_interval", "0.2"]),
        (
            0,
            "OK pollsters filesystem interval 0.2 (pollsters: runtime change; interval: runtime change)\n"
                .into()
        )
    );
    wait_for(LONG, "polls every 0.2 s", || {
        let n = sample(served.addr, "shmetrics_pollster_polls_total{pollster=\"filesystem\"}")?;
        (n >= 6.0).then_some(())
    });
    // Bad values: refused, nothing changes.
    for (args, want) in [
        (&["set_interval", "0"][..], "Error: set_interval '0': 0 is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)\n"),
        (&["set_interval", "31536001"][..], "Error: set_interval '31536001': 31536001 is not allowed: write a number of seconds more than 0 and at most 31536000 (one year)\n"),
        (&["set_pollsters", "cpu,gpu"][..], "Error: set_pollsters: unknown pollster \"gpu\": the pollsters are cpu, loadavg, meminfo, netdev, diskstats, filesystem\n"),
    ] {
        assert_eq!(ctl(mon, args), (1, want.to_string()), "{args:?}");
    }
    let state = t.dir().join("pollsters.state.json");
    assert_eq!(std::fs::metadata(&state).expect("state file").permissions().mode() & 0o777, 0o600);
    let now = "pollsters filesystem interval 0.2 (pollsters: runtime change; interval: runtime change)\n";
    assert_eq!(ctl(mon, &["pollsters"]), (0, now.to_string()));

    // A restart of the aggregator while a worker lives.
    let wl = util::workload(t.dir(), &["--workers", "1", "--series", "1", "--hold"]);
    drop(served);
    served = t.serve(&["--allow-control"]);
    assert!(log(&served).contains("startup=Restart"), "{}", log(&served));
    assert_eq!(ctl(monitor_addr(&served), &["pollsters"]), (0, now.to_string()));
    assert_eq!(one(served.addr, "node_filesystem_files").1, 1000.0);
    assert!(family(served.addr, "node_load1").is_empty());

    // A fresh start of the job: every worker dead, then the aggregator restarted.
    drop(wl);
    drop(served);
    served = t.serve(&["--allow-control"]);
    assert!(log(&served).contains("startup=Fresh"), "{}", log(&served));
    assert_eq!(ctl(monitor_addr(&served), &["pollsters"]), (0, now.to_string()));
    assert_eq!(one(served.addr, "node_filesystem_files").1, 1000.0);

    // A corrupt state file: set aside, the configuration file's settings in force.
    drop(served);
    std::fs::write(&state, "{\"version\": 1, \"enabled\": 7}").expect("corrupt");
    served = t.serve(&["--allow-control"]);
    let file =
        "pollsters loadavg interval 3600 (pollsters: configuration file; interval: configuration file)\n";
    assert_eq!(ctl(monitor_addr(&served), &["pollsters"]), (0, file.to_string()));
    assert!(log(&served).contains("the pollsters' state file is unusable"), "{}", log(&served));
    let aside: Vec<String> =
        util::ls(t.dir()).into_iter().filter(|n| n.starts_with("pollsters.state.json.corrupt-")).collect();
    assert_eq!(aside.len(), 1, "{:?}", util::ls(t.dir()));
    assert_eq!(
        std::fs::read_to_string(t.dir().join(&aside[0])).expect("aside"),
        "{\"version\": 1, \"enabled\": 7}"
    );
    one(served.addr, "node_load1");
}

/// SIGHUP with the file's `enabled` changed: the file wins for `enabled`, the runtime interval
/// stays (the file did not change `interval_seconds`); the dropped change is gone from the state
/// file, so a restart keeps exactly that.
#[test]
fn a_reload_wins_only_for_the_keys_the_file_changed() {
    let Some(t) = Tmpfs::standard("a_reload_wins_only_for_the_keys_the_file_changed") else { return };
    t.write_config("[pollsters]\ninterval_seconds = 3600\nenabled = [\"loadavg\"]\n");
    let served = t.serve(&["--allow-control"]);
    let mon = monitor_addr(&served);
    assert_eq!(ctl(mon, &["set_interval", "0.5"]).0, 0);
    assert_eq!(ctl(mon, &["set_pollsters", "meminfo"]).0, 0);
    assert_eq!(
        ctl(mon, &["pollsters"]).1,
        "pollsters meminfo interval 0.5 (pollsters: runtime change; interval: runtime change)\n"
    );
    assert!(one(served.addr, "node_memory_MemTotal_bytes").1 > 0.0);

    t.write_config("[pollsters]\ninterval_seconds = 3600\nenabled = [\"filesystem\", \"loadavg\"]\n");
    served.proc.signal(Signal::SIGHUP);
    let now = "pollsters loadavg,filesystem interval 0.5 (pollsters: configuration file; interval: runtime change)\n";
    wait_for(LONG, "the reload", || (ctl(mon, &["pollsters"]).1 == now).then_some(()));
    assert!(family(served.addr, "node_memory_MemTotal_bytes").is_empty());
    assert_eq!(one(served.addr, "node_filesystem_files").1, 1000.0);
    one(served.addr, "node_load1");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.dir().join("pollsters.state.json")).expect("state"))
            .expect("json");
    assert_eq!(
        state,
        serde_json::json!({"version": 1, "interval_seconds": {
            "value": {"secs": 0, "nanos": 500_000_000}, "against": {"secs": 3600, "nanos": 0}}})
    );
    drop(served);
    let served = t.serve(&["--allow-control"]);
    assert_eq!(ctl(monitor_addr(&served), &["pollsters"]).1, now);
}

/// A state file that cannot be written (the tmpfs is full): the change is in force, the reply is
/// an `Error:` saying it is not saved (exit 1), and it is counted.
#[test]
fn a_change_that_cannot_be_saved_is_in_force_and_says_so() {
    let Some(t) = Tmpfs::mount("a_change_that_cannot_be_saved_is_in_force_and_says_so", "size=256k") else {
        return;
    };
    t.write_config("[pollsters]\ninterval_seconds = 3600\nenabled = [\"loadavg\"]\n");
    let served = t.serve(&["--allow-control"]);
    let mon = monitor_addr(&served);
    one(served.addr, "node_load1");
    // Fill the file system.
    let mut filler = std::fs::File::create(t.dir().join("filler")).expect("filler");
    let block = vec![0u8; 4096];
    while filler.write_all(&block).and_then(|()| filler.sync_all()).is_ok() {}
    drop(filler);
    let (code, reply) = ctl(mon, &["set_pollsters", "filesystem"]);
    assert_eq!(code, 1, "{reply}");
    assert!(
        reply.starts_with("Error: pollsters filesystem is in force but not saved (")
            && reply.contains("No space left on device")
            && reply.ends_with(
                "): a restart of the aggregator goes back to the saved settings; now pollsters \
                 filesystem interval 3600 (pollsters: runtime change; interval: configuration file)\n"
            ),
        "{reply}"
    );
    one(served.addr, "node_filesystem_files");
    assert!(family(served.addr, "node_load1").is_empty());
    assert_eq!(sample(served.addr, "shmetrics_pollster_state_write_errors_total"), Some(1.0));
    assert!(!t.dir().join("pollsters.state.json").exists());
    let temps: Vec<String> = util::ls(t.dir()).into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert!(temps.is_empty(), "no temporary left: {temps:?}");
}

/// `shmetrics run` without `--dir` takes the section and the flag too; its replies say that a
/// change is not kept after exit (its private directory is removed).
#[test]
fn run_without_dir_says_changes_are_not_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("shmetrics.toml");
    std::fs::write(&config, "[pollsters]\ninterval_seconds = 3600\nenabled = [\"loadavg\"]\n")
        .expect("config");
    let c = config.to_str().expect("utf-8");
    let served = spawn_shmetrics(
        &["run", "--config", c, "--allow-control", "--", "sleep", "60"],
        &[("XDG_RUNTIME_DIR", tmp.path().to_str().expect("utf-8"))],
        tmp.path(),
    );
    let mon = monitor_addr(&served);
    one(served.addr, "node_load1");
    assert_eq!(
        ctl(mon, &["set_interval", "7"]),
        (
            0,
            "OK pollsters loadavg interval 7 (pollsters: configuration file; interval: runtime change); \
             not kept after exit: shmetrics run without --dir uses a private directory (give it --dir \
             DIR to keep runtime changes across restarts)\n"
                .into()
        )
    );
}
