//! What the CUDA devices are (for `kdfuse info` and reports).

use crate::error::{KdError, Result};
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
