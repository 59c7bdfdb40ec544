//! The teacher cache: a top-k teacher stored once, read by row ranges.
//!
//! A directory of safetensors shards (`shard-00000.safetensors`, …), each
//! holding `indices` (I32 `[rows, k]`), `values` (BF16 or F32 `[rows, k]`)
//! and optionally `lse` (F32 `[rows]`), with the cache's metadata in the
//! shard's `__metadata__`; and an index, `teacher_cache.index.json`, naming
//! the shards in order with their row ranges. [`CacheWriter`] appends whole
//! shards (temporary file, fsync, rename; then the index the same way), so
//! that a crash never leaves a partial shard visible; [`CacheReader`]
//! validates the index against the files and reads any row range.
//! docs/DESIGN.md §10 describes the format.

pub mod format;
pub mod reader;
pub mod writer;

pub use format::{CacheMeta, Index, ShardEntry, ValuesDtype, ValuesKind};
pub use reader::CacheReader;
pub use writer::CacheWriter;

/// A failure to read or write a cache; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The file or directory.
        path: String,
        /// What failed.
        msg: String,
    },
    /// A file's content is not what the format says.
    #[error("{0}")]
    Invalid(String),
}

/// Top-k rows: `indices` and `values` row-major `[rows, k]`, and the rows'
/// log-sum-exp where the cache holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopkRows {
    /// Rows.
    pub rows: usize,
    /// Entries per row.
    pub k: usize,
    /// Vocabulary indices, `[rows, k]`.
    pub indices: Vec<i32>,
    /// Values at the indices (as stored: BF16 values are widened exactly), `[rows, k]`.
    pub values: Vec<f32>,
    /// Log-sum-exp per row, `[rows]`.
    pub lse: Option<Vec<f32>>,
}

fn io_err(path: &std::path::Path, what: &str, e: impl std::fmt::Display) -> CacheError {
    CacheError::Io {
        path: path.display().to_string(),
        msg: format!("{what}: {e}"),
    }
}
