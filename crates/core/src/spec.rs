//! Validation: the public functions check every shape, value and option once, here, and
//! hand a [`Spec`] to the kernels, which then trust their inputs.

use crate::Element;
use crate::columns::for_each_column;
use crate::error::{AttentionError, Axis, Operand};
use crate::options::{AttentionOptions, Causal, MatRef, Parallelism};

/// A checked attention problem: shapes, the resolved scale and the score modifiers.
#[derive(Clone, Debug)]
pub(crate) struct Spec<'a, T: Element> {
    pub q: MatRef<'a, T>,
    pub k: MatRef<'a, T>,
    pub v: MatRef<'a, T>,
    pub n_q: usize,
    pub n_kv: usize,
    /// The largest |v|: decides whether `Σ_j p_j·v_j` needs scaling (see `value_scale`).
    pub v_max_abs: T,
    pub d_k: usize,
    pub d_v: usize,
    pub scale: T,
    /// `diag(i) = i + diag_offset`.
    pub diag_offset: i64,
    /// Positional band from causal and window: query `i` may see `j` in
    /// `[i + band_lo, i + band_hi]` (inclusive; saturated to ±2^62 when unbounded).
    pub band_lo: i64,
    pub band_hi: i64,
    pub mask: Option<MatRef<'a, bool>>,
    pub key_mask: Option<&'a [bool]>,
    pub bias: Option<MatRef<'a, T>>,
    pub softcap: Option<T>,
    pub alibi_slope: Option<T>,
}

const UNBOUNDED: i64 = 1 << 62;

fn check_dim(
    operand: Operand,
    axis: Axis,
    found: usize,
    expected: usize,
    against: Operand,
    rule: &'static str,
) -> Result<(), AttentionError> {
    if found == expected {
        Ok(())
    } else {
        Err(AttentionError::DimensionMismatch {
            operand,
            axis,
            found,
            expected,
            against,
            rule,
        })
    }
}

/// The first NaN or infinity of `m`, in column-major order, as an error; else the largest
/// magnitude in `m`.
pub(crate) fn check_finite<T: Element>(
    operand: Operand,
    m: &MatRef<'_, T>,
) -> Result<T, AttentionError> {
    // One branch-free pass over contiguous columns; only if something is not finite, a
    // second pass finds the first such entry.
    // (An integer max over |x|'s bits: it vectorises, and ∞/NaN are the largest bits.)
    let mut max_bits = 0u64;
    for_each_column(m, 0..m.nrows(), &mut Vec::new(), |_, col| {
        max_bits = max_bits.max(T::max_abs_bits(col));
    });
    if max_bits < T::INFINITY_BITS {
        return Ok(T::from_abs_bits(max_bits));
    }
    for c in 0..m.ncols() {
        for r in 0..m.nrows() {
            let x = m[(r, c)];
            if !x.finite() {
                return Err(AttentionError::NonFinite {
                    operand,
                    row: r,
                    column: c,
                    value: x.to_f64(),
                });
            }
        }
    }
    unreachable!("a non-finite entry was seen in the first pass")
}

/// Checks the shapes of Q, K, V against each other and their values for NaN/∞; returns
/// the largest |v|.
pub(crate) fn check_qkv<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    parallel: bool,
) -> Result<T, AttentionError> {
    check_dim(
        Operand::Key,
        Axis::Columns,
        k.ncols(),
        q.ncols(),
        Operand::Query,
        "d_k must match",
    )?;
    check_dim(
        Operand::Value,
        Axis::Rows,
        v.nrows(),
        k.nrows(),
        Operand::Key,
        "one value row per key: n_kv must match",
    )?;
    // Large inputs are scanned in parallel (the scan is the only serial O(n·d) pass of a
    // call); errors are still reported in the order Q, K, V.
    let large = q.len() + k.len() + v.len() >= 1 << 18;
    let (rq, (rk, rv)) = if parallel && large {
        rayon::join(
            || check_finite(Operand::Query, q),
            || {
                rayon::join(
                    || check_finite(Operand::Key, k),
                    || check_finite(Operand::Value, v),
                )
            },
        )
    } else {
        (
            check_finite(Operand::Query, q),
            (
                check_finite(Operand::Key, k),
                check_finite(Operand::Value, v),
            ),
        )
    };
    rq?;
    rk?;
    rv
}

impl<'a, T: Element> Spec<'a, T> {
    /// Validates Q, K, V and the options.
    pub(crate) fn new(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        options: &AttentionOptions<'a, T>,
    ) -> Result<Self, AttentionError> {
        let parallel = options.parallelism == Parallelism::Rayon;
        let v_max_abs = check_qkv(&q, &k, &v, parallel)?;
        let (n_q, d_k) = q.shape();
        let n_kv = k.nrows();
        let d_v = v.ncols();

        let scale = match options.scale {
            Some(s) if s.finite() => s,
            Some(s) => return Err(AttentionError::InvalidScale { value: s.to_f64() }),
            None if d_k == 0 => return Err(AttentionError::ZeroHeadDim),
            None => T::one() / T::from_count(d_k).sqrt(),
        };
        if let Some(c) = options.softcap
            && !(c.finite() && c > T::zero())
        {
            return Err(AttentionError::InvalidSoftcap { value: c.to_f64() });
        }
        if let Some(m) = options.alibi_slope
            && !m.finite()
        {
            return Err(AttentionError::InvalidAlibiSlope { value: m.to_f64() });
        }
        if let Some(mask) = &options.mask {
            check_dim(
                Operand::Mask,
                Axis::Rows,
                mask.nrows(),
                n_q,
                Operand::Query,
                "the mask is n_q x n_kv",
            )?;
            check_dim(
                Operand::Mask,
                Axis::Columns,
                mask.ncols(),
                n_kv,
                Operand::Key,
                "the mask is n_q x n_kv",
            )?;
        }
        if let Some(key_mask) = options.key_mask {
            check_dim(
                Operand::KeyMask,
                Axis::Rows,
                key_mask.len(),
                n_kv,
                Operand::Key,
                "one key-mask entry per key",
            )?;
        }
        if let Some(bias) = &options.bias {
            check_dim(
                Operand::Bias,
                Axis::Rows,
                bias.nrows(),
                n_q,
                Operand::Query,
                "the bias is n_q x n_kv",
            )?;
            check_dim(
                Operand::Bias,
                Axis::Columns,
                bias.ncols(),
                n_kv,
                Operand::Key,
                "the bias is n_q x n_kv",
            )?;
            // −∞ masks a position; NaN and +∞ have no meaning.
            for c in 0..bias.ncols() {
                for r in 0..bias.nrows() {
                    let x = bias[(r, c)];
                    if !(x.finite() || x == T::NEG_INFINITY) {
                        return Err(AttentionError::NonFinite {
                            operand: Operand::Bias,
                            row: r,
                            column: c,
                            value: x.to_f64(),
                        });
                    }
                }
            }
        }

        // Shapes are bounded by memory, far below 2^62, so these casts are exact.
        let diag_offset = match options.causal {
            Some(Causal::TopLeft) => 0,
            _ => n_kv as i64 - n_q as i64,
        };
        let clamp = |x: usize| (x as u64).min(UNBOUNDED as u64) as i64;
        let (mut band_lo, mut band_hi) = (-UNBOUNDED, UNBOUNDED);
        if options.causal.is_some() {
            band_hi = diag_offset;
        }
        if let Some((left, right)) = options.window {
            band_lo = diag_offset - clamp(left);
            band_hi = band_hi.min(diag_offset.saturating_add(clamp(right)));
        }

        Ok(Spec {
            q,
            k,
            v,
            n_q,
            n_kv,
            v_max_abs,
            d_k,
            d_v,
            scale,
            diag_offset,
            band_lo,
            band_hi,
            mask: options.mask,
            key_mask: options.key_mask,
            bias: options.bias,
            softcap: options.softcap,
            alibi_slope: options.alibi_slope,
        })
    }

    /// True if the output sums `Σ_j p_j·v_j` (each `p_j ≤ 1`, so at most `n_kv·max|v|`)
    /// could overflow: only for values within a factor `2(n_kv + 1)` of the type's maximum.
    #[inline]
    pub(crate) fn needs_value_scaling(&self) -> bool {
        // Divided first: for f64 the product could overflow.
        self.v_max_abs.to_f64() / T::MAX.to_f64() * 2.0 * (self.n_kv as f64 + 1.0) > 1.0
    }

    /// Powers of two `(scale, unscale)` for a value column whose largest |v| is `col_max`:
    /// summing `p_j·(v_j·scale)` cannot overflow, and multiplying the result by `unscale`
    /// restores it exactly. `(1, 1)` for ordinary columns.
    pub(crate) fn value_scale(&self, col_max: T) -> (T, T) {
        let ratio = col_max.to_f64() / T::MAX.to_f64() * 2.0 * (self.n_kv as f64 + 1.0);
        if ratio <= 1.0 {
            (T::one(), T::one())
        } else {
            let e = ratio.log2().ceil() as i32;
            (
                T::from_f64_rounded(2f64.powi(-e)),
                T::from_f64_rounded(2f64.powi(e)),
            )
        }
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
