//! Vocab-parallel distillation (src/vocab_parallel): the split-phase
//! protocol over 1–5 shards in one process, against the f64 oracle on the
//! unsharded rows, and its errors.

mod emulated;
mod fixtures;
mod sharded;
mod validation;
