//! The row-at-a-time path: one query row against all keys, scores in a flat buffer, no
//! packing, no threads. Used for tiny problems (the seed's 2×2: scores on the stack, no
//! allocation but the output) and for a few queries whose values lie near the type's
//! maximum (they need the per-column scaling the decoding kernel does not do); other
//! calls with few queries go to the decoding kernel (`decode.rs`).
//!
//! Per row `i`: `s_j = scale·Σ_p q_ip·k_jp` accumulated column by column of K (contiguous
//! over keys, so it vectorises), then the score modifiers, `m = max_j s_j`,
//! `e_j = exp(s_j − m)`, `l = Σ_j e_j`, `out_ic = Σ_j e_j·v_jc / l`, `lse_i = m + ln l`.
//!
//! # Accuracy
//! Both sums run over all `n_kv` keys, so they are computed in two levels (see
//! [`weighted_sum`]): keys in blocks of [`BLOCK`] = 512, each block in [`LANES`] = 8 lanes
//! (key `j` in lane `j mod 8`) summed in T from zero, so at most 64 terms per lane; each
//! lane's block sums are added into an f64 lane accumulator, and the 8 accumulators are
//! added pairwise at the end. A term is rounded at most `min(⌈n_kv/8⌉, 64)` times in T and
//! at most `⌈n_kv/512⌉ + 2` times in f64; relative to `Σ_j |e_j·v_jc|`:
//! ```text
//! |error| ≤ min(⌈n_kv/8⌉, 64)·u/2 + (⌈n_kv/512⌉ + 2)·u₆₄/2     (u₆₄ = f64::EPSILON)
//! ```
//! which for f32 does not grow with `n_kv` (below `33u` for any `n_kv ≤ 2³⁰`); for f64 it
//! is the block kernel's bound (`kernel/block.rs`, "Accuracy") or less. `l` is summed the
//! same way as each numerator (so `V ≡ 1` gives exactly 1); the division, `ln` and
//! `m + ln l` are computed in f64 and rounded once to T.

use nalgebra::{Dyn, U1};

use crate::columns::for_each_column;
use crate::options::MatRef;
use crate::score::{row_lse, row_output, write_empty_row};
use crate::spec::{Plain, Spec};
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// Keys whose scores fit the stack buffer of tiny calls.
pub(super) const STACK_KEYS: usize = 64;

/// Keys per block of the two-level sums, 64 per lane (see the module documentation).
const BLOCK: usize = 512;
/// Independent partial sums per block: lanes the compiler can vectorise.
const LANES: usize = 8;

/// `Σ_j e_j · x_j·scale` (or `Σ_j e_j` if `x` is `None`) in f64, in the order of the
/// module documentation: per block of [`BLOCK`] keys, the lane sums of [`block_lanes`];
/// each lane's block sums added into its f64 accumulator; the accumulators added
/// pairwise. The order depends only on `e.len()`.
///
/// Up to [`LANES`] keys (one partial chunk of one block) are summed right here, as
/// [`block_lanes`] would: its call per output entry was a fifth of the seed's 2×2 call.
fn weighted_sum<T: Element>(e: &[T], x: Option<&[T]>, scale: T) -> f64 {
    if e.len() <= LANES {
        return short_sum(e, x, scale);
    }
    let mut wide = [0.0f64; LANES];
    for (b, eb) in e.chunks(BLOCK).enumerate() {
        let xb = x.map(|x| &x[b * BLOCK..b * BLOCK + eb.len()]);
        let lanes = block_lanes(eb, xb, scale);
        for t in 0..LANES {
            wide[t] += lanes[t].to_f64();
        }
    }
    lane_tree(wide)
}

/// [`weighted_sum`] of at most [`LANES`] keys: [`block_lanes`]' lane from zero (one term
/// each), then `wide`'s from zero, then [`lane_tree`]: the same bits. Each lane is
/// computed in a register: written to an array and read back in pairs (as the compiler
/// vectorised the tree), each pair of scalar stores stalled the 16-byte load that
/// followed (a failed store-to-load forwarding, about a fifth of the 2 × 2 seed call).
#[inline(always)]
fn short_sum<T: Element>(e: &[T], x: Option<&[T]>, scale: T) -> f64 {
    debug_assert!(e.len() <= LANES);
    // Lane t from zero: `0 + e_t·(x_t·scale)`, never −0, so the absent lanes' +0 terms
    // change no partial sum.
    let lane = |t: usize| -> f64 {
        match (e.get(t), x) {
            (Some(&et), Some(x)) => (T::zero() + et * (x[t] * scale)).to_f64(),
            (Some(&et), None) => (T::zero() + et).to_f64(),
            (None, _) => 0.0,
        }
    };
    lane_tree([
        lane(0),
        lane(1),
        lane(2),
        lane(3),
        lane(4),
        lane(5),
        lane(6),
        lane(7),
    ])
}

/// The [`LANES`] f64 accumulators added pairwise.
#[inline(always)]
fn lane_tree(wide: [f64; LANES]) -> f64 {
    let [w0, w1, w2, w3, w4, w5, w6, w7] = wide;
    ((w0 + w1) + (w2 + w3)) + ((w4 + w5) + (w6 + w7))
}

/// One block's lane sums in T from zero: key `j` added to lane `j mod 8`.
///
/// Kept out of line: inlined into [`weighted_sum`], the compiler vectorised the lanes in
/// shuffled pairs (to match their conversion to f64) instead of 4 or 8 at a time, and the
/// row path lost a quarter of its speed.
#[inline(never)]
fn block_lanes<T: Element>(e: &[T], x: Option<&[T]>, scale: T) -> [T; LANES] {
    let mut lanes = [T::zero(); LANES];
    let e8 = e.chunks_exact(LANES);
    let e_rest = e8.remainder();
    match x {
        Some(x) => {
            let x8 = x.chunks_exact(LANES);
            let x_rest = x8.remainder();
            for (ec, xc) in e8.zip(x8) {
                for t in 0..LANES {
                    lanes[t] += ec[t] * (xc[t] * scale);
                }
            }
            for (t, (&ej, &xj)) in e_rest.iter().zip(x_rest).enumerate() {
                lanes[t] += ej * (xj * scale);
            }
        }
        None => {
            for ec in e8 {
                for t in 0..LANES {
                    lanes[t] += ec[t];
                }
            }
            for (t, &ej) in e_rest.iter().enumerate() {
                lanes[t] += ej;
            }
        }
    }
    lanes
}

/// `s[t] = Σ_p q_ip·k_(j+t)p` for `t < G`, p ascending from zero: the sums of `G` keys side
/// by side, each in a register. Each key's sum is a chain of `d_k` dependent additions;
/// `G` chains side by side overlap (one key at a time, the chains were most of a call of
/// one query against 4 to 32 keys of width 128: 256 such calls × 32 heads took 19, 49
/// and 94–98 ms for 4, 16 and 32 keys, against 12, 21 and 37–40 with 8 or 4 at once).
/// Returns `G`.
#[inline(always)]
fn key_dots<T: Element, const G: usize>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    (i, j, d_k): (usize, usize, usize),
    s: &mut [T],
) -> usize {
    let mut dot = [T::zero(); G];
    for p in 0..d_k {
        let qp = q[(i, p)];
        for (t, d) in dot.iter_mut().enumerate() {
            *d += qp * k[(j + t, p)];
        }
    }
    s.copy_from_slice(&dot);
    G
}

/// Computes attention row by row; `scores` holds `n_kv` elements (any contents).
pub(super) fn attention<T: Element>(
    spec: &Spec<'_, T>,
    out: &mut MatMut<'_, T>,
    mut lse: Option<&mut [T]>,
    scores: &mut [T],
) -> Result<(), AttentionError> {
    let (n_q, n_kv) = (spec.n_q, spec.n_kv);
    let (q, k, v) = (&spec.q, &spec.k, &spec.v);
    let s = &mut scores[..n_kv];
    let v_max = spec.v_max_abs;
    let mut gather = Vec::new(); // used only for row-strided views
    // Values near the type's maximum are summed scaled down by a power of two, per column.
    let scales = spec.value_scales();
    for i in 0..n_q {
        // `s_j = Σ_p q_ip·k_jp`, p ascending from zero either way (the same bits): few
        // keys in registers ([`key_dots`]), many keys column by column of K, which is
        // contiguous over keys and vectorises.
        if n_kv <= STACK_KEYS {
            let (mut j, d_k) = (0, spec.d_k);
            while j < n_kv {
                // Eight, four, then one at a time.
                j += match n_kv - j {
                    8.. => key_dots::<T, 8>(q, k, (i, j, d_k), &mut s[j..j + 8]),
                    4.. => key_dots::<T, 4>(q, k, (i, j, d_k), &mut s[j..j + 4]),
                    _ => key_dots::<T, 1>(q, k, (i, j, d_k), &mut s[j..j + 1]),
                };
            }
        } else {
            s.fill(T::zero());
            for_each_column(k, 0..n_kv, &mut gather, |p, col| {
                let qp = q[(i, p)];
                for (sj, &kj) in s.iter_mut().zip(col) {
                    *sj += qp * kj;
                }
            });
        }
        let mut m = T::NEG_INFINITY;
        for (j, sj) in s.iter_mut().enumerate() {
            let scaled = *sj * spec.scale;
            if !scaled.finite() && spec.allowed(i, j) {
                return Err(AttentionError::ScoreOverflow { query: i, key: j });
            }
            *sj = spec.modify(i, j, scaled);
            if *sj > m {
                m = *sj;
            }
        }
        if m == T::NEG_INFINITY {
            // No key allowed.
            let lse = lse.as_deref_mut().map(|lse| &mut lse[i]);
            write_empty_row(out.row_mut(i).iter_mut(), lse);
            continue;
        }
        for sj in s.iter_mut() {
            *sj = (*sj - m).exp();
        }
        let l = weighted_sum(s, None, T::one());
        if let Some(lse) = lse.as_deref_mut() {
            lse[i] = T::from_f64_rounded(row_lse(m.to_f64(), l));
        }
        let (s, inv_l) = (&*s, 1.0 / l);
        for_each_column(v, 0..n_kv, &mut gather, |c, col| {
            let (scale, unscale) = scales.get(c).copied().unwrap_or((T::one(), T::one()));
            let total = weighted_sum(s, Some(col), scale);
            out[(i, c)] = row_output(total, l, inv_l, unscale.to_f64(), v_max);
        });
    }
    Ok(())
}

/// Keys at most of a [`tiny`] call: its sums are [`short_sum`]s.
pub(super) const TINY_KEYS: usize = LANES;
/// Queries at most of a [`tiny`] call: its scores are on the stack.
pub(super) const TINY_QUERIES: usize = 8;

/// [`attention`] for a tiny call whose options set only a scale ([`Plain`]): the same
/// operations in the same order, so the same bits, without a [`Spec`] (its assembly and
/// the general loop were most of the 2 × 2 seed call). The scores of all rows first,
/// `Σ_p q_ip·k_jp` (p ascending from zero, as the row path), then each row:
/// `s_j = (Σ_p q_ip·k_jp)·scale`, `m = max_j s_j`, `e_j = exp(s_j − m)`, `l` and each
/// output entry a [`short_sum`], finished by [`row_lse`] and [`row_output`]. No
/// score can be non-finite and no value needs scaling ([`Plain::new`] checked both); the
/// caller checks the sizes (`1 ≤ n_kv ≤ TINY_KEYS`, so every row has keys; `n_q ≤
/// TINY_QUERIES`) and that Q, K and V have contiguous columns.
pub(super) fn tiny<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    call: &Plain<T>,
    out: &mut MatMut<'_, T>,
    mut lse: Option<&mut [T]>,
) {
    let (n_q, n_kv) = (q.nrows(), k.nrows());
    debug_assert!((1..=TINY_KEYS).contains(&n_kv) && n_q <= TINY_QUERIES);
    let q = q.as_view::<Dyn, Dyn, U1, Dyn>();
    let k = k.as_view::<Dyn, Dyn, U1, Dyn>();
    let v = v.as_view::<Dyn, Dyn, U1, Dyn>();
    // Row i's scores at s[i·TINY_KEYS ..][.. n_kv]: summed over the columns of Q and K,
    // which are slices (indexing the views entry by entry cost more than the products).
    let mut s = [T::zero(); TINY_QUERIES * TINY_KEYS];
    for (q_p, k_p) in q.column_iter().zip(k.column_iter()) {
        let (q_p, k_p) = (q_p.as_slice(), k_p.as_slice());
        for (s_i, &q_ip) in s.chunks_exact_mut(TINY_KEYS).zip(q_p) {
            for (s_ij, &k_jp) in s_i.iter_mut().zip(k_p) {
                *s_ij += q_ip * k_jp;
            }
        }
    }
    for (i, s_i) in s.chunks_exact_mut(TINY_KEYS).take(n_q).enumerate() {
        let s_i = &mut s_i[..n_kv];
        let mut m = T::NEG_INFINITY;
        for sj in s_i.iter_mut() {
            *sj *= call.scale;
            if *sj > m {
                m = *sj;
            }
        }
        for sj in s_i.iter_mut() {
            *sj = (*sj - m).exp();
        }
        let e = &*s_i;
        let l = short_sum(e, None, T::one());
        if let Some(lse) = lse.as_deref_mut() {
            lse[i] = T::from_f64_rounded(row_lse(m.to_f64(), l));
        }
        let inv_l = 1.0 / l;
        for (c, v_c) in v.column_iter().enumerate() {
            let total = short_sum(e, Some(v_c.as_slice()), T::one());
            out[(i, c)] = row_output(total, l, inv_l, 1.0, call.v_max_abs);
        }
    }
}
