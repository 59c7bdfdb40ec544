//! Random-case sweeps of a selection backend against [`super::select_oracle`]:
//! case generation (shapes, strides, dtypes, ties, `±inf`, `−0`, NaN rows)
//! and the comparison. Used by the tests and the GPU tests.

use super::{select_oracle, SelectSpec, Selection, MAX_K};
use crate::error::Result;
use crate::tensor::{Dtype, Logits, OwnedData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// The sizes a sweep draws from.
#[derive(Debug, Clone, Copy)]
pub struct SweepConfig {
    /// Rows at most.
    pub max_rows: usize,
    /// Columns of the usual case at most.
    pub max_cols: usize,
    /// Every `big_every`-th case has `big_cols` columns (0: never).
    pub big_every: usize,
    /// The columns of the big cases.
    pub big_cols: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            max_rows: 5,
            max_cols: 3000,
            big_every: 50,
            big_cols: 131_072 + 17,
        }
    }
}

/// One random case: logits, possibly strided, and a spec.
#[derive(Debug, Clone)]
pub struct SelectCase {
    /// The elements, `rows · stride` of them.
    pub data: OwnedData,
    /// Rows.
    pub rows: usize,
    /// Columns V.
    pub cols: usize,
    /// Row stride (≥ V).
    pub stride: usize,
    /// The spec.
    pub spec: SelectSpec,
}

impl SelectCase {
    /// The logits view.
    pub fn logits(&self) -> Logits<'_> {
        Logits::strided(self.data.view(), self.rows, self.cols, self.stride)
    }
}

/// Lengths that are odd, prime, around block and warp sizes.
const AWKWARD: &[usize] = &[
    1, 2, 3, 7, 31, 32, 33, 127, 255, 256, 257, 511, 1021, 1024, 4099,
];

/// A random case, the `i`-th of a sweep.
pub fn random_case(rng: &mut StdRng, i: usize, cfg: &SweepConfig) -> SelectCase {
    let rows = rng.random_range(1..=cfg.max_rows.max(1));
    let cols = if cfg.big_every > 0 && i % cfg.big_every == cfg.big_every - 1 {
        cfg.big_cols
    } else if rng.random_bool(0.3) {
        AWKWARD[rng.random_range(0..AWKWARD.len())].min(cfg.max_cols)
    } else {
        rng.random_range(1..=cfg.max_cols)
    };
    let stride = if rng.random_bool(0.3) {
        cols + rng.random_range(1..40)
    } else {
        cols
    };
    let kmax = cols.min(MAX_K);
    let k = match rng.random_range(0..6) {
        0 => 1,
        1 => kmax,
        2 => rng.random_range(1..=kmax.min(8)),
        _ => rng.random_range(1..=kmax),
    };
    let dtype = [Dtype::F32, Dtype::Bf16, Dtype::F16][rng.random_range(0..3)];
    // Per case, how values are drawn: continuous, a few distinct values
    // (ties everywhere), or continuous with special values sprinkled.
    let mode = rng.random_range(0..4);
    let scale: f32 = [1.0, 4.0, 30.0][rng.random_range(0..3)];
    let mut x = vec![0f32; rows * stride];
    for r in 0..rows {
        let row_mode = if rng.random_bool(0.05) { 9 } else { mode };
        for c in 0..stride {
            x[r * stride + c] = if c >= cols {
                // Padding: large, so a kernel reading past V would pick it.
                1e4
            } else {
                match row_mode {
                    0 => scale * rng.sample::<f32, _>(StandardNormal),
                    1 => rng.random_range(0..4) as f32,
                    2 => match rng.random_range(0..40) {
                        0 => f32::NEG_INFINITY,
                        1 => -0.0,
                        2 => 0.0,
                        3 if rng.random_bool(0.1) => f32::INFINITY,
                        _ => scale * rng.sample::<f32, _>(StandardNormal),
                    },
                    3 => {
                        if rng.random_bool(0.5) {
                            f32::NEG_INFINITY
                        } else {
                            (rng.random_range(-3..3) as f32) * 0.5
                        }
                    }
                    // A whole row of −inf.
                    _ => f32::NEG_INFINITY,
                }
            };
        }
    }
    // Sometimes a NaN somewhere: the row must be reported.
    if rng.random_bool(0.04) {
        let r = rng.random_range(0..rows);
        let c = rng.random_range(0..cols);
        x[r * stride + c] = f32::NAN;
    }
    let with_lse = rng.random_bool(0.7);
    SelectCase {
        data: OwnedData::from_f32(&x, dtype),
        rows,
        cols,
        stride,
        spec: SelectSpec { k, with_lse },
    }
}

/// The tolerance on a row's log-sum-exp: both fp32 backends round `x − m`
/// (an error up to an ulp of `|m|`) and sum in fp32 or f64.
pub fn lse_tolerance(max: f32) -> f32 {
    8e-6 * max.abs().max(1.0)
}

/// `got` against `want` (the oracle's) on the same logits: indices equal,
/// values bitwise equal to the input elements, lse within
/// [`lse_tolerance`]. The first difference, described.
pub fn compare(
    logits: &Logits,
    got: &Selection,
    want: &Selection,
) -> std::result::Result<(), String> {
    if (got.rows, got.k) != (want.rows, want.k) {
        return Err(format!(
            "shape [{}, {}], expected [{}, {}]",
            got.rows, got.k, want.rows, want.k
        ));
    }
    let k = want.k;
    if got.indices.len() != want.rows * k || got.values.len() != want.rows * k {
        return Err("output lengths".into());
    }
    for r in 0..want.rows {
        for j in 0..k {
            let (gi, wi) = (got.indices[r * k + j], want.indices[r * k + j]);
            if gi != wi {
                return Err(format!("row {r} rank {j}: index {gi}, expected {wi}"));
            }
            let x = logits.get(r, wi as usize);
            let gv = got.values[r * k + j];
            if gv.to_bits() != x.to_bits() {
                return Err(format!("row {r} rank {j}: value {gv:e}, expected {x:e}"));
            }
        }
    }
    match (&got.lse, &want.lse) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            for r in 0..want.rows {
                let (g, w) = (g[r], w[r]);
                let m = want.values[r * k];
                let ok = if w.is_infinite() {
                    g == w
                } else {
                    (g - w).abs() <= lse_tolerance(m)
                };
                if !ok {
                    return Err(format!("row {r}: lse {g:e}, expected {w:e}"));
                }
            }
        }
        _ => return Err("lse present in one result only".into()),
    }
    Ok(())
}

/// One case through `backend` against the oracle: both fail with the same
/// message (`Ok(true)`), or both succeed and [`compare`] holds (`Ok(false)`).
pub fn run_case(
    case: &SelectCase,
    backend: &dyn Fn(&Logits, &SelectSpec) -> Result<Selection>,
) -> std::result::Result<bool, String> {
    let l = case.logits();
    let describe = |what: String| {
        format!(
            "{what} (rows {}, V {}, stride {}, k {}, lse {}, {:?})",
            case.rows,
            case.cols,
            case.stride,
            case.spec.k,
            case.spec.with_lse,
            case.data.view().dtype()
        )
    };
    match (backend(&l, &case.spec), select_oracle(&l, &case.spec)) {
        (Ok(g), Ok(w)) => compare(&l, &g, &w).map(|_| false).map_err(describe),
        (Err(g), Err(w)) if g.to_string() == w.to_string() => Ok(true),
        (g, w) => Err(describe(format!(
            "outcome {:?}, oracle {:?}",
            g.err().map(|e| e.to_string()),
            w.err().map(|e| e.to_string())
        ))),
    }
}

/// `cases` random cases from `seed` through `backend`; the number of cases
/// that ended in the NaN error (both sides agreeing), or the first failure.
pub fn sweep(
    cases: usize,
    seed: u64,
    cfg: &SweepConfig,
    backend: &dyn Fn(&Logits, &SelectSpec) -> Result<Selection>,
) -> std::result::Result<usize, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut errors = 0;
    for i in 0..cases {
        let case = random_case(&mut rng, i, cfg);
        let failed =
            run_case(&case, backend).map_err(|e| format!("case {i} (seed {seed}): {e}"))?;
        errors += failed as usize;
    }
    Ok(errors)
}
