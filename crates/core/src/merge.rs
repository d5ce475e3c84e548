//! Merging attention computed over disjoint blocks of keys.

use nalgebra::{DMatrix, DVector};

use crate::Element;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::memory::{try_matrix, try_vector};
use crate::options::MatRef;
use crate::score::write_empty_row;
use crate::spec::check_finite;
use crate::view::AsMatRef;

/// Combines partial results `(output_b, lse_b)`, each the attention of the same queries
/// over a disjoint block `B` of the keys (with [`scaled_dot_product_attention_with_lse`]),
/// into the attention over all the keys:
///
/// ```text
/// M = max_b lse_b,   w_b = exp(lse_b − M),
/// output = Σ_b w_b · output_b / Σ_b w_b,   lse = M + ln Σ_b w_b
/// ```
///
/// exact up to rounding, row by row. A row whose every part has `lse = −∞` (no allowed key
/// anywhere) is 0 with `lse = −∞`. This is the primitive behind split-KV decoding and
/// spreading one long sequence over workers.
///
/// [`scaled_dot_product_attention_with_lse`]: crate::scaled_dot_product_attention_with_lse
///
/// # Shapes
/// Every output is `n_q × d_v` and every lse has `n_q` entries; the result has the same.
///
/// # Errors
/// [`AttentionError::NoPartials`] for an empty list; [`AttentionError::DimensionMismatch`]
/// if shapes differ from the first part's; [`AttentionError::NonFinite`] for NaN/∞ in an
/// output, or NaN/+∞ in an lse (−∞ is allowed); [`AttentionError::TooLarge`] if the
/// result cannot be allocated.
///
/// Each output entry is clamped to the range of the parts' entries it combines (with
/// nonzero weight): the exact result, a convex combination, lies there, and rounding
/// cannot push it out (ten parts holding `MAX` give `MAX`, not `+∞`).
///
/// # Example
/// ```
/// use attention_core::{
///     merge_partial_attention, scaled_dot_product_attention_with_lse, AttentionOptions,
/// };
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(3, 4, |i, j| (i as f64 - j as f64) * 0.3);
/// let k = DMatrix::<f64>::from_fn(10, 4, |i, j| ((i * j) % 5) as f64 * 0.2);
/// let v = DMatrix::<f64>::from_fn(10, 2, |i, j| (i + j) as f64);
/// let opts = AttentionOptions::new();
/// let (a, lse_a) = scaled_dot_product_attention_with_lse(&q, &k.rows(0, 6), &v.rows(0, 6), &opts)?;
/// let (b, lse_b) = scaled_dot_product_attention_with_lse(&q, &k.rows(6, 4), &v.rows(6, 4), &opts)?;
/// let (merged, _) = merge_partial_attention([(&a, lse_a.as_slice()), (&b, lse_b.as_slice())])?;
/// let (full, _) = scaled_dot_product_attention_with_lse(&q, &k, &v, &opts)?;
/// assert!((merged - full).amax() < 1e-13);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::type_complexity)] // (output, lse), as returned by the _with_lse function
pub fn merge_partial_attention<'a, T, O, I>(
    parts: I,
) -> Result<(DMatrix<T>, DVector<T>), AttentionError>
where
    T: Element,
    O: AsMatRef<'a, T>,
    I: IntoIterator<Item = (O, &'a [T])>,
{
    let parts: Vec<(MatRef<'a, T>, &'a [T])> = parts
        .into_iter()
        .map(|(o, l)| (o.into_mat_ref(), l))
        .collect();
    let Some((first, _)) = parts.first() else {
        return Err(AttentionError::NoPartials);
    };
    let (n_q, d_v) = first.shape();
    for (b, (out, lse)) in parts.iter().enumerate() {
        for (axis, found, expected) in [
            (Axis::Rows, out.nrows(), n_q),
            (Axis::Columns, out.ncols(), d_v),
        ] {
            check_dim(
                Operand::Partial(b),
                axis,
                found,
                expected,
                Operand::Partial(0),
                "all partial outputs have the same shape",
            )?;
        }
        check_dim(
            Operand::PartialLse(b),
            Axis::Entries,
            lse.len(),
            n_q,
            Operand::Partial(b),
            "one log-sum-exp per query row",
        )?;
        check_finite(Operand::Partial(b), out)?;
        if let Some(row) = lse
            .iter()
            .position(|&x| !(x.finite() || x == T::NEG_INFINITY))
        {
            return Err(AttentionError::NonFinite {
                operand: Operand::PartialLse(b),
                row,
                column: 0,
                value: lse[row].to_f64(),
            });
        }
    }

    let mut out = try_matrix(n_q, d_v, T::zero(), Operand::Output)?;
    let mut lse_out = try_vector(n_q, T::NEG_INFINITY, Operand::Lse)?;
    let mut weights = vec![T::zero(); parts.len()];
    for i in 0..n_q {
        let m = parts
            .iter()
            .map(|(_, lse)| lse[i])
            .fold(T::NEG_INFINITY, |a, b| if b > a { b } else { a });
        if m == T::NEG_INFINITY {
            // No allowed key in any part.
            write_empty_row(out.row_mut(i).iter_mut(), Some(&mut lse_out[i]));
            continue;
        }
        let total = parts
            .iter()
            .fold(T::zero(), |acc, (_, lse)| acc + (lse[i] - m).exp());
        // Normalised weights (summing to 1), once per row: the exact result is a convex
        // combination of the parts' outputs, so it is clamped to their range, which
        // rounding could otherwise leave (10 parts holding MAX would sum to +∞).
        for (w, (_, lse)) in weights.iter_mut().zip(&parts) {
            *w = (lse[i] - m).exp() / total;
        }
        for c in 0..d_v {
            let (mut sum, mut lo, mut hi) = (T::zero(), T::MAX, -T::MAX);
            for (&w, (part, _)) in weights.iter().zip(&parts) {
                if w == T::zero() {
                    continue;
                }
                let x = part[(i, c)];
                sum += w * x;
                lo = lo.min(x);
                hi = hi.max(x);
            }
            out[(i, c)] = sum.max(lo).min(hi);
        }
        lse_out[i] = m + total.ln();
    }
    Ok((out, lse_out))
}
