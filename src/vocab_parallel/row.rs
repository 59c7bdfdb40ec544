//! One row of one shard in f64: its round-1 and round-2 statistics, and, from
//! the merged statistics of every shard, its loss and its slice of the
//! gradients (docs/DESIGN.md §8 has the formulas).

use super::stats::{header, rescaled, slot, total, MaxSum};
use crate::oracle::{logaddexp, softcap, softcap_derivative, xmul, TAIL_MASS_FLOOR};
use crate::spec::{KernelDivergence, LossSpec, TopkMode};

/// The teacher's part of one shard row, soft-capped.
pub(crate) enum TeacherRow {
    /// Dense logits (or log-probs) over the shard's real columns, and the
    /// cap's derivative.
    Dense { t: Vec<f64>, dt: Option<Vec<f64>> },
    /// The top-k entries that fall in this shard: local columns and values,
    /// and which local columns are on the support.
    Topk {
        cols: Vec<usize>,
        vals: Vec<f64>,
        on: Vec<bool>,
    },
}

/// One shard row, soft-capped, over the shard's real (unpadded) columns.
pub(crate) struct ShardRow {
    /// The student logits.
    pub s: Vec<f64>,
    /// The cap's derivative at the raw student logits (`None`: no cap).
    pub ds: Option<Vec<f64>>,
    pub teacher: TeacherRow,
    /// The label's local column when it falls in this shard.
    pub label: Option<usize>,
}

/// A raw row capped, with the cap's derivative.
pub(crate) fn capped(x: Vec<f64>, cap: Option<f64>) -> (Vec<f64>, Option<Vec<f64>>) {
    match cap {
        None => (x, None),
        Some(c) => (
            x.iter().map(|&v| softcap(v, c)).collect(),
            Some(x.iter().map(|&v| softcap_derivative(v, c)).collect()),
        ),
    }
}

/// NaN or +inf: an input no row can use.
fn bad(x: f64) -> bool {
    x.is_nan() || x == f64::INFINITY
}

/// (max, Σ exp(x − max)) of the values; (−inf, 0) when there are none or
/// all are −inf. NaN and +inf are left out (the row is flagged instead).
fn max_sum(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let m = xs
        .clone()
        .filter(|x| !bad(*x))
        .fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (m, 0.0);
    }
    (m, xs.filter(|x| !bad(*x)).map(|x| (x - m).exp()).sum())
}

/// Σ exp(x − m)·f(x, y) over pairs, with 0·anything = 0.
fn weighted(pairs: impl Iterator<Item = (f64, f64)>, m: f64, f: impl Fn(f64, f64) -> f64) -> f64 {
    if m == f64::NEG_INFINITY {
        return 0.0;
    }
    pairs
        .filter(|(x, y)| !bad(*x) && !bad(*y))
        .map(|(x, y)| xmul((x - m).exp(), f(x, y)))
        .sum()
}

impl ShardRow {
    /// Whether a used input is NaN or +inf (after the cap).
    fn any_bad(&self, spec: &LossSpec) -> bool {
        let soft = spec.soft_coef() > 0.0;
        match &self.teacher {
            TeacherRow::Dense { t, .. } => {
                self.s.iter().any(|&x| bad(x)) || (soft && t.iter().any(|&x| bad(x)))
            }
            TeacherRow::Topk { cols, vals, .. } => {
                let whole = spec.alpha > 0.0 || spec.topk_mode != TopkMode::Support;
                let student = if whole {
                    self.s.iter().any(|&x| bad(x))
                } else {
                    soft && cols.iter().any(|&j| bad(self.s[j]))
                };
                student || (soft && vals.iter().any(|&x| bad(x)))
            }
        }
    }

    /// The round-1 record of this row.
    pub(crate) fn round1(&self, spec: &LossSpec, rec: &mut [f64], start: usize) {
        header(rec, 1, start, self.s.len());
        rec[slot::BAD] = self.any_bad(spec) as u8 as f64;
        let tau = spec.temperature;
        if spec.alpha > 0.0 {
            let (m, z) = max_sum(self.s.iter().copied());
            rec[slot::CE_MAX] = m;
            rec[slot::CE_SUM] = z;
            if let Some(y) = self.label {
                rec[slot::LABEL_LOGIT] = self.s[y];
                rec[slot::LABEL_HERE] = 1.0;
            }
        } else {
            rec[slot::CE_MAX] = f64::NEG_INFINITY;
        }
        for at in [slot::T_MAX, slot::S_MAX, slot::SUP_MAX] {
            rec[at] = f64::NEG_INFINITY;
        }
        if spec.soft_coef() == 0.0 {
            return;
        }
        let w = || self.s.iter().map(|&x| x / tau);
        let (ms, zs) = max_sum(w());
        rec[slot::S_MAX] = ms;
        rec[slot::S_SUM] = zs;
        match &self.teacher {
            TeacherRow::Dense { t, .. } => {
                let u = || t.iter().map(|&x| x / tau);
                let (mt, zt) = max_sum(u());
                rec[slot::T_MAX] = mt;
                rec[slot::T_SUM] = zt;
                rec[slot::FWD_ACC] = weighted(u().zip(w()), mt, |u, w| u - w);
                rec[slot::ENT_ACC] = weighted(u().zip(w()), mt, |u, _| u - mt);
                rec[slot::REV_ACC] = weighted(w().zip(u()), ms, |w, u| w - u);
            }
            TeacherRow::Topk { cols, vals, on } => {
                let u = || vals.iter().map(|&x| x / tau);
                let ws = || cols.iter().map(|&j| self.s[j] / tau);
                let (mt, zt) = max_sum(u());
                rec[slot::T_MAX] = mt;
                rec[slot::T_SUM] = zt;
                match spec.topk_mode {
                    TopkMode::Full | TopkMode::Support => {
                        rec[slot::FWD_ACC] = weighted(u().zip(ws()), mt, |u, w| u - w);
                        let (m, z) = max_sum(ws());
                        rec[slot::SUP_MAX] = m;
                        rec[slot::SUP_SUM] = z;
                    }
                    TopkMode::Tail => {
                        // τ = 1: u = v (log-probs), w = s.
                        rec[slot::TAIL_MASS] =
                            vals.iter().filter(|x| !bad(**x)).map(|x| x.exp()).sum();
                        rec[slot::TAIL_ACC] = weighted(u().zip(ws()), 0.0, |u, w| u - w);
                        rec[slot::OFF_SUM] = weighted(
                            w().enumerate()
                                .filter(|(j, _)| !on[*j])
                                .map(|(_, x)| (x, x)),
                            ms,
                            |_, _| 1.0,
                        );
                    }
                }
            }
        }
    }

    /// The round-2 record of this row (JSD, TVD on a dense teacher), from
    /// the merged round-1 statistics.
    pub(crate) fn round2(&self, spec: &LossSpec, m: &Merged, rec: &mut [f64], start: usize) {
        header(rec, 2, start, self.s.len());
        let TeacherRow::Dense { t, .. } = &self.teacher else {
            return;
        };
        let tau = spec.temperature;
        for (&sj, &tj) in self.s.iter().zip(t) {
            let e = Elem::new(sj, tj, tau, m);
            match spec.kernel_divergence() {
                KernelDivergence::Jsd(beta) => {
                    let (g, h) = e.jsd(beta);
                    rec[slot::JSD_QG] += xmul(e.q, g);
                    rec[slot::JSD_PH] += xmul(e.p, h);
                }
                KernelDivergence::Tvd => {
                    rec[slot::TVD_ABS] += (e.p - e.q).abs();
                    let (qa, pa) = if e.q > e.p {
                        (slot::TVD_QA, slot::TVD_PA)
                    } else if e.q < e.p {
                        (slot::TVD_QB, slot::TVD_PB)
                    } else {
                        (slot::TVD_QE, slot::TVD_PE)
                    };
                    rec[qa] += e.q;
                    rec[pa] += e.p;
                }
                _ => {}
            }
        }
    }

    /// The row loss ℓ (unweighted) and ∂ℓ/∂s, ∂ℓ/∂t over the shard's real
    /// columns (the teacher's only for a dense teacher), from the merged
    /// statistics.
    pub(crate) fn finish(&self, spec: &LossSpec, m: &Merged) -> (f64, Vec<f64>, Option<Vec<f64>>) {
        let v = self.s.len();
        let tau = spec.temperature;
        let c = spec.soft_coef();
        let mut gs = vec![0.0; v];
        let mut loss = 0.0;
        if spec.alpha > 0.0 {
            loss += spec.alpha * (m.lse_1 - m.label_logit);
            for (j, g) in gs.iter_mut().enumerate() {
                let y = if Some(j) == self.label { 1.0 } else { 0.0 };
                *g = spec.alpha * ((self.s[j] - m.lse_1).exp() - y);
            }
        }
        let mut gt = None;
        if c > 0.0 {
            loss += c * m.d;
            match &self.teacher {
                TeacherRow::Dense { t, dt } => {
                    let mut g_t = vec![0.0; v];
                    for j in 0..v {
                        let e = Elem::new(self.s[j], t[j], tau, m);
                        let (a, b) = e.grads(spec, m);
                        gs[j] += c * a / tau;
                        g_t[j] = c * b / tau;
                    }
                    chain(&mut g_t, dt.as_deref());
                    gt = Some(g_t);
                }
                TeacherRow::Topk { cols, vals, on } => {
                    self.topk_grad(spec, m, cols, vals, on, &mut gs)
                }
            }
        }
        chain(&mut gs, self.ds.as_deref());
        if loss.is_nan() || m.bad {
            loss = f64::NAN;
            gs.fill(f64::NAN);
            if let Some(g) = gt.as_mut() {
                g.fill(f64::NAN);
            }
        }
        (loss, gs, gt)
    }

    /// Adds c·∂D/∂s of a top-k teacher to `gs`.
    fn topk_grad(
        &self,
        spec: &LossSpec,
        m: &Merged,
        cols: &[usize],
        vals: &[f64],
        on: &[bool],
        gs: &mut [f64],
    ) {
        let tau = spec.temperature;
        let c = spec.soft_coef();
        let p = |x: f64| (x / tau - m.lse_t).exp();
        match spec.topk_mode {
            TopkMode::Full => {
                for (j, g) in gs.iter_mut().enumerate() {
                    *g += c * (self.s[j] / tau - m.lse_s).exp() / tau;
                }
                for (&j, &x) in cols.iter().zip(vals) {
                    gs[j] -= c * p(x) / tau;
                }
            }
            TopkMode::Support => {
                for (&j, &x) in cols.iter().zip(vals) {
                    gs[j] += c * ((self.s[j] / tau - m.lse_sup).exp() - p(x)) / tau;
                }
            }
            TopkMode::Tail => {
                let ratio = if m.p_tail == 0.0 {
                    0.0
                } else {
                    m.p_tail / m.q_tail
                };
                for (j, g) in gs.iter_mut().enumerate() {
                    let q = (self.s[j] - m.lse_s).exp();
                    if !on[j] {
                        *g += c * xmul(q, 1.0 - ratio);
                    }
                }
                for (&j, &x) in cols.iter().zip(vals) {
                    gs[j] += c * ((self.s[j] - m.lse_s).exp() - x.exp());
                }
            }
        }
    }
}

/// g ← d·g for the cap's derivative d (0 where d = 0, a masked entry).
fn chain(g: &mut [f64], d: Option<&[f64]>) {
    if let Some(d) = d {
        for (g, &dj) in g.iter_mut().zip(d) {
            *g = xmul(dj, *g);
        }
    }
}

/// One element's softened log-probabilities and probabilities.
struct Elem {
    lp: f64,
    lq: f64,
    p: f64,
    q: f64,
}

impl Elem {
    fn new(s: f64, t: f64, tau: f64, m: &Merged) -> Elem {
        let lp = t / tau - m.lse_t;
        let lq = s / tau - m.lse_s;
        Elem {
            lp,
            lq,
            p: lp.exp(),
            q: lq.exp(),
        }
    }

    /// JSD's g = ∂D/∂q and h = ∂D/∂p.
    fn jsd(&self, beta: f64) -> (f64, f64) {
        let lm = logaddexp(beta.ln() + self.lp, (1.0 - beta).ln() + self.lq);
        ((1.0 - beta) * (self.lq - lm), beta * (self.lp - lm))
    }

    /// τ·∂D/∂s and τ·∂D/∂t at this element (docs/DESIGN.md §2).
    fn grads(&self, spec: &LossSpec, m: &Merged) -> (f64, f64) {
        let (p, q, lp, lq, d) = (self.p, self.q, self.lp, self.lq, m.d);
        match spec.kernel_divergence() {
            KernelDivergence::ForwardKl => (q - p, xmul(p, lp - lq - d)),
            KernelDivergence::SoftCe => (q - p, xmul(p, -lq - d)),
            KernelDivergence::ReverseKl => (xmul(q, lq - lp - d), p - q),
            KernelDivergence::Jsd(beta) => {
                let (g, h) = self.jsd(beta);
                (xmul(q, g - m.qg), xmul(p, h - m.ph))
            }
            KernelDivergence::Tvd => {
                // x_j (σ_j − ⟨x, σ⟩) for σ = ±½, 0 written from the class
                // masses (no cancellation): the student's σ = ½ on A (q > p),
                // the teacher's on B.
                let (s, t) = if q > p {
                    (m.tvd_q_dn, -m.tvd_p_up)
                } else if q < p {
                    (-m.tvd_q_up, m.tvd_p_dn)
                } else {
                    (
                        0.5 * (m.tvd_q_dn - m.tvd_q_up),
                        0.5 * (m.tvd_p_dn - m.tvd_p_up),
                    )
                };
                (xmul(q, s), xmul(p, t))
            }
        }
    }
}

/// The merged statistics of one row (every rank gets the same).
#[derive(Debug, Clone, Default)]
pub(crate) struct Merged {
    pub bad: bool,
    pub lse_t: f64,
    pub lse_s: f64,
    pub lse_1: f64,
    pub lse_sup: f64,
    pub label_logit: f64,
    /// The divergence D (NaN where undefined).
    pub d: f64,
    pub qg: f64,
    pub ph: f64,
    /// TVD: the student's Σ q(½ + σ) and Σ q(½ − σ), the teacher's likewise.
    pub tvd_q_up: f64,
    pub tvd_q_dn: f64,
    pub tvd_p_up: f64,
    pub tvd_p_dn: f64,
    /// `tail`: the teacher's and the student's tail masses.
    pub p_tail: f64,
    pub q_tail: f64,
}

impl Merged {
    /// The round-1 merge of one row's records (rank order); D when one
    /// collective is enough.
    pub(crate) fn round1(recs: &[&[f64]], spec: &LossSpec, topk: bool) -> Merged {
        let (t, ft) = MaxSum::merge(recs, slot::T_MAX, slot::T_SUM);
        let (s, fs) = MaxSum::merge(recs, slot::S_MAX, slot::S_SUM);
        let (ce, _) = MaxSum::merge(recs, slot::CE_MAX, slot::CE_SUM);
        let (sup, _) = MaxSum::merge(recs, slot::SUP_MAX, slot::SUP_SUM);
        let mut m = Merged {
            bad: total(recs, slot::BAD) > 0.0,
            lse_t: t.lse(),
            lse_s: s.lse(),
            lse_1: ce.lse(),
            lse_sup: sup.lse(),
            label_logit: total(recs, slot::LABEL_LOGIT),
            ..Default::default()
        };
        let fwd = rescaled(recs, &ft, slot::FWD_ACC) / t.sum;
        m.d = if topk {
            match spec.topk_mode {
                TopkMode::Full => fwd - m.lse_t + m.lse_s,
                TopkMode::Support => fwd - m.lse_t + m.lse_sup,
                TopkMode::Tail => {
                    let mass = total(recs, slot::TAIL_MASS);
                    let mut p_tail = (1.0 - mass).max(0.0);
                    if p_tail < TAIL_MASS_FLOOR {
                        p_tail = 0.0;
                    }
                    m.p_tail = p_tail;
                    m.q_tail = rescaled(recs, &fs, slot::OFF_SUM) / s.sum;
                    let acc = total(recs, slot::TAIL_ACC) + xmul(mass, m.lse_s);
                    acc + xmul(p_tail, p_tail.ln() - m.q_tail.ln())
                }
            }
        } else {
            match spec.kernel_divergence() {
                KernelDivergence::ForwardKl => fwd - m.lse_t + m.lse_s,
                KernelDivergence::SoftCe => {
                    // KL(p‖q) + H(p), H = ln Z_t − Σ p (u − max u).
                    let ent: f64 = recs
                        .iter()
                        .zip(&ft)
                        .filter(|(_, &f)| f != 0.0)
                        .map(|(r, &f)| {
                            f * (r[slot::ENT_ACC] + (r[slot::T_MAX] - t.max) * r[slot::T_SUM])
                        })
                        .sum();
                    fwd - m.lse_t + m.lse_s + t.sum.ln() - ent / t.sum
                }
                KernelDivergence::ReverseKl => {
                    rescaled(recs, &fs, slot::REV_ACC) / s.sum - m.lse_s + m.lse_t
                }
                KernelDivergence::Jsd(_) | KernelDivergence::Tvd => f64::NAN,
            }
        };
        m
    }

    /// Adds the round-2 merge (JSD, TVD): D and the gradients' sums.
    pub(crate) fn round2(&mut self, recs: &[&[f64]], spec: &LossSpec) {
        match spec.kernel_divergence() {
            KernelDivergence::Jsd(_) => {
                self.qg = total(recs, slot::JSD_QG);
                self.ph = total(recs, slot::JSD_PH);
                self.d = self.qg + self.ph;
            }
            KernelDivergence::Tvd => {
                let [qa, qb, qe, pa, pb, pe] = [
                    slot::TVD_QA,
                    slot::TVD_QB,
                    slot::TVD_QE,
                    slot::TVD_PA,
                    slot::TVD_PB,
                    slot::TVD_PE,
                ]
                .map(|at| total(recs, at));
                self.d = 0.5 * total(recs, slot::TVD_ABS);
                self.tvd_q_up = qa + 0.5 * qe;
                self.tvd_q_dn = qb + 0.5 * qe;
                self.tvd_p_up = pb + 0.5 * pe;
                self.tvd_p_dn = pa + 0.5 * pe;
            }
            _ => {}
        }
    }
}
