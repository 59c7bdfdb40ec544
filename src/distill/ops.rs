//! The CPU engine's operations: GEMMs through `matrixmultiply` (split over
//! rows with rayon), bias + ReLU + dropout, ReLU backward and bias
//! gradients, each as the matching kernel of kernels/mlp.cu does it.

use super::dropout::Dropout;
use rayon::prelude::*;

/// `c[m×n]` (row-major, dense) `= a·b` with `a(i,p) = a[i·rsa + p·csa]` and
/// `b(p,j) = b[p·rsb + j·csb]`; rows of `c` are split over rayon's threads
/// when the product is large enough to pay for it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand is read at: bounds for the raw calls.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(
        k == 0 || last(m, k, rsa, csa) < a.len(),
        "gemm: a too short"
    );
    assert!(
        k == 0 || last(k, n, rsb, csb) < b.len(),
        "gemm: b too short"
    );
    assert!(m * n <= c.len(), "gemm: c too short");
    let threads = rayon::current_num_threads();
    let chunk = if m * n * k >= 1 << 18 && threads > 1 {
        m.div_ceil(threads)
    } else {
        m
    };
    let (ap, bp) = (a.as_ptr() as usize, b.as_ptr() as usize);
    c[..m * n]
        .par_chunks_mut(chunk * n)
        .enumerate()
        .for_each(|(i, cc)| {
            let rows = cc.len() / n;
            // SAFETY: the asserts above bound every element read and written;
            // each chunk writes its own rows of c.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    k,
                    n,
                    1.0,
                    (ap as *const f32).add(i * chunk * rsa),
                    rsa as isize,
                    csa as isize,
                    bp as *const f32,
                    rsb as isize,
                    csb as isize,
                    0.0,
                    cc.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        });
}

/// `z ← act(z + b)` on a `[rows × n]` batch: ReLU (`relu`) and inverted
/// dropout (kept elements scaled by `1/(1 − rate)`), as `mlp_bias_act` does.
pub(crate) fn bias_act(z: &mut [f32], b: &[f32], relu: bool, dropout: Option<Dropout>) {
    let n = b.len();
    z.par_chunks_mut(n)
        .with_min_len(16)
        .enumerate()
        .for_each(|(r, row)| {
            for (j, (x, &bj)) in row.iter_mut().zip(b).enumerate() {
                let mut v = *x + bj;
                if relu {
                    v = v.max(0.0);
                }
                if let Some(d) = dropout {
                    v = if d.keep((r * n + j) as u32) {
                        v * d.scale
                    } else {
                        0.0
                    };
                }
                *x = v;
            }
        });
}

/// `dz = dh · scale` where the layer's output `h > 0`, else 0 (ReLU and
/// dropout backward from the stored output), as `mlp_relu_back` does.
pub(crate) fn relu_back(dh: &[f32], h: &[f32], scale: f32, dz: &mut [f32]) {
    dz.par_iter_mut()
        .zip(dh.par_iter().zip(h.par_iter()))
        .with_min_len(4096)
        .for_each(|(z, (&d, &h))| *z = if h > 0.0 { d * scale } else { 0.0 });
}

/// `db[j] = Σ_r dz[r·n + j]`, rows summed in order, as `mlp_bias_grad` does.
pub(crate) fn bias_grad(dz: &[f32], db: &mut [f32]) {
    db.fill(0.0);
    for row in dz.chunks_exact(db.len()) {
        for (d, &x) in db.iter_mut().zip(row) {
            *d += x;
        }
    }
}
