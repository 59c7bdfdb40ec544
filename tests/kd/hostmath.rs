//! The kernels' own arithmetic (kernels/kd_math.cuh compiled for the host):
//! dtype conversions bit for bit against the `half` crate, online statistics
//! against f64.

use half::{bf16, f16};
use kdfuse::hostmath;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn widening_matches_half_for_every_bit_pattern() {
    for bits in 0..=u16::MAX {
        for (name, a, b) in [
            (
                "bf16",
                hostmath::bf16_bits_to_f32(bits),
                bf16::from_bits(bits).to_f32(),
            ),
            (
                "f16",
                hostmath::f16_bits_to_f32(bits),
                f16::from_bits(bits).to_f32(),
            ),
        ] {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{name} {bits:#06x}: {a} vs {b}"
            );
        }
    }
}

fn narrowing_cases() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        65504.0,
        65519.99,
        65520.0,
        1e5,
        6.1e-5,
        5.96e-8,
        2.98e-8,
        2.99e-8,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        3.4e38,
    ];
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..200_000 {
        v.push(f32::from_bits(rng.random::<u32>()));
    }
    // Exact halfway points of both formats.
    for _ in 0..20_000 {
        let h = f16::from_bits(rng.random::<u16>() & 0x7bff).to_f32();
        let next = f16::from_f32(h).to_bits() + 1;
        v.push((h + f16::from_bits(next).to_f32()) / 2.0);
        let b = bf16::from_bits(rng.random::<u16>() & 0x7f7f).to_f32();
        v.push(f32::from_bits(b.to_bits() | 0x8000));
    }
    v
}

#[test]
fn narrowing_rounds_to_nearest_even_like_half() {
    for x in narrowing_cases() {
        let (a, b) = (hostmath::f32_to_bf16_bits(x), bf16::from_f32(x));
        assert!(
            a == b.to_bits() || (x.is_nan() && bf16::from_bits(a).is_nan()),
            "bf16({x:e}): {a:#06x} vs {:#06x}",
            b.to_bits()
        );
        let (a, b) = (hostmath::f32_to_f16_bits(x), f16::from_f32(x));
        assert!(
            a == b.to_bits() || (x.is_nan() && f16::from_bits(a).is_nan()),
            "f16({x:e}): {a:#06x} vs {:#06x}",
            b.to_bits()
        );
    }
}

#[test]
fn online_logsumexp_matches_f64() {
    let mut rng = StdRng::seed_from_u64(9);
    for case in 0..200 {
        let n = rng.random_range(1..5000);
        let scale = rng.random_range(0.1f32..30.0);
        let mut x: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() - 0.5) * scale)
            .collect();
        if case % 3 == 0 {
            for v in x.iter_mut().skip(1).step_by(3) {
                *v = f32::NEG_INFINITY;
            }
        }
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let exact = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        for lanes in [1, 7, 32, 64] {
            let got = hostmath::online_lse(&x, lanes) as f64;
            assert!(
                (got - exact).abs() <= 2e-6 * exact.abs().max(1.0),
                "n={n} lanes={lanes}: {got} vs {exact}"
            );
        }
    }
    assert_eq!(
        hostmath::online_lse(&[f32::NEG_INFINITY; 4], 4),
        f32::NEG_INFINITY
    );
    assert!(hostmath::online_lse(&[1.0, f32::NAN], 1).is_nan());
}
