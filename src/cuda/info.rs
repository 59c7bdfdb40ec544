//! What the CUDA devices are (for `kdfuse info` and reports).

use crate::error::{KdError, Result};
use crate::single_read::DeviceCaps;
use cudarc::driver::sys::CUdevice_attribute as A;
use cudarc::driver::CudaContext;
use serde::Serialize;

/// One CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: i32,
    /// Global memory, bytes.
    pub memory_bytes: usize,
    /// L2 cache, bytes.
    pub l2_bytes: i32,
    /// Theoretical memory bandwidth (2 × memory clock × bus width), GB/s;
    /// 0 where the driver does not report the clock.
    pub theoretical_bandwidth_gbs: f64,
}

/// The driver's CUDA version as "major.minor".
pub fn driver_version() -> Result<String> {
    super::ensure_driver()?;
    let mut v = 0i32;
    // SAFETY: writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| KdError::Cuda(e.to_string()))?;
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Every device, or why none can be listed.
pub fn device_infos() -> Result<Vec<DeviceInfo>> {
    let n = super::device_count()?;
    let mut out = Vec::with_capacity(n);
    for ordinal in 0..n {
        let ctx = CudaContext::new(ordinal)?;
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        let clock_khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE) as f64;
        let bus_bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH) as f64;
        out.push(DeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            sms: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            memory_bytes: ctx.total_mem()?,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
            theoretical_bandwidth_gbs: 2.0 * clock_khz * 1e3 * bus_bits / 8.0 / 1e9,
        });
    }
    Ok(out)
}

/// What device `ordinal` offers the single-read kernels
/// ([`crate::single_read::plan`]): compute capability, the shared memory a
/// CTA may opt in to and an SM's, clusters of up to 16 where cluster
/// launch is supported (else 1).
pub fn device_caps(ordinal: usize) -> Result<DeviceCaps> {
    super::ensure_driver()?;
    let ctx = CudaContext::new(ordinal)?;
    caps_of(&ctx)
}

/// [`device_caps`] of an open context.
pub(crate) fn caps_of(ctx: &CudaContext) -> Result<DeviceCaps> {
    let attr = |a| -> Result<usize> { Ok(ctx.attribute(a)?.max(0) as usize) };
    let clusters = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH)
        .unwrap_or(0);
    Ok(DeviceCaps {
        compute_capability: ctx.compute_capability()?,
        smem_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        smem_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
        max_cluster: if clusters != 0 {
            crate::single_read::max_cluster()
        } else {
            1
        },
    })
}
