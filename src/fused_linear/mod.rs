//! Fused linear + distillation loss: the student's (and the teacher's)
//! logits are never materialised for the whole batch.
//!
//! For each chunk of rows the logits chunk is a GEMM of the hidden states by
//! the head (fp32 accumulation), the fused loss and gradient run on that
//! chunk through any [`Backend`](crate::Backend) (the CPU backend, the oracle, the emulated
//! kernels), and the chunk's logit gradient `G` is folded at once into
//! `∂L/∂hidden = G·W`, `∂L/∂W += Gᵀ·h` and `∂L/∂b += Σ_rows G`. Peak extra
//! memory is O(chunk × V), not O(N × V) (docs/DESIGN.md §11).
//!
//! The reduction's weight (1/valid rows for batchmean, …) is that of the
//! whole batch, not of a chunk: every chunk runs with reduction `sum` and the
//! batch weight folded into its gradient scale, so the result equals the
//! loss of the materialised logits whatever the chunking.
//!
//! ```no_run
//! use kdfuse::fused_linear::{self, Chunking, Linear, LinearInputs, LinearSpec, LinearTeacher, Matrix};
//! use kdfuse::{CpuBackend, HostData, LossSpec};
//! let (n, h, v) = (8, 64, 1000);
//! let (hs, ws) = (vec![0.1f32; n * h], vec![0.01f32; v * h]);
//! let t = vec![0.2f32; n * v];
//! let inputs = LinearInputs {
//!     student: Linear::new(Matrix::new(HostData::F32(&hs), n, h), Matrix::new(HostData::F32(&ws), v, h), None),
//!     teacher: LinearTeacher::Logits(kdfuse::tensor::Logits::new(HostData::F32(&t), n, v)),
//!     labels: None,
//!     row_weights: None,
//! };
//! let spec = LinearSpec { chunking: Chunking::Rows(3), ..Default::default() };
//! let out = fused_linear::compute(&CpuBackend, &inputs, &spec)?;
//! println!("loss {} ∂L/∂W[0] {}", out.loss, out.student.unwrap().weight[0]);
//! # Ok::<(), kdfuse::KdError>(())
//! ```

mod cuda;
mod device;
#[cfg(feature = "emulation")]
mod emu;
mod gemm;
mod host;
mod inputs;

pub use cuda::{compute_cuda, compute_cuda_raw};
pub use device::{
    check_raw, device_bytes_per_row, device_chunk_rows, RawHead, RawHeadGrads, RawLinearArgs,
    RawTeacher,
};
#[cfg(feature = "emulation")]
pub use emu::compute_emulated;
pub use host::compute;
pub use inputs::{Linear, LinearInputs, LinearTeacher, Matrix};

use crate::error::{invalid, Result};
use crate::spec::LossSpec;

/// The default budget for the per-chunk buffers: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 1 << 30;

/// How many rows a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Exactly this many rows per chunk (the last one shorter), ≥ 1.
    Rows(usize),
    /// As many rows as fit in this many bytes of per-chunk buffers (the
    /// logits chunks, their widened copies and the logit gradients:
    /// [`bytes_per_row`]); at least one row must fit.
    MemoryBudget(usize),
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking::MemoryBudget(DEFAULT_MEMORY_BUDGET)
    }
}

/// What to compute.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    /// The loss, as for logits. `grad_teacher` asks for the teacher's
    /// gradients too (mutual learning; a dense teacher only): without it
    /// the teacher head never gets a gradient.
    pub loss: LossSpec,
    /// The chunk size.
    pub chunking: Chunking,
    /// Compute the gradients (`false`: the loss only).
    pub grads: bool,
}

impl Default for LinearSpec {
    fn default() -> Self {
        LinearSpec {
            loss: LossSpec::default(),
            chunking: Chunking::default(),
            grads: true,
        }
    }
}

/// Gradients of one linear head: `∂L/∂hidden` `[N, H]`, `∂L/∂W` `[V, H]`
/// and `∂L/∂b` `[V]` (when the head has a bias), row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads {
    /// `∂L/∂hidden`, `[N, H]`.
    pub hidden: Vec<f32>,
    /// `∂L/∂W`, `[V, H]` (a wider teacher head: `[V_t, H_t]`, rows ≥ V zero).
    pub weight: Vec<f32>,
    /// `∂L/∂b`, `[V]`, when the head has a bias.
    pub bias: Option<Vec<f32>>,
}

/// The teacher's gradients (mutual learning).
#[derive(Debug, Clone, PartialEq)]
pub enum TeacherGrads {
    /// A teacher given as hidden states and a head.
    Linear(LinearGrads),
    /// A teacher given as logits: `∂L/∂teacher` `[N, V]` dense.
    Logits(Vec<f32>),
}

/// The result of [`compute`].
#[derive(Debug, Clone, PartialEq)]
pub struct LinearOutput {
    /// The reduced loss (for `Reduction::None`, the sum of the rows).
    pub loss: f64,
    /// Per-row losses ℓ times the row weights (ignored rows 0), before the
    /// reduction's weight.
    pub row_losses: Vec<f64>,
    /// Rows that counted.
    pub valid_rows: usize,
    /// The rows per chunk used.
    pub chunk_rows: usize,
    /// The student's gradients, when asked for.
    pub student: Option<LinearGrads>,
    /// The teacher's gradients, with `loss.grad_teacher`.
    pub teacher: Option<TeacherGrads>,
    /// The device path's ([`compute_cuda`], and `compute_emulated` which
    /// counts alike) peak device memory of the call, in bytes: the sum of
    /// every allocation of the device chunk loop (uploaded inputs, outputs
    /// and gradients, chunk buffers; each at least 16 bytes, as allocated).
    /// All of them live until the call ends, so the sum is the peak. It is
    /// what the call asked of the stream-ordered allocator, whose pool may
    /// hold more; cuBLAS workspaces and the kernels' modules are not
    /// counted. `None` on the host path ([`compute`]).
    pub device_peak_bytes: Option<usize>,
}

/// Bytes of per-chunk buffers one row takes: the student's logits (f32 GEMM
/// output, plus a rounded copy for bf16/f16 operands), the teacher's when
/// it is a linear head, and the f32 logit gradients (student, and teacher
/// with `grad_teacher`). Inputs and the weight gradients are not counted.
pub fn bytes_per_row(inputs: &LinearInputs, spec: &LinearSpec) -> usize {
    let v = inputs.student.weight.rows;
    let dtype = inputs.student.hidden.data.dtype();
    let logits = v * 4
        + if dtype.size() < 4 {
            v * dtype.size()
        } else {
            0
        };
    let teacher = match inputs.teacher {
        LinearTeacher::Linear(_) => logits,
        LinearTeacher::Logits(_) | LinearTeacher::Topk(_) => 0,
    };
    let grads = if spec.grads {
        v * 4 * (1 + usize::from(spec.loss.grad_teacher))
    } else {
        0
    };
    logits + teacher + grads
}

/// The rows per chunk `spec.chunking` gives for `inputs` (at least 1, at
/// most N; 1 for an empty batch).
pub fn chunk_rows(inputs: &LinearInputs, spec: &LinearSpec) -> Result<usize> {
    let n = inputs.student.hidden.rows;
    let rows = match spec.chunking {
        Chunking::Rows(0) => return invalid("chunk_rows", "must be ≥ 1, got 0"),
        Chunking::Rows(r) => r,
        Chunking::MemoryBudget(budget) => {
            let per_row = bytes_per_row(inputs, spec).max(1);
            if budget < per_row {
                return invalid(
                    "memory_budget",
                    format!(
                        "{budget} bytes do not hold one row of chunk buffers ({per_row} bytes at V = {})",
                        inputs.student.weight.rows
                    ),
                );
            }
            budget / per_row
        }
    };
    Ok(rows.min(n).max(1))
}
