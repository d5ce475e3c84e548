//! Packing: K in panels of `MR` keys and V in rows padded to whole register tiles, the
//! layouts the block kernel's micro-kernels read (see `Job`). Done once per call, in
//! parallel chunks when the call is parallel; one packed K/V serves every query block.

use nalgebra::{Dyn, U1};
use rayon::prelude::*;

use crate::columns::for_each_column;
use crate::error::Operand;
use crate::memory::try_resize;
use crate::options::MatRef;
use crate::{AttentionError, Element};

/// Sets `buf`'s length to `len`, keeping old contents (growing with zeros): for buffers
/// whose every used element is written before it is read.
/// `TooLarge` (naming `operand`) if the memory cannot be had.
pub(crate) fn set_len<T: Element>(
    buf: &mut Vec<T>,
    len: usize,
    operand: Operand,
) -> Result<(), AttentionError> {
    if buf.len() < len {
        try_resize(buf, len, T::zero(), operand)
    } else {
        buf.truncate(len);
        Ok(())
    }
}

/// Keys per packing task: K and V are packed in chunks this long, in parallel when the
/// call is.
const PACK_ROWS: usize = 256;

/// Packs K in panels of `mr` keys, `kp[j/mr][p][j%mr] = K[j, p]`, zero past `n_kv`. Each
/// chunk of `PACK_ROWS` keys reads `K`'s columns in contiguous runs.
pub(super) fn pack_keys<T: Element>(
    k: &MatRef<'_, T>,
    mr: usize,
    n_kv_pad: usize,
    parallel: bool,
    kp: &mut Vec<T>,
) -> Result<(), AttentionError> {
    let (n_kv, d_k) = k.shape();
    set_len(kp, n_kv_pad.saturating_mul(d_k), Operand::Key)?;
    let rows = PACK_ROWS.div_ceil(mr) * mr; // whole panels per chunk
    // Each chunk writes every one of its elements, padding keys included (as 0).
    let fill = |(c, chunk): (usize, &mut [T])| {
        let j0 = (c * rows).min(n_kv);
        let jn = rows.min(n_kv - j0);
        let chunk_keys = chunk.len() / d_k.max(1);
        for_each_column(k, j0..j0 + jn, &mut Vec::new(), |p, col| {
            // Key dj of the chunk goes to panel dj / mr, lane dj % mr, row p.
            match mr {
                6 => panels::<T, 6>(col, chunk, d_k, p),
                4 => panels::<T, 4>(col, chunk, d_k, p),
                _ => {
                    for (panel, keys) in col.chunks(mr).enumerate() {
                        let dst = &mut chunk[panel * mr * d_k + p * mr..][..mr];
                        dst[..keys.len()].copy_from_slice(keys);
                        dst[keys.len()..].fill(T::zero());
                    }
                }
            }
            // Whole padding panels past the last key.
            for panel in jn.div_ceil(mr)..chunk_keys / mr {
                chunk[panel * mr * d_k + p * mr..][..mr].fill(T::zero());
            }
        });
    };
    if parallel {
        kp.par_chunks_mut(rows * d_k.max(1))
            .enumerate()
            .for_each(fill);
    } else {
        kp.chunks_mut(rows * d_k.max(1)).enumerate().for_each(fill);
    }
    Ok(())
}

/// Row `p` of every panel of `MR` keys from `col` (key `dj` of the column to panel
/// `dj / MR`, lane `dj % MR`; lanes past the column's end zero). With `MR` a constant each
/// panel's keys are one register move: `copy_from_slice` of a run `mr` long was a call to
/// `memcpy` per panel, most of the packing time for small calls (f32 n 64 d 64 on Zen 5).
#[inline(always)]
fn panels<T: Element, const MR: usize>(col: &[T], chunk: &mut [T], d_k: usize, p: usize) {
    let (whole, rest) = col.as_chunks::<MR>();
    for (panel, keys) in whole.iter().enumerate() {
        let dst: &mut [T; MR] = (&mut chunk[panel * MR * d_k + p * MR..][..MR])
            .try_into()
            .expect("MR elements");
        *dst = *keys;
    }
    if !rest.is_empty() {
        let dst = &mut chunk[whole.len() * MR * d_k + p * MR..][..MR];
        dst[..rest.len()].copy_from_slice(rest);
        dst[rest.len()..].fill(T::zero());
    }
}

/// Packs V row-major with rows padded to `dvp`: `vp[j][c] = V[j, c]`, zero padding.
/// `scale`, if not empty, multiplies each column (by a power of two: exact).
pub(super) fn pack_values<T: Element>(
    v: &MatRef<'_, T>,
    dvp: usize,
    n_kv_pad: usize,
    parallel: bool,
    scale: &[T],
    vp: &mut Vec<T>,
) -> Result<(), AttentionError> {
    let (n_kv, d_v) = v.shape();
    set_len(vp, n_kv_pad.saturating_mul(dvp), Operand::Value)?;
    // Each chunk writes every one of its elements, padding rows and columns included (0).
    let fill = |(c, chunk): (usize, &mut [T])| {
        // The last chunk may hold only padding rows (n_kv_pad is rounded up to a panel of
        // K, not to PACK_ROWS): it then starts at or past n_kv and reads no value.
        let j0 = (c * PACK_ROWS).min(n_kv);
        let jn = PACK_ROWS.min(n_kv - j0);
        let chunk_rows = chunk.len() / dvp.max(1);
        for dj in 0..chunk_rows {
            let first_pad = if dj < jn { d_v } else { 0 };
            chunk[dj * dvp + first_pad..(dj + 1) * dvp].fill(T::zero());
        }
        if v.strides().0 == 1 {
            // Contiguous columns: 16 at a time, so that each row of the chunk is written
            // in whole cache lines (column by column, every line was written 16 times, in
            // 16 passes over a chunk larger than the level-1 cache).
            let unit = v.as_view::<Dyn, Dyn, U1, Dyn>();
            for c0 in (0..d_v).step_by(16) {
                let width = 16.min(d_v - c0);
                // On the stack, not collected: a warm call allocates nothing.
                let columns: [_; 16] = std::array::from_fn(|t| unit.column(c0 + t.min(width - 1)));
                let runs: [&[T]; 16] = std::array::from_fn(|t| &columns[t].as_slice()[j0..j0 + jn]);
                // Blocks of 8 rows × 16 columns, read as 16 runs of 8 and written as 8
                // runs of 16 (element by element, with a branch per element, this was a
                // quarter of an f32 n 64 d 64 call on Zen 5); the rows after them, and
                // every row of narrower or scaled column groups, one at a time below.
                let blocked = if scale.is_empty() && width == 16 {
                    let whole = jn / 8 * 8;
                    for dj in (0..whole).step_by(8) {
                        let block: [[T; 8]; 16] = std::array::from_fn(|t| {
                            runs[t][dj..dj + 8].try_into().expect("8 rows")
                        });
                        for r in 0..8 {
                            let row: &mut [T; 16] = (&mut chunk[(dj + r) * dvp + c0..][..16])
                                .try_into()
                                .expect("16 columns");
                            *row = std::array::from_fn(|t| block[t][r]);
                        }
                    }
                    whole
                } else {
                    0
                };
                let rows = chunk[..jn * dvp].chunks_exact_mut(dvp).enumerate();
                if scale.is_empty() {
                    for (dj, row) in rows.skip(blocked) {
                        for (x, run) in row[c0..c0 + width].iter_mut().zip(&runs) {
                            *x = run[dj];
                        }
                    }
                } else {
                    let sc = &scale[c0..c0 + width];
                    for (dj, row) in rows {
                        for ((x, run), &sc) in row[c0..c0 + width].iter_mut().zip(&runs).zip(sc) {
                            *x = run[dj] * sc;
                        }
                    }
                }
            }
            return;
        }
        for_each_column(v, j0..j0 + jn, &mut Vec::new(), |col, values| {
            let sc = scale.get(col).copied();
            for (dj, &x) in values.iter().enumerate() {
                chunk[dj * dvp + col] = match sc {
                    None => x,
                    Some(sc) => x * sc,
                };
            }
        });
    };
    if parallel {
        vp.par_chunks_mut(PACK_ROWS * dvp.max(1))
            .enumerate()
            .for_each(fill);
    } else {
        vp.chunks_mut(PACK_ROWS * dvp.max(1))
            .enumerate()
            .for_each(fill);
    }
    Ok(())
}
