//! Per-row top-k selection (src/topk_select): the oracle on hand-made rows,
//! the CPU backend and the emulated CUDA kernel against the oracle on random
//! sweeps, and the errors.

mod capi;
mod cpu;
mod emulated;
mod oracle;
mod validation;
