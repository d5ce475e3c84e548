//! The backward pass of attention: dQ, dK, dV from the forward's output and
//! log-sum-exp, without storing anything `n_q × n_kv` (FlashAttention-2's recomputation).
//!
//! This file holds the public functions and the validation of their extra operands
//! (`output`, `lse`, `d_output`), and drives the kernel (`kernel/grad.rs`): one pass over
//! 64 × 64 tiles with the five products of a tile on the CPU path's register tiles, key
//! blocks dealt to a fixed number of chunks that own their dK/dV rows and a share of dQ,
//! the shares added in chunk order, so that no result depends on the threads.

use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::Element;
use crate::api::check_qkv;
use crate::cpu::CpuPath;
use crate::error::{AttentionError, Axis, GradientOf, Operand, check_dim};
use crate::heads::HeadLayout;
use crate::kernel::grad::{
    BLOCK, Buffers, Chunk, MAX_CHUNKS, Operands, ROUND_BLOCKS, TileScratch, join, keep_first, owner,
};
use crate::kernel::{careful, set_len};
use crate::memory::{try_matrix, try_resize};
use crate::options::{AttentionOptions, MatRef, Parallelism};
use crate::spec::{Batch, Sequence, Spec, check_finite};
use crate::view::{self, AsMatMut, AsMatRef, MatMut};

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
/// dK and dV (threads over blocks of 64 keys) and once for dQ (threads over blocks of 64
/// queries); within a 64 × 64 tile the sums run in T, across tiles in f64, in an order
/// fixed by the sizes, so the result does not depend on the number of threads. Masked pairs and rows with no allowed key get gradient exactly 0;
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
    let (path, _) = CpuPath::for_call(options.cpu_path)?;
    let threads = options.parallelism == Parallelism::Rayon;
    let problem = Problem::new(&spec, &output, lse, &d_output, path, threads)?;
    single_head(&problem)
}

/// [`scaled_dot_product_attention_backward`] writing dQ, dK and dV into the caller's
/// matrices or views (`d_query` n_q × d_k, `d_key` n_kv × d_k, `d_value` n_kv × d_v) and,
/// if `d_bias` is given, `∂L/∂bias` (n_q × n_kv) into it: the one `n_q × n_kv` result,
/// computed only when asked for, and only with a bias in the options.
///
/// `∂L/∂bias_ij = dZ_ij = P_ij·(dO_i·v_j − D_i)` (the bias is added to the final scores,
/// after the softcap), 0 wherever no weight flows (masked pairs, −∞ entries, empty rows);
/// each row of it sums to 0. Computing it recomputes every tile once more and holds an
/// `n_q × n_kv` buffer until every check has passed, so that on error nothing is written.
///
/// # Errors
/// Those of [`scaled_dot_product_attention_backward`];
/// [`AttentionError::DimensionMismatch`] with [`Operand::Gradient`] for an output of the
/// wrong shape; [`AttentionError::InvalidOption`] for `d_bias` without a bias in the
/// options. On error every output keeps its old contents.
///
/// # Example
/// ```
/// use attention_core::{
///     scaled_dot_product_attention_backward_into, scaled_dot_product_attention_with_lse,
///     AttentionOptions,
/// };
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_fn(3, 2, |i, j| ((i * 2 + j) as f64 * 0.9).sin());
/// let v = DMatrix::from_fn(4, 2, |i, j| (i * j) as f64 * 0.3);
/// let bias = DMatrix::from_fn(3, 4, |i, j| 0.1 * (i as f64 - j as f64));
/// let options = AttentionOptions::new().with_bias(&bias);
/// let k = q.rows(0, 2).transpose().insert_columns(2, 2, 0.5).transpose(); // 4 × 2
/// let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options)?;
/// let d_out = DMatrix::from_element(3, 2, 1.0);
/// let (mut dq, mut dk, mut dv) = (DMatrix::zeros(3, 2), DMatrix::zeros(4, 2), DMatrix::zeros(4, 2));
/// let mut d_bias = DMatrix::zeros(3, 4);
/// scaled_dot_product_attention_backward_into(
///     &q, &k, &v, &out, lse.as_slice(), &d_out, &options,
///     (&mut dq, &mut dk, &mut dv), Some((&mut d_bias).into()),
/// )?;
/// // Each row of the bias gradient sums to 0 (the softmax is shift-invariant).
/// assert!(d_bias.row(1).sum().abs() < 1e-12);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::too_many_arguments)] // the forward's inputs and results, and the outputs
pub fn scaled_dot_product_attention_backward_into<'q, 'k, 'v, 'o, 'g, 'a, 'b, 'c, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    output: impl AsMatRef<'o, T>,
    lse: &[T],
    d_output: impl AsMatRef<'g, T>,
    options: &AttentionOptions<'_, T>,
    (d_query, d_key, d_value): (
        impl AsMatMut<'a, T>,
        impl AsMatMut<'b, T>,
        impl AsMatMut<'c, T>,
    ),
    d_bias: Option<MatMut<'_, T>>,
) -> Result<(), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let spec = Spec::new(q, k, v, options)?;
    let (output, d_output) = (output.into_mat_ref(), d_output.into_mat_ref());
    check_result_operands(&spec, &output, lse, &d_output)?;
    let (mut dq, mut dk, mut dv) = (
        d_query.into_mat_mut(),
        d_key.into_mat_mut(),
        d_value.into_mat_mut(),
    );
    let mut d_bias = d_bias;
    let outputs = [
        (GradientOf::Query, dq.shape(), (spec.n_q, spec.d_k)),
        (GradientOf::Key, dk.shape(), (spec.n_kv, spec.d_k)),
        (GradientOf::Value, dv.shape(), (spec.n_kv, spec.d_v)),
    ];
    let bias_shape = d_bias
        .as_ref()
        .map(|m| (GradientOf::Bias, m.shape(), (spec.n_q, spec.n_kv)));
    for (of, (rows, columns), (want_rows, want_columns)) in outputs.into_iter().chain(bias_shape) {
        let operand = Operand::Gradient(of);
        check_dim(
            operand,
            Axis::Rows,
            rows,
            want_rows,
            operand,
            "a gradient has its input's shape",
        )?;
        check_dim(
            operand,
            Axis::Columns,
            columns,
            want_columns,
            operand,
            "a gradient has its input's shape",
        )?;
    }
    if d_bias.is_some() && spec.bias.is_none() {
        return Err(AttentionError::InvalidOption {
            option: "d_bias",
            rule: "a bias gradient needs a bias in the options (with_bias)",
        });
    }
    let (path, _) = CpuPath::for_call(options.cpu_path)?;
    let threads = options.parallelism == Parallelism::Rayon;
    let problem = Problem::new(&spec, &output, lse, &d_output, path, threads)?;
    let grads = single_head(&problem)?;
    let bias_grad = match d_bias {
        Some(_) => Some(problem.bias_gradient()?),
        None => None,
    };
    // Every check has passed: write.
    dq.copy_from(&grads.dq);
    dk.copy_from(&grads.dk);
    dv.copy_from(&grads.dv);
    if let (Some(out), Some(g)) = (d_bias.as_mut(), bias_grad) {
        out.copy_from(&g);
    }
    Ok(())
}

/// The gradients of a checked single-head problem, rounded to T.
fn single_head<T: Element>(
    problem: &Problem<'_, '_, T>,
) -> Result<AttentionGradients<T>, AttentionError> {
    let spec = problem.ops.spec;
    let (dq, dk, dv) = problem.gradients()?;
    let rounded = all_rounded(
        problem.parallel,
        [
            (&dq, (spec.n_q, spec.d_k)),
            (&dk, (spec.n_kv, spec.d_k)),
            (&dv, (spec.n_kv, spec.d_v)),
        ],
    );
    Buffers::<T>::keep_results([dq, dk, dv]);
    rounded
}

/// dQ, dK and dV (row-major f64 of the given shapes) rounded to T, on threads if
/// `parallel`; the first error in the order dQ, dK, dV.
fn all_rounded<T: Element>(
    parallel: bool,
    [(dq, q), (dk, k), (dv, v)]: [(&[f64], (usize, usize)); 3],
) -> Result<AttentionGradients<T>, AttentionError> {
    let ((dq, dk), dv) = join(
        parallel,
        || {
            join(
                parallel,
                || rounded(dq, q, Operand::Query),
                || rounded(dk, k, Operand::Key),
            )
        },
        || rounded(dv, v, Operand::Value),
    );
    Ok(AttentionGradients {
        dq: dq?,
        dk: dk?,
        dv: dv?,
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
    // dQ's blocks, and dK's and dV's without GQA, are rounded straight into the results;
    // with GQA, dK and dV are summed over each group in f64 first.
    let mut dq = RoundedInto::new(q.shape(), Operand::Query)?;
    let (mut dk_sum, mut dv_sum) = (Vec::new(), Vec::new());
    let (mut dk_t, mut dv_t) = (None, None);
    if group > 1 {
        try_resize(&mut dk_sum, k.nrows() * k.ncols(), 0.0, Operand::Key)?;
        try_resize(&mut dv_sum, v.nrows() * v.ncols(), 0.0, Operand::Value)?;
    } else {
        dk_t = Some(RoundedInto::new(k.shape(), Operand::Key)?);
        dv_t = Some(RoundedInto::new(v.shape(), Operand::Value)?);
    }
    let (path, _) = CpuPath::for_call(options.cpu_path)?;
    let parallel = options.parallelism == Parallelism::Rayon;
    // Many blocks: threads over blocks, each block on one thread; few: blocks in turn,
    // each split inside when large. A block's result does not depend on which, and the
    // results are combined below in block order, so threads change no bit.
    let across = parallel && batch.specs.len() >= 2 * rayon::current_num_threads();
    let block = |(b, spec): (usize, &Spec<'_, T>)| -> Result<BlockGradients, AttentionError> {
        let (s, h) = (b / h_q, b % h_q);
        let seq = batch.sequences[s];
        let in_batch = |e| packed_error(e, h, seq);
        let rows = seq.q_start..seq.q_start + seq.n_q;
        let out_h = view::block(output, rows.clone(), h * d_v..(h + 1) * d_v);
        let d_out_h = view::block(d_output, rows.clone(), h * d_v..(h + 1) * d_v);
        let lse_h = &lse.as_slice()[h * lse.nrows()..][rows];
        let problem = Problem::new(spec, &out_h, lse_h, &d_out_h, path, parallel && !across)
            .map_err(in_batch)?;
        problem.gradients().map_err(in_batch)
    };
    let results: Vec<Result<BlockGradients, AttentionError>> = if across {
        batch.specs.par_iter().enumerate().map(block).collect()
    } else {
        batch.specs.iter().enumerate().map(block).collect()
    };
    // The error to report, whatever the threads: a score overflow or an invalid lse at
    // the smallest (packed query, head, packed key), as the forward orders overflows;
    // otherwise the first block's.
    let rank = |e: &AttentionError| match *e {
        AttentionError::HeadScoreOverflow { head, query, key }
        | AttentionError::InvalidLse {
            head,
            row: query,
            key,
            ..
        } => (0, query, head, key),
        _ => (1, 0, 0, 0),
    };
    if let Some(e) = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .min_by_key(|e| rank(e))
    {
        return Err(e.clone());
    }
    for (b, result) in results.into_iter().enumerate() {
        let (dq_h, dk_h, dv_h) = result?;
        let (s, h) = (b / h_q, b % h_q);
        let seq = batch.sequences[s];
        let j = h / group;
        // dQ's block is this head's alone; dK's and dV's are summed over the group's
        // heads in head order (or, without GQA, this head's alone too).
        dq.write(&dq_h, (seq.q_start, h * d_k, d_k));
        match (&mut dk_t, &mut dv_t) {
            (Some(dk_t), Some(dv_t)) => {
                dk_t.write(&dk_h, (seq.kv_start, j * d_k, d_k));
                dv_t.write(&dv_h, (seq.kv_start, j * d_v, d_v));
            }
            _ => {
                place(&mut dk_sum, &dk_h, (seq.kv_start, j * d_k, d_k, k.ncols()));
                place(&mut dv_sum, &dv_h, (seq.kv_start, j * d_v, d_v, v.ncols()));
            }
        }
    }
    // The first error in the order dQ, dK, dV, as the single-head call's.
    let dq = dq.finish()?;
    let (dk, dv) = match (dk_t, dv_t) {
        (Some(dk_t), Some(dv_t)) => (dk_t.finish()?, dv_t.finish()?),
        _ => {
            let (dk, dv) = join(
                parallel,
                || rounded(&dk_sum, k.shape(), Operand::Key),
                || rounded(&dv_sum, v.shape(), Operand::Value),
            );
            (dk?, dv?)
        }
    };
    Ok(AttentionGradients { dq, dk, dv })
}

/// A gradient rounded to T block by block as the blocks arrive, keeping its first
/// overflowing entry in row-major order (as [`rounded`] reports it).
struct RoundedInto<T: Element> {
    m: DMatrix<T>,
    operand: Operand,
    first: Option<(usize, usize)>,
}

impl<T: Element> RoundedInto<T> {
    fn new((rows, columns): (usize, usize), operand: Operand) -> Result<Self, AttentionError> {
        Ok(RoundedInto {
            m: try_matrix(rows, columns, T::zero(), operand)?,
            operand,
            first: None,
        })
    }

    /// Writes the row-major f64 block `src` (`d` columns) at row `r0`, column `c0`,
    /// rounded to T.
    fn write(&mut self, src: &[f64], (r0, c0, d): (usize, usize, usize)) {
        let rows = src.len().checked_div(d).unwrap_or(0);
        // Rows in blocks of 64, so that the block's source rows stay in cache.
        for b in (0..rows).step_by(64) {
            for c in 0..d {
                let mut column = self.m.column_mut(c0 + c);
                for r in b..(b + 64).min(rows) {
                    let g = T::from_f64_rounded(src[r * d + c]);
                    if !g.finite() && self.first.is_none_or(|f| (r0 + r, c0 + c) < f) {
                        self.first = Some((r0 + r, c0 + c));
                    }
                    column[r0 + r] = g;
                }
            }
        }
    }

    fn finish(self) -> Result<DMatrix<T>, AttentionError> {
        match self.first {
            Some((row, column)) => Err(AttentionError::ProductOverflow {
                operand: self.operand,
                row,
                column,
            }),
            None => Ok(self.m),
        }
    }
}

/// The gradients of [`compute_qkv_backward`], each the shape of its input.
#[derive(Clone, Debug, PartialEq)]
pub struct QkvGradients<T: Element> {
    /// `∂L/∂X`, n × d_model.
    pub dx: DMatrix<T>,
    /// `∂L/∂W_q`, d_model × d_k.
    pub dw_q: DMatrix<T>,
    /// `∂L/∂W_k`, d_model × d_k.
    pub dw_k: DMatrix<T>,
    /// `∂L/∂W_v`, d_model × d_v.
    pub dw_v: DMatrix<T>,
}

/// The gradients of [`compute_qkv`](crate::compute_qkv) with respect to `X`, `W_q`, `W_k`
/// and `W_v`, given `d_q = ∂L/∂Q`, `d_k = ∂L/∂K`, `d_v = ∂L/∂V` for some scalar loss `L`
/// (e.g. from [`scaled_dot_product_attention_backward`]):
///
/// ```text
/// dW_q = Xᵀ·dQ      dW_k = Xᵀ·dK      dW_v = Xᵀ·dV
/// dX   = dQ·W_qᵀ + dK·W_kᵀ + dV·W_vᵀ
/// ```
///
/// Each product by nalgebra's matrix product in T, as the forward's projections.
///
/// # Shapes
/// `x` n × d_model, `w_q` and `w_k` d_model × d_k, `w_v` d_model × d_v, `d_q` and `d_k`
/// n × d_k, `d_v` n × d_v. Returns dX, dW_q, dW_k, dW_v in the shapes of their inputs.
///
/// # Errors
/// Those of [`compute_qkv`](crate::compute_qkv) for `x` and the weights;
/// [`AttentionError::DimensionMismatch`] with [`Operand::Gradient`] for a gradient of the
/// wrong shape; [`AttentionError::NonFinite`] for NaN/∞ in one;
/// [`AttentionError::ProductOverflow`] if a result exceeds the type's range;
/// [`AttentionError::TooLarge`] if the results cannot be allocated.
///
/// # Example
/// ```
/// use attention_core::{compute_qkv, compute_qkv_backward};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f64>::from_fn(3, 4, |i, j| (i + 2 * j) as f64 * 0.1);
/// let w = DMatrix::from_fn(4, 2, |i, j| (i * j) as f64 * 0.5 - 0.3);
/// let (q, _, _) = compute_qkv(&x, &w, &w, &w)?;
/// // L = Σ Q: dQ is all ones, dK and dV zero.
/// let (ones, zeros) = (DMatrix::from_element(3, 2, 1.0), DMatrix::zeros(3, 2));
/// let g = compute_qkv_backward(&x, &w, &w, &w, &ones, &zeros, &zeros)?;
/// // ∂(Σ X·W_q)/∂W_q[m][c] = Σ_i X[i][m].
/// assert!((g.dw_q[(1, 0)] - x.column(1).sum()).abs() < 1e-12);
/// assert_eq!(g.dw_k, DMatrix::zeros(4, 2));
/// assert_eq!(q.shape(), (3, 2));
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::too_many_arguments)] // the forward's inputs and its results' gradients
pub fn compute_qkv_backward<'x, 'q, 'k, 'v, 'a, 'b, 'c, T: Element>(
    x: impl AsMatRef<'x, T>,
    w_q: impl AsMatRef<'q, T>,
    w_k: impl AsMatRef<'k, T>,
    w_v: impl AsMatRef<'v, T>,
    d_q: impl AsMatRef<'a, T>,
    d_k: impl AsMatRef<'b, T>,
    d_v: impl AsMatRef<'c, T>,
) -> Result<QkvGradients<T>, AttentionError> {
    let (x, w_q, w_k, w_v) = (
        x.into_mat_ref(),
        w_q.into_mat_ref(),
        w_k.into_mat_ref(),
        w_v.into_mat_ref(),
    );
    check_qkv(&x, &w_q, &w_k, &w_v)?;
    // Each gradient with its weight: the weight's operand and its gradient's name.
    let grads = [
        (
            d_q.into_mat_ref(),
            &w_q,
            GradientOf::Query,
            Operand::QueryWeight,
            GradientOf::QueryWeight,
        ),
        (
            d_k.into_mat_ref(),
            &w_k,
            GradientOf::Key,
            Operand::KeyWeight,
            GradientOf::KeyWeight,
        ),
        (
            d_v.into_mat_ref(),
            &w_v,
            GradientOf::Value,
            Operand::ValueWeight,
            GradientOf::ValueWeight,
        ),
    ];
    for (g, w, of, ..) in &grads {
        let operand = Operand::Gradient(*of);
        let rule = "a gradient has its input's shape";
        check_dim(
            operand,
            Axis::Rows,
            g.nrows(),
            x.nrows(),
            Operand::Input,
            rule,
        )?;
        check_dim(operand, Axis::Columns, g.ncols(), w.ncols(), operand, rule)?;
        check_finite(operand, g)?;
    }
    let parts = grads.map(|(g, w, of, w_operand, w_grad)| Projected {
        g,
        g_operand: Operand::Gradient(of),
        w: *w,
        w_operand,
        w_grad,
    });
    let (dx, dw) = projections_backward((&x, GradientOf::Input), &parts)?;
    let [dw_q, dw_k, dw_v] = <[DMatrix<T>; 3]>::try_from(dw).expect("three weight gradients");
    Ok(QkvGradients {
        dx,
        dw_q,
        dw_k,
        dw_v,
    })
}

/// One projection `G = X·W (+ b)` of [`projections_backward`]: the gradient of its result
/// and its weight, each with the operand that names it.
pub(crate) struct Projected<'a, T: Element> {
    pub g: MatRef<'a, T>,
    pub g_operand: Operand,
    pub w: MatRef<'a, T>,
    pub w_operand: Operand,
    /// The weight's gradient, as errors name it.
    pub w_grad: GradientOf,
}

/// The backward of projections of one input: `dX = Σ_p G_p·W_pᵀ` and each
/// `dW_p = Xᵀ·G_p`, by nalgebra's matrix product in T (shapes checked by the caller);
/// [`AttentionError::ProductOverflow`] for the first result out of range (dX, named
/// `x_grad`, first).
pub(crate) fn projections_backward<T: Element>(
    (x, x_grad): (&MatRef<'_, T>, GradientOf),
    parts: &[Projected<'_, T>],
) -> Result<(DMatrix<T>, Vec<DMatrix<T>>), AttentionError> {
    // Owned copies: nalgebra's product reads any of them in place.
    let own = |m: &MatRef<'_, T>, operand| -> Result<DMatrix<T>, AttentionError> {
        let mut o = try_matrix(m.nrows(), m.ncols(), T::zero(), operand)?;
        o.copy_from(m);
        Ok(o)
    };
    let x = own(x, Operand::Input)?;
    let (n, d_model) = x.shape();
    let mut dx = try_matrix(n, d_model, T::zero(), Operand::Gradient(x_grad))?;
    let mut dw = Vec::with_capacity(parts.len());
    for p in parts {
        let g = own(&p.g, p.g_operand)?;
        let w_t = own(&p.w, p.w_operand)?.transpose();
        // dX += G·Wᵀ; dW = Xᵀ·G.
        dx.gemm(T::one(), &g, &w_t, T::one());
        let mut d = try_matrix(d_model, g.ncols(), T::zero(), Operand::Gradient(p.w_grad))?;
        x.tr_mul_to(&g, &mut d);
        dw.push(d);
    }
    let named = parts.iter().map(|p| p.w_grad);
    for (m, of) in std::iter::once(&dx)
        .chain(&dw)
        .zip(std::iter::once(x_grad).chain(named))
    {
        if let Some(at) = m.iter().position(|e| !e.finite()) {
            return Err(AttentionError::ProductOverflow {
                operand: Operand::Gradient(of),
                row: at % m.nrows(),
                column: at / m.nrows(),
            });
        }
    }
    Ok((dx, dw))
}

/// One (sequence, head) block's dQ, dK, dV (row-major, f64).
type BlockGradients = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Adds the row-major `src` (`d` columns) into the row-major `dst` (`width` columns) at
/// row `r0`, column `c0`.
fn place(dst: &mut [f64], src: &[f64], (r0, c0, d, width): (usize, usize, usize, usize)) {
    for r in 0..src.len().checked_div(d).unwrap_or(0) {
        let at = (r0 + r) * width + c0;
        for (x, y) in dst[at..at + d].iter_mut().zip(&src[r * d..(r + 1) * d]) {
            *x += y;
        }
    }
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

/// A checked problem laid out for the backward kernel, and the CPU path to run it on.
struct Problem<'s, 'a, T: Element> {
    ops: Operands<'s, 'a, T>,
    path: CpuPath,
    /// Whether to use threads (asked for, and the problem is large).
    parallel: bool,
}

/// Which of a chunk's accumulators (its dK or its dV).
type Of<T> = fn(&Chunk<T>) -> &[f64];

impl<'s, 'a, T: Element> Problem<'s, 'a, T> {
    /// The problem laid out for `path`, to run on threads if `threads` and it is large.
    fn new(
        spec: &'s Spec<'a, T>,
        output: &MatRef<'_, T>,
        lse: &[T],
        d_output: &MatRef<'_, T>,
        path: CpuPath,
        threads: bool,
    ) -> Result<Self, AttentionError> {
        let parallel = threads && spec.n_q * spec.n_kv * (spec.d_k + spec.d_v) >= PARALLEL_MIN_WORK;
        let mr = T::grad(path).mr;
        Ok(Problem {
            ops: Operands::new(spec, output, lse, d_output, mr, parallel)?,
            path,
            parallel,
        })
    }

    /// dQ, dK and dV (row-major, f64) by the one-pass kernel (`kernel/grad.rs`): query
    /// rows in rounds, each round's tiles over the key chunks (on threads if `parallel`),
    /// then the chunks' dQ shares added in chunk order. Scores that may leave the type's
    /// range are decided first by the forward's rule, so that the backward of a call fails
    /// exactly when the call does. On error, the one of the smallest pair `(i, j)`: a
    /// round visits every pair of its rows, and rounds go in row order.
    #[allow(clippy::type_complexity)] // (dQ, dK, dV)
    fn gradients(&self) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), AttentionError> {
        let ops = &self.ops;
        let spec = ops.spec;
        if !spec.scores_in_range {
            let mut scratch = try_matrix(spec.n_q, spec.d_v, T::zero(), Operand::Output)?;
            careful::attention(spec, &mut (&mut scratch).into_mat_mut(), None)?;
        }
        let count = ops.key_blocks().min(MAX_CHUNKS);
        T::with_grad_chunks(|chunks| {
            chunks.resize_with(count, Chunk::default);
            for (c, chunk) in chunks.iter_mut().enumerate() {
                chunk.reset(ops, (c, count))?;
            }
            self.run_chunks(chunks)
        })
    }

    /// [`gradients`](Self::gradients) on its chunks, ready.
    #[allow(clippy::type_complexity)] // (dQ, dK, dV)
    fn run_chunks(
        &self,
        chunks: &mut [Chunk<T>],
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), AttentionError> {
        let ops = &self.ops;
        let spec = ops.spec;
        let kernel = T::grad(self.path);
        let (n_q, n_kv, d_k, d_v) = (spec.n_q, spec.n_kv, spec.d_k, spec.d_v);
        let (d_kp, d_vp) = (ops.d_kp(), ops.d_vp());
        let scale = spec.scale.to_f64();
        // Every entry is written below (dQ's rows round by round, dK's and dV's block by
        // block), so the cached buffers are only sized, not cleared.
        let [mut dq, mut dk, mut dv] = Buffers::<T>::take_results();
        for (buf, len, operand) in [
            (&mut dq, n_q * d_k, Operand::Query),
            (&mut dk, n_kv * d_k, Operand::Key),
            (&mut dv, n_kv * d_v, Operand::Value),
        ] {
            set_len(buf, len, operand)?;
        }
        let blocks = ops.query_blocks();
        for start in (0..blocks).step_by(ROUND_BLOCKS) {
            let round = start..(start + ROUND_BLOCKS).min(blocks);
            let run = |chunk: &mut Chunk<T>| (kernel.round)(ops, round.clone(), chunk);
            if self.parallel {
                chunks.par_iter_mut().for_each(run);
            } else {
                chunks.iter_mut().for_each(run);
            }
            let mut first = None;
            for chunk in chunks.iter_mut() {
                if let Some(f) = chunk.first.take() {
                    keep_first(&mut first, f);
                }
            }
            if let Some((_, _, e)) = first {
                return Err(e);
            }
            // dQ_i = scale·Σ_chunks share_i, chunk after chunk (the same order for every
            // entry: ((0 + share_0) + share_1) + …), the round's query blocks over the
            // threads.
            let rows = start * BLOCK..(round.end * BLOCK).min(n_q);
            let shares = &*chunks;
            let add = |(b, block): (usize, &mut [f64])| {
                block.fill(0.0);
                for chunk in shares {
                    let share = &chunk.dq[b * BLOCK * d_kp..];
                    for (r, dq_i) in block.chunks_exact_mut(d_k).enumerate() {
                        for (x, y) in dq_i.iter_mut().zip(&share[r * d_kp..]) {
                            *x += y;
                        }
                    }
                }
                for x in block {
                    *x *= scale;
                }
            };
            if d_k > 0 {
                let dq_rows = &mut dq[rows.start * d_k..rows.end * d_k];
                if self.parallel {
                    dq_rows
                        .par_chunks_mut(BLOCK * d_k)
                        .enumerate()
                        .for_each(add);
                } else {
                    dq_rows.chunks_mut(BLOCK * d_k).enumerate().for_each(add);
                }
            }
        }
        // dK = scale·(the owning chunk's dK), dV as it is, key block by key block over
        // the threads.
        let chunks = &*chunks;
        let place = |out: &mut [f64], width: usize, padded: usize, of: Of<T>, factor: f64| {
            if width == 0 {
                return;
            }
            let each = |(kb, block): (usize, &mut [f64])| {
                let (c, slot) = owner(kb, chunks.len());
                let from = &of(&chunks[c])[slot * BLOCK * padded..];
                for (r, row) in block.chunks_exact_mut(width).enumerate() {
                    for (x, y) in row.iter_mut().zip(&from[r * padded..]) {
                        *x = y * factor;
                    }
                }
            };
            if self.parallel {
                out.par_chunks_mut(BLOCK * width).enumerate().for_each(each);
            } else {
                out.chunks_mut(BLOCK * width).enumerate().for_each(each);
            }
        };
        place(&mut dk, d_k, d_kp, |c| &c.dk, scale);
        place(&mut dv, d_v, d_vp, |c| &c.dv, 1.0);
        Ok((dq, dk, dv))
    }

    /// `∂L/∂bias = dZ` (n_q × n_kv; 0 wherever no weight flows), after the gradients
    /// checked every pair: the same tiles once more, without the softcap factor.
    fn bias_gradient(&self) -> Result<DMatrix<T>, AttentionError> {
        let ops = &self.ops;
        let (n_q, n_kv) = (ops.spec.n_q, ops.spec.n_kv);
        let mut d_bias = try_matrix(n_q, n_kv, T::zero(), Operand::Gradient(GradientOf::Bias))?;
        let kernel = T::grad(self.path);
        let mut scratch = TileScratch::new()?;
        for kb in 0..ops.key_blocks() {
            for qb in ops.query_blocks_of(kb) {
                let _ = (kernel.tile)(ops, (qb, kb), &mut scratch, false);
                let (i0, j0) = (qb * BLOCK, kb * BLOCK);
                let (rows, keys) = (BLOCK.min(n_q - i0), BLOCK.min(n_kv - j0));
                for c in 0..keys {
                    let ds = &scratch.ds[c * BLOCK..][..rows];
                    d_bias.view_mut((i0, j0 + c), (rows, 1)).copy_from_slice(ds);
                }
            }
        }
        match d_bias.iter().position(|x| !x.finite()) {
            Some(at) => Err(AttentionError::ProductOverflow {
                operand: Operand::Gradient(GradientOf::Bias),
                row: at % n_q,
                column: at / n_q,
            }),
            None => Ok(d_bias),
        }
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
    let mut m = RoundedInto::new((rows, columns), operand)?;
    m.write(x, (0, 0, columns));
    m.finish()
}
