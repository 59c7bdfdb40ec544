//! Summaries of repeated timings.

use serde::{Deserialize, Serialize};

/// Median and spread of a set of timed runs, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Timed runs.
    pub runs: usize,
    /// Median.
    pub median_ms: f64,
    /// 10th percentile.
    pub p10_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted samples, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Timing {
    /// Summarises `samples_ms`; `None` when empty or when any sample is not
    /// finite.
    pub fn from_samples(samples_ms: &[f64]) -> Option<Self> {
        if samples_ms.is_empty() || samples_ms.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let mut s = samples_ms.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Timing {
            runs: s.len(),
            median_ms: quantile(&s, 0.5),
            p10_ms: quantile(&s, 0.1),
            p90_ms: quantile(&s, 0.9),
            min_ms: s[0],
        })
    }

    /// GB/s achieved moving `bytes` in the median time.
    pub fn gbs(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.median_ms * 1e-3) / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_known_samples() {
        let t = Timing::from_samples(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(t.median_ms, 3.0);
        assert_eq!(t.min_ms, 1.0);
        assert!((t.p10_ms - 1.4).abs() < 1e-12);
        assert!((t.p90_ms - 4.6).abs() < 1e-12);
        assert_eq!(t.runs, 5);
        assert!((t.gbs(3_000_000) - 1.0).abs() < 1e-12);
        assert!(Timing::from_samples(&[]).is_none());
        assert!(Timing::from_samples(&[1.0, f64::NAN]).is_none());
    }
}
