//! Where page bytes come from.
//!
//! # Design
//!
//! The serve loop asks a [`PageSource`] for bytes in two steps, so that a
//! slow source never holds up the reading of events:
//!
//! 1. [`PageSource::try_get`], on the serve loop: the bytes, if they can be
//!    had now without waiting on storage.
//! 2. Otherwise [`PageSource::fetch`], on a fetch worker: wait for storage
//!    until the bytes can be had; the fault is then answered by the serve
//!    loop with another `try_get`.
//!
//! Only the serve loop installs pages, so the choice of bytes for a page
//! and its install can never straddle a REMOVE of that page: the loop
//! applies every REMOVE it reads before it decides the next install.

pub mod file;

pub use file::FileSource;

/// A failed fetch, named after the source's operation.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The range is outside the source.
    #[error("range {offset:#x}+{len:#x} is outside the source ({source_len:#x} bytes)")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The source's length.
        source_len: u64,
    },
    /// Reading storage failed.
    #[error("reading {len:#x} bytes at {offset:#x} of {what} failed")]
    Read {
        /// What was read (a path, an object key).
        what: String,
        /// First byte.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The storage's answer.
        source: std::io::Error,
    },
}

/// The bytes of a snapshot's memory file.
pub trait PageSource: Send + Sync {
    /// Length of the memory file in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of `[offset, offset+len)`, if they are available without
    /// waiting on storage. Must not block; called on the serve loop.
    fn try_get(&self, offset: u64, len: usize) -> Option<&[u8]>;

    /// Waits until `[offset, offset+len)` is available, so that a
    /// following `try_get` is likely to succeed. Called on a fetch worker;
    /// may block for as long as storage takes.
    fn fetch(&self, offset: u64, len: usize) -> Result<(), SourceError>;

    /// A short name for logs: a path, a URL.
    fn describe(&self) -> String;
}
