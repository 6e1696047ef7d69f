//! One integration-test binary (as ripgrep does): shared helpers in `util`, one module per area.

mod util;

mod layout_doc;
