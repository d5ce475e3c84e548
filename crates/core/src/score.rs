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
use nalgebra::{Dyn, U1};

/// The positional band from causal and window: query `i` may see keys `[i + lo, i + hi]`
/// (inclusive). How an unbounded side is represented is private to this type: ask it
/// which keys a query may see ([`Band::keys`]), which queries may see a key
/// ([`Band::queries`]), and whether it bounds anything ([`Band::is_bounded`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Band {
    lo: i64,
    hi: i64,
}

/// An unbounded side of the band: far beyond any shape (shapes are bounded by memory),
/// and far enough from `i64`'s limits that adding an index cannot overflow.
const UNBOUNDED: i64 = 1 << 62;

impl Band {
    /// The band of the options: with `causal`, keys up to the diagonal `i + diag_offset`;
    /// with `window = (left, right)`, keys from `left` before to `right` after it.
    pub(crate) fn new(diag_offset: i64, causal: bool, window: Option<(usize, usize)>) -> Self {
        let clamp = |x: usize| (x as u64).min(UNBOUNDED as u64) as i64;
        let (mut lo, mut hi) = (-UNBOUNDED, UNBOUNDED);
        if causal {
            hi = diag_offset;
        }
        if let Some((left, right)) = window {
            lo = diag_offset - clamp(left);
            hi = hi.min(diag_offset.saturating_add(clamp(right)));
        }
        Band { lo, hi }
    }

    /// The inclusive range of keys query `i` may see, not clipped to the keys that exist
    /// (it may start below 0 or end past the last key).
    #[inline]
    pub(crate) fn keys(&self, i: usize) -> (i64, i64) {
        let i = i as i64;
        (i + self.lo, i + self.hi)
    }

    /// The inclusive range of queries that may see key `j`, not clipped to the queries
    /// that exist: `j − hi ≤ i ≤ j − lo`.
    #[inline]
    pub(crate) fn queries(&self, j: usize) -> (i64, i64) {
        let j = j as i64;
        (j - self.hi, j - self.lo)
    }

    /// Whether the band can exclude a key of any problem that fits in memory (causal, or
    /// a window narrower than 2^61 on some side).
    #[inline]
    pub(crate) fn is_bounded(&self) -> bool {
        self.lo > -UNBOUNDED / 2 || self.hi < UNBOUNDED / 2
    }

    /// Whether the band bounds keys from above only (causal, or a window open on the
    /// left): then every query may see key 0 onwards, whatever its position.
    #[inline]
    pub(crate) fn bounds_only_above(&self) -> bool {
        self.lo <= -UNBOUNDED / 2 && self.hi < UNBOUNDED / 2
    }
}

impl<'a, T: Element> Spec<'a, T> {
    /// True if the output sums `Σ_j p_j·v_j` (each `p_j ≤ 1`, so at most `n_kv·max|v|`)
    /// could overflow: only for values within a factor `2(n_kv + 1)` of the type's maximum.
    #[inline]
    pub(crate) fn needs_value_scaling(&self) -> bool {
        values_need_scaling(self.out_max, self.n_kv)
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
        self.alibi_slope.is_some() || self.bias.is_some() || self.has_elementwise_besides_store()
    }

    /// True if some option other than ALiBi and the bias acts on individual scores.
    #[inline]
    pub(crate) fn has_elementwise_besides_store(&self) -> bool {
        self.mask.is_some() || self.key_mask.is_some() || self.softcap.is_some()
    }

    /// Whether a kernel may apply ALiBi and the bias as it stores the scaled scores of a
    /// tile (`full_rows`: the tile has a query in every lane): there is one of them, no
    /// option comes before them in the score definition (no softcap), so `s − m·dist + b`
    /// there is the same operations on the same operands as in [`modify`](Spec::modify),
    /// and a bias (if any) has contiguous columns (row stride 1) and full rows to read.
    /// The options after them (masks, −∞ where not allowed) then run without them:
    /// [`modify_column`](Spec::modify_column) with `at_store`.
    #[inline]
    pub(crate) fn options_at_store(&self, full_rows: bool) -> bool {
        self.softcap.is_none()
            && (self.alibi_slope.is_some() || self.bias.is_some())
            && self
                .bias
                .as_ref()
                .is_none_or(|b| full_rows && b.strides().0 == 1)
    }

    /// The ALiBi terms `m·|diag(i) − j|` of a tile with queries from `i0` and keys from
    /// `j0`, as one per diagonal: `terms[r − j + keys − 1]` for lane `r < lanes`, tile key
    /// `j < keys`, i.e. `lanes + keys − 1` entries, each computed as `modify_column`
    /// computes it (so `s − term` has its bits). Nothing without a slope.
    pub(crate) fn alibi_terms(
        &self,
        i0: usize,
        j0: usize,
        lanes: usize,
        keys: usize,
        terms: &mut [T],
    ) {
        let Some(m) = self.alibi_slope else {
            return;
        };
        // diag(i0 + r) − (j0 + j) = d0 + (r − j); shapes fit in memory, so no overflow.
        let d0 = i0 as i64 + self.diag_offset - j0 as i64;
        for (e, t) in terms[..lanes + keys - 1].iter_mut().enumerate() {
            let dist = (d0 + e as i64 - (keys as i64 - 1)).unsigned_abs();
            *t = m * T::from_count(dist as usize);
        }
    }

    /// The inclusive range of keys query `i` may see by position alone (causal, window),
    /// clipped to `[0, n_kv)`; empty when `lo > hi`.
    #[inline]
    pub(crate) fn key_range(&self, i: usize) -> (i64, i64) {
        let (lo, hi) = self.band.keys(i);
        (lo.max(0), hi.min(self.n_kv as i64 - 1))
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
            s = c * (s / c).softcap_tanh();
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

    /// [`modify`](Spec::modify) but for the softcap, for key `j` and queries `i0 .. i0 +
    /// xs.len()` (`xs[r]` the scaled score of query `i0 + r`, already softcapped): the same
    /// operations on every entry, one option at a time over the whole run, so that each
    /// pass vectorises (the block kernel's tiles hold a key's queries contiguously). The
    /// block kernel applies the softcap before, to its whole tile, with the vector `tanh`
    /// of its CPU path (`MicroKernels::softcap`); with that the results are `modify`'s up
    /// to the rounding of the two `tanh` forms. With `at_store` ALiBi and the bias are left
    /// out: the caller applied them already, at the place the definition puts them (see
    /// [`options_at_store`](Spec::options_at_store)).
    #[inline(always)]
    pub(crate) fn modify_column(&self, j: usize, i0: usize, xs: &mut [T], at_store: bool) {
        let n = xs.len();
        // The queries that may see key j by position, as a range of `xs`.
        let (q_lo, q_hi) = self.band.queries(j);
        let r_lo = (q_lo - i0 as i64).clamp(0, n as i64) as usize;
        let r_hi = (q_hi - i0 as i64 + 1).clamp(r_lo as i64, n as i64) as usize;
        if self.key_mask.is_some_and(|km| !km[j]) || r_lo == r_hi {
            xs.fill(T::NEG_INFINITY);
            return;
        }
        xs[..r_lo].fill(T::NEG_INFINITY);
        xs[r_hi..].fill(T::NEG_INFINITY);
        let (xs, i0) = (&mut xs[r_lo..r_hi], i0 + r_lo);
        if let Some(m) = self.alibi_slope.filter(|_| !at_store) {
            // |diag(i) − j| with diag(i) = i + diag_offset: shapes fit in memory, so these
            // i64 sums cannot overflow.
            let base = i0 as i64 + self.diag_offset - j as i64;
            let end = base + xs.len() as i64;
            if let (Ok(base), Ok(_)) = (i32::try_from(base), i32::try_from(end)) {
                // Distances in i32, converted as `from_count` converts them: a conversion
                // that vectorises.
                for (r, x) in xs.iter_mut().enumerate() {
                    let dist = (base + r as i32).abs();
                    *x -= m * T::from_small(dist);
                }
            } else {
                for (r, x) in xs.iter_mut().enumerate() {
                    let dist = (base + r as i64).unsigned_abs();
                    *x -= m * T::from_count(dist as usize);
                }
            }
        }
        if let Some(b) = self.bias.as_ref().filter(|_| !at_store) {
            // A bias of −∞ (not allowed) makes the score −∞ here, as `modify` returns.
            if b.strides().0 == 1 {
                let b = b.as_view::<Dyn, Dyn, U1, Dyn>();
                let column = b.column(j);
                for (x, &b) in xs.iter_mut().zip(&column.as_slice()[i0..]) {
                    *x += b;
                }
            } else {
                for (r, x) in xs.iter_mut().enumerate() {
                    *x += b[(i0 + r, j)];
                }
            }
        }
        if let Some(mask) = &self.mask {
            if mask.strides().0 == 1 {
                let mask = mask.as_view::<Dyn, Dyn, U1, Dyn>();
                let column = mask.column(j);
                for (x, &keep) in xs.iter_mut().zip(&column.as_slice()[i0..]) {
                    *x = if keep { *x } else { T::NEG_INFINITY };
                }
            } else {
                for (r, x) in xs.iter_mut().enumerate() {
                    if !mask[(i0 + r, j)] {
                        *x = T::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// `∂z/∂t` of [`modify`](Spec::modify) at an allowed pair, `t = scale·q_i·k_j`: the
    /// softcap's `1 − tanh²(t/c)` (1 without one). ALiBi and the bias add terms that do
    /// not depend on `t`, and a disallowed pair has no gradient.
    pub(crate) fn modify_derivative(&self, t: T) -> T {
        match self.softcap {
            Some(c) => {
                let th = (t / c).softcap_tanh();
                T::one() - th * th
            }
            None => T::one(),
        }
    }
}

/// Whether output sums `Σ_j p_j·v_j` over `n_kv` keys with every `|v_j| ≤ out_max` (each
/// `p_j ≤ 1`, so at most `n_kv·out_max`) could overflow: only for values within a factor
/// `2(n_kv + 1)` of the type's maximum. The rule of [`Spec::needs_value_scaling`].
#[inline]
pub(crate) fn values_need_scaling<T: Element>(out_max: T, n_kv: usize) -> bool {
    // Divided first: for f64 the product could overflow.
    out_max.to_f64() / T::MAX.to_f64() * 2.0 * (n_kv as f64 + 1.0) > 1.0
}

/// What every entry of a row with no allowed key is: its output entries and attention
/// weights 0. The one statement of that rule: [`row_output`], [`write_empty_row`] and
/// every path that meets such a row use it.
#[inline(always)]
pub(crate) fn empty_row_output<T: Element>() -> T {
    T::zero()
}

/// The log-sum-exp of a row with no allowed key: −∞ (see [`empty_row_output`]).
#[inline(always)]
pub(crate) fn empty_row_lse<T: Element>() -> T {
    T::NEG_INFINITY
}

/// Writes a row with no allowed key: every output entry of `out` (one row) and, if given,
/// its log-sum-exp.
pub(crate) fn write_empty_row<'a, T: Element>(
    out: impl IntoIterator<Item = &'a mut T>,
    lse: Option<&mut T>,
) {
    for x in out {
        *x = empty_row_output();
    }
    if let Some(lse) = lse {
        *lse = empty_row_lse();
    }
}

/// The log-sum-exp of a row from its running maximum `m` and sum `l = Σ_j exp(s_j − m)`:
/// `m + ln l`, or −∞ for a row with no allowed key (`l = 0`). Every path finishes rows
/// with this and [`row_output`].
#[inline(always)]
pub(crate) fn row_lse(m: f64, l: f64) -> f64 {
    if l == 0.0 {
        empty_row_lse()
    } else {
        m + l.ln()
    }
}

/// One output entry from its numerator `acc = Σ_j p_j·(v_j·scale)`, the row sum `l` (0
/// for a row with no allowed key, otherwise `l ≥ 1`, as the row's largest weight is 1),
/// its reciprocal `inv_l = 1/l` and the column's power-of-two `unscale` (1 for ordinary
/// values, see [`Spec::value_scales`]): the quotient `acc / l · unscale` in f64, rounded
/// once to T, or 0 for a row with no allowed key; clamped to `±v_max` (the exact value, a
/// convex combination of values, lies there; rounding could push it just past, even to +∞
/// when V holds MAX, and clamping only moves it closer).
///
/// For f32 outputs the quotient is `acc · inv_l` (the reciprocal computed once per row):
/// f64 division issues every few cycles at best, and it was a sixth of the block kernel's
/// time at n = 64 (d 64, Zen 5). The product is within 1 f64 ulp of the quotient, which
/// the rounding to f32 hides but for ties it would have to land exactly between. For
/// f64 outputs that ulp would show (with V ≡ 1 the output would no longer be exactly 1),
/// so f64 keeps the division (`Element::DIVIDE_OUTPUTS`).
///
/// Written as selects (the clamp by comparisons, the empty row chosen last), so that a
/// row of outputs vectorises: the block kernel writes a block's 64 × d_v outputs with
/// it. For `l = 0` the quotient is NaN or ±∞ and is discarded by the last select.
#[inline(always)]
pub(crate) fn row_output<T: Element>(acc: f64, l: f64, inv_l: f64, unscale: f64, v_max: T) -> T {
    let q = if T::DIVIDE_OUTPUTS {
        acc / l
    } else {
        acc * inv_l
    };
    let x = T::from_f64_rounded(q * unscale);
    let x = if x < -v_max { -v_max } else { x };
    let x = if x > v_max { v_max } else { x };
    if l == 0.0 { empty_row_output() } else { x }
}
