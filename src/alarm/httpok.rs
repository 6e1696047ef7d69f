//! SKELETON: superlance's httpok: GET a URL on an interval, signal the process when the answer is
//! wrong or late; to be written.

use serde::Deserialize;

/// One `[[httpok]]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpokRule {
    /// The URL to GET (http://).
    pub url: String,
}
