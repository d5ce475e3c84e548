//! Scheduling of a multi-head call: every (sequence, query head) block is one single-head
//! problem ([`super::attention`]); the blocks are grouped by (sequence, key/value head), the
//! unit of work handed to threads, so that the query heads of a group run one after another
//! on the key/value block they share, and groups run side by side.

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::attention as single;
use super::{KernelRun, Route, attention_heads as heads, decode, record_run, route};
use crate::Element;
use crate::cpu::CpuPath;
use crate::error::{AttentionError, Operand};
use crate::memory::{try_matrix, try_vector};
use crate::options::MatRef;
use crate::spec::{Batch, Sequence, Spec};
use crate::view::{MatMut, split_blocks};

/// Groups per thread from which a batch is split over threads by group (see
/// [`attention`]): with fewer, one group's long sequence could leave threads idle.
const GROUPS_PER_THREAD: usize = 2;

/// One block's work: its spec, where its output and lse go, and, for a block the careful
/// path computed ahead, that result.
struct Item<'s, 'a, 'o, T: Element> {
    spec: &'s Spec<'a, T>,
    head: usize,
    seq: Sequence,
    out: MatMut<'o, T>,
    lse: Option<&'o mut [T]>,
    done: Option<(DMatrix<T>, Vec<T>)>,
}

/// Runs every block of `batch`, writing `out` (`Σn_q × h_q·d_v`) and, if given, `lse`
/// (`Σn_q × h_q`). Blocks whose scores may leave the type's range are computed first,
/// into scratch, so that a [`AttentionError::HeadScoreOverflow`] leaves `out` untouched.
pub(crate) fn attention<T: Element>(
    batch: Batch<'_, T>,
    path: CpuPath,
    forced: bool,
    parallel: bool,
    out: MatMut<'_, T>,
    lse: Option<&mut DMatrix<T>>,
) -> Result<(), AttentionError> {
    let mut done = careful_first(&batch, path, forced, parallel)?;
    let items = items(&batch, out, lse, &mut done);
    // Group g holds the query heads of (sequence, key/value head) g, in head order.
    let group = batch.heads_q / batch.heads_kv;
    let mut groups: Vec<Vec<Item<'_, '_, '_, T>>> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        if i % group == 0 {
            groups.push(Vec::with_capacity(group));
        }
        groups.last_mut().expect("pushed above").push(item);
    }
    groups.retain(|g| g.iter().any(|item| item.seq.n_q > 0));
    // Enough groups to keep every thread busy: threads over groups, each group on one
    // thread (no nested splitting, whose stolen tasks would each need a fresh
    // workspace); otherwise groups in turn, each split over the threads inside. Results
    // do not depend on this choice (the kernels give the same bits either way).
    let across = parallel && groups.len() >= GROUPS_PER_THREAD * rayon::current_num_threads();
    let inner = parallel && !across;
    let run_group = |g: Vec<Item<'_, '_, '_, T>>| -> Result<(), AttentionError> {
        if decodes(&g, forced) {
            decode_group(g, path, inner);
            return Ok(());
        }
        if g.len() > 1 && shares_packing(&g, forced) {
            return block_group(g, path, inner);
        }
        g.into_iter()
            .map(|item| run_item(item, path, forced, inner))
            .fold(Ok(()), first_error)
    };
    if across {
        groups
            .into_par_iter()
            .map(run_group)
            .reduce(|| Ok(()), first_error)
    } else {
        groups.into_iter().map(run_group).fold(Ok(()), first_error)
    }
}

/// The results of the blocks that go to the careful path (scores not provably in range),
/// at their block index; the first overflow, in `(query, head, key)` order, as an error.
#[allow(clippy::type_complexity)] // one (output, lse) per block: an alias would hide it
fn careful_first<T: Element>(
    batch: &Batch<'_, T>,
    path: CpuPath,
    forced: bool,
    parallel: bool,
) -> Result<Vec<Option<(DMatrix<T>, Vec<T>)>>, AttentionError> {
    let mut done = vec![None; batch.specs.len()];
    let mut result = Ok(());
    for (i, spec) in batch.specs.iter().enumerate() {
        if spec.scores_in_range || spec.n_q == 0 || spec.n_kv == 0 {
            continue;
        }
        let (s, head) = (i / batch.heads_q, i % batch.heads_q);
        let mut out = try_matrix(spec.n_q, spec.d_v, T::zero(), Operand::Output)?;
        let mut lse = try_vector(spec.n_q, T::zero(), Operand::Lse)?;
        let r = single(
            spec,
            path,
            forced,
            parallel,
            &mut (&mut out).into(),
            Some(lse.as_mut_slice()),
        );
        match r {
            Ok(()) => done[i] = Some((out, lse.as_slice().to_vec())),
            Err(e) => result = first_error(result, Err(in_batch(e, head, batch.sequences[s]))),
        }
    }
    result.map(|()| done)
}

/// One [`Item`] per block, in block order (`s · h_q + h`), each with its own disjoint piece
/// of `out` and `lse`.
fn items<'s, 'a, 'o, T: Element>(
    batch: &'s Batch<'a, T>,
    out: MatMut<'o, T>,
    lse: Option<&'o mut DMatrix<T>>,
    done: &mut [Option<(DMatrix<T>, Vec<T>)>],
) -> Vec<Item<'s, 'a, 'o, T>> {
    let (heads_q, d_v) = (batch.heads_q, batch.d_v);
    let rows: Vec<_> = batch
        .sequences
        .iter()
        .map(|s| s.q_start..s.q_start + s.n_q)
        .collect();
    let columns: Vec<_> = (0..heads_q).map(|h| h * d_v..(h + 1) * d_v).collect();
    let out_blocks = split_blocks(out, &rows, &columns);
    // lse is column-major: column h, then the rows of each sequence in turn.
    let mut lse_blocks: Vec<Option<&'o mut [T]>> = (0..out_blocks.len()).map(|_| None).collect();
    if let Some(lse) = lse {
        let total: usize = rows.iter().map(|r| r.len()).sum();
        let mut rest: &'o mut [T] = lse.as_mut_slice();
        for h in 0..heads_q {
            let (mut column, tail) = rest.split_at_mut(total);
            rest = tail;
            for (s, seq) in batch.sequences.iter().enumerate() {
                let (this, after) = column.split_at_mut(seq.n_q);
                column = after;
                lse_blocks[s * heads_q + h] = Some(this);
            }
        }
    }
    out_blocks
        .into_iter()
        .zip(lse_blocks)
        .enumerate()
        .map(|(i, (out, lse))| Item {
            spec: &batch.specs[i],
            head: i % heads_q,
            seq: batch.sequences[i / heads_q],
            out,
            lse,
            done: done[i].take(),
        })
        .collect()
}

/// Whether the group's query heads all take the decoding kernel (each as its single-head
/// call would: `kernel::route`); then one pass over K and V serves them all.
fn decodes<T: Element>(group: &[Item<'_, '_, '_, T>], forced: bool) -> bool {
    group
        .iter()
        .all(|item| route(item.spec, forced, item.lse.is_some()) == Route::Decode)
}

/// Whether the group's query heads all take the block kernel, each as its single-head call
/// would (`kernel::route`), none computed ahead: then one packing of their shared K and V
/// serves them all.
fn shares_packing<T: Element>(group: &[Item<'_, '_, '_, T>], forced: bool) -> bool {
    group.iter().all(|item| {
        item.done.is_none()
            && item.seq.n_q > 0
            && route(item.spec, forced, item.lse.is_some()) == Route::Block
    })
}

/// Runs a group of query heads through the block kernel on one packing of their K and V
/// (`kernel::attention_heads`); the first error in head order, in the batch's terms.
fn block_group<T: Element>(
    group: Vec<Item<'_, '_, '_, T>>,
    path: CpuPath,
    parallel: bool,
) -> Result<(), AttentionError> {
    let mut specs = Vec::with_capacity(group.len());
    let mut outs = Vec::with_capacity(group.len());
    let mut lses = Vec::with_capacity(group.len());
    let mut places = Vec::with_capacity(group.len());
    for item in group {
        specs.push(item.spec);
        outs.push(item.out);
        lses.push(item.lse);
        places.push((item.head, item.seq));
    }
    let mut outs: Vec<&mut MatMut<'_, T>> = outs.iter_mut().collect();
    let mut results = vec![Ok(()); specs.len()];
    heads(&specs, path, parallel, &mut outs, &mut lses, &mut results);
    results
        .into_iter()
        .zip(places)
        .map(|(r, (head, seq))| r.map_err(|e| in_batch(e, head, seq)))
        .fold(Ok(()), first_error)
}

/// Runs a group of query heads through the decoding kernel together.
fn decode_group<T: Element>(group: Vec<Item<'_, '_, '_, T>>, path: CpuPath, parallel: bool) {
    record_run(KernelRun::Decode(path));
    let specs: Vec<&Spec<'_, T>> = group.iter().map(|item| item.spec).collect();
    let mut outs = Vec::with_capacity(group.len());
    let mut lses = Vec::with_capacity(group.len());
    for item in group {
        outs.push(item.out);
        lses.push(item.lse);
    }
    let mut outs: Vec<&mut MatMut<'_, T>> = outs.iter_mut().collect();
    let decode_group = decode::Group::new(&specs);
    decode::attention(&decode_group, path, parallel, &mut outs, &mut lses);
}

/// Computes (or copies the careful result of) one block.
fn run_item<T: Element>(
    item: Item<'_, '_, '_, T>,
    path: CpuPath,
    forced: bool,
    parallel: bool,
) -> Result<(), AttentionError> {
    let Item {
        spec,
        head,
        seq,
        mut out,
        lse,
        done,
    } = item;
    if seq.n_q == 0 {
        return Ok(());
    }
    if let Some((o, l)) = done {
        out.copy_from(&o);
        if let Some(lse) = lse {
            lse.copy_from_slice(&l);
        }
        return Ok(());
    }
    single(spec, path, forced, parallel, &mut out, lse).map_err(|e| in_batch(e, head, seq))
}

/// A block's error in the batch's terms: a score overflow names the head and the packed
/// rows of its query and key.
fn in_batch(e: AttentionError, head: usize, seq: Sequence) -> AttentionError {
    match e {
        AttentionError::ScoreOverflow { query, key } => AttentionError::HeadScoreOverflow {
            head,
            query: seq.q_start + query,
            key: seq.kv_start + key,
        },
        e => e,
    }
}

/// Of two results, the error to report: a score overflow before any other error, and
/// among overflows the smallest `(query, head, key)`; otherwise the first.
fn first_error(
    a: Result<(), AttentionError>,
    b: Result<(), AttentionError>,
) -> Result<(), AttentionError> {
    let key = |e: &AttentionError| match *e {
        AttentionError::HeadScoreOverflow { head, query, key } => (0, query, head, key),
        _ => (1, 0, 0, 0),
    };
    match (a, b) {
        (Ok(()), b) => b,
        (a, Ok(())) => a,
        (Err(x), Err(y)) => Err(if key(&y) < key(&x) { y } else { x }),
    }
}

/// One key/value group of [`paged`]: its query heads' specs, its pages, its outputs.
type PagedJob<'s, 'a, 'o, T> = (
    &'s [&'s Spec<'a, T>],
    Vec<(MatRef<'a, T>, MatRef<'a, T>)>,
    Vec<MatMut<'o, T>>,
    Vec<Option<&'o mut [T]>>,
);

/// Attention of `specs` (one per query head, from `spec::cached_specs`) through the pages
/// of a KV cache, read in place: `segments[j]` are key/value head `j`'s pages (consecutive
/// blocks of rows). Query head `h` reads head `h / (h_q / h_kv)`; the groups run side by
/// side. Returns `false`, having written nothing, when some head needs another kernel
/// (more than a few queries, tiny calls, scores not provably in range, values near the
/// type's maximum): the caller then copies the pages and runs the general path.
pub(crate) fn paged<T: Element>(
    specs: &[Spec<'_, T>],
    segments: Vec<Vec<(MatRef<'_, T>, MatRef<'_, T>)>>,
    (path, forced): (CpuPath, bool),
    parallel: bool,
    out: MatMut<'_, T>,
    lse: Option<&mut DMatrix<T>>,
) -> bool {
    let n_q = specs.first().map_or(0, |s| s.n_q);
    // Exactly the heads that `multi_head_attention` on the same keys would decode (so
    // the two give the same bits).
    let with_lse = lse.is_some();
    let fits = specs
        .iter()
        .all(|s| route(s, forced, with_lse) == Route::Decode);
    if !fits || n_q == 0 {
        return false;
    }
    record_run(KernelRun::Decode(path));
    let (heads_q, heads_kv, d_v) = (specs.len(), segments.len(), specs[0].d_v);
    let group = heads_q / heads_kv;
    let columns: Vec<_> = (0..heads_q).map(|h| h * d_v..(h + 1) * d_v).collect();
    let mut outs = split_blocks(out, std::slice::from_ref(&(0..n_q)), &columns).into_iter();
    let mut lses: Vec<Option<&mut [T]>> = match lse {
        Some(lse) => lse.as_mut_slice().chunks_mut(n_q).map(Some).collect(),
        None => (0..heads_q).map(|_| None).collect(),
    };
    let mut lses = lses.drain(..);
    let refs: Vec<&Spec<'_, T>> = specs.iter().collect();
    let mut jobs = Vec::with_capacity(heads_kv);
    for (j, segs) in segments.into_iter().enumerate() {
        let outs: Vec<MatMut<'_, T>> = outs.by_ref().take(group).collect();
        let lses: Vec<Option<&mut [T]>> = lses.by_ref().take(group).collect();
        jobs.push((&refs[j * group..(j + 1) * group], segs, outs, lses));
    }
    let run = |(specs, segs, mut outs, mut lses): PagedJob<'_, '_, '_, T>| {
        let group = decode::Group::paged(specs, segs);
        let mut outs: Vec<&mut MatMut<'_, T>> = outs.iter_mut().collect();
        decode::attention(&group, path, parallel, &mut outs, &mut lses);
    };
    if parallel && jobs.len() > 1 {
        jobs.into_par_iter().for_each(run);
    } else {
        jobs.into_iter().for_each(run);
    }
    true
}
