//! The device chunk loop under the CUDA emulation (tests only): GEMMs by
//! matrixmultiply's sgemm on host addresses (operands widened to f32, the
//! output rounded to its dtype once), the loss by the emulated kernels of
//! kernels/kd (`crate::emu`), the count and reduce launches likewise.
//!
//! The emulator's fused entry (`kd_emu_run`) runs count, fused and reduce
//! together and counts the labels it is given: a chunk's launch here gets
//! its own scratch count, and its reduction weight comes instead from the
//! batch count at `args.valid_count` (computed as the kernels'
//! `kd_row_weight` does) passed as the kernel's gradient scale with
//! reduction `sum`, which equals what the CUDA launch computes from
//! `*valid_count` with the batch's reduction.

use super::device::{self, compute_on, ChunkDevice, GemmCall};
use super::{LinearInputs, LinearOutput, LinearSpec};
use crate::cuda::threads_for;
use crate::emu::{kd_emu_run, kd_emu_topk_run};
use crate::error::{invalid, Result};
use crate::params::{CountArgs, FusedArgs, KernelParams, ReduceArgs, TopkArgs};
use crate::spec::{LossSpec, Reduction};
use crate::tensor::Dtype;
use half::{bf16, f16};
use std::sync::{Mutex, MutexGuard};

/// Serialises this module's emulated launches: the emulator's blocks share
/// function-static `__shared__` arrays, and only `kd_emu_run` and
/// `kd_emu_topk_run` take its own lock (the count and reduce entries do
/// not), so two calls on different threads must not launch at once.
fn launch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" {
    fn kd_emu_count_valid(a: *const CountArgs);
    fn kd_emu_reduce_loss(a: *const ReduceArgs);
}

/// `compute_cuda`'s path (upload, the device chunk loop, download) with
/// the emulated device: host memory, host GEMMs and the emulated kernels.
/// Slow (every CUDA thread a std::thread); for tests of the device loop's
/// bookkeeping on small problems.
pub fn compute_emulated(inputs: &LinearInputs, spec: &LinearSpec) -> Result<LinearOutput> {
    compute_on(&mut EmuDevice::default(), inputs, spec)
}

/// Host memory standing for device memory.
#[derive(Default)]
struct EmuDevice {
    /// Every buffer handed out (8-byte aligned), alive with the device.
    bufs: Vec<Vec<u64>>,
    /// The bytes handed out, counted as `compute_cuda` allocates them
    /// ([`device::alloc_size`], [`device::upload_size`]), so that the emulated
    /// `device_peak_bytes` is the CUDA one.
    allocated: usize,
}

/// A prepared emulated launch.
struct EmuLoss {
    div: i32,
    variant: i32,
    dtype: Dtype,
    threads: u32,
    topk_i64: Option<bool>,
}

/// The reduction weight the kernels compute from a valid count
/// (`kd_row_weight`), in f32 as they do.
fn row_weight(p: &KernelParams, valid: i64) -> f32 {
    let batchmean = Reduction::BatchMean.kernel_id();
    let mean = Reduction::Mean.kernel_id();
    if p.reduction == batchmean {
        if valid > 0 {
            p.grad_scale / valid as f32
        } else {
            0.0
        }
    } else if p.reduction == mean {
        if valid > 0 {
            p.grad_scale / (valid as f32 * p.vocab as f32)
        } else {
            0.0
        }
    } else {
        p.grad_scale
    }
}

/// The params of one emulated chunk launch: reduction `sum` with the batch
/// weight read from `*valid_count` as the gradient scale (see the module
/// doc).
///
/// # Safety
/// `valid_count` is 0 or a readable i32.
unsafe fn chunk_params(p: &KernelParams, valid_count: u64, n_rows: i64) -> KernelParams {
    let valid = if valid_count == 0 {
        n_rows
    } else {
        // SAFETY: the caller's contract.
        i64::from(unsafe { *(valid_count as *const i32) })
    };
    KernelParams {
        grad_scale: row_weight(p, valid),
        reduction: Reduction::Sum.kernel_id(),
        ..*p
    }
}

/// One emulated loss launch of a chunk: its params carry the batch's
/// weight ([`chunk_params`]); the valid-row count and the loss the emulator
/// writes (a recount of the chunk's labels, the chunk's reduction) go to
/// scratch. `launch(valid_count, params, loss, grid)` returns the
/// emulator's status.
///
/// # Safety
/// `valid_count` is 0 or holds the batch's count; `launch` is sound for the
/// arguments it builds.
unsafe fn run_chunk(
    labels: u64,
    params: &KernelParams,
    valid_count: u64,
    n_rows: i64,
    launch: impl FnOnce(u64, KernelParams, *mut f32, u32) -> i32,
) -> Result<()> {
    let mut scratch_count = -1i32;
    let mut scratch_loss = f32::NAN;
    let count = if labels != 0 {
        &mut scratch_count as *mut i32 as u64
    } else {
        0
    };
    // SAFETY: the caller's contract (the batch count).
    let params = unsafe { chunk_params(params, valid_count, n_rows) };
    let _lock = launch_lock();
    if launch(count, params, &mut scratch_loss, n_rows.clamp(1, 3) as u32) != 0 {
        return invalid("dtype", "unsupported launch under the emulation");
    }
    Ok(())
}

/// Reads element `i` of a `dtype` array at `p` as f32.
///
/// # Safety
/// `p` holds element `i`.
unsafe fn read(p: u64, i: usize, dtype: Dtype) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        match dtype {
            Dtype::F32 => *(p as *const f32).add(i),
            Dtype::Bf16 => (*(p as *const bf16).add(i)).to_f32(),
            Dtype::F16 => (*(p as *const f16).add(i)).to_f32(),
        }
    }
}

/// Writes `x` rounded to `dtype` as element `i` at `p`.
///
/// # Safety
/// `p` holds element `i`.
unsafe fn write(p: u64, i: usize, dtype: Dtype, x: f32) {
    // SAFETY: the caller's contract.
    unsafe {
        match dtype {
            Dtype::F32 => *(p as *mut f32).add(i) = x,
            Dtype::Bf16 => *(p as *mut bf16).add(i) = bf16::from_f32(x),
            Dtype::F16 => *(p as *mut f16).add(i) = f16::from_f32(x),
        }
    }
}

/// The elements a row-major operand of `rows × cols` (stored transposed
/// with `trans`) with leading dimension `ld` spans, widened to f32.
///
/// # Safety
/// `p` holds them.
unsafe fn widen(
    p: u64,
    rows: usize,
    cols: usize,
    trans: bool,
    ld: usize,
    dtype: Dtype,
) -> Vec<f32> {
    let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
    let span = if sr == 0 || sc == 0 {
        0
    } else {
        (sr - 1) * ld + sc
    };
    // SAFETY: the caller's contract.
    (0..span).map(|i| unsafe { read(p, i, dtype) }).collect()
}

impl EmuDevice {
    /// A new buffer of `bytes` (not counted), poisoned: all bits set, NaN
    /// in every float dtype.
    fn buffer(&mut self, bytes: usize) -> u64 {
        let buf = vec![u64::MAX; bytes.div_ceil(8).max(1)];
        let p = buf.as_ptr() as u64;
        self.bufs.push(buf);
        p
    }
}

impl ChunkDevice for EmuDevice {
    type Loss = EmuLoss;

    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        self.allocated += device::alloc_size(bytes);
        Ok(self.buffer(bytes))
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        self.allocated += device::upload_size(bytes.len());
        let p = self.buffer(bytes.len());
        // SAFETY: the buffer just allocated holds `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p as *mut u8, bytes.len()) };
        Ok(p)
    }

    fn allocated_bytes(&self) -> usize {
        self.allocated
    }

    fn download(&mut self, addr: u64, bytes: usize) -> Result<Vec<u8>> {
        if addr == 0 {
            return invalid("download", "null address");
        }
        // SAFETY: addresses come from `alloc`/`upload` with their sizes.
        Ok(unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) }.to_vec())
    }

    unsafe fn fill_u32(&mut self, dst: u64, value: u32, count: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(dst as *mut u32, count) }.fill(value);
        Ok(())
    }

    unsafe fn fill_u16(&mut self, dst: u64, value: u16, count: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(dst as *mut u16, count) }.fill(value);
        Ok(())
    }

    fn prepare(
        &mut self,
        spec: &LossSpec,
        dtype: Dtype,
        vocab: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<EmuLoss> {
        spec.validate(labels)?;
        if topk.is_some() {
            spec.validate_topk()?;
        }
        Ok(EmuLoss {
            div: spec.kernel_divergence().id(),
            variant: spec.kernel_variant(),
            dtype,
            threads: threads_for(vocab, dtype),
            topk_i64: topk,
        })
    }

    unsafe fn gemm(&mut self, g: &GemmCall) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract (the operands' spans).
        let (a, b) = unsafe {
            (
                widen(g.a, g.m, g.k, g.a_trans, g.lda, g.ab),
                widen(g.b, g.k, g.n, g.b_trans, g.ldb, g.ab),
            )
        };
        let mut c = vec![0.0f32; g.m * g.n];
        if g.beta != 0.0 {
            for i in 0..g.m {
                for j in 0..g.n {
                    // SAFETY: C holds m rows of ldc.
                    c[i * g.n + j] = unsafe { read(g.c, i * g.ldc + j, g.c_dtype) };
                }
            }
        }
        let (rsa, csa) = if g.a_trans { (1, g.lda) } else { (g.lda, 1) };
        let (rsb, csb) = if g.b_trans { (1, g.ldb) } else { (g.ldb, 1) };
        if g.k > 0 {
            // SAFETY: `a` and `b` span the operands with these strides;
            // `c` is dense m × n.
            unsafe {
                matrixmultiply::sgemm(
                    g.m,
                    g.k,
                    g.n,
                    1.0,
                    a.as_ptr(),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr(),
                    rsb as isize,
                    csb as isize,
                    g.beta,
                    c.as_mut_ptr(),
                    g.n as isize,
                    1,
                );
            }
        }
        for i in 0..g.m {
            for j in 0..g.n {
                // SAFETY: as above.
                unsafe { write(g.c, i * g.ldc + j, g.c_dtype, c[i * g.n + j]) };
            }
        }
        Ok(())
    }

    unsafe fn count_valid(&mut self, args: &CountArgs) -> Result<()> {
        let _lock = launch_lock();
        // SAFETY: the caller's contract.
        unsafe { kd_emu_count_valid(args) };
        Ok(())
    }

    unsafe fn fused(&mut self, loss: &EmuLoss, args: &FusedArgs) -> Result<()> {
        if loss.topk_i64.is_some() {
            return invalid("teacher", "prepared for a top-k teacher");
        }
        let code = loss.dtype.code();
        // SAFETY: the caller's contract.
        unsafe {
            run_chunk(
                args.labels,
                &args.params,
                args.valid_count,
                args.n_rows,
                |valid_count, params, out, grid| {
                    let a = FusedArgs {
                        valid_count,
                        params,
                        ..*args
                    };
                    kd_emu_run(
                        loss.div,
                        loss.variant,
                        code,
                        code,
                        &a,
                        out,
                        grid,
                        loss.threads,
                        std::ptr::null_mut(),
                    )
                },
            )
        }
    }

    unsafe fn topk(&mut self, loss: &EmuLoss, args: &TopkArgs) -> Result<()> {
        let Some(i64s) = loss.topk_i64 else {
            return invalid("teacher", "prepared for a dense teacher");
        };
        let code = loss.dtype.code();
        // SAFETY: the caller's contract.
        unsafe {
            run_chunk(
                args.labels,
                &args.params,
                args.valid_count,
                args.n_rows,
                |valid_count, params, out, grid| {
                    let a = TopkArgs {
                        valid_count,
                        params,
                        ..*args
                    };
                    kd_emu_topk_run(
                        code,
                        code,
                        i32::from(i64s),
                        &a,
                        out,
                        grid,
                        loss.threads,
                        std::ptr::null_mut(),
                    )
                },
            )
        }
    }

    unsafe fn reduce(&mut self, args: &ReduceArgs) -> Result<()> {
        let _lock = launch_lock();
        // SAFETY: the caller's contract.
        unsafe { kd_emu_reduce_loss(args) };
        Ok(())
    }
}
