//! The backward pass of single-head attention: dQ, dK, dV from the forward's output and
//! log-sum-exp, without storing anything `n_q × n_kv` (FlashAttention-2's recomputation).
//!
//! This first version is exact and deterministic but not yet fast: it recomputes each
//! weight in scalar code with `f64` sums (issue 11's SIMD tiles are still to come).

use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::Element;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::heads::HeadLayout;
use crate::kernel::careful;
use crate::memory::try_matrix;
use crate::options::{AttentionOptions, MatRef, Parallelism};
use crate::spec::{Batch, Sequence, Spec, check_finite};
use crate::view::{self, AsMatMut, AsMatRef};

/// The gradients of [`scaled_dot_product_attention_backward`], each the shape of its
/// input.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGradients<T: Element> {
    /// `∂L/∂Q`, n_q × d_k.
    pub dq: DMatrix<T>,
    /// `∂L/∂K`, n_kv × d_k.
    pub dk: DMatrix<T>,
    /// `∂L/∂V`, n_kv × d_v.
    pub dv: DMatrix<T>,
}

/// Keys per task of the dK/dV pass and queries per task of the dQ pass.
const BLOCK: usize = 64;
/// Multiply-adds below which a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// The gradients of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention)
/// with respect to Q, K and V, given its `output` and `lse` (as
/// [`scaled_dot_product_attention_with_lse`](crate::scaled_dot_product_attention_with_lse)
/// returns them, for the same inputs and options) and `d_output = ∂L/∂output` for some
/// scalar loss `L`.
///
/// With `t_ij = scale·q_i·k_j`, `z_ij` the final score (after softcap, ALiBi and bias; the
/// pair disallowed by a mask, causal or window contributes nothing),
/// `P_ij = exp(z_ij − lse_i)`:
///
/// ```text
/// D_i   = Σ_c dO_ic·O_ic
/// dV_j  = Σ_i P_ij·dO_i
/// dZ_ij = P_ij·(dO_i·v_j − D_i)
/// dT_ij = dZ_ij·∂z/∂t                 (1 − tanh²(t_ij/c) with softcap c, else 1)
/// dQ_i  = scale·Σ_j dT_ij·k_j          dK_j = scale·Σ_i dT_ij·q_i
/// ```
///
/// Nothing `n_q × n_kv` is stored: each weight is recomputed from Q, K and `lse`, once for
/// dK and dV (threads over blocks of keys) and once for dQ (threads over blocks of
/// queries), every sum in `f64` in a fixed order, so the result does not depend on the
/// number of threads. Masked pairs and rows with no allowed key get gradient exactly 0;
/// the scale and the ALiBi slope get none (constants of the model, as in PyTorch).
///
/// # Shapes
/// `query` n_q × d_k, `key` n_kv × d_k, `value` n_kv × d_v, `output` and `d_output`
/// n_q × d_v, `lse` n_q. Returns dQ, dK, dV in those shapes.
///
/// # Errors
/// Those of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention) for the
/// inputs and options (shapes, NaN/∞, options; [`AttentionError::ScoreOverflow`] for
/// scores outside the type's range, as the forward reports them);
/// [`AttentionError::DimensionMismatch`] when `output` or `d_output`
/// ([`Operand::OutputGradient`]) is not n_q × d_v or `lse` ([`Operand::Lse`]) does not
/// have n_q entries; [`AttentionError::NonFinite`] for NaN/∞ in `output` or `d_output`,
/// or NaN/+∞ in `lse`; [`AttentionError::InvalidLse`] for an lse that cannot come from
/// these inputs: −∞ on a row with an allowed key, or so small that a recomputed weight
/// `exp(z_ij − lse_i)` exceeds 1 by more than the forward's rounding (of the scores and of
/// lse itself) allows; [`AttentionError::ProductOverflow`] if a gradient exceeds the
/// type's range; [`AttentionError::TooLarge`] if the results cannot be allocated.
///
/// # Example
/// ```
/// use attention_core::{
///     scaled_dot_product_attention_backward, scaled_dot_product_attention_with_lse,
///     AttentionOptions, Causal,
/// };
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(4, 3, |i, j| ((i * 3 + j) as f64 * 0.7).sin());
/// let k = DMatrix::from_fn(5, 3, |i, j| ((i + 2 * j) as f64 * 0.4).cos());
/// let v = DMatrix::from_fn(5, 2, |i, j| (i + j) as f64 * 0.5);
/// let options = AttentionOptions::new().with_causal(Causal::BottomRight);
/// let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options)?;
///
/// // L = Σ output: dO is all ones.
/// let d_out = DMatrix::from_element(4, 2, 1.0);
/// let g = scaled_dot_product_attention_backward(&q, &k, &v, &out, lse.as_slice(), &d_out, &options)?;
/// assert_eq!((g.dq.shape(), g.dk.shape(), g.dv.shape()), ((4, 3), (5, 3), (5, 2)));
/// // Each value row receives the total weight its key gets: the weights of a row sum to 1.
/// assert!((g.dv.column(0).sum() - 4.0).abs() < 1e-12);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn scaled_dot_product_attention_backward<'q, 'k, 'v, 'o, 'g, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    output: impl AsMatRef<'o, T>,
    lse: &[T],
    d_output: impl AsMatRef<'g, T>,
    options: &AttentionOptions<'_, T>,
) -> Result<AttentionGradients<T>, AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let spec = Spec::new(q, k, v, options)?;
    let (output, d_output) = (output.into_mat_ref(), d_output.into_mat_ref());
    check_result_operands(&spec, &output, lse, &d_output)?;
    if !spec.scores_in_range {
        // Scores that may leave the type's range: the forward's rule decides, so that the
        // backward of a call fails exactly when the call does.
        let mut scratch = try_matrix(spec.n_q, spec.d_v, T::zero(), Operand::Output)?;
        careful::attention(&spec, &mut (&mut scratch).into_mat_mut(), None)?;
    }
    let parallel = options.parallelism == Parallelism::Rayon
        && spec.n_q * spec.n_kv * (spec.d_k + spec.d_v) >= PARALLEL_MIN_WORK;
    let problem = Problem::new(&spec, &output, lse, &d_output);
    let (dk, dv) = problem.key_pass(parallel)?;
    let dq = problem.query_pass(parallel);
    Ok(AttentionGradients {
        dq: rounded(&dq, (spec.n_q, spec.d_k), Operand::Query)?,
        dk: rounded(&dk, (spec.n_kv, spec.d_k), Operand::Key)?,
        dv: rounded(&dv, (spec.n_kv, spec.d_v), Operand::Value)?,
    })
}

/// The gradients of [`multi_head_attention`](crate::multi_head_attention) with respect to
/// the packed Q, K and V, given its `output` and `lse` (as
/// [`multi_head_attention_with_lse`](crate::multi_head_attention_with_lse) returns them,
/// for the same inputs, layout and options) and `d_output = ∂L/∂output`.
///
/// Each (sequence, query head) block is the single-head backward
/// ([`scaled_dot_product_attention_backward`], whose formulas apply per block); with
/// grouped-query attention a key/value head's dK and dV sum over the query heads that
/// read it, in head order, in f64, so the result does not depend on the threads. The
/// blocks run one after another, each split over threads when large.
///
/// # Shapes
/// `query` Σn_q × h_q·d_k, `key` Σn_kv × h_kv·d_k, `value` Σn_kv × h_kv·d_v, `output` and
/// `d_output` Σn_q × h_q·d_v, `lse` Σn_q × h_q (row = token, column = head). Returns dQ,
/// dK, dV in the shapes of Q, K, V.
///
/// # Errors
/// Those of [`multi_head_attention`](crate::multi_head_attention) for the inputs, layout
/// and options ([`AttentionError::HeadScoreOverflow`] for scores out of range), and those
/// of [`scaled_dot_product_attention_backward`] for `output`, `lse` and `d_output`, with
/// rows of the packed batch and, for `lse`, the head as the column
/// ([`AttentionError::InvalidLse`] names the head).
///
/// # Example
/// ```
/// use attention_core::{
///     multi_head_attention_backward, multi_head_attention_with_lse, AttentionOptions,
///     Causal, HeadLayout,
/// };
/// use nalgebra::DMatrix;
///
/// // 4 query heads over 2 key/value heads of width 3; two sequences of 5 and 2 tokens.
/// let layout = HeadLayout::new(4, 2).with_seqlens(&[5, 2], &[5, 2]);
/// let q = DMatrix::<f64>::from_fn(7, 12, |i, j| ((i * 12 + j) as f64 * 0.31).sin());
/// let k = DMatrix::from_fn(7, 6, |i, j| ((i * 6 + j) as f64 * 0.17).cos());
/// let v = DMatrix::from_fn(7, 6, |i, j| (i + j) as f64 * 0.1);
/// let options = AttentionOptions::new().with_causal(Causal::BottomRight);
/// let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &options)?;
/// let d_out = DMatrix::from_element(7, 12, 1.0);
/// let g = multi_head_attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, &options)?;
/// assert_eq!((g.dq.shape(), g.dk.shape(), g.dv.shape()), ((7, 12), (7, 6), (7, 6)));
/// // L = Σ output: each query head's weights sum to 1 per row, and two query heads read
/// // each key/value head, so each value column's gradient sums to 2 per query row.
/// assert!((g.dv.column(0).sum() - 2.0 * 7.0).abs() < 1e-12);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::too_many_arguments)] // the forward's inputs and results, the layout, the options
pub fn multi_head_attention_backward<'q, 'k, 'v, 'o, 'g, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    output: impl AsMatRef<'o, T>,
    lse: &DMatrix<T>,
    d_output: impl AsMatRef<'g, T>,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<AttentionGradients<T>, AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let batch = Batch::new(q, k, v, layout, options)?;
    let (output, d_output) = (output.into_mat_ref(), d_output.into_mat_ref());
    let (h_q, d_v) = (batch.heads_q, batch.d_v);
    let d_k = q.ncols() / h_q;
    check_packed_operands(&batch, &output, lse, &d_output)?;
    let group = h_q / batch.heads_kv;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; q.nrows() * q.ncols()],
        vec![0.0; k.nrows() * k.ncols()],
        vec![0.0; v.nrows() * v.ncols()],
    );
    let parallel = options.parallelism == Parallelism::Rayon;
    for (b, spec) in batch.specs.iter().enumerate() {
        let (s, h) = (b / h_q, b % h_q);
        let seq = batch.sequences[s];
        let j = h / group;
        let in_batch = |e| packed_error(e, h, seq);
        if !spec.scores_in_range {
            let mut scratch = try_matrix(spec.n_q, spec.d_v, T::zero(), Operand::Output)?;
            careful::attention(spec, &mut (&mut scratch).into_mat_mut(), None).map_err(in_batch)?;
        }
        let rows = seq.q_start..seq.q_start + seq.n_q;
        let out_h = view::block(output, rows.clone(), h * d_v..(h + 1) * d_v);
        let d_out_h = view::block(d_output, rows.clone(), h * d_v..(h + 1) * d_v);
        let lse_h = &lse.as_slice()[h * lse.nrows()..][rows];
        let parallel =
            parallel && spec.n_q * spec.n_kv * (spec.d_k + spec.d_v) >= PARALLEL_MIN_WORK;
        let problem = Problem::new(spec, &out_h, lse_h, &d_out_h);
        let (dk_h, dv_h) = problem.key_pass(parallel).map_err(in_batch)?;
        let dq_h = problem.query_pass(parallel);
        // Scatter into the packed row-major buffers: dQ's block is this head's alone,
        // dK/dV's are summed over the group's heads in head order.
        let place = |dst: &mut [f64], src: &[f64], (r0, c0, d, width), add: bool| {
            for r in 0..src.len().checked_div(d).unwrap_or(0) {
                let at = (r0 + r) * width + c0;
                for (x, y) in dst[at..at + d].iter_mut().zip(&src[r * d..(r + 1) * d]) {
                    *x = if add { *x + y } else { *y };
                }
            }
        };
        place(
            &mut dq,
            &dq_h,
            (seq.q_start, h * d_k, d_k, q.ncols()),
            false,
        );
        place(
            &mut dk,
            &dk_h,
            (seq.kv_start, j * d_k, d_k, k.ncols()),
            true,
        );
        place(
            &mut dv,
            &dv_h,
            (seq.kv_start, j * d_v, d_v, v.ncols()),
            true,
        );
    }
    Ok(AttentionGradients {
        dq: rounded(&dq, (q.nrows(), q.ncols()), Operand::Query)?,
        dk: rounded(&dk, (k.nrows(), k.ncols()), Operand::Key)?,
        dv: rounded(&dv, (v.nrows(), v.ncols()), Operand::Value)?,
    })
}

/// A block's error in terms of the packed batch.
fn packed_error(e: AttentionError, head: usize, seq: Sequence) -> AttentionError {
    match e {
        AttentionError::ScoreOverflow { query, key } => AttentionError::HeadScoreOverflow {
            head,
            query: seq.q_start + query,
            key: seq.kv_start + key,
        },
        AttentionError::InvalidLse {
            row, key, value, ..
        } => AttentionError::InvalidLse {
            head,
            row: seq.q_start + row,
            key: seq.kv_start + key,
            value,
        },
        e => e,
    }
}

/// Shapes and values of a multi-head call's `output`, `lse` and `d_output`.
fn check_packed_operands<T: Element>(
    batch: &Batch<'_, T>,
    output: &MatRef<'_, T>,
    lse: &DMatrix<T>,
    d_output: &MatRef<'_, T>,
) -> Result<(), AttentionError> {
    let rows: usize = batch.sequences.iter().map(|s| s.n_q).sum();
    for (operand, shape, columns, rule) in [
        (
            Operand::Output,
            output.shape(),
            batch.out_columns(),
            "h_q·d_v columns",
        ),
        (
            Operand::OutputGradient,
            d_output.shape(),
            batch.out_columns(),
            "h_q·d_v columns",
        ),
        (
            Operand::Lse,
            lse.shape(),
            batch.heads_q,
            "one column per query head",
        ),
    ] {
        check_dim(
            operand,
            Axis::Rows,
            shape.0,
            rows,
            Operand::Query,
            "one row per query",
        )?;
        check_dim(
            operand,
            Axis::Columns,
            shape.1,
            columns,
            Operand::Query,
            rule,
        )?;
    }
    check_finite(Operand::Output, output)?;
    check_lse_values(lse.as_slice(), lse.nrows())?;
    check_finite(Operand::OutputGradient, d_output)?;
    Ok(())
}

/// NaN or +∞ in `lse` (column-major, `rows` rows) as [`AttentionError::NonFinite`].
fn check_lse_values<T: Element>(lse: &[T], rows: usize) -> Result<(), AttentionError> {
    match lse
        .iter()
        .enumerate()
        .find(|(_, x)| !x.finite() && **x != T::NEG_INFINITY)
    {
        Some((at, &x)) => Err(AttentionError::NonFinite {
            operand: Operand::Lse,
            row: at % rows.max(1),
            column: at / rows.max(1),
            value: x.to_f64(),
        }),
        None => Ok(()),
    }
}

/// Shapes and values of `output`, `lse` and `d_output`.
fn check_result_operands<T: Element>(
    spec: &Spec<'_, T>,
    output: &MatRef<'_, T>,
    lse: &[T],
    d_output: &MatRef<'_, T>,
) -> Result<(), AttentionError> {
    for (operand, m) in [
        (Operand::Output, output),
        (Operand::OutputGradient, d_output),
    ] {
        check_dim(
            operand,
            Axis::Rows,
            m.nrows(),
            spec.n_q,
            Operand::Query,
            "one row per query",
        )?;
        check_dim(
            operand,
            Axis::Columns,
            m.ncols(),
            spec.d_v,
            Operand::Value,
            "d_v must match",
        )?;
    }
    check_dim(
        Operand::Lse,
        Axis::Entries,
        lse.len(),
        spec.n_q,
        Operand::Query,
        "one log-sum-exp per query",
    )?;
    check_finite(Operand::Output, output)?;
    check_lse_values(lse, lse.len())?;
    check_finite(Operand::OutputGradient, d_output)?;
    Ok(())
}

/// The problem in f64, rows contiguous: what both passes read.
struct Problem<'s, 'a, T: Element> {
    spec: &'s Spec<'a, T>,
    d_k: usize,
    d_v: usize,
    scale: f64,
    /// Row-major `n × d` copies in f64.
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
    lse: Vec<f64>,
    /// `D_i = Σ_c dO_ic·O_ic`.
    d: Vec<f64>,
    /// Per query, `Σ_c |q_ic|·max|K|`: bounds `|q_i·k_j|` for the lse check.
    q_bound: Vec<f64>,
}

impl<'s, 'a, T: Element> Problem<'s, 'a, T> {
    fn new(
        spec: &'s Spec<'a, T>,
        output: &MatRef<'_, T>,
        lse: &[T],
        d_output: &MatRef<'_, T>,
    ) -> Self {
        let rows = |m: &MatRef<'_, T>| -> Vec<f64> {
            let (n, d) = m.shape();
            (0..n * d)
                .map(|x| m[(x / d.max(1), x % d.max(1))].to_f64())
                .collect()
        };
        let (q, d_o, o) = (rows(&spec.q), rows(d_output), rows(output));
        let (d_k, d_v) = (spec.d_k, spec.d_v);
        let d = (0..spec.n_q)
            .map(|i| dot(&d_o[i * d_v..(i + 1) * d_v], &o[i * d_v..(i + 1) * d_v]))
            .collect();
        let k_max = spec.k_max_abs.to_f64();
        let q_bound = (0..spec.n_q)
            .map(|i| {
                q[i * d_k..(i + 1) * d_k]
                    .iter()
                    .map(|x| x.abs())
                    .sum::<f64>()
                    * k_max
            })
            .collect();
        Problem {
            spec,
            d_k,
            d_v,
            scale: spec.scale.to_f64(),
            k: rows(&spec.k),
            v: rows(&spec.v),
            lse: lse.iter().map(|x| x.to_f64()).collect(),
            q,
            d_o,
            d,
            q_bound,
        }
    }

    /// `(P_ij, dT_ij)` of an allowed pair with a nonzero weight, `None` for a pair that
    /// contributes nothing; the lse checks and a non-finite score as errors.
    #[inline]
    fn pair(&self, i: usize, j: usize) -> Result<Option<(f64, f64)>, AttentionError> {
        let spec = self.spec;
        if !spec.allowed(i, j) {
            return Ok(None);
        }
        let (d_k, d_v) = (self.d_k, self.d_v);
        let t = T::from_f64_rounded(
            self.scale
                * dot(
                    &self.q[i * d_k..(i + 1) * d_k],
                    &self.k[j * d_k..(j + 1) * d_k],
                ),
        );
        let z = spec.modify(i, j, t);
        if z == T::NEG_INFINITY {
            return Ok(None); // a −∞ bias
        }
        if !z.finite() {
            return Err(AttentionError::ScoreOverflow { query: i, key: j });
        }
        let (z, lse) = (z.to_f64(), self.lse[i]);
        let invalid = AttentionError::InvalidLse {
            head: 0,
            row: i,
            key: j,
            value: lse,
        };
        if lse == f64::NEG_INFINITY {
            return Err(invalid);
        }
        // The forward rounded the scores (about (d_k + 2)·u·|scale|·Σ|q||k|, plus the
        // softcap, ALiBi and bias additions) and lse itself: a weight may exceed 1 by that
        // much, not more.
        let u = T::EPSILON.to_f64();
        let slack = 4.0 * u * (1.0 + lse.abs() + z.abs())
            + (d_k as f64 + 2.0) * u * self.scale.abs() * self.q_bound[i];
        if z - lse > slack {
            return Err(invalid);
        }
        let p = (z - lse).exp();
        if p == 0.0 {
            return Ok(None);
        }
        let dp = dot(
            &self.d_o[i * d_v..(i + 1) * d_v],
            &self.v[j * d_v..(j + 1) * d_v],
        );
        let dt = p * (dp - self.d[i]) * spec.modify_derivative(t).to_f64();
        Ok(Some((p, dt)))
    }

    /// dK and dV (row-major, f64), threads over blocks of keys. On error, the one of the
    /// smallest pair `(i, j)` in lexicographic order: every pair is visited, so the error
    /// does not depend on the threads.
    #[allow(clippy::type_complexity)] // (dK, dV)
    fn key_pass(&self, parallel: bool) -> Result<(Vec<f64>, Vec<f64>), AttentionError> {
        let n_kv = self.spec.n_kv;
        let blocks: Vec<_> = (0..n_kv.div_ceil(BLOCK))
            .map(|b| b * BLOCK..((b + 1) * BLOCK).min(n_kv))
            .collect();
        let run = |keys: &std::ops::Range<usize>| self.key_block(keys.clone());
        let results: Vec<_> = if parallel {
            blocks.par_iter().map(run).collect()
        } else {
            blocks.iter().map(run).collect()
        };
        let mut first: Option<(usize, usize, AttentionError)> = None;
        let (mut dk, mut dv) = (Vec::new(), Vec::new());
        for result in results {
            match result {
                Ok((k, v)) => {
                    dk.extend(k);
                    dv.extend(v);
                }
                Err((i, j, e)) => {
                    if first.as_ref().is_none_or(|(fi, fj, _)| (i, j) < (*fi, *fj)) {
                        first = Some((i, j, e));
                    }
                }
            }
        }
        match first {
            Some((_, _, e)) => Err(e),
            None => Ok((dk, dv)),
        }
    }

    /// dK and dV rows of `keys`, or the block's smallest failing pair.
    #[allow(clippy::type_complexity)]
    fn key_block(
        &self,
        keys: std::ops::Range<usize>,
    ) -> Result<(Vec<f64>, Vec<f64>), (usize, usize, AttentionError)> {
        let (d_k, d_v) = (self.d_k, self.d_v);
        let mut dk = vec![0.0; keys.len() * d_k];
        let mut dv = vec![0.0; keys.len() * d_v];
        let mut first: Option<(usize, usize, AttentionError)> = None;
        for (r, j) in keys.enumerate() {
            let (dk_j, dv_j) = (&mut dk[r * d_k..][..d_k], &mut dv[r * d_v..][..d_v]);
            let (lo, hi) = self.spec.band.queries(j);
            let queries = lo.max(0) as usize..(hi + 1).clamp(0, self.spec.n_q as i64) as usize;
            for i in queries {
                match self.pair(i, j) {
                    Ok(Some((p, dt))) => {
                        axpy(p, &self.d_o[i * d_v..(i + 1) * d_v], dv_j);
                        axpy(self.scale * dt, &self.q[i * d_k..(i + 1) * d_k], dk_j);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if first.as_ref().is_none_or(|(fi, fj, _)| (i, j) < (*fi, *fj)) {
                            first = Some((i, j, e));
                        }
                        break; // later queries of this key are larger pairs
                    }
                }
            }
        }
        match first {
            Some(f) => Err(f),
            None => Ok((dk, dv)),
        }
    }

    /// dQ (row-major, f64), threads over blocks of queries (every pair was checked by
    /// [`key_pass`](Self::key_pass)).
    fn query_pass(&self, parallel: bool) -> Vec<f64> {
        let (n_q, d_k) = (self.spec.n_q, self.d_k);
        let mut dq = vec![0.0; n_q * d_k];
        let run = |(b, rows): (usize, &mut [f64])| {
            for (r, dq_i) in rows.chunks_mut(d_k.max(1)).enumerate() {
                let i = b * BLOCK + r;
                let (lo, hi) = self.spec.key_range(i);
                let keys = lo as usize..(hi + 1).max(lo) as usize;
                for j in keys {
                    if let Ok(Some((_, dt))) = self.pair(i, j) {
                        axpy(self.scale * dt, &self.k[j * d_k..(j + 1) * d_k], dq_i);
                    }
                }
            }
        };
        let chunk = (BLOCK * d_k).max(1);
        if parallel {
            dq.par_chunks_mut(chunk).enumerate().for_each(run);
        } else {
            dq.chunks_mut(chunk).enumerate().for_each(run);
        }
        dq
    }
}

/// A row-major f64 result of `shape` rounded to T, or the first entry (in row-major
/// order) that overflows the type, as [`AttentionError::ProductOverflow`] of `operand`.
fn rounded<T: Element>(
    x: &[f64],
    (rows, columns): (usize, usize),
    operand: Operand,
) -> Result<DMatrix<T>, AttentionError> {
    debug_assert_eq!(x.len(), rows * columns);
    let mut m = try_matrix(rows, columns, T::zero(), operand)?;
    for r in 0..rows {
        for c in 0..columns {
            let g = T::from_f64_rounded(x[r * columns + c]);
            if !g.finite() {
                return Err(AttentionError::ProductOverflow {
                    operand,
                    row: r,
                    column: c,
                });
            }
            m[(r, c)] = g;
        }
    }
    Ok(m)
}

/// `Σ a_c·b_c` in f64, in order.
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y ← y + a·x`.
#[inline]
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
