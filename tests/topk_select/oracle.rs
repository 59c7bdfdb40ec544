//! The sort oracle on rows whose answer is written by hand.

use half::{bf16, f16};
use kdfuse::topk_select::{select_oracle, SelectSpec};
use kdfuse::{HostData, Logits};

const NEG: f32 = f32::NEG_INFINITY;

fn sel(x: &[f32], k: usize) -> (Vec<i32>, Vec<f32>, f32) {
    let l = Logits::new(HostData::F32(x), 1, x.len());
    let s = select_oracle(&l, &SelectSpec { k, with_lse: true }).unwrap();
    (s.indices, s.values, s.lse.unwrap()[0])
}

#[test]
fn orders_by_value_then_lower_index() {
    let (i, v, _) = sel(&[1.0, 3.0, 2.0, 3.0, -1.0, 2.0], 4);
    assert_eq!(i, [1, 3, 2, 5]);
    assert_eq!(v, [3.0, 3.0, 2.0, 2.0]);
}

#[test]
fn negative_zero_ties_with_zero() {
    let (i, v, _) = sel(&[-1.0, 0.0, -0.0, 0.0], 3);
    assert_eq!(i, [1, 2, 3]);
    assert_eq!(v[1].to_bits(), (-0.0f32).to_bits());
}

#[test]
fn infinities_are_ordinary_values() {
    let (i, v, lse) = sel(&[NEG, 1.0, NEG, f32::INFINITY, NEG], 5);
    assert_eq!(i, [3, 1, 0, 2, 4]);
    assert_eq!(v, [f32::INFINITY, 1.0, NEG, NEG, NEG]);
    assert_eq!(lse, f32::INFINITY);
    let (i, _, lse) = sel(&[NEG, NEG, NEG], 2);
    assert_eq!(i, [0, 1]);
    assert_eq!(lse, NEG);
}

#[test]
fn log_sum_exp_is_shifted() {
    let (_, _, lse) = sel(&[1000.0, 1000.0, NEG], 1);
    assert!((lse - (1000.0 + 2f32.ln())).abs() < 1e-4, "{lse}");
    let (_, _, lse) = sel(&[-1000.0], 1);
    assert_eq!(lse, -1000.0);
    let x: Vec<f32> = (0..10).map(|i| i as f32 * 0.25).collect();
    let want = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln() as f32;
    assert_eq!(sel(&x, 3).2, want);
}

#[test]
fn sixteen_bit_values_widen_exactly() {
    let b: Vec<bf16> = [0.1f32, 0.3, 0.2]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let l = Logits::new(HostData::Bf16(&b), 1, 3);
    let s = select_oracle(
        &l,
        &SelectSpec {
            k: 2,
            with_lse: false,
        },
    )
    .unwrap();
    assert_eq!(s.indices, [1, 2]);
    assert_eq!(s.values, [b[1].to_f32(), b[2].to_f32()]);
    assert!(s.lse.is_none());
    let h: Vec<f16> = [0.1f32, 0.3, 0.2]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let l = Logits::new(HostData::F16(&h), 1, 3);
    let s = select_oracle(
        &l,
        &SelectSpec {
            k: 1,
            with_lse: false,
        },
    )
    .unwrap();
    assert_eq!(s.values, [h[1].to_f32()]);
}

#[test]
fn strided_rows_skip_the_padding() {
    let x = [1.0, 2.0, 99.0, 5.0, 4.0, 99.0];
    let l = Logits::strided(HostData::F32(&x), 2, 2, 3);
    let s = select_oracle(
        &l,
        &SelectSpec {
            k: 2,
            with_lse: false,
        },
    )
    .unwrap();
    assert_eq!(s.indices, [1, 0, 0, 1]);
    assert_eq!(s.values, [2.0, 1.0, 5.0, 4.0]);
}
