//! The materialised path: the full `n_q × n_kv` attention-weight matrix, for callers who
//! ask for it (visualisation, analysis). It needs `n_q·n_kv` memory by nature.

use nalgebra::DMatrix;

use crate::columns::{owned_for_left_product, owned_if_broadcast};
use crate::error::Operand;
use crate::kernel::{KernelRun, careful, record_run};
use crate::memory::{try_matrix, try_vector};
use crate::options::AttentionOptions;
use crate::score::empty_row_output;
use crate::spec::Spec;
use crate::view::AsMatRef;
use crate::{AttentionError, Element};

/// The attention weights `softmax(s)`, one row per query, as an `n_q × n_kv` matrix.
///
/// `s` is the score matrix of [`AttentionOptions`] (scale, softcap, ALiBi, bias, masks).
/// Each row sums to 1, or is all 0 for a query with no allowed key; disallowed positions
/// are exactly 0. `weights · V` equals [`scaled_dot_product_attention`](crate::scaled_dot_product_attention)'s output up to
/// rounding.
///
/// `Q·Kᵀ` is one matrix product (nalgebra's GEMM); the softmax then sweeps the
/// column-major result column by column, keeping per-row maxima and sums in vectors.
///
/// # Shapes
/// `Q` is `n_q × d_k`, `K` is `n_kv × d_k`, `V` is `n_kv × d_v` (checked like the other
/// calls, though only its row count matters); the result is `n_q × n_kv`.
///
/// # Errors
/// Those of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention), with
/// [`AttentionError::TooLarge`] naming [`Operand::Weights`](crate::Operand::Weights) when
/// the `n_q × n_kv` matrix cannot be allocated (n = 200 000 in f32 is 160 GB);
/// [`AttentionError::InvalidOption`] with dropout (these are the softmax's weights).
///
/// # Example
/// ```
/// use attention_core::{attention_weights, AttentionOptions, Causal};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// let w = attention_weights(&q, &q, &v, &AttentionOptions::new().with_causal(Causal::TopLeft))?;
/// assert_eq!(w[(0, 0)], 1.0);
/// assert_eq!(w[(0, 1)], 0.0);
/// assert!((w[(1, 0)] + w[(1, 1)] - 1.0).abs() < 1e-15);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn attention_weights<'q, 'k, 'v, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    options: &AttentionOptions<'_, T>,
) -> Result<DMatrix<T>, AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let spec = Spec::new(q, k, v, options)?;
    if spec.dropout.is_some() {
        return Err(AttentionError::InvalidOption {
            option: "dropout",
            rule: "the weights are the softmax's; dropout applies to the output only",
        });
    }
    let (n_q, n_kv) = (spec.n_q, spec.n_kv);
    let mut w = try_matrix(n_q, n_kv, T::zero(), Operand::Weights)?;
    if !spec.scores_in_range {
        // Scores that may leave the type's range: the same rule as every other call.
        record_run(KernelRun::Careful);
        careful::weights(&spec, &mut w)?;
        return Ok(w);
    }
    record_run(KernelRun::Weights);
    // nalgebra's product cannot read broadcast views, nor a row-strided left operand:
    // copy those first (see `owned_for_left_product`).
    let q_owned = owned_for_left_product(&q, Operand::Query)?;
    let k_owned = owned_if_broadcast(&k, Operand::Key)?;
    let q = q_owned.as_ref().map_or(q, |m| m.as_view());
    let k = k_owned.as_ref().map_or(k, |m| m.as_view());
    q.mul_to(&k.transpose(), &mut w);

    let mut m = try_vector(n_q, T::NEG_INFINITY, Operand::Weights)?;
    for j in 0..n_kv {
        let mut col = w.column_mut(j);
        for i in 0..n_q {
            // Scores are in range (`Spec::scores_in_range`): nothing here can overflow.
            let s = spec.modify(i, j, col[i] * spec.scale);
            col[i] = s;
            if s > m[i] {
                m[i] = s;
            }
        }
    }
    // Row sums in two levels, as in the kernels: blocks of `SUM_BLOCK` columns summed in T
    // from zero (`l_blk`), block sums added in f64 (`l`); so a term is rounded at most 64
    // times in T and ⌈n_kv/64⌉ times in f64, instead of up to n_kv times in T.
    const SUM_BLOCK: usize = 64;
    let mut l = try_vector(n_q, 0.0f64, Operand::Weights)?;
    let mut l_blk = try_vector(n_q, T::zero(), Operand::Weights)?;
    for (j, mut col) in w.column_iter_mut().enumerate() {
        for i in 0..n_q {
            // A fully masked row has m = −∞ and only −∞ scores: exp(−∞) = 0 keeps it 0.
            let m_use = if m[i] == T::NEG_INFINITY {
                T::zero()
            } else {
                m[i]
            };
            let e = (col[i] - m_use).exp();
            col[i] = e;
            l_blk[i] += e;
        }
        if (j + 1) % SUM_BLOCK == 0 || j + 1 == n_kv {
            for (li, bi) in l.iter_mut().zip(&mut l_blk) {
                *li += bi.to_f64();
                *bi = T::zero();
            }
        }
    }
    // w = e / l in T (l rounded once to T: dividing in f64 made f32 weights 8% slower);
    // a row with no allowed key (l = 0) follows the empty-row rule of `score.rs`.
    let l: Vec<T> = l.iter().map(|&x| T::from_f64_rounded(x)).collect();
    for mut col in w.column_iter_mut() {
        for i in 0..n_q {
            col[i] = if l[i] > T::zero() {
                col[i] / l[i]
            } else {
                empty_row_output()
            };
        }
    }
    Ok(w)
}
