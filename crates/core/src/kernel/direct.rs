//! The row-at-a-time path: one query row against all keys, scores in a flat buffer, no
//! packing, no threads. Used for tiny problems (the seed's 2×2: scores on the stack, no
//! allocation but the output) and for a few queries against many keys (decoding with a
//! KV cache), where the block kernel's query lanes would sit mostly empty.
//!
//! Per row `i`: `s_j = scale·Σ_p q_ip·k_jp` accumulated column by column of K (contiguous
//! over keys, so it vectorises), then the score modifiers, `m = max_j s_j`,
//! `e_j = exp(s_j − m)`, `l = Σ_j e_j`, `out_ic = Σ_j e_j·v_jc / l`, `lse_i = m + ln l`.

use nalgebra::DMatrix;

use crate::columns::for_each_column;
use crate::spec::Spec;
use crate::{AttentionError, Element};

/// Keys whose scores fit the stack buffer of tiny calls.
pub(super) const STACK_KEYS: usize = 64;

/// Computes attention row by row; `scores` holds `n_kv` elements (any contents).
pub(super) fn attention<T: Element>(
    spec: &Spec<'_, T>,
    out: &mut DMatrix<T>,
    mut lse: Option<&mut [T]>,
    scores: &mut [T],
) -> Result<(), AttentionError> {
    let (n_q, n_kv, d_v) = (spec.n_q, spec.n_kv, spec.d_v);
    let (q, k, v) = (&spec.q, &spec.k, &spec.v);
    let s = &mut scores[..n_kv];
    let v_max = spec.v_max_abs;
    let mut gather = Vec::new(); // used only for row-strided views
    // Values near the type's maximum are summed scaled down by a power of two, per column.
    let scales: Option<Vec<(T, T)>> = spec.needs_value_scaling().then(|| {
        (0..d_v)
            .map(|c| spec.value_scale((0..n_kv).map(|j| v[(j, c)].abs()).fold(T::zero(), T::max)))
            .collect()
    });
    for i in 0..n_q {
        s.fill(T::zero());
        for_each_column(k, 0..n_kv, &mut gather, |p, col| {
            let qp = q[(i, p)];
            for (sj, &kj) in s.iter_mut().zip(col) {
                *sj += qp * kj;
            }
        });
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
            // No key allowed: output 0, lse −∞.
            if let Some(lse) = lse.as_deref_mut() {
                lse[i] = T::NEG_INFINITY;
            }
            for c in 0..d_v {
                out[(i, c)] = T::zero();
            }
            continue;
        }
        let mut l = T::zero();
        for sj in s.iter_mut() {
            *sj = (*sj - m).exp();
            l += *sj;
        }
        if let Some(lse) = lse.as_deref_mut() {
            lse[i] = m + l.ln();
        }
        let s = &*s;
        for_each_column(v, 0..n_kv, &mut gather, |c, col| {
            let (scale, unscale) = scales.as_ref().map_or((T::one(), T::one()), |sc| sc[c]);
            // Eight partial sums: independent lanes the compiler can vectorise.
            let mut acc = [T::zero(); 8];
            let (s8, col8) = (s.chunks_exact(8), col.chunks_exact(8));
            let (s_rest, col_rest) = (s8.remainder(), col8.remainder());
            for (e, x) in s8.zip(col8) {
                for t in 0..8 {
                    acc[t] += e[t] * (x[t] * scale);
                }
            }
            let mut total = acc.iter().fold(T::zero(), |a, &b| a + b);
            for (&e, &x) in s_rest.iter().zip(col_rest) {
                total += e * (x * scale);
            }
            // A convex combination of values: clamped to ±max|V| (see `block.rs`).
            out[(i, c)] = (total / l * unscale).max(-v_max).min(v_max);
        });
    }
    Ok(())
}
