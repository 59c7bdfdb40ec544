//! The fused linear + distillation loss on CUDA device memory: the chunk
//! loop of [`super::device`] with cuBLAS GEMMs (through cudarc, the library
//! loaded at run time) and the fused loss kernels, all enqueued on the
//! caller's stream with no host synchronisation.
//!
//! # GEMMs and dtypes
//!
//! Every GEMM is a `cublasGemmEx` with `CUBLAS_COMPUTE_32F` (fp32
//! accumulation, no TF32). The logits chunk is written in the operand dtype
//! (f32, bf16 or f16), the bias broadcast into it first and the product
//! added with β = 1, so the logits are rounded once from the f32 sum, as
//! the host path rounds them.
//!
//! The logit gradient `G` of a chunk is written by the loss kernel **in
//! the operand dtype, over the logits chunk** (in place). cuBLAS's GemmEx
//! takes A and B of one type, so the gradient GEMMs (`G·W`, `Gᵀ·h`, `Gᵀ·1`)
//! must read `G` in the head's dtype; the alternative, an f32 `G` and f32
//! copies of the heads, costs `V·H·4` bytes per head on the device (2 GiB
//! for a 128k × 4096 head) and a conversion pass. Trade-off: for bf16/f16
//! operands `G` is rounded to the operand dtype (relative error 2⁻⁹ for
//! bf16, 2⁻¹² for f16 per element, as PyTorch's bf16 backward rounds its
//! logit gradient), while the products accumulate in f32 and `∂hidden`,
//! `∂W` and `∂b` are f32; the per-chunk memory is one logits chunk per
//! side, `chunk × V × sizeof(dtype)` ([`super::device_bytes_per_row`]).
//! f32 operands lose nothing.
//!
//! # The reduction weight
//!
//! `kd_count_valid` counts the valid rows of all N labels once into the
//! caller's `valid_rows` (without labels N is written there); every chunk's
//! fused launch reads its reduction weight from that count, and one
//! `kd_reduce_loss` over the N row losses gives the loss.
//!
//! # cuBLAS handles
//!
//! One handle per device for the process, created at the first call (never
//! destroyed: `cublasDestroy` synchronises the device), set to the caller's
//! stream for the duration of a call; concurrent calls on one device take
//! turns enqueueing.

use super::device::{self, compute_on, ChunkDevice, GemmCall, RawLinearArgs};
use super::{LinearInputs, LinearOutput, LinearSpec, RawTeacher};
use crate::cuda::{CudaBackend, PreparedLoss};
use crate::error::{KdError, Result};
use crate::params::{CountArgs, FusedArgs, ReduceArgs, TopkArgs};
use crate::spec::LossSpec;
use crate::tensor::Dtype;
use cudarc::cublas::result as blas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// A cuBLAS handle of one device's primary context.
struct BlasHandle(cublasHandle_t);
// SAFETY: a handle may be used from any thread, one at a time (the mutex
// below).
unsafe impl Send for BlasHandle {}

type Handles = HashMap<usize, BlasHandle>;

fn handles() -> MutexGuard<'static, Handles> {
    static HANDLES: OnceLock<Mutex<Handles>> = OnceLock::new();
    HANDLES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn blas_err(e: blas::CublasError) -> KdError {
    KdError::Cuda(format!("cuBLAS: {e}"))
}

fn data_type(d: Dtype) -> cudaDataType {
    match d {
        Dtype::F32 => cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => cudaDataType::CUDA_R_16BF,
        Dtype::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// Fails with [`KdError::CudaUnavailable`] unless the cuBLAS library loads.
fn ensure_cublas() -> Result<()> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KdError::CudaUnavailable(
            "no cuBLAS library (libcublas.so) found".into(),
        ));
    }
    Ok(())
}

/// The device side: the backend's kernels, the caller's stream, the
/// device's cuBLAS handle (locked for the call) and the buffers this call
/// allocated (freed on the stream when it ends, after the work).
struct CudaDevice<'a> {
    backend: &'a CudaBackend,
    stream: &'a Arc<CudaStream>,
    handle: cublasHandle_t,
    _handles: MutexGuard<'static, Handles>,
    owned: Vec<CudaSlice<u8>>,
    /// The bytes of `owned` (its buffers live until the call ends: the
    /// call's peak).
    allocated: usize,
}

impl<'a> CudaDevice<'a> {
    fn new(backend: &'a CudaBackend, stream: &'a Arc<CudaStream>) -> Result<Self> {
        ensure_cublas()?;
        backend.context().bind_to_thread()?;
        let mut map = handles();
        let ordinal = backend.context().ordinal();
        let handle = match map.get(&ordinal) {
            Some(h) => h.0,
            None => {
                let h = blas::create_handle().map_err(blas_err)?;
                map.insert(ordinal, BlasHandle(h));
                h
            }
        };
        // SAFETY: a live handle of this context; the stream is the caller's.
        unsafe { blas::set_stream(handle, stream.cu_stream() as _) }.map_err(blas_err)?;
        Ok(CudaDevice {
            backend,
            stream,
            handle,
            _handles: map,
            owned: Vec::new(),
            allocated: 0,
        })
    }

    fn keep(&mut self, s: CudaSlice<u8>) -> u64 {
        self.allocated += s.len();
        let p = {
            let (p, _guard) = s.device_ptr(self.stream);
            p
        };
        self.owned.push(s);
        p
    }
}

impl ChunkDevice for CudaDevice<'_> {
    type Loss = PreparedLoss;

    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        // SAFETY: every buffer is written before it is read (the loop's
        // outputs, the chunk buffers) or filled.
        let s = unsafe { self.stream.alloc::<u8>(device::alloc_size(bytes)) }?;
        Ok(self.keep(s))
    }

    fn allocated_bytes(&self) -> usize {
        self.allocated
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        let s = if bytes.is_empty() {
            self.stream.alloc_zeros::<u8>(device::alloc_size(0))?
        } else {
            self.stream.clone_htod(bytes)?
        };
        Ok(self.keep(s))
    }

    fn download(&mut self, addr: u64, bytes: usize) -> Result<Vec<u8>> {
        let mut host = vec![0u8; bytes];
        if bytes > 0 {
            // SAFETY: `addr` holds `bytes` bytes (a buffer of this call);
            // the synchronisation below completes the copy.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, addr, self.stream.cu_stream())
            }?;
        }
        self.stream.synchronize()?;
        Ok(host)
    }

    unsafe fn fill_u32(&mut self, dst: u64, value: u32, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(dst, value, count, self.stream.cu_stream())
        }
        .result()?;
        Ok(())
    }

    unsafe fn fill_u16(&mut self, dst: u64, value: u16, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract.
        unsafe {
            cudarc::driver::sys::cuMemsetD16Async(dst, value, count, self.stream.cu_stream())
        }
        .result()?;
        Ok(())
    }

    fn prepare(
        &mut self,
        spec: &LossSpec,
        dtype: Dtype,
        vocab: usize,
        labels: bool,
        topk: Option<bool>,
    ) -> Result<PreparedLoss> {
        match topk {
            None => self.backend.prepare(spec, (dtype, dtype), vocab, labels),
            Some(i64s) => self
                .backend
                .prepare_topk(spec, (dtype, dtype), vocab, labels, i64s),
        }
    }

    unsafe fn gemm(&mut self, g: &GemmCall) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let (one, beta) = (1.0f32, g.beta);
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
        // B's storage is the first operand, A's the second.
        // SAFETY: the caller's contract; α and β are host f32 (the handle's
        // default pointer mode), the compute type f32.
        unsafe {
            blas::gemm_ex(
                self.handle,
                op(g.b_trans),
                op(g.a_trans),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&one as *const f32).cast::<c_void>(),
                g.b as *const c_void,
                data_type(g.ab),
                g.ldb as i32,
                g.a as *const c_void,
                data_type(g.ab),
                g.lda as i32,
                (&beta as *const f32).cast::<c_void>(),
                g.c as *mut c_void,
                data_type(g.c_dtype),
                g.ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }

    unsafe fn count_valid(&mut self, a: &CountArgs) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            self.backend
                .count_valid_rows(self.stream, a.labels, a.n_rows, a.ignore_index, a.out)
        }?;
        Ok(())
    }

    unsafe fn fused(&mut self, loss: &PreparedLoss, args: &FusedArgs) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            self.backend
                .launch_kernel(self.stream, loss, args.n_rows as usize, *args)
        }
    }

    unsafe fn topk(&mut self, loss: &PreparedLoss, args: &TopkArgs) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            self.backend
                .launch_kernel(self.stream, loss, args.n_rows as usize, *args)
        }
    }

    unsafe fn reduce(&mut self, a: &ReduceArgs) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe {
            self.backend.launch_reduce_loss(
                self.stream,
                a.row_loss,
                a.n_rows,
                a.valid_count,
                &a.params,
                a.out,
            )
        }
    }
}

/// Enqueues the fused linear + distillation loss of `args` (device
/// pointers of `backend`'s context) on `stream` and returns without
/// waiting: the loss, row losses, valid count and the gradients `spec`
/// asks for land in `args`' outputs once the stream has run the work.
/// Chunks of `spec.chunking` rows ([`super::device_chunk_rows`]); the
/// chunk buffers are allocated on `stream` (stream-ordered) and freed on it
/// after the work.
///
/// Top-k indices out of `[0, V)` or repeated within a row give NaN rows, not
/// out-of-bounds accesses (they are not checked here; see
/// [`CudaBackend::validate_topk_raw`]).
///
/// # Safety
/// Every non-zero pointer of `args` is device memory of this context
/// holding what its shape needs (hidden `N·H`, heads `weight_rows·H`,
/// biases `weight_rows`, teacher logits `(N−1)·row_stride + V`, top-k `N·k`,
/// labels, row weights and row losses `N`, gradients as
/// [`super::RawHeadGrads`] says, a logits teacher's gradient `N·V`), the
/// outputs not overlapping the inputs, all alive until the stream has run
/// the work.
pub unsafe fn compute_cuda_raw(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    args: &RawLinearArgs,
    spec: &LinearSpec,
) -> Result<()> {
    device::check_raw(args, spec)?;
    let linear = matches!(args.teacher, RawTeacher::Linear(_));
    let chunk =
        device::device_chunk_rows(args.rows, args.dtype, args.vocab, linear, spec.chunking)?;
    let mut dev = CudaDevice::new(backend, stream)?;
    // SAFETY: the caller's contract; checked above.
    unsafe { device::run(&mut dev, args, spec, chunk) }
}

/// [`super::compute`] on the GPU: uploads the host inputs to `backend`'s
/// device, runs the device chunk loop on the backend's stream
/// ([`compute_cuda_raw`]) and downloads the results (row losses and the
/// loss are f32 on the device, widened here; a logits teacher's gradient
/// is downloaded from the operand dtype). For tests and the CLI; a trainer
/// keeps its tensors on the device and calls [`compute_cuda_raw`].
pub fn compute_cuda(
    backend: &CudaBackend,
    inputs: &LinearInputs,
    spec: &LinearSpec,
) -> Result<LinearOutput> {
    let mut dev = CudaDevice::new(backend, backend.stream())?;
    compute_on(&mut dev, inputs, spec)
}
