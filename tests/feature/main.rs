//! The feature losses (MSE, cosine, attention transfer) on the oracle, the fast CPU backend and the CUDA kernels under emulation.

#[path = "../common/mod.rs"]
mod common;

mod cpu;
mod emulation;
mod oracle;
mod validation;
