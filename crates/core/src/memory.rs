//! Fallible allocation: every buffer whose size comes from the caller's shapes is reserved
//! with `try_reserve`, so that an impossible size (`n = 200000` weights, a `2^62 × 0` view)
//! is an [`AttentionError::TooLarge`], never an abort or a "capacity overflow" panic.

use nalgebra::{DMatrix, DVector, Dyn, VecStorage};

use crate::Element;
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

/// Bytes from which a matrix of zeros is taken as zeroed memory ([`try_matrix`]): below,
/// the allocator hands out reused memory that `calloc` clears itself, which cost the 2 × 2
/// seed call about 60 instructions more than writing its four zeros.
const ZEROED_MIN_BYTES: usize = 64 << 10;

/// A `rows × columns` matrix filled with `fill`, or `TooLarge` if it cannot be allocated
/// (including when `rows · columns` overflows `usize`).
///
/// A fill of +0 of at least [`ZEROED_MIN_BYTES`] is asked of the allocator as zeroed
/// memory ([`try_zeroed`]), not written: such a buffer then comes from the operating
/// system already zero, page by page as it is first written, by whichever thread writes
/// it. Filled entry by entry, a packed batch's 122 MB output (64 sequences, 8 heads, f32)
/// took 7% of the call's samples on one thread, the fill and its page faults, while the
/// other waited.
pub(crate) fn try_matrix<T: Element>(
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
    let zeroed = fill.to_f64().to_bits() == 0 && len >= ZEROED_MIN_BYTES / size_of::<T>();
    let data = if zeroed {
        try_zeroed(len)
    } else {
        try_filled(len, fill)
    }
    .ok_or_else(|| too_large(operand, rows, columns))?;
    // `from_data` takes the vector as it is (`from_vec` collects it again through an
    // iterator: a call and checks that showed in the 2 × 2 seed call).
    Ok(DMatrix::from_data(VecStorage::new(
        Dyn(rows),
        Dyn(columns),
        data,
    )))
}

/// `len` entries of `fill`, written one by one, or `None` if they cannot be had.
fn try_filled<T: Element>(len: usize, fill: T) -> Option<Vec<T>> {
    let mut data = Vec::new();
    data.try_reserve_exact(len).ok()?;
    data.resize(len, fill);
    Some(data)
}

/// `len` entries of +0 from the allocator's zeroed memory, or `None` if it cannot be had.
/// The caller has checked that `len · size_of::<T>() ≤ isize::MAX`. Out of line (large
/// buffers only): inlined, it kept the 2 × 2 seed call's caller from being inlined.
#[cold]
#[inline(never)]
fn try_zeroed<T: Element>(len: usize) -> Option<Vec<T>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).ok()?;
    // SAFETY: `layout` has a non-zero size (`len ≥ 1` entries of f32 or f64).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` entries of T
    // (its alignment, `len · size_of::<T>()` bytes), so `len` is its capacity, and all
    // `len` entries are initialised: all-zero bits, which is +0 in f32 and f64, the only
    // `Element` types (the trait is sealed). The vector owns the allocation from here.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// A vector of `len` entries filled with `fill`, or `TooLarge`.
pub(crate) fn try_vector<T: Element>(
    len: usize,
    fill: T,
    operand: Operand,
) -> Result<DVector<T>, AttentionError> {
    let m = try_matrix(len, 1, fill, operand)?;
    Ok(DVector::from_vec(m.data.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry has exactly the bits of `fill` (so +0 and −0 are told apart).
    fn all_bits<T: Element>(m: &DMatrix<T>, fill: T) -> bool {
        m.iter()
            .all(|x| x.to_f64().to_bits() == fill.to_f64().to_bits())
    }

    #[test]
    fn zero_fills_come_zeroed_and_other_fills_are_written() {
        // Sizes from the allocator's small chunks to memory of its own (mapped pages),
        // allocated and freed in turn so that reused memory holds old values.
        for &(rows, cols) in &[(1, 1), (2, 2), (7, 13), (300, 301), (1024, 257), (0, 5)] {
            for _ in 0..3 {
                let filled = try_matrix(rows, cols, 3.5f64, Operand::Output).unwrap();
                assert!(all_bits(&filled, 3.5));
                drop(filled);
                let zeros = try_matrix(rows, cols, 0.0f64, Operand::Output).unwrap();
                assert_eq!(zeros.shape(), (rows, cols));
                assert!(all_bits(&zeros, 0.0));
                let negative = try_matrix(rows, cols, -0.0f32, Operand::Output).unwrap();
                assert!(all_bits(&negative, -0.0f32));
                let zeros = try_vector(rows * cols, 0.0f32, Operand::Lse).unwrap();
                assert!(zeros.iter().all(|x| x.to_bits() == 0));
            }
        }
    }

    #[test]
    fn sizes_that_cannot_be_had_are_too_large() {
        let too_large = |r: Result<DMatrix<f64>, AttentionError>| {
            matches!(
                std::hint::black_box(r),
                Err(AttentionError::TooLarge {
                    operand: Operand::Output,
                    ..
                })
            )
        };
        // `rows · columns` overflows; the bytes exceed isize::MAX; the allocator refuses
        // (2^62 bytes). Sizes and results pass through `black_box`: a buffer the program
        // never reads may otherwise be optimised away, its allocation assumed to succeed.
        for (rows, columns, fill) in [
            (usize::MAX, 2, 0.0),
            (1 << 61, 1, 0.0),
            (1 << 59, 1, 0.0),
            (1 << 59, 1, 1.0),
        ] {
            let rows = std::hint::black_box(rows);
            assert!(too_large(try_matrix(rows, columns, fill, Operand::Output)));
        }
    }
}
