//! Training with the fused loss: DistillStep, the MLP kernels under emulation and the demo's claims.

#[path = "../common/mod.rs"]
mod common;

mod demo;
mod mlp_kernel_emulation;
mod step;
