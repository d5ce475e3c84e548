//! Scheduling of the block kernel: pack K and V once, size groups of query blocks so that
//! each group reuses a cache-sized super-block of K and V, run the groups on the calling
//! thread or over rayon's pool, and copy the staged blocks into the output. The partition
//! of the work and the order of every sum depend only on the problem's sizes, so results
//! are bitwise identical for any number of threads.

use nalgebra::{Dyn, U1};
use rayon::prelude::*;

use super::pack::{pack_keys, pack_values, set_len};
use super::{Job, Workspace, block, simd};
use crate::cpu::CpuPath;
use crate::error::Operand;
use crate::spec::Spec;
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// About how many bytes of K and V a group of query blocks keeps in cache, and how many
/// its own Qᵀ and accumulators take (each well inside a 1 MiB L2).
const GROUP_BYTES: usize = 256 << 10;

/// The fused path: pack K and V, run the block kernel over groups of query blocks (in
/// parallel if asked), copy the staged blocks into `out`.
pub(super) fn fused<T: Element>(
    spec: Spec<'_, T>,
    path: CpuPath,
    parallel: bool,
    ws: &mut Workspace<T>,
    out: &mut MatMut<'_, T>,
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let (n_q, d_k, d_v) = (spec.n_q, spec.d_k, spec.d_v);
    let kernel = T::kernel(path);
    let bq = kernel.bq;
    let dvp = pack(&spec, &kernel, parallel, ws)?;

    // Block qb writes its output to staging[qb][c][r] (d_v × bq; at least one column so
    // that the chunks below are never empty).
    let n_blocks = n_q.div_ceil(bq);
    let block_len = bq * d_v.max(1);
    // Every element a block's rows map to is written by the kernel before it is read, so
    // the buffer is only grown, never cleared (no serial zero-fill before the threads).
    set_len(
        &mut ws.staging,
        n_blocks.saturating_mul(block_len),
        Operand::Output,
    )?;

    let (group, super_keys) = group_size(&spec, &kernel, dvp, n_blocks, parallel);
    let job = Job {
        spec,
        kp: &ws.kp,
        vp: &ws.vp,
        v_unscale: &ws.v_unscale,
        dvp,
        super_keys,
    };
    let run = |(g, (staged, lse)): (usize, (&mut [T], &mut [T]))| {
        T::with_scratch(|scratch| {
            scratch.fit(&kernel, d_k, dvp, group);
            (kernel.block)(&job, g * group, scratch, staged, lse)
        })
    };
    // `and` keeps the leftmost error: the first in query order, whatever the threads.
    let (group_len, group_rows) = (group * block_len, group * bq);
    let result = if parallel && n_blocks > group {
        ws.staging
            .par_chunks_mut(group_len)
            .zip(lse.par_chunks_mut(group_rows))
            .enumerate()
            .map(run)
            .reduce(|| Ok(()), Result::and)
    } else {
        let groups = ws
            .staging
            .chunks_mut(group_len)
            .zip(lse.chunks_mut(group_rows));
        groups.enumerate().map(run).fold(Ok(()), Result::and)
    };
    result?;
    unstage(&ws.staging, bq, block_len, out);
    Ok(())
}

/// Packs K and V into the workspace for `kernel`; returns `dvp`, V's padded row length.
/// Values near the type's maximum: each such column is packed scaled down by a power of
/// two (so Σ p_j·v_j cannot overflow) and its output scaled back up, exactly.
fn pack<T: Element>(
    spec: &Spec<'_, T>,
    kernel: &simd::Kernel<T>,
    parallel: bool,
    ws: &mut Workspace<T>,
) -> Result<usize, AttentionError> {
    let n_kv_pad = spec.n_kv.div_ceil(kernel.mr) * kernel.mr;
    let dvp = spec.d_v.div_ceil(kernel.mrv) * kernel.mrv;
    pack_keys(&spec.k, kernel.mr, n_kv_pad, parallel, &mut ws.kp)?;
    ws.v_unscale.clear();
    ws.v_scale.clear();
    for (scale, unscale) in spec.value_scales() {
        ws.v_scale.push(scale);
        ws.v_unscale.push(unscale);
    }
    pack_values(&spec.v, dvp, n_kv_pad, parallel, &ws.v_scale, &mut ws.vp)?;
    Ok(dvp)
}

/// Query blocks per group and keys per super-block.
///
/// Groups of query blocks share each super-block of K and V while it is in cache (see
/// `block::q_group`): a group's Qᵀ and accumulators, and a super-block of K and V, each
/// take about `GROUP_BYTES`. Keep at least 4 groups per thread for balance. (The
/// accumulators are counted at T's size although the running sums are f64: a group's
/// working set then still fits a 1 MiB L2, and counting them at their full size made
/// groups smaller, which cost 3% at f32, d = 128, n = 4096 when measured.)
fn group_size<T: Element>(
    spec: &Spec<'_, T>,
    kernel: &simd::Kernel<T>,
    dvp: usize,
    n_blocks: usize,
    parallel: bool,
) -> (usize, usize) {
    let elem = std::mem::size_of::<T>();
    let per_block = (spec.d_k + dvp).max(1) * kernel.bq * elem;
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // Under a causal or window band, blocks differ in work (a causal block's work grows
    // with its index), so more, smaller groups let work stealing even the threads out.
    let groups_per_thread = if spec.band.is_bounded() { 16 } else { 4 };
    let group = (GROUP_BYTES / per_block)
        .min(n_blocks / (groups_per_thread * threads))
        .clamp(1, block::MAX_GROUP);
    let super_keys = (GROUP_BYTES / ((spec.d_k + dvp).max(1) * elem)).max(kernel.bk);
    (group, super_keys)
}

/// Copies the staged blocks (`staging[qb][c][r]`) into `out`, which may be a column block
/// of a wider matrix (any strides): nalgebra's column iterator steps by the row stride, 1
/// for a matrix or a block of its columns.
fn unstage<T: Element>(staging: &[T], bq: usize, block_len: usize, out: &mut MatMut<'_, T>) {
    let (n_q, d_v) = out.shape();
    if out.strides().0 == 1 {
        // Contiguous columns (a matrix, or a block of its columns): whole runs at once.
        let mut unit = out.as_view_mut::<Dyn, Dyn, U1, Dyn>();
        for c in 0..d_v {
            let mut column = unit.column_mut(c);
            let column = column.as_mut_slice();
            for qb in 0..n_q.div_ceil(bq) {
                let (r0, start) = (qb * bq, qb * block_len + c * bq);
                let len = bq.min(n_q - r0);
                column[r0..r0 + len].copy_from_slice(&staging[start..start + len]);
            }
        }
        return;
    }
    for c in 0..d_v {
        for qb in 0..n_q.div_ceil(bq) {
            let (r0, start) = (qb * bq, qb * block_len + c * bq);
            let len = bq.min(n_q - r0);
            let mut seg = out.view_mut((r0, c), (len, 1));
            for (dst, &x) in seg.iter_mut().zip(&staging[start..start + len]) {
                *dst = x;
            }
        }
    }
}
