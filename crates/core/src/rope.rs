//! Rotary position embeddings (RoPE): rotating pairs of query/key dimensions by angles that
//! grow with each token's position, so that `q_m · k_n` depends on `m − n` only.
//!
//! A standalone, in-place step on a matrix of `heads` heads side by side, which a
//! multi-head layer and a KV cache call on Q and K (the cache stores keys after RoPE).

use crate::Element;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::options::MatRef;
use crate::spec::check_finite;
use crate::view::{AsMatMut, MatMut};

/// Which dimensions of a head form the pairs that rotate together. Non-exhaustive: other
/// pairings exist (e.g. ChatGLM's two rotary halves).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RopeConvention {
    /// GPT-NeoX / Llama (PyTorch's `rotate_half`): dimension `p` pairs with `p + r/2`.
    #[default]
    Half,
    /// GPT-J / the RoFormer paper: dimension `2p` pairs with `2p + 1`.
    Interleaved,
}

/// Rotary position embedding: rotary dimension `r`, base θ and pairing convention.
///
/// For a token at position `m`, each head's first `r` dimensions form `r/2` pairs
/// `(a, b)` (see [`RopeConvention`]); pair `p` (0 ≤ p < r/2) turns by the angle
/// ```text
/// φ_p = m · θ^(−2p/r)                       (in f64, whatever T is)
/// (a, b) ← (a·cos φ_p − b·sin φ_p,  b·cos φ_p + a·sin φ_p)
/// ```
/// Dimensions `r .. d_head` of each head pass through unchanged. The angle, its cosine and
/// its sine are computed in f64 (`θ^(−2p/r)` once per pair and call, `cos`/`sin` once per
/// token and pair, shared by all heads), then rounded to `T`; the two multiply-adds of
/// each output are done in `T`. Angles in f32 would be wrong in their low bits already at
/// position 10^5.
///
/// Defaults: θ = 10000, [`RopeConvention::Half`]. The parameters are checked when the
/// rotation is applied (the head width is only known then).
///
/// # Example
/// ```
/// use attention_core::{Rope, RopeConvention};
/// use nalgebra::DMatrix;
///
/// // 3 tokens, 2 heads of width 4; rotate all 4 dimensions of each head.
/// let mut q = DMatrix::<f32>::from_fn(3, 8, |i, j| (i + j) as f32 * 0.25);
/// let before = q.clone();
/// let rope = Rope::new(4).with_base(10_000.0).with_convention(RopeConvention::Half);
/// rope.apply(&mut q, 2, &[0, 1, 2])?;
///
/// assert_eq!(q.row(0), before.row(0)); // position 0: angle 0, nothing moves
/// // Pair 0 of head 1 at position 1 (dimensions 4 and 6) turned by 1 radian:
/// let (a, b) = (before[(1, 4)], before[(1, 6)]);
/// assert!((q[(1, 4)] - (a * 1f32.cos() - b * 1f32.sin())).abs() < 1e-6);
///
/// // Also in place on one head's column block of a wider matrix (a view by value):
/// rope.apply(q.columns_mut(0, 4), 1, &[5, 6, 7])?;
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    rotary_dim: usize,
    base: f64,
    convention: RopeConvention,
}

impl Rope {
    /// Rotates the first `rotary_dim` dimensions of each head, base 10000, convention
    /// [`RopeConvention::Half`]. `rotary_dim` must be even, at least 2 and at most the
    /// head width ([`apply`](Rope::apply) checks).
    #[must_use]
    pub fn new(rotary_dim: usize) -> Self {
        Rope {
            rotary_dim,
            base: 10_000.0,
            convention: RopeConvention::Half,
        }
    }

    /// Sets the base θ (10000 in the original papers and Llama 2, 500000 in Llama 3). It
    /// must be finite and at least 1.
    #[must_use]
    pub fn with_base(self, base: f64) -> Self {
        Rope { base, ..self }
    }

    /// Sets which dimensions pair up.
    #[must_use]
    pub fn with_convention(self, convention: RopeConvention) -> Self {
        Rope { convention, ..self }
    }

    /// The rotary dimension `r`.
    #[must_use]
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// The base θ.
    #[must_use]
    pub fn base(&self) -> f64 {
        self.base
    }

    /// The pairing convention.
    #[must_use]
    pub fn convention(&self) -> RopeConvention {
        self.convention
    }

    /// Rotates `x` in place: token (row) `t` at position `positions[t]`, the first
    /// `rotary_dim` dimensions of each of its `heads` heads, by the formula in [`Rope`]'s
    /// documentation.
    ///
    /// # Shapes
    /// `x` is n × heads·d_head (head `h` in columns `h·d_head .. (h+1)·d_head`, PyTorch's
    /// `view(n, heads, d_head)`), any strides: `&mut q`, or a view by value such as
    /// `q.columns_mut(c, w)`. `positions` has n entries (absolute positions: offsets in
    /// cached decoding, restarting per sequence in a packed batch).
    ///
    /// # Errors
    /// Checked in this order; on any error `x` is left untouched:
    /// - [`AttentionError::InvalidRopeBase`]: θ NaN, infinite or below 1;
    /// - [`AttentionError::HeadSplit`]: `heads` is 0 or does not divide the columns;
    /// - [`AttentionError::InvalidRotaryDim`]: `rotary_dim` 0, odd, or wider than `d_head`;
    /// - [`AttentionError::DimensionMismatch`] ([`Operand::Positions`]): `positions.len()`
    ///   is not the number of rows;
    /// - [`AttentionError::NonFinite`] ([`Operand::RopeInput`]): a NaN or ±∞ anywhere in
    ///   `x` (pass-through columns included, as every input of this crate);
    /// - [`AttentionError::RotationOverflow`]: an entry above MAX/2 in magnitude whose
    ///   rotation leaves the type's range (only then are outputs computed before writing).
    pub fn apply<'a, T: Element>(
        &self,
        x: impl AsMatMut<'a, T>,
        heads: usize,
        positions: &[usize],
    ) -> Result<(), AttentionError> {
        self.turn(x.into_mat_mut(), heads, positions, false)
    }

    /// The inverse rotation: each pair turned by `−φ_p`,
    /// `(a, b) ← (a·cos φ_p + b·sin φ_p,  b·cos φ_p − a·sin φ_p)`. The rotation is
    /// orthogonal, so this is also its transpose: the backward of [`apply`](Self::apply),
    /// turning `∂L/∂(rotated Q)` into `∂L/∂Q`.
    ///
    /// # Shapes and errors
    /// Those of [`apply`](Self::apply) ([`Operand::RopeInput`] for NaN/∞ in `x`).
    ///
    /// # Example
    /// ```
    /// use attention_core::Rope;
    /// use nalgebra::DMatrix;
    ///
    /// let mut k = DMatrix::<f64>::from_fn(2, 4, |i, j| (i * 4 + j) as f64 * 0.5 - 1.0);
    /// let before = k.clone();
    /// let rope = Rope::new(4);
    /// rope.apply(&mut k, 1, &[3, 7])?;
    /// rope.apply_inverse(&mut k, 1, &[3, 7])?;
    /// assert!((k - before).amax() < 1e-14);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    pub fn apply_inverse<'a, T: Element>(
        &self,
        x: impl AsMatMut<'a, T>,
        heads: usize,
        positions: &[usize],
    ) -> Result<(), AttentionError> {
        self.turn(x.into_mat_mut(), heads, positions, true)
    }

    /// [`apply`](Self::apply), or with `inverse` [`apply_inverse`](Self::apply_inverse).
    fn turn<T: Element>(
        &self,
        mut x: MatMut<'_, T>,
        heads: usize,
        positions: &[usize],
        inverse: bool,
    ) -> Result<(), AttentionError> {
        let head_dim = self.check(x.nrows(), x.ncols(), heads, positions)?;
        let view: MatRef<'_, T> = x.as_view();
        let max_abs = check_finite(Operand::RopeInput, &view)?;
        let pairs = Pairs {
            heads,
            head_dim,
            half: self.rotary_dim / 2,
            convention: self.convention,
        };
        // |a·c − b·s| ≤ |a| + |b| ≤ MAX rounds to at most MAX when |a|, |b| ≤ MAX/2 and
        // |c|, |s| ≤ 1 (rounding is monotone), so only larger inputs can overflow.
        if max_abs.to_f64() > T::MAX.to_f64() / 2.0
            && let Some((row, column)) = self.first_overflow(&x, pairs, positions, inverse)
        {
            return Err(AttentionError::RotationOverflow { row, column });
        }
        self.for_each_rotation(pairs, positions, inverse, |t, i, j, c, s| {
            let (a, b) = (x[(t, i)], x[(t, j)]);
            let (a2, b2) = rotate(a, b, c, s);
            x[(t, i)] = a2;
            x[(t, j)] = b2;
        });
        Ok(())
    }

    /// Checks the parameters against the shape of x; returns the head width. (The layer
    /// calls it with no rows to check its RoPE once, when it is built.)
    pub(crate) fn check(
        &self,
        rows: usize,
        columns: usize,
        heads: usize,
        positions: &[usize],
    ) -> Result<usize, AttentionError> {
        if !(self.base.is_finite() && self.base >= 1.0) {
            return Err(AttentionError::InvalidRopeBase { value: self.base });
        }
        if heads == 0 || !columns.is_multiple_of(heads) {
            return Err(AttentionError::HeadSplit {
                operand: Operand::RopeInput,
                columns,
                heads,
                head_width: None,
            });
        }
        let head_dim = columns / heads;
        let rule = if self.rotary_dim == 0 {
            Some("must be at least 2")
        } else if !self.rotary_dim.is_multiple_of(2) {
            Some("must be even")
        } else if self.rotary_dim > head_dim {
            Some("must not exceed the head width")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(AttentionError::InvalidRotaryDim {
                rotary_dim: self.rotary_dim,
                head_dim,
                rule,
            });
        }
        check_dim(
            Operand::Positions,
            Axis::Entries,
            positions.len(),
            rows,
            Operand::RopeInput,
            "one position per row",
        )?;
        Ok(head_dim)
    }

    /// Calls `f(t, i, j, cos, sin)` for every token `t` and every rotating pair of columns
    /// `(i, j)` of every head, with the pair's cosine and sine (negated if `inverse`)
    /// rounded to `T`. Each
    /// `θ^(−2p/r)` is computed once, each `(cos, sin)` once per token and pair.
    fn for_each_rotation<T: Element>(
        &self,
        pairs: Pairs,
        positions: &[usize],
        inverse: bool,
        mut f: impl FnMut(usize, usize, usize, T, T),
    ) {
        let r = self.rotary_dim as f64;
        for p in 0..pairs.half {
            // θ^(−2p/r) exactly as written, with −2p/r one division (as PyTorch's
            // `base ** (-arange(0, r, 2) / r)`): 1/θ^(2p/r) or p·(−2/r) round differently,
            // and at position 10^5 a last-bit change of the frequency moves the angle by
            // ~10^-11, beyond the golden cases' 1e-12.
            let inv_freq = self.base.powf(-((2 * p) as f64) / r);
            for (t, &position) in positions.iter().enumerate() {
                let (sin, cos) = (position as f64 * inv_freq).sin_cos();
                let sin = if inverse { -sin } else { sin };
                let (c, s) = (T::from_f64_rounded(cos), T::from_f64_rounded(sin));
                for h in 0..pairs.heads {
                    let (i, j) = pairs.columns(h, p);
                    f(t, i, j, c, s);
                }
            }
        }
    }

    /// The first (row, column) whose rotated value is not finite, computing every output
    /// exactly as [`Rope::apply`] does but writing nothing.
    fn first_overflow<T: Element>(
        &self,
        x: &MatMut<'_, T>,
        pairs: Pairs,
        positions: &[usize],
        inverse: bool,
    ) -> Option<(usize, usize)> {
        let mut first: Option<(usize, usize)> = None;
        self.for_each_rotation(pairs, positions, inverse, |t, i, j, c, s| {
            let (a2, b2) = rotate(x[(t, i)], x[(t, j)], c, s);
            for (value, column) in [(a2, i), (b2, j)] {
                if !value.finite() && first.is_none_or(|f| (t, column) < f) {
                    first = Some((t, column));
                }
            }
        });
        first
    }
}

/// Where the pairs of a call sit.
#[derive(Clone, Copy)]
struct Pairs {
    heads: usize,
    head_dim: usize,
    /// r/2: pairs per head.
    half: usize,
    convention: RopeConvention,
}

impl Pairs {
    /// The columns of pair `p` of head `h`.
    #[inline]
    fn columns(self, h: usize, p: usize) -> (usize, usize) {
        let start = h * self.head_dim;
        match self.convention {
            RopeConvention::Half => (start + p, start + p + self.half),
            RopeConvention::Interleaved => (start + 2 * p, start + 2 * p + 1),
        }
    }
}

/// `(a·c − b·s, b·c + a·s)` in `T`: the one place the rotation's arithmetic is written.
#[inline(always)]
fn rotate<T: Element>(a: T, b: T, c: T, s: T) -> (T, T) {
    (a * c - b * s, b * c + a * s)
}
