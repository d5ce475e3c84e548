//! How the public functions take matrices: [`AsMatRef`] for what they read, [`AsMatMut`]
//! for what they write. Both accept a reference to any nalgebra matrix or view, and a view
//! by value, with any shape and stride types; the kernels then see one type, [`MatRef`]
//! or [`MatMut`] (dynamic shape and strides).
//!
//! This file holds the crate's only `unsafe` outside `kernel/simd.rs`: views of the same
//! memory for the same lifetime with other stride types (a view passed by value as the
//! dynamic-stride view, a block of a view, disjoint mutable blocks, a view transposed).
//! nalgebra converts only references to views safely (`From<&'a Matrix>`); a view by value
//! (`q.columns(0, d)`) has no safe conversion that keeps its lifetime `'a`, which options
//! holding a mask or bias need.

use nalgebra::constraint::{DimEq, ShapeConstraint};
use nalgebra::{
    DMatrixViewMut, Dim, Dyn, Matrix, RawStorage, RawStorageMut, Scalar, ViewStorage,
    ViewStorageMut,
};

use crate::options::MatRef;

/// A mutably borrowed matrix with any row and column strides: what
/// [`scaled_dot_product_attention_into`](crate::scaled_dot_product_attention_into) writes.
/// `&mut DMatrix<T>`, a column block of a wider matrix (`out.columns_mut(c, d)`, e.g. one
/// head's columns) and views with other strides all convert into it without a copy.
pub type MatMut<'a, T> = DMatrixViewMut<'a, T, Dyn, Dyn>;

mod sealed {
    pub trait Sealed {}
}

/// A matrix this crate can read without copying: `&M` for any nalgebra matrix or view `M`,
/// or a view by value (`q.columns(c, d)`, `k.rows(0, n)`, `m.as_view()`, a transposed or
/// broadcast view). Sealed: implemented only for those.
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention, AttentionOptions};
/// use nalgebra::DMatrix;
///
/// // Two heads of width 2 side by side; attention on the second head's columns, passed
/// // as views by value or by reference alike.
/// let q = DMatrix::<f64>::from_fn(3, 4, |i, j| (i + j) as f64 * 0.1);
/// let opts = AttentionOptions::new();
/// let by_value = scaled_dot_product_attention(q.columns(2, 2), q.columns(2, 2), q.columns(2, 2), &opts)?;
/// let by_ref = scaled_dot_product_attention(&q.columns(2, 2), &q.columns(2, 2), &q.columns(2, 2), &opts)?;
/// assert_eq!(by_value, by_ref);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub trait AsMatRef<'a, T>: sealed::Sealed {
    /// The same matrix as a [`MatRef`] (dynamic shape and strides), without a copy.
    fn into_mat_ref(self) -> MatRef<'a, T>;
}

/// A matrix this crate can write in place: `&mut M` for any nalgebra matrix or mutable
/// view `M`, or a mutable view by value (`out.columns_mut(c, d)`). Sealed: implemented only
/// for those.
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention_into, AttentionOptions};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::from_fn(3, 4, |i, j| (i * j) as f32 * 0.1);
/// let mut out = DMatrix::from_element(3, 4, f32::NAN);
/// // Each head of width 2 writes its own columns of the shared output.
/// for h in 0..2 {
///     let head = q.columns(2 * h, 2);
///     scaled_dot_product_attention_into(head, head, head, &AttentionOptions::new(), out.columns_mut(2 * h, 2))?;
/// }
/// assert!(out.iter().all(|x| x.is_finite()));
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub trait AsMatMut<'a, T>: sealed::Sealed {
    /// The same matrix as a [`MatMut`] (dynamic shape and strides), without a copy.
    fn into_mat_mut(self) -> MatMut<'a, T>;
}

impl<T, R: Dim, C: Dim, S: RawStorage<T, R, C>> sealed::Sealed for &Matrix<T, R, C, S> {}

impl<'a, T, R, C, S> AsMatRef<'a, T> for &'a Matrix<T, R, C, S>
where
    T: Scalar,
    R: Dim,
    C: Dim,
    S: RawStorage<T, R, C>,
    ShapeConstraint:
        DimEq<R, Dyn> + DimEq<C, Dyn> + DimEq<Dyn, S::RStride> + DimEq<Dyn, S::CStride>,
{
    #[inline]
    fn into_mat_ref(self) -> MatRef<'a, T> {
        self.into()
    }
}

impl<T, R: Dim, C: Dim, RS: Dim, CS: Dim> sealed::Sealed
    for Matrix<T, R, C, ViewStorage<'_, T, R, C, RS, CS>>
{
}

impl<'a, T, R, C, RS, CS> AsMatRef<'a, T> for Matrix<T, R, C, ViewStorage<'a, T, R, C, RS, CS>>
where
    T: Scalar,
    R: Dim,
    C: Dim,
    RS: Dim,
    CS: Dim,
{
    #[inline]
    fn into_mat_ref(self) -> MatRef<'a, T> {
        let (nrows, ncols) = self.shape();
        let (rs, cs) = self.strides();
        // SAFETY: the pointer, shape and strides are those of `self`, a view valid for
        // reads for `'a` (nalgebra checked them when it was made); only their types change
        // (static → `Dyn`), which does not change the addresses it reads.
        let data = unsafe {
            ViewStorage::from_raw_parts(
                self.data.ptr(),
                (Dyn(nrows), Dyn(ncols)),
                (Dyn(rs), Dyn(cs)),
            )
        };
        Matrix::from_data(data)
    }
}

impl<T, R: Dim, C: Dim, S: RawStorageMut<T, R, C>> sealed::Sealed for &mut Matrix<T, R, C, S> {}

impl<'a, T, R, C, S> AsMatMut<'a, T> for &'a mut Matrix<T, R, C, S>
where
    T: Scalar,
    R: Dim,
    C: Dim,
    S: RawStorageMut<T, R, C>,
    ShapeConstraint:
        DimEq<R, Dyn> + DimEq<C, Dyn> + DimEq<Dyn, S::RStride> + DimEq<Dyn, S::CStride>,
{
    #[inline]
    fn into_mat_mut(self) -> MatMut<'a, T> {
        self.into()
    }
}

impl<T, R: Dim, C: Dim, RS: Dim, CS: Dim> sealed::Sealed
    for Matrix<T, R, C, ViewStorageMut<'_, T, R, C, RS, CS>>
{
}

impl<'a, T, R, C, RS, CS> AsMatMut<'a, T> for Matrix<T, R, C, ViewStorageMut<'a, T, R, C, RS, CS>>
where
    T: Scalar,
    R: Dim,
    C: Dim,
    RS: Dim,
    CS: Dim,
{
    #[inline]
    fn into_mat_mut(mut self) -> MatMut<'a, T> {
        let (nrows, ncols) = self.shape();
        let (rs, cs) = self.strides();
        let ptr = self.data.ptr_mut();
        // SAFETY: the pointer, shape and strides are those of `self`, a view valid for
        // reads and writes for `'a`; `self` is consumed, so the new view is the only one
        // to that memory, as `self` was. Only the dimension types change.
        let data = unsafe {
            ViewStorageMut::from_raw_parts(ptr, (Dyn(nrows), Dyn(ncols)), (Dyn(rs), Dyn(cs)))
        };
        Matrix::from_data(data)
    }
}

/// The block `rows × columns` of `m`, for as long as `m` itself.
///
/// nalgebra's `m.view(..)` borrows `m` (a local), so its result cannot outlive the call
/// that made it; a multi-head call keeps one block of Q, K and V per head.
///
/// # Panics
/// If the block is not inside `m` (callers pass blocks of a validated layout).
pub(crate) fn block<'a, T: Scalar>(
    m: MatRef<'a, T>,
    rows: std::ops::Range<usize>,
    columns: std::ops::Range<usize>,
) -> MatRef<'a, T> {
    assert!(rows.start <= rows.end && rows.end <= m.nrows());
    assert!(columns.start <= columns.end && columns.end <= m.ncols());
    let (rs, cs) = m.strides();
    let (nrows, ncols) = (rows.len(), columns.len());
    let ptr = if nrows == 0 || ncols == 0 {
        m.data.ptr()
    } else {
        // In bounds: (rows.start, columns.start) is an element of `m`.
        std::ptr::from_ref(&m[(rows.start, columns.start)])
    };
    // SAFETY: the block's elements are elements of `m` (asserted above), which is valid
    // for reads for `'a`; an empty block reads nothing.
    let data =
        unsafe { ViewStorage::from_raw_parts(ptr, (Dyn(nrows), Dyn(ncols)), (Dyn(rs), Dyn(cs))) };
    Matrix::from_data(data)
}

/// `m` transposed: the same elements as a `ncols × nrows` view (strides swapped), for as
/// long as `m` itself. The decoding kernel reads values stored token by token (rows
/// contiguous) through it as columns.
pub(crate) fn transposed<T: Scalar>(m: MatRef<'_, T>) -> MatRef<'_, T> {
    let (nrows, ncols) = m.shape();
    let (rs, cs) = m.strides();
    // SAFETY: element (i, j) of the result is element (j, i) of `m`, at the same address
    // (`ptr + j·rs + i·cs`): it reads exactly `m`'s elements, valid for reads for `'a`.
    let data = unsafe {
        ViewStorage::from_raw_parts(m.data.ptr(), (Dyn(ncols), Dyn(nrows)), (Dyn(cs), Dyn(rs)))
    };
    Matrix::from_data(data)
}

/// The blocks `rows[r] × columns[c]` of `m`, in the order `(r, c)` row-major: mutable views
/// that may be written at the same time (from different threads).
///
/// # Panics
/// If a block is not inside `m`, or two row ranges or two column ranges overlap.
pub(crate) fn split_blocks<'a, T: Scalar>(
    mut m: MatMut<'a, T>,
    rows: &[std::ops::Range<usize>],
    columns: &[std::ops::Range<usize>],
) -> Vec<MatMut<'a, T>> {
    let disjoint = |ranges: &[std::ops::Range<usize>], len: usize| {
        let mut sorted: Vec<_> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
        sorted.sort_by_key(|r| r.start);
        ranges.iter().all(|r| r.start <= r.end && r.end <= len)
            && sorted.windows(2).all(|w| w[0].end <= w[1].start)
    };
    assert!(disjoint(rows, m.nrows()) && disjoint(columns, m.ncols()));
    let (rs, cs) = m.strides();
    let base = m.data.ptr_mut();
    let mut blocks = Vec::with_capacity(rows.len() * columns.len());
    for r in rows {
        for c in columns {
            let (nrows, ncols) = (r.len(), c.len());
            let ptr = if nrows == 0 || ncols == 0 {
                base
            } else {
                // SAFETY: (r.start, c.start) is an element of `m` (asserted above), so the
                // offset stays inside its allocation.
                unsafe { base.add(r.start * rs + c.start * cs) }
            };
            // SAFETY: each block's elements are elements of `m`, valid for reads and writes
            // for `'a`, and `m` is consumed. Mutable nalgebra views never alias (their
            // constructors reject overlapping strides), so blocks whose row ranges or
            // column ranges are disjoint (asserted above; empty blocks touch nothing) share
            // no element: each returned view is the only one to its memory.
            let data = unsafe {
                ViewStorageMut::from_raw_parts(ptr, (Dyn(nrows), Dyn(ncols)), (Dyn(rs), Dyn(cs)))
            };
            blocks.push(Matrix::from_data(data));
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    /// `transposed` reads element (j, i) at (i, j), for a matrix, a column block and a
    /// row-strided view.
    #[test]
    fn transposed_swaps_the_indices() {
        let a = DMatrix::<f64>::from_fn(5, 6, |i, j| (10 * i + j) as f64);
        let views: [MatRef<'_, f64>; 3] = [
            (&a).into(),
            a.columns(2, 3).into_mat_ref(),
            a.rows_with_step(0, 3, 1).into_mat_ref(),
        ];
        for m in views {
            let t = transposed(m);
            assert_eq!(t.shape(), (m.ncols(), m.nrows()));
            for i in 0..m.nrows() {
                for j in 0..m.ncols() {
                    assert_eq!(t[(j, i)], m[(i, j)]);
                }
            }
        }
    }

    /// By value and by reference, every stride kind reads the same elements.
    #[test]
    fn views_by_value_and_by_reference_agree() {
        let a = DMatrix::<f64>::from_fn(5, 6, |i, j| (10 * i + j) as f64);
        let expect = |m: MatRef<'_, f64>, r0: usize, c0: usize, t: bool| {
            for i in 0..m.nrows() {
                for j in 0..m.ncols() {
                    let (r, c) = if t {
                        (c0 + j, r0 + i)
                    } else {
                        (r0 + i, c0 + j)
                    };
                    assert_eq!(m[(i, j)], a[(r, c)]);
                }
            }
        };
        expect(a.columns(2, 3).into_mat_ref(), 0, 2, false);
        expect((&a.columns(2, 3)).into_mat_ref(), 0, 2, false);
        expect(a.rows(1, 3).into_mat_ref(), 1, 0, false);
        expect(a.view((1, 1), (3, 2)).into_mat_ref(), 1, 1, false);
        expect(a.fixed_view::<2, 2>(3, 4).into_mat_ref(), 3, 4, false);
        expect(a.row(4).into_mat_ref(), 4, 0, false);
        expect((&a).into_mat_ref(), 0, 0, false);
        let mut b = a.clone();
        let mut view = b.columns_mut(1, 2).into_mat_mut();
        view[(4, 1)] = -1.0;
        assert_eq!(b[(4, 2)], -1.0);
        (&mut b).into_mat_mut()[(0, 0)] = -2.0;
        assert_eq!(b[(0, 0)], -2.0);
    }
}
