//! placeholder
pub mod error;
pub mod layout;
pub mod writer;
pub use error::{Error, Result};
