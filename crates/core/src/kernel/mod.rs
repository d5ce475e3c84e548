//! The fused attention kernel: packing, blocking over queries, threading, and the small
//! direct path. The per-block arithmetic is in `block.rs`; the CPU-specific compilation
//! and all `unsafe` in `simd.rs`.

mod block;
mod direct;
pub(crate) mod exp;
pub(crate) mod simd;

use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::options::MatRef;
use crate::spec::Spec;
use crate::{AttentionError, Element};
pub use simd::CpuPath;

/// Everything the block kernel reads: the checked problem, Q in place, K and V packed.
pub(crate) struct Job<'a, T: Element> {
    pub spec: Spec<'a, T>,
    pub q: MatRef<'a, T>,
    /// K in panels of `MR` keys: `kp[j/MR][p][j%MR]`, keys past n_kv zero.
    pub kp: Vec<T>,
    /// V row-major with rows padded to `dvp` columns: `vp[j][c]`, padding zero.
    pub vp: Vec<T>,
    pub dvp: usize,
}

/// Per-thread working memory of the block kernel.
pub(crate) struct Scratch<T> {
    pub qt: Vec<T>,
    pub s: Vec<T>,
    pub acc: Vec<T>,
    pub m: Vec<T>,
    pub l: Vec<T>,
    pub alpha: Vec<T>,
    pub m_ref: Vec<T>,
    pub l_blk: Vec<T>,
}

impl<T: Element> Scratch<T> {
    fn new(kernel: &simd::Kernel<T>, d_k: usize, dvp: usize) -> Self {
        let bq = kernel.bq;
        let z = T::zero();
        Scratch {
            qt: vec![z; d_k * bq],
            s: vec![z; kernel.bk * bq],
            acc: vec![z; dvp * bq],
            m: vec![z; bq],
            l: vec![z; bq],
            alpha: vec![z; bq],
            m_ref: vec![z; bq],
            l_blk: vec![z; bq],
        }
    }
}

/// Work (multiply-adds) below which the direct path is used: packing and blocking would
/// cost more than they save.
const DIRECT_MAX_WORK: usize = 8 * 1024;
/// Work below which a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Computes the attention output into `out` (n_q × d_v, overwritten) and the log-sum-exp
/// into `lse` (n_q).
pub(crate) fn attention<T: Element>(
    spec: Spec<'_, T>,
    path: CpuPath,
    parallel: bool,
    out: &mut DMatrix<T>,
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let (n_q, n_kv, d_k, d_v) = (spec.n_q, spec.n_kv, spec.d_k, spec.d_v);
    let (q, k, v) = (spec.q, spec.k, spec.v);
    debug_assert_eq!(out.shape(), (n_q, d_v));
    debug_assert_eq!(lse.len(), n_q);
    if n_q == 0 {
        return Ok(());
    }
    let work = n_q * n_kv * (d_k + d_v);
    if n_kv <= direct::MAX_KEYS && work <= DIRECT_MAX_WORK {
        return direct::attention(&spec, out, lse);
    }

    let kernel = simd::Kernel::<T>::select(path);
    let (mr, bq) = (kernel.mr, kernel.bq);
    let n_kv_pad = n_kv.div_ceil(mr) * mr;
    let dvp = d_v.div_ceil(kernel.mrv) * kernel.mrv;

    let mut kp = vec![T::zero(); n_kv_pad * d_k];
    for p in 0..d_k {
        let col = k.column(p);
        for j in 0..n_kv {
            kp[(j / mr) * mr * d_k + p * mr + j % mr] = col[j];
        }
    }
    let mut vp = vec![T::zero(); n_kv_pad * dvp];
    for c in 0..d_v {
        let col = v.column(c);
        for j in 0..n_kv {
            vp[j * dvp + c] = col[j];
        }
    }
    let job = Job {
        spec,
        q,
        kp,
        vp,
        dvp,
    };

    // Hand each block of BQ queries its segment of every output column.
    let n_blocks = n_q.div_ceil(bq);
    let mut block_cols: Vec<Vec<&mut [T]>> =
        (0..n_blocks).map(|_| Vec::with_capacity(d_v)).collect();
    for col in out.as_mut_slice().chunks_exact_mut(n_q) {
        for (b, seg) in col.chunks_mut(bq).enumerate() {
            block_cols[b].push(seg);
        }
    }
    let blocks = block_cols.into_iter().zip(lse.chunks_mut(bq)).enumerate();

    let run = |scratch: &mut Scratch<T>,
               (qb, (mut cols, lse)): (usize, (Vec<&mut [T]>, &mut [T]))| {
        (kernel.block)(&job, qb, scratch, &mut cols, lse)
    };
    let results: Vec<Result<(), AttentionError>> =
        if parallel && n_blocks > 1 && work >= PARALLEL_MIN_WORK {
            blocks
                .collect::<Vec<_>>()
                .into_par_iter()
                .map_init(|| Scratch::new(&kernel, d_k, dvp), run)
                .collect()
        } else {
            let mut scratch = Scratch::new(&kernel, d_k, dvp);
            blocks.map(|b| run(&mut scratch, b)).collect()
        };
    // The first error in query order, whatever the thread count.
    results.into_iter().collect()
}
