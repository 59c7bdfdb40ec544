//! Training with the fused loss: DistillStep and the MLP kernels under
//! emulation (the demo's claims are in cli/tests/cli/demo.rs).

#[path = "../common/mod.rs"]
mod common;

mod mlp_kernel_emulation;
mod step;
