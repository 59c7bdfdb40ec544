//! The fused linear tests' problems and comparisons, shared by the
//! emulated device tests (this directory) and the GPU tests
//! (tests/gpu_fused_linear/).
#![allow(dead_code)]

use half::bf16;
use kdfuse::fused_linear::{
    self, Chunking, Linear, LinearGrads, LinearInputs, LinearOutput, LinearSpec, LinearTeacher,
    Matrix, TeacherGrads,
};
use kdfuse::tensor::{Logits, TopkIndices, TopkTeacher};
use kdfuse::{Dtype, HostData, LossSpec, Oracle, Reduction};

/// A small deterministic generator (xorshift).
pub struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-scale, scale).
    fn f(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.f(scale)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Operands in one dtype, owned.
pub enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Data {
    fn new(x: Vec<f32>, dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Data::F32(x),
            _ => Data::Bf16(x.into_iter().map(bf16::from_f32).collect()),
        }
    }
    fn view(&self) -> HostData<'_> {
        match self {
            Data::F32(x) => HostData::F32(x),
            Data::Bf16(x) => HostData::Bf16(x),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    /// A linear teacher with its own H and a wider head (V_t > V).
    Linear,
    /// Dense teacher logits with a row stride > V.
    Logits,
    /// A top-k teacher (int64 indices when true).
    Topk(bool),
}

pub struct Problem {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub ht: usize,
    pub vt: usize,
    pub k: usize,
    pub stride: usize,
    pub hs: Data,
    pub ws: Data,
    pub bs: Option<Data>,
    pub ht_data: Data,
    pub wt: Data,
    pub bt: Option<Data>,
    pub tl: Data,
    pub idx32: Vec<i32>,
    pub idx64: Vec<i64>,
    pub vals: Data,
    pub labels: Option<Vec<i64>>,
    pub row_weights: Option<Vec<f32>>,
}

pub fn problem(
    seed: u64,
    (n, h, v): (usize, usize, usize),
    dtype: Dtype,
    bias: bool,
    labels: bool,
    row_weights: bool,
) -> Problem {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (ht, vt, k, stride) = (h + 3, v + 5, 7.min(v), v + 4);
    let d = |x: Vec<f32>| Data::new(x, dtype);
    let mut idx = Vec::new();
    for _ in 0..n {
        let mut row: Vec<usize> = Vec::new();
        while row.len() < k {
            let j = r.below(v);
            if !row.contains(&j) {
                row.push(j);
            }
        }
        idx.extend(row);
    }
    let labels = labels.then(|| {
        (0..n)
            .map(|i| if i % 4 == 1 { -100 } else { r.below(v) as i64 })
            .collect()
    });
    let row_weights = row_weights.then(|| {
        (0..n)
            .map(|i| if i % 5 == 2 { 0.0 } else { 0.5 + r.f(0.4) })
            .collect()
    });
    Problem {
        n,
        h,
        v,
        ht,
        vt,
        k,
        stride,
        hs: d(r.vec(n * h, 1.0)),
        ws: d(r.vec(v * h, 0.5)),
        bs: bias.then(|| d(r.vec(v, 0.3))),
        ht_data: d(r.vec(n * ht, 1.0)),
        wt: d(r.vec(vt * ht, 0.5)),
        bt: bias.then(|| d(r.vec(vt, 0.3))),
        tl: d(r.vec(n * stride, 2.0)),
        idx32: idx.iter().map(|&j| j as i32).collect(),
        idx64: idx.iter().map(|&j| j as i64).collect(),
        vals: d(r.vec(n * k, 2.0)),
        labels,
        row_weights,
    }
}

impl Problem {
    pub fn inputs(&self, kind: Kind) -> LinearInputs<'_> {
        let teacher = match kind {
            Kind::Linear => LinearTeacher::Linear(Linear::new(
                Matrix::new(self.ht_data.view(), self.n, self.ht),
                Matrix::new(self.wt.view(), self.vt, self.ht),
                self.bt.as_ref().map(Data::view),
            )),
            Kind::Logits => {
                LinearTeacher::Logits(Logits::strided(self.tl.view(), self.n, self.v, self.stride))
            }
            Kind::Topk(i64s) => LinearTeacher::Topk(TopkTeacher {
                indices: if i64s {
                    TopkIndices::I64(&self.idx64)
                } else {
                    TopkIndices::I32(&self.idx32)
                },
                values: self.vals.view(),
                k: self.k,
            }),
        };
        LinearInputs {
            student: Linear::new(
                Matrix::new(self.hs.view(), self.n, self.h),
                Matrix::new(self.ws.view(), self.v, self.h),
                self.bs.as_ref().map(Data::view),
            ),
            teacher,
            labels: self.labels.as_deref(),
            row_weights: self.row_weights.as_deref(),
        }
    }
}

/// max |a − b| ≤ atol + rtol · max |b|.
pub fn close(what: &str, a: &[f32], b: &[f32], rtol: f32, atol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        err <= atol + rtol * scale,
        "{what}: max error {err} (scale {scale}, rtol {rtol}, atol {atol})"
    );
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite values");
}

pub fn grads_close(what: &str, a: &LinearGrads, b: &LinearGrads, rtol: f32, atol: f32) {
    close(&format!("{what} ∂hidden"), &a.hidden, &b.hidden, rtol, atol);
    close(&format!("{what} ∂W"), &a.weight, &b.weight, rtol, atol);
    match (&a.bias, &b.bias) {
        (Some(x), Some(y)) => close(&format!("{what} ∂b"), x, y, rtol, atol),
        (None, None) => {}
        _ => panic!("{what}: bias gradient presence differs"),
    }
}

pub fn compare(what: &str, dev: &LinearOutput, host: &LinearOutput, dtype: Dtype) {
    let (rtol, atol) = match dtype {
        Dtype::F32 => (2e-4, 1e-6),
        _ => (3e-2, 1e-4),
    };
    let tol = f64::from(atol) + f64::from(rtol) * host.loss.abs().max(1e-3);
    assert!(
        (dev.loss - host.loss).abs() <= tol,
        "{what}: loss {} vs oracle {}",
        dev.loss,
        host.loss
    );
    assert_eq!(dev.valid_rows, host.valid_rows, "{what}: valid rows");
    let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<_>>();
    close(
        &format!("{what} row losses"),
        &f(&dev.row_losses),
        &f(&host.row_losses),
        rtol,
        atol,
    );
    match (&dev.student, &host.student) {
        (Some(a), Some(b)) => grads_close(&format!("{what} student"), a, b, rtol, atol),
        (None, None) => {}
        _ => panic!("{what}: student gradient presence differs"),
    }
    match (&dev.teacher, &host.teacher) {
        (Some(TeacherGrads::Linear(a)), Some(TeacherGrads::Linear(b))) => {
            grads_close(&format!("{what} teacher"), a, b, rtol, atol)
        }
        (Some(TeacherGrads::Logits(a)), Some(TeacherGrads::Logits(b))) => {
            close(&format!("{what} teacher ∂logits"), a, b, rtol, atol)
        }
        (None, None) => {}
        _ => panic!("{what}: teacher gradient presence differs"),
    }
}

/// `device` against the oracle path on problem `p` with teacher `kind`.
pub fn check(
    what: &str,
    p: &Problem,
    kind: Kind,
    dtype: Dtype,
    spec: &LinearSpec,
    device: &dyn Fn(&LinearInputs, &LinearSpec) -> kdfuse::Result<LinearOutput>,
) {
    let inputs = p.inputs(kind);
    let host = fused_linear::compute(&Oracle, &inputs, spec).expect("oracle path");
    let dev = device(&inputs, spec).unwrap_or_else(|e| panic!("{what}: device path: {e}"));
    compare(what, &dev, &host, dtype);
}

pub fn spec(loss: LossSpec, chunk: usize) -> LinearSpec {
    LinearSpec {
        loss,
        chunking: Chunking::Rows(chunk),
        grads: true,
    }
}

pub fn kd(alpha: f64, reduction: Reduction) -> LossSpec {
    LossSpec {
        alpha,
        temperature: 2.0,
        reduction,
        ..LossSpec::default()
    }
}
