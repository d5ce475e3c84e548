//! Scheduling of the block kernel: pack K and V once, size groups of query blocks so that
//! each group reuses a cache-sized super-block of K and V, run the groups on the calling
//! thread or over rayon's pool, each group writing its rows of the output. The partition
//! of the work and the order of every sum depend only on the problem's sizes, so results
//! are bitwise identical for any number of threads. Also [`each_index`], which runs the
//! decoding kernel's parts on the calling thread and the pool together.

use std::ops::Range;

use super::pack::{pack_keys, pack_values};
use super::{Job, Workspace, block, simd};
use crate::cpu::CpuPath;
use crate::spec::Spec;
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// About how many bytes of K and V a group of query blocks keeps in cache, and how many
/// its own Qᵀ and accumulators take (each well inside a 1 MiB L2).
const GROUP_BYTES: usize = 256 << 10;

/// The fused path on K and V packed by [`pack`] into `ws` (of the sizes `packed`): the
/// block kernel over groups of query blocks (in parallel if asked), each group writing its
/// rows of `out` and `lse` when its last tile is done. Query heads that share K and V
/// (grouped-query attention) are run one after the other on one packing.
pub(super) fn fused<T: Element>(
    spec: Spec<'_, T>,
    path: CpuPath,
    parallel: bool,
    (ws, packed): (&Workspace<T>, Packed),
    out: &mut MatMut<'_, T>,
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let (n_q, d_k, dvp) = (spec.n_q, spec.d_k, packed.dvp);
    let kernel = T::kernel(path);
    let bq = kernel.bq;

    let n_blocks = n_q.div_ceil(bq);
    // Under a causal band the short block goes first, where it has fewest keys
    // (`Job::block_rows`). Only where every block's key tiles start at key 0: then which
    // queries share a block changes no bit, and a call on a chunk of the rows that starts
    // at a multiple of 64 still gives those rows' bits of the whole call (`query_rows.rs`).
    let first_pad = if spec.band.bounds_only_above() {
        n_blocks * bq - n_q
    } else {
        0
    };
    let (group, super_keys) = group_size(&spec, &kernel, dvp, n_blocks, parallel);
    let job = Job {
        spec,
        kp: &ws.kp,
        vp: &ws.vp,
        v_unscale: &ws.v_unscale,
        dvp,
        v_panel: packed.v_panel,
        super_keys,
        first_pad,
    };
    let run = |g: usize, out: &mut MatMut<'_, T>, lse: &mut [T]| {
        T::with_scratch(|scratch| {
            scratch.fit(&kernel, d_k, dvp, group);
            (kernel.block)(&job, g * group, scratch, out, lse)
        })
    };
    let groups = 0..n_blocks.div_ceil(group);
    let parallel = parallel && n_blocks > group;
    // Group g's first query: that of its first block.
    let group_start = |g: usize| job.block_rows(g * group, bq).start;
    run_groups(
        groups,
        &group_start,
        out.rows_mut(0, n_q),
        lse,
        parallel,
        &run,
    )
}

/// Runs groups `groups`, whose rows of the output and lse are `out` and `lse` (group `g`'s
/// queries from `group_start(g)` to the next group's start, or the end): halves side by
/// side (`rayon::join`) down to single groups if `parallel`, else in order. Each group gets
/// its own rows as a view of its own (no buffers: a warm loop of calls allocates nothing).
/// The leftmost error is kept: the first in query order, whatever the threads.
fn run_groups<T: Element>(
    groups: Range<usize>,
    group_start: &(impl Fn(usize) -> usize + Sync),
    mut out: MatMut<'_, T>,
    lse: &mut [T],
    parallel: bool,
    run: &(impl Fn(usize, &mut MatMut<'_, T>, &mut [T]) -> Result<(), AttentionError> + Sync),
) -> Result<(), AttentionError> {
    // Rows of `out` and `lse` are counted from the first group's first query.
    let base = group_start(groups.start);
    let n = lse.len();
    if parallel && groups.len() > 1 {
        let mid = groups.start + groups.len() / 2;
        let split = group_start(mid) - base;
        let (top, bottom) = out.rows_range_pair_mut(0..split, split..n);
        let (lse_top, lse_bottom) = lse.split_at_mut(split);
        let (a, b) = rayon::join(
            || run_groups(groups.start..mid, group_start, top, lse_top, true, run),
            || run_groups(mid..groups.end, group_start, bottom, lse_bottom, true, run),
        );
        return a.and(b);
    }
    let mut result = Ok(());
    for g in groups.clone() {
        let r0 = group_start(g) - base;
        let r1 = if g + 1 < groups.end {
            group_start(g + 1) - base
        } else {
            n
        };
        let mut rows = out.rows_mut(r0, r1 - r0);
        result = result.and(run(g, &mut rows, &mut lse[r0..r1]));
    }
    result
}

/// The sizes of a packing (see `Job`): `dvp`, the value columns rounded up to whole
/// register tiles, and `v_panel`, the length of each panel of V (`n_kv_pad·MRV`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Packed {
    pub dvp: usize,
    pub v_panel: usize,
}

/// Packs K and V into the workspace for `path`'s block kernel; returns their sizes.
/// Values near the type's maximum: each such column is packed scaled down by a power of
/// two (so Σ p_j·v_j cannot overflow) and its output scaled back up, exactly. The packing
/// depends on K, V and `max|V|` only: every query head of a key/value head can use it.
pub(super) fn pack<T: Element>(
    spec: &Spec<'_, T>,
    path: CpuPath,
    parallel: bool,
    ws: &mut Workspace<T>,
) -> Result<Packed, AttentionError> {
    let kernel = &T::kernel(path);
    let n_kv_pad = spec.n_kv.div_ceil(kernel.mr) * kernel.mr;
    let dvp = spec.d_v.div_ceil(kernel.mrv) * kernel.mrv;
    pack_keys(&spec.k, kernel.mr, n_kv_pad, parallel, &mut ws.kp)?;
    ws.v_unscale.clear();
    ws.v_scale.clear();
    for (scale, unscale) in spec.value_scales() {
        ws.v_scale.push(scale);
        ws.v_unscale.push(unscale);
    }
    let mrv = kernel.mrv;
    pack_values(
        &spec.v,
        mrv,
        dvp,
        n_kv_pad,
        parallel,
        &ws.v_scale,
        &mut ws.vp,
    )?;
    Ok(Packed {
        dvp,
        v_panel: n_kv_pad * mrv,
    })
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

/// How long [`each_index`]'s caller spins for its helpers to finish before it sleeps.
const SPIN_MICROS: u64 = 100;

/// `[f(0), f(1), …, f(n − 1)]`, computed in parallel if `parallel`: the calling thread and
/// up to `threads − 1` tasks of rayon's pool take the indices one at a time, in increasing
/// order, until none is left. The caller starts at once, without first waiting for a pool
/// thread to wake up (on a busy or virtual machine that wait is tens of microseconds, as
/// long as a whole decoding step), and a thread that starts late simply takes fewer
/// indices; when none is left, the caller spins (at most [`SPIN_MICROS`]) for helpers
/// still computing one before it sleeps in the scope. Each result depends only on its
/// index, never on the thread that computed it.
pub(crate) fn each_index<R: Send>(
    n: usize,
    parallel: bool,
    f: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let helpers = match parallel {
        true => rayon::current_num_threads().min(n).saturating_sub(1),
        false => 0,
    };
    if helpers == 0 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    // Helpers that have started taking indices, and those that have stopped.
    let (started, exited) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(i) else { break };
            let r = f(i);
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
    };
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| {
                started.fetch_add(1, Ordering::AcqRel);
                work();
                exited.fetch_add(1, Ordering::Release);
            });
        }
        work();
        // Helpers still computing an index are waited for by spinning a while rather than
        // by going to sleep in the scope (a thread put to sleep and woken again costs tens
        // of microseconds on a virtual machine, as long as a decoding step). Helpers not
        // yet started are not: the scope runs them (on a pool thread, they may be queued
        // behind this very task) or waits for them.
        let start = std::time::Instant::now();
        while exited.load(Ordering::Acquire) < started.load(Ordering::Acquire)
            && start.elapsed() < std::time::Duration::from_micros(SPIN_MICROS)
        {
            std::hint::spin_loop();
        }
    });
    // Every index was taken (the loops stop only when none is left) and the scope waited
    // for every task, so every slot holds its result.
    slots
        .into_iter()
        .filter_map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::each_index;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every index once, results in index order: in order, on the caller alone, and over
    /// pools of 1 to 3 threads, from a pool's thread and from outside any pool.
    #[test]
    fn each_index_computes_every_index_once_in_order() {
        for n in [0, 1, 2, 7, 64] {
            let want: Vec<usize> = (0..n).map(|i| i * i + 1).collect();
            let check = |parallel: bool, label: &str| {
                let calls = AtomicUsize::new(0);
                let got = each_index(n, parallel, |i| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    i * i + 1
                });
                assert_eq!(got, want, "n {n} {label}");
                assert_eq!(calls.into_inner(), n, "n {n} {label}: calls");
            };
            check(false, "in order");
            check(true, "outside any pool");
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a pool");
                pool.install(|| check(true, &format!("{threads} threads")));
            }
        }
    }
}
