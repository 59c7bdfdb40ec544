//! Random fused-linear cases and their reference: the logits materialised
//! for the whole batch, the backend's loss on them, and the head gradients
//! by f64 sums.
//!
//! Hidden states and heads are drawn on a grid (multiples of 1/8 and 1/64)
//! so that every logit is exact in f32 whatever the order of the sums: the
//! fused path and the reference then hold the very same logits, also after
//! rounding to bf16/f16, and any difference is the chunking's.

use kdfuse::fused_linear::{Chunking, Linear, LinearInputs, LinearSpec, LinearTeacher, Matrix};
use kdfuse::{
    Backend, Divergence, Dtype, GradDtype, KdInputs, Logits, LossSpec, OwnedData, Reduction,
    TopkIndices, TopkInputs, TopkMode, TopkTeacher,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// How the teacher comes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TeacherKind {
    /// Hidden states and a (wider) head.
    Linear,
    /// Dense logits with a row stride above V.
    Logits,
    /// k indices and values per row.
    Topk(usize, TopkMode),
}

/// One case's data, owned.
#[derive(Debug, Clone)]
pub struct Case {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub dtype: Dtype,
    pub hidden: OwnedData,
    pub weight: OwnedData,
    pub bias: Option<OwnedData>,
    pub teacher: TeacherKind,
    /// Teacher hidden `[n, ht]` and head `[vt, ht]` (Linear).
    pub t_hidden: OwnedData,
    pub t_weight: OwnedData,
    pub t_bias: Option<OwnedData>,
    pub ht: usize,
    pub vt: usize,
    /// Teacher logits `[n, stride]` (Logits).
    pub t_logits: OwnedData,
    pub t_stride: usize,
    /// Top-k indices and values `[n, k]`.
    pub idx: Vec<i64>,
    pub vals: OwnedData,
    pub labels: Option<Vec<i64>>,
    pub row_weights: Option<Vec<f32>>,
    pub spec: LossSpec,
    pub chunking: Chunking,
}

fn grid(rng: &mut StdRng, len: usize, step: f32, half_range: i32) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-half_range..=half_range) as f32 * step)
        .collect()
}

impl Case {
    /// A random case: `n` rows, `h` hidden, `v` vocabulary.
    pub fn random(seed: u64, n: usize, h: usize, v: usize, dtype: Dtype) -> Case {
        Case::random_with(seed, n, h, v, dtype, None)
    }

    /// As [`Case::random`], with the teacher's kind given.
    pub fn random_with(
        seed: u64,
        n: usize,
        h: usize,
        v: usize,
        dtype: Dtype,
        teacher: Option<TeacherKind>,
    ) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        // Logits of standard deviation about 1.5–3: h·(1/8 grid up to 2)·(1/64 grid).
        let wscale = (24.0 / (h as f32).sqrt()).round().clamp(2.0, 24.0) as i32;
        let hidden = grid(&mut rng, n * h, 0.125, 16);
        let weight = grid(&mut rng, v * h, 1.0 / 64.0, wscale);
        let bias = rng.random_bool(0.5).then(|| grid(&mut rng, v, 0.25, 4));
        let (ht, vt) = (rng.random_range(1..=h + 3), v + rng.random_range(0..3));
        let t_hidden = grid(&mut rng, n * ht, 0.125, 16);
        let twscale = (24.0 / (ht as f32).sqrt()).round().clamp(2.0, 24.0) as i32;
        let t_weight = grid(&mut rng, vt * ht, 1.0 / 64.0, twscale);
        let t_bias = rng.random_bool(0.5).then(|| grid(&mut rng, vt, 0.25, 4));
        let t_stride = v + rng.random_range(0..4);
        let t_logits: Vec<f32> = (0..n * t_stride)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let drawn = match rng.random_range(0..4) {
            0 | 1 => TeacherKind::Linear,
            2 => TeacherKind::Logits,
            _ => {
                let mode =
                    [TopkMode::Full, TopkMode::Support, TopkMode::Tail][rng.random_range(0..3)];
                TeacherKind::Topk(rng.random_range(1..=v.min(9)), mode)
            }
        };
        let teacher = teacher.unwrap_or(drawn);
        let k = match teacher {
            TeacherKind::Topk(k, _) => k,
            _ => 1,
        };
        let mut idx = Vec::with_capacity(n * k);
        let mut vals = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut cols: Vec<i64> = (0..v as i64).collect();
            cols.shuffle(&mut rng);
            idx.extend_from_slice(&cols[..k]);
            // Log-probabilities of mass 0.9 (the tail mode needs them).
            let raw: Vec<f64> = (0..k).map(|_| rng.random_range(0.05..1.0)).collect();
            let total: f64 = raw.iter().sum();
            vals.extend(raw.iter().map(|p| ((p / total) * 0.9).ln() as f32));
        }
        let divergence = Divergence::ALL[rng.random_range(0..Divergence::ALL.len())];
        let with_labels = rng.random_bool(0.7);
        let labels = with_labels.then(|| {
            (0..n)
                .map(|_| {
                    if rng.random_bool(0.25) {
                        -100
                    } else {
                        rng.random_range(0..v as i64)
                    }
                })
                .collect::<Vec<_>>()
        });
        let mut spec = LossSpec {
            divergence,
            temperature: [1.0, 2.0, 0.7][rng.random_range(0..3)],
            alpha: if with_labels && rng.random_bool(0.5) {
                0.3
            } else {
                0.0
            },
            reduction: [
                Reduction::BatchMean,
                Reduction::Sum,
                Reduction::Mean,
                Reduction::None,
            ][rng.random_range(0..4)],
            softcap: rng.random_bool(0.2).then_some(5.0),
            ..Default::default()
        };
        if divergence == Divergence::Jsd {
            spec.beta = [0.0, 0.3, 1.0][rng.random_range(0..3)];
        }
        if let TeacherKind::Topk(_, mode) = teacher {
            spec.topk_mode = mode;
            spec.divergence = Divergence::ForwardKl;
            spec.beta = LossSpec::default().beta;
            if mode == TopkMode::Tail {
                spec.teacher_log_probs = true;
                spec.temperature = 1.0;
                spec.softcap = None;
            }
        }
        let chunking = match rng.random_range(0..5) {
            0 => Chunking::Rows(1),
            1 => Chunking::Rows(n.max(1)),
            2 => Chunking::Rows(rng.random_range(1..=n.max(1) + 2)),
            3 => Chunking::Rows(2),
            // At most 20·V bytes per row (two f32 logits and their bf16
            // copies, two f32 gradients): 1 to 4 rows or more.
            _ => Chunking::MemoryBudget(v * 20 * rng.random_range(1..=4)),
        };
        Case {
            n,
            h,
            v,
            dtype,
            hidden: OwnedData::from_f32(&hidden, dtype),
            weight: OwnedData::from_f32(&weight, dtype),
            bias: bias.map(|b| OwnedData::from_f32(&b, dtype)),
            teacher,
            t_hidden: OwnedData::from_f32(&t_hidden, dtype),
            t_weight: OwnedData::from_f32(&t_weight, dtype),
            t_bias: t_bias.map(|b| OwnedData::from_f32(&b, dtype)),
            ht,
            vt,
            t_logits: OwnedData::from_f32(&t_logits, dtype),
            t_stride,
            idx,
            vals: OwnedData::from_f32(&vals, dtype),
            labels,
            row_weights: rng
                .random_bool(0.3)
                .then(|| (0..n).map(|_| rng.random_range(0.0f32..2.0)).collect()),
            spec,
            chunking,
        }
    }

    fn k(&self) -> usize {
        match self.teacher {
            TeacherKind::Topk(k, _) => k,
            _ => 0,
        }
    }

    /// The fused path's inputs.
    pub fn inputs(&self) -> LinearInputs<'_> {
        LinearInputs {
            student: Linear::new(
                Matrix::new(self.hidden.view(), self.n, self.h),
                Matrix::new(self.weight.view(), self.v, self.h),
                self.bias.as_ref().map(|b| b.view()),
            ),
            teacher: match self.teacher {
                TeacherKind::Linear => LinearTeacher::Linear(Linear::new(
                    Matrix::new(self.t_hidden.view(), self.n, self.ht),
                    Matrix::new(self.t_weight.view(), self.vt, self.ht),
                    self.t_bias.as_ref().map(|b| b.view()),
                )),
                TeacherKind::Logits => LinearTeacher::Logits(Logits::strided(
                    self.t_logits.view(),
                    self.n,
                    self.v,
                    self.t_stride,
                )),
                TeacherKind::Topk(k, _) => LinearTeacher::Topk(TopkTeacher {
                    indices: TopkIndices::I64(&self.idx),
                    values: self.vals.view(),
                    k,
                }),
            },
            labels: self.labels.as_deref(),
            row_weights: self.row_weights.as_deref(),
        }
    }

    /// The fused path's spec (gradients on).
    pub fn linear_spec(&self) -> LinearSpec {
        LinearSpec {
            loss: self.spec.clone(),
            chunking: self.chunking,
            grads: true,
        }
    }
}

/// Values of `data` as f64.
pub fn values(data: &OwnedData) -> Vec<f64> {
    let v = data.view();
    (0..v.len()).map(|i| v.get(i) as f64).collect()
}

/// `hidden · weight[..v]ᵀ + bias` in f64, rounded to f32 and then to `dtype`.
pub fn materialise(
    hidden: &[f64],
    n: usize,
    h: usize,
    weight: &[f64],
    v: usize,
    bias: Option<&[f64]>,
    dtype: Dtype,
) -> OwnedData {
    let mut out = vec![0f32; n * v];
    for r in 0..n {
        for j in 0..v {
            let dot: f64 = (0..h).map(|c| hidden[r * h + c] * weight[j * h + c]).sum();
            out[r * v + j] = (dot + bias.map_or(0.0, |b| b[j])) as f32;
        }
    }
    OwnedData::from_f32(&out, dtype)
}

/// The head gradients of a logit gradient `g` `[n, v]`: `(G·W, Gᵀ·h, Σ G)`
/// in f64, the weight gradient `[rows, h]` (rows ≥ v, the rest zero).
pub fn head_grads(
    g: &[f32],
    n: usize,
    v: usize,
    hidden: &[f64],
    h: usize,
    weight: &[f64],
    rows: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut gh = vec![0.0; n * h];
    let mut gw = vec![0.0; rows * h];
    let mut gb = vec![0.0; rows];
    for r in 0..n {
        for j in 0..v {
            let x = g[r * v + j] as f64;
            for c in 0..h {
                gh[r * h + c] += x * weight[j * h + c];
                gw[j * h + c] += x * hidden[r * h + c];
            }
            gb[j] += x;
        }
    }
    (gh, gw, gb)
}

/// The reference of a case on `backend`: the loss on the whole batch's
/// materialised logits (one call), and the head gradients of its logit
/// gradients. Returns (loss, row losses, student (gh, gw, gb), teacher
/// gradients: the head's or the logits').
pub struct Reference {
    pub loss: f64,
    pub row_losses: Vec<f64>,
    pub student: (Vec<f64>, Vec<f64>, Vec<f64>),
    pub teacher_head: Option<(Vec<f64>, Vec<f64>, Vec<f64>)>,
    pub teacher_logits: Option<Vec<f32>>,
}

pub fn reference(case: &Case, backend: &dyn Backend) -> kdfuse::Result<Reference> {
    let (n, h, v) = (case.n, case.h, case.v);
    let hs = values(&case.hidden);
    let ws = values(&case.weight);
    let bs = case.bias.as_ref().map(values);
    let s = materialise(&hs, n, h, &ws, v, bs.as_deref(), case.dtype);
    let student = Logits::new(s.view(), n, v);
    let (th, tw, tb) = (
        values(&case.t_hidden),
        values(&case.t_weight),
        case.t_bias.as_ref().map(values),
    );
    let t_mat = materialise(&th, n, case.ht, &tw, v, tb.as_deref(), case.dtype);
    let out = match case.teacher {
        TeacherKind::Topk(k, _) => backend.compute_topk(
            &TopkInputs {
                student,
                teacher: TopkTeacher {
                    indices: TopkIndices::I64(&case.idx),
                    values: case.vals.view(),
                    k,
                },
                labels: case.labels.as_deref(),
                row_weights: case.row_weights.as_deref(),
            },
            &case.spec,
            Some(GradDtype::F32),
        )?,
        kind => {
            let teacher = if kind == TeacherKind::Linear {
                Logits::new(t_mat.view(), n, v)
            } else {
                Logits::strided(case.t_logits.view(), n, v, case.t_stride)
            };
            backend.compute(
                &KdInputs {
                    student,
                    teacher,
                    labels: case.labels.as_deref(),
                    row_weights: case.row_weights.as_deref(),
                },
                &case.spec,
                Some(GradDtype::F32),
            )?
        }
    };
    let g = out.grad.expect("gradient asked for");
    let student = head_grads(&g, n, v, &hs, h, &ws, v);
    let (teacher_head, teacher_logits) = match (&out.grad_teacher, case.teacher) {
        (Some(gt), TeacherKind::Linear) => {
            (Some(head_grads(gt, n, v, &th, case.ht, &tw, case.vt)), None)
        }
        (Some(gt), _) => (None, Some(gt.clone())),
        (None, _) => (None, None),
    };
    let _ = case.k();
    Ok(Reference {
        loss: out.loss,
        row_losses: out.row_losses,
        student,
        teacher_head,
        teacher_logits,
    })
}

/// ‖x − r‖₂ / ‖r‖₂ (relative to at least `floor`); a non-finite reference
/// entry must be matched exactly, else +inf.
pub fn rel_l2(x: &[f64], r: &[f64], floor: f64) -> f64 {
    assert_eq!(x.len(), r.len(), "lengths");
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &b) in x.iter().zip(r) {
        if !b.is_finite() {
            if !(a == b || (a.is_nan() && b.is_nan())) {
                return f64::INFINITY;
            }
            continue;
        }
        if !a.is_finite() {
            return f64::INFINITY;
        }
        num += (a - b) * (a - b);
        den += b * b;
    }
    num.sqrt() / den.sqrt().max(floor)
}

/// f32 values as f64.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
