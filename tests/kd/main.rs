//! The knowledge-distillation loss (dense and top-k teacher) on the oracle, the fast CPU backend and the CUDA kernels under emulation: one test binary, one module per subject.

#[path = "../common/mod.rs"]
mod common;

mod cpu_vs_oracle;
mod fast_kernels;
mod hostmath;
mod kernel_emulation;
mod loss_family;
mod masked_reference;
mod nan_inf;
mod nan_regressions;
mod oracle_fd;
mod oracle_options;
mod precision_bounds;
mod single_read;
mod single_read_topk;
mod validation;
