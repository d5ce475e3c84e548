//! The backward pass's kernel: FlashAttention-2's backward in one pass over 64 × 64 tiles,
//! with the five products of a tile on register tiles (`simd.rs`), and no atomics.
//!
//! A tile is query block `I` (64 rows) × key block `J` (64 keys). From the operands laid
//! out once per call ([`Operands`]) it computes, lanes running over the tile's queries
//! (`s[j][r]`, as the forward's score tiles):
//! ```text
//! S   = Q_I·K_Jᵀ                P = exp(scale·S − lse)       (weights, 0 where masked)
//! dP  = dO_I·V_Jᵀ               dT = P∘(dP − D)·∂z/∂t
//! dV_J += Pᵀ·dO_I               dK_J += dTᵀ·Q_I              dQ_I += dT·K_J
//! ```
//! With dropout (`dropout.rs`) the weights pass regenerates the forward's mask `M` pair
//! by pair: `dV` takes `P∘M/(1 − p)` and `dP` becomes `dP∘M/(1 − p)` before `dT`.
//! (`dK` and `dQ` are multiplied by the scale once, at the end.) That is the
//! `10·n_q·n_kv·d` FLOPs the issue counts, where the two-pass scheme (dK/dV over key
//! blocks, then dQ over query blocks) recomputes `S` and `dP`: 14.
//!
//! # Determinism without atomics
//! Key blocks are dealt to `C = min(8, key blocks)` chunks back and forth, chunk `c`
//! taking blocks `c, 2C − 1 − c, 2C + c, 4C − 1 − c, …` ([`owner`]): under a causal band
//! a round's work falls with the key block, so each chunk gets one block from each end
//! and the chunks' shares of every round are equal. A chunk owns the
//! dK and dV rows of its key blocks, and its own dQ buffer: query rows go in rounds
//! (`ROUND_BLOCKS`), each chunk adding its keys' share of dQ for the round's rows, and
//! after the round the chunks' shares are added into dQ in chunk order. Chunks run on
//! any threads; `C`, the rounds and every sum's order depend only on the sizes, so the
//! result does not depend on the threads, and the extra memory is bounded
//! (`C·1024·d_k` f64 for dQ shares, `n_kv·(d_k + d_v)` f64 for dK and dV).
//!
//! # Accuracy
//! A tile's products sum at most 64 terms (or `d_k`, `d_v` for `S`, `dP`) in T; its
//! contributions to dQ, dK and dV are added into f64 (in the register tile's epilogue),
//! as before this kernel: within a tile in T, across tiles in f64.

use std::ops::Range;

use rayon::prelude::*;

use super::{KEEP_MAX_ELEMENTS, LineAligned};
use crate::Element;
use crate::error::{AttentionError, Operand};
use crate::memory::try_resize;
use crate::options::MatRef;
use crate::spec::Spec;

/// `(a(), b())`, on two threads if `parallel`.
pub(crate) fn join<A: Send, B: Send>(
    parallel: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if parallel {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Queries per block and keys per block: tiles are `BLOCK × BLOCK`.
pub(crate) const BLOCK: usize = 64;
/// Key chunks at most (see the module documentation).
pub(crate) const MAX_CHUNKS: usize = 8;
/// Query blocks per round (1024 rows): each chunk's dQ share is `1024 × d_k` f64.
pub(crate) const ROUND_BLOCKS: usize = 16;

/// Where a register tile's results go: `out[n·stride + m]`.
pub(crate) enum Out<'a, T> {
    /// Stored in T (the scores and `dP` of a tile).
    Store(&'a mut [T], usize),
    /// Widened to f64 and added (contributions to dQ, dK, dV).
    Add(&'a mut [f64], usize),
}

/// The backward's inner loops, written once over vector operations in `simd.rs`.
///
/// Every method takes a value of [`GradKernels::Features`], the proof that the CPU has the
/// instructions the implementation uses (as `block::MicroKernels`).
pub(crate) trait GradKernels<T: Element> {
    /// Proof that this CPU can run these kernels.
    type Features: Copy;
    /// `n` per register tile (a divisor of [`BLOCK`]).
    const MR: usize;

    /// `out[n·stride + m] (= or +=) Σ_{p<k} a[p·a_k + m]·b[(n / MR)·b_panel + p·b_k +
    /// (n % MR)·b_n]` for `m < m_len`
    /// (a multiple of the padding unit [`pad_unit`]) and `n < n_len` (a multiple of
    /// [`MR`](Self::MR)); the sum over `p` in T, in order. Panics if a slice is too short.
    #[allow(clippy::too_many_arguments)]
    fn product(
        features: Self::Features,
        a: &[T],
        a_k: usize,
        b: &[T],
        b_strides: (usize, usize, usize),
        sizes: (usize, usize, usize),
        out: Out<'_, T>,
    );

    /// A tile `s`, `ds` (key `j`'s `BLOCK` lanes at `j·BLOCK`) whose pairs are all allowed
    /// and only scaled: if no recomputed weight exceeds 1 beyond the rows' slack,
    /// `s ← P = exp(min(scale·s − lse, 0))` and `ds ← P·(ds − D)` for keys `< keys`, both
    /// 0 for keys `keys .. n`; returns true. Otherwise returns false with `s` and `ds`
    /// untouched.
    fn plain_weights(
        features: Self::Features,
        tile: (&mut [T], &mut [T]),
        sizes: (usize, usize),
        rows: RowsOf<'_, T>,
        scale: T,
    ) -> bool;
}

/// A query block's per-row values (`BLOCK` each; padding rows: lse +∞, D and slack 0).
#[derive(Clone, Copy)]
pub(crate) struct RowsOf<'a, T> {
    pub lse: &'a [T],
    pub slack: &'a [T],
    pub d: &'a [T],
}

/// Elements per padding unit of the row-major copies: one cache line (16 f32, 8 f64), a
/// multiple of every path's vector width.
pub(crate) fn pad_unit<T>() -> usize {
    super::LINE / size_of::<T>()
}

/// The problem laid out for the tile loop, built once per call: Q and dO by query block
/// and column (`[block][c][r]`, lanes over rows) and row-major with rows padded to
/// [`pad_unit`]; K and V by key block in panels of `mr` keys (`[block][panel][c][key]`); K row-major; lse, `D_i` and the lse
/// check's slack per row. Rows and keys past the last are zero (lse +∞: weight 0).
pub(crate) struct Operands<'s, 'a, T: Element> {
    pub spec: &'s Spec<'a, T>,
    /// Padded widths of the row-major copies.
    d_kp: usize,
    d_vp: usize,
    q_cols: LineAligned<T>,
    do_cols: LineAligned<T>,
    q_rows: LineAligned<T>,
    do_rows: LineAligned<T>,
    k_panels: LineAligned<T>,
    v_panels: LineAligned<T>,
    k_rows: LineAligned<T>,
    lse: Vec<T>,
    d: Vec<T>,
    slack: Vec<T>,
}

/// `m` by blocks of `BLOCK` rows, each in panels of `mr` rows by column: `[b][panel][c][r]`
/// (a register tile's keys for one column side by side; with `mr = BLOCK`, `[b][c][r]`).
fn by_panels<T: Element>(
    m: &MatRef<'_, T>,
    mr: usize,
    (buf, operand): (LineAligned<T>, Operand),
) -> Result<LineAligned<T>, AttentionError> {
    let (rows, cols) = m.shape();
    let mut buf = buf.try_reuse(rows.div_ceil(BLOCK) * BLOCK * cols, T::zero(), operand)?;
    // Block by block, so that the block's destination stays in cache.
    for (b, dst) in buf.chunks_exact_mut(BLOCK * cols.max(1)).enumerate() {
        let r0 = b * BLOCK;
        let n = BLOCK.min(rows - r0);
        if n < BLOCK || !BLOCK.is_multiple_of(mr) {
            // Rows past the last are zero (the buffer may hold a previous call's).
            dst.fill(T::zero());
        }
        for c in 0..cols {
            let col = m.column(c);
            // Panel by panel (no division per element).
            for (panel, r) in (0..n).step_by(mr).enumerate() {
                let at = (panel * cols + c) * mr;
                for w in 0..mr.min(n - r) {
                    dst[at + w] = col[r0 + r + w];
                }
            }
        }
    }
    Ok(buf)
}

/// `m` row-major with rows padded to `width` and the row count to a multiple of `BLOCK`.
fn by_rows<T: Element>(
    m: &MatRef<'_, T>,
    width: usize,
    (buf, operand): (LineAligned<T>, Operand),
) -> Result<LineAligned<T>, AttentionError> {
    let (rows, cols) = m.shape();
    let mut buf = buf.try_reuse(rows.div_ceil(BLOCK) * BLOCK * width, T::zero(), operand)?;
    // Block by block, so that the block's destination rows stay in cache.
    for (b, dst) in buf.chunks_exact_mut(BLOCK * width.max(1)).enumerate() {
        let r0 = b * BLOCK;
        let n = BLOCK.min(rows - r0);
        if n < BLOCK || width > cols {
            // Rows past the last and columns past `cols` are zero (the buffer may hold a
            // previous call's).
            dst.fill(T::zero());
        }
        for c in 0..cols {
            let col = m.column(c);
            for r in 0..n {
                dst[r * width + c] = col[r0 + r];
            }
        }
    }
    Ok(buf)
}

impl<'s, 'a, T: Element> Operands<'s, 'a, T> {
    /// Lays out a checked problem with its forward `output`, `lse` and `d_output` (shapes
    /// and values already checked).
    pub(crate) fn new(
        spec: &'s Spec<'a, T>,
        output: &MatRef<'_, T>,
        lse: &[T],
        d_output: &MatRef<'_, T>,
        mr: usize,
        parallel: bool,
    ) -> Result<Self, AttentionError> {
        let (n_q, d_k, d_v) = (spec.n_q, spec.d_k, spec.d_v);
        let unit = pad_unit::<T>();
        let (d_kp, d_vp) = (d_k.next_multiple_of(unit), d_v.next_multiple_of(unit));
        let rows = n_q.div_ceil(BLOCK) * BLOCK;
        // D_i and Σ_c |q_ic| summed in f64 column by column (both matrices are read
        // along their columns, as they are stored).
        let (mut dot, mut q_sum) = (Vec::new(), Vec::new());
        try_resize(&mut dot, n_q, 0.0f64, Operand::Query)?;
        try_resize(&mut q_sum, n_q, 0.0f64, Operand::Query)?;
        for c in 0..d_v {
            let (o, g) = (output.column(c), d_output.column(c));
            for (i, x) in dot.iter_mut().enumerate() {
                *x += g[i].to_f64() * o[i].to_f64();
            }
        }
        for c in 0..d_k {
            let q = spec.q.column(c);
            for (i, x) in q_sum.iter_mut().enumerate() {
                *x += q[i].to_f64().abs();
            }
        }
        let (mut d, mut slack) = (Vec::new(), Vec::new());
        try_resize(&mut d, rows, T::zero(), Operand::Query)?;
        try_resize(&mut slack, rows, T::zero(), Operand::Query)?;
        let (u, k_max, scale) = (
            T::EPSILON.to_f64(),
            spec.k_max_abs.to_f64(),
            spec.scale.to_f64().abs(),
        );
        for i in 0..n_q {
            d[i] = T::from_f64_rounded(dot[i]);
            let lse = lse[i].to_f64();
            let lse = if lse.is_finite() { lse.abs() } else { 0.0 };
            slack[i] = T::from_f64_rounded(
                4.0 * u * (1.0 + lse) + (d_k as f64 + 2.0) * u * scale * q_sum[i] * k_max,
            );
        }
        let mut lse_pad = Vec::new();
        try_resize(
            &mut lse_pad,
            rows,
            T::zero() - T::NEG_INFINITY,
            Operand::Lse,
        )?;
        lse_pad[..n_q].copy_from_slice(lse);
        // The seven layouts, in this thread's cached buffers, on threads if asked.
        let layout = |(which, buf): (usize, LineAligned<T>)| match which {
            0 => by_panels(&spec.q, BLOCK, (buf, Operand::Query)),
            1 => by_panels(d_output, BLOCK, (buf, Operand::OutputGradient)),
            2 => by_rows(&spec.q, d_kp, (buf, Operand::Query)),
            3 => by_rows(d_output, d_vp, (buf, Operand::OutputGradient)),
            4 => by_panels(&spec.k, mr, (buf, Operand::Key)),
            5 => by_panels(&spec.v, mr, (buf, Operand::Value)),
            _ => by_rows(&spec.k, d_kp, (buf, Operand::Key)),
        };
        let cached = Vec::from(T::with_grad_buffers(|b| std::mem::take(&mut b.layouts)));
        let layouts: Vec<_> = if parallel {
            cached.into_par_iter().enumerate().map(layout).collect()
        } else {
            cached.into_iter().enumerate().map(layout).collect()
        };
        let mut layouts = layouts
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || layouts.next().expect("seven layouts");
        Ok(Operands {
            spec,
            d_kp,
            d_vp,
            q_cols: next(),
            do_cols: next(),
            q_rows: next(),
            do_rows: next(),
            k_panels: next(),
            v_panels: next(),
            k_rows: next(),
            lse: lse_pad,
            d,
            slack,
        })
    }

    /// Query blocks.
    pub(crate) fn query_blocks(&self) -> usize {
        self.spec.n_q.div_ceil(BLOCK)
    }

    /// Key blocks.
    pub(crate) fn key_blocks(&self) -> usize {
        self.spec.n_kv.div_ceil(BLOCK)
    }

    /// The query blocks some row of which may see a key of block `kb` (by position).
    pub(crate) fn query_blocks_of(&self, kb: usize) -> Range<usize> {
        let spec = self.spec;
        let keys = kb * BLOCK..(kb * BLOCK + BLOCK).min(spec.n_kv);
        let lo = spec.band.queries(keys.start).0.max(0);
        let hi = spec.band.queries(keys.end - 1).1.min(spec.n_q as i64 - 1);
        if lo > hi {
            0..0
        } else {
            lo as usize / BLOCK..hi as usize / BLOCK + 1
        }
    }

    /// dQ's row-major padded width.
    pub(crate) fn d_kp(&self) -> usize {
        self.d_kp
    }

    /// dV's row-major padded width.
    pub(crate) fn d_vp(&self) -> usize {
        self.d_vp
    }
}

impl<T: Element> Drop for Operands<'_, '_, T> {
    /// Gives the seven layouts back to this thread's cache, for the next call.
    fn drop(&mut self) {
        let layouts = [
            &mut self.q_cols,
            &mut self.do_cols,
            &mut self.q_rows,
            &mut self.do_rows,
            &mut self.k_panels,
            &mut self.v_panels,
            &mut self.k_rows,
        ]
        .map(|l| {
            if l.capacity() <= KEEP_MAX_ELEMENTS {
                std::mem::take(l)
            } else {
                LineAligned::default()
            }
        });
        T::with_grad_buffers(|b| b.layouts = layouts);
    }
}

/// A thread's backward buffers, kept from call to call as the forward's workspace is (each
/// up to [`KEEP_MAX_ELEMENTS`], the same rule): the seven layouts of [`Operands`] (which
/// take them and give them back when dropped), and the f64 dQ, dK and dV
/// ([`take_results`](Self::take_results), [`keep_results`](Self::keep_results)). Reused in place, they cost no page faults
/// after the first call (freshly mapped, they were about 5% of a causal n = 4096 call on
/// one thread, and two threads serialise on them).
#[derive(Default)]
pub struct Buffers<T> {
    layouts: [LineAligned<T>; 7],
    results: [Vec<f64>; 3],
}

impl<T: Element> Buffers<T> {
    /// This thread's cached dQ, dK, dV (empty the first time), for a call to fill; a
    /// single-head call gives them back with [`keep_results`](Self::keep_results), a
    /// multi-head call's blocks keep theirs as results.
    pub(crate) fn take_results() -> [Vec<f64>; 3] {
        T::with_grad_buffers(|b| std::mem::take(&mut b.results))
    }

    /// Gives dQ, dK, dV back to this thread's cache for the next call, each unless it is
    /// larger than [`KEEP_MAX_ELEMENTS`].
    pub(crate) fn keep_results(results: [Vec<f64>; 3]) {
        let results = results.map(|r| {
            if r.capacity() <= KEEP_MAX_ELEMENTS {
                r
            } else {
                Vec::new()
            }
        });
        T::with_grad_buffers(|b| b.results = results);
    }
}

/// A tile's `S`/`P` and `dP`/`dT` (`[j][r]`, `BLOCK` lanes per key).
pub(crate) struct TileScratch<T> {
    pub s: LineAligned<T>,
    pub ds: LineAligned<T>,
}

impl<T: Element> TileScratch<T> {
    pub(crate) fn new() -> Result<Self, AttentionError> {
        Ok(TileScratch {
            s: LineAligned::try_zeroed(BLOCK * BLOCK, T::zero(), Operand::Query)?,
            ds: LineAligned::try_zeroed(BLOCK * BLOCK, T::zero(), Operand::Query)?,
        })
    }
}

/// A failing pair `(query, key)` and its error.
pub(crate) type Failure = (usize, usize, AttentionError);

/// Keeps the failure of the smaller pair.
pub(crate) fn keep_first(first: &mut Option<Failure>, f: Failure) {
    if first
        .as_ref()
        .is_none_or(|(fi, fj, _)| (f.0, f.1) < (*fi, *fj))
    {
        *first = Some(f);
    }
}

/// The chunk that owns key block `kb` of `chunks`, and the block's slot in that chunk's
/// list: blocks are dealt back and forth (`0, 1, …, C − 1, C − 1, …, 1, 0, 0, 1, …`), so
/// that each chunk's share of a causal band's work is the same in every round.
pub(crate) fn owner(kb: usize, chunks: usize) -> (usize, usize) {
    let (lap, at) = (kb / (2 * chunks), kb % (2 * chunks));
    if at < chunks {
        (at, 2 * lap)
    } else {
        (2 * chunks - 1 - at, 2 * lap + 1)
    }
}

/// One chunk of key blocks (see the module documentation) and what it accumulates.
pub struct Chunk<T> {
    /// Its key blocks, in order.
    pub blocks: Vec<usize>,
    /// dK of its key blocks, row-major (`BLOCK × d_kp` per block, unscaled), f64.
    pub dk: Vec<f64>,
    /// dV of its key blocks (`BLOCK × d_vp` per block), f64.
    pub dv: Vec<f64>,
    /// Its keys' share of the round's dQ rows (`d_kp` per row, unscaled), f64.
    pub dq: Vec<f64>,
    /// The smallest failing pair seen.
    pub first: Option<Failure>,
    scratch: TileScratch<T>,
}

impl<T: Element> Chunk<T> {
    /// Makes this chunk chunk `c` of `chunks` for `ops`, with room for a round's dQ share
    /// and dK and dV zero (reusing its buffers).
    pub(crate) fn reset(
        &mut self,
        ops: &Operands<'_, '_, T>,
        (c, chunks): (usize, usize),
    ) -> Result<(), AttentionError> {
        self.blocks.clear();
        self.blocks
            .extend((0..ops.key_blocks()).filter(|&kb| owner(kb, chunks).0 == c));
        let per_block = self.blocks.len() * BLOCK;
        for (buf, len, operand) in [
            (&mut self.dk, per_block * ops.d_kp, Operand::Key),
            (&mut self.dv, per_block * ops.d_vp, Operand::Value),
        ] {
            buf.clear();
            try_resize(buf, len, 0.0, operand)?;
        }
        let rows = ROUND_BLOCKS.min(ops.query_blocks()) * BLOCK;
        try_resize(&mut self.dq, rows * ops.d_kp, 0.0, Operand::Query)?;
        self.first = None;
        if self.scratch.s.len() < BLOCK * BLOCK {
            self.scratch = TileScratch::new()?;
        }
        Ok(())
    }
}

impl<T: Element> Default for Chunk<T> {
    fn default() -> Self {
        Chunk {
            blocks: Vec::new(),
            dk: Vec::new(),
            dv: Vec::new(),
            dq: Vec::new(),
            first: None,
            scratch: TileScratch {
                s: LineAligned::default(),
                ds: LineAligned::default(),
            },
        }
    }
}

/// The compiled entry points of one path: a chunk's round, and one tile.
pub struct GradKernel<T: Element> {
    /// Keys per K and V panel (the kernels' `MR`; `Operands::new` lays them out so).
    pub(crate) mr: usize,
    /// Runs `chunk` over the query blocks `round` (zeroing its dQ share first).
    pub(crate) round: fn(&Operands<'_, '_, T>, Range<usize>, &mut Chunk<T>),
    /// Tile `(query block, key block)` into the scratch: `P` in `s`, `dT` (with the
    /// softcap factor if the flag) or `dZ` in `ds`.
    pub(crate) tile: TileFn<T>,
}

/// [`GradKernel::tile`]'s type.
pub(crate) type TileFn<T> =
    fn(&Operands<'_, '_, T>, (usize, usize), &mut TileScratch<T>, bool) -> Result<(), Failure>;

impl<T: Element> Clone for GradKernel<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Element> Copy for GradKernel<T> {}

/// Tile `(qb, kb)`: its scores and `dO·Vᵀ` as products, then the weights, into the
/// scratch (see [`GradKernel::tile`]). Err with the tile's smallest failing pair.
#[inline(always)]
pub(crate) fn tile<T: Element, MK: GradKernels<T>>(
    f: MK::Features,
    ops: &Operands<'_, '_, T>,
    (qb, kb): (usize, usize),
    scratch: &mut TileScratch<T>,
    chain: bool,
) -> Result<(), Failure> {
    let spec = ops.spec;
    let (d_k, d_v) = (spec.d_k, spec.d_v);
    let keys = BLOCK.min(spec.n_kv - kb * BLOCK);
    let n = keys.next_multiple_of(MK::MR);
    let (s, ds) = (&mut scratch.s[..n * BLOCK], &mut scratch.ds[..n * BLOCK]);
    MK::product(
        f,
        &ops.q_cols[qb * d_k * BLOCK..][..d_k * BLOCK],
        BLOCK,
        &ops.k_panels[kb * d_k * BLOCK..][..d_k * BLOCK],
        (MK::MR, 1, MK::MR * d_k),
        (d_k, BLOCK, n),
        Out::Store(s, BLOCK),
    );
    MK::product(
        f,
        &ops.do_cols[qb * d_v * BLOCK..][..d_v * BLOCK],
        BLOCK,
        &ops.v_panels[kb * d_v * BLOCK..][..d_v * BLOCK],
        (MK::MR, 1, MK::MR * d_v),
        (d_v, BLOCK, n),
        Out::Store(ds, BLOCK),
    );
    let (i0, j0) = (qb * BLOCK, kb * BLOCK);
    let rows = BLOCK.min(spec.n_q - i0);
    // Every pair allowed and only scaled, no dropout: the vector pass.
    let plain = !spec.has_elementwise()
        && spec.dropout.is_none()
        && (0..rows).all(|r| {
            let (lo, hi) = spec.key_range(i0 + r);
            lo <= j0 as i64 && (j0 + keys) as i64 - 1 <= hi
        });
    let of = RowsOf {
        lse: &ops.lse[i0..i0 + BLOCK],
        slack: &ops.slack[i0..i0 + BLOCK],
        d: &ops.d[i0..i0 + BLOCK],
    };
    if plain && MK::plain_weights(f, (s, ds), (keys, n), of, spec.scale) {
        return Ok(());
    }
    weights(spec, (i0, j0), (rows, keys), (s, ds), of, plain, chain)
}

/// The weights and score gradients of a tile pair by pair, for every option (see
/// [`GradKernel::tile`]); rows past `rows` and keys past `keys` get 0. Err with the
/// tile's smallest failing pair.
#[allow(clippy::too_many_arguments)]
fn weights<T: Element>(
    spec: &Spec<'_, T>,
    (i0, j0): (usize, usize),
    (rows, keys): (usize, usize),
    (s, ds): (&mut [T], &mut [T]),
    of: RowsOf<'_, T>,
    plain: bool,
    chain: bool,
) -> Result<(), Failure> {
    let four_u = T::EPSILON * T::from_count(4);
    let mut first: Option<Failure> = None;
    for (c, (s, ds)) in s
        .chunks_exact_mut(BLOCK)
        .zip(ds.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let j = j0 + c;
        for r in 0..BLOCK {
            if c >= keys || r >= rows {
                (s[r], ds[r]) = (T::zero(), T::zero());
                continue;
            }
            let i = i0 + r;
            let t = s[r] * spec.scale;
            let z = if plain { t } else { spec.modify(i, j, t) };
            let (p, dt) = if z == T::NEG_INFINITY {
                (T::zero(), T::zero())
            } else {
                let lse = of.lse[r];
                let x = z - lse;
                let slack = of.slack[r] + four_u * z.abs();
                if !z.finite() || lse == T::NEG_INFINITY || x > slack {
                    let e = if z.finite() {
                        AttentionError::InvalidLse {
                            head: 0,
                            row: i,
                            key: j,
                            value: lse.to_f64(),
                        }
                    } else {
                        AttentionError::ScoreOverflow { query: i, key: j }
                    };
                    keep_first(&mut first, (i, j, e));
                    (T::zero(), T::zero())
                } else {
                    let x = if x > T::zero() { T::zero() } else { x };
                    let p = x.exp_nonpos::<false>();
                    // With dropout, dV takes the kept weights `P·M/(1 − p)` and
                    // `∂L/∂P = dP'·M/(1 − p)` (dP' = dO·v_j, in `ds`).
                    let f = spec.dropout.map(|d| d.factor(i, j));
                    let dp = f.map_or(ds[r], |f| ds[r] * f);
                    let dz = p * (dp - of.d[r]);
                    let dt = if chain && spec.softcap.is_some() {
                        dz * spec.modify_derivative(t)
                    } else {
                        dz
                    };
                    (f.map_or(p, |f| p * f), dt)
                }
            };
            (s[r], ds[r]) = (p, dt);
        }
    }
    match first {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// A chunk's round (see [`GradKernel::round`]): each of its key blocks against the
/// round's query blocks that may see it, in order. A failing tile is recorded in
/// `chunk.first` and contributes nothing.
#[inline(always)]
pub(crate) fn round<T: Element, MK: GradKernels<T>>(
    f: MK::Features,
    ops: &Operands<'_, '_, T>,
    round: Range<usize>,
    chunk: &mut Chunk<T>,
) {
    let (d_kp, d_vp) = (ops.d_kp, ops.d_vp);
    chunk.dq.fill(0.0);
    for (slot, &kb) in chunk.blocks.iter().enumerate() {
        let seen = ops.query_blocks_of(kb);
        let keys = BLOCK.min(ops.spec.n_kv - kb * BLOCK);
        let n = keys.next_multiple_of(MK::MR);
        for qb in seen.start.max(round.start)..seen.end.min(round.end) {
            if let Err(e) = tile::<T, MK>(f, ops, (qb, kb), &mut chunk.scratch, true) {
                keep_first(&mut chunk.first, e);
                continue;
            }
            let (s, ds) = (
                &chunk.scratch.s[..n * BLOCK],
                &chunk.scratch.ds[..n * BLOCK],
            );
            // dV_J += Pᵀ·dO_I: n = keys, m = value columns, k = the block's rows.
            MK::product(
                f,
                &ops.do_rows[qb * BLOCK * d_vp..][..BLOCK * d_vp],
                d_vp,
                s,
                (1, BLOCK, MK::MR * BLOCK),
                (BLOCK, d_vp, n),
                Out::Add(&mut chunk.dv[slot * BLOCK * d_vp..][..n * d_vp], d_vp),
            );
            // dK_J += dTᵀ·Q_I.
            MK::product(
                f,
                &ops.q_rows[qb * BLOCK * d_kp..][..BLOCK * d_kp],
                d_kp,
                ds,
                (1, BLOCK, MK::MR * BLOCK),
                (BLOCK, d_kp, n),
                Out::Add(&mut chunk.dk[slot * BLOCK * d_kp..][..n * d_kp], d_kp),
            );
            // dQ_I += dT·K_J: n = the block's rows, k = keys.
            let local = (qb - round.start) * BLOCK;
            MK::product(
                f,
                &ops.k_rows[kb * BLOCK * d_kp..][..n * d_kp],
                d_kp,
                ds,
                (BLOCK, 1, MK::MR),
                (n, d_kp, BLOCK),
                Out::Add(&mut chunk.dq[local * d_kp..][..BLOCK * d_kp], d_kp),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::AsMatRef;
    use nalgebra::DMatrix;

    /// The layouts written into a buffer that holds a previous call's values: every entry
    /// is the matrix's or zero (rows past the last, padding columns), as in a fresh one.
    #[test]
    fn layouts_in_reused_buffers_are_padded_with_zeros() {
        let m = DMatrix::from_fn(70, 10, |r, c| (r * 10 + c + 1) as f32);
        let view = (&m).into_mat_ref();
        let dirty = || LineAligned::try_zeroed(4096, 7.0f32, Operand::Key).unwrap();
        // By rows, width 16: element (r, c) at r·16 + c.
        let rows = by_rows(&view, 16, (dirty(), Operand::Key)).unwrap();
        assert_eq!(rows.len(), 128 * 16);
        for (i, &x) in rows.iter().enumerate() {
            let (r, c) = (i / 16, i % 16);
            let want = if r < 70 && c < 10 { m[(r, c)] } else { 0.0 };
            assert_eq!(x, want, "by rows ({r}, {c})");
        }
        // By panels of 4 rows: [block][panel][c][w].
        let panels = by_panels(&view, 4, (dirty(), Operand::Key)).unwrap();
        assert_eq!(panels.len(), 128 * 10);
        for (i, &x) in panels.iter().enumerate() {
            let (b, rest) = (i / (64 * 10), i % (64 * 10));
            let (panel, c, w) = (rest / 40, rest % 40 / 4, rest % 4);
            let r = b * 64 + panel * 4 + w;
            let want = if r < 70 { m[(r, c)] } else { 0.0 };
            assert_eq!(x, want, "by panels (row {r}, column {c})");
        }
    }
}
