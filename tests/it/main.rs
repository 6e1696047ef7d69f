//! One integration-test binary (as ripgrep does): shared helpers in `util`, one module per area.

mod util;

mod layout_doc;
mod dir_rules;
mod robustness;
mod workers;
mod run_cmd;
mod formats;
