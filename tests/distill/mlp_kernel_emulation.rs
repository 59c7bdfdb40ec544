//! kernels/mlp.cu's own code (grid-stride loops, the dropout hash, the bias
//! gradient's order of summation, the optimizers) run on the CPU under the
//! CUDA emulation, against the CPU engine's versions of the same operations.
//! Same f32 operations in the same order, so the results are equal bit for
//! bit (g++ here contracts no FMA; nvcc may, which tests/gpu.rs allows for).

use kdfuse::distill::emu::{self, cpu, Launch};
use kdfuse::distill::{Dropout, Optimizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// More elements than one pass of the grid covers: the loops stride.
const SMALL_GRID: Launch = Launch { grid: 2, block: 64 };

#[test]
fn bias_act_matches_cpu_with_and_without_relu_and_dropout() {
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, cols) in [(37, 19), (5, 300), (1, 1)] {
        let z0 = random(rows * cols, &mut rng);
        let b = random(cols, &mut rng);
        for relu in [false, true] {
            for dropout in [None, Dropout::new(0.3, 9, 4, 1), Dropout::new(0.5, 2, 1, 0)] {
                let mut want = z0.clone();
                cpu::bias_act(&mut want, &b, relu, dropout);
                let mut got = z0.clone();
                emu::bias_act(&mut got, &b, relu, dropout, SMALL_GRID);
                assert_eq!(got, want, "{rows}×{cols} relu {relu} {dropout:?}");
                if let Some(d) = dropout {
                    // Dropped elements are zeros at the places the hash says.
                    for (i, &v) in got.iter().enumerate() {
                        if !d.keep(i as u32) {
                            assert_eq!(v, 0.0);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn relu_back_and_bias_grad_match_cpu() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, cols) = (41, 23);
    let dh = random(rows * cols, &mut rng);
    let h: Vec<f32> = random(rows * cols, &mut rng)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    for scale in [1.0f32, 2.0] {
        let mut want = vec![f32::NAN; rows * cols];
        cpu::relu_back(&dh, &h, scale, &mut want);
        let mut got = vec![f32::NAN; rows * cols];
        emu::relu_back(&dh, &h, scale, &mut got, SMALL_GRID);
        assert_eq!(got, want);
        assert!(got.iter().zip(&h).all(|(&g, &h)| h > 0.0 || g == 0.0));
    }
    let mut want = vec![f32::NAN; cols];
    cpu::bias_grad(&dh, &mut want);
    let mut got = vec![f32::NAN; cols];
    // 23 columns over 1 block of 32 threads, and over 3 blocks of 32… both
    // cover every column once.
    for l in [Launch { grid: 1, block: 32 }, Launch { grid: 3, block: 32 }] {
        got.fill(f32::NAN);
        emu::bias_grad(&dh, &mut got, l);
        assert_eq!(got, want);
    }
    // And the sums are right.
    for (c, &g) in got.iter().enumerate() {
        let s: f64 = (0..rows).map(|r| dh[r * cols + c] as f64).sum();
        assert!((g as f64 - s).abs() < 1e-4, "column {c}: {g} vs {s}");
    }
}

#[test]
fn optimizer_kernels_match_cpu_over_several_steps() {
    let mut rng = StdRng::seed_from_u64(3);
    let n = 1000;
    for opt in [
        Optimizer::sgd(0.05, 0.9).with_weight_decay(0.01),
        Optimizer::adam(0.01).with_weight_decay(0.1),
        Optimizer::adam(0.003),
    ] {
        for decay in [true, false] {
            let p0 = random(n, &mut rng);
            let (mut pa, mut pb) = (p0.clone(), p0);
            let (mut a1, mut a2) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut b1, mut b2) = (vec![0.0f32; n], vec![0.0f32; n]);
            for t in 1..=4 {
                let g = random(n, &mut rng);
                cpu::update(&opt, t, &mut pa, &g, &mut a1, &mut a2, decay);
                emu::update(&opt, t, &mut pb, &g, &mut b1, &mut b2, decay, SMALL_GRID);
                assert_eq!(pa, pb, "{opt:?} decay {decay} step {t}");
                assert_eq!((&a1, &a2), (&b1, &b2));
            }
            assert!(pa.iter().all(|v| v.is_finite()));
        }
    }
}
