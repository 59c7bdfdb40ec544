//! The launch contract of the selection kernels
//! (kernels/topk_select/select_args.h), mirrored as a `#[repr(C)]` struct:
//! same fields, same order, held to the C layout by a test. The launch
//! shape is chosen here for the CUDA launcher and the emulation alike.

/// `KdSelectArgs`. Device pointers on the GPU, host addresses under
/// emulation; 0 is null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SelectArgs {
    pub logits: u64,
    pub indices: u64,
    pub values: u64,
    pub lse: u64,
    pub bad_row: u64,
    pub n_rows: i64,
    pub stride: i64,
    pub cols: i32,
    pub k: i32,
}

// SAFETY: plain-old-data with the C layout the kernels expect (checked by
// `layout_matches_the_c_struct`).
unsafe impl cudarc::driver::DeviceRepr for SelectArgs {}

/// Threads per block (`KD_SEL_THREADS` is the most): a warp per 32 columns
/// up to 512.
pub(crate) fn threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 512) as u32
}

/// Blocks in the grid: one per row, grid-stride beyond 2^20 rows.
pub(crate) fn grid(rows: usize) -> u32 {
    rows.clamp(1, 1 << 20) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn kd_select_host_layout(out: *mut i64) -> i32;
    }

    #[test]
    fn layout_matches_the_c_struct() {
        let mut out = [0i64; 16];
        // SAFETY: writes at most 16 values.
        let n = unsafe { kd_select_host_layout(out.as_mut_ptr()) };
        let c: Vec<usize> = out[..n as usize].iter().map(|&x| x as usize).collect();
        let rust = vec![
            size_of::<SelectArgs>(),
            offset_of!(SelectArgs, logits),
            offset_of!(SelectArgs, indices),
            offset_of!(SelectArgs, values),
            offset_of!(SelectArgs, lse),
            offset_of!(SelectArgs, bad_row),
            offset_of!(SelectArgs, n_rows),
            offset_of!(SelectArgs, stride),
            offset_of!(SelectArgs, cols),
            offset_of!(SelectArgs, k),
        ];
        assert_eq!(rust, c);
    }

    #[test]
    fn launch_shape() {
        assert_eq!(threads(1), 32);
        assert_eq!(threads(33), 64);
        assert_eq!(threads(300_000), 512);
        assert_eq!(grid(0), 1);
        assert_eq!(grid(5), 5);
    }
}
