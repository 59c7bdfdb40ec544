//! Test support: kernels/vocab_parallel/vp.cu run on the CPU under the CUDA
//! emulation (kernels/emu/vp_emu.cpp). The same steps as the host API
//! ([`super::round_stats`], [`super::finish`]) with the same checks, but the
//! records, row losses, loss and gradients come from the kernels' own
//! parallel code, launched as src/vocab_parallel/cuda.rs launches them, with
//! every output poisoned first (an element the kernels do not write shows).
//! Slow; not for real use.

use super::params::{self, VpDims, VpFinishArgs, VpParams, VpStatsArgs};
use super::{validate_finish, validate_round, Gathered, ShardInputs, ShardTeacher, STATS_WIDTH};
use crate::driver::KdOutput;
use crate::error::{invalid, Result};
use crate::spec::LossSpec;
use crate::tensor::{Dtype, GradDtype, TopkIndices};

extern "C" {
    fn kd_emu_vp_stats(
        round: i32,
        in_dtype: i32,
        args: *const VpStatsArgs,
        grid: u32,
        block: u32,
    ) -> i32;
    fn kd_emu_vp_finish(
        in_dtype: i32,
        out_dtype: i32,
        args: *const VpFinishArgs,
        valid: *mut i32,
        loss: *mut f64,
        grid: u32,
        block: u32,
    ) -> i32;
}

/// The emulated vocab-parallel kernels (tests only).
#[derive(Debug, Clone, Copy, Default)]
pub struct VpEmu {
    /// Blocks in the grid (rows are grid-strided over them); 0 = min(N, 3).
    pub grid: u32,
    /// Threads per block (a multiple of 32); 0 = the CUDA launcher's choice.
    pub block: u32,
}

/// The host addresses of one shard's inputs, and its shape.
struct Pointers {
    student: u64,
    teacher: u64,
    indices: u64,
    values: u64,
    labels: u64,
    weights: u64,
    dims: VpDims,
}

fn pointers(inputs: &ShardInputs, world: usize) -> Pointers {
    let s = inputs.student;
    let (teacher, teacher_stride, indices, values, topk) = match inputs.teacher {
        ShardTeacher::Dense(t) => (t.data.bytes().as_ptr() as u64, t.row_stride, 0, 0, None),
        ShardTeacher::Topk(t) => {
            let (p, i64) = match t.indices {
                TopkIndices::I32(x) => (x.as_ptr() as u64, false),
                TopkIndices::I64(x) => (x.as_ptr() as u64, true),
            };
            (0, 0, p, t.values.bytes().as_ptr() as u64, Some((t.k, i64)))
        }
    };
    Pointers {
        student: s.data.bytes().as_ptr() as u64,
        teacher,
        indices,
        values,
        labels: inputs.labels.map_or(0, |l| l.as_ptr() as u64),
        weights: inputs.row_weights.map_or(0, |w| w.as_ptr() as u64),
        dims: VpDims {
            rows: s.rows,
            cols: s.cols,
            student_stride: s.row_stride,
            teacher_stride,
            grad_stride: s.cols,
            grad_teacher_stride: s.cols,
            shard: inputs.shard,
            topk,
            world,
        },
    }
}

impl VpEmu {
    fn shape(&self, rows: usize, cols: usize) -> (u32, u32) {
        let grid = if self.grid > 0 {
            self.grid.min(params::grid(rows))
        } else {
            rows.clamp(1, 3) as u32
        };
        let block = if self.block > 0 {
            self.block
        } else {
            params::threads(cols)
        };
        (grid, block)
    }

    /// [`super::round_stats`] on the emulated kernels.
    pub fn round_stats(
        &self,
        inputs: &ShardInputs,
        spec: &LossSpec,
        round: usize,
        round1: Option<&Gathered>,
    ) -> Result<Vec<f64>> {
        validate_round(inputs, spec, round, round1)?;
        let p = pointers(inputs, round1.map_or(0, |g| g.world));
        let n = p.dims.rows;
        // Poisoned: every slot the kernels leave unwritten stays NaN.
        let mut out = vec![f64::NAN; (n * STATS_WIDTH).max(1)];
        let args = VpStatsArgs {
            student: p.student,
            teacher: p.teacher,
            topk_indices: p.indices,
            topk_values: p.values,
            labels: p.labels,
            row_weights: p.weights,
            round1: round1.map_or(0, |g| g.stats.as_ptr() as u64),
            stats: out.as_mut_ptr() as u64,
            params: VpParams::new(spec, &p.dims),
        };
        let (grid, block) = self.shape(n, p.dims.cols);
        // SAFETY: the inputs were validated against their shapes; `out`
        // holds N records; the gathered round 1 was checked.
        let rc = unsafe {
            kd_emu_vp_stats(
                round as i32,
                inputs.student.dtype().code(),
                &args,
                grid,
                block,
            )
        };
        if rc != 0 {
            return invalid("round", "the emulator refused the launch");
        }
        out.truncate(n * STATS_WIDTH);
        Ok(out)
    }

    /// [`super::finish`] on the emulated kernels (kd_count_valid, the
    /// finish, kd_vp_reduce_loss).
    pub fn finish(
        &self,
        inputs: &ShardInputs,
        spec: &LossSpec,
        round1: &Gathered,
        round2: Option<&Gathered>,
        grad: Option<GradDtype>,
    ) -> Result<KdOutput> {
        let topk = validate_finish(inputs, spec, round1, round2)?;
        let p = pointers(inputs, round1.world);
        let (n, vl) = (p.dims.rows, p.dims.cols);
        let in_dtype = inputs.student.dtype();
        let dtype = grad.map(|g| g.dtype_for(in_dtype));
        let want_t = dtype.is_some() && spec.grad_teacher && !topk;
        let out_dtype = dtype.unwrap_or(Dtype::F32);
        // Outputs poisoned with all bits set (NaN in every dtype).
        let poisoned = |want: bool| vec![0xffu8; if want { n * vl * out_dtype.size() } else { 0 }];
        let mut gs = poisoned(dtype.is_some());
        let mut gt = poisoned(want_t);
        let mut row_loss = vec![f64::NAN; n.max(1)];
        let mut loss = f64::NAN;
        let mut valid = -1i32;
        // One pointer for the kernels' count and the emulator's write.
        let valid_ptr: *mut i32 = &mut valid;
        let ptr = |g: &mut Vec<u8>, want: bool| {
            if want {
                g.as_mut_ptr() as u64
            } else {
                0
            }
        };
        let args = VpFinishArgs {
            student: p.student,
            teacher: p.teacher,
            topk_indices: p.indices,
            topk_values: p.values,
            labels: p.labels,
            row_weights: p.weights,
            round1: round1.stats.as_ptr() as u64,
            round2: round2.map_or(0, |g| g.stats.as_ptr() as u64),
            valid_count: if p.labels != 0 { valid_ptr as u64 } else { 0 },
            grad: ptr(&mut gs, dtype.is_some()),
            grad_teacher: ptr(&mut gt, want_t),
            row_loss: row_loss.as_mut_ptr() as u64,
            params: VpParams::new(spec, &p.dims),
        };
        let (grid, block) = self.shape(n, vl);
        // SAFETY: as round_stats; the gradients are dense [N, V_local].
        let rc = unsafe {
            kd_emu_vp_finish(
                in_dtype.code(),
                out_dtype.code(),
                &args,
                valid_ptr,
                &mut loss,
                grid,
                block,
            )
        };
        if rc != 0 {
            return invalid("grad", "unsupported dtype pair");
        }
        row_loss.truncate(n);
        Ok(KdOutput {
            loss,
            // SAFETY: written by the emulator through `valid_ptr`.
            valid_rows: if p.labels != 0 {
                unsafe { *valid_ptr as usize }
            } else {
                n
            },
            grad: dtype.map(|d| d.decode(&gs)),
            grad_teacher: want_t.then(|| out_dtype.decode(&gt)),
            row_losses: row_loss,
        })
    }

    /// [`super::run_in_process`] on the emulated kernels: every shard's
    /// [`KdOutput`], the all-gathers done by concatenation.
    pub fn run_in_process(
        &self,
        shards: &[ShardInputs],
        spec: &LossSpec,
        grad: Option<GradDtype>,
    ) -> Result<Vec<KdOutput>> {
        super::in_process(
            shards,
            spec,
            |s, round, prev| self.round_stats(s, spec, round, prev),
            |s, r1, r2| self.finish(s, spec, r1, r2, grad),
        )
    }
}

/// [`super::round_stats`] on the emulated kernels ([`VpEmu::default`]).
pub fn round_stats(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round: usize,
    round1: Option<&Gathered>,
) -> Result<Vec<f64>> {
    VpEmu::default().round_stats(inputs, spec, round, round1)
}

/// [`super::finish`] on the emulated kernels ([`VpEmu::default`]).
pub fn finish(
    inputs: &ShardInputs,
    spec: &LossSpec,
    round1: &Gathered,
    round2: Option<&Gathered>,
    grad: Option<GradDtype>,
) -> Result<KdOutput> {
    VpEmu::default().finish(inputs, spec, round1, round2, grad)
}
