//! The fused kernel body: one block of queries against all its keys, with online softmax.
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
//! The body is `#[inline(always)]` and generic over the register-tile sizes; `simd.rs`
//! instantiates it once per CPU path inside `#[target_feature]` functions, so the same safe
//! code compiles to AVX-512, AVX2+FMA or baseline SSE2.

use super::exp::madd;
use super::{Job, Scratch};
use crate::{AttentionError, Element, error::Operand};

/// Processes query block `qb` (`BQ` queries from `qb·BQ`), writing `out_cols[c][r]`
/// (`d_v` column segments of the output) and `lse[r]`.
///
/// `MR` keys × `NR` queries is the register tile of `Sᵀ = K·Qᵀ`; `MRV` value columns × `NR`
/// queries that of `Oᵀ += Vᵀ·Pᵀ`. `BQ` is a multiple of `NR`, the block of keys a multiple
/// of `MR`, `job.dvp` a multiple of `MRV`.
#[inline(always)]
pub(super) fn q_block<
    T: Element,
    const FMA: bool,
    const MR: usize,
    const NR: usize,
    const BQ: usize,
    const MRV: usize,
>(
    job: &Job<'_, T>,
    qb: usize,
    scratch: &mut Scratch<T>,
    out_cols: &mut [&mut [T]],
    lse: &mut [T],
) -> Result<(), AttentionError> {
    let spec = &job.spec;
    let (n_q, n_kv, d_k, d_v) = (spec.n_q, spec.n_kv, spec.d_k, spec.d_v);
    let dvp = job.dvp;
    let bk = job.bk;
    let i0 = qb * BQ;
    let rows = BQ.min(n_q - i0);
    debug_assert!(rows > 0 && bk % MR == 0 && dvp % MRV == 0 && BQ % NR == 0);

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
    let qt = &mut qt[..d_k * BQ];
    let acc = &mut acc[..dvp * BQ];
    let (m, l, alpha, m_ref, l_blk) = (
        &mut m[..BQ],
        &mut l[..BQ],
        &mut alpha[..BQ],
        &mut m_ref[..BQ],
        &mut l_blk[..BQ],
    );

    // Qᵀ for this block; queries past n_q are zero and never written out.
    for p in 0..d_k {
        let col = job.q.column(p);
        let dst = &mut qt[p * BQ..(p + 1) * BQ];
        for (r, d) in dst.iter_mut().enumerate() {
            *d = if r < rows { col[i0 + r] } else { T::zero() };
        }
    }
    m.fill(T::NEG_INFINITY);
    l.fill(T::zero());
    acc.fill(T::zero());

    // Keys this block can see at all: the causal/window band is monotone in i.
    let (lo_first, _) = spec.key_range(i0);
    let (lo_last, hi_last) = spec.key_range(i0 + rows - 1);
    let (_, hi_first) = spec.key_range(i0);
    let elementwise = spec.has_elementwise();
    if lo_first <= hi_last {
        let mut j0 = (lo_first as usize / MR) * MR;
        let j_end = hi_last as usize + 1;
        while j0 < j_end {
            let jn = bk.min(n_kv - j0);
            let jpad = jn.div_ceil(MR) * MR;
            let s = &mut s[..jpad * BQ];

            scores::<T, FMA, MR, NR, BQ>(qt, &job.kp[j0 * d_k..(j0 + jpad) * d_k], d_k, s);

            let inside = !elementwise && lo_last <= j0 as i64 && hi_first >= (j0 + jn - 1) as i64;
            if inside {
                if !apply_scale::<T, BQ>(spec.scale, &mut s[..jn * BQ], l_blk) {
                    return Err(first_overflow::<T, BQ>(s, i0, rows, j0, jn));
                }
            } else {
                for j in 0..jn {
                    let row = &mut s[j * BQ..(j + 1) * BQ];
                    for (r, x) in row.iter_mut().enumerate() {
                        *x = if r < rows {
                            let (i, jj) = (i0 + r, j0 + j);
                            let scaled = *x * spec.scale;
                            if !scaled.finite() && spec.allowed(i, jj) {
                                return Err(AttentionError::ScoreOverflow { query: i, key: jj });
                            }
                            spec.modify(i, jj, scaled)
                        } else {
                            T::NEG_INFINITY
                        };
                    }
                }
            }
            s[jn * BQ..].fill(T::NEG_INFINITY);

            softmax_step::<T, FMA, BQ>(s, jpad, m, l, alpha, m_ref, l_blk);
            pv::<T, FMA, NR, BQ, MRV>(s, &job.vp[j0 * dvp..(j0 + jpad) * dvp], dvp, acc, alpha);
            j0 += jn;
        }
    }

    for r in 0..rows {
        if l[r] == T::zero() {
            // No key allowed: output 0, lse −∞ (the documented fully-masked rule).
            lse[r] = T::NEG_INFINITY;
            for col in out_cols.iter_mut() {
                col[r] = T::zero();
            }
        } else {
            lse[r] = m[r] + l[r].ln();
            for (c, col) in out_cols.iter_mut().enumerate().take(d_v) {
                let o = acc[c * BQ + r] / l[r];
                if !o.finite() {
                    return Err(AttentionError::ProductOverflow {
                        operand: Operand::Output,
                        row: i0 + r,
                        column: c,
                    });
                }
                col[r] = o;
            }
        }
    }
    Ok(())
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
            probe[r] += x - x;
        }
    }
    probe.iter().all(|&p| p == T::zero())
}

/// The first non-finite scaled score of a tile whose positions are all allowed.
#[cold]
fn first_overflow<T: Element, const BQ: usize>(
    s: &[T],
    i0: usize,
    rows: usize,
    j0: usize,
    jn: usize,
) -> AttentionError {
    for r in 0..rows {
        for j in 0..jn {
            if !s[j * BQ + r].finite() {
                return AttentionError::ScoreOverflow {
                    query: i0 + r,
                    key: j0 + j,
                };
            }
        }
    }
    unreachable!("first_overflow is called only when a score is not finite")
}

/// Turns the score tile into `p = exp(s − m')` and updates `m`, `l`; leaves `α` for `pv`.
#[inline(always)]
fn softmax_step<T: Element, const FMA: bool, const BQ: usize>(
    s: &mut [T],
    jpad: usize,
    m: &mut [T],
    l: &mut [T],
    alpha: &mut [T],
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
        alpha[r] = (m[r] - m_use).exp_nonpos::<FMA>();
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
        l[r] = madd::<T, FMA>(alpha[r], l[r], l_blk[r]);
    }
}

/// `acc[c][r] = α[r]·acc[c][r] + Σ_j vp[j][c] · p[j][r]`.
#[inline(always)]
fn pv<T: Element, const FMA: bool, const NR: usize, const BQ: usize, const MRV: usize>(
    p: &[T],
    vp: &[T],
    dvp: usize,
    acc: &mut [T],
    alpha: &[T],
) {
    let jpad = p.len() / BQ;
    for ct in (0..dvp).step_by(MRV) {
        for rt in (0..BQ).step_by(NR) {
            let al: &[T; NR] = alpha[rt..rt + NR].try_into().unwrap();
            let mut a = [[T::zero(); NR]; MRV];
            for (mi, row) in a.iter_mut().enumerate() {
                let src = &acc[(ct + mi) * BQ + rt..(ct + mi) * BQ + rt + NR];
                for r in 0..NR {
                    row[r] = src[r] * al[r];
                }
            }
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
                acc[(ct + mi) * BQ + rt..(ct + mi) * BQ + rt + NR].copy_from_slice(row);
            }
        }
    }
}
