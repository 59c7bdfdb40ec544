//! The eager baseline on the device (kernels/app/eager.cu): the fused call's loss
//! and gradient computed as an unfused framework does, one kernel per
//! operation with fp32 `[N, V]` intermediates. For `kdfuse bench` only.

use super::args::{EagerBackArgs, EagerEwArgs, EagerLsmArgs, EagerRowLossArgs};
use super::kernels::{EagerOp, EagerTyped, Kernel};
use super::launch::{io, RawFusedArgs};
use super::CudaBackend;
use crate::error::{invalid, Result};
use crate::params::KernelParams;
use crate::spec::{KernelDivergence, LossSpec};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The eager baseline's fp32 intermediates for one `[N, V]` batch.
pub struct EagerScratch {
    /// log_softmax(s/τ).
    pub ls: CudaSlice<f32>,
    /// log_softmax(t/τ).
    pub lt: CudaSlice<f32>,
    /// Elementwise terms, then the backward's ∂D/∂ls.
    pub terms: CudaSlice<f32>,
    /// JSD's log-mixture (1 element otherwise).
    pub log_mix: CudaSlice<f32>,
    /// log_softmax(s) for the hard-label term (1 element when α = 0).
    pub ls1: CudaSlice<f32>,
    elements: usize,
}

impl EagerScratch {
    /// Bytes the intermediates of an `[rows, cols]` batch take.
    pub fn bytes_needed(rows: usize, cols: usize, spec: &LossSpec) -> usize {
        let nv = rows * cols;
        let mut buffers = 3;
        if matches!(spec.kernel_divergence(), KernelDivergence::Jsd(_)) {
            buffers += 1;
        }
        if spec.alpha > 0.0 {
            buffers += 1;
        }
        buffers * nv * 4
    }

    /// Allocates the intermediates for `[rows, cols]` and `spec` on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        rows: usize,
        cols: usize,
        spec: &LossSpec,
    ) -> Result<Self> {
        let nv = (rows * cols).max(1);
        let jsd = matches!(spec.kernel_divergence(), KernelDivergence::Jsd(_));
        // SAFETY: every element is written by a kernel before it is read.
        unsafe {
            Ok(EagerScratch {
                ls: stream.alloc(nv)?,
                lt: stream.alloc(nv)?,
                terms: stream.alloc(nv)?,
                log_mix: stream.alloc(if jsd { nv } else { 1 })?,
                ls1: stream.alloc(if spec.alpha > 0.0 { nv } else { 1 })?,
                elements: rows * cols,
            })
        }
    }
}

fn elementwise(count: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (count.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Enqueues the eager baseline for the same call as
    /// [`CudaBackend::launch_raw`]: reads `raw`'s inputs, writes its gradient
    /// (when `raw.grad` ≠ 0), per-row losses and loss, using `scratch`.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_raw`]; `scratch` must be allocated for at
    /// least `raw.layout`'s rows × cols and this spec, and not in use by
    /// another stream.
    pub unsafe fn eager_raw(
        &self,
        stream: &CudaStream,
        raw: &RawFusedArgs,
        scratch: &mut EagerScratch,
        spec: &LossSpec,
    ) -> Result<()> {
        spec.validate(raw.labels != 0)?;
        spec.validate_eager()?;
        if raw.row_weights != 0 || raw.grad_teacher != 0 {
            return invalid(
                "row_weights",
                "the eager baseline does not implement row weights or the teacher gradient",
            );
        }
        let l = raw.layout;
        if raw.student == 0 || raw.teacher == 0 || raw.row_losses == 0 || raw.loss == 0 {
            return invalid(
                "pointers",
                "student, teacher, row_losses and loss must be non-null",
            );
        }
        io(raw.dtype, raw.grad_dtype)?;
        if scratch.elements < l.rows * l.cols
            || (spec.alpha > 0.0 && scratch.ls1.len() < l.rows * l.cols)
            || (matches!(spec.kernel_divergence(), KernelDivergence::Jsd(_))
                && scratch.log_mix.len() < l.rows * l.cols)
        {
            return invalid(
                "scratch",
                "eager scratch buffers are smaller than the batch or lack this spec's buffers",
            );
        }
        let p = KernelParams::new(spec, l.cols);
        let n = l.rows as i64;
        let v = l.cols as i32;
        let count = (l.rows * l.cols) as i64;
        let beta = p.beta;
        let (ls, _g1) = scratch.ls.device_ptr_mut(stream);
        let (lt, _g2) = scratch.lt.device_ptr_mut(stream);
        let (e, _g3) = scratch.terms.device_ptr_mut(stream);
        let (lm, _g4) = scratch.log_mix.device_ptr_mut(stream);
        let (ls1, _g5) = scratch.ls1.device_ptr_mut(stream);

        // SAFETY: the caller's contract (labels: N, valid_rows: 1).
        let valid_ptr = unsafe {
            self.count_valid_rows(stream, raw.labels, n, spec.ignore_index, raw.valid_rows)
        }?;
        let lsm = self.kernel(Kernel::EagerTyped(EagerTyped::LogSoftmax, raw.dtype))?;
        let inv_tau = p.inv_tau;
        let with_ce = spec.alpha > 0.0;
        for (x, stride, out, inv_tau, wanted) in [
            (raw.student, l.student_stride, ls, inv_tau, true),
            (raw.teacher, l.teacher_stride, lt, inv_tau, true),
            (raw.student, l.student_stride, ls1, 1.0f32, with_ce),
        ] {
            if !wanted {
                continue;
            }
            let args = EagerLsmArgs {
                x,
                stride: stride as i64,
                out,
                n,
                vocab: v,
                inv_tau,
            };
            let mut b = stream.launch_builder(lsm);
            b.arg(&args);
            b.launch(rows_cfg(l.rows))?;
        }
        let ew = elementwise(l.rows * l.cols);
        // The element-wise kernels read what their formula names of
        // (ls, lt, lm) and write `out`: the terms and the backward terms go to
        // e, the log-mixture to lm.
        let terms_args = EagerEwArgs {
            ls,
            lt,
            lm,
            out: e,
            count,
            beta,
        };
        let launch = |op: EagerOp| -> Result<()> {
            let mut b = stream.launch_builder(self.kernel(Kernel::Eager(op))?);
            let (args, rows);
            match op {
                EagerOp::RowLoss => {
                    rows = EagerRowLossArgs {
                        e,
                        ls1,
                        labels: raw.labels,
                        n,
                        row_loss: raw.row_losses,
                        params: p,
                    };
                    b.arg(&rows);
                }
                EagerOp::LogMix => {
                    args = EagerEwArgs {
                        lm: 0,
                        out: lm,
                        ..terms_args
                    };
                    b.arg(&args);
                }
                _ => {
                    b.arg(&terms_args);
                }
            }
            let cfg = if op == EagerOp::RowLoss {
                rows_cfg(l.rows)
            } else {
                ew
            };
            // SAFETY: the caller's contract and the scratch checked above:
            // every buffer holds what the kernel reads and writes.
            unsafe { b.launch(cfg) }?;
            Ok(())
        };
        // Per divergence: its element-wise terms and their backward (soft
        // CE's gradient is forward KL's; JSD's terms need the log-mixture).
        let (terms, back) = match spec.kernel_divergence() {
            KernelDivergence::ForwardKl => (EagerOp::FklTerms, EagerOp::FklBack),
            KernelDivergence::ReverseKl => (EagerOp::RklTerms, EagerOp::RklBack),
            KernelDivergence::Jsd(_) => (EagerOp::JsdTerms, EagerOp::JsdBack),
            KernelDivergence::Tvd => (EagerOp::TvdTerms, EagerOp::TvdBack),
            KernelDivergence::SoftCe => (EagerOp::SceTerms, EagerOp::FklBack),
        };
        if terms == EagerOp::JsdTerms {
            launch(EagerOp::LogMix)?;
        }
        launch(terms)?;
        launch(EagerOp::RowLoss)?;
        // SAFETY: the caller's contract (row_losses: N, loss: 1).
        unsafe { self.launch_reduce_loss(stream, raw.row_losses, n, valid_ptr, &p, raw.loss) }?;
        if raw.grad == 0 {
            return Ok(());
        }
        launch(back)?;
        // The backward of log_softmax(s/τ) (g = e, ls) and of the hard-label
        // term (ls1), into the gradient's dtype.
        let backward = |op: EagerTyped, cfg: LaunchConfig| -> Result<()> {
            let (g, ls) = if op == EagerTyped::LsmBack {
                (e, ls)
            } else {
                (0, ls1)
            };
            let args = EagerBackArgs {
                g,
                ls,
                labels: raw.labels,
                valid_count: valid_ptr,
                n,
                grad: raw.grad,
                grad_stride: l.grad_stride as i64,
                params: p,
            };
            let mut b = stream.launch_builder(self.kernel(Kernel::EagerTyped(op, raw.grad_dtype))?);
            b.arg(&args);
            // SAFETY: the caller's contract (grad: (N−1)·grad_stride + V).
            unsafe { b.launch(cfg) }?;
            Ok(())
        };
        backward(EagerTyped::LsmBack, rows_cfg(l.rows))?;
        if spec.alpha > 0.0 {
            backward(EagerTyped::CeBack, ew)?;
        }
        Ok(())
    }
}
