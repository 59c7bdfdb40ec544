//! The byte model (docs/DESIGN.md §5): the bytes a fused forward+backward must
//! move at the least, and the bytes the eager baseline moves, both assuming
//! no re-read is served by a cache.

use super::config::BenchConfig;
use kdfuse::spec::Divergence;

/// Bytes per element of the fused kernel's floor: read student and teacher
/// once, write the gradient once (`out` bytes per element; 0 = loss only).
pub fn fused_bytes_per_element(in_size: usize, out_size: usize) -> usize {
    2 * in_size + out_size
}

/// The floor's bytes for `c` with a gradient of `out_size` bytes per element.
pub fn fused_bytes(c: &BenchConfig, out_size: usize) -> u64 {
    let out = if c.grad { out_size } else { 0 };
    (c.elements() * fused_bytes_per_element(c.dtype.size(), out)) as u64
}

/// Bytes per element the eager baseline (kernels/app/eager.cu) moves for `c`,
/// kernel by kernel, fp32 intermediates, nothing served by L2.
pub fn eager_bytes_per_element(c: &BenchConfig) -> usize {
    let (i, o) = (c.dtype.size(), c.dtype.size());
    let with_ce = c.alpha > 0.0;
    let jsd = c.divergence == Divergence::Jsd && c.beta > 0.0 && c.beta < 1.0;
    // The backward terms read ls and lt (reverse KL, TVD) or lt only
    // (forward KL, soft CE).
    let rkl = c.divergence == Divergence::ReverseKl
        || c.divergence == Divergence::Tvd
        || (c.divergence == Divergence::Jsd && c.beta >= 1.0);
    // log_softmax: read the row twice, write fp32.
    let lsm = 2 * i + 4;
    let mut b = 2 * lsm + if with_ce { lsm } else { 0 };
    // The divergence's terms (JSD: the log-mixture first), then the row sums.
    b += if jsd { (8 + 4) + (12 + 4) } else { 8 + 4 };
    b += 4;
    if !c.grad {
        return b;
    }
    // ∂D/∂ls, then the log_softmax backward (a sum pass, then g, ls → out).
    b += if jsd || rkl { 8 + 4 } else { 4 + 4 };
    b += 4 + (4 + 4 + o);
    if with_ce {
        b += 4 + 2 * o;
    }
    b
}

/// The eager baseline's bytes for `c`.
pub fn eager_bytes(c: &BenchConfig) -> u64 {
    (c.elements() * eager_bytes_per_element(c)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use kdfuse::tensor::Dtype;

    #[test]
    fn floor_is_six_bytes_in_bf16_and_twelve_in_f32() {
        let mut c = BenchConfig::new(4, 1000, Dtype::Bf16, Divergence::ForwardKl);
        assert_eq!(fused_bytes(&c, 2), 4 * 1000 * 6);
        c.dtype = Dtype::F32;
        assert_eq!(fused_bytes(&c, 4), 4 * 1000 * 12);
        c.grad = false;
        assert_eq!(fused_bytes(&c, 4), 4 * 1000 * 8);
    }

    #[test]
    fn eager_forward_kl_matches_the_kernel_file_comment() {
        // kernels/app/eager.cu: 4·in + out + 44.
        let c = BenchConfig::new(1, 1, Dtype::Bf16, Divergence::ForwardKl);
        assert_eq!(eager_bytes_per_element(&c), 54);
        let c = BenchConfig::new(1, 1, Dtype::F32, Divergence::ForwardKl);
        assert_eq!(eager_bytes_per_element(&c), 64);
        let j = BenchConfig::new(1, 1, Dtype::F32, Divergence::Jsd);
        assert!(eager_bytes_per_element(&j) > 64);
    }
}
