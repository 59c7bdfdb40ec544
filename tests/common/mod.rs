//! Helpers shared by the integration tests.
#![allow(dead_code)]

use kdfuse::{HostData, KdInputs, Logits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random logits of standard deviation `scale`, `rows × cols`, f32.
pub fn logits(seed: u64, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale * 1.7)
        .collect()
}

/// Dense f32 inputs.
pub fn inputs<'a>(
    s: &'a [f32],
    t: &'a [f32],
    rows: usize,
    cols: usize,
    labels: Option<&'a [i64]>,
) -> KdInputs<'a> {
    KdInputs {
        student: Logits::new(HostData::F32(s), rows, cols),
        teacher: Logits::new(HostData::F32(t), rows, cols),
        labels,
        row_weights: None,
    }
}

/// Largest |a − b| / max(|b|, floor).
pub fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Every dtype × divergence group and every dtype × top-k mode group of a
/// sweep was drawn.
#[allow(dead_code)]
pub fn assert_all_groups(report: &kdfuse::check::SweepReport) {
    for dtype in kdfuse::Dtype::ALL {
        for d in kdfuse::Divergence::ALL {
            let g = format!("{dtype}/{d}");
            assert!(report.groups.contains_key(&g), "group {g} not drawn");
        }
        for m in kdfuse::TopkMode::ALL {
            let g = format!("{dtype}/topk-{m}");
            assert!(report.groups.contains_key(&g), "group {g} not drawn");
        }
    }
}
