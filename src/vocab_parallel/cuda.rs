//! The vocab-parallel protocol on the device (kernels/vocab_parallel/vp.cu):
//! the three steps of the host API ([`super::round_stats`],
//! [`super::finish`]) launched on raw device pointers and a caller's stream,
//! asynchronously (no host synchronisation inside), in the C ABI's style.
//!
//! Per step: round 1 or 2 is one `kd_vp_round{1,2}_<in>` launch writing this
//! rank's `[N, STATS_WIDTH]` f64 records (the host's layout, version 1: a
//! CPU rank and a GPU rank can be mixed); the caller all-gathers them in
//! rank order into `[world, N, STATS_WIDTH]` (e.g. NCCL all-gather on the
//! same stream). The finish is `kd_count_valid` (with labels), one
//! `kd_vp_finish_<in>_<out>` launch (row losses in f64, the shard's
//! gradients) and `kd_vp_reduce_loss` (the reduced loss, one f64).
//!
//! The arguments are checked as the host path checks them (the same errors)
//! as far as that needs no device data: the spec, the shard, the shapes,
//! dtypes and strides. What lives in device memory is not read back: a label
//! outside `[0, V)` or a top-k index outside `[0, V)` or repeated makes its
//! row NaN on every rank (never an out-of-bounds read), and the gathered
//! records' headers (version, round, tiling), which the host path checks,
//! are trusted.

use super::params::{self, VpDims, VpFinishArgs, VpParams, VpReduceArgs, VpStatsArgs};
use super::{
    check_round, check_round2, validate_dense_teacher, validate_finish, validate_head,
    validate_round, validate_topk_head, Gathered, ShardInputs, ShardTeacher, VocabShard,
    STATS_WIDTH,
};
use crate::cuda::{allow_smem, io, upload, CudaBackend, Kernel};
use crate::driver::KdOutput;
use crate::error::{invalid, Result};
use crate::spec::LossSpec;
use crate::tensor::{Dtype, GradDtype, TopkIndices};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// One rank's inputs on the device: pointers (0 = absent) and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawVpShard {
    /// Dtype of the student, a dense teacher and top-k values.
    pub dtype: Dtype,
    /// Student logits `[N, cols]`, row stride `student_stride`.
    pub student: u64,
    /// Rows N.
    pub rows: usize,
    /// Columns of the shard in memory (V_local, padding included).
    pub cols: usize,
    /// Student row stride (elements, ≥ cols).
    pub student_stride: usize,
    /// Dense teacher logits `[N, cols]`, or 0 for a top-k teacher.
    pub teacher: u64,
    /// Dense teacher row stride (elements, ≥ cols).
    pub teacher_stride: usize,
    /// Top-k teacher indices `[N, k]` (global, int32 or int64), or 0.
    pub topk_indices: u64,
    /// The indices are int64 (else int32).
    pub indices_i64: bool,
    /// Top-k teacher values `[N, k]` (`dtype`), or 0.
    pub topk_values: u64,
    /// Entries per row of a top-k teacher (0 for a dense teacher).
    pub k: usize,
    /// Hard labels (i64, N, global), or 0; the same on every rank.
    pub labels: u64,
    /// Row weights (f32, N), or 0; the same on every rank.
    pub row_weights: u64,
    /// The shard's place.
    pub shard: VocabShard,
}

/// The outputs of [`CudaBackend::vp_finish_raw`] (device pointers, 0 =
/// absent).
#[derive(Debug, Clone, Copy)]
pub struct RawVpOutputs {
    /// ∂L/∂student of this shard `[N, cols]` (padding columns 0), or 0 for
    /// the loss only.
    pub grad: u64,
    /// Dtype of the gradients: the input's or f32.
    pub grad_dtype: Dtype,
    /// Gradient row stride (elements, ≥ cols).
    pub grad_stride: usize,
    /// ∂L/∂teacher of a dense teacher (needs `LossSpec::grad_teacher` and a
    /// student gradient), or 0.
    pub grad_teacher: u64,
    /// Teacher-gradient row stride (elements, ≥ cols).
    pub grad_teacher_stride: usize,
    /// Row losses (f64, N; weighted, ignored rows 0), the same on every rank.
    pub row_losses: u64,
    /// The reduced loss (one f64), the same on every rank.
    pub loss: u64,
    /// Valid-row count scratch (one i32); needed with labels.
    pub valid_rows: u64,
}

/// A row stride against the columns (the host's `Logits::validate` words).
fn check_stride(arg: &'static str, stride: usize, cols: usize) -> Result<()> {
    if stride < cols {
        return invalid(arg, format!("row stride {stride} is below V = {cols}"));
    }
    Ok(())
}

/// The host path's checks that need no device data; returns the shape.
fn validate(raw: &RawVpShard, spec: &LossSpec, world: usize) -> Result<VpDims> {
    validate_head(spec, raw.labels != 0, raw.shard)?;
    if raw.cols == 0 {
        return invalid("student", "needs at least one column (V ≥ 1)");
    }
    if raw.cols > i32::MAX as usize {
        return invalid("student", format!("V = {} exceeds {}", raw.cols, i32::MAX));
    }
    check_stride("student", raw.student_stride, raw.cols)?;
    if raw.student == 0 {
        return invalid("student", "device pointer is null");
    }
    let topk = if raw.teacher != 0 {
        if raw.topk_indices != 0 || raw.topk_values != 0 {
            return invalid(
                "teacher",
                "give a dense teacher or a top-k teacher, not both",
            );
        }
        check_stride("teacher", raw.teacher_stride, raw.cols)?;
        validate_dense_teacher(
            raw.dtype,
            (raw.rows, raw.cols),
            raw.dtype,
            (raw.rows, raw.cols),
        )?;
        None
    } else {
        validate_topk_head(spec, raw.k, raw.shard.vocab_size, raw.dtype, raw.dtype)?;
        if raw.topk_indices == 0 || raw.topk_values == 0 {
            return invalid(
                "teacher",
                "needs a dense teacher or a top-k teacher's indices and values",
            );
        }
        if raw.k > i32::MAX as usize {
            return invalid("k", format!("must be at most {}, got {}", i32::MAX, raw.k));
        }
        Some((raw.k, raw.indices_i64))
    };
    Ok(VpDims {
        rows: raw.rows,
        cols: raw.cols,
        student_stride: raw.student_stride,
        teacher_stride: raw.teacher_stride,
        grad_stride: raw.cols,
        grad_teacher_stride: raw.cols,
        shard: raw.shard,
        topk,
        world,
    })
}

impl CudaBackend {
    /// Enqueues this rank's statistics of `round` (1 or 2) on `stream`:
    /// `[N, STATS_WIDTH]` f64 records into `stats`, to be all-gathered in
    /// rank order. Round 2 (JSD and TVD, [`collectives`]) reads the gathered
    /// round 1 at `round1` (`[world, N, STATS_WIDTH]` f64); round 1 takes
    /// `round1 = 0` and `world = 0`.
    ///
    /// # Safety
    /// Every non-zero pointer must be valid device memory of this context
    /// holding what `raw` and the round describe (student and a dense
    /// teacher (N−1)·stride + cols elements; top-k indices and values N·k;
    /// labels and row weights N; `stats` N·STATS_WIDTH f64; `round1`
    /// world·N·STATS_WIDTH f64), and stay alive until the stream has run
    /// the work.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn vp_round_stats_raw(
        &self,
        stream: &CudaStream,
        raw: &RawVpShard,
        spec: &LossSpec,
        round: usize,
        round1: u64,
        world: usize,
        stats: u64,
    ) -> Result<()> {
        let dims = validate(raw, spec, world)?;
        check_round(spec, round, round1 != 0)?;
        if round1 != 0 {
            check_world("round1", world)?;
        }
        if stats == 0 {
            return invalid("stats", "device pointer is null");
        }
        if raw.rows == 0 {
            return Ok(());
        }
        let p = VpParams::new(spec, &dims);
        let args = VpStatsArgs {
            student: raw.student,
            teacher: raw.teacher,
            topk_indices: raw.topk_indices,
            topk_values: raw.topk_values,
            labels: raw.labels,
            row_weights: raw.row_weights,
            round1,
            stats,
            params: p,
        };
        let f = self.kernel(Kernel::VpStats {
            round2: round == 2,
            dtype: raw.dtype,
        })?;
        let smem = if round == 1 { self.vp_bitmap(&p)? } else { 0 };
        allow_smem(f, smem)?;
        let mut b = stream.launch_builder(f);
        b.arg(&args);
        // SAFETY: the caller's contract.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (params::grid(raw.rows), 1, 1),
                block_dim: (params::threads(raw.cols), 1, 1),
                shared_mem_bytes: smem,
            })
        }?;
        Ok(())
    }

    /// Enqueues the finish on `stream`: from the gathered records of round 1
    /// (and round 2 for JSD and TVD, else `round2 = 0`), both `[world, N,
    /// STATS_WIDTH]` f64, the row losses and the reduced loss (f64, the same
    /// on every rank) and the gradients of this shard that `out` asks for.
    ///
    /// # Safety
    /// As [`CudaBackend::vp_round_stats_raw`]; `out`'s gradients hold
    /// (N−1)·stride + cols elements of `grad_dtype`, `row_losses` N f64,
    /// `loss` one f64, `valid_rows` one i32; no output overlaps an input.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn vp_finish_raw(
        &self,
        stream: &CudaStream,
        raw: &RawVpShard,
        spec: &LossSpec,
        round1: u64,
        round2: u64,
        world: usize,
        out: &RawVpOutputs,
    ) -> Result<()> {
        let mut dims = validate(raw, spec, world)?;
        if round1 == 0 {
            return invalid("round1", "device pointer is null");
        }
        check_world("round1", world)?;
        check_round2(spec, round2 != 0)?;
        if out.row_losses == 0 || out.loss == 0 {
            return invalid("row_losses", "row_losses and loss must be non-null");
        }
        if raw.labels != 0 && out.valid_rows == 0 {
            return invalid("valid_rows", "labels need the valid-row count scratch");
        }
        let io = io(raw.dtype, out.grad_dtype)?;
        if out.grad != 0 {
            check_stride("grad_stride", out.grad_stride, raw.cols)?;
            dims.grad_stride = out.grad_stride;
        }
        if out.grad_teacher != 0 {
            if !spec.grad_teacher {
                return invalid(
                    "grad_teacher",
                    "a teacher-gradient buffer needs LossSpec::grad_teacher",
                );
            }
            if dims.topk.is_some() {
                return invalid(
                    "grad_teacher",
                    "a top-k teacher is fixed data; the teacher gradient needs a dense teacher",
                );
            }
            if out.grad == 0 {
                return invalid("grad_teacher", "needs the student gradient too");
            }
            check_stride("grad_teacher_stride", out.grad_teacher_stride, raw.cols)?;
            dims.grad_teacher_stride = out.grad_teacher_stride;
        }
        let n = raw.rows as i64;
        // SAFETY: the caller's contract (labels N, valid_rows one i32).
        let valid = unsafe {
            self.count_valid_rows(stream, raw.labels, n, spec.ignore_index, out.valid_rows)?
        };
        let p = VpParams::new(spec, &dims);
        if raw.rows > 0 {
            let args = VpFinishArgs {
                student: raw.student,
                teacher: raw.teacher,
                topk_indices: raw.topk_indices,
                topk_values: raw.topk_values,
                labels: raw.labels,
                row_weights: raw.row_weights,
                round1,
                round2,
                valid_count: valid,
                grad: out.grad,
                grad_teacher: out.grad_teacher,
                row_loss: out.row_losses,
                params: p,
            };
            let f = self.kernel(Kernel::VpFinish { io })?;
            let smem = self.vp_bitmap(&p)?;
            allow_smem(f, smem)?;
            let mut b = stream.launch_builder(f);
            b.arg(&args);
            // SAFETY: the caller's contract.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (params::grid(raw.rows), 1, 1),
                    block_dim: (params::threads(raw.cols), 1, 1),
                    shared_mem_bytes: smem,
                })
            }?;
        }
        let red = VpReduceArgs {
            row_loss: out.row_losses,
            n_rows: n,
            valid_count: valid,
            out: out.loss,
            reduction: p.reduction,
            vocab_size: p.vocab_size,
        };
        let mut b = stream.launch_builder(self.kernel(Kernel::VpReduceLoss)?);
        b.arg(&red);
        // SAFETY: the caller's contract (row_losses N f64, loss one f64).
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// The top-k bit map's dynamic shared memory, checked against the device.
    fn vp_bitmap(&self, p: &VpParams) -> Result<u32> {
        let bytes = params::bitmap_bytes(p);
        if bytes == 0 {
            return Ok(0);
        }
        self.bitmap_bytes(p.real_cols as usize)
    }
}

fn check_world(arg: &'static str, world: usize) -> Result<()> {
    if world == 0 || world > i32::MAX as usize {
        return invalid(arg, "world must be ≥ 1");
    }
    Ok(())
}

/// Elements of one rank's records for `rows` rows.
pub fn stats_len(rows: usize) -> usize {
    rows * STATS_WIDTH
}

/// Host copies of one shard uploaded for [`CudaBackend::vp_round_stats`]
/// and [`CudaBackend::vp_finish`]: the buffers (kept alive) and the raw
/// arguments pointing at them.
struct Uploaded {
    _bufs: Vec<CudaSlice<u8>>,
    raw: RawVpShard,
}

/// Uploads `bytes` (one element at least) and returns its device pointer.
fn put(stream: &Arc<CudaStream>, bufs: &mut Vec<CudaSlice<u8>>, bytes: &[u8]) -> Result<u64> {
    let b = upload(stream, bytes)?;
    let p = b.device_ptr(stream).0;
    bufs.push(b);
    Ok(p)
}

fn upload_shard(stream: &Arc<CudaStream>, inputs: &ShardInputs) -> Result<Uploaded> {
    let mut bufs = Vec::new();
    let s = inputs.student;
    let student = put(stream, &mut bufs, s.data.bytes())?;
    let mut raw = RawVpShard {
        dtype: s.dtype(),
        student,
        rows: s.rows,
        cols: s.cols,
        student_stride: s.row_stride,
        teacher: 0,
        teacher_stride: s.cols,
        topk_indices: 0,
        indices_i64: false,
        topk_values: 0,
        k: 0,
        labels: 0,
        row_weights: 0,
        shard: inputs.shard,
    };
    match inputs.teacher {
        ShardTeacher::Dense(t) => {
            raw.teacher = put(stream, &mut bufs, t.data.bytes())?;
            raw.teacher_stride = t.row_stride;
        }
        ShardTeacher::Topk(t) => {
            let (bytes, i64): (&[u8], bool) = match t.indices {
                TopkIndices::I32(x) => (bytemuck::cast_slice(x), false),
                TopkIndices::I64(x) => (bytemuck::cast_slice(x), true),
            };
            raw.topk_indices = put(stream, &mut bufs, bytes)?;
            raw.indices_i64 = i64;
            raw.topk_values = put(stream, &mut bufs, t.values.bytes())?;
            raw.k = t.k;
        }
    }
    if let Some(l) = inputs.labels {
        raw.labels = put(stream, &mut bufs, bytemuck::cast_slice(l))?;
    }
    if let Some(w) = inputs.row_weights {
        raw.row_weights = put(stream, &mut bufs, bytemuck::cast_slice(w))?;
    }
    Ok(Uploaded { _bufs: bufs, raw })
}

/// f64 values to the device.
fn put_f64(stream: &Arc<CudaStream>, x: &[f64]) -> Result<CudaSlice<f64>> {
    upload(stream, x)
}

impl CudaBackend {
    /// [`super::round_stats`] on the device, from and to host memory (the
    /// same checks; the inputs uploaded, the records poisoned with NaN
    /// before the launch and downloaded after it), on this backend's
    /// stream. For tests and for mixing GPU and CPU ranks; a trainer keeps
    /// its buffers on the device and calls
    /// [`CudaBackend::vp_round_stats_raw`].
    pub fn vp_round_stats(
        &self,
        inputs: &ShardInputs,
        spec: &LossSpec,
        round: usize,
        round1: Option<&Gathered>,
    ) -> Result<Vec<f64>> {
        validate_round(inputs, spec, round, round1)?;
        let stream = &self.stream;
        let up = upload_shard(stream, inputs)?;
        let n = up.raw.rows;
        let g1 = round1.map(|g| put_f64(stream, g.stats)).transpose()?;
        let out = put_f64(stream, &vec![f64::NAN; stats_len(n)])?;
        {
            let g1p = g1.as_ref().map(|g| g.device_ptr(stream));
            let (op, _g) = out.device_ptr(stream);
            // SAFETY: every buffer was uploaded at its validated size.
            unsafe {
                self.vp_round_stats_raw(
                    stream,
                    &up.raw,
                    spec,
                    round,
                    g1p.as_ref().map_or(0, |p| p.0),
                    round1.map_or(0, |g| g.world),
                    op,
                )?;
            }
        }
        let mut v = stream.clone_dtoh(&out)?;
        v.truncate(stats_len(n));
        Ok(v)
    }

    /// [`super::finish`] on the device, from and to host memory (as
    /// [`CudaBackend::vp_round_stats`]; outputs poisoned before the launch).
    pub fn vp_finish(
        &self,
        inputs: &ShardInputs,
        spec: &LossSpec,
        round1: &Gathered,
        round2: Option<&Gathered>,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        let topk = validate_finish(inputs, spec, round1, round2)?;
        let stream = &self.stream;
        let up = upload_shard(stream, inputs)?;
        let (n, vl) = (up.raw.rows, up.raw.cols);
        let dtype = grad.map(|g| g.dtype_for(up.raw.dtype));
        let want_t = dtype.is_some() && spec.grad_teacher && !topk;
        let out_dtype = dtype.unwrap_or(Dtype::F32);
        let g1 = put_f64(stream, round1.stats)?;
        let g2 = round2.map(|g| put_f64(stream, g.stats)).transpose()?;
        let poison = |want: bool| -> Result<CudaSlice<u8>> {
            upload(
                stream,
                &vec![0xffu8; if want { n * vl * out_dtype.size() } else { 0 }],
            )
        };
        let gs = poison(dtype.is_some())?;
        let gt = poison(want_t)?;
        let rows = put_f64(stream, &vec![f64::NAN; n])?;
        let loss = put_f64(stream, &[f64::NAN])?;
        let valid = upload(stream, &[-1i32])?;
        {
            let (g1p, _a) = g1.device_ptr(stream);
            let g2p = g2.as_ref().map(|g| g.device_ptr(stream));
            let (gsp, _b) = gs.device_ptr(stream);
            let (gtp, _c) = gt.device_ptr(stream);
            let (rp, _d) = rows.device_ptr(stream);
            let (lp, _e) = loss.device_ptr(stream);
            let (vp, _f) = valid.device_ptr(stream);
            let out = RawVpOutputs {
                grad: if dtype.is_some() { gsp } else { 0 },
                grad_dtype: out_dtype,
                grad_stride: vl,
                grad_teacher: if want_t { gtp } else { 0 },
                grad_teacher_stride: vl,
                row_losses: rp,
                loss: lp,
                valid_rows: vp,
            };
            // SAFETY: every buffer was uploaded or allocated at its
            // validated size; the gradients are dense [N, V_local].
            unsafe {
                self.vp_finish_raw(
                    stream,
                    &up.raw,
                    spec,
                    g1p,
                    g2p.as_ref().map_or(0, |p| p.0),
                    round1.world,
                    &out,
                )?;
            }
        }
        let mut row_losses = stream.clone_dtoh(&rows)?;
        row_losses.truncate(n);
        let valid_rows = if inputs.labels.is_some() {
            stream.clone_dtoh(&valid)?[0] as usize
        } else {
            n
        };
        let decode = |b: &CudaSlice<u8>| -> Result<Vec<f32>> {
            let mut bytes = stream.clone_dtoh(b)?;
            bytes.truncate(n * vl * out_dtype.size());
            Ok(out_dtype.decode(&bytes))
        };
        Ok(KdOutput {
            loss: stream.clone_dtoh(&loss)?[0],
            row_losses,
            valid_rows,
            grad: dtype.map(|_| decode(&gs)).transpose()?,
            grad_teacher: want_t.then(|| decode(&gt)).transpose()?,
        })
    }

    /// The whole protocol for every shard on this device (the all-gathers by
    /// concatenation on the host), as [`super::run_in_process`].
    pub fn vp_run_in_process(
        &self,
        shards: &[ShardInputs],
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<Vec<KdOutput>> {
        super::in_process(
            shards,
            spec,
            |s, round, prev| self.vp_round_stats(s, spec, round, prev),
            |s, r1, r2| self.vp_finish(s, spec, r1, r2, grad),
        )
    }
}
