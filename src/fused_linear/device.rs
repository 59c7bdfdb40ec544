//! The chunk loop on device memory, generic over the few operations it
//! needs ([`ChunkDevice`]: GEMMs and the loss launches on raw addresses),
//! so that the CUDA path (cuBLAS and the kernels, [`super::cuda`]) and the
//! emulation (host sgemm and the emulated kernels, `super::emu`) run the
//! same bookkeeping: pointer offsets, strides, the accumulation order and
//! the batch's valid-row count.
//!
//! Per call, on one stream and without a host synchronisation:
//!
//! 1. the batch's valid-row count into `valid_rows`: `kd_count_valid` over
//!    all N labels, or N itself (a 32-bit fill) without labels; every chunk's
//!    loss launch reads its reduction weight (1/valid for batchmean, …) from
//!    there, so a chunk's gradient is already that of the whole batch;
//! 2. the gradient accumulators zeroed (∂W, ∂b; the teacher's too);
//! 3. per chunk of rows `[r0, r1)`: the logits chunk `h·Wᵀ (+ 1·bᵀ)` by a
//!    GEMM written in the operand dtype (fp32 compute; the bias broadcast
//!    first, then the product with β = 1, so the logits are rounded once),
//!    the teacher's the same way for a linear teacher; the fused loss over
//!    the chunk, its row losses at offset r0 of the N-long buffer and its
//!    logit gradient `G` written over the logits chunk (in place, the
//!    operand dtype); then `∂hidden[r0..r1] = G·W`, `∂W += Gᵀ·h` and
//!    `∂b += Gᵀ·1` by GEMMs with f32 outputs (β = 1 on the zeroed
//!    accumulators);
//! 4. one `kd_reduce_loss` over the N row losses with the batch's count.

use super::TeacherGrads;
use super::{Chunking, LinearGrads, LinearInputs, LinearOutput, LinearSpec, LinearTeacher};
use crate::error::{invalid, Result};
use crate::params::{CountArgs, FusedArgs, KernelParams, ReduceArgs, TopkArgs};
use crate::spec::LossSpec;
use crate::tensor::{first_bad_topk_row, Dtype, TopkIndices};

/// One linear head on the device: `logits = hidden · weightᵀ + bias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHead {
    /// Hidden states `[N, H]`, row-major, the call's dtype.
    pub hidden: u64,
    /// The head `[weight_rows, H]`, row-major, the call's dtype (its first
    /// V rows are used).
    pub weight: u64,
    /// The bias `[weight_rows]` (its first V entries used), or 0.
    pub bias: u64,
    /// H, the hidden size.
    pub hidden_size: usize,
    /// Rows of the head: V for the student, `V_t ≥ V` for a teacher.
    pub weight_rows: usize,
}

/// The teacher of a device call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTeacher {
    /// Hidden states and a head (its own H, `weight_rows ≥ V`).
    Linear(RawHead),
    /// Logits `[N, V]`, the call's dtype, rows `row_stride ≥ V` elements
    /// apart.
    Logits {
        /// The logits.
        logits: u64,
        /// Row stride in elements.
        row_stride: usize,
    },
    /// A top-k teacher: indices and values `[N, k]` dense.
    Topk {
        /// Indices (int32, or int64 with `indices_i64`).
        indices: u64,
        /// The indices are int64.
        indices_i64: bool,
        /// Values (logits or log-probs, the call's dtype).
        values: u64,
        /// Entries per row, `1 ≤ k ≤ V`.
        k: usize,
    },
}

/// Gradient outputs of one head on the device, all f32 row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeadGrads {
    /// `∂L/∂hidden` `[N, H]` (overwritten).
    pub hidden: u64,
    /// `∂L/∂W` `[weight_rows, H]` (overwritten; rows ≥ V zero).
    pub weight: u64,
    /// `∂L/∂b` `[weight_rows]`, required exactly when the head has a bias.
    pub bias: u64,
}

/// Every address of one fused linear call on device memory (0 = absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLinearArgs {
    /// The operands' dtype (hidden states, heads, biases, teacher logits
    /// or top-k values).
    pub dtype: Dtype,
    /// Rows N (at most `i32::MAX`).
    pub rows: usize,
    /// Vocabulary V: the student head's rows.
    pub vocab: usize,
    /// The student's head (`weight_rows` = V).
    pub student: RawHead,
    /// The teacher.
    pub teacher: RawTeacher,
    /// Labels (int64, N), or 0.
    pub labels: u64,
    /// Per-row weights (f32, N), or 0.
    pub row_weights: u64,
    /// Per-row losses ℓ·w (f32, N; ignored rows 0), before the reduction's
    /// weight. Required.
    pub row_losses: u64,
    /// The reduced loss (f32, 1). Required.
    pub loss: u64,
    /// The batch's valid-row count (int32, 1; written). Required.
    pub valid_rows: u64,
    /// The student's gradients; required with `LinearSpec::grads`.
    pub student_grads: Option<RawHeadGrads>,
    /// A linear teacher's gradients: required with `grads` and
    /// `loss.grad_teacher` (mutual learning).
    pub teacher_grads: Option<RawHeadGrads>,
    /// A logits teacher's gradient `[N, V]` dense, in the call's dtype: 0,
    /// or required with `grads` and `loss.grad_teacher`.
    pub teacher_logits_grad: u64,
}

/// The bytes `compute_cuda` allocates for [`ChunkDevice::alloc`] of
/// `bytes`: at least 16. The emulation counts alike.
pub(crate) fn alloc_size(bytes: usize) -> usize {
    bytes.max(16)
}

/// The bytes `compute_cuda` allocates for [`ChunkDevice::upload`] of
/// `bytes` bytes: a copy of exactly that size, 16 for an empty one.
pub(crate) fn upload_size(bytes: usize) -> usize {
    if bytes == 0 {
        alloc_size(0)
    } else {
        bytes
    }
}

/// The per-chunk buffers of a device call, bytes per row: the student's
/// logits chunk (its gradient overwrites it) and a linear teacher's, in
/// the operand dtype.
pub fn device_bytes_per_row(dtype: Dtype, vocab: usize, linear_teacher: bool) -> usize {
    vocab * dtype.size() * (1 + usize::from(linear_teacher))
}

/// The rows per chunk of a device call (at least 1, at most N; 1 for an
/// empty batch): `Rows(r)` as given, `MemoryBudget(b)` as many rows as
/// [`device_bytes_per_row`] lets fit in `b` bytes.
pub fn device_chunk_rows(
    rows: usize,
    dtype: Dtype,
    vocab: usize,
    linear_teacher: bool,
    chunking: Chunking,
) -> Result<usize> {
    let r = match chunking {
        Chunking::Rows(0) => return invalid("chunk_rows", "must be ≥ 1, got 0"),
        Chunking::Rows(r) => r,
        Chunking::MemoryBudget(budget) => {
            let per_row = device_bytes_per_row(dtype, vocab, linear_teacher).max(1);
            if budget < per_row {
                return invalid(
                    "memory_budget",
                    format!(
                        "{budget} bytes do not hold one row of chunk buffers ({per_row} bytes at V = {vocab})"
                    ),
                );
            }
            budget / per_row
        }
    };
    Ok(r.min(rows).max(1))
}

/// A row-major GEMM on raw addresses, fp32 accumulation:
/// `C[m×n] = op(A)[m×k] · op(B)[k×n] + beta·C`. `A` is stored `m×k` (or
/// `k×m` with `a_trans`) with `lda` elements between rows, `B` likewise;
/// `A` and `B` share `ab`, `C` is `c_dtype`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GemmCall {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_trans: bool,
    pub lda: usize,
    pub b: u64,
    pub b_trans: bool,
    pub ldb: usize,
    pub ab: Dtype,
    pub c: u64,
    pub ldc: usize,
    pub c_dtype: Dtype,
    /// 0 (overwrite) or 1 (accumulate).
    pub beta: f32,
}

/// What the chunk loop needs of a device: memory, GEMMs and the three loss
/// launches, all enqueued in order on one stream (the emulation runs them
/// at once). Addresses are device pointers on CUDA, host addresses under
/// the emulation.
pub(crate) trait ChunkDevice {
    /// A loss launch prepared for a spec, dtype, V, labels and teacher kind.
    type Loss;
    /// `bytes` of uninitialised memory, alive as long as `self`.
    fn alloc(&mut self, bytes: usize) -> Result<u64>;
    /// A copy of `bytes`, alive as long as `self`.
    fn upload(&mut self, bytes: &[u8]) -> Result<u64>;
    /// The bytes [`ChunkDevice::alloc`] and [`ChunkDevice::upload`] have
    /// allocated so far, each buffer counted as [`alloc_size`] or
    /// [`upload_size`]. Nothing is
    /// freed before `self` is dropped, so this is also the peak
    /// (`LinearOutput::device_peak_bytes`).
    fn allocated_bytes(&self) -> usize;
    /// Waits for the work enqueued so far and reads `bytes` bytes at `addr`.
    fn download(&mut self, addr: u64, bytes: usize) -> Result<Vec<u8>>;
    /// Sets `count` 32-bit words at `dst` to `value`.
    ///
    /// # Safety
    /// `dst` holds `count` words.
    unsafe fn fill_u32(&mut self, dst: u64, value: u32, count: usize) -> Result<()>;
    /// Sets `count` 16-bit words at `dst` to `value`.
    ///
    /// # Safety
    /// `dst` holds `count` words.
    unsafe fn fill_u16(&mut self, dst: u64, value: u16, count: usize) -> Result<()>;
    /// The loss of `spec` for inputs and gradients of `dtype`, rows of
    /// `vocab`, with or without labels, a dense teacher (`topk` None) or a
    /// top-k one (`Some(indices are int64)`).
    fn prepare(
        &mut self,
        spec: &LossSpec,
        dtype: Dtype,
        vocab: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<Self::Loss>;
    /// Enqueues a GEMM.
    ///
    /// # Safety
    /// The operands hold what the call's shapes and strides address.
    unsafe fn gemm(&mut self, g: &GemmCall) -> Result<()>;
    /// Enqueues `kd_count_valid`.
    ///
    /// # Safety
    /// As the kernel's launch contract.
    unsafe fn count_valid(&mut self, args: &CountArgs) -> Result<()>;
    /// Enqueues one dense fused launch (no count, no reduction): the kernel
    /// reads its reduction weight from `*args.valid_count`.
    ///
    /// # Safety
    /// As the kernel's launch contract.
    unsafe fn fused(&mut self, loss: &Self::Loss, args: &FusedArgs) -> Result<()>;
    /// Enqueues one top-k fused launch, as [`ChunkDevice::fused`].
    ///
    /// # Safety
    /// As the kernel's launch contract.
    unsafe fn topk(&mut self, loss: &Self::Loss, args: &TopkArgs) -> Result<()>;
    /// Enqueues `kd_reduce_loss`.
    ///
    /// # Safety
    /// As the kernel's launch contract.
    unsafe fn reduce(&mut self, args: &ReduceArgs) -> Result<()>;
}

/// Fails unless `p` is set.
fn need(arg: &'static str, p: u64) -> Result<()> {
    if p == 0 {
        return invalid(arg, "must not be NULL");
    }
    Ok(())
}

/// Checks a raw call: the required pointers, the shapes, the gradient
/// outputs `spec` asks for. Nothing is enqueued before it passes.
pub fn check_raw(a: &RawLinearArgs, spec: &LinearSpec) -> Result<()> {
    let ls = &spec.loss;
    ls.validate(a.labels != 0)?;
    if matches!(a.teacher, RawTeacher::Topk { .. }) {
        ls.validate_topk()?;
    }
    let (n, v) = (a.rows, a.vocab);
    if n > i32::MAX as usize {
        return invalid("rows", format!("N = {n} exceeds {}", i32::MAX));
    }
    if v == 0 || v > i32::MAX as usize {
        return invalid(
            "student_weight",
            format!("V must be in [1, {}], got {v}", i32::MAX),
        );
    }
    let head = |h: &RawHead, side: &'static str, (hid, w): (&'static str, &'static str)| {
        need(hid, h.hidden)?;
        need(w, h.weight)?;
        if h.hidden_size == 0 {
            return invalid(hid, "needs H ≥ 1 columns, got 0");
        }
        if h.weight_rows < v {
            return invalid(
                w,
                format!(
                    "has {} rows, fewer than the {side}'s vocabulary V = {v}",
                    h.weight_rows
                ),
            );
        }
        if h.hidden_size > i32::MAX as usize || h.weight_rows > i32::MAX as usize {
            return invalid(w, format!("shape exceeds {} per dimension", i32::MAX));
        }
        Ok(())
    };
    head(&a.student, "student", ("student_hidden", "student_weight"))?;
    if a.student.weight_rows != v {
        return invalid(
            "student_weight",
            format!("has {} rows, V = {v}", a.student.weight_rows),
        );
    }
    match a.teacher {
        RawTeacher::Linear(t) => head(&t, "student", ("teacher_hidden", "teacher_weight"))?,
        RawTeacher::Logits { logits, row_stride } => {
            need("teacher_logits", logits)?;
            if row_stride < v {
                return invalid(
                    "teacher_stride",
                    format!("row stride {row_stride} is below V = {v}"),
                );
            }
        }
        RawTeacher::Topk {
            indices, values, k, ..
        } => {
            need("topk_indices", indices)?;
            need("topk_values", values)?;
            if k == 0 || k > v {
                return invalid("topk_k", format!("must be in [1, V = {v}], got {k}"));
            }
        }
    }
    need("row_losses", a.row_losses)?;
    need("loss", a.loss)?;
    need("valid_rows", a.valid_rows)?;
    let grads = |g: Option<RawHeadGrads>, bias: u64, names: [&'static str; 3]| -> Result<()> {
        let Some(g) = g else {
            return invalid(names[0], "gradient outputs are required (grads on)");
        };
        need(names[0], g.hidden)?;
        need(names[1], g.weight)?;
        match (bias != 0, g.bias != 0) {
            (true, false) => invalid(names[2], "must not be NULL: the head has a bias"),
            (false, true) => invalid(names[2], "must be NULL: the head has no bias"),
            _ => Ok(()),
        }
    };
    if spec.grads {
        grads(
            a.student_grads,
            a.student.bias,
            [
                "student_grad_hidden",
                "student_grad_weight",
                "student_grad_bias",
            ],
        )?;
        if ls.grad_teacher {
            match a.teacher {
                RawTeacher::Linear(t) => grads(
                    a.teacher_grads,
                    t.bias,
                    [
                        "teacher_grad_hidden",
                        "teacher_grad_weight",
                        "teacher_grad_bias",
                    ],
                )?,
                RawTeacher::Logits { .. } => need("teacher_grad_logits", a.teacher_logits_grad)?,
                RawTeacher::Topk { .. } => {}
            }
        }
    }
    Ok(())
}

/// A pointer `elems` elements of `size` bytes past `p` (0 stays 0).
fn off(p: u64, elems: usize, size: usize) -> u64 {
    if p == 0 {
        0
    } else {
        p + (elems * size) as u64
    }
}

/// 1.0 in a 16-bit dtype's bits.
fn one_bits16(dtype: Dtype) -> u16 {
    match dtype {
        Dtype::Bf16 => half::bf16::ONE.to_bits(),
        _ => half::f16::ONE.to_bits(),
    }
}

/// Enqueues a whole call on `dev` in chunks of `chunk` rows (see the module
/// doc). The chunk buffers come from `dev.alloc`.
///
/// # Safety
/// Every address of `a` is valid memory of `dev` holding what its shape
/// needs, alive until the work has run; `check_raw(a, spec)` passed.
pub(crate) unsafe fn run<D: ChunkDevice>(
    dev: &mut D,
    a: &RawLinearArgs,
    spec: &LinearSpec,
    chunk: usize,
) -> Result<()> {
    let ls = &spec.loss;
    let (n, v, dtype) = (a.rows, a.vocab, a.dtype);
    let ds = dtype.size();
    let chunk = chunk.clamp(1, n.max(1));
    let topk = match a.teacher {
        RawTeacher::Topk { indices_i64, .. } => Some(indices_i64),
        _ => None,
    };
    let loss = dev.prepare(ls, dtype, v, a.labels != 0, topk)?;
    let mut params = KernelParams::new(ls, v);
    if let RawTeacher::Topk { k, .. } = a.teacher {
        params.topk_k = k as i32;
    }
    let mutual = spec.grads && ls.grad_teacher;
    let s_grads = if spec.grads { a.student_grads } else { None };
    let t_grads = match a.teacher {
        RawTeacher::Linear(_) if mutual => a.teacher_grads,
        _ => None,
    };
    let t_logits_grad = match a.teacher {
        RawTeacher::Logits { .. } if mutual => a.teacher_logits_grad,
        _ => 0,
    };

    // SAFETY (every enqueue below): the caller's contract for the
    // caller's buffers; the chunk buffers hold `chunk` rows.
    unsafe {
        // 1. The batch's valid-row count, read by every chunk's launch.
        if a.labels != 0 {
            dev.count_valid(&CountArgs {
                labels: a.labels,
                n_rows: n as i64,
                ignore_index: ls.ignore_index,
                out: a.valid_rows,
            })?;
        } else {
            dev.fill_u32(a.valid_rows, n as u32, 1)?;
        }
        // 2. The accumulators.
        let zero = |dev: &mut D, g: Option<RawHeadGrads>, head: &RawHead| -> Result<()> {
            if let Some(g) = g {
                dev.fill_u32(g.weight, 0, head.weight_rows * head.hidden_size)?;
                if g.bias != 0 {
                    dev.fill_u32(g.bias, 0, head.weight_rows)?;
                }
            }
            Ok(())
        };
        zero(dev, s_grads, &a.student)?;
        if let RawTeacher::Linear(t) = &a.teacher {
            zero(dev, t_grads, t)?;
        }
    }

    // The chunk buffers: logits chunks (their gradients in place) and a
    // column of ones (bias broadcast and bias gradient).
    let s_buf = dev.alloc(chunk * v * ds)?;
    let t_buf = match a.teacher {
        RawTeacher::Linear(_) => dev.alloc(chunk * v * ds)?,
        _ => 0,
    };
    let any_bias = a.student.bias != 0 || matches!(a.teacher, RawTeacher::Linear(t) if t.bias != 0);
    let ones = if any_bias {
        let p = dev.alloc(chunk * ds)?;
        // SAFETY: `chunk` elements.
        unsafe {
            match dtype {
                Dtype::F32 => dev.fill_u32(p, 1.0f32.to_bits(), chunk)?,
                _ => dev.fill_u16(p, one_bits16(dtype), chunk)?,
            }
        }
        p
    } else {
        0
    };

    for r0 in (0..n).step_by(chunk) {
        let c = (r0 + chunk).min(n) - r0;
        // SAFETY: as above.
        unsafe {
            logits(dev, &a.student, dtype, v, r0, c, ones, s_buf)?;
            if let RawTeacher::Linear(t) = &a.teacher {
                logits(dev, t, dtype, v, r0, c, ones, t_buf)?;
            }
            let grad = if s_grads.is_some() { s_buf } else { 0 };
            let labels = off(a.labels, r0, 8);
            let row_weights = off(a.row_weights, r0, 4);
            let row_loss = off(a.row_losses, r0, 4);
            match a.teacher {
                RawTeacher::Topk {
                    indices,
                    indices_i64,
                    values,
                    k,
                } => {
                    let isz = if indices_i64 { 8 } else { 4 };
                    dev.topk(
                        &loss,
                        &TopkArgs {
                            student: s_buf,
                            student_stride: v as i64,
                            indices: off(indices, r0 * k, isz),
                            values: off(values, r0 * k, ds),
                            labels,
                            row_weights,
                            grad,
                            grad_stride: v as i64,
                            row_loss,
                            valid_count: a.valid_rows,
                            n_rows: c as i64,
                            params,
                        },
                    )?
                }
                RawTeacher::Logits { .. } | RawTeacher::Linear(_) => {
                    // The teacher chunk, its row stride and where its
                    // gradient goes: a logits teacher is read in place, a
                    // head's chunk was just made in `t_buf`.
                    let (teacher, teacher_stride, grad_teacher) = match a.teacher {
                        RawTeacher::Logits { logits, row_stride } => (
                            off(logits, r0 * row_stride, ds),
                            row_stride,
                            off(t_logits_grad, r0 * v, ds),
                        ),
                        _ => (t_buf, v, if t_grads.is_some() { t_buf } else { 0 }),
                    };
                    dev.fused(
                        &loss,
                        &FusedArgs {
                            student: s_buf,
                            student_stride: v as i64,
                            teacher,
                            teacher_stride: teacher_stride as i64,
                            labels,
                            row_weights,
                            grad,
                            grad_stride: v as i64,
                            grad_teacher,
                            grad_teacher_stride: v as i64,
                            row_loss,
                            valid_count: a.valid_rows,
                            n_rows: c as i64,
                            params,
                        },
                    )?
                }
            }
            if let Some(g) = s_grads {
                fold(dev, &a.student, &g, dtype, v, r0, c, ones, s_buf)?;
            }
            if let (RawTeacher::Linear(t), Some(g)) = (&a.teacher, t_grads) {
                fold(dev, t, &g, dtype, v, r0, c, ones, t_buf)?;
            }
        }
    }
    // 4. The reduced loss over all N rows, with the batch's count.
    // SAFETY: as above.
    unsafe {
        dev.reduce(&ReduceArgs {
            row_loss: a.row_losses,
            n_rows: n as i64,
            valid_count: a.valid_rows,
            out: a.loss,
            params,
        })
    }
}

/// The logits of rows `[r0, r0 + c)` through `head` into `out` (`[c, V]`,
/// the operand dtype): the bias broadcast (`1·bᵀ`), then `h·Wᵀ` with β = 1
/// (one rounding of the f32 sum), or the product alone.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
unsafe fn logits<D: ChunkDevice>(
    dev: &mut D,
    head: &RawHead,
    dtype: Dtype,
    v: usize,
    r0: usize,
    c: usize,
    ones: u64,
    out: u64,
) -> Result<()> {
    let (ds, h) = (dtype.size(), head.hidden_size);
    let mut beta = 0.0;
    // SAFETY: the caller's contract.
    unsafe {
        if head.bias != 0 {
            dev.gemm(&GemmCall {
                m: c,
                n: v,
                k: 1,
                a: ones,
                a_trans: false,
                lda: 1,
                b: head.bias,
                b_trans: false,
                ldb: v,
                ab: dtype,
                c: out,
                ldc: v,
                c_dtype: dtype,
                beta: 0.0,
            })?;
            beta = 1.0;
        }
        dev.gemm(&GemmCall {
            m: c,
            n: v,
            k: h,
            a: off(head.hidden, r0 * h, ds),
            a_trans: false,
            lda: h,
            b: head.weight,
            b_trans: true,
            ldb: h,
            ab: dtype,
            c: out,
            ldc: v,
            c_dtype: dtype,
            beta,
        })
    }
}

/// Folds the logit gradient `g` (`[c, V]`, the operand dtype) of rows
/// `[r0, r0 + c)` into a head's gradients: `∂hidden[r0..] = G·W`,
/// `∂W[..V] += Gᵀ·h`, `∂b[..V] += Gᵀ·1`.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
unsafe fn fold<D: ChunkDevice>(
    dev: &mut D,
    head: &RawHead,
    out: &RawHeadGrads,
    dtype: Dtype,
    v: usize,
    r0: usize,
    c: usize,
    ones: u64,
    g: u64,
) -> Result<()> {
    let (ds, h) = (dtype.size(), head.hidden_size);
    // SAFETY: the caller's contract.
    unsafe {
        dev.gemm(&GemmCall {
            m: c,
            n: h,
            k: v,
            a: g,
            a_trans: false,
            lda: v,
            b: head.weight,
            b_trans: false,
            ldb: h,
            ab: dtype,
            c: off(out.hidden, r0 * h, 4),
            ldc: h,
            c_dtype: Dtype::F32,
            beta: 0.0,
        })?;
        dev.gemm(&GemmCall {
            m: v,
            n: h,
            k: c,
            a: g,
            a_trans: true,
            lda: v,
            b: off(head.hidden, r0 * h, ds),
            b_trans: false,
            ldb: h,
            ab: dtype,
            c: out.weight,
            ldc: h,
            c_dtype: Dtype::F32,
            beta: 1.0,
        })?;
        if out.bias != 0 {
            dev.gemm(&GemmCall {
                m: 1,
                n: v,
                k: c,
                a: ones,
                a_trans: false,
                lda: c,
                b: g,
                b_trans: false,
                ldb: v,
                ab: dtype,
                c: out.bias,
                ldc: v,
                c_dtype: Dtype::F32,
                beta: 1.0,
            })?;
        }
    }
    Ok(())
}

/// Host inputs on `dev`: uploads them, runs the chunk loop, downloads the
/// results (the path of `compute_cuda` and of the emulated tests).
pub(crate) fn compute_on<D: ChunkDevice>(
    dev: &mut D,
    inputs: &LinearInputs,
    spec: &LinearSpec,
) -> Result<LinearOutput> {
    let ls = &spec.loss;
    ls.validate(inputs.labels.is_some())?;
    if let LinearTeacher::Topk(t) = inputs.teacher {
        ls.validate_topk()?;
        inputs.validate(ls.ignore_index)?;
        if let Some((row, msg)) = first_bad_topk_row(&t.indices, inputs.rows(), t.k, inputs.vocab())
        {
            return invalid("teacher_topk_indices", format!("row {row}: {msg}"));
        }
    } else {
        inputs.validate(ls.ignore_index)?;
    }
    let (n, v, dtype) = (inputs.rows(), inputs.vocab(), inputs.dtype());
    let linear = matches!(inputs.teacher, LinearTeacher::Linear(_));
    let chunk = device_chunk_rows(n, dtype, v, linear, spec.chunking)?;

    let head = |dev: &mut D, l: &super::Linear| -> Result<RawHead> {
        Ok(RawHead {
            hidden: dev.upload(l.hidden.data.bytes())?,
            weight: dev.upload(l.weight.data.bytes())?,
            bias: match l.bias {
                Some(b) => dev.upload(b.bytes())?,
                None => 0,
            },
            hidden_size: l.hidden.cols,
            weight_rows: l.weight.rows,
        })
    };
    let student = head(dev, &inputs.student)?;
    let teacher = match inputs.teacher {
        LinearTeacher::Linear(t) => RawTeacher::Linear(head(dev, &t)?),
        LinearTeacher::Logits(t) => RawTeacher::Logits {
            logits: dev.upload(t.data.bytes())?,
            row_stride: t.row_stride,
        },
        LinearTeacher::Topk(t) => {
            let (indices, indices_i64) = match t.indices {
                TopkIndices::I32(i) => (dev.upload(bytemuck::cast_slice(i))?, false),
                TopkIndices::I64(i) => (dev.upload(bytemuck::cast_slice(i))?, true),
            };
            RawTeacher::Topk {
                indices,
                indices_i64,
                values: dev.upload(t.values.bytes())?,
                k: t.k,
            }
        }
    };
    let labels = match inputs.labels {
        Some(l) => dev.upload(bytemuck::cast_slice(l))?,
        None => 0,
    };
    let row_weights = match inputs.row_weights {
        Some(w) => dev.upload(bytemuck::cast_slice(w))?,
        None => 0,
    };
    let head_grads = |dev: &mut D, h: &RawHead| -> Result<RawHeadGrads> {
        Ok(RawHeadGrads {
            hidden: dev.alloc(n * h.hidden_size * 4)?,
            weight: dev.alloc(h.weight_rows * h.hidden_size * 4)?,
            bias: if h.bias != 0 {
                dev.alloc(h.weight_rows * 4)?
            } else {
                0
            },
        })
    };
    let mutual = spec.grads && ls.grad_teacher;
    let student_grads = if spec.grads {
        Some(head_grads(dev, &student)?)
    } else {
        None
    };
    let teacher_grads = match teacher {
        RawTeacher::Linear(t) if mutual => Some(head_grads(dev, &t)?),
        _ => None,
    };
    let teacher_logits_grad = match teacher {
        RawTeacher::Logits { .. } if mutual => dev.alloc(n * v * dtype.size())?,
        _ => 0,
    };
    let raw = RawLinearArgs {
        dtype,
        rows: n,
        vocab: v,
        student,
        teacher,
        labels,
        row_weights,
        row_losses: dev.alloc(n * 4)?,
        loss: dev.alloc(4)?,
        valid_rows: dev.alloc(4)?,
        student_grads,
        teacher_grads,
        teacher_logits_grad,
    };
    check_raw(&raw, spec)?;
    // SAFETY: every buffer was uploaded or allocated above for this shape.
    unsafe { run(dev, &raw, spec, chunk) }?;

    let f32s = |dev: &mut D, p: u64, len: usize| -> Result<Vec<f32>> {
        Ok(Dtype::F32.decode(&dev.download(p, len * 4)?))
    };
    let row_losses: Vec<f64> = f32s(dev, raw.row_losses, n)?
        .into_iter()
        .map(f64::from)
        .collect();
    let loss = f64::from(f32s(dev, raw.loss, 1)?[0]);
    let valid = dev.download(raw.valid_rows, 4)?;
    let valid_rows = i32::from_le_bytes([valid[0], valid[1], valid[2], valid[3]]).max(0) as usize;
    let grads_of = |dev: &mut D, g: &RawHeadGrads, h: &RawHead| -> Result<LinearGrads> {
        Ok(LinearGrads {
            hidden: f32s(dev, g.hidden, n * h.hidden_size)?,
            weight: f32s(dev, g.weight, h.weight_rows * h.hidden_size)?,
            bias: if g.bias != 0 {
                Some(f32s(dev, g.bias, h.weight_rows)?)
            } else {
                None
            },
        })
    };
    let student_out = match &raw.student_grads {
        Some(g) => Some(grads_of(dev, g, &raw.student)?),
        None => None,
    };
    let teacher_out = match (&raw.teacher, &raw.teacher_grads) {
        (RawTeacher::Linear(t), Some(g)) => Some(TeacherGrads::Linear(grads_of(dev, g, t)?)),
        (RawTeacher::Logits { .. }, _) if raw.teacher_logits_grad != 0 => {
            Some(TeacherGrads::Logits(dtype.decode(
                &dev.download(raw.teacher_logits_grad, n * v * dtype.size())?,
            )))
        }
        _ => None,
    };
    Ok(LinearOutput {
        loss,
        row_losses,
        valid_rows,
        chunk_rows: chunk,
        student: student_out,
        teacher: teacher_out,
        device_peak_bytes: Some(dev.allocated_bytes()),
    })
}
