//! The backward pass of single-head attention: dQ, dK, dV from the forward's output and
//! log-sum-exp, without storing anything `n_q × n_kv` (FlashAttention-2's recomputation).
//!
//! Work goes in 64 × 64 tiles (`BLOCK`): a tile's products (`Q_i·K_jᵀ`, `dO_i·V_jᵀ`,
//! `Pᵀ·dO_i`, `dTᵀ·Q_i`, `dT·K_j`) by nalgebra's blocked matrix product in T, its weights
//! and score gradients in one elementwise pass, each tile's contribution added into f64
//! accumulators. Both passes cut the same tiles (starting at multiples of 64), so they
//! recompute every weight from the same operands and agree on every decision. Not yet
//! the forward's speed: no fused micro-kernels (see `docs/PERFORMANCE.md`).

use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::Element;
use crate::error::{AttentionError, Axis, GradientOf, Operand, check_dim};
use crate::heads::HeadLayout;
#[allow(unused_imports)] // `exp_nonpos` on T
use crate::kernel::ElementKernels;
use crate::kernel::careful;
use crate::memory::try_matrix;
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
    let problem = Problem::new(&spec, &output, lse, &d_output);
    single_head(&problem, options)
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
    let problem = Problem::new(&spec, &output, lse, &d_output);
    let grads = single_head(&problem, options)?;
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

/// The gradients of a checked single-head problem.
fn single_head<T: Element>(
    problem: &Problem<'_, '_, T>,
    options: &AttentionOptions<'_, T>,
) -> Result<AttentionGradients<T>, AttentionError> {
    let spec = problem.spec;
    let parallel = options.parallelism == Parallelism::Rayon && problem.is_large();
    let (dq, dk, dv) = problem.gradients(parallel)?;
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
        let problem = Problem::new(spec, &out_h, lse_h, &d_out_h);
        let inside = parallel && !across && problem.is_large();
        problem.gradients(inside).map_err(in_batch)
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
        // Scatter into the packed row-major buffers: dQ's block is this head's alone,
        // dK/dV's are summed over the group's heads in head order.
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

/// One (sequence, head) block's dQ, dK, dV (row-major, f64).
type BlockGradients = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Writes (or, with `add`, adds) the row-major `src` (`d` columns) into the row-major
/// `dst` (`width` columns) at row `r0`, column `c0`.
fn place(
    dst: &mut [f64],
    src: &[f64],
    (r0, c0, d, width): (usize, usize, usize, usize),
    add: bool,
) {
    for r in 0..src.len().checked_div(d).unwrap_or(0) {
        let at = (r0 + r) * width + c0;
        for (x, y) in dst[at..at + d].iter_mut().zip(&src[r * d..(r + 1) * d]) {
            *x = if add { *x + y } else { *y };
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

/// The problem as both passes read it: contiguous copies of Q, K, V and dO (so that each
/// tile is a view the matrix product reads at full speed), `D_i`, lse and each row's slack
/// for the lse check.
struct Problem<'s, 'a, T: Element> {
    spec: &'s Spec<'a, T>,
    d_k: usize,
    d_v: usize,
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    d_o: DMatrix<T>,
    lse: Vec<T>,
    /// `D_i = Σ_c dO_ic·O_ic` (summed in f64, rounded once).
    d: Vec<T>,
    /// How far above `lse_i` a recomputed score may lie from rounding alone: the forward
    /// rounded its scores (about `(d_k + 2)·u·|scale|·Σ_c|q_ic|·max|K|`) and lse itself
    /// (`u·|lse_i|`); 4u more for softcap, ALiBi and bias (scaled by |z| per entry).
    slack: Vec<T>,
}

/// One tile's rows `i0 ..` and keys `j0 ..` (lengths from the tile's matrices).
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    j0: usize,
}

impl<'s, 'a, T: Element> Problem<'s, 'a, T> {
    fn new(
        spec: &'s Spec<'a, T>,
        output: &MatRef<'_, T>,
        lse: &[T],
        d_output: &MatRef<'_, T>,
    ) -> Self {
        let (d_k, d_v) = (spec.d_k, spec.d_v);
        let owned = |m: &MatRef<'_, T>| DMatrix::from_fn(m.nrows(), m.ncols(), |r, c| m[(r, c)]);
        let d = (0..spec.n_q)
            .map(|i| {
                let sum: f64 = (0..d_v)
                    .map(|c| d_output[(i, c)].to_f64() * output[(i, c)].to_f64())
                    .sum();
                T::from_f64_rounded(sum)
            })
            .collect();
        let (u, k_max, scale) = (
            T::EPSILON.to_f64(),
            spec.k_max_abs.to_f64(),
            spec.scale.to_f64().abs(),
        );
        let slack = (0..spec.n_q)
            .map(|i| {
                let q_sum: f64 = (0..d_k).map(|c| spec.q[(i, c)].to_f64().abs()).sum();
                let lse = lse[i].to_f64();
                let lse = if lse.is_finite() { lse.abs() } else { 0.0 };
                T::from_f64_rounded(
                    4.0 * u * (1.0 + lse) + (d_k as f64 + 2.0) * u * scale * q_sum * k_max,
                )
            })
            .collect();
        Problem {
            spec,
            d_k,
            d_v,
            q: owned(&spec.q),
            k: owned(&spec.k),
            v: owned(&spec.v),
            d_o: owned(d_output),
            lse: lse.to_vec(),
            d,
            slack,
        }
    }

    /// For the tile at `at` whose scores `Q_i·K_jᵀ` are in `s` (rows × keys): `s` becomes
    /// the weights `P_ij = exp(z_ij − lse_i)` (0 where a pair contributes nothing) and `ds`
    /// the score gradients `dT_ij = P_ij·(dP_ij − D_i)·∂z/∂t` (without the `∂z/∂t` factor
    /// unless `chain`: then `dZ`, the bias gradient), with `dp = dO_i·V_jᵀ` given in `ds`.
    /// Err with the tile's smallest failing pair.
    fn weights(
        &self,
        at: Tile,
        s: &mut DMatrix<T>,
        ds: &mut DMatrix<T>,
        chain: bool,
    ) -> Result<(), (usize, usize, AttentionError)> {
        let spec = self.spec;
        let (rows, keys) = s.shape();
        // Whether every pair of the tile is allowed and unmodified except for the scale:
        // then the loop needs neither `allowed` nor `modify`.
        let plain = !spec.has_elementwise()
            && (0..rows).all(|r| {
                let (lo, hi) = spec.key_range(at.i0 + r);
                lo <= at.j0 as i64 && (at.j0 + keys) as i64 - 1 <= hi
            });
        if plain && spec.softcap.is_none() && self.plain_weights(at, s, ds) {
            return Ok(());
        }
        let four_u = T::EPSILON * T::from_count(4);
        let mut first: Option<(usize, usize, AttentionError)> = None;
        for c in 0..keys {
            let j = at.j0 + c;
            for r in 0..rows {
                let i = at.i0 + r;
                let t = s[(r, c)] * spec.scale;
                let z = if plain { t } else { spec.modify(i, j, t) };
                let (p, dt) = if z == T::NEG_INFINITY {
                    (T::zero(), T::zero())
                } else {
                    let lse = self.lse[i];
                    let x = z - lse;
                    let slack = self.slack[i] + four_u * z.abs();
                    if !z.finite() || lse == T::NEG_INFINITY || x > slack {
                        let e = if z.finite() {
                            AttentionError::InvalidLse {
                                head: 0,
                                row: i,
                                key: j,
                                value: lse.to_f64(),
                            }
                        } else {
                            AttentionError::ScoreOverflow { query: i, key: j }
                        };
                        if first.as_ref().is_none_or(|(fi, fj, _)| (i, j) < (*fi, *fj)) {
                            first = Some((i, j, e));
                        }
                        (T::zero(), T::zero())
                    } else {
                        let x = if x > T::zero() { T::zero() } else { x };
                        let p = x.exp_nonpos::<false>();
                        let dz = p * (ds[(r, c)] - self.d[i]);
                        let dt = if chain && spec.softcap.is_some() {
                            dz * spec.modify_derivative(t)
                        } else {
                            dz
                        };
                        (p, dt)
                    }
                };
                s[(r, c)] = p;
                ds[(r, c)] = dt;
            }
        }
        match first {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// [`weights`](Self::weights) of a tile whose every pair is allowed and whose scores
    /// are only scaled: one branch-free pass that vectorises. Returns false, with `s` and
    /// `ds` untouched, if some weight would exceed 1 beyond the slack (or lse is −∞): the
    /// general loop then finds and names the pair.
    fn plain_weights(&self, at: Tile, s: &mut DMatrix<T>, ds: &mut DMatrix<T>) -> bool {
        let (rows, keys) = s.shape();
        let scale = self.spec.scale;
        let lse = &self.lse[at.i0..at.i0 + rows];
        let slack = &self.slack[at.i0..at.i0 + rows];
        let four_u = T::EPSILON * T::from_count(4);
        // First the check, on the scores alone (an lse of −∞ gives +∞ here, a non-finite
        // score NaN or +∞: both fail it).
        let mut all_ok = true;
        for c in 0..keys {
            let col = s.column(c);
            for r in 0..rows {
                let z = col[r] * scale;
                let excess = z - lse[r] - slack[r] - four_u * z.abs();
                all_ok &= excess <= T::zero();
            }
        }
        if !all_ok {
            return false;
        }
        let d = &self.d[at.i0..at.i0 + rows];
        for c in 0..keys {
            let (mut s_c, mut ds_c) = (s.column_mut(c), ds.column_mut(c));
            let (s_c, ds_c) = (s_c.as_mut_slice(), ds_c.as_mut_slice());
            for r in 0..rows {
                let x = s_c[r] * scale - lse[r];
                let p = (if x > T::zero() { T::zero() } else { x }).exp_nonpos::<false>();
                s_c[r] = p;
                ds_c[r] = p * (ds_c[r] - d[r]);
            }
        }
        true
    }

    /// The tile's `P` (in `s`) and `dT` (in `ds`): its scores and `dO_i·V_jᵀ` as matrix
    /// products, then [`weights`](Self::weights).
    fn tile(
        &self,
        at: Tile,
        (rows, keys): (usize, usize),
        s: &mut DMatrix<T>,
        ds: &mut DMatrix<T>,
        chain: bool,
    ) -> Result<(), (usize, usize, AttentionError)> {
        if s.shape() != (rows, keys) {
            *s = DMatrix::zeros(rows, keys);
            *ds = DMatrix::zeros(rows, keys);
        }
        let q = self.q.rows(at.i0, rows);
        let k = self.k.rows(at.j0, keys);
        q.mul_to(&k.transpose(), s);
        let d_o = self.d_o.rows(at.i0, rows);
        let v = self.v.rows(at.j0, keys);
        d_o.mul_to(&v.transpose(), ds);
        self.weights(at, s, ds, chain)
    }

    /// The query rows that may see some key of `keys` (by position), clipped.
    fn query_span(&self, keys: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let band = &self.spec.band;
        let lo = band.queries(keys.start).0.max(0);
        let hi = band.queries(keys.end - 1).1.min(self.spec.n_q as i64 - 1);
        if lo > hi {
            0..0
        } else {
            lo as usize..hi as usize + 1
        }
    }

    /// The keys that some row of `rows` may see (by position), clipped.
    fn key_span(&self, rows: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let lo = self.spec.key_range(rows.start).0;
        let hi = self.spec.key_range(rows.end - 1).1;
        if lo > hi {
            0..0
        } else {
            lo as usize..hi as usize + 1
        }
    }

    /// Whether the problem is large enough to split over threads.
    fn is_large(&self) -> bool {
        let spec = self.spec;
        spec.n_q * spec.n_kv * (spec.d_k + spec.d_v) >= PARALLEL_MIN_WORK
    }

    /// dQ, dK and dV (row-major, f64): the key pass, then the query pass. Scores that
    /// may leave the type's range are decided first by the forward's rule, so that the
    /// backward of a call fails exactly when the call does.
    #[allow(clippy::type_complexity)] // (dQ, dK, dV)
    fn gradients(&self, parallel: bool) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), AttentionError> {
        let spec = self.spec;
        if !spec.scores_in_range {
            let mut scratch = try_matrix(spec.n_q, spec.d_v, T::zero(), Operand::Output)?;
            careful::attention(spec, &mut (&mut scratch).into_mat_mut(), None)?;
        }
        let (dk, dv) = self.key_pass(parallel)?;
        Ok((self.query_pass(parallel), dk, dv))
    }

    /// dK and dV (row-major, f64), threads over blocks of keys, each walking the query
    /// blocks that can see it in order. On error, the one of the smallest pair `(i, j)`
    /// in lexicographic order: every pair is visited, so the error does not depend on
    /// the threads.
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

    /// dK and dV rows of `keys` (row-major, f64), or the block's smallest failing pair:
    /// per query block, `dV_j += Pᵀ·dO_i` and `dK_j += scale·dTᵀ·Q_i` as products in T
    /// (a tile's sums: at most 64 terms), added into f64.
    #[allow(clippy::type_complexity)]
    fn key_block(
        &self,
        keys: std::ops::Range<usize>,
    ) -> Result<(Vec<f64>, Vec<f64>), (usize, usize, AttentionError)> {
        let (d_k, d_v, n) = (self.d_k, self.d_v, keys.len());
        let mut dk = DMatrix::<f64>::zeros(n, d_k);
        let mut dv = DMatrix::<f64>::zeros(n, d_v);
        let (mut s, mut ds) = (DMatrix::zeros(0, 0), DMatrix::zeros(0, 0));
        let (mut dk_t, mut dv_t) = (DMatrix::zeros(n, d_k), DMatrix::zeros(n, d_v));
        let (mut st, mut dst) = (DMatrix::zeros(n, 0), DMatrix::zeros(n, 0));
        let mut first: Option<(usize, usize, AttentionError)> = None;
        // Query blocks start at multiples of BLOCK, as in the query pass: both passes
        // then compute each tile from the same operands, so they recompute the same
        // weights and make the same decisions.
        let span = self.query_span(&keys);
        let mut i0 = span.start / BLOCK * BLOCK;
        while i0 < span.end {
            let rows = BLOCK.min(self.spec.n_q - i0);
            let at = Tile { i0, j0: keys.start };
            match self.tile(at, (rows, n), &mut s, &mut ds, true) {
                Ok(()) => {}
                Err(f) => {
                    if first
                        .as_ref()
                        .is_none_or(|(fi, fj, _)| (f.0, f.1) < (*fi, *fj))
                    {
                        first = Some(f);
                    }
                }
            }
            if first.is_none() {
                // Transposed copies first: nalgebra's `gemm_tr` is a plain loop, `mul_to`
                // the blocked product.
                if st.shape() != (n, rows) {
                    st = DMatrix::zeros(n, rows);
                    dst = DMatrix::zeros(n, rows);
                }
                s.transpose_to(&mut st);
                ds.transpose_to(&mut dst);
                st.mul_to(&self.d_o.rows(i0, rows), &mut dv_t);
                dst.mul_to(&self.q.rows(i0, rows), &mut dk_t);
                dk_t *= self.spec.scale;
                add_to(&dv_t, &mut dv);
                add_to(&dk_t, &mut dk);
            }
            i0 += rows;
        }
        match first {
            Some(f) => Err(f),
            None => Ok((row_major(&dk), row_major(&dv))),
        }
    }

    /// dQ (row-major, f64), threads over blocks of queries, each walking the key blocks
    /// it can see in order (every pair was checked by [`key_pass`](Self::key_pass)).
    fn query_pass(&self, parallel: bool) -> Vec<f64> {
        let (n_q, n_kv, d_k) = (self.spec.n_q, self.spec.n_kv, self.d_k);
        let mut dq = vec![0.0; n_q * d_k];
        let run = |(b, out): (usize, &mut [f64])| {
            let rows = b * BLOCK..(b * BLOCK + BLOCK).min(n_q);
            if n_kv == 0 || rows.is_empty() {
                return;
            }
            let n = rows.len();
            let (mut s, mut ds) = (DMatrix::zeros(0, 0), DMatrix::zeros(0, 0));
            let mut dq_t = DMatrix::zeros(n, d_k);
            let mut acc = DMatrix::<f64>::zeros(n, d_k);
            let span = self.key_span(&rows);
            // Keys start at multiples of BLOCK, as in the key pass (see there).
            let mut j0 = span.start / BLOCK * BLOCK;
            while j0 < span.end {
                let keys = BLOCK.min(n_kv - j0);
                let at = Tile { i0: rows.start, j0 };
                // The key pass checked every pair of this very tile.
                let _ = self.tile(at, (n, keys), &mut s, &mut ds, true);
                ds.mul_to(&self.k.rows(j0, keys), &mut dq_t);
                dq_t *= self.spec.scale;
                add_to(&dq_t, &mut acc);
                j0 += keys;
            }
            out.copy_from_slice(&row_major(&acc));
        };
        let chunk = (BLOCK * d_k).max(1);
        if d_k == 0 {
            return dq;
        }
        if parallel {
            dq.par_chunks_mut(chunk).enumerate().for_each(run);
        } else {
            dq.chunks_mut(chunk).enumerate().for_each(run);
        }
        dq
    }
}

impl<T: Element> Problem<'_, '_, T> {
    /// `∂L/∂bias = dZ` (n_q × n_kv; 0 wherever no weight flows), after the key pass
    /// checked every pair: the same tiles once more, without the softcap factor.
    fn bias_gradient(&self) -> Result<DMatrix<T>, AttentionError> {
        let (n_q, n_kv) = (self.spec.n_q, self.spec.n_kv);
        let mut d_bias = try_matrix(n_q, n_kv, T::zero(), Operand::Gradient(GradientOf::Bias))?;
        let (mut s, mut ds) = (DMatrix::zeros(0, 0), DMatrix::zeros(0, 0));
        let mut j0 = 0;
        while j0 < n_kv {
            let keys = BLOCK.min(n_kv - j0);
            let span = self.query_span(&(j0..j0 + keys));
            let mut i0 = span.start / BLOCK * BLOCK;
            while i0 < span.end {
                let rows = BLOCK.min(n_q - i0);
                let _ = self.tile(Tile { i0, j0 }, (rows, keys), &mut s, &mut ds, false);
                d_bias.view_mut((i0, j0), (rows, keys)).copy_from(&ds);
                i0 += rows;
            }
            j0 += keys;
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

/// `acc += m`, element by element in f64 (both column-major, the same shape).
fn add_to<T: Element>(m: &DMatrix<T>, acc: &mut DMatrix<f64>) {
    for (a, x) in acc.iter_mut().zip(m.iter()) {
        *a += x.to_f64();
    }
}

/// `m`'s entries in row-major order.
fn row_major(m: &DMatrix<f64>) -> Vec<f64> {
    m.transpose().as_slice().to_vec()
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
