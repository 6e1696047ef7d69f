//! One integration-test binary (as ripgrep does): shared helpers in `util`, one module per area.

mod util;

mod alarm_actions;
mod alarms;
mod c_abi;
mod demo;
mod derived;
mod dir_rules;
mod formats;
mod full_disk;
mod hostile;
mod http_limits;
mod httpok;
mod layout_doc;
mod monitor;
mod ops;
mod pollsters;
mod processes;
mod push;
mod python_compat;
mod python_package;
mod python_servers;
mod robustness;
mod run_cmd;
mod service;
mod supervisor;
mod text_dir;
mod typed_metrics;
mod uwsgi_stats;
mod workers;
