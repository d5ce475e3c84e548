//! Packing: K in panels of `MR` keys and V in panels of `MRV` value columns, the
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

/// Packs V in panels of `mrv` value columns, `vp[c/mrv][j][c%mrv] = V[j, c]`, each panel
/// `n_kv_pad·mrv` long, zero past `n_kv` and `d_v` (`dvp`, a multiple of `mrv`, is `d_v`
/// rounded up). `scale`, if not empty, multiplies each column (by a power of two: exact).
///
/// A `P·V` register tile reads `mrv` columns over a step's keys: in panels they are one
/// contiguous run, as the score tiles read K. Row-major, they were one value every `dvp`
/// elements, a new cache line per key, and the `P·V` loop ran 20–25% slower than the
/// score loop with the same FMAs on an Ice Lake Xeon (`docs/PERFORMANCE.md`, "V in
/// column panels").
pub(super) fn pack_values<T: Element>(
    v: &MatRef<'_, T>,
    mrv: usize,
    dvp: usize,
    n_kv_pad: usize,
    parallel: bool,
    scale: &[T],
    vp: &mut Vec<T>,
) -> Result<(), AttentionError> {
    let (n_kv, d_v) = v.shape();
    assert!((1..=8).contains(&mrv) && dvp.is_multiple_of(mrv) && dvp >= d_v && n_kv_pad >= n_kv);
    set_len(vp, n_kv_pad.saturating_mul(dvp), Operand::Value)?;
    let panel_len = n_kv_pad * mrv;
    if panel_len == 0 {
        return Ok(());
    }
    // Chunk `c` of panel `t`: keys from `c·PACK_ROWS`, every element written (padding as 0).
    let fill = |t: usize, c: usize, chunk: &mut [T]| {
        let j0 = c * PACK_ROWS;
        let rows = chunk.len() / mrv;
        let jn = rows.min(n_kv.saturating_sub(j0));
        let c0 = t * mrv;
        let width = mrv.min(d_v - c0);
        chunk[jn * mrv..].fill(T::zero());
        if jn == 0 {
            return;
        }
        let mut bufs: [Vec<T>; 8] = Default::default();
        let unit = (v.strides().0 == 1).then(|| v.as_view::<Dyn, Dyn, U1, Dyn>());
        if unit.is_none() {
            for (m, buf) in bufs.iter_mut().enumerate().take(width) {
                buf.extend((j0..j0 + jn).map(|j| v[(j, c0 + m)]));
            }
        }
        let views: [_; 8] = std::array::from_fn(|m| {
            unit.as_ref()
                .filter(|_| m < width)
                .map(|unit| unit.column(c0 + m))
        });
        // Column `c0 + m`'s keys `j0..j0 + jn` (copied into `bufs` if V's rows are strided).
        let columns: [&[T]; 8] = std::array::from_fn(|m| match &views[m] {
            Some(view) => &view.as_slice()[j0..j0 + jn],
            None => &bufs[m][..],
        });
        let rows = &mut chunk[..jn * mrv];
        match (mrv, width, scale.is_empty()) {
            (4, 4, true) => interleave::<T, 4>(&columns, rows),
            (6, 6, true) => interleave::<T, 6>(&columns, rows),
            _ => {
                for (dj, row) in rows.chunks_exact_mut(mrv).enumerate() {
                    for (m, x) in row.iter_mut().enumerate() {
                        *x = match (m < width, scale.get(c0 + m)) {
                            (true, None) => columns[m][dj],
                            (true, Some(&sc)) => columns[m][dj] * sc,
                            (false, _) => T::zero(),
                        };
                    }
                }
            }
        }
    };
    let each_panel = |(t, panel): (usize, &mut [T])| {
        if parallel {
            panel
                .par_chunks_mut(PACK_ROWS * mrv)
                .enumerate()
                .for_each(|(c, chunk)| fill(t, c, chunk));
        } else {
            for (c, chunk) in panel.chunks_mut(PACK_ROWS * mrv).enumerate() {
                fill(t, c, chunk);
            }
        }
    };
    if parallel {
        vp.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(each_panel);
    } else {
        vp.chunks_mut(panel_len).enumerate().for_each(each_panel);
    }
    Ok(())
}

/// `rows[dj][m] = columns[m][dj]` for `MR` whole columns: with `MR` a constant each row is
/// one small store, not `MR` bounds-checked ones.
#[inline(always)]
fn interleave<T: Element, const MR: usize>(columns: &[&[T]; 8], rows: &mut [T]) {
    let cols: [&[T]; MR] = std::array::from_fn(|m| columns[m]);
    let (rows, _) = rows.as_chunks_mut::<MR>();
    for (dj, row) in rows.iter_mut().enumerate() {
        *row = std::array::from_fn(|m| cols[m][dj]);
    }
}
