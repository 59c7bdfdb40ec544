//! One row of the fast CPU path on several threads: the row's segments
//! (kernels/kd_host_fast.cpp, `kd_host_fast_segment()` elements each) through
//! its phases, each phase's segments in parallel (rayon), their statistics
//! merged and their sums added in order. The result is
//! [`crate::hostmath::fast_row`]'s bit for bit: the CPU backend takes this
//! path when it has fewer rows than threads.

use crate::hostmath::{label_arg, out_ptr, RowData};
use crate::params::KernelParams;
use crate::spec::KernelDivergence;
use rayon::prelude::*;
use std::ffi::c_void;
use std::os::raw::c_int;

extern "C" {
    fn kd_host_fast_segment() -> c_int;
    fn kd_host_fast_state_sizes(out: *mut i64);
    fn kd_host_fast_seg_stats(
        div: c_int,
        ce: c_int,
        dtype: c_int,
        s: *const c_void,
        t: *const c_void,
        n: c_int,
        p: *const KernelParams,
        stats: *mut c_void,
    );
    fn kd_host_fast_merge(div: c_int, ce: c_int, a: *mut c_void, b: *const c_void);
    fn kd_host_fast_row_finish(
        div: c_int,
        ce: c_int,
        stats: *const c_void,
        has_label: c_int,
        y: i64,
        w: f32,
        p: *const KernelParams,
        row: *mut c_void,
    );
    fn kd_host_fast_seg_sums2(
        div: c_int,
        dtype: c_int,
        s: *const c_void,
        t: *const c_void,
        n: c_int,
        row: *const c_void,
        p: *const KernelParams,
        grad: *mut f32,
        out: *mut f32,
    );
    fn kd_host_fast_row_finish2(
        div: c_int,
        row: *mut c_void,
        tot: *const f32,
        p: *const KernelParams,
    );
    fn kd_host_fast_seg_grad(
        div: c_int,
        ce: c_int,
        dtype: c_int,
        s: *const c_void,
        t: *const c_void,
        n: c_int,
        row: *const c_void,
        p: *const KernelParams,
        grad: *mut f32,
    );
    fn kd_host_fast_row_end(
        div: c_int,
        ce: c_int,
        dtype: c_int,
        s: *const c_void,
        t: *const c_void,
        y: i64,
        has_label: c_int,
        grad: *mut f32,
        row: *const c_void,
        p: *const KernelParams,
    ) -> f32;
}

/// Room for the C side's `KdFast` or `KdFastRow` (checked by
/// [`state_sizes_fit`]'s test).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct State([u8; STATE_BYTES]);

const STATE_BYTES: usize = 256;

impl State {
    fn new() -> Self {
        State([0; STATE_BYTES])
    }
    fn ptr(&self) -> *const c_void {
        self.0.as_ptr().cast()
    }
    fn mut_ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// Elements per segment.
pub(crate) fn segment() -> usize {
    // SAFETY: returns a constant.
    unsafe { kd_host_fast_segment() as usize }
}

/// Whether the C states fit [`State`].
fn state_sizes_fit() -> bool {
    let mut out = [0i64; 2];
    // SAFETY: writes two values.
    unsafe { kd_host_fast_state_sizes(out.as_mut_ptr()) };
    out.iter().all(|&b| b > 0 && b as usize <= STATE_BYTES)
}

/// [`crate::hostmath::fast_row`] with the row's segments on the rayon pool:
/// returns ℓ and writes the V gradient entries (× `w`) when given.
pub(crate) fn fast_row_split(
    div: i32,
    ce: bool,
    data: RowData<'_>,
    label: Option<i64>,
    grad: Option<&mut [f32]>,
    p: &KernelParams,
    w: f32,
) -> f32 {
    let v = p.vocab.max(0) as usize;
    if label == Some(p.ignore_index) {
        if let Some(g) = grad {
            g.fill(0.0);
        }
        return 0.0;
    }
    debug_assert!(state_sizes_fit());
    let seg_len = segment();
    let segs: Vec<(usize, usize)> = (0..v.max(1))
        .step_by(seg_len)
        .map(|j0| (j0, (v - j0).min(seg_len)))
        .collect();
    let ce = c_int::from(ce);
    let (y, has) = label_arg(label);
    // SAFETY (every call below): segments of the V-element rows of `data`
    // (the caller checked V = p.vocab), the gradient's matching segment,
    // states of at least the C structs' sizes.
    let stats: Vec<State> = segs
        .par_iter()
        .map(|&(j0, n)| {
            let (dtype, s, t) = data.segment(j0, n);
            let mut st = State::new();
            unsafe { kd_host_fast_seg_stats(div, ce, dtype, s, t, n as c_int, p, st.mut_ptr()) };
            st
        })
        .collect();
    let mut total = stats[0];
    for b in &stats[1..] {
        unsafe { kd_host_fast_merge(div, ce, total.mut_ptr(), b.ptr()) };
    }
    let mut row = State::new();
    unsafe { kd_host_fast_row_finish(div, ce, total.ptr(), has, y, w, p, row.mut_ptr()) };
    let mut grad = grad;
    if div == KernelDivergence::Tvd.id() || div == KernelDivergence::Jsd(0.5).id() {
        let parts: Vec<[f32; 3]> = match grad.as_deref_mut() {
            Some(g) => g
                .par_chunks_mut(seg_len)
                .zip(segs.par_iter())
                .map(|(gs, &(j0, n))| sums2(div, data, j0, n, &row, p, gs.as_mut_ptr()))
                .collect(),
            None => segs
                .par_iter()
                .map(|&(j0, n)| sums2(div, data, j0, n, &row, p, std::ptr::null_mut()))
                .collect(),
        };
        let mut tot = [0.0f32; 3];
        for part in &parts {
            for k in 0..3 {
                tot[k] += part[k];
            }
        }
        unsafe { kd_host_fast_row_finish2(div, row.mut_ptr(), tot.as_ptr(), p) };
    }
    if let Some(g) = grad.as_deref_mut() {
        g.par_chunks_mut(seg_len)
            .zip(segs.par_iter())
            .for_each(|(gs, &(j0, n))| {
                let (dtype, s, t) = data.segment(j0, n);
                unsafe {
                    kd_host_fast_seg_grad(
                        div,
                        ce,
                        dtype,
                        s,
                        t,
                        n as c_int,
                        row.ptr(),
                        p,
                        gs.as_mut_ptr(),
                    )
                };
            });
    }
    let (dtype, s, t) = data.segment(0, v);
    let gp = out_ptr(grad);
    unsafe { kd_host_fast_row_end(div, ce, dtype, s, t, y, has, gp, row.ptr(), p) }
}

fn sums2(
    div: i32,
    data: RowData<'_>,
    j0: usize,
    n: usize,
    row: &State,
    p: &KernelParams,
    grad: *mut f32,
) -> [f32; 3] {
    let (dtype, s, t) = data.segment(j0, n);
    let mut out = [0.0f32; 3];
    // SAFETY: as fast_row_split's calls; `grad` is the segment's or null.
    unsafe {
        kd_host_fast_seg_sums2(
            div,
            dtype,
            s,
            t,
            n as c_int,
            row.ptr(),
            p,
            grad,
            out.as_mut_ptr(),
        )
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostmath::{f32_to_bf16_bits, f32_to_f16_bits, fast_row};
    use crate::spec::{Divergence, LossSpec};

    #[test]
    fn states_fit() {
        assert!(state_sizes_fit());
    }

    /// Logits of scale ~3 from a fixed LCG, every 97th masked (−inf).
    fn logits(v: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..v)
            .map(|j| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                if j % 97 == 5 {
                    f32::NEG_INFINITY
                } else {
                    6.0 * u - 3.0 + offset
                }
            })
            .collect()
    }

    /// The split row gives the one-thread row's loss and gradient bit for
    /// bit, for every divergence, α = 0 and > 0, each dtype, with and
    /// without a label, over 2 full segments and a part (and a short row).
    #[test]
    fn split_row_is_the_row_bit_for_bit() {
        let divs = [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd,
            Divergence::Tvd,
            Divergence::SoftCe,
        ];
        for v in [2 * segment() + 777, 1000] {
            let s = logits(v, 1, 0.0);
            let t = logits(v, 2, 1.5);
            let (sb, tb): (Vec<u16>, Vec<u16>) = s
                .iter()
                .zip(&t)
                .map(|(&a, &b)| (f32_to_bf16_bits(a), f32_to_bf16_bits(b)))
                .unzip();
            let (sh, th): (Vec<u16>, Vec<u16>) = s
                .iter()
                .zip(&t)
                .map(|(&a, &b)| (f32_to_f16_bits(a), f32_to_f16_bits(b)))
                .unzip();
            let datas = [
                RowData::F32(&s, &t),
                RowData::Half16 {
                    bf16: true,
                    s: &sb,
                    t: &tb,
                },
                RowData::Half16 {
                    bf16: false,
                    s: &sh,
                    t: &th,
                },
            ];
            for div in divs {
                for alpha in [0.0, 0.3] {
                    // α > 0 needs labels (checked by the backends).
                    let labels: &[Option<i64>] = if alpha > 0.0 {
                        &[Some(11), Some(-100)]
                    } else {
                        &[None, Some(11), Some(-100)]
                    };
                    for &label in labels {
                        let spec = LossSpec {
                            divergence: div,
                            alpha,
                            temperature: 2.0,
                            ..LossSpec::default()
                        };
                        let p = KernelParams::new(&spec, v);
                        let id = spec.kernel_divergence().id();
                        for data in datas {
                            let mut g1 = vec![f32::NAN; v];
                            let mut g2 = vec![f32::NAN; v];
                            let l1 = fast_row(id, alpha > 0.0, data, label, Some(&mut g1), &p, 0.5);
                            let l2 = fast_row_split(
                                id,
                                alpha > 0.0,
                                data,
                                label,
                                Some(&mut g2),
                                &p,
                                0.5,
                            );
                            let what = format!("{div:?} α={alpha} label={label:?} V={v}");
                            assert_eq!(l1.to_bits(), l2.to_bits(), "loss {what}: {l1} vs {l2}");
                            assert!(l1.is_finite(), "{what}: {l1}");
                            for (j, (a, b)) in g1.iter().zip(&g2).enumerate() {
                                assert_eq!(
                                    a.to_bits(),
                                    b.to_bits(),
                                    "grad[{j}] {what}: {a} vs {b}"
                                );
                            }
                            let l3 = fast_row_split(id, alpha > 0.0, data, label, None, &p, 0.5);
                            assert_eq!(l1.to_bits(), l3.to_bits(), "loss without gradient {what}");
                        }
                    }
                }
            }
        }
    }
}
