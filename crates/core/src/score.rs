//! Score semantics: which keys a query may see, how a scaled score becomes the final one,
//! and what a row with no allowed key gives. Validation (`spec.rs`) builds the [`Spec`];
//! every kernel reads these rules from here.
//!
//! For query `i` and key `j` (see [`AttentionOptions`](crate::AttentionOptions)):
//! ```text
//! allowed(i, j) = j in the causal/window band of i ∧ mask[i, j] ∧ key_mask[j] ∧ bias[i, j] ≠ −∞
//! s_ij = scale·q_i·k_j → softcap c·tanh(s/c) → − slope·|diag(i) − j| → + bias[i, j]
//! row with no allowed key: output 0, log-sum-exp −∞
//! ```

use crate::Element;
use crate::columns::for_each_column;
use crate::spec::Spec;

impl<T: Element> Spec<'_, T> {
    /// True if the output sums `Σ_j p_j·v_j` (each `p_j ≤ 1`, so at most `n_kv·max|v|`)
    /// could overflow: only for values within a factor `2(n_kv + 1)` of the type's maximum.
    #[inline]
    pub(crate) fn needs_value_scaling(&self) -> bool {
        // Divided first: for f64 the product could overflow.
        self.v_max_abs.to_f64() / T::MAX.to_f64() * 2.0 * (self.n_kv as f64 + 1.0) > 1.0
    }

    /// Per value column, powers of two `(scale, unscale)`: summing `p_j·(v_j·scale)`
    /// cannot overflow, and multiplying the result by `unscale` restores it exactly
    /// (`(1, 1)` for ordinary columns). Empty unless [`Spec::needs_value_scaling`]: the one
    /// place the kernels get their value scaling from.
    pub(crate) fn value_scales(&self) -> Vec<(T, T)> {
        let mut scales = Vec::new();
        if !self.needs_value_scaling() {
            return scales;
        }
        for_each_column(&self.v, 0..self.n_kv, &mut Vec::new(), |_, col| {
            let col_max = col.iter().fold(T::zero(), |a, &x| a.max(x.abs()));
            let ratio = col_max.to_f64() / T::MAX.to_f64() * 2.0 * (self.n_kv as f64 + 1.0);
            scales.push(if ratio <= 1.0 {
                (T::one(), T::one())
            } else {
                let e = ratio.log2().ceil() as i32;
                (
                    T::from_f64_rounded(2f64.powi(-e)),
                    T::from_f64_rounded(2f64.powi(e)),
                )
            });
        });
        scales
    }

    /// True if some option acts on individual scores (not only on positions).
    #[inline]
    pub(crate) fn has_elementwise(&self) -> bool {
        self.mask.is_some()
            || self.key_mask.is_some()
            || self.bias.is_some()
            || self.softcap.is_some()
            || self.alibi_slope.is_some()
    }

    /// The inclusive range of keys query `i` may see by position alone (causal, window),
    /// clipped to `[0, n_kv)`; empty when `lo > hi`.
    #[inline]
    pub(crate) fn key_range(&self, i: usize) -> (i64, i64) {
        let i = i as i64;
        let lo = (i + self.band_lo).max(0);
        let hi = (i + self.band_hi).min(self.n_kv as i64 - 1);
        (lo, hi)
    }

    /// Whether query `i` may attend to key `j` (`i < n_q`, `j < n_kv`): inside the
    /// causal/window band, allowed by the mask and key mask, and bias not −∞.
    #[inline]
    pub(crate) fn allowed(&self, i: usize, j: usize) -> bool {
        let (lo, hi) = self.key_range(i);
        let jj = j as i64;
        jj >= lo
            && jj <= hi
            && self.key_mask.is_none_or(|km| km[j])
            && self.mask.as_ref().is_none_or(|m| m[(i, j)])
            && self
                .bias
                .as_ref()
                .is_none_or(|b| b[(i, j)] != T::NEG_INFINITY)
    }

    /// Steps 2–5 of the score definition for an already scaled score `s`:
    /// softcap, ALiBi, bias, then −∞ where not allowed.
    #[inline]
    pub(crate) fn modify(&self, i: usize, j: usize, mut s: T) -> T {
        if !self.allowed(i, j) {
            return T::NEG_INFINITY;
        }
        if let Some(c) = self.softcap {
            s = c * (s / c).tanh();
        }
        if let Some(m) = self.alibi_slope {
            let dist = (i as i64 + self.diag_offset - j as i64).unsigned_abs();
            s -= m * T::from_count(dist as usize);
        }
        if let Some(b) = &self.bias {
            s += b[(i, j)];
        }
        s
    }
}

/// The log-sum-exp of a row from its running maximum `m` and sum `l = Σ_j exp(s_j − m)`:
/// `m + ln l`, or −∞ for a row with no allowed key (`l = 0`). Every path finishes rows
/// with this and [`row_output`].
#[inline(always)]
pub(crate) fn row_lse(m: f64, l: f64) -> f64 {
    if l == 0.0 {
        f64::NEG_INFINITY
    } else {
        m + l.ln()
    }
}

/// One output entry from its numerator `acc = Σ_j p_j·(v_j·scale)`, the row sum `l` and
/// the column's power-of-two `unscale` (1 for ordinary values, see
/// [`Spec::value_scales`]): `acc / l · unscale` rounded once, or 0 for a row with no
/// allowed key; clamped to `±v_max` (the exact value, a convex combination of values, lies
/// there; rounding could push it just past, even to +∞ when V holds MAX, and clamping only
/// moves it closer).
#[inline(always)]
pub(crate) fn row_output<T: Element>(acc: f64, l: f64, unscale: f64, v_max: T) -> T {
    if l == 0.0 {
        T::zero()
    } else {
        T::from_f64_rounded(acc / l * unscale)
            .max(-v_max)
            .min(v_max)
    }
}
