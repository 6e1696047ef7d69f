//! placeholder
pub mod aggregator;
pub mod archive;
pub mod dir;
pub mod error;
pub mod expose;
pub mod layout;
pub mod merge;
pub mod reader;
pub mod serve;
pub mod writer;
pub use error::{Error, Result};
