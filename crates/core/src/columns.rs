//! Reading a matrix column by column as contiguous slices: in place when its rows are
//! contiguous (any `DMatrix`, a column block of one), gathered into a buffer otherwise (a
//! transposed or row-strided view). Validation and packing go through here, so they run
//! over plain slices instead of 2-D indexing.

use std::ops::Range;

use nalgebra::{DMatrix, Dyn, U1};

use crate::Element;
use crate::error::{AttentionError, Operand};
use crate::memory::try_matrix;
use crate::options::MatRef;
use crate::view::MatMut;

/// Whether `m` has a zero stride along an axis of more than one element (a broadcast row
/// or column, numpy's `broadcast_to`). Element access by index reads such views correctly,
/// but nalgebra's iterators and products do not (they assume distinct elements), so the
/// calls that hand whole matrices to nalgebra copy them first ([`owned_if_broadcast`]).
pub(crate) fn is_broadcast<T>(m: &MatRef<'_, T>) -> bool {
    let (rs, cs) = m.strides();
    (m.nrows() > 1 && rs == 0) || (m.ncols() > 1 && cs == 0)
}

/// A contiguous copy of `m` if it [`is_broadcast`], else `None` (read it in place).
pub(crate) fn owned_if_broadcast<T: Element>(
    m: &MatRef<'_, T>,
    operand: Operand,
) -> Result<Option<DMatrix<T>>, AttentionError> {
    if !is_broadcast(m) {
        return Ok(None);
    }
    let mut owned = try_matrix(m.nrows(), m.ncols(), T::zero(), operand)?;
    for c in 0..m.ncols() {
        for r in 0..m.nrows() {
            owned[(r, c)] = m[(r, c)];
        }
    }
    Ok(Some(owned))
}

/// A contiguous copy of `m` if nalgebra's product `m · B` cannot read it in place, else
/// `None`: a broadcast view ([`is_broadcast`]), or a row stride other than 1 (a transposed
/// or row-strided view). nalgebra 0.35 multiplies small matrices (a dimension ≤ 5) column
/// by column, taking the length of a strided column's underlying slice,
/// `(rows − 1)·stride + 1`, as its number of elements: with a row stride above 1 it writes
/// past the end of the output column (caught as an out-of-bounds `get_unchecked_mut` in
/// debug builds). Only the left operand is read that way.
pub(crate) fn owned_for_left_product<T: Element>(
    m: &MatRef<'_, T>,
    operand: Operand,
) -> Result<Option<DMatrix<T>>, AttentionError> {
    if m.nrows() > 1 && m.strides().0 != 1 {
        // Broadcast views are among these; `owned_if_broadcast` copies by index.
        let mut owned = try_matrix(m.nrows(), m.ncols(), T::zero(), operand)?;
        for c in 0..m.ncols() {
            for r in 0..m.nrows() {
                owned[(r, c)] = m[(r, c)];
            }
        }
        return Ok(Some(owned));
    }
    owned_if_broadcast(m, operand)
}

/// Calls `f(c, column)` for every column `c` of `m`, restricted to `rows`. `buf` is only
/// used (and grown) for matrices whose row stride is not 1.
#[inline(always)] // into `with_path_features`' callers, to be compiled for their path
pub(crate) fn for_each_column<T: Element>(
    m: &MatRef<'_, T>,
    rows: Range<usize>,
    buf: &mut Vec<T>,
    mut f: impl FnMut(usize, &[T]),
) {
    if m.strides().0 == 1 {
        // Row stride 1: each column is contiguous, a view with a static unit row stride
        // exposes it as a slice.
        let unit = m.as_view::<Dyn, Dyn, U1, Dyn>();
        for c in 0..m.ncols() {
            let column = unit.column(c);
            f(c, &column.as_slice()[rows.clone()]);
        }
    } else {
        for c in 0..m.ncols() {
            buf.clear();
            buf.extend(rows.clone().map(|r| m[(r, c)]));
            f(c, buf);
        }
    }
}

/// Calls `f(c, column)` for every column `c` of `m`, restricted to `rows`, to be written:
/// in place when the row stride is 1, else through `buf` (grown as needed), whose contents
/// are then copied into the column (`f` must write every element).
#[inline(always)] // into the block kernel, to be compiled for its path
pub(crate) fn for_each_column_mut<T: Element>(
    m: &mut MatMut<'_, T>,
    rows: Range<usize>,
    buf: &mut Vec<T>,
    mut f: impl FnMut(usize, &mut [T]),
) {
    if m.strides().0 == 1 {
        let mut unit = m.as_view_mut::<Dyn, Dyn, U1, Dyn>();
        for c in 0..unit.ncols() {
            let mut column = unit.column_mut(c);
            f(c, &mut column.as_mut_slice()[rows.clone()]);
        }
    } else {
        for c in 0..m.ncols() {
            buf.clear();
            buf.resize(rows.len(), T::zero());
            f(c, buf);
            for (r, &x) in rows.clone().zip(buf.iter()) {
                m[(r, c)] = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::{DMatrix, DMatrixView};

    /// Contiguous and strided views give the same columns.
    #[test]
    fn strided_and_contiguous_agree() {
        let a = DMatrix::<f64>::from_fn(5, 3, |i, j| (i * 10 + j) as f64);
        let at = a.transpose(); // 3 × 5; viewed with swapped strides it is `a` again
        let strided: MatRef<'_, f64> = DMatrixView::from_slice_with_strides_generic(
            at.as_slice(),
            Dyn(5),
            Dyn(3),
            Dyn(3),
            Dyn(1),
        );
        let direct: MatRef<'_, f64> = (&a).into();
        for m in [direct, strided] {
            let mut seen = Vec::new();
            for_each_column(&m, 1..4, &mut Vec::new(), |c, col| {
                seen.push((c, col.to_vec()))
            });
            let want: Vec<(usize, Vec<f64>)> = (0..3)
                .map(|c| (c, (1..4).map(|r| a[(r, c)]).collect()))
                .collect();
            assert_eq!(seen, want);
        }
    }
}
