//! The CPU backend against the oracle.

use kdfuse::topk_select::check::{sweep, SweepConfig};
use kdfuse::topk_select::{select_cpu, select_oracle, SelectSpec};
use kdfuse::{HostData, Logits};

#[test]
fn random_sweep_against_oracle() {
    let cfg = SweepConfig::default();
    let nan = sweep(2500, 11, &cfg, &select_cpu).unwrap_or_else(|e| panic!("{e}"));
    // The NaN rule was exercised.
    assert!(nan > 20, "{nan} NaN cases");
}

#[test]
fn long_rows_every_k() {
    // Rows far above the candidate buffer, increasing, decreasing and
    // constant, where the threshold moves on every element or never.
    let v = 262_144 + 3;
    let up: Vec<f32> = (0..v).map(|i| i as f32 * 1e-3).collect();
    let down: Vec<f32> = up.iter().rev().copied().collect();
    let flat = vec![0.5f32; v];
    for x in [&up, &down, &flat] {
        let l = Logits::new(HostData::F32(x), 1, v);
        for k in [1, 2, 100, 1000, 4096] {
            let spec = SelectSpec { k, with_lse: true };
            let g = select_cpu(&l, &spec).unwrap();
            let w = select_oracle(&l, &spec).unwrap();
            kdfuse::topk_select::check::compare(&l, &g, &w).unwrap();
        }
    }
}
