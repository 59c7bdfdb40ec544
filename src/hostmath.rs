//! FFI to kernels/kd_host.cpp: the kernels' row arithmetic compiled for the
//! CPU (see kernels/kd_math.cuh). Public so that tests can check it.

use crate::params::KernelParams;
use crate::tensor::Dtype;
use std::os::raw::c_int;

/// Declares the kernels' dense row entry points, one per input dtype, all
/// with the same parameters.
macro_rules! row_entry_points {
    ($($name:ident: $elem:ty),+) => {
        extern "C" {
            $(fn $name(
                div: c_int,
                s: *const $elem,
                t: *const $elem,
                y: i64,
                has_label: c_int,
                grad: *mut f32,
                grad_t: *mut f32,
                p: *const KernelParams,
                w: f32,
            ) -> f32;)+
        }
    };
}
row_entry_points!(kd_host_row_f32: f32, kd_host_row_bf16: u16, kd_host_row_f16: u16);

extern "C" {
    fn kd_host_topk_row(
        dtype: c_int,
        s: *const std::ffi::c_void,
        idx: *const std::ffi::c_void,
        idx64: c_int,
        vals: *const std::ffi::c_void,
        y: i64,
        has_label: c_int,
        grad: *mut f32,
        p: *const KernelParams,
        w: f32,
    ) -> f32;
    fn kd_host_fast_row(
        div: c_int,
        ce: c_int,
        dtype: c_int,
        s: *const std::ffi::c_void,
        t: *const std::ffi::c_void,
        y: i64,
        has_label: c_int,
        grad: *mut f32,
        p: *const KernelParams,
        w: f32,
    ) -> f32;
    fn kd_host_row_weight(p: *const KernelParams, valid_rows: i64) -> f32;
    fn kd_host_params_layout(out: *mut i64);
    #[cfg(test)]
    fn kd_host_args_layout(out: *mut i64);
    fn kd_host_f32_to_bf16(x: f32) -> u16;
    fn kd_host_f32_to_f16(x: f32) -> u16;
    fn kd_host_bf16_to_f32(x: u16) -> f32;
    fn kd_host_f16_to_f32(x: u16) -> f32;
    fn kd_host_online_lse(x: *const f32, n: i64, lanes: c_int) -> f32;
}

/// One row's element data, as the kernels read it.
#[derive(Clone, Copy)]
pub(crate) enum RowData<'a> {
    F32(&'a [f32], &'a [f32]),
    Half16 {
        bf16: bool,
        s: &'a [u16],
        t: &'a [u16],
    },
}

impl RowData<'_> {
    /// kd_host_fast.cpp's dtype code (0 f32, 1 bf16, 2 f16) and the
    /// elements `[j0, j0 + n)` of the student and teacher rows.
    pub(crate) fn segment(
        self,
        j0: usize,
        n: usize,
    ) -> (c_int, *const std::ffi::c_void, *const std::ffi::c_void) {
        match self {
            RowData::F32(s, t) => (
                0,
                s[j0..j0 + n].as_ptr().cast(),
                t[j0..j0 + n].as_ptr().cast(),
            ),
            RowData::Half16 { bf16, s, t } => (
                if bf16 { 1 } else { 2 },
                s[j0..j0 + n].as_ptr().cast(),
                t[j0..j0 + n].as_ptr().cast(),
            ),
        }
    }
}

/// Runs one row through the kernels' math: returns ℓ and writes the gradient
/// (× `w`) into `grad`, and the teacher gradient into `grad_t`, when given.
/// `s`, `t`, `grad` and `grad_t` hold exactly V values.
pub(crate) fn row(
    div: i32,
    data: RowData<'_>,
    label: Option<i64>,
    grad: Option<&mut [f32]>,
    grad_t: Option<&mut [f32]>,
    p: &KernelParams,
    w: f32,
) -> f32 {
    let (y, has) = label_arg(label);
    let (gp, gtp) = (out_ptr(grad), out_ptr(grad_t));
    // SAFETY: slices of V = p.vocab elements (checked by the caller), the
    // gradients too.
    unsafe {
        match data {
            RowData::F32(s, t) => {
                kd_host_row_f32(div, s.as_ptr(), t.as_ptr(), y, has, gp, gtp, p, w)
            }
            RowData::Half16 { bf16: true, s, t } => {
                kd_host_row_bf16(div, s.as_ptr(), t.as_ptr(), y, has, gp, gtp, p, w)
            }
            RowData::Half16 { bf16: false, s, t } => {
                kd_host_row_f16(div, s.as_ptr(), t.as_ptr(), y, has, gp, gtp, p, w)
            }
        }
    }
}

/// [`row`] in precision = fast (kernels/kd_host_fast.cpp: the fast kernels'
/// arithmetic, vectorized); `ce`: α > 0. No teacher gradient (the fast
/// kernels have none).
pub(crate) fn fast_row(
    div: i32,
    ce: bool,
    data: RowData<'_>,
    label: Option<i64>,
    grad: Option<&mut [f32]>,
    p: &KernelParams,
    w: f32,
) -> f32 {
    let (y, has) = label_arg(label);
    let gp = out_ptr(grad);
    let (dtype, s, t) = data.segment(0, p.vocab.max(0) as usize);
    // SAFETY: rows of V = p.vocab elements of `dtype` (checked by the
    // caller), the gradient too.
    unsafe { kd_host_fast_row(div, c_int::from(ce), dtype, s, t, y, has, gp, p, w) }
}

/// An optional output slice as the C side takes it (null: none).
pub(crate) fn out_ptr(out: Option<&mut [f32]>) -> *mut f32 {
    out.map_or(std::ptr::null_mut(), |g| g.as_mut_ptr())
}

/// The C side's (label, has_label) pair.
pub(crate) fn label_arg(label: Option<i64>) -> (i64, c_int) {
    match label {
        Some(y) => (y, 1),
        None => (-1, 0),
    }
}

/// One row of a top-k teacher, as the kernels see it: the student row (V
/// elements of `dtype` as raw bytes), the row's k indices and values.
pub(crate) struct TopkRow<'a> {
    pub dtype: Dtype,
    pub student: &'a [u8],
    pub indices: TopkRowIndices<'a>,
    pub values: &'a [u8],
}

/// A row's k indices.
pub(crate) enum TopkRowIndices<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

/// Runs one top-k row through the kernels' math (mode and k in `p`): returns
/// ℓ and writes the gradient (× `w`, V values) when given. Indices must have
/// been validated (in range, distinct).
pub(crate) fn topk_row(
    data: &TopkRow<'_>,
    label: Option<i64>,
    grad: Option<&mut [f32]>,
    p: &KernelParams,
    w: f32,
) -> f32 {
    let (y, has) = label_arg(label);
    let gp = out_ptr(grad);
    let (ip, i64s) = match data.indices {
        TopkRowIndices::I32(i) => (i.as_ptr() as *const std::ffi::c_void, 0),
        TopkRowIndices::I64(i) => (i.as_ptr() as *const std::ffi::c_void, 1),
    };
    // SAFETY: V student elements, k indices (validated) and k values, V
    // gradient entries (checked by the caller).
    unsafe {
        kd_host_topk_row(
            data.dtype.code(),
            data.student.as_ptr() as *const std::ffi::c_void,
            ip,
            i64s,
            data.values.as_ptr() as *const std::ffi::c_void,
            y,
            has,
            gp,
            p,
            w,
        )
    }
}

pub(crate) fn row_weight(p: &KernelParams, valid_rows: usize) -> f32 {
    // SAFETY: reads the struct only.
    unsafe { kd_host_row_weight(p, valid_rows as i64) }
}

/// `[sizeof, offset of ignore_index, of reduction, of vocab, of softcap, of
/// topk_mode, of topk_k]` of the C struct.
pub fn params_layout() -> [i64; 7] {
    let mut out = [0i64; 7];
    // SAFETY: writes seven values.
    unsafe { kd_host_params_layout(out.as_mut_ptr()) };
    out
}

/// The kernels' f32 → bf16 rounding (bits).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    unsafe { kd_host_f32_to_bf16(x) }
}
/// The kernels' f32 → f16 rounding (bits).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    unsafe { kd_host_f32_to_f16(x) }
}
/// The kernels' bf16 → f32 conversion.
pub fn bf16_bits_to_f32(x: u16) -> f32 {
    unsafe { kd_host_bf16_to_f32(x) }
}
/// The kernels' f16 → f32 conversion.
pub fn f16_bits_to_f32(x: u16) -> f32 {
    unsafe { kd_host_f16_to_f32(x) }
}
/// log Σ exp(x) by the kernels' online statistics over `lanes` lanes (1–64).
pub fn online_lse(x: &[f32], lanes: usize) -> f32 {
    unsafe { kd_host_online_lse(x.as_ptr(), x.len() as i64, lanes as c_int) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_rust() {
        let l = params_layout();
        assert_eq!(l[0] as usize, std::mem::size_of::<KernelParams>());
        assert_eq!(
            l[1] as usize,
            std::mem::offset_of!(KernelParams, ignore_index)
        );
        assert_eq!(l[2] as usize, std::mem::offset_of!(KernelParams, reduction));
        assert_eq!(l[3] as usize, std::mem::offset_of!(KernelParams, vocab));
        assert_eq!(l[4] as usize, std::mem::offset_of!(KernelParams, softcap));
        assert_eq!(l[5] as usize, std::mem::offset_of!(KernelParams, topk_mode));
        assert_eq!(l[6] as usize, std::mem::offset_of!(KernelParams, topk_k));
    }

    /// The launch contracts of kernels/kd_args.h and their Rust mirrors
    /// (src/params.rs) agree on size and every offset listed.
    #[test]
    fn launch_args_layout_matches_rust() {
        let want = crate::params::args_layout();
        let mut got = vec![0i64; want.len()];
        // SAFETY: kd_host_args_layout writes exactly the entries listed.
        unsafe { kd_host_args_layout(got.as_mut_ptr()) };
        let got: Vec<usize> = got.into_iter().map(|x| x as usize).collect();
        assert_eq!(got, want);
    }
}
