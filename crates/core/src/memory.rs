//! Fallible allocation: every buffer whose size comes from the caller's shapes is reserved
//! with `try_reserve`, so that an impossible size (`n = 200000` weights, a `2^62 × 0` view)
//! is an [`AttentionError::TooLarge`], never an abort or a "capacity overflow" panic.

use nalgebra::{DMatrix, DVector, Dyn, Scalar, VecStorage};

use crate::error::{AttentionError, Operand};

/// `Err(TooLarge)` for `operand`, of `rows × columns` elements.
pub(crate) fn too_large(operand: Operand, rows: usize, columns: usize) -> AttentionError {
    AttentionError::TooLarge {
        operand,
        rows,
        columns,
    }
}

/// Sets `buf`'s length to `len`, keeping old contents and growing with `fill`, or fails
/// without changing it if the memory cannot be had.
pub(crate) fn try_resize<T: Clone>(
    buf: &mut Vec<T>,
    len: usize,
    fill: T,
    operand: Operand,
) -> Result<(), AttentionError> {
    if len > buf.len() {
        buf.try_reserve(len - buf.len())
            .map_err(|_| too_large(operand, len, 1))?;
    }
    buf.resize(len, fill);
    Ok(())
}

/// A `rows × columns` matrix filled with `fill`, or `TooLarge` if it cannot be allocated
/// (including when `rows · columns` overflows `usize`).
pub(crate) fn try_matrix<T: Scalar>(
    rows: usize,
    columns: usize,
    fill: T,
    operand: Operand,
) -> Result<DMatrix<T>, AttentionError> {
    let len = rows
        .checked_mul(columns)
        .filter(|&n| {
            n.checked_mul(std::mem::size_of::<T>())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| too_large(operand, rows, columns))?;
    let mut data = Vec::new();
    data.try_reserve_exact(len)
        .map_err(|_| too_large(operand, rows, columns))?;
    data.resize(len, fill);
    // `from_data` takes the vector as it is (`from_vec` collects it again through an
    // iterator: a call and checks that showed in the 2 × 2 seed call).
    Ok(DMatrix::from_data(VecStorage::new(
        Dyn(rows),
        Dyn(columns),
        data,
    )))
}

/// A vector of `len` entries filled with `fill`, or `TooLarge`.
pub(crate) fn try_vector<T: Scalar>(
    len: usize,
    fill: T,
    operand: Operand,
) -> Result<DVector<T>, AttentionError> {
    let m = try_matrix(len, 1, fill, operand)?;
    Ok(DVector::from_vec(m.data.into()))
}
