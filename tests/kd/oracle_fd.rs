//! The f64 oracle against finite differences and hand-computed values.

use crate::oracle_options::fd_vs;
use kdfuse::oracle::{log_softmax, row};
use kdfuse::{Divergence, LossSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fd_check(spec: &LossSpec, v: usize, seed: u64, mask: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s: Vec<f64> = (0..v).map(|_| rng.random_range(-3.0..3.0)).collect();
    let mut t: Vec<f64> = (0..v).map(|_| rng.random_range(-3.0..3.0)).collect();
    if mask {
        s[1] = f64::NEG_INFINITY;
        t[1] = f64::NEG_INFINITY;
    }
    let label = (spec.alpha > 0.0).then_some(v - 1);
    let (_, g) = row(&s, &t, label, spec);
    fd_vs(&format!("{spec:?}"), &s, &g, |x| row(x, &t, label, spec).0);
}

#[test]
fn gradients_match_finite_differences() {
    let mut seed = 0;
    for divergence in Divergence::ALL {
        for beta in [0.0, 0.3, 1.0] {
            for alpha in [0.0, 0.4, 1.0] {
                for temperature in [1.0, 2.5, 0.7] {
                    for t2_scaling in [true, false] {
                        let spec = LossSpec {
                            divergence,
                            beta,
                            alpha,
                            temperature,
                            t2_scaling,
                            ..Default::default()
                        };
                        seed += 1;
                        fd_check(&spec, 7, seed, seed % 3 == 0);
                    }
                }
            }
        }
    }
}

#[test]
fn hand_computed_values() {
    // p = (1/2, 1/2), q = (1/4, 3/4) from logits (0, ln 3).
    let s = [0.0, 3f64.ln()];
    let t = [0.0, 0.0];
    let kl_pq = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
    let kl_qp = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
    let fkl = LossSpec::default();
    let (l, g) = row(&s, &t, None, &fkl);
    assert!((l - kl_pq).abs() < 1e-15);
    assert!((g[0] - (0.25 - 0.5)).abs() < 1e-15 && (g[1] - (0.75 - 0.5)).abs() < 1e-15);
    let rkl = LossSpec {
        divergence: Divergence::ReverseKl,
        ..Default::default()
    };
    assert!((row(&s, &t, None, &rkl).0 - kl_qp).abs() < 1e-15);
    // JSD with β = 1/2: m = (3/8, 5/8).
    let m = [0.375f64, 0.625];
    let js = 0.5 * (0.5 * (0.5 / m[0]).ln() + 0.5 * (0.5 / m[1]).ln())
        + 0.5 * (0.25 * (0.25 / m[0]).ln() + 0.75 * (0.75 / m[1]).ln());
    let jsd = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.5,
        ..Default::default()
    };
    assert!((row(&s, &t, None, &jsd).0 - js).abs() < 1e-15);
    // Hard CE at τ = 1 with label 1: −log(3/4); τ² scaling at τ = 2 scales by 4.
    let ce = LossSpec {
        alpha: 1.0,
        temperature: 2.0,
        ..Default::default()
    };
    assert!((row(&s, &t, Some(1), &ce).0 + 0.75f64.ln()).abs() < 1e-15);
    let t2 = LossSpec {
        temperature: 2.0,
        ..Default::default()
    };
    let soft = LossSpec {
        t2_scaling: false,
        ..t2.clone()
    };
    assert!((row(&s, &t, None, &t2).0 - 4.0 * row(&s, &t, None, &soft).0).abs() < 1e-15);
}

#[test]
fn jsd_endpoints_are_the_kl_divergences() {
    let s = [0.3, -1.2, 2.0, 0.0];
    let t = [1.0, 0.5, -0.5, 0.2];
    for (beta, div) in [(0.0, Divergence::ForwardKl), (1.0, Divergence::ReverseKl)] {
        let jsd = LossSpec {
            divergence: Divergence::Jsd,
            beta,
            temperature: 1.7,
            ..Default::default()
        };
        let kl = LossSpec {
            divergence: div,
            temperature: 1.7,
            ..Default::default()
        };
        assert_eq!(row(&s, &t, None, &jsd), row(&s, &t, None, &kl));
    }
}

#[test]
fn masking_and_infinities() {
    // −inf logits are legal; teacher mass where the student is −inf is +inf.
    let s = [0.0, f64::NEG_INFINITY, 1.0];
    let t = [0.0, 2.0, 1.0];
    assert_eq!(row(&s, &t, None, &LossSpec::default()).0, f64::INFINITY);
    // Teacher −inf where the student has mass: forward KL stays finite.
    let (l, g) = row(&t, &s, None, &LossSpec::default());
    assert!(l.is_finite() && g.iter().all(|x| x.is_finite()));
    // An all −inf row has no softmax.
    assert!(log_softmax(&[f64::NEG_INFINITY; 3], 1.0)
        .iter()
        .all(|x| x.is_nan()));
}

#[test]
fn tvd_and_soft_ce_hand_computed() {
    // p = (1/2, 1/2), q = (1/4, 3/4): TVD = ½ (1/4 + 1/4) = 1/4;
    // soft CE = −½ log(1/4) − ½ log(3/4).
    let s = [0.0, 3f64.ln()];
    let t = [0.0, 0.0];
    let tvd = LossSpec {
        divergence: Divergence::Tvd,
        ..Default::default()
    };
    let (l, g) = row(&s, &t, None, &tvd);
    assert!((l - 0.25).abs() < 1e-15, "{l}");
    // g = ½ sign(q − p) = (−½, ½), ⟨q, g⟩ = ¼; ∂/∂s = q (g − ⟨q,g⟩).
    let want = [0.25 * (-0.5 - 0.25), 0.75 * (0.5 - 0.25)];
    assert!((g[0] - want[0]).abs() < 1e-15 && (g[1] - want[1]).abs() < 1e-15);
    let sce = LossSpec {
        divergence: Divergence::SoftCe,
        ..Default::default()
    };
    let (l, g) = row(&s, &t, None, &sce);
    let want = -0.5 * 0.25f64.ln() - 0.5 * 0.75f64.ln();
    assert!((l - want).abs() < 1e-15, "{l} vs {want}");
    assert_eq!(g, row(&s, &t, None, &LossSpec::default()).1);
    // Soft CE with a teacher mass where the student is −inf is +inf; a
    // teacher −inf entry contributes nothing.
    let s = [0.0, f64::NEG_INFINITY, 1.0];
    let t = [0.0, 2.0, 1.0];
    assert_eq!(row(&s, &t, None, &sce).0, f64::INFINITY);
    let (l, _) = row(&t, &s, None, &sce);
    assert!(l.is_finite());
    // TVD stays finite either way, and is in [0, 1].
    for (a, b) in [(&s, &t), (&t, &s)] {
        let l = row(a, b, None, &tvd).0;
        assert!((0.0..=1.0).contains(&l), "{l}");
    }
}

#[test]
fn tvd_of_identical_rows_is_zero_with_zero_gradient() {
    let s = [0.3, -1.2, f64::NEG_INFINITY, 2.0, 0.0];
    for temperature in [1.0, 0.6, 3.0] {
        let tvd = LossSpec {
            divergence: Divergence::Tvd,
            temperature,
            ..Default::default()
        };
        let (l, g) = row(&s, &s, None, &tvd);
        assert_eq!(l, 0.0);
        assert!(g.iter().all(|&x| x == 0.0), "{g:?}");
    }
}

#[test]
fn soft_ce_is_forward_kl_plus_teacher_entropy() {
    let mut rng = StdRng::seed_from_u64(99);
    for v in [1usize, 2, 9, 40] {
        let s: Vec<f64> = (0..v).map(|_| rng.random_range(-4.0..4.0)).collect();
        let t: Vec<f64> = (0..v).map(|_| rng.random_range(-4.0..4.0)).collect();
        for (alpha, temperature) in [(0.0, 1.0), (0.3, 2.0), (0.0, 0.5)] {
            let fkl = LossSpec {
                alpha,
                temperature,
                ..Default::default()
            };
            let sce = LossSpec {
                divergence: Divergence::SoftCe,
                ..fkl.clone()
            };
            let label = (alpha > 0.0).then_some(0);
            let (lf, gf) = row(&s, &t, label, &fkl);
            let (ls, gs) = row(&s, &t, label, &sce);
            let lp = log_softmax(&t, temperature);
            let h: f64 = -lp.iter().map(|&x| x.exp() * x).sum::<f64>();
            assert!(
                (ls - lf - fkl.soft_coef() * h).abs() < 1e-12 * (1.0 + ls.abs()),
                "V={v}: {ls} − {lf} vs {h}"
            );
            assert_eq!(gf, gs);
        }
    }
}

/// TVD's gradient jumps at q = p; the comparison of another backend takes a
/// near-tie on the side that backend took (`row_resolving_ties`), and only a
/// near-tie.
#[test]
fn tvd_near_ties_resolve_only_within_the_band() {
    use kdfuse::oracle::row_resolving_ties;
    let t = [0.4, -0.3, 1.1, 0.0, -2.0, 0.7];
    let mut s = t;
    s[0] += 1.0;
    // Make element 1 a tie: s_1 − t_1 = lse(s) − lse(t).
    for _ in 0..60 {
        let l = |x: &[f64]| x.iter().map(|v| v.exp()).sum::<f64>().ln();
        s[1] = t[1] + (l(&s) - l(&t));
    }
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        temperature: 1.0,
        ..Default::default()
    };
    let (lq, lp) = (log_softmax(&s, 1.0), log_softmax(&t, 1.0));
    assert!((lq[1] - lp[1]).abs() < 1e-12);
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    let grad_with = |g1: f64, flip: Option<usize>| -> Vec<f64> {
        let mut g: Vec<f64> = (0..6)
            .map(|j| if lq[j] > lp[j] { 0.5 } else { -0.5 })
            .collect();
        g[1] = g1;
        if let Some(k) = flip {
            g[k] = -g[k];
        }
        let qg: f64 = (0..6).map(|j| q[j] * g[j]).sum();
        (0..6).map(|j| q[j] * (g[j] - qg)).collect()
    };
    for g1 in [-0.5, 0.0, 0.5] {
        let want = grad_with(g1, None);
        let (_, got, _) = row_resolving_ties(&s, &t, None, &spec, Some(&want));
        for j in 0..6 {
            assert!(
                (got[j] - want[j]).abs() < 1e-15,
                "g1 = {g1}: {got:?} vs {want:?}"
            );
        }
    }
    // A hint with a non-tie element on the wrong side changes nothing.
    let (_, plain, _) = row_resolving_ties(&s, &t, None, &spec, None);
    let wrong = grad_with(plain[1].signum() * 0.5, Some(3));
    let (_, got, _) = row_resolving_ties(&s, &t, None, &spec, Some(&wrong));
    assert_eq!(got, plain);
}

/// The near-tie resolution under soft-capping: the tie is between the capped
/// rows, the hint is a gradient with respect to the raw logits (so it carries
/// the cap's derivative), and the teacher side takes h = −g with the same
/// resolved g.
#[test]
fn tvd_near_ties_resolve_through_the_softcap() {
    use kdfuse::oracle::{row_detailed, softcap, softcap_derivative};
    let cap = 2.0;
    // The tie sits where the cap is flat (derivative ≈ 0.1), so that a hint
    // read without the cap's derivative picks another side.
    let ct = [0.4, 1.97, 1.1, 0.0, -1.5, 0.7];
    let mut cs = ct;
    cs[0] -= 0.8;
    for _ in 0..60 {
        let l = |x: &[f64]| x.iter().map(|v| v.exp()).sum::<f64>().ln();
        cs[1] = ct[1] + (l(&cs) - l(&ct));
    }
    let raw = |c: &[f64; 6]| -> Vec<f64> { c.iter().map(|&x| cap * (x / cap).atanh()).collect() };
    let (s, t) = (raw(&cs), raw(&ct));
    let recapped: Vec<f64> = s.iter().map(|&x| softcap(x, cap)).collect();
    let (lq, lp) = (log_softmax(&recapped, 1.0), log_softmax(&ct, 1.0));
    assert!((lq[1] - lp[1]).abs() < 1e-12);
    assert!(softcap_derivative(s[1], cap) < 0.15);
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        softcap: Some(cap),
        ..Default::default()
    };
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
    for g1 in [-0.5, 0.0, 0.5] {
        let mut g: Vec<f64> = (0..6)
            .map(|j| if lq[j] > lp[j] { 0.5 } else { -0.5 })
            .collect();
        g[1] = g1;
        let qg: f64 = (0..6).map(|j| q[j] * g[j]).sum();
        let ph: f64 = (0..6).map(|j| -p[j] * g[j]).sum();
        let want_s: Vec<f64> = (0..6)
            .map(|j| q[j] * (g[j] - qg) * softcap_derivative(s[j], cap))
            .collect();
        let want_t: Vec<f64> = (0..6)
            .map(|j| p[j] * (-g[j] - ph) * softcap_derivative(t[j], cap))
            .collect();
        let r = row_detailed(&s, &t, None, &spec, Some(&want_s));
        for j in 0..6 {
            assert!(
                (r.grad_s[j] - want_s[j]).abs() < 1e-14,
                "g1 = {g1}: {:?} vs {want_s:?}",
                r.grad_s
            );
            assert!(
                (r.grad_t[j] - want_t[j]).abs() < 1e-14,
                "g1 = {g1}: {:?} vs {want_t:?}",
                r.grad_t
            );
        }
    }
}
