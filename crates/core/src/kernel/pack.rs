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
pub(super) fn set_len<T: Element>(
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
            for (panel, keys) in col.chunks(mr).enumerate() {
                let dst = &mut chunk[panel * mr * d_k + p * mr..][..mr];
                dst[..keys.len()].copy_from_slice(keys);
                dst[keys.len()..].fill(T::zero());
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
                for dj in 0..jn {
                    let row = &mut chunk[dj * dvp + c0..][..width];
                    for (t, (x, run)) in row.iter_mut().zip(&runs).enumerate() {
                        *x = match scale.get(c0 + t) {
                            None => run[dj],
                            Some(&sc) => run[dj] * sc,
                        };
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
