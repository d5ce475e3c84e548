//! The Python class `MultiHeadAttention`: the core's attention layer
//! ([`MultiHeadAttention`]) with its forward and backward passes.

use attention_core::{LayerGradients, MultiHeadAttention, Operand, Rope, RopeConvention, SeqId};
use nalgebra::{DMatrix, DVector};
use numpy::PyUntypedArray;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cache::{CacheElement, PyKvCache};
use crate::convert::{
    Dtype, Float, Input, dispatch, float_array, to_numpy, vector, vector_to_numpy,
};
use crate::options::{OptionArgs, RawOptions};
use crate::{AttentionError, Call, core_error, internal, threads};

/// The layer of one dtype.
enum Typed {
    F32(MultiHeadAttention<f32>),
    F64(MultiHeadAttention<f64>),
}

/// The element types a layer can hold: the typed layer inside [`Typed`].
trait LayerElement: CacheElement {
    fn layer(typed: &Typed) -> Option<&MultiHeadAttention<Self>>;
    fn wrap(layer: MultiHeadAttention<Self>) -> Typed;
}

impl LayerElement for f32 {
    fn layer(typed: &Typed) -> Option<&MultiHeadAttention<f32>> {
        match typed {
            Typed::F32(l) => Some(l),
            Typed::F64(_) => None,
        }
    }
    fn wrap(layer: MultiHeadAttention<f32>) -> Typed {
        Typed::F32(layer)
    }
}

impl LayerElement for f64 {
    fn layer(typed: &Typed) -> Option<&MultiHeadAttention<f64>> {
        match typed {
            Typed::F64(l) => Some(l),
            Typed::F32(_) => None,
        }
    }
    fn wrap(layer: MultiHeadAttention<f64>) -> Typed {
        Typed::F64(layer)
    }
}

/// A multi-head attention layer (weights multiply from the right, as in ``x @ w_q``;
/// PyTorch's ``nn.Linear`` stores the transpose):
///
/// ``y = concat_h(attention_h(x @ w_q + b_q, x @ w_k + b_k, x @ w_v + b_v)) @ w_o + b_o``
///
/// with ``heads_q`` query heads of width ``d_head = w_q.shape[1] / heads_q`` reading
/// ``heads_kv`` key/value heads (grouped-query attention), optional biases, and optional
/// rotary position embeddings on q and k (``rope_dim``, ``rope_base``,
/// ``rope_convention`` = "half" (GPT-NeoX / Llama) or "interleaved" (GPT-J)). The weights
/// are copied into the layer when it is built; its dtype is theirs.
#[pyclass(name = "MultiHeadAttention", module = "attention")]
pub struct PyMultiHeadAttention {
    typed: Typed,
}

impl PyMultiHeadAttention {
    fn dtype(&self) -> Dtype {
        match self.typed {
            Typed::F32(_) => Dtype::F32,
            Typed::F64(_) => Dtype::F64,
        }
    }

    fn layer<T: LayerElement>(&self) -> PyResult<&MultiHeadAttention<T>> {
        T::layer(&self.typed).ok_or_else(|| internal("layer dtype"))
    }

    /// A `TypeError` unless the call's operands have the layer's dtype.
    fn check_dtype(&self, call: &Call<'_>) -> PyResult<()> {
        if call.dtype == self.dtype() {
            return Ok(());
        }
        Err(PyTypeError::new_err(format!(
            "the operands are {} but the layer holds {}",
            call.dtype.name(),
            self.dtype().name()
        )))
    }

    fn forward_impl<'py, T: LayerElement>(
        &self,
        py: Python<'py>,
        call: &Call<'py>,
        args: &OptionArgs<'py>,
        seqlens: Option<&[usize]>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = self.layer::<T>()?;
        let [x] = call.inputs::<T, 1>()?;
        let x = x.view()?;
        let typed = args.typed::<T>(&call.biases)?;
        let views = typed.views()?;
        let work = layer_work(x.nrows(), x.ncols());
        let y = threads::run(py, work, |p| match seqlens {
            Some(s) => layer.forward_packed(x, s, &views.options(p)),
            None => layer.forward(x, &views.options(p)),
        })?
        .map_err(core_error)?;
        Ok(to_numpy(py, &y, Operand::Output)?.into_any())
    }

    fn cross_impl<'py, T: LayerElement>(
        &self,
        py: Python<'py>,
        call: &Call<'py>,
        args: &OptionArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = self.layer::<T>()?;
        let [x_q, x_kv] = call.inputs::<T, 2>()?;
        let (x_q, x_kv) = (x_q.view()?, x_kv.view()?);
        let typed = args.typed::<T>(&call.biases)?;
        let views = typed.views()?;
        let work = layer_work(x_q.nrows().max(x_kv.nrows()), x_q.ncols());
        let y = threads::run(py, work, |p| {
            layer.forward_cross(x_q, x_kv, &views.options(p))
        })?
        .map_err(core_error)?;
        Ok(to_numpy(py, &y, Operand::Output)?.into_any())
    }

    fn cached_impl<'py, T: LayerElement>(
        &self,
        py: Python<'py>,
        call: &Call<'py>,
        args: &OptionArgs<'py>,
        cache: &mut PyKvCache,
        seq: SeqId,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = self.layer::<T>()?;
        let [x] = call.inputs::<T, 1>()?;
        let x = x.view()?;
        let typed = args.typed::<T>(&call.biases)?;
        let views = typed.views()?;
        let cache = cache.typed_mut::<T>()?;
        let work = layer_work(x.nrows(), x.ncols());
        let y = threads::run(py, work, |p| {
            layer.forward_cached(x, cache, seq, &views.options(p))
        })?
        .map_err(core_error)?;
        Ok(to_numpy(py, &y, Operand::Output)?.into_any())
    }

    fn backward_impl<'py, T: LayerElement>(
        &self,
        py: Python<'py>,
        call: &Call<'py>,
        args: &OptionArgs<'py>,
        seqlens: Option<&[usize]>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = self.layer::<T>()?;
        let [x, d_y] = call.inputs::<T, 2>()?;
        let (x, d_y) = (x.view()?, d_y.view()?);
        let typed = args.typed::<T>(&call.biases)?;
        let views = typed.views()?;
        let work = layer_work(x.nrows(), x.ncols()).saturating_mul(3);
        let g = threads::run(py, work, |p| match seqlens {
            Some(s) => layer.backward_packed(x, s, d_y, &views.options(p)),
            None => layer.backward(x, d_y, &views.options(p)),
        })?
        .map_err(core_error)?;
        gradients_dict(py, &g)
    }
}

/// A rough count of a layer call's multiply-adds (whether it may use threads).
fn layer_work(n: usize, d_model: usize) -> usize {
    n.saturating_mul(n.max(d_model))
        .saturating_mul(d_model)
        .saturating_mul(4)
}

/// The gradients as a dict: `dx`, `dw_q`, `dw_k`, `dw_v`, `dw_o`, and `db_*` for the
/// layer's biases.
fn gradients_dict<'py, T: Float>(
    py: Python<'py>,
    g: &LayerGradients<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let d = PyDict::new(py);
    for (name, m) in [
        ("dx", &g.dx),
        ("dw_q", &g.dw_q),
        ("dw_k", &g.dw_k),
        ("dw_v", &g.dw_v),
        ("dw_o", &g.dw_o),
    ] {
        d.set_item(name, to_numpy(py, m, Operand::Output)?)?;
    }
    for (name, b) in [
        ("db_q", &g.db_q),
        ("db_k", &g.db_k),
        ("db_v", &g.db_v),
        ("db_o", &g.db_o),
    ] {
        if let Some(b) = b {
            d.set_item(name, vector_to_numpy(py, b.as_slice()))?;
        }
    }
    Ok(d.into_any())
}

/// The weights and biases of a new layer, converted to `T`.
fn build<T: LayerElement>(
    (heads_q, heads_kv): (usize, usize),
    weights: &[Bound<'_, PyUntypedArray>],
    biases: [Option<(Dtype, Bound<'_, PyUntypedArray>)>; 4],
    rope: Option<Rope>,
) -> PyResult<Typed> {
    let names = ["w_q", "w_k", "w_v", "w_o"];
    let mut owned: Vec<DMatrix<T>> = Vec::with_capacity(4);
    for (name, w) in names.iter().zip(weights) {
        owned.push(Input::<T>::new(name, w)?.view()?.into_owned());
    }
    let [w_q, w_k, w_v, w_o]: [DMatrix<T>; 4] =
        owned.try_into().map_err(|_| internal("four weights"))?;
    let mut layer =
        MultiHeadAttention::new(heads_q, heads_kv, w_q, w_k, w_v, w_o).map_err(core_error)?;
    let bias_names = ["b_q", "b_k", "b_v", "b_o"];
    let mut vectors: Vec<Option<DVector<T>>> = Vec::with_capacity(4);
    for (name, b) in bias_names.iter().zip(biases) {
        vectors.push(match b {
            Some((_, array)) => Some(DVector::from_vec(vector::<T>(name, &array)?)),
            None => None,
        });
    }
    let [b_q, b_k, b_v, b_o]: [Option<DVector<T>>; 4] =
        vectors.try_into().map_err(|_| internal("four biases"))?;
    if b_q.is_some() || b_k.is_some() || b_v.is_some() || b_o.is_some() {
        layer = layer.with_biases(b_q, b_k, b_v, b_o).map_err(core_error)?;
    }
    if let Some(rope) = rope {
        layer = layer.with_rope(rope).map_err(core_error)?;
    }
    Ok(T::wrap(layer))
}

/// The layer's options that `forward` and `backward` share, as keyword arguments.
macro_rules! layer_options {
    ($scale:expr, $mask:expr, $key_mask:expr, $bias:expr, $masks:expr, $biases:expr,
     $causal:expr, $window:expr, $softcap:expr, $alibi_slope:expr, $alibi_slopes:expr,
     $dropout_p:expr, $dropout_seed:expr) => {
        OptionArgs::parse(RawOptions {
            scale: $scale,
            mask: $mask,
            key_mask: $key_mask,
            bias: $bias,
            masks: $masks,
            biases: $biases,
            causal: $causal,
            window: $window,
            softcap: $softcap,
            alibi_slope: $alibi_slope,
            alibi_slopes: $alibi_slopes,
            dropout_p: $dropout_p,
            dropout_seed: $dropout_seed,
        })
    };
}

#[pymethods]
impl PyMultiHeadAttention {
    /// A layer with ``heads_q`` query heads over ``heads_kv`` key/value heads (default
    /// heads_q): w_q (d_model, heads_q*d_head), w_k (d_model, heads_kv*d_head), w_v
    /// (d_model, heads_kv*d_v), w_o (heads_q*d_v, d_model); optional biases b_q, b_k, b_v,
    /// b_o (1-D, one entry per column of their weight); optional RoPE on the first
    /// ``rope_dim`` dimensions of each head.
    ///
    /// Raises AttentionError for inconsistent shapes, NaN or infinity, bad head counts or
    /// RoPE settings; TypeError for unsupported or mixed dtypes.
    #[new]
    #[pyo3(signature = (heads_q, w_q, w_k, w_v, w_o, *, heads_kv=None, b_q=None, b_k=None,
        b_v=None, b_o=None, rope_dim=None, rope_base=10000.0, rope_convention="half"))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn new(
        heads_q: usize,
        w_q: &Bound<'_, PyAny>,
        w_k: &Bound<'_, PyAny>,
        w_v: &Bound<'_, PyAny>,
        w_o: &Bound<'_, PyAny>,
        heads_kv: Option<usize>,
        b_q: Option<&Bound<'_, PyAny>>,
        b_k: Option<&Bound<'_, PyAny>>,
        b_v: Option<&Bound<'_, PyAny>>,
        b_o: Option<&Bound<'_, PyAny>>,
        rope_dim: Option<usize>,
        rope_base: f64,
        rope_convention: &str,
    ) -> PyResult<Self> {
        let args = OptionArgs::parse(RawOptions::default())?;
        let call = Call::new(
            &[("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)],
            &args,
        )?;
        let mut biases = Vec::with_capacity(4);
        for (name, b) in [("b_q", b_q), ("b_k", b_k), ("b_v", b_v), ("b_o", b_o)] {
            let converted = b.map(|b| float_array(name, b)).transpose()?;
            if let Some((dtype, _)) = &converted
                && *dtype != call.dtype
            {
                return Err(PyTypeError::new_err(format!(
                    "{name} is {} but the weights are {}",
                    dtype.name(),
                    call.dtype.name()
                )));
            }
            biases.push(converted);
        }
        let biases: [Option<(Dtype, Bound<'_, PyUntypedArray>)>; 4] =
            biases.try_into().map_err(|_| internal("four biases"))?;
        let convention = match rope_convention {
            "half" => RopeConvention::Half,
            "interleaved" => RopeConvention::Interleaved,
            other => {
                return Err(AttentionError::new_err(format!(
                    "rope_convention must be 'half' or 'interleaved', not {other:?}"
                )));
            }
        };
        let rope = rope_dim.map(|r| {
            Rope::new(r)
                .with_base(rope_base)
                .with_convention(convention)
        });
        let heads = (heads_q, heads_kv.unwrap_or(heads_q));
        let typed = dispatch!(call.dtype, T => build::<T>(heads, &call.data, biases, rope)?);
        Ok(PyMultiHeadAttention { typed })
    }

    /// The layer's dtype: ``"float32"`` or ``"float64"``.
    #[getter(dtype)]
    fn dtype_str(&self) -> &'static str {
        self.dtype().name()
    }

    /// Query heads.
    #[getter]
    fn heads_q(&self) -> usize {
        match &self.typed {
            Typed::F32(l) => l.heads_q(),
            Typed::F64(l) => l.heads_q(),
        }
    }

    /// Key/value heads.
    #[getter]
    fn heads_kv(&self) -> usize {
        match &self.typed {
            Typed::F32(l) => l.heads_kv(),
            Typed::F64(l) => l.heads_kv(),
        }
    }

    /// The model width (rows of w_q).
    #[getter]
    fn d_model(&self) -> usize {
        match &self.typed {
            Typed::F32(l) => l.d_model(),
            Typed::F64(l) => l.d_model(),
        }
    }

    /// ``y = layer(x)`` for x (n, d_model): one sequence, or with ``seqlens`` a packed
    /// batch (RoPE positions and attention per sequence). Returns (n, d_model). Options
    /// as multi_head_attention's (the scale defaults to 1/sqrt(d_head)).
    #[pyo3(signature = (x, *, seqlens=None, scale=None, mask=None, key_mask=None, bias=None,
        masks=None, biases=None, causal=None, window=None, softcap=None, alibi_slope=None,
        alibi_slopes=None, dropout_p=0.0, dropout_seed=0))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        seqlens: Option<Vec<usize>>,
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
        let args = layer_options!(
            scale,
            mask,
            key_mask,
            bias,
            masks,
            biases,
            causal,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            dropout_p,
            dropout_seed
        )?;
        let call = Call::new(&[("x", x)], &args)?;
        self.check_dtype(&call)?;
        let seqlens = seqlens.as_deref();
        dispatch!(call.dtype, T => self.forward_impl::<T>(py, &call, &args, seqlens))
    }

    /// Cross-attention: queries from x_q (n_q, d_model), keys and values from x_kv
    /// (n_kv, d_model). Returns (n_q, d_model). Options: scale, key_mask (n_kv,), mask /
    /// bias (n_q, n_kv), causal, window, softcap, ALiBi.
    #[pyo3(signature = (x_q, x_kv, *, scale=None, mask=None, key_mask=None, bias=None,
        causal=None, window=None, softcap=None, alibi_slope=None, alibi_slopes=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn forward_cross<'py>(
        &self,
        py: Python<'py>,
        x_q: &Bound<'py, PyAny>,
        x_kv: &Bound<'py, PyAny>,
        scale: Option<f64>,
        mask: Option<&Bound<'py, PyAny>>,
        key_mask: Option<&Bound<'py, PyAny>>,
        bias: Option<&Bound<'py, PyAny>>,
        causal: Option<&str>,
        window: Option<&Bound<'py, PyAny>>,
        softcap: Option<f64>,
        alibi_slope: Option<f64>,
        alibi_slopes: Option<Vec<f64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = layer_options!(
            scale,
            mask,
            key_mask,
            bias,
            None,
            None,
            causal,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            0.0,
            0
        )?;
        let call = Call::new(&[("x_q", x_q), ("x_kv", x_kv)], &args)?;
        self.check_dtype(&call)?;
        dispatch!(call.dtype, T => self.cross_impl::<T>(py, &call, &args))
    }

    /// Decoding: projects the new tokens x_new (n, d_model) of sequence ``seq`` of
    /// ``cache`` (a KvCache of this layer's heads_kv, d_head, d_v and dtype), rotates q and
    /// k at their absolute positions, appends k and v to the cache and attends to the
    /// whole history. Returns (n, d_model). On any error the cache is unchanged.
    #[pyo3(signature = (x_new, cache, seq, *, scale=None, window=None, softcap=None,
        alibi_slope=None, alibi_slopes=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn forward_cached<'py>(
        &self,
        py: Python<'py>,
        x_new: &Bound<'py, PyAny>,
        cache: &Bound<'py, PyKvCache>,
        seq: u64,
        scale: Option<f64>,
        window: Option<&Bound<'py, PyAny>>,
        softcap: Option<f64>,
        alibi_slope: Option<f64>,
        alibi_slopes: Option<Vec<f64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = layer_options!(
            scale,
            None,
            None,
            None,
            None,
            None,
            None,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            0.0,
            0
        )?;
        let call = Call::new(&[("x_new", x_new)], &args)?;
        self.check_dtype(&call)?;
        let mut cache = cache.try_borrow_mut()?;
        let id = cache.id(seq)?;
        cache.check_dtype(&call)?;
        dispatch!(call.dtype, T => self.cached_impl::<T>(py, &call, &args, &mut cache, id))
    }

    /// The gradients of ``sum(forward(x, ...) * d_y)``: a dict with dx, dw_q, dw_k, dw_v,
    /// dw_o and, for each bias the layer has, db_q, db_k, db_v, db_o. Same options as
    /// forward (dropout included: the same seed regenerates the same mask).
    #[pyo3(signature = (x, d_y, *, seqlens=None, scale=None, mask=None, key_mask=None,
        bias=None, masks=None, biases=None, causal=None, window=None, softcap=None,
        alibi_slope=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=0))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn backward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        d_y: &Bound<'py, PyAny>,
        seqlens: Option<Vec<usize>>,
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
        let args = layer_options!(
            scale,
            mask,
            key_mask,
            bias,
            masks,
            biases,
            causal,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            dropout_p,
            dropout_seed
        )?;
        let call = Call::new(&[("x", x), ("d_y", d_y)], &args)?;
        self.check_dtype(&call)?;
        let seqlens = seqlens.as_deref();
        dispatch!(call.dtype, T => self.backward_impl::<T>(py, &call, &args, seqlens))
    }

    fn __repr__(&self) -> String {
        format!(
            "MultiHeadAttention(heads_q={}, heads_kv={}, d_model={}, dtype={})",
            self.heads_q(),
            self.heads_kv(),
            self.d_model(),
            self.dtype().name()
        )
    }
}
