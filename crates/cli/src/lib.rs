//! The library behind the `attention` command: `.npy` files in and out ([`npy`]),
//! attention on them in row chunks with a progress bar ([`compute`]), and attention
//! heatmaps as PNG ([`heatmap`]).
//!
//! The binary (`src/main.rs`) parses arguments and calls these; the tests use them too
//! (e.g. [`heatmap::Layout`] says where cell `(i, j)` of a heatmap lands).

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;

pub mod compute;
pub mod heatmap;
pub mod npy;

/// A failure the command reports as `error: <message>` before exiting with status 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<attention_core::AttentionError> for Error {
    fn from(e: attention_core::AttentionError) -> Self {
        Error(e.to_string())
    }
}

/// The result of everything that can fail in this crate.
pub type Result<T> = std::result::Result<T, Error>;
