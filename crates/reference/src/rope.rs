//! Rotary position embeddings, from the formula.

use nalgebra::DMatrix;

use crate::dot2;

/// Which dimensions of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeConvention {
    /// GPT-NeoX / Llama (`rotate_half`): dimension `p` with `p + r/2`.
    Half,
    /// GPT-J: dimension `2p` with `2p + 1`.
    Interleaved,
}

/// Rotary position embedding of `x`, returned as a new matrix.
///
/// `x` holds `heads` heads of width `d = x.ncols() / heads` side by side (head `h` in
/// columns `h·d .. (h+1)·d`); row `t` is the token at position `positions[t]`. In every
/// head, pair `p` (0 ≤ p < r/2, `r = rotary_dim`) of dimensions `(i, j)` — `(p, p + r/2)`
/// for [`RopeConvention::Half`], `(2p, 2p + 1)` for [`RopeConvention::Interleaved`] —
/// turns by `φ = positions[t] · θ^(−2p/r)`:
///
/// ```text
/// out_i = x_i·cos φ − x_j·sin φ
/// out_j = x_j·cos φ + x_i·sin φ
/// ```
///
/// and dimensions `r .. d` are copied. The inverse frequency `θ^(−2p/r)` is rounded to f64
/// before it multiplies the position, as in PyTorch and every model's code: that rounding
/// is part of the definition the golden cases use (a more exact angle would differ from
/// them by up to `position · 2^−53`, about 10^−11 at position 10^5). Each output is a
/// compensated two-term dot product ([`dot2`]) of the f64 cosine and sine.
///
/// # Shapes
/// `x` is n × heads·d; `positions` has n entries; the result has the shape of `x`.
///
/// # Panics
/// If `heads` is 0 or does not divide the columns, `rotary_dim` is odd, 0 or above `d`,
/// `positions.len() ≠ n`, or `base` is not finite and positive.
///
/// # Example
/// ```
/// use attention_reference::{RopeConvention, rope};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::from_row_slice(1, 2, &[1.0, 0.0]);
/// let out = rope(&x, 1, &[1], 2, 10_000.0, RopeConvention::Half);
/// assert!((out[(0, 0)] - 1f64.cos()).abs() < 1e-15);
/// assert!((out[(0, 1)] - 1f64.sin()).abs() < 1e-15);
/// ```
#[must_use]
pub fn rope(
    x: &DMatrix<f64>,
    heads: usize,
    positions: &[usize],
    rotary_dim: usize,
    base: f64,
    convention: RopeConvention,
) -> DMatrix<f64> {
    let (n, columns) = x.shape();
    assert!(
        heads > 0 && columns.is_multiple_of(heads),
        "rope: x has {columns} columns, not a multiple of heads = {heads}"
    );
    let d = columns / heads;
    assert!(
        rotary_dim > 0 && rotary_dim.is_multiple_of(2) && rotary_dim <= d,
        "rope: rotary_dim = {rotary_dim} must be even, positive and at most the head width {d}"
    );
    assert_eq!(
        positions.len(),
        n,
        "rope: {} positions for {n} rows",
        positions.len()
    );
    assert!(
        base.is_finite() && base > 0.0,
        "rope: base = {base} must be finite and positive"
    );

    let half = rotary_dim / 2;
    let mut out = x.clone();
    for (t, &position) in positions.iter().enumerate() {
        for h in 0..heads {
            for p in 0..half {
                let (i, j) = match convention {
                    RopeConvention::Half => (h * d + p, h * d + p + half),
                    RopeConvention::Interleaved => (h * d + 2 * p, h * d + 2 * p + 1),
                };
                let exponent = -((2 * p) as f64) / rotary_dim as f64;
                let angle = position as f64 * base.powf(exponent);
                let (cos, sin) = (angle.cos(), angle.sin());
                let (a, b) = (x[(t, i)], x[(t, j)]);
                out[(t, i)] = dot2(&[a, -b], &[cos, sin]);
                out[(t, j)] = dot2(&[b, a], &[cos, sin]);
            }
        }
    }
    out
}
