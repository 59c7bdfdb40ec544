//! Backend selection ([`create`], [`select_cuda`]), and the one interface
//! every backend implements ([`Backend`], re-exported from [`crate::driver`]).
//!
//! The interface lives in `driver`, which depends on no backend; this module
//! depends on all of them, so that the backends never import their selector.

pub(crate) use crate::driver::validate_topk;
pub use crate::driver::{Backend, KdOutput, Outputs};

use crate::error::{KdError, Result};
use crate::spec::spellings;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// CUDA when usable, else the fast CPU backend.
    #[default]
    Auto,
    /// The fast CPU backend.
    Cpu,
    /// The CUDA backend.
    Cuda,
    /// The f64 reference.
    Oracle,
}

spellings!(BackendKind, "backend",
    Auto => "auto",
    Cpu => "cpu",
    Cuda => "cuda",
    Oracle => "oracle",
);

/// What `Auto` finds: the CUDA backend, or why CUDA is unavailable (the
/// caller then runs on the CPU).
pub enum CudaChoice {
    /// CUDA is usable: its backend on the requested device.
    Usable(crate::cuda::CudaBackend),
    /// No driver, no device or no kernels: the reason, to report.
    Unavailable(String),
}

/// The one "CUDA if usable, else the CPU" rule: the CUDA backend on
/// `device`, or [`CudaChoice::Unavailable`] when CUDA cannot be used here.
/// Any other failure (a usable driver that errs) is an error, never a
/// silent fallback.
pub fn select_cuda(device: usize) -> Result<CudaChoice> {
    select_cuda_for(device, None)
}

/// As [`select_cuda`], with the loss kernel chosen by `choice` when given
/// ([`crate::cuda::CudaBackend::open`]).
pub fn select_cuda_for(
    device: usize,
    choice: Option<crate::single_read::KernelChoice>,
) -> Result<CudaChoice> {
    match crate::cuda::CudaBackend::open(device, choice) {
        Ok(b) => Ok(CudaChoice::Usable(b)),
        Err(KdError::CudaUnavailable(why)) => Ok(CudaChoice::Unavailable(why)),
        Err(e) => Err(e),
    }
}

/// Creates a backend. `Auto` falls back to the CPU when CUDA is unusable
/// ([`select_cuda`]).
pub fn create(kind: BackendKind) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Oracle => Ok(Box::new(crate::oracle::Oracle)),
        BackendKind::Cpu => Ok(Box::new(crate::cpu::CpuBackend)),
        BackendKind::Cuda => Ok(Box::new(crate::cuda::CudaBackend::new(0)?)),
        BackendKind::Auto => Ok(match select_cuda(0)? {
            CudaChoice::Usable(b) => Box::new(b),
            CudaChoice::Unavailable(_) => Box::new(crate::cpu::CpuBackend),
        }),
    }
}
