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
//! the step uses 0 in place of `m'` so that every `p_j = exp(−∞) = 0` and nothing is NaN.
//!
//! # Accuracy
//! A row's sums `l = Σ_j p_j` and `acc_c = Σ_j p_j·v_jc` run over all `n_kv` keys. Added
//! one by one into a single accumulator of the element type, each term would be rounded
//! up to `n_kv` times: a relative error up to `n_kv·u` (`u = T::EPSILON`), e.g. 1.005
//! instead of 1 for f32 at 2²⁰ keys. So each sum is computed in two levels:
//! ```text
//! P_J = Σ_{j∈J} p_j·v_j,  L_J = Σ_{j∈J} p_j      in T, from zero, over the BK ≤ 64 keys of tile J
//! acc' = α·acc + P_J,      l' = α·l + L_J         in f64, α = exp(m − m') computed in f64
//! ```
//! A term is then rounded at most `BK` times in T (its product and the additions after it
//! within its tile) and at most `2·(tiles − 1)` times in f64 (the FMA, or multiply and add,
//! of each later tile; the first tile's flush into 0 is exact), and it is multiplied by at
//! most `tiles − 1` rescale factors, each within 2 ulp of f64. Relative to `Σ_j |p_j·v_j|`:
//! ```text
//! |error| ≤ BK·u/2 + 3·(⌈n_kv/BK⌉ − 1)·u₆₄          (u₆₄ = f64::EPSILON)
//! ```
//! For f32 the second term is below `10⁻⁴·u` for any `n_kv ≤ 2²⁴`: the error no longer
//! grows with the row. For f64 it is the two-level bound, `⌈n_kv/BK⌉` instead of `n_kv`.
//! The output `acc / l` and `lse = m + ln l` are computed in f64 and rounded once to T.
//! Every sum's order depends only on the problem's sizes, never on threads.
//!
//! The body ([`q_group`], [`tile`]) is `#[inline(always)]` and generic over its four inner
//! loops ([`MicroKernels`]); `simd.rs` instantiates it once per CPU path inside
//! `#[target_feature]` functions with SIMD micro-kernels, and once with the [`Portable`]
//! ones, so the same safe orchestration runs on AVX-512, AVX2+FMA or the baseline target.

use super::exp::madd;
use super::{Job, Scratch};
use crate::columns::for_each_column;
use crate::{AttentionError, Element, error::Operand};

/// Most query blocks a group processes together (see [`q_group`]).
pub(super) const MAX_GROUP: usize = 8;

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
}

/// Processes a group of consecutive query blocks from block `first_block` (`lse.len()`
/// queries, `BQ` per block), writing each block's output to `out[b·len + c·BQ + r]`
/// (`len = BQ·max(d_v, 1)`) and `lse[b·BQ + r]`.
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
    job: &Job<'_, T>,
    first_block: usize,
    scratch: &mut Scratch<T>,
    out: &mut [T],
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let (bq, mr, mrv, bk) = (MK::BQ, MK::MR, MK::MRV, MK::BK);
    let spec = &job.spec;
    let (n_kv, d_k, d_v) = (spec.n_kv, spec.d_k, spec.d_v);
    let dvp = job.dvp;
    let blocks = lse.len().div_ceil(bq);
    let block_len = bq * d_v.max(1);
    debug_assert!(blocks <= MAX_GROUP && bk.is_multiple_of(mr) && dvp.is_multiple_of(mrv));

    let Scratch {
        qt,
        s,
        acc,
        m,
        l,
        alpha,
        m_ref,
        l_blk,
    } = scratch;
    let (alpha, m_ref, l_blk) = (&mut alpha[..bq], &mut m_ref[..bq], &mut l_blk[..bq]);

    // Set up every block: Qᵀ (queries past n_q are zero and never written out), the
    // softmax state, and the range of key tiles its band allows.
    let mut cursors = [Cursor::default(); MAX_GROUP];
    for (b, cur) in cursors.iter_mut().enumerate().take(blocks) {
        let i0 = (first_block + b) * bq;
        let rows = bq.min(lse.len() - b * bq);
        let qt = &mut qt[b * d_k * bq..(b + 1) * d_k * bq];
        for_each_column(&spec.q, i0..i0 + rows, &mut Vec::new(), |p, col| {
            let dst = &mut qt[p * bq..(p + 1) * bq];
            dst[..rows].copy_from_slice(col);
            dst[rows..].fill(T::zero());
        });
        m[b * bq..(b + 1) * bq].fill(T::NEG_INFINITY);
        l[b * bq..(b + 1) * bq].fill(0.0);
        acc[b * dvp * bq..(b + 1) * dvp * bq].fill(0.0);
        // The causal/window band is monotone in i.
        let (lo_first, hi_first) = spec.key_range(i0);
        let (lo_last, hi_last) = spec.key_range(i0 + rows - 1);
        *cur = Cursor {
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
        };
    }

    let cursors = &mut cursors[..blocks];
    let start = cursors.iter().map(|c| c.j_next).min().unwrap_or(0);
    let end = cursors.iter().map(|c| c.j_end).max().unwrap_or(0);
    let mut sb = start;
    while sb < end {
        let sb_end = sb + job.super_keys;
        for (b, cur) in cursors.iter_mut().enumerate() {
            while cur.j_next < cur.j_end && cur.j_next < sb_end {
                let j0 = cur.j_next;
                let jn = bk.min(n_kv - j0);
                tile::<T, MK>(
                    job,
                    cur,
                    j0,
                    jn,
                    &qt[b * d_k * bq..(b + 1) * d_k * bq],
                    &mut acc[b * dvp * bq..(b + 1) * dvp * bq],
                    &mut m[b * bq..(b + 1) * bq],
                    &mut l[b * bq..(b + 1) * bq],
                    &mut s[..jn.div_ceil(mr) * mr * bq],
                    alpha,
                    m_ref,
                    l_blk,
                )?;
                cur.j_next = j0 + jn;
            }
        }
        sb = sb_end;
    }

    for (b, cur) in cursors.iter().enumerate() {
        let (m, l) = (&m[b * bq..(b + 1) * bq], &l[b * bq..(b + 1) * bq]);
        let acc = &acc[b * dvp * bq..(b + 1) * dvp * bq];
        let out = &mut out[b * block_len..(b + 1) * block_len];
        let lse = &mut lse[b * bq..b * bq + cur.rows];
        let rows = cur.rows;
        // No key allowed (l = 0): output 0, lse −∞ (the documented fully-masked rule).
        for r in 0..rows {
            lse[r] = if l[r] == 0.0 {
                T::NEG_INFINITY
            } else {
                T::from_f64_rounded(m[r].to_f64() + l[r].ln())
            };
        }
        // out = acc / l (times the column's power-of-two unscale) in f64, rounded once to T,
        // lane by lane so that it vectorises; the result is a convex combination of values
        // and cannot overflow, the check is a guard.
        let mut all_finite = true;
        for c in 0..d_v {
            let unscale = job.v_unscale.get(c).map_or(1.0, |u| u.to_f64());
            let src = &acc[c * bq..c * bq + rows];
            let dst = &mut out[c * bq..c * bq + rows];
            for r in 0..rows {
                let o = if l[r] == 0.0 {
                    T::zero()
                } else {
                    T::from_f64_rounded(src[r] / l[r] * unscale)
                };
                all_finite &= o.finite();
                dst[r] = o;
            }
        }
        if !all_finite {
            let (r, c) = (0..d_v)
                .flat_map(|c| (0..rows).map(move |r| (r, c)))
                .find(|&(r, c)| !out[c * bq + r].finite())
                .unwrap_or((0, 0));
            return Err(AttentionError::ProductOverflow {
                operand: Operand::Output,
                row: cur.i0 + r,
                column: c,
            });
        }
    }
    Ok(())
}

/// One key tile `[j0, j0 + jn)` of one query block: scores, scale, masks, the online
/// softmax step and `acc += P·V`.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the block's state, passed as the slices it uses
fn tile<T: Element, MK: MicroKernels<T>>(
    job: &Job<'_, T>,
    cur: &Cursor,
    j0: usize,
    jn: usize,
    qt: &[T],
    acc: &mut [f64],
    m: &mut [T],
    l: &mut [f64],
    s: &mut [T],
    alpha: &mut [f64],
    m_ref: &mut [T],
    l_blk: &mut [T],
) -> Result<(), AttentionError> {
    let spec = &job.spec;
    let (bq, d_k, dvp) = (MK::BQ, spec.d_k, job.dvp);
    let (i0, rows) = (cur.i0, cur.rows);
    let jpad = s.len() / bq;

    // Scaled scores; only if one is not finite, look for one at an allowed position: an
    // overflow where nothing may attend is harmless. (Padding keys and queries are zero,
    // so their scores are 0 and never trip the check.)
    let kp = &job.kp[j0 * d_k..(j0 + jpad) * d_k];
    if !MK::scores(qt, kp, d_k, spec.scale, s, l_blk)
        && let Some(err) = first_overflow(spec, s, bq, i0, rows, j0, jn)
    {
        return Err(err);
    }
    if spec.has_elementwise() {
        for j in 0..jn {
            let row = &mut s[j * bq..(j + 1) * bq];
            for (r, x) in row.iter_mut().enumerate() {
                *x = if r < rows {
                    spec.modify(i0 + r, j0 + j, *x)
                } else {
                    T::NEG_INFINITY
                };
            }
        }
    } else if !(cur.lo_last <= j0 as i64 && cur.hi_first >= (j0 + jn - 1) as i64) {
        // Causal / window only, and the band cuts this tile: for key j the allowed
        // queries are the contiguous range j − band_hi ≤ i ≤ j − band_lo.
        for j in 0..jn {
            let jj = (j0 + j) as i64;
            let r_lo = (jj - spec.band_hi - i0 as i64).clamp(0, bq as i64) as usize;
            let r_hi = (jj - spec.band_lo - i0 as i64 + 1).clamp(r_lo as i64, bq as i64) as usize;
            let row = &mut s[j * bq..(j + 1) * bq];
            row[..r_lo].fill(T::NEG_INFINITY);
            row[r_hi..].fill(T::NEG_INFINITY);
        }
    }
    s[jn * bq..].fill(T::NEG_INFINITY);

    MK::softmax_step(s, m, l, alpha, m_ref, l_blk);
    MK::pv(s, &job.vp[j0 * dvp..(j0 + jpad) * dvp], dvp, acc, alpha);
    Ok(())
}

/// The four inner loops of the block kernel, with their tile sizes. The portable
/// implementation is [`Portable`]; the SIMD ones are in `simd.rs`.
///
/// Layouts (all row-major, `BQ` query lanes per row):
/// - `scores`: `s[j][r] = scale · Σ_p kp[j/MR][p][j%MR] · qt[p][r]` for `j < s.len()/BQ`
///   (a multiple of `MR`); false if any result is not finite (`probe`: `BQ` scratch);
/// - `softmax_step`: the online-softmax update of the module docs over all rows of `s`,
///   turning scores into `p`, updating `m`, `l` and writing `alpha`: `α` in f64 from the
///   maxima widened to f64, `l[r] = α[r]·l[r] + L[r]` in f64 where `L[r] = Σ_j p[j][r]` is
///   summed in T from zero, in key order (`l_blk`: `BQ` scratch);
/// - `pv`: `acc[c][r] = alpha[r]·acc[c][r] + P[c][r]` in f64, where
///   `P[c][r] = Σ_j vp[j][c] · p[j][r]` is summed in T from zero, in key order; `c < dvp` (a
///   multiple of `MRV`).
///
/// With `V ≡ 1` the two updates perform the same operations (`fma(1, p, a) = p + a`), so
/// `acc = l` exactly.
pub(super) trait MicroKernels<T: Element> {
    /// Keys per register tile and per packed K panel.
    const MR: usize;
    /// Queries per block.
    const BQ: usize;
    /// Value columns per register tile.
    const MRV: usize;
    /// Keys per online-softmax step (a multiple of `MR`).
    const BK: usize;
    fn scores(qt: &[T], kp: &[T], d_k: usize, scale: T, s: &mut [T], probe: &mut [T]) -> bool;
    fn softmax_step(
        s: &mut [T],
        m: &mut [T],
        l: &mut [f64],
        alpha: &mut [f64],
        m_ref: &mut [T],
        l_blk: &mut [T],
    );
    fn pv(p: &[T], vp: &[T], dvp: usize, acc: &mut [f64], alpha: &[f64]);
}

/// Plain-Rust micro-kernels over fixed-size arrays (`MR × NR` register tiles), with or
/// without fused multiply-add; the compiler vectorises them as well as it can for the
/// target's baseline.
pub(super) struct Portable<
    const FMA: bool,
    const MR: usize,
    const NR: usize,
    const BQ: usize,
    const MRV: usize,
    const BK: usize,
>;

impl<
    T: Element,
    const FMA: bool,
    const MR: usize,
    const NR: usize,
    const BQ: usize,
    const MRV: usize,
    const BK: usize,
> MicroKernels<T> for Portable<FMA, MR, NR, BQ, MRV, BK>
{
    const MR: usize = MR;
    const BQ: usize = BQ;
    const MRV: usize = MRV;
    const BK: usize = BK;
    #[inline(always)]
    fn scores(qt: &[T], kp: &[T], d_k: usize, scale: T, s: &mut [T], probe: &mut [T]) -> bool {
        scores::<T, FMA, MR, NR, BQ>(qt, kp, d_k, s);
        apply_scale::<T, BQ>(scale, s, probe)
    }
    #[inline(always)]
    fn softmax_step(
        s: &mut [T],
        m: &mut [T],
        l: &mut [f64],
        alpha: &mut [f64],
        m_ref: &mut [T],
        l_blk: &mut [T],
    ) {
        let jpad = s.len() / BQ;
        softmax_step::<T, FMA, BQ>(s, jpad, m, l, alpha, m_ref, l_blk);
    }
    #[inline(always)]
    fn pv(p: &[T], vp: &[T], dvp: usize, acc: &mut [f64], alpha: &[f64]) {
        pv::<T, FMA, NR, BQ, MRV>(p, vp, dvp, acc, alpha);
    }
}

/// `s[j][r] = Σ_p kp[j][p] · qt[p][r]` for `j < s.len()/BQ`; `kp` is packed in panels of `MR`
/// keys, each `d_k × MR` (`kp[panel][p][m]`).
#[inline(always)]
fn scores<T: Element, const FMA: bool, const MR: usize, const NR: usize, const BQ: usize>(
    qt: &[T],
    kp: &[T],
    d_k: usize,
    s: &mut [T],
) {
    let jpad = s.len() / BQ;
    for jt in (0..jpad).step_by(MR) {
        let panel = &kp[jt * d_k..(jt + MR) * d_k];
        for rt in (0..BQ).step_by(NR) {
            let mut a = [[T::zero(); NR]; MR];
            for p in 0..d_k {
                let qv: &[T; NR] = qt[p * BQ + rt..p * BQ + rt + NR].try_into().unwrap();
                let kv: &[T; MR] = panel[p * MR..(p + 1) * MR].try_into().unwrap();
                for mi in 0..MR {
                    for r in 0..NR {
                        a[mi][r] = madd::<T, FMA>(kv[mi], qv[r], a[mi][r]);
                    }
                }
            }
            for (mi, row) in a.iter().enumerate() {
                s[(jt + mi) * BQ + rt..(jt + mi) * BQ + rt + NR].copy_from_slice(row);
            }
        }
    }
}

/// Multiplies raw scores by the scale in place; false if any result is NaN or ±∞.
///
/// The check runs lane by lane (`probe[r] += x − x` is 0 for finite `x`, NaN otherwise) so
/// that it vectorises like the multiplication.
#[inline(always)]
fn apply_scale<T: Element, const BQ: usize>(scale: T, s: &mut [T], probe: &mut [T]) -> bool {
    let probe = &mut probe[..BQ];
    probe.fill(T::zero());
    for row in s.chunks_exact_mut(BQ) {
        for r in 0..BQ {
            let x = row[r] * scale;
            row[r] = x;
            #[allow(clippy::eq_op)] // x − x is 0 for finite x, NaN otherwise: the point
            {
                probe[r] += x - x;
            }
        }
    }
    probe.iter().all(|&p| p == T::zero())
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

/// Turns the score tile into `p = exp(s − m')` and updates `m`, `l`; leaves `α` for `pv`.
#[inline(always)]
fn softmax_step<T: Element, const FMA: bool, const BQ: usize>(
    s: &mut [T],
    jpad: usize,
    m: &mut [T],
    l: &mut [f64],
    alpha: &mut [f64],
    m_ref: &mut [T],
    l_blk: &mut [T],
) {
    let m_blk = l_blk; // reused: first the block maximum, then the block sum
    m_blk.fill(T::NEG_INFINITY);
    for j in 0..jpad {
        let row = &s[j * BQ..(j + 1) * BQ];
        for r in 0..BQ {
            m_blk[r] = if row[r] > m_blk[r] { row[r] } else { m_blk[r] };
        }
    }
    for r in 0..BQ {
        let m_new = if m_blk[r] > m[r] { m_blk[r] } else { m[r] };
        let m_use = if m_new == T::NEG_INFINITY {
            T::zero()
        } else {
            m_new
        };
        // In f64, where the difference of the maxima is exact for f32.
        alpha[r] = (m[r].to_f64() - m_use.to_f64()).exp_nonpos::<FMA>();
        m[r] = m_new;
        m_ref[r] = m_use;
        m_blk[r] = T::zero();
    }
    let l_blk = m_blk;
    for j in 0..jpad {
        let row = &mut s[j * BQ..(j + 1) * BQ];
        for r in 0..BQ {
            let e = (row[r] - m_ref[r]).exp_nonpos::<FMA>();
            row[r] = e;
            l_blk[r] += e;
        }
    }
    for r in 0..BQ {
        l[r] = madd::<f64, FMA>(alpha[r], l[r], l_blk[r].to_f64());
    }
}

/// `acc[c][r] = α[r]·acc[c][r] + P[c][r]` in f64, `P[c][r] = Σ_j vp[j][c] · p[j][r]` in T
/// from zero.
#[inline(always)]
fn pv<T: Element, const FMA: bool, const NR: usize, const BQ: usize, const MRV: usize>(
    p: &[T],
    vp: &[T],
    dvp: usize,
    acc: &mut [f64],
    alpha: &[f64],
) {
    let jpad = p.len() / BQ;
    for ct in (0..dvp).step_by(MRV) {
        for rt in (0..BQ).step_by(NR) {
            let al: &[f64; NR] = alpha[rt..rt + NR].try_into().unwrap();
            let mut a = [[T::zero(); NR]; MRV];
            for j in 0..jpad {
                let pr: &[T; NR] = p[j * BQ + rt..j * BQ + rt + NR].try_into().unwrap();
                let vr: &[T; MRV] = vp[j * dvp + ct..j * dvp + ct + MRV].try_into().unwrap();
                for mi in 0..MRV {
                    for r in 0..NR {
                        a[mi][r] = madd::<T, FMA>(vr[mi], pr[r], a[mi][r]);
                    }
                }
            }
            for (mi, row) in a.iter().enumerate() {
                let dst = &mut acc[(ct + mi) * BQ + rt..(ct + mi) * BQ + rt + NR];
                for r in 0..NR {
                    dst[r] = madd::<f64, FMA>(al[r], dst[r], row[r].to_f64());
                }
            }
        }
    }
}
