//! The selection on the device (kernels/topk_select/select.cu): one
//! `kd_select_<in>` launch on raw device pointers and a caller's stream,
//! asynchronously ([`CudaBackend::select_raw`]), and a host-array wrapper
//! for tests and small uses ([`CudaBackend::select`]).
//!
//! A row holding a NaN cannot be reported by the launch itself: the kernel
//! min's the row into a device `u64` (`bad_row`, set to `u64::MAX` by the
//! caller first) and leaves that row's outputs unwritten.

use super::params::{self, SelectArgs};
use super::{check_k, nan_row, validate, SelectSpec, Selection};
use crate::cuda::{upload, CudaBackend, Kernel};
use crate::error::{invalid, Result};
use crate::tensor::{Dtype, Logits};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// One selection's buffers on the device (0 = absent) and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawSelect {
    /// Dtype of the logits.
    pub dtype: Dtype,
    /// Logits `[rows, cols]`, row stride `stride` elements.
    pub logits: u64,
    /// Rows N.
    pub rows: usize,
    /// Columns V.
    pub cols: usize,
    /// Row stride of the logits (elements, ≥ cols).
    pub stride: usize,
    /// Output `[rows, k]` int32 columns.
    pub indices: u64,
    /// Output `[rows, k]` f32 values.
    pub values: u64,
    /// Output `[rows]` f32 log-sum-exps, or 0 for none.
    pub lse: u64,
    /// One u64, set to `u64::MAX` by the caller: the kernel lowers it to
    /// every row holding a NaN.
    pub bad_row: u64,
}

impl CudaBackend {
    /// Enqueues the selection of `spec.k` per row on `stream` (`spec.with_lse`
    /// is given by `raw.lse` being non-zero and must agree with it). Checks
    /// the shape and `k` as [`super::select_cpu`] does; NaN rows go to
    /// `raw.bad_row`.
    ///
    /// # Safety
    /// Every non-zero pointer must be valid device memory of this context
    /// holding what `raw` describes ((rows−1)·stride + cols logits, rows·k
    /// indices and values, rows lse, one u64 `bad_row`), the outputs not
    /// overlapping the logits, alive until the stream has run the work.
    pub unsafe fn select_raw(
        &self,
        stream: &CudaStream,
        raw: &RawSelect,
        spec: &SelectSpec,
    ) -> Result<()> {
        check_raw(raw, spec)?;
        if raw.rows == 0 {
            return Ok(());
        }
        let args = SelectArgs {
            logits: raw.logits,
            indices: raw.indices,
            values: raw.values,
            lse: raw.lse,
            bad_row: raw.bad_row,
            n_rows: raw.rows as i64,
            stride: raw.stride as i64,
            cols: raw.cols as i32,
            k: spec.k as i32,
        };
        let f = self.kernel(Kernel::Select { dtype: raw.dtype })?;
        let mut b = stream.launch_builder(f);
        b.arg(&args);
        // SAFETY: the caller's contract.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (params::grid(raw.rows), 1, 1),
                block_dim: (params::threads(raw.cols), 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// [`super::select_cpu`] on the device, from and to host memory: the
    /// logits uploaded, the outputs poisoned (all bits set) before the
    /// launch and downloaded after it, on this backend's stream.
    pub fn select(&self, logits: &Logits, spec: &SelectSpec) -> Result<Selection> {
        validate(logits, spec)?;
        let (n, k) = (logits.rows, spec.k);
        let stream = self.stream();
        let x = upload(stream, logits.data.bytes())?;
        let mut idx = stream.alloc_zeros::<i32>((n * k).max(1))?;
        let mut val = stream.alloc_zeros::<f32>((n * k).max(1))?;
        let mut lse = stream.alloc_zeros::<f32>(n.max(1))?;
        crate::cuda::poison(stream, &mut idx)?;
        crate::cuda::poison(stream, &mut val)?;
        crate::cuda::poison(stream, &mut lse)?;
        let bad = upload(stream, &[u64::MAX])?;
        {
            let (xp, _g0) = x.device_ptr(stream);
            let (ip, _g1) = idx.device_ptr_mut(stream);
            let (vp, _g2) = val.device_ptr_mut(stream);
            let (lp, _g3) = lse.device_ptr_mut(stream);
            let (bp, _g4) = bad.device_ptr(stream);
            let raw = RawSelect {
                dtype: logits.dtype(),
                logits: xp,
                rows: n,
                cols: logits.cols,
                stride: logits.row_stride,
                indices: ip,
                values: vp,
                lse: if spec.with_lse { lp } else { 0 },
                bad_row: bp,
            };
            // SAFETY: every buffer was allocated at its validated size.
            unsafe { self.select_raw(stream, &raw, spec) }?;
        }
        let bad = stream.clone_dtoh(&bad)?[0];
        if bad != u64::MAX {
            return nan_row(bad as usize);
        }
        let mut indices = stream.clone_dtoh(&idx)?;
        let mut values = stream.clone_dtoh(&val)?;
        let mut lse = stream.clone_dtoh(&lse)?;
        indices.truncate(n * k);
        values.truncate(n * k);
        lse.truncate(n);
        Ok(Selection {
            rows: n,
            k,
            indices,
            values,
            lse: spec.with_lse.then_some(lse),
        })
    }
}

/// The checks of [`CudaBackend::select_raw`]: `k`, the shape (as the host
/// path: a zero-length view stands in for the device data), the pointers.
pub(crate) fn check_raw(raw: &RawSelect, spec: &SelectSpec) -> Result<()> {
    if raw.cols == 0 {
        return invalid("logits", "needs at least one column (V ≥ 1)");
    }
    if raw.cols > i32::MAX as usize {
        return invalid("logits", format!("V = {} exceeds {}", raw.cols, i32::MAX));
    }
    if raw.stride < raw.cols {
        return invalid(
            "logits",
            format!("row stride {} is below V = {}", raw.stride, raw.cols),
        );
    }
    check_k(spec.k, raw.cols)?;
    if raw.rows > 0 {
        for (arg, p) in [
            ("logits", raw.logits),
            ("indices", raw.indices),
            ("values", raw.values),
            ("bad_row", raw.bad_row),
        ] {
            if p == 0 {
                return invalid(arg, "device pointer is null");
            }
        }
    }
    if spec.with_lse != (raw.lse != 0) {
        return invalid(
            "lse",
            "must be a device pointer exactly when with_lse is set",
        );
    }
    Ok(())
}
