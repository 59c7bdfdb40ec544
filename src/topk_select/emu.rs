//! Test support: kernels/topk_select/select.cu run on the CPU under the CUDA
//! emulation (kernels/emu/select_emu.cpp), launched as [`super::cuda`]
//! launches it, with every output poisoned first (an element the kernel
//! does not write shows). Slow; not for real use.

use super::params::{self, SelectArgs};
use super::{nan_row, validate, SelectSpec, Selection};
use crate::error::{invalid, Result};
use crate::tensor::Logits;

extern "C" {
    fn kd_emu_select(in_dtype: i32, args: *const SelectArgs, grid: u32, block: u32) -> i32;
}

/// The emulated selection kernel (tests only).
#[derive(Debug, Clone, Copy, Default)]
pub struct SelectEmu {
    /// Blocks in the grid (rows are grid-strided over them); 0 = min(N, 3).
    pub grid: u32,
    /// Threads per block (a multiple of 32, at most 512); 0 = the CUDA
    /// launcher's choice.
    pub block: u32,
}

impl SelectEmu {
    /// The selection of [`super::select_cpu`], by the emulated kernel.
    pub fn select(&self, logits: &Logits, spec: &SelectSpec) -> Result<Selection> {
        validate(logits, spec)?;
        let (n, k) = (logits.rows, spec.k);
        let mut indices = vec![-1i32; n * k];
        let mut values = vec![f32::NAN; n * k];
        let mut lse = vec![f32::NAN; n];
        let mut bad_row = u64::MAX;
        let args = SelectArgs {
            logits: logits.data.bytes().as_ptr() as u64,
            indices: indices.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            lse: if spec.with_lse {
                lse.as_mut_ptr() as u64
            } else {
                0
            },
            bad_row: &mut bad_row as *mut u64 as u64,
            n_rows: n as i64,
            stride: logits.row_stride as i64,
            cols: logits.cols as i32,
            k: k as i32,
        };
        let grid = if self.grid > 0 {
            self.grid.min(params::grid(n))
        } else {
            n.clamp(1, 3) as u32
        };
        let block = if self.block > 0 {
            self.block
        } else {
            params::threads(logits.cols)
        };
        // SAFETY: the buffers hold what `args` describes (validated shape).
        let rc = unsafe { kd_emu_select(logits.dtype().code(), &args, grid, block) };
        if rc != 0 {
            return invalid("block", format!("{block} threads is not a launch shape"));
        }
        if bad_row != u64::MAX {
            return nan_row(bad_row as usize);
        }
        Ok(Selection {
            rows: n,
            k,
            indices,
            values,
            lse: spec.with_lse.then_some(lse),
        })
    }
}
