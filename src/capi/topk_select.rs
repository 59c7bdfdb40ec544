//! The C ABI of the per-row top-k selection (`crate::topk_select`): the CPU
//! backend on host memory and the CUDA kernel on device memory (making an
//! offline teacher cache).

use super::{aligned, guard, host_data, non_null, types, KdfuseContext, KdfuseStatus};
use crate::error::{invalid, Result};
use crate::tensor::{Dtype, HostData, Logits};
use crate::topk_select::cuda::RawSelect;
use crate::topk_select::{select_cpu, validate, SelectSpec};
use std::ffi::c_void;

fn size(arg: &'static str, x: i64) -> Result<usize> {
    usize::try_from(x).or_else(|_| invalid(arg, format!("must be ≥ 0, got {x}")))
}

/// Non-NULL and aligned for `T`, unless nothing is written (`len = 0`).
fn out_slice<'a, T>(arg: &'static str, p: *mut T, len: usize) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return invalid(arg, "must not be NULL");
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return invalid(arg, "pointer is not aligned for its element type");
    }
    // SAFETY: the caller passes memory writable for `len` elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The `k` largest elements of each of the `rows` rows of `logits`
/// (`cols` elements each, `row_stride` elements apart, of `dtype`: 0 f32,
/// 1 bf16, 2 f16), on the CPU: writes `indices` (`[rows, k]` int32, by
/// value descending, ties by the lower column) and `values` (`[rows, k]`
/// float, the input elements exactly), and the rows' natural log-sum-exp
/// to `lse` (`[rows]` float) unless it is NULL. `1 ≤ k ≤ min(cols, 4096)`.
/// A row holding a NaN is an error naming the first such row (outputs
/// then unspecified).
///
/// # Safety
/// `logits` readable for (rows−1)·row_stride + cols elements; `indices` and
/// `values` writable for rows·k elements, `lse` for rows (or NULL); the
/// outputs do not overlap the input.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kdfuse_topk_select_host(
    logits: *const c_void,
    dtype: i32,
    rows: i64,
    cols: i64,
    row_stride: i64,
    k: i64,
    indices: *mut i32,
    values: *mut f32,
    lse: *mut f32,
) -> KdfuseStatus {
    guard(|| {
        let dtype = types::dtype("dtype", dtype)?;
        let (rows, cols) = (size("rows", rows)?, size("cols", cols)?);
        let (stride, k) = (size("row_stride", row_stride)?, size("k", k)?);
        if stride < cols {
            return invalid("row_stride", format!("{stride} is below cols = {cols}"));
        }
        let len = match rows {
            0 => 0,
            _ => (rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(cols))
                .filter(|x| {
                    x.checked_mul(dtype.size())
                        .is_some_and(|b| b <= isize::MAX as usize)
                })
                .map_or_else(|| invalid("rows", "the logits' size overflows"), Ok)?,
        };
        if len > 0 && logits.is_null() {
            return invalid("logits", "must not be NULL");
        }
        let data = if len == 0 {
            match dtype {
                Dtype::F32 => HostData::F32(&[]),
                Dtype::Bf16 => HostData::Bf16(&[]),
                Dtype::F16 => HostData::F16(&[]),
            }
        } else {
            // SAFETY: the caller's contract.
            unsafe { host_data("logits", logits, len, dtype) }?
        };
        let view = Logits::strided(data, rows, cols, stride);
        let spec = SelectSpec {
            k,
            with_lse: !lse.is_null(),
        };
        validate(&view, &spec)?;
        let n = rows * k;
        let out_i = out_slice("indices", indices, n)?;
        let out_v = out_slice("values", values, n)?;
        let out_l = out_slice("lse", lse, if spec.with_lse { rows } else { 0 })?;
        let sel = select_cpu(&view, &spec)?;
        out_i.copy_from_slice(&sel.indices);
        out_v.copy_from_slice(&sel.values);
        if let Some(l) = &sel.lse {
            out_l.copy_from_slice(l);
        }
        Ok(())
    })
}

/// `kdfuse_topk_select_host` on the device: enqueues the selection on
/// `stream` (a `CUstream` of the context's device, NULL the legacy default
/// stream) and returns without waiting. Every pointer is device memory:
/// `logits`, `indices`, `values` and `lse` as in `kdfuse_topk_select_host`
/// (`lse` NULL for none), and `bad_row`, required, one `uint64_t`.
///
/// A row holding a NaN cannot fail the call (the launch does not wait for
/// the kernel): this call first sets `*bad_row` to `UINT64_MAX` on `stream`,
/// and the kernel lowers it to the index of every row holding a NaN. Once
/// the stream has run the work, `*bad_row == UINT64_MAX` means every row was
/// selected; any other value is the first row holding a NaN (that row's
/// outputs unwritten, the others' valid). Shapes, `k` and the pointers are
/// checked before anything is enqueued.
///
/// # Safety
/// `ctx` from `kdfuse_context_create`; the pointers device memory of its
/// device (`logits` (rows−1)·row_stride + cols elements, `indices` and
/// `values` rows·k, `lse` rows, `bad_row` one), the outputs not overlapping
/// the logits, all alive until the stream has run the work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kdfuse_topk_select_cuda(
    ctx: *const KdfuseContext,
    logits: *const c_void,
    dtype: i32,
    rows: i64,
    cols: i64,
    row_stride: i64,
    k: i64,
    indices: *mut i32,
    values: *mut f32,
    lse: *mut f32,
    bad_row: *mut u64,
    stream: *mut c_void,
) -> KdfuseStatus {
    guard(|| {
        let ctx = non_null("ctx", ctx)?;
        let dtype = types::dtype("dtype", dtype)?;
        let (rows, cols) = (size("rows", rows)?, size("cols", cols)?);
        let (stride, k) = (size("row_stride", row_stride)?, size("k", k)?);
        if stride < cols {
            return invalid("row_stride", format!("{stride} is below cols = {cols}"));
        }
        if rows > 0 {
            let fits = (rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(cols))
                .and_then(|x| x.checked_mul(dtype.size()))
                .is_some_and(|b| b <= isize::MAX as usize);
            if !fits {
                return invalid("rows", "the logits' size overflows");
            }
            if rows
                .checked_mul(k)
                .is_none_or(|n| n > isize::MAX as usize / 4)
            {
                return invalid("k", "the outputs' size overflows");
            }
        }
        match dtype {
            Dtype::F32 => aligned("logits", logits.cast::<f32>())?,
            Dtype::Bf16 | Dtype::F16 => aligned("logits", logits.cast::<u16>())?,
        }
        aligned("indices", indices.cast_const())?;
        aligned("values", values.cast_const())?;
        aligned("lse", lse.cast_const())?;
        aligned("bad_row", bad_row.cast_const())?;
        if bad_row.is_null() {
            return invalid(
                "bad_row",
                "must not be NULL (the first row holding a NaN goes there)",
            );
        }
        let spec = SelectSpec {
            k,
            with_lse: !lse.is_null(),
        };
        let raw = RawSelect {
            dtype,
            logits: logits as u64,
            rows,
            cols,
            stride,
            indices: indices as u64,
            values: values as u64,
            lse: lse as u64,
            bad_row: bad_row as u64,
        };
        // Every check of the launch first, so an error enqueues nothing.
        crate::topk_select::cuda::check_raw(&raw, &spec)?;
        // SAFETY: the caller's contract.
        let stream = unsafe { ctx.stream(stream) };
        // SAFETY: one u64 of device memory, on the caller's stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(raw.bad_row, 0xff, 8, stream.cu_stream())
        }?;
        // SAFETY: the caller's contract.
        unsafe { ctx.backend.select_raw(&stream, &raw, &spec) }
    })
}
