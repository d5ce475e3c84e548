//! The public functions: validate once (in `spec`), then hand over to the kernel.

use nalgebra::{DMatrix, DVector};

use crate::Element;
use crate::columns::owned_for_left_product;
use crate::cpu::CpuPath;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::kernel;
use crate::memory::{try_matrix, try_vector};
use crate::options::{AttentionOptions, MatRef, Parallelism};
use crate::projection::project;
use crate::spec::{Spec, check_finite, check_output};
use crate::view::{AsMatMut, AsMatRef, MatMut};

/// Projects tokens to queries, keys and values: `Q = X·W_q`, `K = X·W_k`, `V = X·W_v`.
///
/// # Shapes
/// `X` is `n × d_model` (one row per token), `W_q` and `W_k` are `d_model × d_k`, `W_v` is
/// `d_model × d_v`; the results are `n × d_k`, `n × d_k` and `n × d_v`. This is numpy's
/// `X @ W_q` with nalgebra matrices.
///
/// # Errors
/// [`AttentionError::DimensionMismatch`] if a weight's rows differ from `X`'s columns or
/// `W_q` and `W_k` have different widths; [`AttentionError::NonFinite`] for a NaN or ∞ in
/// any input; [`AttentionError::ProductOverflow`] if a product exceeds the type's range;
/// [`AttentionError::TooLarge`] if a result cannot be allocated.
///
/// # Example
/// ```
/// use attention_core::compute_qkv;
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let w_v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// let (q, k, v) = compute_qkv(&x, &x, &x, &w_v)?;
/// assert_eq!(q, x);
/// assert_eq!(k, x);
/// assert_eq!(v, w_v);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::type_complexity)] // (Q, K, V) reads better than a one-use alias
pub fn compute_qkv<'x, 'q, 'k, 'v, T: Element>(
    x: impl AsMatRef<'x, T>,
    w_q: impl AsMatRef<'q, T>,
    w_k: impl AsMatRef<'k, T>,
    w_v: impl AsMatRef<'v, T>,
) -> Result<(DMatrix<T>, DMatrix<T>, DMatrix<T>), AttentionError> {
    let (x, w_q, w_k, w_v) = (
        x.into_mat_ref(),
        w_q.into_mat_ref(),
        w_k.into_mat_ref(),
        w_v.into_mat_ref(),
    );
    check_qkv(&x, &w_q, &w_k, &w_v)?;
    // nalgebra's product cannot read broadcast or row-strided left operands: copy those
    // first (see `owned_for_left_product`).
    let x_owned = owned_for_left_product(&x, Operand::Input)?;
    let x = x_owned.as_ref().map_or(x, |m| m.as_view());
    Ok((
        project(&x, &w_q, None, Operand::Query)?,
        project(&x, &w_k, None, Operand::Key)?,
        project(&x, &w_v, None, Operand::Value)?,
    ))
}

/// The checks of [`compute_qkv`] (and of its backward): each weight has `X`'s columns as
/// rows, `W_q` and `W_k` have the same width, every entry is finite.
pub(crate) fn check_qkv<T: Element>(
    x: &MatRef<'_, T>,
    w_q: &MatRef<'_, T>,
    w_k: &MatRef<'_, T>,
    w_v: &MatRef<'_, T>,
) -> Result<(), AttentionError> {
    let d_model = x.ncols();
    for (w, operand) in [
        (w_q, Operand::QueryWeight),
        (w_k, Operand::KeyWeight),
        (w_v, Operand::ValueWeight),
    ] {
        check_dim(
            operand,
            Axis::Rows,
            w.nrows(),
            d_model,
            Operand::Input,
            "X·W needs one weight row per input column (d_model)",
        )?;
    }
    check_dim(
        Operand::KeyWeight,
        Axis::Columns,
        w_k.ncols(),
        w_q.ncols(),
        Operand::QueryWeight,
        "queries and keys share d_k",
    )?;
    for (m, operand) in [
        (x, Operand::Input),
        (w_q, Operand::QueryWeight),
        (w_k, Operand::KeyWeight),
        (w_v, Operand::ValueWeight),
    ] {
        check_finite(operand, m)?;
    }
    Ok(())
}

/// Self-attention exactly as in the numpy original: `softmax(Q·Kᵀ / √d_k) · V`.
///
/// The softmax runs over each row (each query), is computed stably (scores minus the row
/// maximum), and never overflows: any finite input gives a finite output.
///
/// # Shapes
/// `Q` is `n_q × d_k`, `K` is `n_kv × d_k`, `V` is `n_kv × d_v`; the output is `n_q × d_v`.
/// `n_q ≠ n_kv` (cross-attention) is fine. `n_q = 0` gives a `0 × d_v` matrix; `n_kv = 0`
/// gives zeros (every query attends to nothing).
///
/// # Errors
/// [`AttentionError::DimensionMismatch`] if K's columns differ from Q's or V's rows from
/// K's; [`AttentionError::NonFinite`] for NaN or ∞ in any input;
/// [`AttentionError::ZeroHeadDim`] if `d_k = 0` (use [`scaled_dot_product_attention`] with
/// an explicit scale); [`AttentionError::ScoreOverflow`] if a score that decides the result
/// lies outside the type's range (its documentation gives the exact rule);
/// [`AttentionError::TooLarge`] if the result cannot be allocated.
///
/// # Example
/// ```
/// use attention_core::self_attention;
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// let out = self_attention(&q, &q, &v)?;
/// assert!((out[(0, 0)] - 1.660_476_9).abs() < 1e-6);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn self_attention<'q, 'k, 'v, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
) -> Result<DMatrix<T>, AttentionError> {
    scaled_dot_product_attention(query, key, value, &AttentionOptions::DEFAULT)
}

/// Scaled dot-product attention with options: `softmax(s)·V`, where `s = scale·Q·Kᵀ`
/// adjusted and masked as [`AttentionOptions`] describes.
///
/// Runs the fused kernel: it streams over blocks of keys with an online softmax, so memory
/// stays `O((n_q + n_kv)·d)`, and splits query blocks over threads unless
/// [`Parallelism::Sequential`] is set (results are bitwise identical either way).
///
/// # Shapes
/// As [`self_attention`]; a mask or bias is `n_q × n_kv`, a key mask has `n_kv` entries.
/// Rows with no allowed key are 0.
///
/// # Errors
/// Those of [`self_attention`], plus the option errors: a mask, key mask or bias of the
/// wrong size ([`AttentionError::DimensionMismatch`]), a NaN or +∞ bias
/// ([`AttentionError::NonFinite`]), a non-finite scale, a softcap that is not > 0, a
/// non-finite ALiBi slope, and an unsupported forced [`CpuPath`]. `d_k = 0` is allowed when
/// the scale is given.
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention, AttentionOptions};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// // With scale 0 every key gets the same weight: each output row is the mean of V.
/// let out = scaled_dot_product_attention(&q, &q, &v, &AttentionOptions::new().with_scale(0.0))?;
/// assert_eq!(out, DMatrix::from_row_slice(2, 2, &[2.0, 3.0, 2.0, 3.0]));
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[inline(always)] // the 2 × 2 seed call: called, this wrapper cost ~30 instructions of ~1,560
pub fn scaled_dot_product_attention<'q, 'k, 'v, T: Element>(
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
    let mut out = try_matrix(q.nrows(), v.ncols(), T::zero(), Operand::Output)?;
    run(q, k, v, options, &mut out.into_mat_mut(), None)?;
    Ok(out)
}

/// [`scaled_dot_product_attention`] writing into a caller's `n_q × d_v` matrix or mutable
/// view, so that a loop of calls does not allocate the output each time.
///
/// `output` is `&mut` a matrix or view, or a mutable view by value ([`AsMatMut`]), with
/// any strides: e.g. `out.columns_mut(h * d_v, d_v)`, one head's columns of a wider
/// output. Only the elements of `output` are written.
///
/// # Errors
/// Those of [`scaled_dot_product_attention`], and [`AttentionError::DimensionMismatch`]
/// with [`Operand::Output`] if `output` is not `n_q × d_v`. On error `output` keeps its
/// old contents.
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention_into, AttentionOptions};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f32>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// let mut out = DMatrix::from_element(2, 2, f32::NAN);
/// for _ in 0..3 {
///     scaled_dot_product_attention_into(&q, &q, &v, &AttentionOptions::new(), &mut out)?;
/// }
/// assert!(out.iter().all(|x| x.is_finite()));
///
/// // The second of two heads of width 2: inputs and output are column blocks.
/// let x = DMatrix::<f32>::from_fn(2, 4, |i, j| (i + j) as f32);
/// let mut wide = DMatrix::from_element(2, 4, f32::NAN);
/// let head = x.columns(2, 2);
/// scaled_dot_product_attention_into(head, head, head, &AttentionOptions::new(), wide.columns_mut(2, 2))?;
/// assert!(wide.columns(0, 2).iter().all(|x| x.is_nan())); // the first head's columns: untouched
/// assert!(wide.columns(2, 2).iter().all(|x| x.is_finite()));
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn scaled_dot_product_attention_into<'q, 'k, 'v, 'o, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    options: &AttentionOptions<'_, T>,
    output: impl AsMatMut<'o, T>,
) -> Result<(), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let mut output = output.into_mat_mut();
    check_output(&output, q.nrows(), v.ncols(), "the output is n_q x d_v")?;
    run(q, k, v, options, &mut output, None)
}

/// [`scaled_dot_product_attention`] that also returns each query's log-sum-exp
/// `lse_i = ln Σ_j exp(s_ij)` over the final scores (−∞ for a row with no allowed key).
///
/// The pair `(output, lse)` is what [`merge_partial_attention`](crate::merge_partial_attention) combines, and
/// `exp(s_ij − lse_i)` recovers the attention weights.
///
/// # Shapes
/// Output `n_q × d_v`, lse `n_q`.
///
/// # Errors
/// Those of [`scaled_dot_product_attention`].
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention_with_lse, AttentionOptions};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_row_slice(1, 1, &[0.0]);
/// let k = DMatrix::from_row_slice(3, 1, &[1.0, 2.0, 3.0]);
/// let v = DMatrix::from_row_slice(3, 1, &[1.0, 2.0, 3.0]);
/// let (_, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &AttentionOptions::new())?;
/// assert!((lse[0] - 3f64.ln()).abs() < 1e-15); // all three scores are 0
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::type_complexity)] // (output, lse) is the documented pair
pub fn scaled_dot_product_attention_with_lse<'q, 'k, 'v, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    options: &AttentionOptions<'_, T>,
) -> Result<(DMatrix<T>, DVector<T>), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let mut out = try_matrix(q.nrows(), v.ncols(), T::zero(), Operand::Output)?;
    let mut lse = try_vector(q.nrows(), T::zero(), Operand::Lse)?;
    run(
        q,
        k,
        v,
        options,
        &mut out.into_mat_mut(),
        Some(lse.as_mut_slice()),
    )?;
    Ok((out, lse))
}

/// Validates, picks the CPU path and runs the kernel; writes the log-sum-exp if asked.
fn run<T: Element>(
    q: MatRef<'_, T>,
    k: MatRef<'_, T>,
    v: MatRef<'_, T>,
    options: &AttentionOptions<'_, T>,
    out: &mut MatMut<'_, T>,
    mut lse: Option<&mut [T]>,
) -> Result<(), AttentionError> {
    // A tiny call with plain options (the seed's 2 × 2) skips the general checks' set-up.
    if let Some(result) = kernel::tiny(&q, &k, &v, options, out, lse.as_deref_mut()) {
        return result;
    }
    let parallel = options.parallelism == Parallelism::Rayon;
    // A decode-sized call checks K and V while the decoding kernel reads them; anything
    // it cannot settle (an error, another route) comes back here untouched.
    if kernel::may_decode(q.nrows(), k.nrows())
        && let (Some(deferred), Ok(path)) = (
            Spec::deferred(q, k, v, options),
            CpuPath::for_call(options.cpu_path),
        )
        && kernel::attention_deferred(&deferred, path, parallel, out, lse.as_deref_mut()).is_some()
    {
        return Ok(());
    }
    let spec = Spec::new(q, k, v, options)?;
    let (path, forced) = CpuPath::for_call(options.cpu_path)?;
    kernel::attention(&spec, path, forced, parallel, out, lse)
}
