//! The C ABI of the per-row top-k selection (`crate::topk_select`): the CPU
//! backend on host memory (making an offline teacher cache).

use super::{guard, host_data, types, KdfuseStatus};
use crate::error::{invalid, Result};
use crate::tensor::{Dtype, HostData, Logits};
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
