//! The fused kernel body: groups of query blocks against all their keys, with online
//! softmax.
//!
//! Everything is laid out so that SIMD lanes run over **queries**: the query block is
//! stored transposed (`qt[p][r]`, `d_k × BQ`), scores as `Sᵀ` (`s[j][r]`, keys × BQ) and the
//! output accumulator as `Oᵀ` (`acc[c][r]`, `d_v × BQ`). Then both products are
//! broadcast-and-FMA loops over contiguous lanes, and the row-wise softmax statistics
//! (max, sum) become element-wise vector operations with no horizontal reductions.
//!
//! For key block `J` the online-softmax step (Milakov & Gimelshein 2018; FlashAttention-2)
//! is, per query `r`:
//! ```text
//! m' = max(m, max_{j∈J} s_j)          α = exp(m − m')
//! p_j = exp(s_j − m')                  l' = α·l + Σ_{j∈J} p_j
//! acc' = α·acc + Σ_{j∈J} p_j · v_j
//! ```
//! and at the end `out = acc / l`, `lse = m + ln l`. When `m' = −∞` (nothing allowed yet)
//! the step uses the lowest finite number in place of `m'` so that every
//! `p_j = exp(−∞) = 0`, as is `α`, and nothing is NaN.
//!
//! # Accuracy
//! A row's sums `l = Σ_j p_j` and `acc_c = Σ_j p_j·v_jc` run over all `n_kv` keys. Added
//! one by one into a single accumulator of the element type, each term would be rounded
//! up to `n_kv` times: a relative error up to `n_kv·u` (`u = T::EPSILON`), e.g. 1.005
//! instead of 1 for f32 at 2²⁰ keys. So each sum is computed in three levels, each
//! starting from zero:
//! ```text
//! tile J (BK ≤ 64 keys):     P_J = Σ_{j∈J} p_j·v_j,  L_J = Σ_{j∈J} p_j        in T
//! span (SPAN_TILES tiles):   A ← α·A + P_J,          Λ ← α·Λ + L_J            in T
//! run (the whole row):       acc ← β·acc + A,        l ← β·l + Λ              in f64
//! ```
//! `α = exp(m − m')` (in T) rescales the span's sums at every tile, `β = exp(m_run − m')`
//! (in f64, `m_run` the maximum at the previous flush) rescales the running sums when a
//! span is added to them, at its last tile (or the block's last). A term is then rounded
//! at most `BK` times in its tile, `2·(SPAN_TILES − 1)` times in its span and twice per
//! later span in f64; it is multiplied by at most `SPAN_TILES − 1` factors `α` (each within
//! 2 ulp) and one `β` per later span (within 2 ulp of f64). Relative to `Σ_j |p_j·v_j|`,
//! with `u₆₄ = f64::EPSILON` and `spans = ⌈⌈n_kv/BK⌉/SPAN_TILES⌉`:
//! ```text
//! |error| ≤ (BK/2 + 3·(SPAN_TILES − 1))·u + 3·(spans − 1)·u₆₄
//! ```
//! For f32 the last term is below `10⁻⁴·u` for any `n_kv ≤ 2²⁴`: the error does not grow
//! with the row. For f64 it grows like `n_kv/(BK·SPAN_TILES)` instead of `n_kv`. The
//! spans (rather than adding every tile to the f64 sums) keep the f64 accumulators' memory
//! traffic to one pass per `SPAN_TILES` tiles: adding every tile cost 3.5–4.4% of f32
//! throughput at n = 2048–4096, spans of 8 tiles about 2% (`docs/PERFORMANCE.md`).
//! The output `acc / l` and `lse = m_run + ln l` are computed in f64 and rounded once to
//! T. Every sum's order depends only on the problem's sizes, never on threads.
//!
//! The body ([`q_group`], [`tile`]) is `#[inline(always)]` and generic over its four inner
//! loops ([`MicroKernels`]); `simd.rs` implements them once, over vector operations of
//! each CPU path, and instantiates the body per path (inside `#[target_feature]` functions
//! for AVX-512 and AVX2+FMA), so the same safe orchestration and the same micro-kernels
//! run on AVX-512, AVX2+FMA or the baseline target.

use super::{Job, Scratch};
use crate::columns::{for_each_column, for_each_column_mut};
use crate::score::{row_lse, row_output};
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// Most query blocks a group processes together (see [`q_group`]).
pub(super) const MAX_GROUP: usize = 8;

/// Key tiles per span: their sums are combined in T, then added to the f64 running sums
/// (see "Accuracy" in the module docs).
pub(super) const SPAN_TILES: usize = 8;

/// Where one key tile's sums go (see "Accuracy" in the module docs).
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    /// The tile opens a span: the span's sums start from its partials.
    pub first: bool,
    /// The tile closes a span (or the block's keys): the span's sums are added to the f64
    /// running sums instead of being stored.
    pub flush: bool,
}

/// Where one query block of a group stands.
#[derive(Clone, Copy, Default)]
struct Cursor {
    i0: usize,
    rows: usize,
    /// The next key tile starts here; tiles end at `j_end`.
    j_next: usize,
    j_end: usize,
    /// The band (causal/window) of the block's last query starts at `lo_last`, that of its
    /// first query ends at `hi_first`: keys in between are allowed for every query.
    lo_last: i64,
    hi_first: i64,
    /// Key tiles processed so far.
    tiles: usize,
}

/// Processes a group of consecutive query blocks from block `first_block` (`lse.len()`
/// queries, `BQ` per block but a short first block: [`Job::block_rows`]), writing query
/// `g0 + r` of the group (`g0` its first) to row `r` of `out` (the group's rows of the
/// caller's output, `lse.len() × d_v`, any strides) and to `lse[r]`. Nothing is written
/// before every tile of the group is done, so a group that meets an overflow writes
/// nothing.
///
/// Each block runs the online softmax over its own sequence of key tiles
/// (`BK` keys each, from the first key its band allows). The group walks the keys in
/// super-blocks of `job.super_keys` and, within each, advances every block through the
/// tiles that start there: K and V are then read from memory once per group instead of
/// once per block, and stay in cache while the group's blocks use them. Which blocks share
/// a group never changes a block's tiles or their order, so the results do not depend on
/// the grouping (nor on the number of threads).
///
/// `MK` supplies the inner loops and the tile sizes; `job.dvp` is a multiple of `MK::MRV`
/// and K is packed in panels of `MK::MR` keys.
#[inline(always)]
pub(super) fn q_group<T: Element, MK: MicroKernels<T>>(
    features: MK::Features,
    job: &Job<'_, T>,
    first_block: usize,
    scratch: &mut Scratch<T>,
    out: &mut MatMut<'_, T>,
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let (bq, d_k, dvp) = (MK::BQ, job.spec.d_k, job.dvp);
    debug_assert_eq!(out.shape(), (lse.len(), job.spec.d_v));
    // The group's queries are `g0..g0 + lse.len()`, block by block (`Job::block_rows`:
    // query i is in block (i + first_pad) / bq).
    let g0 = job.block_rows(first_block, bq).start;
    let blocks = (g0 + lse.len() + job.first_pad).div_ceil(bq) - first_block;
    debug_assert!(blocks <= MAX_GROUP && MK::BK.is_multiple_of(MK::MR));
    debug_assert!(dvp.is_multiple_of(MK::MRV));
    let mut cursors = [Cursor::default(); MAX_GROUP];
    for (b, cur) in cursors.iter_mut().enumerate().take(blocks) {
        let rows = job.block_rows(first_block + b, bq);
        debug_assert!(rows.end <= g0 + lse.len());
        *cur = start_block::<T, MK>(
            job,
            rows.start,
            rows.len(),
            block_of(scratch, b, bq, d_k, dvp),
        );
    }
    let cursors = &mut cursors[..blocks];
    let start = cursors.iter().map(|c| c.j_next).min().unwrap_or(0);
    let end = cursors.iter().map(|c| c.j_end).max().unwrap_or(0);
    let mut sb = start;
    while sb < end {
        let sb_end = sb + job.super_keys;
        for (b, cur) in cursors.iter_mut().enumerate() {
            let mut block = block_of(scratch, b, bq, d_k, dvp);
            while cur.j_next < cur.j_end && cur.j_next < sb_end {
                tile::<T, MK>(
                    features,
                    job,
                    cur,
                    block.qt,
                    &mut block.sums,
                    &mut block.tile,
                )?;
            }
        }
        sb = sb_end;
    }
    for (b, cur) in cursors.iter().enumerate() {
        let row0 = cur.i0 - g0;
        let lse = &mut lse[row0..row0 + cur.rows];
        finish_block(
            job,
            cur,
            bq,
            &block_of(scratch, b, bq, d_k, dvp).sums,
            (out, row0),
            lse,
        );
    }
    Ok(())
}

/// Block `b`'s part of a group's scratch (`BQ = bq` rows): its Qᵀ, its online-softmax
/// state, and the per-tile working memory every block shares.
struct Block<'a, T> {
    qt: &'a mut [T],
    sums: Sums<'a, T>,
    tile: TileScratch<'a, T>,
}

/// The scores tile, the factors of one step and the tile's ALiBi terms (shared by the
/// blocks of a group).
struct TileScratch<'a, T> {
    s: &'a mut [T],
    factors: Factors<'a, T>,
    alibi: &'a mut [T],
}

/// Splits `scratch` into block `b`'s slices (see [`Block`]).
#[inline(always)]
fn block_of<T: Element>(
    scratch: &mut Scratch<T>,
    b: usize,
    bq: usize,
    d_k: usize,
    dvp: usize,
) -> Block<'_, T> {
    let rows = b * bq..(b + 1) * bq;
    let cols = b * dvp * bq..(b + 1) * dvp * bq;
    Block {
        qt: &mut scratch.qt[b * d_k * bq..(b + 1) * d_k * bq],
        sums: Sums {
            m: &mut scratch.m[rows.clone()],
            m_run: &mut scratch.m_run[rows.clone()],
            l: &mut scratch.l[rows.clone()],
            l_span: &mut scratch.l_span[rows],
            acc: &mut scratch.acc[cols.clone()],
            acc_span: &mut scratch.acc_span[cols],
        },
        tile: TileScratch {
            alibi: &mut scratch.alibi[..],
            s: &mut scratch.s[..],
            factors: Factors {
                alpha: &mut scratch.alpha[..bq],
                beta: &mut scratch.beta[..bq],
                probe: &mut scratch.probe[..bq],
            },
        },
    }
}

/// Sets up the block of queries `i0..i0 + rows`: its Qᵀ (queries past `rows` are zero and
/// never written out), its softmax state, and the range of key tiles its band allows.
#[inline(always)]
fn start_block<T: Element, MK: MicroKernels<T>>(
    job: &Job<'_, T>,
    i0: usize,
    rows: usize,
    block: Block<'_, T>,
) -> Cursor {
    let (bq, spec) = (MK::BQ, &job.spec);
    for_each_column(&spec.q, i0..i0 + rows, &mut Vec::new(), |p, col| {
        let dst = &mut block.qt[p * bq..(p + 1) * bq];
        dst[..rows].copy_from_slice(col);
        dst[rows..].fill(T::zero());
    });
    // (The span sums need no initial value: a span's first tile overwrites them.)
    let sums = block.sums;
    sums.m.fill(T::NEG_INFINITY);
    sums.m_run.fill(T::NEG_INFINITY);
    sums.l.fill(0.0);
    sums.acc.fill(0.0);
    // The causal/window band is monotone in i.
    let (lo_first, hi_first) = spec.key_range(i0);
    let (lo_last, hi_last) = spec.key_range(i0 + rows - 1);
    let mr = MK::MR;
    Cursor {
        i0,
        rows,
        j_next: (lo_first.max(0) as usize / mr) * mr,
        j_end: if lo_first <= hi_last {
            hi_last as usize + 1
        } else {
            0
        },
        lo_last,
        hi_first,
        tiles: 0,
    }
}

/// A block's rows after its last tile: their lse and `out = acc / l · unscale` (the
/// fully-masked rule and the clamp to ±max|V| are in `score.rs`), lane by lane so that it
/// vectorises, into rows `row0..row0 + cur.rows` of `out`. After the last flush the
/// running sums are relative to `m_run`.
#[inline(always)]
fn finish_block<T: Element>(
    job: &Job<'_, T>,
    cur: &Cursor,
    bq: usize,
    sums: &Sums<'_, T>,
    (out, row0): (&mut MatMut<'_, T>, usize),
    lse: &mut [T],
) {
    let (m, l, acc) = (&*sums.m_run, &*sums.l, &*sums.acc);
    let rows = cur.rows;
    for r in 0..rows {
        lse[r] = T::from_f64_rounded(row_lse(m[r].to_f64(), l[r]));
    }
    let v_max = job.spec.out_max;
    // The reciprocals of the row sums (for `row_output`), 64 rows at a time (every path's
    // `BQ` is at most 64, so once per block).
    for r0 in (0..rows).step_by(64) {
        let n = 64.min(rows - r0);
        let mut inv = [0.0f64; 64];
        for (inv, &l) in inv.iter_mut().zip(&l[r0..r0 + n]) {
            *inv = 1.0 / l;
        }
        let l = &l[r0..r0 + n];
        let rows = row0 + r0..row0 + r0 + n;
        for_each_column_mut(out, rows, &mut Vec::new(), |c, dst| {
            let unscale = job.v_unscale.get(c).map_or(1.0, |u| u.to_f64());
            let src = &acc[c * bq + r0..c * bq + r0 + n];
            for (((dst, &src), &l), &inv) in dst.iter_mut().zip(src).zip(l).zip(&inv) {
                *dst = row_output(src, l, inv, unscale, v_max);
            }
        });
    }
}

/// The block's next key tile, `[j0, j0 + jn)` from `cur.j_next`: scores, scale, masks, the
/// online softmax step and `acc += P·V`, the sums going where the span position says.
#[inline(always)]
fn tile<T: Element, MK: MicroKernels<T>>(
    features: MK::Features,
    job: &Job<'_, T>,
    cur: &mut Cursor,
    qt: &[T],
    sums: &mut Sums<'_, T>,
    scratch: &mut TileScratch<'_, T>,
) -> Result<(), AttentionError> {
    let spec = &job.spec;
    let (bq, mr, d_k, dvp) = (MK::BQ, MK::MR, spec.d_k, job.dvp);
    let j0 = cur.j_next;
    let jn = MK::BK.min(spec.n_kv - j0);
    let step = Step {
        first: cur.tiles.is_multiple_of(SPAN_TILES),
        flush: cur.tiles % SPAN_TILES == SPAN_TILES - 1 || j0 + jn >= cur.j_end,
    };
    let jpad = jn.div_ceil(mr) * mr;
    let s = &mut scratch.s[..jpad * bq];
    let factors = &mut scratch.factors;

    // Scaled scores; only if one is not finite, look for one at an allowed position: an
    // overflow where nothing may attend is harmless. (Padding keys and queries are zero,
    // so their scores are 0 and never trip the check.)
    let kp = &job.kp[j0 * d_k..(j0 + jpad) * d_k];
    // ALiBi and the bias are applied as the scores are stored where they can be (see
    // `Spec::options_at_store`), saving a pass over the tile.
    let at_store = spec.options_at_store(cur.rows == bq);
    let epilogue = at_store.then(|| {
        let alibi = &mut scratch.alibi[..bq + jpad - 1];
        spec.alibi_terms(cur.i0, j0, bq, jpad, alibi);
        Epilogue {
            alibi: spec.alibi_slope.map(|_| &*alibi),
            bias: spec.bias.as_ref().map(|m| BiasTile {
                m,
                i0: cur.i0,
                j0,
                jn,
            }),
        }
    });
    if !MK::scores(
        features,
        qt,
        kp,
        d_k,
        spec.scale,
        epilogue,
        s,
        factors.probe,
    ) && let Some(err) = first_overflow(spec, s, bq, cur.i0, cur.rows, j0, jn)
    {
        return Err(err);
    }
    mask_tile::<T, MK>(features, spec, cur, (j0, jn), at_store, s);
    if spec.bias.is_some() || spec.mask.is_some() {
        prefetch_options(spec, cur, j0 + jn..(j0 + jn + MK::BK).min(cur.j_end));
    }
    MK::softmax_step(features, s, step, sums, factors);
    if let Some(dropout) = &spec.dropout {
        // The weights are in `s`, their sum `l` already taken: drop or scale each one
        // before `P·V`.
        for (c, column) in s.chunks_exact_mut(bq).enumerate().take(jn) {
            for (r, w) in column.iter_mut().enumerate().take(cur.rows) {
                *w *= dropout.factor(cur.i0 + r, j0 + c);
            }
        }
    }
    // The step's keys in every panel of V: panel t from t·v_panel (none when d_v = 0).
    let vp = job.vp.get(j0 * MK::MRV..).unwrap_or_default();
    let (alpha, beta) = (&*factors.alpha, &*factors.beta);
    MK::pv(
        features,
        s,
        vp,
        job.v_panel,
        dvp,
        step,
        sums.acc,
        sums.acc_span,
        alpha,
        beta,
    );
    cur.j_next = j0 + jn;
    cur.tiles += 1;
    Ok(())
}

/// The options of the score definition on the tile `s` (keys `[j0, j0 + jn)` of the
/// block at `cur`, `bq` query lanes): options acting on single scores through
/// `Spec::modify`; otherwise only the causal/window band, and only where it cuts the
/// tile. Keys past `jn` (padding to the panel size) and query lanes past the block's rows
/// become −∞ where the options run. With `at_store` the scores hold ALiBi and the bias
/// already (`MicroKernels::scores`), and the rest runs as if there were neither.
#[inline(always)]
fn mask_tile<T: Element, MK: MicroKernels<T>>(
    features: MK::Features,
    spec: &crate::spec::Spec<'_, T>,
    cur: &Cursor,
    (j0, jn): (usize, usize),
    at_store: bool,
    s: &mut [T],
) {
    let (i0, rows, bq) = (cur.i0, cur.rows, MK::BQ);
    let elementwise = if at_store {
        spec.has_elementwise_besides_store()
    } else {
        spec.has_elementwise()
    };
    if elementwise {
        // The softcap first, on the whole tile at once with the path's vector `tanh`
        // (per score, the scalar form was most of a softcapped call's extra time); the
        // other options after it, as `Spec::modify` orders them.
        if let Some(c) = spec.softcap {
            MK::softcap(features, &mut s[..jn * bq], c);
        }
        for j in 0..jn {
            spec.modify_column(j0 + j, i0, &mut s[j * bq..j * bq + rows], at_store);
            s[j * bq + rows..(j + 1) * bq].fill(T::NEG_INFINITY);
        }
    } else if !(cur.lo_last <= j0 as i64 && cur.hi_first >= (j0 + jn - 1) as i64) {
        // Causal / window only, and the band cuts this tile: for key j the allowed
        // queries are a contiguous range.
        for j in 0..jn {
            let (i_lo, i_hi) = spec.band.queries(j0 + j);
            let r_lo = (i_lo - i0 as i64).clamp(0, bq as i64) as usize;
            let r_hi = (i_hi - i0 as i64 + 1).clamp(r_lo as i64, bq as i64) as usize;
            let row = &mut s[j * bq..(j + 1) * bq];
            row[..r_lo].fill(T::NEG_INFINITY);
            row[r_hi..].fill(T::NEG_INFINITY);
        }
    }
    s[jn * bq..].fill(T::NEG_INFINITY);
}

/// Asks for the bias and bool-mask entries of the block's rows at `keys` (its next tile)
/// while this tile is computed: each tile reads a piece of every key's column of them,
/// one piece per page when they are large, and without the hint the block kernel waited
/// on them (f32, n 4096, d 128: a bias at 0.64 of the plain rate, 0.72 with it).
/// Out of line: most calls have neither, and the tile loop stays as it was for them.
#[inline(never)]
fn prefetch_options<T: Element>(
    spec: &crate::spec::Spec<'_, T>,
    cur: &Cursor,
    keys: std::ops::Range<usize>,
) {
    fn pieces<X: nalgebra::Scalar>(
        m: &crate::options::MatRef<'_, X>,
        cur: &Cursor,
        keys: std::ops::Range<usize>,
    ) {
        if m.strides().0 != 1 || cur.rows == 0 {
            return;
        }
        let last = cur.i0 + cur.rows - 1;
        for j in keys {
            for i in (cur.i0..last).step_by(crate::kernel::LINE / size_of::<X>()) {
                crate::kernel::simd::prefetch(&m[(i, j)]);
            }
            crate::kernel::simd::prefetch(&m[(last, j)]);
        }
    }
    if let Some(bias) = &spec.bias {
        pieces(bias, cur, keys.clone());
    }
    if let Some(mask) = &spec.mask {
        pieces(mask, cur, keys);
    }
}

/// What [`MicroKernels::scores`] applies to a tile's scaled scores as it stores them
/// ([`Spec::options_at_store`](crate::spec::Spec::options_at_store)): the ALiBi terms,
/// one per diagonal (`alibi[r − j + jpad − 1]` for lane `r` and tile key `j`,
/// [`Spec::alibi_terms`](crate::spec::Spec::alibi_terms)), subtracted, then the bias,
/// added.
#[derive(Clone, Copy)]
pub(super) struct Epilogue<'a, T: nalgebra::Scalar> {
    pub alibi: Option<&'a [T]>,
    pub bias: Option<BiasTile<'a, T>>,
}

/// The bias entries `bias[(i0 + r, j0 + j)]`, `r < BQ`, `j < jn`, of an [`Epilogue`] (the
/// view has row stride 1).
#[derive(Clone, Copy)]
pub(super) struct BiasTile<'a, T: nalgebra::Scalar> {
    pub m: &'a crate::options::MatRef<'a, T>,
    pub i0: usize,
    pub j0: usize,
    pub jn: usize,
}

/// One query block's online-softmax state, per row `r` (and value column `c`); see
/// "Accuracy" in the module docs.
pub(super) struct Sums<'a, T> {
    /// The running maximum `m`.
    pub m: &'a mut [T],
    /// The maximum the running sums are relative to: `m` at the last flush.
    pub m_run: &'a mut [T],
    /// The running sums in f64, `l[r]` and `acc[c][r]`.
    pub l: &'a mut [f64],
    pub acc: &'a mut [f64],
    /// The current span's sums in T, relative to `m`: `l_span[r]`, `acc_span[c][r]`.
    pub l_span: &'a mut [T],
    pub acc_span: &'a mut [T],
}

/// Per-tile working memory, `BQ` each: the rescale factors `softmax_step` leaves for `pv`
/// (`alpha = exp(m − m')` for the span sums, `beta = exp(m_run − m')` for the running
/// sums, the latter only when flushing) and the scratch of `scores`' finiteness probe.
pub(super) struct Factors<'a, T> {
    pub alpha: &'a mut [T],
    pub beta: &'a mut [f64],
    pub probe: &'a mut [T],
}

/// The four inner loops of the block kernel, with their tile sizes; implemented once, for
/// every CPU path, in `simd.rs` (`Simd`).
///
/// Layouts (all row-major, `BQ` query lanes per row):
/// - `scores`: `s[j][r] = scale · Σ_p kp[j/MR][p][j%MR] · qt[p][r]` for `j < s.len()/BQ`
///   (a multiple of `MR`), then with an [`Epilogue`] `− alibi[r − j + jpad − 1]` and
///   `+ bias[(i0 + r, j0 + j)]` (for `j < jn`), as `Spec::modify_column` orders them;
///   false if any scaled score (before them) is not finite (`probe`: `BQ` scratch);
/// - `softmax_step`: the online-softmax update of the module docs over all rows of `s`,
///   turning scores into `p = exp(s − m')` and updating `m`; `L[r] = Σ_j p[j][r]` is summed
///   in T from zero, in key order, and goes where `step` says (the span sum
///   `Λ = L` or `α·Λ + L` in T, then when flushing `l = β·l + Λ` in f64; see "Accuracy"
///   in the module docs), with `alpha = exp(m − m')` in T and, when flushing,
///   `beta = exp(m_run − m')` in f64 (then `m_run = m'`), both written to `factors`;
/// - `pv`: `P[c][r] = Σ_j vp[c/MRV·v_panel + j·MRV + c%MRV] · p[j][r]` (V's panels of
///   `MRV` columns, from the step's first key; `j < p.len()/BQ`) summed in T from zero, in
///   key order, going where `step` says with the same `alpha` and `beta`; `c < dvp` (a
///   multiple of `MRV`).
///
/// With `V ≡ 1` the two updates perform the same operations (`fma(1, p, a) = p + a`), so
/// `acc = l` exactly.
///
/// Every method takes a value of [`MicroKernels::Features`], the proof that the CPU has
/// the instructions the implementation uses: `()` for the portable path, a token that
/// only CPU detection makes for the SIMD ones (`simd.rs`). A token rather than `unsafe fn`:
/// these loops are called from the safe, generic block kernel of this file, so an
/// `unsafe fn` would move a precondition no type checks (and `unsafe` blocks) into it;
/// with a token, safe code cannot call an AVX kernel on a CPU that was not found to have
/// AVX, and the one `unsafe` step stays where the token is checked.
pub(super) trait MicroKernels<T: Element> {
    /// Proof that this CPU can run these kernels (see above).
    type Features: Copy;
    /// Keys per register tile and per packed K panel.
    const MR: usize;
    /// Queries per block.
    const BQ: usize;
    /// Value columns per register tile.
    const MRV: usize;
    /// Keys per online-softmax step (a multiple of `MR`).
    const BK: usize;
    #[allow(clippy::too_many_arguments)] // the tile's operands, as slices
    fn scores(
        features: Self::Features,
        qt: &[T],
        kp: &[T],
        d_k: usize,
        scale: T,
        epilogue: Option<Epilogue<'_, T>>,
        s: &mut [T],
        probe: &mut [T],
    ) -> bool;
    /// The softcap `c·tanh(x/c)` of every entry of `s` (a multiple of `BQ` entries), in
    /// place: `simd.rs`'s vector `tanh_v`, with fused operations where the path has them
    /// (the scalar `Spec::modify_column` form serves the other kernels). A tile whose
    /// `|x/c|` are all provably below the switch at 0.625 (the usual case: softcaps sit
    /// above the scores) skips the exponential branch; the bits are the same.
    fn softcap(features: Self::Features, s: &mut [T], c: T);
    fn softmax_step(
        features: Self::Features,
        s: &mut [T],
        step: Step,
        sums: &mut Sums<'_, T>,
        factors: &mut Factors<'_, T>,
    );
    #[allow(clippy::too_many_arguments)] // the sums and factors it reads, as slices
    fn pv(
        features: Self::Features,
        p: &[T],
        vp: &[T],
        v_panel: usize,
        dvp: usize,
        step: Step,
        acc: &mut [f64],
        acc_span: &mut [T],
        alpha: &[T],
        beta: &[f64],
    );
}

/// The first non-finite scaled score at an allowed position of the tile, in (query, key)
/// order, as an error.
#[cold]
fn first_overflow<T: Element>(
    spec: &crate::spec::Spec<'_, T>,
    s: &[T],
    bq: usize,
    i0: usize,
    rows: usize,
    j0: usize,
    jn: usize,
) -> Option<AttentionError> {
    for r in 0..rows {
        for j in 0..jn {
            if !s[j * bq + r].finite() && spec.allowed(i0 + r, j0 + j) {
                return Some(AttentionError::ScoreOverflow {
                    query: i0 + r,
                    key: j0 + j,
                });
            }
        }
    }
    None
}
