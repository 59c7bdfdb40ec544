//! The CPU engine of [`super::DistillStep`]: GEMMs through `matrixmultiply`
//! (split over rows with rayon), bias/activation/dropout and the optimizer
//! with rayon, the fused loss and gradient through [`crate::CpuBackend`].

use super::mlp::Layout;
use super::Mlp;
use super::{Dropout, Engine, TeacherSource};
use crate::backend::Backend;
use crate::error::Result;
use crate::spec::LossSpec;
use crate::tensor::{GradDtype, HostData, KdInputs, Logits};
use crate::CpuBackend;
use rayon::prelude::*;

use super::optim::Optimizer;

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

/// Inference forward: logits for `rows` rows of `x`.
pub(crate) fn forward(layout: &Layout, params: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let mut h = x.to_vec();
    for l in 0..layout.layers() {
        let (i, o) = (layout.sizes[l], layout.sizes[l + 1]);
        let mut z = vec![0.0f32; rows * o];
        gemm(
            rows,
            i,
            o,
            &h,
            (i, 1),
            &params[layout.w[l]..],
            (o, 1),
            &mut z,
        );
        bias_act(
            &mut z,
            &params[layout.b[l]..layout.b[l] + o],
            l + 1 < layout.layers(),
            None,
        );
        h = z;
    }
    h
}

pub(crate) struct CpuEngine {
    layout: Layout,
    params: Vec<f32>,
    grads: Vec<f32>,
    s1: Vec<f32>,
    s2: Vec<f32>,
    /// Outputs of layers 1..=L (index l − 1); the last one is the logits.
    acts: Vec<Vec<f32>>,
    dh: Vec<f32>,
    dz: Vec<f32>,
    teacher: Option<Mlp>,
}

impl CpuEngine {
    pub fn new(student: &Mlp, teacher: Option<&Mlp>) -> Self {
        let layout = student.layout().clone();
        let n = layout.total;
        CpuEngine {
            acts: vec![Vec::new(); layout.layers()],
            layout,
            params: student.params().to_vec(),
            grads: vec![0.0; n],
            s1: vec![0.0; n],
            s2: vec![0.0; n],
            dh: Vec::new(),
            dz: Vec::new(),
            teacher: teacher.cloned(),
        }
    }
}

impl Engine for CpuEngine {
    fn forward_backward(
        &mut self,
        x: &[f32],
        rows: usize,
        labels: Option<&[i64]>,
        teacher: TeacherSource<'_>,
        spec: &LossSpec,
        dropout: &dyn Fn(usize) -> Option<Dropout>,
    ) -> Result<f64> {
        let lay = &self.layout;
        let layers = lay.layers();
        // Forward, keeping every layer's output.
        for l in 0..layers {
            let (i, o) = (lay.sizes[l], lay.sizes[l + 1]);
            let (before, rest) = self.acts.split_at_mut(l);
            let z = &mut rest[0];
            z.resize(rows * o, 0.0);
            let h: &[f32] = if l == 0 { x } else { &before[l - 1] };
            gemm(rows, i, o, h, (i, 1), &self.params[lay.w[l]..], (o, 1), z);
            let hidden = l + 1 < layers;
            bias_act(
                z,
                &self.params[lay.b[l]..lay.b[l] + o],
                hidden,
                if hidden { dropout(l) } else { None },
            );
        }
        let v = lay.outputs();
        let logits = &self.acts[layers - 1];
        let owned_teacher;
        let t_logits: &[f32] = match teacher {
            TeacherSource::Logits(t) => t,
            TeacherSource::Model => {
                owned_teacher = self.teacher.as_ref().expect("checked").forward(x)?;
                &owned_teacher
            }
            TeacherSource::None => logits,
        };
        let inputs = KdInputs {
            student: Logits::new(HostData::F32(logits), rows, v),
            teacher: Logits::new(HostData::F32(t_logits), rows, v),
            labels,
            row_weights: None,
        };
        let out = CpuBackend.compute(&inputs, spec, Some(GradDtype::F32))?;
        self.dz = out.grad.expect("asked for");

        // Backward.
        for l in (0..layers).rev() {
            let (i, o) = (lay.sizes[l], lay.sizes[l + 1]);
            let h: &[f32] = if l == 0 { x } else { &self.acts[l - 1] };
            gemm(
                i,
                rows,
                o,
                h,
                (1, i),
                &self.dz,
                (o, 1),
                &mut self.grads[lay.w[l]..lay.w[l] + i * o],
            );
            bias_grad(&self.dz, &mut self.grads[lay.b[l]..lay.b[l] + o]);
            if l > 0 {
                self.dh.resize(rows * i, 0.0);
                gemm(
                    rows,
                    o,
                    i,
                    &self.dz,
                    (o, 1),
                    &self.params[lay.w[l]..],
                    (1, o),
                    &mut self.dh,
                );
                let scale = dropout(l - 1).map_or(1.0, |d| d.scale);
                let mut dz = std::mem::take(&mut self.dz);
                dz.resize(rows * i, 0.0);
                relu_back(&self.dh, &self.acts[l - 1], scale, &mut dz);
                self.dz = dz;
            }
        }
        Ok(out.loss)
    }

    fn update(&mut self, opt: &Optimizer, t: u64) -> Result<()> {
        // Weights (with weight decay), then biases.
        let w = self.layout.weights;
        let (pw, pb) = self.params.split_at_mut(w);
        let (gw, gb) = self.grads.split_at(w);
        let (s1w, s1b) = self.s1.split_at_mut(w);
        let (s2w, s2b) = self.s2.split_at_mut(w);
        opt.update_cpu(t, pw, gw, s1w, s2w, true);
        opt.update_cpu(t, pb, gb, s1b, s2b, false);
        Ok(())
    }

    fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        Ok(forward(&self.layout, &self.params, x, rows))
    }

    fn teacher_predict(&mut self, x: &[f32], _rows: usize) -> Result<Vec<f32>> {
        self.teacher.as_ref().expect("checked").forward(x)
    }

    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }

    fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.grads.clone())
    }
}
