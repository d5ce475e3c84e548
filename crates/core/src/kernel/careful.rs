//! The careful path: attention for inputs whose scores may leave the type's range.
//!
//! The fast kernels compute scores in the element type, in whatever order suits their
//! tiles, and never look for overflow in the score modifiers. That is exact enough as long
//! as every score is far inside the range, which `Spec::scores_in_range` proves from the
//! inputs' largest magnitudes before a call starts. When it cannot (values, scales,
//! slopes or biases near the type's maximum: hostile or broken inputs, never ordinary
//! ones), every CPU path, every thread count and every function sends the whole call here
//! instead, so that the outcome, `Ok` or the same `Err`, never depends on how it was run.
//!
//! # The rule
//! Row by row, in query order, with `s_ij` the score of [`AttentionOptions`] evaluated in
//! the element type (step 1, `scale·q_i·k_j`, computed exactly and rounded once):
//! - query `i` **overflows at key `j`** if `j` is allowed for `i` and `scale·q_i·k_j` lies
//!   outside the type's range, or the final `s_ij` is `+∞` (it would decide the row);
//! - query `i` also overflows at its first allowed key if none of its allowed scores is
//!   finite (all of them fell below `−MAX`: the row's weights are then undetermined);
//! - the call returns [`AttentionError::ScoreOverflow`] for the smallest such
//!   `(query, key)` pair in lexicographic order; otherwise the result.
//!
//! An allowed score that falls below `−MAX` in a row that has a finite score gets weight
//! exactly 0, which is what its true weight rounds to (it is at least `2^103` below the
//! row's maximum in f32, `2^970` in f64). The softmax and `Σ_j w_ij·v_j` are then computed
//! in f64 (for f32 more accurately than the fast path; for f64 with values halved so that
//! no partial sum overflows), and each output is clamped to `±max|V|`, which a convex
//! combination of values cannot leave.
//!
//! [`AttentionOptions`]: crate::AttentionOptions

use nalgebra::DMatrix;

use crate::score::{empty_row_output, row_lse, row_output};
use crate::spec::Spec;
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// How products `q_ip·k_jp` are pre-scaled so that their sum cannot overflow f64:
/// `Σ_p (q_ip·2^−e)(k_jp·2^−e)`, then times `scale`, then times `2^e` twice.
#[derive(Clone, Copy)]
struct Prescale {
    down: f64,
    up: f64,
}

impl Prescale {
    fn new<T: Element>(spec: &Spec<'_, T>) -> Self {
        let (q_max, k_max) = (spec.q_max_abs.to_f64(), spec.k_max_abs.to_f64());
        let bound = spec.d_k as f64 * q_max * k_max;
        let limit = f64::MAX / 8.0;
        if bound.is_finite() && bound <= limit {
            return Prescale { down: 1.0, up: 1.0 };
        }
        // Each factor shrinks by 2^−e, the sum by 2^−2e: enough for bound·2^−2e ≤ limit.
        // (bound can itself overflow f64: then d_k·max·max is at most 2^1024·2^64.)
        let log2_bound = (spec.d_k.max(1) as f64).log2() + q_max.log2() + k_max.log2();
        let e = ((log2_bound - limit.log2()) / 2.0).ceil() as i32 + 1;
        Prescale {
            down: 2f64.powi(-e),
            up: 2f64.powi(e),
        }
    }
}

/// The final scores of row `i` into `s` (`n_kv` entries, as f64): the score where the key
/// is allowed and its score finite, −∞ elsewhere. Returns the overflow of the module's
/// rule for this row, if any.
fn row_scores<T: Element>(
    spec: &Spec<'_, T>,
    pre: Prescale,
    i: usize,
    s: &mut [f64],
) -> Result<(), AttentionError> {
    let (q, k) = (&spec.q, &spec.k);
    let scale = spec.scale.to_f64();
    let mut first_allowed = None;
    let mut first_overflow = None;
    let mut any_finite = false;
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = f64::NEG_INFINITY;
        if !spec.allowed(i, j) {
            continue;
        }
        first_allowed.get_or_insert(j);
        let mut dot = 0.0f64;
        for p in 0..spec.d_k {
            dot += (q[(i, p)].to_f64() * pre.down) * (k[(j, p)].to_f64() * pre.down);
        }
        let raw = T::from_f64_rounded(dot * scale * pre.up * pre.up);
        if !raw.finite() {
            first_overflow.get_or_insert(j);
            continue;
        }
        let x = spec.modify(i, j, raw);
        if x.finite() {
            any_finite = true;
            *sj = x.to_f64();
        } else if x != T::NEG_INFINITY {
            first_overflow.get_or_insert(j);
        }
    }
    let undetermined = if any_finite { None } else { first_allowed };
    match (first_overflow, undetermined) {
        (None, None) => Ok(()),
        (a, b) => Err(AttentionError::ScoreOverflow {
            query: i,
            key: a.into_iter().chain(b).min().unwrap_or(0),
        }),
    }
}

/// Turns row scores into weights in place (`exp(s_j − m)`, not normalised); returns
/// `(m, l)`, the row maximum and the sum of the weights (`l = 0` for a row with no allowed
/// key).
fn exponentiate(s: &mut [f64]) -> (f64, f64) {
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        s.fill(0.0);
        return (m, 0.0);
    }
    let mut l = 0.0;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        l += *x;
    }
    (m, l)
}

/// The attention output (and log-sum-exp) by the module's rule.
pub(crate) fn attention<T: Element>(
    spec: &Spec<'_, T>,
    out: &mut MatMut<'_, T>,
    mut lse: Option<&mut [T]>,
) -> Result<(), AttentionError> {
    let (n_q, n_kv, d_v) = (spec.n_q, spec.n_kv, spec.d_v);
    let pre = Prescale::new(spec);
    let mut s = vec![0.0f64; n_kv];
    // First every row's verdict, so that on error nothing has been written.
    for i in 0..n_q {
        row_scores(spec, pre, i, &mut s)?;
    }
    for i in 0..n_q {
        row_scores(spec, pre, i, &mut s)?;
        let (m, l) = exponentiate(&mut s);
        if let Some(lse) = lse.as_deref_mut() {
            lse[i] = T::from_f64_rounded(row_lse(m, l));
        }
        if let Some(dropout) = &spec.dropout {
            for (j, w) in s.iter_mut().enumerate() {
                *w *= dropout.factor(i, j).to_f64();
            }
        }
        // Weights normalised first and values halved: Σ_j (w_j/l)·(v_j/2) ≤ max|v|/2·(1 +
        // n_kv·u) cannot overflow. That sum is already divided by l, so it is finished with
        // l = 1 (0 for a row with no allowed key) and unscale 2.
        let l_done = if l == 0.0 { 0.0 } else { 1.0 };
        for c in 0..d_v {
            let half: f64 = s
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w != 0.0)
                .map(|(j, &w)| w / l * (spec.v[(j, c)].to_f64() * 0.5))
                .sum();
            out[(i, c)] = row_output(half, l_done, 1.0 / l_done, 2.0, spec.out_max);
        }
    }
    Ok(())
}

/// The attention weights (`n_q × n_kv`) by the module's rule.
pub(crate) fn weights<T: Element>(
    spec: &Spec<'_, T>,
    w: &mut DMatrix<T>,
) -> Result<(), AttentionError> {
    let pre = Prescale::new(spec);
    let mut s = vec![0.0f64; spec.n_kv];
    for i in 0..spec.n_q {
        row_scores(spec, pre, i, &mut s)?;
    }
    for i in 0..spec.n_q {
        row_scores(spec, pre, i, &mut s)?;
        let (_, l) = exponentiate(&mut s);
        for (j, &x) in s.iter().enumerate() {
            w[(i, j)] = if l == 0.0 {
                empty_row_output()
            } else {
                T::from_f64_rounded(x / l)
            };
        }
    }
    Ok(())
}
