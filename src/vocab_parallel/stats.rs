//! The per-row statistics record exchanged between ranks (layout version 1),
//! and its merge.
//!
//! Every rank writes `[N, STATS_WIDTH]` f64 per round; the caller's
//! collective gathers them into `[world, N, STATS_WIDTH]` in rank order; each
//! rank merges the gathered records itself, in rank order, so every rank
//! gets bitwise the same merged statistics whatever the collective's
//! algorithm.
//!
//! Each record starts with a header (version, round, the shard's first
//! global column and its count of real, unpadded columns, and a flag for a
//! NaN or +inf input) so that a merge can refuse records of another layout,
//! of the other round, or shards that do not tile the vocabulary.

use crate::error::{invalid, Result};

/// The layout version of a stats record (slot [`slot::VERSION`]).
pub const STATS_VERSION: u32 = 1;

/// f64 values per row and rank, in both rounds.
pub const STATS_WIDTH: usize = 20;

/// The slots of a record. 0–4 are the header of both rounds; the meaning of
/// 5–19 depends on the round. Maxima are −inf and sums 0 where a shard has
/// no entry; every sum is relative to the same shard's maximum of its side.
pub mod slot {
    /// [`super::STATS_VERSION`].
    pub const VERSION: usize = 0;
    /// 1 or 2.
    pub const ROUND: usize = 1;
    /// The shard's first global column.
    pub const COL_START: usize = 2;
    /// The shard's real (unpadded) columns.
    pub const COL_COUNT: usize = 3;
    /// 1 when a used input of the row is NaN or +inf (after soft-capping).
    pub const BAD: usize = 4;

    // Round 1. u = t/τ (teacher; top-k: its values), w = s/τ, o = s.
    /// max u.
    pub const T_MAX: usize = 5;
    /// Σ exp(u − T_MAX).
    pub const T_SUM: usize = 6;
    /// max w.
    pub const S_MAX: usize = 7;
    /// Σ exp(w − S_MAX).
    pub const S_SUM: usize = 8;
    /// max o (α > 0).
    pub const CE_MAX: usize = 9;
    /// Σ exp(o − CE_MAX).
    pub const CE_SUM: usize = 10;
    /// o at the label when the label is in this shard, else 0.
    pub const LABEL_LOGIT: usize = 11;
    /// 1 when the label is in this shard.
    pub const LABEL_HERE: usize = 12;
    /// Σ exp(u − T_MAX)·(u − w) (forward KL, soft CE, top-k full/support).
    pub const FWD_ACC: usize = 13;
    /// Σ exp(u − T_MAX)·(u − T_MAX) (soft CE: the teacher's entropy).
    pub const ENT_ACC: usize = 14;
    /// Σ exp(w − S_MAX)·(w − u) (reverse KL).
    pub const REV_ACC: usize = 15;
    /// max w over the top-k support (`support`).
    pub const SUP_MAX: usize = 16;
    /// Σ exp(w − SUP_MAX) over the support.
    pub const SUP_SUM: usize = 17;
    /// `tail`: Σ_I P_i, P_i = exp(v_i) (the values are log-probs; not
    /// relative to a maximum).
    pub const TAIL_MASS: usize = 18;
    /// `tail`: Σ exp(w − S_MAX) off the support.
    pub const OFF_SUM: usize = 19;
    /// `tail`: Σ_I P_i·(v_i − s_i) (shares the forward accumulator's slot).
    pub const TAIL_ACC: usize = FWD_ACC;

    // Round 2, JSD (given the global log-normalisers).
    /// Σ q·g, g = (1 − β)(log q − log m).
    pub const JSD_QG: usize = 5;
    /// Σ p·h, h = β(log p − log m).
    pub const JSD_PH: usize = 6;

    // Round 2, TVD. A: q > p, B: q < p, E: q = p.
    /// Σ |p − q|.
    pub const TVD_ABS: usize = 5;
    /// Σ_A q.
    pub const TVD_QA: usize = 6;
    /// Σ_B q.
    pub const TVD_QB: usize = 7;
    /// Σ_E q.
    pub const TVD_QE: usize = 8;
    /// Σ_A p.
    pub const TVD_PA: usize = 9;
    /// Σ_B p.
    pub const TVD_PB: usize = 10;
    /// Σ_E p.
    pub const TVD_PE: usize = 11;
}

/// The gathered records of one round: `[world, N, STATS_WIDTH]` f64 in rank
/// order, as an all-gather of every rank's `[N, STATS_WIDTH]` leaves them.
#[derive(Debug, Clone, Copy)]
pub struct Gathered<'a> {
    /// The records.
    pub stats: &'a [f64],
    /// The number of ranks (shards).
    pub world: usize,
}

impl Gathered<'_> {
    /// Checks the length, each record's header (`round`, version) and that
    /// the shards tile `[0, vocab_size)` in rank order (an all-padding shard
    /// is skipped); `arg` names the buffer in errors.
    pub(crate) fn check(
        &self,
        arg: &'static str,
        rows: usize,
        round: usize,
        vocab_size: usize,
    ) -> Result<()> {
        if self.world == 0 {
            return invalid(arg, "world must be ≥ 1");
        }
        let want = self
            .world
            .checked_mul(rows)
            .and_then(|x| x.checked_mul(STATS_WIDTH));
        if want != Some(self.stats.len()) {
            return invalid(
                arg,
                format!(
                    "has {} values; [world = {}, N = {rows}, {STATS_WIDTH}] needs {}",
                    self.stats.len(),
                    self.world,
                    want.map_or("more than fits".into(), |w| w.to_string())
                ),
            );
        }
        for r in 0..rows {
            let mut next = 0.0;
            for k in 0..self.world {
                let rec = self.record(k, r, rows);
                if rec[slot::VERSION] != STATS_VERSION as f64 {
                    return invalid(
                        arg,
                        format!(
                            "rank {k}, row {r}: layout version {} (this library reads {STATS_VERSION})",
                            rec[slot::VERSION]
                        ),
                    );
                }
                if rec[slot::ROUND] != round as f64 {
                    return invalid(
                        arg,
                        format!(
                            "rank {k}, row {r}: stats of round {}, expected round {round}",
                            rec[slot::ROUND]
                        ),
                    );
                }
                let (start, count) = (rec[slot::COL_START], rec[slot::COL_COUNT]);
                if count > 0.0 {
                    if start != next {
                        return invalid(
                            arg,
                            format!(
                                "rank {k}'s shard starts at column {start}, expected {next}: the shards must be contiguous and in rank order"
                            ),
                        );
                    }
                    next = start + count;
                }
            }
            if next != vocab_size as f64 {
                return invalid(
                    arg,
                    format!("the shards cover columns [0, {next}), the vocabulary is {vocab_size}"),
                );
            }
        }
        Ok(())
    }

    /// Rank `k`'s record of row `r`.
    pub(crate) fn record(&self, k: usize, r: usize, rows: usize) -> &[f64] {
        let at = (k * rows + r) * STATS_WIDTH;
        &self.stats[at..at + STATS_WIDTH]
    }
}

/// A maximum and a sum relative to it, merged across shards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxSum {
    pub max: f64,
    pub sum: f64,
}

impl MaxSum {
    /// Merges the `(max, sum)` slots of each rank's record (rank order);
    /// also returns each rank's rescaling factor exp(max_k − max).
    pub(crate) fn merge(recs: &[&[f64]], max: usize, sum: usize) -> (MaxSum, Vec<f64>) {
        let m = recs
            .iter()
            .map(|r| r[max])
            .fold(f64::NEG_INFINITY, f64::max);
        let scales: Vec<f64> = recs
            .iter()
            .map(|r| {
                if r[max] == f64::NEG_INFINITY {
                    0.0
                } else {
                    (r[max] - m).exp()
                }
            })
            .collect();
        let s = recs
            .iter()
            .zip(&scales)
            .fold(0.0, |a, (r, &f)| a + r[sum] * f);
        (MaxSum { max: m, sum: s }, scales)
    }

    /// log Σ exp: max + ln(sum) (−inf when empty, so a side with no mass
    /// gives NaN downstream).
    pub(crate) fn lse(self) -> f64 {
        if self.sum > 0.0 {
            self.max + self.sum.ln()
        } else {
            f64::NAN
        }
    }
}

/// Σ_k scale_k · rec_k[at]: an accumulator relative to each rank's maximum,
/// taken to the merged one (0·x = 0, so a rank without entries adds
/// nothing even when its slot holds ±inf or NaN).
pub(crate) fn rescaled(recs: &[&[f64]], scales: &[f64], at: usize) -> f64 {
    recs.iter()
        .zip(scales)
        .fold(0.0, |a, (r, &f)| if f == 0.0 { a } else { a + r[at] * f })
}

/// Σ_k rec_k[at].
pub(crate) fn total(recs: &[&[f64]], at: usize) -> f64 {
    recs.iter().fold(0.0, |a, r| a + r[at])
}

/// A new record with its header filled.
pub(crate) fn header(rec: &mut [f64], round: usize, start: usize, count: usize) {
    rec.fill(0.0);
    rec[slot::VERSION] = STATS_VERSION as f64;
    rec[slot::ROUND] = round as f64;
    rec[slot::COL_START] = start as f64;
    rec[slot::COL_COUNT] = count as f64;
}
