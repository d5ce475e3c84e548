//! Attention dropout: which weights a call drops, from a counter-based generator, so that
//! the backward regenerates exactly the forward's mask without storing it.
//!
//! With probability `p` and seed `σ`, the weight of query `i` on key `j` in head `h` of
//! sequence `s` is kept when the first word of Philox4x32-10 (Salmon et al., SC'11; the
//! generator FlashAttention uses) at counter `(i, j, h, s)` with key `(σ mod 2³², σ / 2³²)`
//! is below `t = round((1 − p)·2³²)`, and a kept weight is multiplied by `1/(1 − p)`:
//!
//! ```text
//! out_i = Σ_j P_ij·M_ij/(1 − p)·v_j        M_ij = [philox(i, j, h, s)₀ < t]
//! ```
//!
//! (PyTorch's `dropout_p`: the softmax, then dropout on the weights; the log-sum-exp is
//! the softmax's, before dropout.) Each pair's draw depends only on its indices, counted
//! within its sequence, so the mask does not depend on tiles, paths or threads, and a
//! kept fraction of exactly `t/2³²` (1 − p within 2⁻³³) makes `E[out] = out` without
//! dropout up to the rounding of `1/(1 − p)`.

use crate::Element;

/// Attention dropout: drop each attention weight with probability `p`, scale the kept
/// ones by `1/(1 − p)`, the mask drawn from `seed` (see
/// [`AttentionOptions::with_dropout`](crate::AttentionOptions::with_dropout)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// The probability of dropping a weight, in `[0, 1)`.
    pub p: f64,
    /// The generator's key.
    pub seed: u64,
}

/// A call's dropout as the kernels apply it: the threshold, the scale, the key and the
/// (sequence, head) of the block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropoutMask<T> {
    /// Keep when the draw is below this (`2³²` keeps everything).
    threshold: u64,
    /// `1/(1 − p)` rounded to T.
    pub scale: T,
    key: [u32; 2],
    /// The counter's last two words: head and sequence.
    stream: [u32; 2],
    /// The row of the call's first query (`with_query_rows`), added to each query index.
    first_row: usize,
}

impl<T: Element> DropoutMask<T> {
    /// The mask of `dropout` for head `head` of sequence `seq` whose first query is row
    /// `first_row` (`p` already checked).
    pub(crate) fn new(dropout: Dropout, seq: usize, head: usize, first_row: usize) -> Self {
        let threshold = ((1.0 - dropout.p) * 4_294_967_296.0).round() as u64;
        DropoutMask {
            threshold,
            scale: T::from_f64_rounded(1.0 / (1.0 - dropout.p)),
            key: [dropout.seed as u32, (dropout.seed >> 32) as u32],
            stream: [head as u32, seq as u32],
            first_row,
        }
    }

    /// What the weight of query `i` on key `j` is multiplied by: `1/(1 − p)` if kept,
    /// else 0 (indices below 2³², checked with the options).
    #[inline]
    pub(crate) fn factor(&self, i: usize, j: usize) -> T {
        let draw = philox(
            [
                (self.first_row + i) as u32,
                j as u32,
                self.stream[0],
                self.stream[1],
            ],
            self.key,
        )[0];
        if u64::from(draw) < self.threshold {
            self.scale
        } else {
            T::zero()
        }
    }
}

/// Philox4x32-10: ten rounds of two 32×32→64-bit products and xors on the counter, the
/// key bumped by the Weyl constants between rounds (Random123's reference definition).
pub(crate) fn philox(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * u64::from(c[0]);
        let p1 = M1 * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known answers for `philox4x32 10` (its `kat_vectors` file).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn keeps_everything_at_p_0_and_the_stated_fraction_otherwise() {
        let all = DropoutMask::<f64>::new(Dropout { p: 0.0, seed: 7 }, 0, 0, 0);
        assert!((0..1000).all(|j| all.factor(3, j) == 1.0));
        let half = DropoutMask::<f32>::new(Dropout { p: 0.25, seed: 7 }, 1, 2, 0);
        assert_eq!(half.scale, 1.0 / 0.75);
        let kept = (0..200_000)
            .filter(|&j| half.factor(j % 400, j / 400) != 0.0)
            .count();
        // Binomial(200000, 0.75): σ ≈ 194; 5σ.
        assert!((kept as f64 - 150_000.0).abs() < 970.0, "kept {kept}");
    }
}
