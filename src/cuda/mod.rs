//! The CUDA backend: loads the embedded fatbin once per context and launches
//! the fused kernels asynchronously on a stream.
//!
//! No CUDA call is made before [`cudarc::driver::sys::is_culib_present`] says
//! the driver library is there, so a machine without a driver gets an `Err`.

mod args;
mod eager;
mod host;
mod info;
mod kernels;
mod launch;

pub use args::FillArgs;
pub(crate) use args::{
    AdamHyper, MlpAdamArgs, MlpBiasActArgs, MlpBiasGradArgs, MlpReluBackArgs, MlpSgdArgs,
};
pub use eager::EagerScratch;
pub use info::{device_caps, device_infos, driver_version, DeviceInfo};
pub use launch::{KdElement, LossBuffers, PreparedLoss, RawFusedArgs, RawTopkArgs, RowLayout};

// The plumbing the loss families' CUDA halves (feature::cuda) and the
// distill engine build on.
pub(crate) use host::{by_dtype, download, output, poison, upload, ToF32};
#[cfg(test)]
pub(crate) use kernels::FEATURE_KINDS;
pub(crate) use kernels::{Kernel, MlpOp};
pub(crate) use launch::{allow_smem, check_len, io, threads_for, PreparedCache};

use crate::error::{KdError, Result};
use crate::kernels_meta;
use crate::single_read::{DeviceCaps, KernelChoice};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use kernels::KernelTable;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Fails with [`KdError::CudaUnavailable`] unless the driver library loads and
/// initialises; does not look at devices.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KdError::CudaUnavailable(
            "no CUDA driver library (libcuda.so) found".into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| KdError::CudaUnavailable(format!("cuInit failed: {e}")))
}

/// Number of CUDA devices, or why none can be used.
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    let n = CudaContext::device_count().map_err(|e| KdError::CudaUnavailable(e.to_string()))?;
    Ok(n.max(0) as usize)
}

/// Fails unless this build embeds kernels.
pub fn ensure_kernels() -> Result<()> {
    if kernels_meta::FATBIN.is_empty() {
        return Err(KdError::CudaUnavailable(format!(
            "built without CUDA kernels ({}); run scripts/install-cuda-toolchain and rebuild",
            kernels_meta::NO_KERNELS_REASON.unwrap_or("no nvcc")
        )));
    }
    Ok(())
}

/// The device's primary context and the kernels loaded into it (the module
/// and its table of resolved kernels): once per context for the whole
/// process, shared by every `CudaBackend` of the device.
type Loaded = (Arc<CudaContext>, Arc<KernelTable>);

fn context_and_module(ordinal: usize) -> Result<Loaded> {
    static LOADED: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();
    let mut map = LOADED
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((ctx, kernels)) = map.get(&ordinal) {
        return Ok((ctx.clone(), kernels.clone()));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| KdError::CudaUnavailable(format!("cannot open device {ordinal}: {e}")))?;
    let module = ctx
        .load_module(Ptx::from_binary(kernels_meta::FATBIN.to_vec()))
        .map_err(|e| {
            KdError::CudaUnavailable(format!(
                "cannot load the kernels on device {ordinal} (embedded: {}): {e}",
                kernels_meta::ARCHES.join(", ")
            ))
        })?;
    let kernels = Arc::new(KernelTable::new(module));
    map.insert(ordinal, (ctx.clone(), kernels.clone()));
    Ok((ctx, kernels))
}

/// The CUDA backend for one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    kernels: Arc<KernelTable>,
    /// Which dense loss kernel [`CudaBackend::prepare`] plans for.
    kernel_choice: KernelChoice,
    /// What the device offers the single-read kernels.
    caps: DeviceCaps,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .field("kernel_choice", &self.kernel_choice)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` (its primary context, kernels loaded once per
    /// process) and makes a stream for the host-array API
    /// ([`crate::Backend::compute`]). The dense loss kernel is chosen by
    /// `KDFUSE_KERNEL` (`auto` when unset; an invalid value is an
    /// `InvalidArgument` naming it, on any machine);
    /// [`CudaBackend::with_kernel`] overrides it.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, None)
    }

    /// As [`CudaBackend::new`], with the loss kernel chosen by `choice`
    /// when given (then `KDFUSE_KERNEL` is not read: an explicit choice
    /// wins over a bad environment).
    pub fn open(ordinal: usize, choice: Option<KernelChoice>) -> Result<Self> {
        let kernel_choice = match choice {
            Some(c) => c,
            None => KernelChoice::from_env()?,
        };
        ensure_kernels()?;
        let n = device_count()?;
        if n == 0 {
            return Err(KdError::CudaUnavailable("no CUDA device found".into()));
        }
        if ordinal >= n {
            return Err(KdError::InvalidArgument {
                arg: "device",
                msg: format!("ordinal {ordinal} but only {n} CUDA device(s)"),
            });
        }
        let (ctx, kernels) = context_and_module(ordinal)?;
        let stream = ctx.new_stream()?;
        let caps = info::caps_of(&ctx)?;
        Ok(CudaBackend {
            ctx,
            stream,
            kernels,
            kernel_choice,
            caps,
        })
    }

    /// The backend with the dense loss kernel chosen by `choice` instead of
    /// `KDFUSE_KERNEL` (`kdfuse --kernel`).
    pub fn with_kernel(mut self, choice: KernelChoice) -> Self {
        self.kernel_choice = choice;
        self
    }

    /// Chooses the dense loss kernel of the losses prepared from now on
    /// (those prepared before keep theirs).
    pub fn set_kernel(&mut self, choice: KernelChoice) {
        self.kernel_choice = choice;
    }

    /// Which dense loss kernel this backend plans for.
    pub fn kernel_choice(&self) -> KernelChoice {
        self.kernel_choice
    }

    /// What this device offers the single-read kernels (compute
    /// capability, shared memory, the largest cluster).
    pub fn device_caps(&self) -> DeviceCaps {
        self.caps
    }

    /// The context (for allocating buffers to pass to [`CudaBackend::fused`]).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The loaded kernels (shared by every backend of this device).
    pub fn module(&self) -> &Arc<CudaModule> {
        self.kernels.module()
    }

    /// The backend's own stream (used by [`crate::Backend::compute`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A kernel, resolved in this context's table at its first use.
    pub(crate) fn kernel(&self, k: Kernel) -> Result<&CudaFunction> {
        self.kernels.get(k)
    }
}
