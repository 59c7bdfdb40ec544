//! The C ABI of the fused linear + distillation loss (`crate::fused_linear`):
//! [`KdfuseLinearArgs`] (versioned like the other structs) and the host and
//! CUDA entry points.

use super::{guard, host_data, non_null, out_ref, read_spec, types, KdfuseContext, KdfuseStatus};
use crate::cpu::CpuBackend;
use crate::error::{invalid, KdError, Result};
use crate::fused_linear::{
    self, Chunking, Linear, LinearGrads, LinearInputs, LinearSpec, LinearTeacher, Matrix, RawHead,
    RawHeadGrads, RawLinearArgs, RawTeacher, TeacherGrads, DEFAULT_MEMORY_BUDGET,
};
use crate::tensor::{Dtype, HostData, Logits, TopkIndices, TopkTeacher};
use std::ffi::c_void;
use std::mem::size_of;

/// The teacher of a [`KdfuseLinearArgs`] (its `teacher_kind` field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfuseLinearTeacher {
    /// Hidden states `teacher_hidden` `[N, teacher_hidden_size]` and a head
    /// `teacher_weight` `[teacher_vocab, teacher_hidden_size]` (`teacher_vocab
    /// ≥ vocab`; its first `vocab` rows used), bias `teacher_bias` or NULL.
    Linear = 0,
    /// Logits `teacher_logits` `[N, vocab]`, rows `teacher_stride` apart.
    Logits = 1,
    /// A top-k teacher: `topk_indices` and `topk_values` `[N, topk_k]`.
    Topk = 2,
}

/// One fused linear + distillation call: the student's hidden states and
/// head, the teacher, labels, outputs and chunking. Fill it with
/// `kdfuse_linear_args_init`, then set fields. Matrices are row-major and
/// dense; every operand (hidden states, heads, biases, teacher logits, top-k
/// values) has the dtype `dtype`. A new struct of ABI version 5.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseLinearArgs {
    /// `sizeof(KdfuseLinearArgs)`.
    pub size: u32,
    /// `KDFUSE_ABI_VERSION` of the caller's header (5).
    pub version: u32,
    /// A `KdfuseDtype` (0 f32, 1 bf16, 2 f16) of every operand.
    pub dtype: i32,
    /// A `KdfuseLinearTeacher`.
    pub teacher_kind: i32,
    /// Rows N.
    pub rows: i64,
    /// Vocabulary V (the student head's rows).
    pub vocab: i64,
    /// The student's hidden size H.
    pub hidden_size: i64,
    /// Student hidden states `[N, H]`.
    pub student_hidden: *const c_void,
    /// Student head `[V, H]` (PyTorch's `nn.Linear` layout).
    pub student_weight: *const c_void,
    /// Student bias `[V]`, or NULL.
    pub student_bias: *const c_void,
    /// A linear teacher's hidden size.
    pub teacher_hidden_size: i64,
    /// A linear teacher head's rows (≥ V; 0 means V).
    pub teacher_vocab: i64,
    /// A linear teacher's hidden states `[N, teacher_hidden_size]`.
    pub teacher_hidden: *const c_void,
    /// A linear teacher's head `[teacher_vocab, teacher_hidden_size]`.
    pub teacher_weight: *const c_void,
    /// A linear teacher's bias `[teacher_vocab]`, or NULL.
    pub teacher_bias: *const c_void,
    /// A logits teacher's logits `[N, V]`.
    pub teacher_logits: *const c_void,
    /// Their row stride in elements (≥ V; 0 means V).
    pub teacher_stride: i64,
    /// A top-k teacher's indices `[N, topk_k]` (`topk_index_dtype`).
    pub topk_indices: *const c_void,
    /// A `KdfuseIndexDtype` (0 int32, 1 int64).
    pub topk_index_dtype: i32,
    /// Entries per row of a top-k teacher, `1 ≤ k ≤ V`.
    pub topk_k: i64,
    /// A top-k teacher's values `[N, topk_k]` (logits or log-probs).
    pub topk_values: *const c_void,
    /// Hard labels `[N]` (int64, in `[0, V)` or `ignore_index`), or NULL.
    pub labels: *const i64,
    /// Per-row weights `[N]`, or NULL.
    pub row_weights: *const f32,
    /// Rows per chunk (> 0), or 0: as many as `memory_budget` allows.
    pub chunk_rows: i64,
    /// Bytes of per-chunk buffers when `chunk_rows` is 0 (0: 1 GiB).
    pub memory_budget: i64,
    /// Nonzero: compute the gradients (the student's; the teacher's too
    /// with `params.grad_teacher`).
    pub compute_grads: i32,
    /// Output: the reduced loss (one float). Required.
    pub loss: *mut f32,
    /// Output: per-row losses `[N]` (ℓ times the row weight, ignored rows
    /// 0). Optional on the host, required on the device.
    pub row_losses: *mut f32,
    /// Output: rows that counted (one int32). Optional on the host,
    /// required on the device.
    pub valid_rows: *mut i32,
    /// Output: `∂L/∂student_hidden` `[N, H]` float.
    pub grad_hidden: *mut f32,
    /// Output: `∂L/∂student_weight` `[V, H]` float.
    pub grad_weight: *mut f32,
    /// Output: `∂L/∂student_bias` `[V]` float, exactly when the student
    /// has a bias.
    pub grad_bias: *mut f32,
    /// Output (mutual learning, linear teacher): `∂L/∂teacher_hidden`
    /// `[N, teacher_hidden_size]` float.
    pub teacher_grad_hidden: *mut f32,
    /// Output (mutual learning, linear teacher): `∂L/∂teacher_weight`
    /// `[teacher_vocab, teacher_hidden_size]` float (rows ≥ V zero).
    pub teacher_grad_weight: *mut f32,
    /// Output (mutual learning, linear teacher with a bias): `∂L/∂teacher_bias`
    /// `[teacher_vocab]` float.
    pub teacher_grad_bias: *mut f32,
    /// Output (mutual learning, logits teacher): `∂L/∂teacher_logits`
    /// `[N, V]` dense, in `dtype`.
    pub teacher_grad_logits: *mut c_void,
}

/// (version, size) of every `KdfuseLinearArgs` this library reads.
const LINEAR_SIZES: [(u32, usize); 1] = [(5, size_of::<KdfuseLinearArgs>())];

impl KdfuseLinearArgs {
    fn defaults() -> Self {
        let null = std::ptr::null();
        let out = std::ptr::null_mut();
        KdfuseLinearArgs {
            size: size_of::<KdfuseLinearArgs>() as u32,
            version: types::KDFUSE_ABI_VERSION,
            dtype: 0,
            teacher_kind: KdfuseLinearTeacher::Linear as i32,
            rows: 0,
            vocab: 0,
            hidden_size: 0,
            student_hidden: null,
            student_weight: null,
            student_bias: null,
            teacher_hidden_size: 0,
            teacher_vocab: 0,
            teacher_hidden: null,
            teacher_weight: null,
            teacher_bias: null,
            teacher_logits: null,
            teacher_stride: 0,
            topk_indices: null,
            topk_index_dtype: 0,
            topk_k: 0,
            topk_values: null,
            labels: std::ptr::null(),
            row_weights: std::ptr::null(),
            chunk_rows: 0,
            memory_budget: 0,
            compute_grads: 1,
            loss: std::ptr::null_mut(),
            row_losses: std::ptr::null_mut(),
            valid_rows: std::ptr::null_mut(),
            grad_hidden: std::ptr::null_mut(),
            grad_weight: std::ptr::null_mut(),
            grad_bias: std::ptr::null_mut(),
            teacher_grad_hidden: std::ptr::null_mut(),
            teacher_grad_weight: std::ptr::null_mut(),
            teacher_grad_bias: std::ptr::null_mut(),
            teacher_grad_logits: out,
        }
    }
}

/// A non-negative count.
fn count(arg: &'static str, x: i64) -> Result<usize> {
    usize::try_from(x).or_else(|_| invalid(arg, format!("must be ≥ 0, got {x}")))
}

/// `a · b` elements of `size` bytes, or an overflow error naming `arg`.
fn elems(arg: &'static str, a: usize, b: usize, size: usize) -> Result<usize> {
    a.checked_mul(b)
        .filter(|n| {
            n.checked_mul(size)
                .is_some_and(|x| x <= isize::MAX as usize)
        })
        .map_or_else(|| invalid(arg, "its size overflows"), Ok)
}

/// The shapes of a call, checked.
struct Shape {
    dtype: Dtype,
    kind: KdfuseLinearTeacher,
    n: usize,
    v: usize,
    h: usize,
    ht: usize,
    vt: usize,
    stride: usize,
    k: usize,
    i64s: bool,
}

fn shape(a: &KdfuseLinearArgs) -> Result<Shape> {
    let dtype = types::dtype("linear.dtype", a.dtype)?;
    let kind = match a.teacher_kind {
        0 => KdfuseLinearTeacher::Linear,
        1 => KdfuseLinearTeacher::Logits,
        2 => KdfuseLinearTeacher::Topk,
        t => {
            return invalid(
                "linear.teacher_kind",
                format!("{t} is not a KdfuseLinearTeacher (0 linear, 1 logits, 2 top-k)"),
            )
        }
    };
    let n = count("linear.rows", a.rows)?;
    let v = count("linear.vocab", a.vocab)?;
    let h = count("linear.hidden_size", a.hidden_size)?;
    if v == 0 || v > i32::MAX as usize {
        return invalid(
            "linear.vocab",
            format!("must be in [1, {}], got {v}", i32::MAX),
        );
    }
    if h == 0 {
        return invalid("linear.hidden_size", "must be ≥ 1, got 0");
    }
    if n > i32::MAX as usize {
        return invalid("linear.rows", format!("must be ≤ {}, got {n}", i32::MAX));
    }
    let (mut ht, mut vt, mut stride, mut k, mut i64s) = (0, 0, 0, 0, false);
    match kind {
        KdfuseLinearTeacher::Linear => {
            ht = count("linear.teacher_hidden_size", a.teacher_hidden_size)?;
            if ht == 0 {
                return invalid("linear.teacher_hidden_size", "must be ≥ 1, got 0");
            }
            vt = match count("linear.teacher_vocab", a.teacher_vocab)? {
                0 => v,
                x if x < v => {
                    return invalid(
                        "linear.teacher_vocab",
                        format!("{x} is below the student's vocab {v}"),
                    )
                }
                x => x,
            };
        }
        KdfuseLinearTeacher::Logits => {
            stride = match count("linear.teacher_stride", a.teacher_stride)? {
                0 => v,
                s if s < v => {
                    return invalid("linear.teacher_stride", format!("{s} is below vocab = {v}"))
                }
                s => s,
            };
        }
        KdfuseLinearTeacher::Topk => {
            k = count("linear.topk_k", a.topk_k)?;
            if k == 0 || k > v {
                return invalid("linear.topk_k", format!("must be in [1, {v}], got {k}"));
            }
            i64s = match a.topk_index_dtype {
                0 => false,
                1 => true,
                d => {
                    return invalid(
                        "linear.topk_index_dtype",
                        format!("{d} is not a KdfuseIndexDtype (0 int32, 1 int64)"),
                    )
                }
            };
        }
    }
    let ds = dtype.size();
    elems("linear.student_hidden", n, h, ds)?;
    elems("linear.student_weight", v, h, ds)?;
    elems("linear.teacher_hidden", n, ht, ds)?;
    elems("linear.teacher_weight", vt, ht, ds)?;
    elems("linear.teacher_logits", n, stride.max(v), ds)?;
    elems("linear.topk_indices", n, k, 8)?;
    Ok(Shape {
        dtype,
        kind,
        n,
        v,
        h,
        ht,
        vt,
        stride,
        k,
        i64s,
    })
}

/// The loss part of the spec with the call's chunking and gradients.
fn linear_spec(a: &KdfuseLinearArgs, loss: crate::spec::LossSpec) -> Result<LinearSpec> {
    let chunking = match a.chunk_rows {
        r if r > 0 => Chunking::Rows(r as usize),
        0 => match a.memory_budget {
            0 => Chunking::MemoryBudget(DEFAULT_MEMORY_BUDGET),
            b if b > 0 => Chunking::MemoryBudget(b as usize),
            b => return invalid("linear.memory_budget", format!("must be ≥ 0, got {b}")),
        },
        r => return invalid("linear.chunk_rows", format!("must be ≥ 0, got {r}")),
    };
    Ok(LinearSpec {
        loss,
        chunking,
        grads: a.compute_grads != 0,
    })
}

/// Reads the caller's args and params.
///
/// # Safety
/// `args` and `params` are NULL or readable structs of their own size.
unsafe fn read(
    args: *const KdfuseLinearArgs,
    params: *const types::KdfuseParams,
) -> Result<(KdfuseLinearArgs, Shape, LinearSpec)> {
    // SAFETY: the caller's contract.
    let a =
        unsafe { types::read_sized("linear", args, KdfuseLinearArgs::defaults(), &LINEAR_SIZES) }?;
    // SAFETY: as above.
    let loss = unsafe { read_spec(params) }?;
    let sh = shape(&a)?;
    let spec = linear_spec(&a, loss)?;
    Ok((a, sh, spec))
}

/// Host memory of `len` elements of `dtype` (NULL refused unless `len` is 0).
///
/// # Safety
/// `p` is valid for `len` elements.
unsafe fn input<'a>(
    arg: &'static str,
    p: *const c_void,
    len: usize,
    dtype: Dtype,
) -> Result<HostData<'a>> {
    if p.is_null() {
        if len == 0 {
            return Ok(match dtype {
                Dtype::F32 => HostData::F32(&[]),
                Dtype::Bf16 => HostData::Bf16(&[]),
                Dtype::F16 => HostData::F16(&[]),
            });
        }
        return invalid(arg, "must not be NULL");
    }
    // SAFETY: the caller's contract.
    unsafe { host_data(arg, p, len, dtype) }
}

/// A typed host slice of `len` elements (NULL refused unless `len` is 0).
///
/// # Safety
/// `p` is valid for `len` elements.
unsafe fn slice<'a, T>(arg: &'static str, p: *const T, len: usize) -> Result<&'a [T]> {
    super::aligned(arg, p)?;
    if p.is_null() {
        if len == 0 {
            return Ok(&[]);
        }
        return invalid(arg, "must not be NULL");
    }
    // SAFETY: the caller's contract; aligned and non-NULL.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Writes `src` to the caller's `dst` (required when `required`, else
/// skipped when NULL).
///
/// # Safety
/// `dst` is NULL or writable for `src.len()` floats.
unsafe fn write_out(arg: &'static str, dst: *mut f32, src: &[f32], required: bool) -> Result<()> {
    super::aligned(arg, dst.cast_const())?;
    if dst.is_null() {
        if required && !src.is_empty() {
            return invalid(arg, "must not be NULL");
        }
        return Ok(());
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    Ok(())
}

/// Fails unless the outputs the call will write are there (checked before
/// computing, so that a missing one costs nothing).
fn check_host_outputs(a: &KdfuseLinearArgs, sh: &Shape, spec: &LinearSpec) -> Result<()> {
    if a.loss.is_null() {
        return invalid("linear.loss", "must not be NULL");
    }
    let need = |arg: &'static str, p: *mut f32, want: bool| -> Result<()> {
        match (want, p.is_null()) {
            (true, true) => invalid(arg, "must not be NULL (gradients are on)"),
            (false, false) if arg.ends_with("bias") => {
                invalid(arg, "must be NULL: the head has no bias")
            }
            _ => Ok(()),
        }
    };
    if spec.grads {
        need("linear.grad_hidden", a.grad_hidden, true)?;
        need("linear.grad_weight", a.grad_weight, true)?;
        need("linear.grad_bias", a.grad_bias, !a.student_bias.is_null())?;
        if spec.loss.grad_teacher {
            match sh.kind {
                KdfuseLinearTeacher::Linear => {
                    need("linear.teacher_grad_hidden", a.teacher_grad_hidden, true)?;
                    need("linear.teacher_grad_weight", a.teacher_grad_weight, true)?;
                    need(
                        "linear.teacher_grad_bias",
                        a.teacher_grad_bias,
                        !a.teacher_bias.is_null(),
                    )?;
                }
                KdfuseLinearTeacher::Logits => {
                    if a.teacher_grad_logits.is_null() {
                        return invalid(
                            "linear.teacher_grad_logits",
                            "must not be NULL (params.grad_teacher with gradients on)",
                        );
                    }
                }
                KdfuseLinearTeacher::Topk => {}
            }
        }
    }
    Ok(())
}

/// Library argument names → the C fields.
fn field(e: KdError) -> KdError {
    super::renamed(
        e,
        &[
            ("student_hidden", "linear.student_hidden"),
            ("student_weight", "linear.student_weight"),
            ("student_bias", "linear.student_bias"),
            ("teacher_hidden", "linear.teacher_hidden"),
            ("teacher_weight", "linear.teacher_weight"),
            ("teacher_bias", "linear.teacher_bias"),
            ("teacher_logits", "linear.teacher_logits"),
            ("teacher_stride", "linear.teacher_stride"),
            ("topk_indices", "linear.topk_indices"),
            ("topk_values", "linear.topk_values"),
            ("topk_k", "linear.topk_k"),
            ("teacher_topk_indices", "linear.topk_indices"),
            ("labels", "linear.labels"),
            ("row_weights", "linear.row_weights"),
            ("row_losses", "linear.row_losses"),
            ("loss", "linear.loss"),
            ("valid_rows", "linear.valid_rows"),
            ("chunk_rows", "linear.chunk_rows"),
            ("memory_budget", "linear.memory_budget"),
            ("student_grad_hidden", "linear.grad_hidden"),
            ("student_grad_weight", "linear.grad_weight"),
            ("student_grad_bias", "linear.grad_bias"),
            ("teacher_grad_hidden", "linear.teacher_grad_hidden"),
            ("teacher_grad_weight", "linear.teacher_grad_weight"),
            ("teacher_grad_bias", "linear.teacher_grad_bias"),
            ("teacher_grad_logits", "linear.teacher_grad_logits"),
        ],
    )
}

/// Fills `*out` with the defaults of a `KdfuseLinearArgs` (its size and
/// version, every pointer NULL, a linear teacher, `chunk_rows` 0 with the
/// default memory budget, gradients on).
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KdfuseLinearArgs`.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_linear_args_init(out: *mut KdfuseLinearArgs) -> KdfuseStatus {
    guard(|| {
        *out_ref(out)? = KdfuseLinearArgs::defaults();
        Ok(())
    })
}

/// The fused linear + distillation loss on host memory: logits chunk by
/// chunk (`hidden · Wᵀ + b`, fp32 GEMMs), the loss of `params` on each
/// chunk by the CPU backend, the gradients folded chunk by chunk; the
/// batch's reduction weight is that of the whole batch. Writes `loss`
/// (required), `row_losses` and `valid_rows` (optional), the student's
/// gradients with `compute_grads`, the teacher's with `params.grad_teacher`
/// too (a linear or logits teacher; the logits teacher's in `dtype`). A
/// top-k teacher's indices are checked (the first bad row named). Outputs
/// must not overlap inputs.
///
/// # Safety
/// `args` and `params` are readable structs of their own size; every
/// non-NULL pointer in `args` is host memory holding what its shape needs.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_linear_loss_host(
    args: *const KdfuseLinearArgs,
    params: *const types::KdfuseParams,
) -> KdfuseStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let (a, sh, spec) = unsafe { read(args, params) }?;
        check_host_outputs(&a, &sh, &spec)?;
        // SAFETY: the caller's contract for every pointer below.
        let out = unsafe { host_call(&a, &sh, &spec) }.map_err(field)?;
        unsafe { write_host(&a, &sh, &out) }
    })
}

/// The inputs as host views, and the computation.
///
/// # Safety
/// As [`kdfuse_linear_loss_host`].
unsafe fn host_call(
    a: &KdfuseLinearArgs,
    sh: &Shape,
    spec: &LinearSpec,
) -> Result<fused_linear::LinearOutput> {
    let (n, v, h, d) = (sh.n, sh.v, sh.h, sh.dtype);
    // SAFETY: the caller's contract (lengths from the checked shape).
    unsafe {
        let bias = |p: *const c_void, len: usize, arg| -> Result<Option<HostData<'_>>> {
            if p.is_null() {
                Ok(None)
            } else {
                input(arg, p, len, d).map(Some)
            }
        };
        let student = Linear::new(
            Matrix::new(input("student_hidden", a.student_hidden, n * h, d)?, n, h),
            Matrix::new(input("student_weight", a.student_weight, v * h, d)?, v, h),
            bias(a.student_bias, v, "student_bias")?,
        );
        let teacher = match sh.kind {
            KdfuseLinearTeacher::Linear => LinearTeacher::Linear(Linear::new(
                Matrix::new(
                    input("teacher_hidden", a.teacher_hidden, n * sh.ht, d)?,
                    n,
                    sh.ht,
                ),
                Matrix::new(
                    input("teacher_weight", a.teacher_weight, sh.vt * sh.ht, d)?,
                    sh.vt,
                    sh.ht,
                ),
                bias(a.teacher_bias, sh.vt, "teacher_bias")?,
            )),
            KdfuseLinearTeacher::Logits => {
                let len = if n == 0 { 0 } else { (n - 1) * sh.stride + v };
                LinearTeacher::Logits(Logits::strided(
                    input("teacher_logits", a.teacher_logits, len, d)?,
                    n,
                    v,
                    sh.stride,
                ))
            }
            KdfuseLinearTeacher::Topk => LinearTeacher::Topk(TopkTeacher {
                indices: if sh.i64s {
                    TopkIndices::I64(slice("topk_indices", a.topk_indices.cast(), n * sh.k)?)
                } else {
                    TopkIndices::I32(slice("topk_indices", a.topk_indices.cast(), n * sh.k)?)
                },
                values: input("topk_values", a.topk_values, n * sh.k, d)?,
                k: sh.k,
            }),
        };
        let labels = if a.labels.is_null() {
            None
        } else {
            Some(slice("labels", a.labels, n)?)
        };
        let row_weights = if a.row_weights.is_null() {
            None
        } else {
            Some(slice("row_weights", a.row_weights, n)?)
        };
        let inputs = LinearInputs {
            student,
            teacher,
            labels,
            row_weights,
        };
        fused_linear::compute(&CpuBackend, &inputs, spec)
    }
}

/// The results into the caller's outputs.
///
/// # Safety
/// As [`kdfuse_linear_loss_host`].
unsafe fn write_host(
    a: &KdfuseLinearArgs,
    sh: &Shape,
    out: &fused_linear::LinearOutput,
) -> Result<()> {
    let f32s = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<_>>();
    let grads = |g: &LinearGrads, p: [*mut f32; 3], names: [&'static str; 3]| -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            write_out(names[0], p[0], &g.hidden, true)?;
            write_out(names[1], p[1], &g.weight, true)?;
            if let Some(b) = &g.bias {
                write_out(names[2], p[2], b, true)?;
            }
        }
        Ok(())
    };
    // SAFETY: the caller's contract.
    unsafe {
        write_out("linear.loss", a.loss, &[out.loss as f32], true)?;
        write_out(
            "linear.row_losses",
            a.row_losses,
            &f32s(&out.row_losses),
            false,
        )?;
        super::aligned("linear.valid_rows", a.valid_rows.cast_const())?;
        if let Some(v) = a.valid_rows.as_mut() {
            *v = out.valid_rows as i32;
        }
    }
    if let Some(g) = &out.student {
        grads(
            g,
            [a.grad_hidden, a.grad_weight, a.grad_bias],
            [
                "linear.grad_hidden",
                "linear.grad_weight",
                "linear.grad_bias",
            ],
        )?;
    }
    match &out.teacher {
        Some(TeacherGrads::Linear(g)) => grads(
            g,
            [
                a.teacher_grad_hidden,
                a.teacher_grad_weight,
                a.teacher_grad_bias,
            ],
            [
                "linear.teacher_grad_hidden",
                "linear.teacher_grad_weight",
                "linear.teacher_grad_bias",
            ],
        )?,
        Some(TeacherGrads::Logits(g)) => {
            let p = a.teacher_grad_logits;
            if !(p as usize).is_multiple_of(sh.dtype.size()) {
                return invalid("linear.teacher_grad_logits", "pointer is not aligned");
            }
            let bytes = crate::tensor::OwnedData::from_f32(g, sh.dtype);
            let src = bytes.view();
            let src = src.bytes();
            // SAFETY: the caller's contract: N·V elements of `dtype`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p.cast::<u8>(), src.len()) };
        }
        None => {}
    }
    Ok(())
}

/// `kdfuse_linear_loss_host` on device memory: enqueues the chunk loop
/// (cuBLAS GEMMs with fp32 accumulation, the fused loss kernels, one
/// reduction) on `stream` (a `CUstream` of the context's device, NULL the
/// legacy default stream) and returns without waiting. Every pointer in
/// `args` is device memory; `loss`, `row_losses` and `valid_rows` are
/// required (the batch's valid count is kept there for every chunk). For
/// bf16/f16 operands each chunk's logit gradient is rounded to the operand
/// dtype before the gradient GEMMs (see the Rust docs of
/// `fused_linear::compute_cuda_raw`). Top-k indices are not checked: a bad
/// one gives a NaN row. Chunk buffers are allocated on `stream`.
///
/// # Safety
/// `ctx` from `kdfuse_context_create`; `args` and `params` readable structs
/// of their own size; the device pointers hold what the shapes need and
/// stay alive until the stream has run the work.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_linear_loss_cuda(
    ctx: *const KdfuseContext,
    args: *const KdfuseLinearArgs,
    params: *const types::KdfuseParams,
    stream: *mut c_void,
) -> KdfuseStatus {
    guard(|| {
        let ctx = non_null("ctx", ctx)?;
        // SAFETY: the caller's contract.
        let (a, sh, spec) = unsafe { read(args, params) }?;
        let d = sh.dtype.size();
        let al = |arg: &'static str, p: *const c_void, size: usize| -> Result<u64> {
            if !(p as usize).is_multiple_of(size) {
                return invalid(arg, "pointer is not aligned for its element type");
            }
            Ok(p as u64)
        };
        let head = |(hd, w, b): (*const c_void, *const c_void, *const c_void),
                    names: [&'static str; 3],
                    (hs, rows): (usize, usize)|
         -> Result<RawHead> {
            Ok(RawHead {
                hidden: al(names[0], hd, d)?,
                weight: al(names[1], w, d)?,
                bias: al(names[2], b, d)?,
                hidden_size: hs,
                weight_rows: rows,
            })
        };
        let grads = |p: [*mut f32; 3], names: [&'static str; 3]| -> Result<RawHeadGrads> {
            Ok(RawHeadGrads {
                hidden: al(names[0], p[0].cast_const().cast(), 4)?,
                weight: al(names[1], p[1].cast_const().cast(), 4)?,
                bias: al(names[2], p[2].cast_const().cast(), 4)?,
            })
        };
        let student = head(
            (a.student_hidden, a.student_weight, a.student_bias),
            [
                "linear.student_hidden",
                "linear.student_weight",
                "linear.student_bias",
            ],
            (sh.h, sh.v),
        )?;
        let teacher = match sh.kind {
            KdfuseLinearTeacher::Linear => RawTeacher::Linear(head(
                (a.teacher_hidden, a.teacher_weight, a.teacher_bias),
                [
                    "linear.teacher_hidden",
                    "linear.teacher_weight",
                    "linear.teacher_bias",
                ],
                (sh.ht, sh.vt),
            )?),
            KdfuseLinearTeacher::Logits => RawTeacher::Logits {
                logits: al("linear.teacher_logits", a.teacher_logits, d)?,
                row_stride: sh.stride,
            },
            KdfuseLinearTeacher::Topk => RawTeacher::Topk {
                indices: al(
                    "linear.topk_indices",
                    a.topk_indices,
                    if sh.i64s { 8 } else { 4 },
                )?,
                indices_i64: sh.i64s,
                values: al("linear.topk_values", a.topk_values, d)?,
                k: sh.k,
            },
        };
        let raw = RawLinearArgs {
            dtype: sh.dtype,
            rows: sh.n,
            vocab: sh.v,
            student,
            teacher,
            labels: al("linear.labels", a.labels.cast(), 8)?,
            row_weights: al("linear.row_weights", a.row_weights.cast(), 4)?,
            row_losses: al("linear.row_losses", a.row_losses.cast_const().cast(), 4)?,
            loss: al("linear.loss", a.loss.cast_const().cast(), 4)?,
            valid_rows: al("linear.valid_rows", a.valid_rows.cast_const().cast(), 4)?,
            student_grads: Some(grads(
                [a.grad_hidden, a.grad_weight, a.grad_bias],
                [
                    "linear.grad_hidden",
                    "linear.grad_weight",
                    "linear.grad_bias",
                ],
            )?),
            teacher_grads: Some(grads(
                [
                    a.teacher_grad_hidden,
                    a.teacher_grad_weight,
                    a.teacher_grad_bias,
                ],
                [
                    "linear.teacher_grad_hidden",
                    "linear.teacher_grad_weight",
                    "linear.teacher_grad_bias",
                ],
            )?),
            teacher_logits_grad: al(
                "linear.teacher_grad_logits",
                a.teacher_grad_logits.cast_const(),
                d,
            )?,
        };
        fused_linear::check_raw(&raw, &spec).map_err(field)?;
        // SAFETY: the caller's contract.
        let stream = unsafe { ctx.stream(stream) };
        // SAFETY: the caller's contract; checked above.
        unsafe { fused_linear::compute_cuda_raw(&ctx.backend, &stream, &raw, &spec) }.map_err(field)
    })
}
