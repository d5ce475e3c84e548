//! The direct path for tiny problems (the seed's 2×2, a handful of tokens): one query row
//! at a time, scores on the stack, no packing, no threads, no allocation.

use nalgebra::DMatrix;

use crate::spec::Spec;
use crate::{AttentionError, Element};

/// The most keys the direct path handles (its score buffer lives on the stack).
pub(super) const MAX_KEYS: usize = 64;

pub(super) fn attention<T: Element>(
    spec: &Spec<'_, T>,
    out: &mut DMatrix<T>,
    mut lse: Option<&mut [T]>,
) -> Result<(), AttentionError> {
    let (n_q, n_kv, d_k, d_v) = (spec.n_q, spec.n_kv, spec.d_k, spec.d_v);
    let (q, k, v) = (&spec.q, &spec.k, &spec.v);
    let mut s = [T::zero(); MAX_KEYS];
    let s = &mut s[..n_kv];
    for i in 0..n_q {
        let mut m = T::NEG_INFINITY;
        for (j, sj) in s.iter_mut().enumerate() {
            let mut dot = T::zero();
            for p in 0..d_k {
                dot += q[(i, p)] * k[(j, p)];
            }
            let scaled = dot * spec.scale;
            if !scaled.finite() && spec.allowed(i, j) {
                return Err(AttentionError::ScoreOverflow { query: i, key: j });
            }
            *sj = spec.modify(i, j, scaled);
            if *sj > m {
                m = *sj;
            }
        }
        if m == T::NEG_INFINITY {
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
        for c in 0..d_v {
            // Values near the type's maximum are summed scaled down by a power of two.
            let (scale, unscale) = if spec.needs_value_scaling() {
                spec.value_scale((0..n_kv).map(|j| v[(j, c)].abs()).fold(T::zero(), T::max))
            } else {
                (T::one(), T::one())
            };
            let mut acc = T::zero();
            for (j, &e) in s.iter().enumerate() {
                acc += e * (v[(j, c)] * scale);
            }
            out[(i, c)] = acc / l * unscale;
        }
    }
    Ok(())
}
