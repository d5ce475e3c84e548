//! Python bindings of [`attention_core`]: the Python module `attention` (PyO3 + numpy,
//! built with maturin; `pip install ./crates/python`).
//!
//! - `convert`: Python objects → nalgebra views (dtype dispatch, zero-copy reads), results
//!   → numpy arrays;
//! - `options`: keyword options → [`attention_core::AttentionOptions`];
//! - `threads`: the thread pool the calls run in;
//! - `cache`, `layer`: the classes `KvCache` and `MultiHeadAttention`;
//! - this file: the Python functions, each a thin generic wrapper of one core function.
//!
//! The Python-facing documentation is in the docstrings below and in `attention.pyi`.

mod cache;
mod convert;
mod layer;
mod options;
mod threads;

use std::time::Instant;

use attention_core::{
    AttentionError as CoreError, HeadLayout, MatRef, Operand, Parallelism,
    alibi_slopes as core_alibi_slopes, attention_weights as core_attention_weights,
    compute_qkv as core_compute_qkv, compute_qkv_backward as core_compute_qkv_backward,
    merge_partial_attention as core_merge_partial_attention,
    multi_head_attention_backward as core_multi_head_attention_backward, multi_head_attention_into,
    multi_head_attention_with_lse, scaled_dot_product_attention_backward_into,
    scaled_dot_product_attention_into, scaled_dot_product_attention_with_lse,
};
use nalgebra::DMatrix;
use numpy::{PyArray1, PyUntypedArray};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use convert::{
    Dtype, Float, Input, call_dtype, dispatch, float_array, new_output, output_view, to_numpy,
    vector, vector_to_numpy, writable,
};
use options::{OptionArgs, RawOptions};

create_exception!(
    attention,
    AttentionError,
    PyValueError,
    "Bad input to an attention function: mismatched shapes, NaN or infinity, an invalid \
     option, a score outside the dtype's range, or a result too large to allocate. The \
     message is the Rust core's AttentionError message. Subclass of ValueError."
);

/// A core error as the Python `AttentionError`, with the core's message.
pub(crate) fn core_error(e: CoreError) -> PyErr {
    AttentionError::new_err(e.to_string())
}

/// An error that no input should cause (a bug of this crate).
fn internal(what: &str) -> PyErr {
    PyRuntimeError::new_err(format!("internal error in attention: {what}"))
}

/// The data operands of a call (and its biases), converted to float arrays of one dtype.
struct Call<'py> {
    dtype: Dtype,
    names: Vec<String>,
    data: Vec<Bound<'py, PyUntypedArray>>,
    biases: Vec<Bound<'py, PyUntypedArray>>,
}

impl<'py> Call<'py> {
    /// Converts `data` and the options' biases; one dtype for all of them.
    fn new(data: &[(&str, &Bound<'py, PyAny>)], options: &OptionArgs<'py>) -> PyResult<Self> {
        let mut dtypes = Vec::with_capacity(data.len() + options.biases.len());
        let mut arrays = Vec::with_capacity(data.len());
        for (name, obj) in data {
            let (dtype, array) = float_array(name, obj)?;
            dtypes.push((*name, dtype));
            arrays.push(array);
        }
        let mut biases = Vec::with_capacity(options.biases.len());
        for (name, obj) in &options.biases {
            let (dtype, array) = float_array(name, obj)?;
            dtypes.push((name.as_str(), dtype));
            biases.push(array);
        }
        Ok(Call {
            dtype: call_dtype(&dtypes)?,
            names: data.iter().map(|(n, _)| (*n).to_string()).collect(),
            data: arrays,
            biases,
        })
    }

    /// The data operands as matrices of `T` (the call's dtype).
    fn inputs<T: Float, const N: usize>(&self) -> PyResult<[Input<'py, T>; N]> {
        let inputs = self
            .names
            .iter()
            .zip(&self.data)
            .map(|(name, array)| Input::<T>::new(name, array))
            .collect::<PyResult<Vec<_>>>()?;
        inputs
            .try_into()
            .map_err(|_| internal("wrong number of operands"))
    }
}

/// Multiply-adds of attention between `n_q` queries and `n_kv` keys with `width` columns of
/// Q and V together (an estimate that decides whether a call may use threads).
fn attention_work(n_q: usize, n_kv: usize, width: usize) -> usize {
    n_q.saturating_mul(n_kv).saturating_mul(width)
}

/// `items` as a Python tuple.
fn tuple<'py, const N: usize>(
    py: Python<'py>,
    items: [Bound<'py, PyAny>; N],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyTuple::new(py, items)?.into_any())
}

/// The keyword options every attention function takes, in its signature's order.
macro_rules! raw_options {
    ($scale:expr, $mask:expr, $key_mask:expr, $bias:expr, $causal:expr, $window:expr,
     $softcap:expr, $alibi_slope:expr) => {
        RawOptions {
            scale: $scale,
            mask: $mask,
            key_mask: $key_mask,
            bias: $bias,
            causal: $causal,
            window: $window,
            softcap: $softcap,
            alibi_slope: $alibi_slope,
            ..RawOptions::default()
        }
    };
}

// ------------------------------------------------------------------------- projections

/// Projects tokens to queries, keys and values: ``q = x @ w_q``, ``k = x @ w_k``,
/// ``v = x @ w_v``.
///
/// Shapes: x (n, d_model); w_q and w_k (d_model, d_k); w_v (d_model, d_v). Returns
/// arrays of shapes (n, d_k), (n, d_k), (n, d_v), of the inputs' dtype.
///
/// Raises AttentionError for mismatched shapes, NaN or infinity in an input, or a product
/// beyond the dtype's range; TypeError for unsupported or mixed dtypes.
#[pyfunction]
#[pyo3(signature = (x, w_q, w_k, w_v))]
fn compute_qkv<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w_q: &Bound<'py, PyAny>,
    w_k: &Bound<'py, PyAny>,
    w_v: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions::default())?;
    let call = Call::new(&[("x", x), ("w_q", w_q), ("w_k", w_k), ("w_v", w_v)], &args)?;
    dispatch!(call.dtype, T => compute_qkv_impl::<T>(py, &call))
}

fn compute_qkv_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let [x, w_q, w_k, w_v] = call.inputs::<T, 4>()?;
    let (x, w_q, w_k, w_v) = (x.view()?, w_q.view()?, w_k.view()?, w_v.view()?);
    let work = x
        .nrows()
        .saturating_mul(x.ncols())
        .saturating_mul(2 * w_q.ncols() + w_v.ncols());
    let (q, k, v) =
        threads::run(py, work, |_| core_compute_qkv(x, w_q, w_k, w_v))?.map_err(core_error)?;
    tuple(
        py,
        [
            to_numpy(py, &q, Operand::Query)?.into_any(),
            to_numpy(py, &k, Operand::Key)?.into_any(),
            to_numpy(py, &v, Operand::Value)?.into_any(),
        ],
    )
}

/// The gradients of compute_qkv given ``d_q, d_k, d_v`` (dL/dq, dL/dk, dL/dv):
/// ``dw_q = x.T @ d_q`` (likewise dw_k, dw_v) and
/// ``dx = d_q @ w_q.T + d_k @ w_k.T + d_v @ w_v.T``.
///
/// Shapes: those of compute_qkv; d_q and d_k (n, d_k), d_v (n, d_v). Returns arrays of
/// the shapes of x, w_q, w_k, w_v.
///
/// Raises AttentionError for mismatched shapes, NaN or infinity, or a result beyond the
/// dtype's range; TypeError for unsupported or mixed dtypes.
#[pyfunction]
#[pyo3(signature = (x, w_q, w_k, w_v, d_q, d_k, d_v))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn compute_qkv_backward<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w_q: &Bound<'py, PyAny>,
    w_k: &Bound<'py, PyAny>,
    w_v: &Bound<'py, PyAny>,
    d_q: &Bound<'py, PyAny>,
    d_k: &Bound<'py, PyAny>,
    d_v: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions::default())?;
    let operands = [
        ("x", x),
        ("w_q", w_q),
        ("w_k", w_k),
        ("w_v", w_v),
        ("d_q", d_q),
        ("d_k", d_k),
        ("d_v", d_v),
    ];
    let call = Call::new(&operands, &args)?;
    dispatch!(call.dtype, T => compute_qkv_backward_impl::<T>(py, &call))
}

fn compute_qkv_backward_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let [x, w_q, w_k, w_v, d_q, d_k, d_v] = call.inputs::<T, 7>()?;
    let (x, w_q, w_k, w_v) = (x.view()?, w_q.view()?, w_k.view()?, w_v.view()?);
    let (d_q, d_k, d_v) = (d_q.view()?, d_k.view()?, d_v.view()?);
    let work = x
        .nrows()
        .saturating_mul(x.ncols())
        .saturating_mul(4 * (2 * w_q.ncols() + w_v.ncols()));
    let g = threads::run(py, work, |_| {
        core_compute_qkv_backward(x, w_q, w_k, w_v, d_q, d_k, d_v)
    })?
    .map_err(core_error)?;
    tuple(
        py,
        [
            to_numpy(py, &g.dx, Operand::Input)?.into_any(),
            to_numpy(py, &g.dw_q, Operand::QueryWeight)?.into_any(),
            to_numpy(py, &g.dw_k, Operand::KeyWeight)?.into_any(),
            to_numpy(py, &g.dw_v, Operand::ValueWeight)?.into_any(),
        ],
    )
}

// ------------------------------------------------------------------------- single head

/// ``softmax(q @ k.T / sqrt(d_k)) @ v``, the softmax over each row, computed stably
/// (scores of any size give a finite result).
///
/// Shapes: q (n_q, d_k), k (n_kv, d_k), v (n_kv, d_v); returns (n_q, d_v).
///
/// Raises AttentionError for mismatched shapes, NaN or infinity, d_k = 0 (pass a scale
/// to scaled_dot_product_attention), or a score beyond the dtype's range; TypeError for
/// unsupported or mixed dtypes.
#[pyfunction]
#[pyo3(signature = (q, k, v))]
fn self_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions::default())?;
    let call = Call::new(&[("q", q), ("k", k), ("v", v)], &args)?;
    dispatch!(call.dtype, T => sdpa_impl::<T>(py, &call, &args, false))
}

/// Scaled dot-product attention with options (PyTorch's / FlashAttention's meanings):
/// ``softmax(s) @ v`` where, for query i and key j, ``s = scale * q_i . k_j``, then the
/// softcap ``s = c * tanh(s / c)``, then ALiBi ``s -= m * |diag(i) - j|``, then
/// ``s += bias[i, j]``; disallowed pairs (mask False, key_mask False, causal, window)
/// get weight 0. A row with no allowed key is 0 (its lse is -inf), never NaN.
///
/// Shapes: q (n_q, d_k), k (n_kv, d_k), v (n_kv, d_v); returns out (n_q, d_v), or
/// (out, lse) with lse of shape (n_q,) if return_lse.
///
/// Options:
///   scale: float, default 1/sqrt(d_k) (required when d_k = 0).
///   mask: bool array (n_q, n_kv), True = may attend.
///   key_mask: bool array (n_kv,), False = padding no query attends to.
///   bias: float array (n_q, n_kv) of the call's dtype, added to the scores (-inf masks).
///   causal: None, "top_left" (j <= i, PyTorch's is_causal) or "bottom_right"
///     (j <= i + n_kv - n_q, FlashAttention's causal).
///   window: (left, right), each an int >= 0 or None (unbounded): keys
///     diag(i) - left <= j <= diag(i) + right, with diag(i) = i for causal="top_left",
///     else i + n_kv - n_q.
///   softcap: float > 0.
///   alibi_slope: float m.
///   dropout_p, dropout_seed: attention dropout (p in [0, 1)), the mask drawn from
///     Philox keyed by the seed, so that the backward can regenerate it.
///   return_lse: also return the log-sum-exp of each row's final scores.
///
/// Raises AttentionError for mismatched shapes (of masks and bias too), NaN or infinity,
/// invalid options (softcap <= 0, bad causal string, negative window side, ...), or a
/// score beyond the dtype's range; TypeError for unsupported or mixed dtypes, a mask
/// that is not bool, or a window that is not a pair.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, scale=None, mask=None, key_mask=None, bias=None, causal=None,
    window=None, softcap=None, alibi_slope=None, dropout_p=0.0, dropout_seed=0, return_lse=false))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn scaled_dot_product_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    scale: Option<f64>,
    mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    causal: Option<&str>,
    window: Option<&Bound<'py, PyAny>>,
    softcap: Option<f64>,
    alibi_slope: Option<f64>,
    dropout_p: f64,
    dropout_seed: u64,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions {
        dropout_p,
        dropout_seed,
        ..raw_options!(
            scale,
            mask,
            key_mask,
            bias,
            causal,
            window,
            softcap,
            alibi_slope
        )
    })?;
    let call = Call::new(&[("q", q), ("k", k), ("v", v)], &args)?;
    dispatch!(call.dtype, T => sdpa_impl::<T>(py, &call, &args, return_lse))
}

fn sdpa_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
    args: &OptionArgs<'py>,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let [q, k, v] = call.inputs::<T, 3>()?;
    let (q, k, v) = (q.view()?, k.view()?, v.view()?);
    let typed = args.typed::<T>(&call.biases)?;
    let views = typed.views()?;
    let work = attention_work(q.nrows(), k.nrows(), q.ncols() + v.ncols());
    if return_lse {
        let (out, lse) = threads::run(py, work, |p| {
            scaled_dot_product_attention_with_lse(q, k, v, &views.options(p))
        })?
        .map_err(core_error)?;
        return tuple(
            py,
            [
                to_numpy(py, &out, Operand::Output)?.into_any(),
                vector_to_numpy(py, lse.as_slice()).into_any(),
            ],
        );
    }
    let out = new_output::<T>(py, (q.nrows(), v.ncols()), Operand::Output)?;
    {
        let mut borrow = writable(&out)?;
        let view = output_view(&mut borrow)?;
        threads::run(py, work, |p| {
            scaled_dot_product_attention_into(q, k, v, &views.options(p), view)
        })?
        .map_err(core_error)?;
    }
    Ok(out.into_any())
}

/// The attention weights ``softmax(s)``, one row per query: an (n_q, n_kv) array. Each
/// row sums to 1, or is all 0 for a query with no allowed key. The options are those of
/// scaled_dot_product_attention (without dropout). This is the one function that builds
/// the n_q x n_kv matrix.
///
/// Raises what scaled_dot_product_attention raises.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, scale=None, mask=None, key_mask=None, bias=None, causal=None,
    window=None, softcap=None, alibi_slope=None))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn attention_weights<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    scale: Option<f64>,
    mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    causal: Option<&str>,
    window: Option<&Bound<'py, PyAny>>,
    softcap: Option<f64>,
    alibi_slope: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(raw_options!(
        scale,
        mask,
        key_mask,
        bias,
        causal,
        window,
        softcap,
        alibi_slope
    ))?;
    let call = Call::new(&[("q", q), ("k", k), ("v", v)], &args)?;
    dispatch!(call.dtype, T => weights_impl::<T>(py, &call, &args))
}

fn weights_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
    args: &OptionArgs<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    let [q, k, v] = call.inputs::<T, 3>()?;
    let (q, k, v) = (q.view()?, k.view()?, v.view()?);
    let typed = args.typed::<T>(&call.biases)?;
    let views = typed.views()?;
    let work = attention_work(q.nrows(), k.nrows(), q.ncols() + 1);
    let w = threads::run(py, work, |p| {
        core_attention_weights(q, k, v, &views.options(p))
    })?
    .map_err(core_error)?;
    Ok(to_numpy(py, &w, Operand::Weights)?.into_any())
}

/// The gradients of scaled_dot_product_attention with respect to q, k and v, given its
/// ``out`` and ``lse`` (from ``return_lse=True``, for the same inputs and options) and
/// ``d_out`` = dL/dout. Returns (dq, dk, dv), or (dq, dk, dv, d_bias) with
/// return_d_bias (which needs a bias; d_bias is (n_q, n_kv)).
///
/// Shapes: q (n_q, d_k), k (n_kv, d_k), v (n_kv, d_v), out and d_out (n_q, d_v), lse
/// (n_q,). The options (dropout included) must be the forward's. Masked pairs get
/// gradient 0; scale and ALiBi slope get none.
///
/// Raises AttentionError for what the forward rejects, for out / lse / d_out of the wrong
/// shape or not finite (lse may be -inf on rows with no allowed key), and for an lse that
/// cannot come from these inputs; TypeError as the forward.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, d_out, *, scale=None, mask=None, key_mask=None,
    bias=None, causal=None, window=None, softcap=None, alibi_slope=None, dropout_p=0.0,
    dropout_seed=0, return_d_bias=false))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn scaled_dot_product_attention_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    d_out: &Bound<'py, PyAny>,
    scale: Option<f64>,
    mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    causal: Option<&str>,
    window: Option<&Bound<'py, PyAny>>,
    softcap: Option<f64>,
    alibi_slope: Option<f64>,
    dropout_p: f64,
    dropout_seed: u64,
    return_d_bias: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions {
        dropout_p,
        dropout_seed,
        ..raw_options!(
            scale,
            mask,
            key_mask,
            bias,
            causal,
            window,
            softcap,
            alibi_slope
        )
    })?;
    let operands = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("d_out", d_out),
        ("lse", lse),
    ];
    let call = Call::new(&operands, &args)?;
    dispatch!(call.dtype, T => sdpa_backward_impl::<T>(py, call, &args, return_d_bias))
}

fn sdpa_backward_impl<'py, T: Float>(
    py: Python<'py>,
    mut call: Call<'py>,
    args: &OptionArgs<'py>,
    return_d_bias: bool,
) -> PyResult<Bound<'py, PyAny>> {
    // The last operand is the 1-D lse; the others are matrices.
    let (Some(lse), Some(_)) = (call.data.pop(), call.names.pop()) else {
        return Err(internal("missing lse"));
    };
    let lse = vector::<T>("lse", &lse)?;
    let [q, k, v, out, d_out] = call.inputs::<T, 5>()?;
    let (q, k, v, out, d_out) = (q.view()?, k.view()?, v.view()?, out.view()?, d_out.view()?);
    let typed = args.typed::<T>(&call.biases)?;
    let views = typed.views()?;
    let work = attention_work(q.nrows(), k.nrows(), 2 * (q.ncols() + v.ncols()));
    let dq = new_output::<T>(
        py,
        q.shape(),
        Operand::Gradient(attention_core::GradientOf::Query),
    )?;
    let dk = new_output::<T>(
        py,
        k.shape(),
        Operand::Gradient(attention_core::GradientOf::Key),
    )?;
    let dv = new_output::<T>(
        py,
        v.shape(),
        Operand::Gradient(attention_core::GradientOf::Value),
    )?;
    let d_bias = if return_d_bias {
        let shape = (q.nrows(), k.nrows());
        Some(new_output::<T>(
            py,
            shape,
            Operand::Gradient(attention_core::GradientOf::Bias),
        )?)
    } else {
        None
    };
    {
        let (mut bq, mut bk, mut bv) = (writable(&dq)?, writable(&dk)?, writable(&dv)?);
        let mut bb = d_bias.as_ref().map(writable).transpose()?;
        let grads = (
            output_view(&mut bq)?,
            output_view(&mut bk)?,
            output_view(&mut bv)?,
        );
        let d_bias_view = bb.as_mut().map(output_view).transpose()?;
        let lse = lse.as_slice();
        threads::run(py, work, |p| {
            scaled_dot_product_attention_backward_into(
                q,
                k,
                v,
                out,
                lse,
                d_out,
                &views.options(p),
                grads,
                d_bias_view,
            )
        })?
        .map_err(core_error)?;
    }
    let mut results = vec![dq.into_any(), dk.into_any(), dv.into_any()];
    results.extend(d_bias.map(Bound::into_any));
    Ok(PyTuple::new(py, results)?.into_any())
}

/// Combines partial results ``(out_b, lse_b)``, each the attention of the same queries
/// over a disjoint block of the keys (from scaled_dot_product_attention with
/// return_lse=True), into the attention over all the keys:
/// ``M = max_b lse_b; w_b = exp(lse_b - M); out = sum_b w_b out_b / sum_b w_b;
/// lse = M + log(sum_b w_b)``, row by row. A row whose every lse is -inf is 0 with lse
/// -inf.
///
/// Shapes: every out_b (n_q, d_v), every lse_b (n_q,); returns (n_q, d_v) and (n_q,).
///
/// Raises AttentionError for an empty sequence, shapes that differ from the first part's,
/// NaN or infinity in an out_b, NaN or +inf in an lse_b; TypeError for unsupported or
/// mixed dtypes.
#[pyfunction]
#[pyo3(signature = (partials))]
fn merge_partial_attention<'py>(
    py: Python<'py>,
    partials: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = OptionArgs::parse(RawOptions::default())?;
    let names: Vec<(String, String)> = (0..partials.len())
        .map(|b| (format!("partials[{b}][0]"), format!("partials[{b}][1]")))
        .collect();
    let mut operands = Vec::with_capacity(2 * partials.len());
    for ((out_name, lse_name), (out, lse)) in names.iter().zip(&partials) {
        operands.push((out_name.as_str(), out));
        operands.push((lse_name.as_str(), lse));
    }
    let call = Call::new(&operands, &args)?;
    dispatch!(call.dtype, T => merge_impl::<T>(py, &call))
}

fn merge_impl<'py, T: Float>(py: Python<'py>, call: &Call<'py>) -> PyResult<Bound<'py, PyAny>> {
    let mut outs = Vec::with_capacity(call.data.len() / 2);
    let mut lses = Vec::with_capacity(call.data.len() / 2);
    for (names, arrays) in call.names.chunks(2).zip(call.data.chunks(2)) {
        let ([out_name, lse_name], [out, lse]) = (names, arrays) else {
            return Err(internal("partials not in pairs"));
        };
        outs.push(Input::<T>::new(out_name, out)?);
        lses.push(vector::<T>(lse_name, lse)?);
    }
    let views = outs.iter().map(Input::view).collect::<PyResult<Vec<_>>>()?;
    let work = views.iter().map(|m| m.len()).sum();
    let (out, lse) = threads::run(py, work, |_| {
        core_merge_partial_attention(views.iter().copied().zip(lses.iter().map(Vec::as_slice)))
    })?
    .map_err(core_error)?;
    tuple(
        py,
        [
            to_numpy(py, &out, Operand::Output)?.into_any(),
            vector_to_numpy(py, lse.as_slice()).into_any(),
        ],
    )
}

// ------------------------------------------------------------------------- multi-head

/// The standard ALiBi slopes of ``heads`` query heads (Press et al. 2022, as in
/// FlashAttention and BLOOM): ``2**(-8 h / heads)`` for h = 1..heads when heads is a power
/// of two, interleaved otherwise. A float64 array of ``heads`` entries (rounded to float32
/// they equal the core's float32 slopes).
#[pyfunction]
#[pyo3(signature = (heads))]
fn alibi_slopes(py: Python<'_>, heads: usize) -> PyResult<Bound<'_, PyArray1<f64>>> {
    // The core returns a plain Vec (no error for sizes that cannot be allocated): check
    // that `heads` slopes can be allocated first, so that a huge count raises instead of
    // panicking.
    if Vec::<f64>::new().try_reserve_exact(heads).is_err() {
        return Err(core_error(CoreError::TooLarge {
            operand: Operand::AlibiSlopes,
            rows: heads,
            columns: 1,
        }));
    }
    Ok(PyArray1::from_vec(py, core_alibi_slopes::<f64>(heads)))
}

/// The layout arguments of the multi-head functions.
struct LayoutArgs {
    heads_q: usize,
    heads_kv: usize,
    seqlens: Option<(Vec<usize>, Vec<usize>)>,
}

impl LayoutArgs {
    /// `heads_kv` defaults to `heads_q`; `seqlens_kv` to `seqlens_q`.
    fn new(
        heads_q: usize,
        heads_kv: Option<usize>,
        seqlens_q: Option<Vec<usize>>,
        seqlens_kv: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let seqlens = match (seqlens_q, seqlens_kv) {
            (None, None) => None,
            (Some(q), None) => Some((q.clone(), q)),
            (Some(q), Some(kv)) => Some((q, kv)),
            (None, Some(_)) => {
                return Err(AttentionError::new_err(
                    "seqlens_kv needs seqlens_q (the query rows of each sequence)",
                ));
            }
        };
        Ok(LayoutArgs {
            heads_q,
            heads_kv: heads_kv.unwrap_or(heads_q),
            seqlens,
        })
    }

    fn layout(&self) -> HeadLayout<'_> {
        let layout = HeadLayout::new(self.heads_q, self.heads_kv);
        match &self.seqlens {
            Some((q, kv)) => layout.with_seqlens(q, kv),
            None => layout,
        }
    }
}

/// Attention of every query head of every sequence of a packed batch, in one call. Head
/// h of q occupies columns ``h*d_k:(h+1)*d_k`` (PyTorch's ``x.view(n, heads, d)``), and
/// likewise for k, v and the output; with ``heads_q = g * heads_kv`` query head h reads
/// key/value head ``h // g`` (grouped-query / multi-query attention), without copies.
///
/// Sequences (FlashAttention's varlen layout): with seqlens_q / seqlens_kv, q's rows
/// stack the queries of each sequence and k's / v's rows the keys; each sequence attends
/// to its own keys only, and causal, window and ALiBi count rows from its start.
/// seqlens_kv defaults to seqlens_q.
///
/// Shapes: q (sum n_q, heads_q*d_k), k (sum n_kv, heads_kv*d_k), v (sum n_kv,
/// heads_kv*d_v); returns (sum n_q, heads_q*d_v), or (out, lse) with lse
/// (sum n_q, heads_q) if return_lse.
///
/// Options: those of scaled_dot_product_attention, applied within each (sequence, head);
/// heads_kv defaults to heads_q; key_mask covers the packed keys (sum n_kv,);
/// mask / bias for a single sequence, or masks / biases with one (n_q(s), n_kv(s)) array
/// per sequence, shared by the heads; alibi_slopes: one slope per query head (see
/// alibi_slopes()), instead of one alibi_slope for all.
///
/// Raises AttentionError for head counts that do not divide, columns that do not split
/// into heads, lengths that do not sum to the rows, options given twice, and what
/// scaled_dot_product_attention raises; TypeError likewise.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, heads_q, heads_kv=None, seqlens_q=None, seqlens_kv=None,
    scale=None, mask=None, key_mask=None, bias=None, masks=None, biases=None, causal=None,
    window=None, softcap=None, alibi_slope=None, alibi_slopes=None, dropout_p=0.0,
    dropout_seed=0, return_lse=false))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn multi_head_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    heads_q: usize,
    heads_kv: Option<usize>,
    seqlens_q: Option<Vec<usize>>,
    seqlens_kv: Option<Vec<usize>>,
    scale: Option<f64>,
    mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    masks: Option<Vec<Bound<'py, PyAny>>>,
    biases: Option<Vec<Bound<'py, PyAny>>>,
    causal: Option<&str>,
    window: Option<&Bound<'py, PyAny>>,
    softcap: Option<f64>,
    alibi_slope: Option<f64>,
    alibi_slopes: Option<Vec<f64>>,
    dropout_p: f64,
    dropout_seed: u64,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let layout = LayoutArgs::new(heads_q, heads_kv, seqlens_q, seqlens_kv)?;
    let args = OptionArgs::parse(RawOptions {
        alibi_slopes,
        masks,
        biases,
        dropout_p,
        dropout_seed,
        ..raw_options!(
            scale,
            mask,
            key_mask,
            bias,
            causal,
            window,
            softcap,
            alibi_slope
        )
    })?;
    let call = Call::new(&[("q", q), ("k", k), ("v", v)], &args)?;
    dispatch!(call.dtype, T => mha_impl::<T>(py, &call, &args, &layout, return_lse))
}

fn mha_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
    args: &OptionArgs<'py>,
    layout: &LayoutArgs,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let [q, k, v] = call.inputs::<T, 3>()?;
    let (q, k, v) = (q.view()?, k.view()?, v.view()?);
    let typed = args.typed::<T>(&call.biases)?;
    let views = typed.views()?;
    let layout = layout.layout();
    let work = attention_work(q.nrows(), k.nrows(), q.ncols() + v.ncols());
    if return_lse {
        let (out, lse) = threads::run(py, work, |p| {
            multi_head_attention_with_lse(q, k, v, &layout, &views.options(p))
        })?
        .map_err(core_error)?;
        return tuple(
            py,
            [
                to_numpy(py, &out, Operand::Output)?.into_any(),
                to_numpy(py, &lse, Operand::Lse)?.into_any(),
            ],
        );
    }
    // The output's width is h_q·d_v; when V's columns do not split into heads_kv heads
    // the core reports it (HeadSplit) before looking at the output, whose width then
    // does not matter.
    let d_v = v.ncols().checked_div(layout.heads_kv()).unwrap_or(0);
    let width = d_v.saturating_mul(layout.heads_q());
    let out = new_output::<T>(py, (q.nrows(), width), Operand::Output)?;
    {
        let mut borrow = writable(&out)?;
        let view = output_view(&mut borrow)?;
        threads::run(py, work, |p| {
            multi_head_attention_into(q, k, v, &layout, &views.options(p), view)
        })?
        .map_err(core_error)?;
    }
    Ok(out.into_any())
}

/// The gradients of multi_head_attention with respect to the packed q, k and v, given its
/// ``out`` and ``lse`` (from ``return_lse=True``; lse is (sum n_q, heads_q)) and
/// ``d_out`` = dL/dout, for the same inputs, layout and options. With grouped-query
/// heads, a key/value head's gradient sums over the query heads that read it. Returns
/// (dq, dk, dv) in the shapes of q, k, v.
///
/// Raises what multi_head_attention and scaled_dot_product_attention_backward raise.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, d_out, *, heads_q, heads_kv=None, seqlens_q=None,
    seqlens_kv=None, scale=None, mask=None, key_mask=None, bias=None, masks=None,
    biases=None, causal=None, window=None, softcap=None, alibi_slope=None,
    alibi_slopes=None, dropout_p=0.0, dropout_seed=0))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn multi_head_attention_backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    d_out: &Bound<'py, PyAny>,
    heads_q: usize,
    heads_kv: Option<usize>,
    seqlens_q: Option<Vec<usize>>,
    seqlens_kv: Option<Vec<usize>>,
    scale: Option<f64>,
    mask: Option<&Bound<'py, PyAny>>,
    key_mask: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    masks: Option<Vec<Bound<'py, PyAny>>>,
    biases: Option<Vec<Bound<'py, PyAny>>>,
    causal: Option<&str>,
    window: Option<&Bound<'py, PyAny>>,
    softcap: Option<f64>,
    alibi_slope: Option<f64>,
    alibi_slopes: Option<Vec<f64>>,
    dropout_p: f64,
    dropout_seed: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let layout = LayoutArgs::new(heads_q, heads_kv, seqlens_q, seqlens_kv)?;
    let args = OptionArgs::parse(RawOptions {
        alibi_slopes,
        masks,
        biases,
        dropout_p,
        dropout_seed,
        ..raw_options!(
            scale,
            mask,
            key_mask,
            bias,
            causal,
            window,
            softcap,
            alibi_slope
        )
    })?;
    let operands = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("lse", lse),
        ("d_out", d_out),
    ];
    let call = Call::new(&operands, &args)?;
    dispatch!(call.dtype, T => mha_backward_impl::<T>(py, &call, &args, &layout))
}

fn mha_backward_impl<'py, T: Float>(
    py: Python<'py>,
    call: &Call<'py>,
    args: &OptionArgs<'py>,
    layout: &LayoutArgs,
) -> PyResult<Bound<'py, PyAny>> {
    let [q, k, v, out, lse, d_out] = call.inputs::<T, 6>()?;
    let (q, k, v, out, d_out) = (q.view()?, k.view()?, v.view()?, out.view()?, d_out.view()?);
    // The core takes the lse as an owned matrix: one copy of Σn_q × h_q numbers.
    let lse: DMatrix<T> = lse.view()?.into_owned();
    let typed = args.typed::<T>(&call.biases)?;
    let views = typed.views()?;
    let layout = layout.layout();
    let work = attention_work(q.nrows(), k.nrows(), 2 * (q.ncols() + v.ncols()));
    let g = threads::run(py, work, |p| {
        core_multi_head_attention_backward(q, k, v, out, &lse, d_out, &layout, &views.options(p))
    })?
    .map_err(core_error)?;
    tuple(
        py,
        [
            to_numpy(py, &g.dq, Operand::Query)?.into_any(),
            to_numpy(py, &g.dk, Operand::Key)?.into_any(),
            to_numpy(py, &g.dv, Operand::Value)?.into_any(),
        ],
    )
}

// ------------------------------------------------------------------------- threads

/// Runs the following calls on a pool of ``n >= 1`` threads (default: one per CPU, or
/// RAYON_NUM_THREADS). Results are bitwise identical for any number of threads: each
/// output row is computed by one thread in a fixed order. Small calls (below about 2**20
/// multiply-adds) run on the calling thread, where the core would not use threads anyway.
#[pyfunction]
#[pyo3(signature = (n))]
fn set_num_threads(n: usize) -> PyResult<()> {
    threads::set_num_threads(n)
}

/// The number of threads calls run on (see set_num_threads).
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    threads::get_num_threads()
}

/// For benchmarks: seconds per call of the core's scaled_dot_product_attention (default
/// options, writing into one preallocated C-ordered output) on the already converted
/// inputs, timed in Rust inside the thread pool, ``reps`` times.
#[pyfunction]
#[pyo3(signature = (q, k, v, reps))]
fn _time_sdpa<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    reps: usize,
) -> PyResult<Vec<f64>> {
    let args = OptionArgs::parse(RawOptions::default())?;
    let call = Call::new(&[("q", q), ("k", k), ("v", v)], &args)?;
    dispatch!(call.dtype, T => time_sdpa_impl::<T>(py, &call, reps))
}

fn time_sdpa_impl<T: Float>(py: Python<'_>, call: &Call<'_>, reps: usize) -> PyResult<Vec<f64>> {
    let [q, k, v] = call.inputs::<T, 3>()?;
    let (q, k, v): (MatRef<'_, T>, MatRef<'_, T>, MatRef<'_, T>) =
        (q.view()?, k.view()?, v.view()?);
    let out = new_output::<T>(py, (q.nrows(), v.ncols()), Operand::Output)?;
    let mut borrow = writable(&out)?;
    let mut view = output_view(&mut borrow)?;
    let options = attention_core::AttentionOptions::new().with_parallelism(Parallelism::Rayon);
    threads::run_in_pool(py, || {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            scaled_dot_product_attention_into(q, k, v, &options, &mut view)?;
            times.push(start.elapsed().as_secs_f64());
        }
        Ok(times)
    })?
    .map_err(core_error)
}

/// Exact, fast scaled dot-product attention on numpy arrays (float32 and float64), with
/// the Rust crate attention-core computing.
///
/// ``self_attention(*compute_qkv(X, W_q, W_k, W_v))`` is the numpy exercise
/// ``softmax(Q @ K.T / sqrt(d_k)) @ V`` with ``Q = X @ W_q`` etc., computed stably: scores
/// of any size give a finite result (numpy's ``np.exp`` overflows past ~88 in float32,
/// ~709 in float64). Rows are tokens and columns are features.
///
/// Inputs: float32 or float64 arrays (one dtype per call: mixing them is a TypeError);
/// integer and bool arrays and (nested) lists are converted to float64 as numpy would.
/// Other dtypes are a TypeError. Masks must be bool arrays (True = may attend); additive
/// float masks go in ``bias``.
///
/// Copies: C-ordered, Fortran-ordered and positively strided 2-D arrays (slices such as
/// ``a[:, ::2]`` or ``big[1:5, 2:7]``) are read in place, without a copy. An array is
/// copied (to a C-ordered array) first when it has a zero stride (``np.broadcast_to``), a
/// negative stride (``a[::-1]``), a stride that is not a multiple of its item size, or
/// misaligned data; also when it is converted (lists, integer or bool arrays, non-native
/// byte order). The arrays must not be modified by another thread during a call: the GIL
/// is released while the core computes.
///
/// Results are new C-ordered arrays of the inputs' dtype.
///
/// Errors: AttentionError (a ValueError) with the core's message for every bad input
/// (shapes, NaN or infinity, options, scores beyond the dtype's range), and for arrays
/// that are not 2-D; TypeError for dtypes.
///
/// Threads: see set_num_threads; results are bitwise identical for any thread count.
///
/// Classes: KvCache (a paged key/value cache for decoding, with cached_attention) and
/// MultiHeadAttention (a layer with weights, forward, forward_cross, forward_cached and
/// backward).
#[pymodule]
fn attention(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AttentionError", m.py().get_type::<AttentionError>())?;
    m.add_function(wrap_pyfunction!(compute_qkv, m)?)?;
    m.add_function(wrap_pyfunction!(compute_qkv_backward, m)?)?;
    m.add_function(wrap_pyfunction!(self_attention, m)?)?;
    m.add_function(wrap_pyfunction!(scaled_dot_product_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention_weights, m)?)?;
    m.add_function(wrap_pyfunction!(scaled_dot_product_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(merge_partial_attention, m)?)?;
    m.add_function(wrap_pyfunction!(alibi_slopes, m)?)?;
    m.add_function(wrap_pyfunction!(multi_head_attention, m)?)?;
    m.add_function(wrap_pyfunction!(multi_head_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_time_sdpa, m)?)?;
    m.add_class::<cache::PyKvCache>()?;
    m.add_class::<layer::PyMultiHeadAttention>()?;
    Ok(())
}
