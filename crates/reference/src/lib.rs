//! Naive, more-accurate-than-fast reference implementation of scaled dot-product attention.
//!
//! This crate is the test oracle for `attention-core`. It is written to be read next to the
//! formula, not to be fast: plain loops over queries `i`, keys `j` and value columns `c`,
//! everything computed in `f64` whatever the input type, every dot product compensated
//! ([`dot2`], Ogita–Rump–Oishi) and every sum compensated ([`neumaier_sum`]). Its error is
//! therefore a few units in the last place of `f64`, far below what a fast `f32` or `f64`
//! kernel achieves, so the difference between the two measures the fast kernel's error.
//!
//! # The formula
//!
//! With rows as tokens (Q is n_q × d_k, K is n_kv × d_k, V is n_kv × d_v):
//!
//! ```text
//! s_ij   = scale · q_i · k_j                      scale defaults to 1/√d_k
//! s_ij ← c · tanh(s_ij / c)                       softcap c, if set
//! s_ij ← s_ij − m · |diag_i − j|                  ALiBi slope m, if set
//! s_ij ← s_ij + bias_ij                           bias, if set
//! s_ij ← −∞  where (i, j) is disallowed           mask, key mask, causal, window, bias = −∞
//!
//! M_i    = max_j s_ij
//! Z_i    = Σ_j exp(s_ij − M_i)
//! P_ij   = exp(s_ij − M_i) / Z_i                  (the attention weights)
//! O_ic   = Σ_j P_ij · v_jc                        (the output, n_q × d_v)
//! lse_i  = M_i + ln Z_i                           (log-sum-exp of row i's scores)
//! ```
//!
//! where `diag_i = i` for top-left causal attention and `diag_i = i + n_kv − n_q` otherwise
//! (bottom-right: the last query lines up with the last key). A row in which no key is
//! allowed has output 0, weights 0 and `lse = −∞` (no NaN). See [`attention()`] for the
//! details and [`merge()`] for combining results over blocks of keys;
//! [`attention_backward`] and [`multi_head_backward`] are the gradients, by definition. [`rope()`] is the
//! rotary position embedding, from its formula; [`Layer`] a multi-head attention layer on
//! top of [`compute_qkv`], [`rope()`] and [`multi_head_attention`].
//!
//! # Coming from NumPy / PyTorch
//!
//! Matrices hold one token per row, as in `X @ W`: [`attention()`] computes what
//! `torch.nn.functional.scaled_dot_product_attention(q, k, v)` computes for 2-D `q`, `k`,
//! `v`, with a boolean mask meaning "may attend" as in PyTorch. For example:
//!
//! ```
//! use attention_reference::self_attention;
//! use nalgebra::DMatrix;
//!
//! // q = k = [[1, 0], [0, 1]], v = [[1, 2], [3, 4]]  (nalgebra's `from_row_slice` reads
//! // numbers row by row, like numpy; `DMatrix::from_vec` would read them column by column).
//! let q = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
//! let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
//! let out = self_attention(&q, &q, &v);
//! let expected = DMatrix::from_row_slice(
//!     2,
//!     2,
//!     &[1.660476901346686, 2.660476901346686, 2.3395230986533138, 3.3395230986533138],
//! );
//! assert!((out - expected).amax() < 1e-15);
//! ```
//!
//! # Panics
//!
//! Being an oracle, the functions here do not return errors: they `assert!` their
//! preconditions (shapes, option values) and panic with a message naming the operand and
//! its shape.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod attention;
mod backward;
mod compensated;
mod heads;
mod layer;
mod merge;
mod projection;
mod rope;

pub use attention::{attention, self_attention};
pub use backward::{Gradients, attention_backward};
pub use compensated::{dot2, neumaier_sum};
pub use heads::{
    HeadAttention, HeadGradients, HeadOptions, Layout, alibi_slopes, multi_head_attention,
    multi_head_backward,
};
pub use layer::{Layer, LayerRope};
pub use merge::merge;
pub use projection::{compute_qkv, compute_qkv_backward, project};
pub use rope::{RopeConvention, rope};

use nalgebra::DMatrix;

/// Causal masking, and where its diagonal sits when `n_q ≠ n_kv`.
///
/// The diagonal `diag_i` also anchors the sliding window and ALiBi (see [`Options`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    /// Query `i` may attend to keys `j ≤ i`; `diag_i = i`.
    TopLeft,
    /// Query `i` may attend to keys `j ≤ i + n_kv − n_q`; `diag_i = i + n_kv − n_q`. The
    /// last query sees every key, as in incremental decoding with a KV cache. When
    /// `n_q > n_kv`, the first `n_q − n_kv` queries see no key at all.
    BottomRight,
}

/// Options of [`attention()`]; the default is plain softmax attention with scale 1/√d_k.
///
/// Let `diag_i = i` if `causal == Some(Causal::TopLeft)` and `diag_i = i + n_kv − n_q`
/// otherwise (also when `causal` is `None`); it may be negative.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Multiplies `q_i · k_j`; `None` means `1/√d_k`. Must be finite (it may be 0 or
    /// negative).
    pub scale: Option<f64>,
    /// Causal masking: disallows keys `j > diag_i`.
    pub causal: Option<Causal>,
    /// n_q × n_kv; `mask[(i, j)] == false` disallows key `j` for query `i` (`true` = may
    /// attend, as PyTorch's boolean `attn_mask`).
    pub mask: Option<DMatrix<bool>>,
    /// Length n_kv; `key_mask[j] == false` disallows key `j` for every query (padding).
    pub key_mask: Option<Vec<bool>>,
    /// n_q × n_kv, added to the scores after softcap and ALiBi. An entry of −∞ disallows
    /// that key, exactly like a `false` in `mask`.
    pub bias: Option<DMatrix<f64>>,
    /// `(left, right)`: query `i` may attend only to keys `j` with
    /// `diag_i − left ≤ j ≤ diag_i + right`.
    pub window: Option<(usize, usize)>,
    /// Softcap `c > 0`: `s ← c·tanh(s/c)`, applied to `scale·q_i·k_j` before anything else.
    pub softcap: Option<f64>,
    /// ALiBi slope `m` (finite): `s ← s − m·|diag_i − j|`, after softcap, before bias.
    pub alibi_slope: Option<f64>,
    /// Attention dropout on the weights: see [`Dropout`].
    pub dropout: Option<Dropout>,
}

/// Attention dropout by definition: the weight `P_ij` of query `i` on key `j` becomes
/// `P_ij·M_ij/(1 − p)`, with `M_ij = 1` when the first 32-bit word of Philox4x32-10 at
/// counter `(i, j, head, sequence)` with key `(seed mod 2³², seed / 2³²)` is below
/// `round((1 − p)·2³²)`, else 0. The softmax's weights and log-sum-exp are unchanged;
/// the output and the gradients use the kept weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// The probability of dropping, in `[0, 1)`.
    pub p: f64,
    /// The generator's key.
    pub seed: u64,
    /// The counter's third word: the query head (0 for a single-head call).
    pub head: u32,
    /// The counter's fourth word: the sequence (0 for a single-head call).
    pub sequence: u32,
}

impl Dropout {
    /// `M_ij/(1 − p)`: what weight `(i, j)` is multiplied by.
    #[must_use]
    pub fn factor(&self, i: usize, j: usize) -> f64 {
        let word = philox4x32_10(
            [i as u32, j as u32, self.head, self.sequence],
            [self.seed as u32, (self.seed >> 32) as u32],
        )[0];
        let threshold = ((1.0 - self.p) * 2f64.powi(32)).round();
        if f64::from(word) < threshold {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

/// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2,
/// 3", SC'11), written from its definition: ten rounds, each replacing the counter
/// `(c0, c1, c2, c3)` by `(hi(M1·c2) ⊕ c1 ⊕ k0, lo(M1·c2), hi(M0·c0) ⊕ c3 ⊕ k1,
/// lo(M0·c0))`, the key `(k0, k1)` advanced by the Weyl constants after each round.
#[must_use]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let a = 0xD251_1F53u64 * u64::from(c[0]);
        let b = 0xCD9E_8D57u64 * u64::from(c[2]);
        c = [
            ((b >> 32) as u32) ^ c[1] ^ k[0],
            b as u32,
            ((a >> 32) as u32) ^ c[3] ^ k[1],
            a as u32,
        ];
        k = [
            k[0].wrapping_add(0x9E37_79B9),
            k[1].wrapping_add(0xBB67_AE85),
        ];
    }
    c
}

/// Result of [`attention()`].
#[derive(Clone, Debug)]
pub struct Attention {
    /// `O = P·V`, n_q × d_v. Rows with no allowed key are exactly 0.
    pub output: DMatrix<f64>,
    /// The attention weights `P`, n_q × n_kv: each row sums to 1 over its allowed keys and
    /// is 0 elsewhere; rows with no allowed key are exactly 0.
    pub weights: DMatrix<f64>,
    /// Length n_q: `lse_i = ln Σ_j exp(s_ij)` over the allowed keys of row `i`, the
    /// quantity [`merge()`] needs; −∞ for rows with no allowed key.
    pub lse: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known answers for `philox4x32 10` (its `kat_vectors` file).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }
}
