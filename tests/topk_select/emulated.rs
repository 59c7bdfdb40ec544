//! The CUDA kernel (kernels/topk_select/select.cu) under the CPU emulation
//! against the oracle: random sweeps over small blocks (each emulated thread
//! is an OS thread), the launcher's block on a few long rows, grid-stride
//! rows, and a check that the sweep sees an unwritten output.

use kdfuse::topk_select::check::{compare, sweep, SweepConfig};
use kdfuse::topk_select::emu::SelectEmu;
use kdfuse::topk_select::{select_oracle, SelectSpec};
use kdfuse::{HostData, Logits};

fn emu(grid: u32, block: u32) -> SelectEmu {
    SelectEmu { grid, block }
}

#[test]
fn random_sweep_small_blocks() {
    // Rows longer than the block (several tiles, several elements per
    // thread), one block striding over the rows or two.
    let cfg = SweepConfig {
        max_rows: 2,
        max_cols: 400,
        big_every: 0,
        big_cols: 0,
    };
    let mut nan = 0;
    for (seed, grid, block) in [(21u64, 1, 32u32), (22, 1, 64), (23, 2, 32), (24, 1, 96)] {
        let e = emu(grid, block);
        nan += sweep(520, seed, &cfg, &|l, s| e.select(l, s)).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(nan > 20, "{nan} NaN cases");
}

#[test]
fn random_sweep_long_rows_launcher_block() {
    // The launcher's block (up to 512 threads) on rows up to 5000 columns,
    // and a few far above a block (131089 columns).
    let cfg = SweepConfig {
        max_rows: 2,
        max_cols: 5000,
        big_every: 10,
        big_cols: 131_072 + 17,
    };
    sweep(30, 31, &cfg, &|l, s| SelectEmu::default().select(l, s))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn ties_across_tiles_and_grid_stride_rows() {
    // Every value equal: the winners are the first k columns, found across
    // many compaction tiles; 7 rows on a grid of 2 blocks.
    let (n, v) = (7, 1000);
    let mut x = vec![0.25f32; n * v];
    for r in 0..n {
        x[r * v + 999 - r] = 1.0;
    }
    let l = Logits::new(HostData::F32(&x), n, v);
    for k in [1, 2, 33, 999, 1000] {
        let spec = SelectSpec { k, with_lse: true };
        let g = emu(2, 64).select(&l, &spec).unwrap();
        let w = select_oracle(&l, &spec).unwrap();
        compare(&l, &g, &w).unwrap();
    }
}

#[test]
fn an_unwritten_output_fails_the_comparison() {
    let x: Vec<f32> = (0..100).map(|i| (i * 37 % 101) as f32).collect();
    let l = Logits::new(HostData::F32(&x), 1, 100);
    let spec = SelectSpec {
        k: 10,
        with_lse: true,
    };
    let w = select_oracle(&l, &spec).unwrap();
    let mut g = emu(1, 32).select(&l, &spec).unwrap();
    compare(&l, &g, &w).unwrap();
    // The emulation's poison, as if the kernel had skipped one element.
    g.indices[9] = -1;
    assert!(compare(&l, &g, &w).is_err());
    let mut g2 = w.clone();
    g2.lse.as_mut().unwrap()[0] = f32::NAN;
    assert!(compare(&l, &g2, &w).is_err());
}
