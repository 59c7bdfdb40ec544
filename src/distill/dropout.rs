//! Dropout masks: a counter-based hash of (seed, step, layer, element), the
//! same on the CPU and in kernels/mlp.cu.

/// lowbias32 (Chris Wellons' integer hash); kernels/mlp.cu has the same.
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The dropout of one layer at one step: element `i` of the layer's
/// `[rows × width]` output is kept when `mix32(key ^ i·φ) ≥ threshold`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Per (seed, step, layer).
    pub key: u32,
    /// rate · 2³².
    pub threshold: u32,
    /// 1 / (1 − rate).
    pub scale: f32,
}

impl Dropout {
    /// The dropout of hidden layer `layer` at step `step`, or `None` at rate 0.
    pub fn new(rate: f32, seed: u64, step: u64, layer: usize) -> Option<Dropout> {
        if rate <= 0.0 {
            return None;
        }
        let s = mix32(seed as u32) ^ mix32((seed >> 32) as u32 ^ 0x5bd1_e995);
        let t = mix32(s ^ step as u32) ^ mix32((step >> 32) as u32 ^ 0x68e3_1da4);
        Some(Dropout {
            key: mix32(t ^ mix32(layer as u32 ^ 0x1b87_3593)),
            threshold: (rate as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            scale: 1.0 / (1.0 - rate),
        })
    }

    /// Whether element `i` is kept.
    pub fn keep(&self, i: u32) -> bool {
        mix32(self.key ^ i.wrapping_mul(0x9e37_79b9)) >= self.threshold
    }
}
