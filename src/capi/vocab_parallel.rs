//! The C ABI of vocab-parallel distillation (`crate::vocab_parallel`): the
//! calls of the split-phase protocol on host memory (`_host`, f64 on the
//! CPU) and on device memory and the caller's stream (`_cuda`, the
//! kernels of kernels/vocab_parallel), the caller's collective (e.g. its
//! own NCCL or MPI all-gather) between them.

use super::{
    aligned, check_batch_alignment, guard, host_batch, non_null, out_ref, read_spec, types,
    write_host_outputs, HostTeacher,
};
use super::{KdfuseBatch, KdfuseContext, KdfuseParams, KdfuseStatus};
use crate::error::{invalid, KdError, Result};
use crate::vocab_parallel::cuda::{RawVpOutputs, RawVpShard};
use crate::vocab_parallel::{self as vp, Gathered, ShardInputs, ShardTeacher, VocabShard};
use cudarc::driver::CudaStream;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

/// f64 values per row in a vocab-parallel statistics record (both rounds).
pub const KDFUSE_VP_STATS_WIDTH: i64 = 20;

/// The layout version of the statistics records this library writes and
/// reads (slot 0 of every record).
pub const KDFUSE_VP_STATS_VERSION: u32 = 1;

// Literals for cbindgen; the library's own values.
const _: () = assert!(KDFUSE_VP_STATS_WIDTH as usize == vp::STATS_WIDTH);
const _: () = assert!(KDFUSE_VP_STATS_VERSION == vp::STATS_VERSION);

/// Where a rank's vocabulary shard sits. Fill it with `kdfuse_shard_init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KdfuseShard {
    /// `sizeof(KdfuseShard)`.
    pub size: u32,
    /// 1.
    pub version: u32,
    /// The global index of the shard's first column (≥ 0).
    pub vocab_start: i64,
    /// The real vocabulary size V (≥ 1): columns at global index ≥ V are
    /// padding (not read, gradient 0).
    pub vocab_size: i64,
}

impl KdfuseShard {
    /// The caller's shard, checked.
    ///
    /// # Safety
    /// `p` is NULL or a readable `KdfuseShard` of its own size.
    unsafe fn read(p: *const KdfuseShard) -> Result<VocabShard> {
        let known = [(1, size_of::<KdfuseShard>())];
        let init = KdfuseShard {
            size: 0,
            version: 0,
            vocab_start: 0,
            vocab_size: 0,
        };
        // SAFETY: the caller's contract.
        let s = unsafe { types::read_sized("shard", p, init, &known) }?;
        let field = |arg: &'static str, x: i64| -> Result<usize> {
            usize::try_from(x).or_else(|_| invalid(arg, format!("must be ≥ 0, got {x}")))
        };
        Ok(VocabShard {
            vocab_start: field("shard.vocab_start", s.vocab_start)?,
            vocab_size: field("shard.vocab_size", s.vocab_size)?,
        })
    }
}

/// Fills `*out` for the shard starting at global column `vocab_start` of a
/// vocabulary of `vocab_size` real columns.
///
/// # Safety
/// `out` must be NULL or point to writable memory for one `KdfuseShard`.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_shard_init(
    out: *mut KdfuseShard,
    vocab_start: i64,
    vocab_size: i64,
) -> KdfuseStatus {
    guard(|| {
        *out_ref(out)? = KdfuseShard {
            size: size_of::<KdfuseShard>() as u32,
            version: 1,
            vocab_start,
            vocab_size,
        };
        Ok(())
    })
}

/// `*out` = the all-gathers one step of `params` needs: 1 (forward and
/// reverse KL, soft CE, top-k teachers, α = 1) or 2 (JSD with 0 < β < 1,
/// TVD).
///
/// # Safety
/// `params` is NULL or a readable `KdfuseParams` of its own size; `out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_vp_collectives(
    params: *const KdfuseParams,
    out: *mut i32,
) -> KdfuseStatus {
    guard(|| {
        // SAFETY: the caller's contract.
        let spec = unsafe { read_spec(params) }?;
        *out_ref(out)? = vp::collectives(&spec) as i32;
        Ok(())
    })
}

/// The shard's inputs from a host batch: `cols` is the shard's width
/// V_local (padding included), `labels` and `topk_indices` are global.
///
/// # Safety
/// As `kdfuse_compute_host` for the batch; `shard` as `KdfuseShard::read`.
unsafe fn with_shard(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    need_loss: bool,
    f: impl FnOnce(&KdfuseBatch, &types::BatchShape, &ShardInputs, &crate::spec::LossSpec) -> Result<()>,
) -> KdfuseStatus {
    guard(|| {
        // SAFETY: the caller's contract (readable structs of their own size).
        let b = unsafe { KdfuseBatch::read(batch) }?;
        // SAFETY: as above.
        let spec = unsafe { read_spec(params) }?;
        // SAFETY: as above.
        let sh = unsafe { KdfuseShard::read(shard) }?;
        // SAFETY: the caller's contract: host buffers of the batch's shape.
        let hb = unsafe { host_batch(&b, &spec, Some(sh.vocab_size), need_loss) }?;
        let inputs = ShardInputs {
            student: hb.student,
            teacher: match hb.teacher {
                HostTeacher::Dense(t) => ShardTeacher::Dense(t),
                HostTeacher::Topk(t) => ShardTeacher::Topk(t),
            },
            labels: hb.labels,
            row_weights: hb.row_weights,
            shard: sh,
        };
        f(&b, &hb.shape, &inputs, &spec).map_err(field)
    })
}

/// A library error renamed to the C field the caller set.
fn field(e: KdError) -> KdError {
    super::renamed(
        e,
        &[
            ("teacher_topk_indices", "batch.topk_indices"),
            ("teacher_topk_values", "batch.topk_values"),
            ("k", "batch.topk_k"),
            ("row_weights", "batch.row_weights"),
            ("labels", "batch.labels"),
            ("student", "batch.student"),
            ("teacher", "batch.teacher"),
            ("vocab_size", "shard.vocab_size"),
            ("vocab_start", "shard.vocab_start"),
        ],
    )
}

/// `world` gathered records of `rows` rows at `p` (NULL: `None`).
///
/// # Safety
/// `p` is NULL or `world·rows·KDFUSE_VP_STATS_WIDTH` readable doubles.
unsafe fn gathered<'a>(
    arg: &'static str,
    p: *const f64,
    world: i64,
    rows: usize,
) -> Result<Option<Gathered<'a>>> {
    if p.is_null() {
        return Ok(None);
    }
    super::aligned(arg, p)?;
    let world = usize::try_from(world)
        .ok()
        .filter(|&w| w >= 1)
        .ok_or_else(|| KdError::InvalidArgument {
            arg: "world",
            msg: format!("must be ≥ 1, got {world}"),
        })?;
    let Some(len) = world
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(vp::STATS_WIDTH))
        .filter(|x| x.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize))
    else {
        return invalid("world", "world·N·KDFUSE_VP_STATS_WIDTH overflows");
    };
    // SAFETY: the caller's contract.
    let stats = unsafe { std::slice::from_raw_parts(p, len) };
    Ok(Some(Gathered { stats, world }))
}

/// Round `round` (1 or 2) of the protocol on this rank's shard: writes
/// `[N, KDFUSE_VP_STATS_WIDTH]` doubles to `stats`, which the caller
/// all-gathers (rank order) into `[world, N, KDFUSE_VP_STATS_WIDTH]`.
/// Round 2 (when `kdfuse_vp_collectives` says 2) takes the gathered round
/// 1 as `round1` (`world` records per row); round 1 takes NULL. The batch
/// is this rank's shard: `cols` = V_local (padding included), the student
/// (and a dense teacher) `[N, V_local]`, `labels` global (in `[0, V)` or
/// `ignore_index`), a top-k teacher whole (`[N, k]` global indices, the
/// same on every rank); `loss` and the gradients are not used and may be
/// NULL. Arithmetic in f64 on the host.
///
/// # Safety
/// As `kdfuse_compute_host` for the batch's inputs; `stats` writable for
/// N·KDFUSE_VP_STATS_WIDTH doubles; `round1` NULL or readable for
/// world·N·KDFUSE_VP_STATS_WIDTH doubles.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_vp_round_stats_host(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    round: i32,
    round1: *const f64,
    world: i64,
    stats: *mut f64,
) -> KdfuseStatus {
    // SAFETY: the caller's contract.
    unsafe {
        with_shard(batch, params, shard, false, |_, sh, inputs, spec| {
            non_null("stats", stats.cast_const())?;
            let rows = sh.layout.rows;
            let g1 = gathered("round1", round1, world, rows)?;
            let round = usize::try_from(round).unwrap_or(0);
            let rec = vp::round_stats(inputs, spec, round, g1.as_ref())?;
            std::ptr::copy_nonoverlapping(rec.as_ptr(), stats, rec.len());
            Ok(())
        })
    }
}

/// The step's results on this rank from the gathered statistics: `round1`
/// and, for two-collective losses, `round2` (else NULL), each `[world, N,
/// KDFUSE_VP_STATS_WIDTH]` doubles in rank order. Writes the batch's
/// outputs as `kdfuse_compute_host` does, except that `loss` and
/// `row_losses` hold **doubles** (whatever their C type in `KdfuseBatch`):
/// `loss` (required; the same on every rank), `row_losses` (N) and
/// `valid_rows` when set, and the gradient of
/// this shard `[N, V_local]` (padding columns 0) when `grad` is set (and
/// the teacher's with `params.grad_teacher` on a dense teacher). The batch
/// is the one of `kdfuse_vp_round_stats_host`.
///
/// # Safety
/// As `kdfuse_compute_host` for the batch; `round1` (and `round2` when not
/// NULL) readable for world·N·KDFUSE_VP_STATS_WIDTH doubles.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_vp_finish_host(
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    round1: *const f64,
    round2: *const f64,
    world: i64,
) -> KdfuseStatus {
    // SAFETY: the caller's contract.
    unsafe {
        with_shard(batch, params, shard, true, |b, sh, inputs, spec| {
            let rows = sh.layout.rows;
            let g1 = gathered("round1", round1, world, rows)?.ok_or_else(|| {
                KdError::InvalidArgument {
                    arg: "round1",
                    msg: "must not be NULL".into(),
                }
            })?;
            let g2 = gathered("round2", round2, world, rows)?;
            let grad = (!b.grad.is_null() || !b.grad_teacher.is_null()).then_some(
                if sh.grad_dtype == sh.dtype {
                    crate::GradDtype::Input
                } else {
                    crate::GradDtype::F32
                },
            );
            let out = vp::finish(inputs, spec, &g1, g2.as_ref(), grad)?;
            write_host_outputs(b, sh, &out, true)
        })
    }
}

/// The batch as this rank's shard on the device (pointers as given).
fn raw_shard(b: &KdfuseBatch, sh: &types::BatchShape, shard: VocabShard) -> RawVpShard {
    let topk = sh.topk;
    RawVpShard {
        dtype: sh.dtype,
        student: b.student as u64,
        rows: sh.layout.rows,
        cols: sh.layout.cols,
        student_stride: sh.layout.student_stride,
        teacher: b.teacher as u64,
        teacher_stride: sh.layout.teacher_stride,
        topk_indices: b.topk_indices as u64,
        indices_i64: topk.is_some_and(|t| t.indices_i64),
        topk_values: b.topk_values as u64,
        k: topk.map_or(0, |t| t.k),
        labels: b.labels as u64,
        row_weights: b.row_weights as u64,
        shard,
    }
}

/// The checked device batch, spec and shard of a CUDA call, and the
/// caller's stream.
///
/// # Safety
/// As `kdfuse_compute_cuda` for the structs and the stream.
unsafe fn with_device_shard(
    ctx: *const KdfuseContext,
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    stream: *mut c_void,
    need_loss: bool,
    f: impl FnOnce(
        &KdfuseContext,
        &Arc<CudaStream>,
        &KdfuseBatch,
        &types::BatchShape,
        &RawVpShard,
        &crate::spec::LossSpec,
    ) -> Result<()>,
) -> KdfuseStatus {
    guard(|| {
        let ctx = non_null("ctx", ctx)?;
        // SAFETY: the caller's contract (readable structs of their own size).
        let b = unsafe { KdfuseBatch::read(batch) }?;
        // SAFETY: as above.
        let spec = unsafe { read_spec(params) }?;
        // SAFETY: as above.
        let vs = unsafe { KdfuseShard::read(shard) }?;
        let sh = b.shape_with(&spec, Some(vs.vocab_size), need_loss)?;
        check_batch_alignment(&b, &sh)?;
        aligned("batch.row_losses", b.row_losses.cast::<f64>().cast_const())?;
        aligned("batch.loss", b.loss.cast::<f64>().cast_const())?;
        // SAFETY: the caller's contract.
        let stream = unsafe { ctx.stream(stream) };
        f(ctx, &stream, &b, &sh, &raw_shard(&b, &sh, vs), &spec).map_err(field)
    })
}

/// `world` for the gathered records `arg` at `p` (0 when `p` is NULL).
fn world_of(arg: &'static str, p: *const f64, world: i64) -> Result<usize> {
    if p.is_null() {
        return Ok(0);
    }
    aligned(arg, p)?;
    usize::try_from(world)
        .ok()
        .filter(|&w| (1..=i32::MAX as usize).contains(&w))
        .ok_or_else(|| KdError::InvalidArgument {
            arg: "world",
            msg: format!("must be in [1, {}], got {world}", i32::MAX),
        })
}

/// `kdfuse_vp_round_stats_host` on the device: enqueues round `round` on
/// `stream` (as `kdfuse_compute_cuda`) and returns without waiting. Every
/// pointer (the batch's inputs, `stats`, `round1`) is device memory; the
/// records are the host's (version `KDFUSE_VP_STATS_VERSION`), so CPU and
/// GPU ranks mix. What lives in device memory is not read back: a label or
/// top-k index outside `[0, V)` makes its row NaN on every rank, and the
/// gathered headers are trusted.
///
/// # Safety
/// As `kdfuse_compute_cuda` for the batch's inputs; `stats` device memory
/// for N·KDFUSE_VP_STATS_WIDTH doubles; `round1` NULL or device memory for
/// world·N·KDFUSE_VP_STATS_WIDTH doubles; all alive until the stream has
/// run the work.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_vp_round_stats_cuda(
    ctx: *const KdfuseContext,
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    round: i32,
    round1: *const f64,
    world: i64,
    stats: *mut f64,
    stream: *mut c_void,
) -> KdfuseStatus {
    // SAFETY: the caller's contract.
    unsafe {
        with_device_shard(
            ctx,
            batch,
            params,
            shard,
            stream,
            false,
            |c, s, _, _, raw, spec| {
                non_null("stats", stats.cast_const())?;
                aligned("stats", stats.cast_const())?;
                let w = world_of("round1", round1, world)?;
                let round = usize::try_from(round).unwrap_or(0);
                // SAFETY (the enclosing block): the caller's device buffers.
                c.backend
                    .vp_round_stats_raw(s, raw, spec, round, round1 as u64, w, stats as u64)
            },
        )
    }
}

/// `kdfuse_vp_finish_host` on the device: enqueues the finish on `stream`
/// and returns without waiting. `loss` and `row_losses` are required and
/// hold **doubles**; `valid_rows` (one int32) is required with labels; the
/// gradients as `kdfuse_vp_finish_host`.
///
/// # Safety
/// As `kdfuse_compute_cuda` for the batch; `round1` (and `round2` when not
/// NULL) device memory for world·N·KDFUSE_VP_STATS_WIDTH doubles.
#[no_mangle]
pub unsafe extern "C" fn kdfuse_vp_finish_cuda(
    ctx: *const KdfuseContext,
    batch: *const KdfuseBatch,
    params: *const KdfuseParams,
    shard: *const KdfuseShard,
    round1: *const f64,
    round2: *const f64,
    world: i64,
    stream: *mut c_void,
) -> KdfuseStatus {
    // SAFETY: the caller's contract.
    unsafe {
        with_device_shard(
            ctx,
            batch,
            params,
            shard,
            stream,
            true,
            |c, s, b, sh, raw, spec| {
                non_null("round1", round1)?;
                let w = world_of("round1", round1, world)?;
                if !round2.is_null() {
                    aligned("round2", round2)?;
                }
                if b.row_losses.is_null() {
                    return invalid("batch.row_losses", "required on the device (double, N)");
                }
                if !b.labels.is_null() && b.valid_rows.is_null() {
                    return invalid("batch.valid_rows", "required on the device with labels");
                }
                let out = RawVpOutputs {
                    grad: b.grad as u64,
                    grad_dtype: sh.grad_dtype,
                    grad_stride: sh.layout.grad_stride,
                    grad_teacher: b.grad_teacher as u64,
                    grad_teacher_stride: sh.layout.grad_teacher_stride,
                    row_losses: b.row_losses as u64,
                    loss: b.loss as u64,
                    valid_rows: b.valid_rows as u64,
                };
                // SAFETY (the enclosing block): the caller's device buffers.
                c.backend
                    .vp_finish_raw(s, raw, spec, round1 as u64, round2 as u64, w, &out)
            },
        )
    }
}
