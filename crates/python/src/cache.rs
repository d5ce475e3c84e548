//! The Python class `KvCache`: the core's paged KV cache ([`KvCache`]) for decoding, and
//! attention of new queries through it ([`cached_attention_with_lse`]).

use std::collections::BTreeMap;

use attention_core::{
    HeadLayout, KvCache, Operand, SeqId, cached_attention, cached_attention_with_lse,
};
use numpy::{PyArrayDescr, PyArrayDescrMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::convert::{Dtype, Float, dispatch, to_numpy};
use crate::options::{OptionArgs, RawOptions};
use crate::{AttentionError, Call, attention_work, core_error, threads, tuple};

/// The cache of one dtype.
pub(crate) enum Typed {
    F32(KvCache<f32>),
    F64(KvCache<f64>),
}

/// The element types a cache can hold: the typed cache inside [`Typed`].
pub(crate) trait CacheElement: Float {
    fn cache(typed: &Typed) -> Option<&KvCache<Self>>;
    fn cache_mut(typed: &mut Typed) -> Option<&mut KvCache<Self>>;
}

impl CacheElement for f32 {
    fn cache(typed: &Typed) -> Option<&KvCache<f32>> {
        match typed {
            Typed::F32(c) => Some(c),
            Typed::F64(_) => None,
        }
    }
    fn cache_mut(typed: &mut Typed) -> Option<&mut KvCache<f32>> {
        match typed {
            Typed::F32(c) => Some(c),
            Typed::F64(_) => None,
        }
    }
}

impl CacheElement for f64 {
    fn cache(typed: &Typed) -> Option<&KvCache<f64>> {
        match typed {
            Typed::F64(c) => Some(c),
            Typed::F32(_) => None,
        }
    }
    fn cache_mut(typed: &mut Typed) -> Option<&mut KvCache<f64>> {
        match typed {
            Typed::F64(c) => Some(c),
            Typed::F32(_) => None,
        }
    }
}

/// A paged key/value cache for decoding: many sequences, each a history of keys and values
/// (``heads_kv`` heads of widths ``d_k`` and ``d_v``) stored in pages of a shared pool.
///
/// ``append(seq, k, v)`` adds rows (all-or-nothing: on any error the cache is unchanged);
/// ``cached_attention(q, seq, heads_q=...)`` attends new queries to the whole history
/// (bottom-right causal: the last query is the newest token), reading the pages in place.
/// With ``window=w`` the cache keeps only what windowed attention with window (w - 1, 0)
/// needs. The cache holds one dtype (``dtype``, float32 or float64); arrays given to it
/// must have that dtype (integer and bool arrays convert to float64).
#[pyclass(name = "KvCache", module = "attention")]
pub struct PyKvCache {
    typed: Typed,
    /// The live sequences by number (the core's ids cannot be made from a number).
    ids: BTreeMap<u64, SeqId>,
}

/// The cache dtype a Python `dtype` argument names.
fn parse_dtype(dtype: &Bound<'_, PyAny>) -> PyResult<Dtype> {
    let descr = PyArrayDescr::new(dtype.py(), dtype)?;
    if descr.is_equiv_to(&numpy::dtype::<f32>(dtype.py())) {
        Ok(Dtype::F32)
    } else if descr.is_equiv_to(&numpy::dtype::<f64>(dtype.py())) {
        Ok(Dtype::F64)
    } else {
        Err(PyTypeError::new_err(format!(
            "a KvCache holds float32 or float64, not {}",
            descr.str()?
        )))
    }
}

impl PyKvCache {
    fn dtype(&self) -> Dtype {
        match self.typed {
            Typed::F32(_) => Dtype::F32,
            Typed::F64(_) => Dtype::F64,
        }
    }

    /// The core's id of sequence `seq`; the core's message for an unknown one.
    pub(crate) fn id(&self, seq: u64) -> PyResult<SeqId> {
        self.ids.get(&seq).copied().ok_or_else(|| {
            AttentionError::new_err(format!(
                "sequence {seq} is not in this KV cache (removed, or never added to it)"
            ))
        })
    }

    /// A `TypeError` unless the call's operands have the cache's dtype.
    pub(crate) fn check_dtype(&self, call: &Call<'_>) -> PyResult<()> {
        if call.dtype == self.dtype() {
            return Ok(());
        }
        Err(PyTypeError::new_err(format!(
            "the operands are {} but the cache holds {}",
            call.dtype.name(),
            self.dtype().name()
        )))
    }

    /// The typed cache (of the dtype checked by [`check_dtype`](Self::check_dtype)).
    pub(crate) fn typed_mut<T: CacheElement>(&mut self) -> PyResult<&mut KvCache<T>> {
        T::cache_mut(&mut self.typed).ok_or_else(|| crate::internal("cache dtype"))
    }

    fn append_impl<T: CacheElement>(
        &mut self,
        py: Python<'_>,
        seq: SeqId,
        call: &Call<'_>,
    ) -> PyResult<()> {
        let [k, v] = call.inputs::<T, 2>()?;
        let (k, v) = (k.view()?, v.view()?);
        let cache = self.typed_mut::<T>()?;
        threads::run(py, 0, |_| cache.append(seq, k, v))?.map_err(core_error)
    }

    fn attention_impl<'py, T: CacheElement>(
        &self,
        py: Python<'py>,
        seq: SeqId,
        call: &Call<'py>,
        args: &OptionArgs<'py>,
        heads_q: usize,
        return_lse: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let cache = T::cache(&self.typed).ok_or_else(|| crate::internal("cache dtype"))?;
        let [q] = call.inputs::<T, 1>()?;
        let q = q.view()?;
        let typed = args.typed::<T>(&call.biases)?;
        let views = typed.views()?;
        let layout = HeadLayout::new(heads_q, cache.heads_kv());
        let history = cache.len(seq).map_err(core_error)?;
        let work = attention_work(q.nrows(), history, q.ncols().saturating_mul(2));
        if return_lse {
            let (out, lse) = threads::run(py, work, |p| {
                cached_attention_with_lse(q, cache, seq, &layout, &views.options(p))
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
        let out = threads::run(py, work, |p| {
            cached_attention(q, cache, seq, &layout, &views.options(p))
        })?
        .map_err(core_error)?;
        Ok(to_numpy(py, &out, Operand::Output)?.into_any())
    }

    fn gather_impl<'py, T: CacheElement>(
        &self,
        py: Python<'py>,
        seq: SeqId,
    ) -> PyResult<Bound<'py, PyAny>> {
        let cache = T::cache(&self.typed).ok_or_else(|| crate::internal("cache dtype"))?;
        let (k, v) = cache.gather(seq).map_err(core_error)?;
        tuple(
            py,
            [
                to_numpy(py, &k, Operand::Key)?.into_any(),
                to_numpy(py, &v, Operand::Value)?.into_any(),
            ],
        )
    }
}

/// Runs `$body` with `$c` bound to the typed cache inside `$typed` (either dtype).
macro_rules! with_cache {
    ($typed:expr, $c:ident => $body:expr) => {
        match $typed {
            Typed::F32($c) => $body,
            Typed::F64($c) => $body,
        }
    };
}

#[pymethods]
impl PyKvCache {
    /// A cache for ``heads_kv`` key/value heads of widths ``d_k`` and ``d_v``, holding
    /// ``dtype`` (float32 or float64); ``page_size`` tokens per page (default 256);
    /// ``window``: sliding-window mode. Allocates nothing until ``append``.
    ///
    /// Raises AttentionError for heads_kv = 0, page_size = 0 or window = 0; TypeError
    /// for another dtype.
    #[new]
    #[pyo3(signature = (heads_kv, d_k, d_v, *, dtype=None, page_size=None, window=None))]
    fn new(
        heads_kv: usize,
        d_k: usize,
        d_v: usize,
        dtype: Option<&Bound<'_, PyAny>>,
        page_size: Option<usize>,
        window: Option<usize>,
    ) -> PyResult<Self> {
        let dtype = dtype.map(parse_dtype).transpose()?.unwrap_or(Dtype::F64);
        fn build<T: attention_core::Element>(
            (heads_kv, d_k, d_v): (usize, usize, usize),
            page_size: Option<usize>,
            window: Option<usize>,
        ) -> PyResult<KvCache<T>> {
            let mut cache = KvCache::new(heads_kv, d_k, d_v).map_err(core_error)?;
            if let Some(p) = page_size {
                cache = cache.with_page_size(p).map_err(core_error)?;
            }
            if let Some(w) = window {
                cache = cache.with_window(w).map_err(core_error)?;
            }
            Ok(cache)
        }
        let dims = (heads_kv, d_k, d_v);
        let typed = match dtype {
            Dtype::F32 => Typed::F32(build(dims, page_size, window)?),
            Dtype::F64 => Typed::F64(build(dims, page_size, window)?),
        };
        Ok(PyKvCache {
            typed,
            ids: BTreeMap::new(),
        })
    }

    /// The cache's dtype: ``"float32"`` or ``"float64"``.
    #[getter(dtype)]
    fn dtype_str(&self) -> &'static str {
        self.dtype().name()
    }

    /// Key/value heads.
    #[getter]
    fn heads_kv(&self) -> usize {
        with_cache!(&self.typed, c => c.heads_kv())
    }

    /// Width of a key head.
    #[getter]
    fn d_k(&self) -> usize {
        with_cache!(&self.typed, c => c.d_k())
    }

    /// Width of a value head.
    #[getter]
    fn d_v(&self) -> usize {
        with_cache!(&self.typed, c => c.d_v())
    }

    /// Tokens per page.
    #[getter]
    fn page_size(&self) -> usize {
        with_cache!(&self.typed, c => c.page_size())
    }

    /// The sliding window, if any.
    #[getter]
    fn window(&self) -> Option<usize> {
        with_cache!(&self.typed, c => c.window())
    }

    /// Starts an empty sequence; returns its number (never reused).
    fn add_sequence(&mut self) -> u64 {
        let id = with_cache!(&mut self.typed, c => c.add_sequence());
        self.ids.insert(id.get(), id);
        id.get()
    }

    /// The live sequences' numbers, in order.
    fn sequences(&self) -> Vec<u64> {
        self.ids.keys().copied().collect()
    }

    /// The number of tokens appended to ``seq`` (minus those truncated).
    fn seq_len(&self, seq: u64) -> PyResult<usize> {
        let id = self.id(seq)?;
        with_cache!(&self.typed, c => c.len(id)).map_err(core_error)
    }

    /// Appends ``k`` (n, heads_kv*d_k) and ``v`` (n, heads_kv*d_v) to ``seq``.
    /// All-or-nothing: on any error (shapes, NaN or infinity) the cache is unchanged.
    fn append(
        &mut self,
        py: Python<'_>,
        seq: u64,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let id = self.id(seq)?;
        let args = OptionArgs::parse(RawOptions::default())?;
        let call = Call::new(&[("k", k), ("v", v)], &args)?;
        self.check_dtype(&call)?;
        dispatch!(call.dtype, T => self.append_impl::<T>(py, id, &call))
    }

    /// Shortens ``seq`` to its first ``length`` tokens (pages go back to the pool).
    fn truncate(&mut self, seq: u64, length: usize) -> PyResult<()> {
        let id = self.id(seq)?;
        with_cache!(&mut self.typed, c => c.truncate(id, length)).map_err(core_error)
    }

    /// Removes ``seq``; its pages go back to the pool.
    fn remove(&mut self, seq: u64) -> PyResult<()> {
        let id = self.id(seq)?;
        with_cache!(&mut self.typed, c => c.remove(id)).map_err(core_error)?;
        self.ids.remove(&seq);
        Ok(())
    }

    /// A copy of ``seq``'s kept keys and values: ``(k, v)``, contiguous, row r being
    /// position ``kept start + r``.
    fn gather<'py>(&self, py: Python<'py>, seq: u64) -> PyResult<Bound<'py, PyAny>> {
        let id = self.id(seq)?;
        dispatch!(self.dtype(), T => self.gather_impl::<T>(py, id))
    }

    /// Attention of the new queries ``q`` (n_q, heads_q*d_k) of ``seq`` to its whole
    /// history, bottom-right causal (the last query is the newest token; append its keys
    /// first): ``multi_head_attention`` over the cached K and V with
    /// ``causal="bottom_right"``. Returns (n_q, heads_q*d_v), or (out, lse) with lse
    /// (n_q, heads_q) if return_lse.
    ///
    /// Options: scale, window (not on a sliding-window cache), softcap, alibi_slope or
    /// alibi_slopes (one per query head), as in multi_head_attention.
    ///
    /// Raises AttentionError for an unknown sequence, heads that do not fit the cache,
    /// evicted keys, and what multi_head_attention raises; TypeError for a dtype other
    /// than the cache's.
    #[pyo3(signature = (q, seq, *, heads_q, scale=None, window=None, softcap=None,
        alibi_slope=None, alibi_slopes=None, return_lse=false))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn cached_attention<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        seq: u64,
        heads_q: usize,
        scale: Option<f64>,
        window: Option<&Bound<'py, PyAny>>,
        softcap: Option<f64>,
        alibi_slope: Option<f64>,
        alibi_slopes: Option<Vec<f64>>,
        return_lse: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let id = self.id(seq)?;
        let args = OptionArgs::parse(RawOptions {
            scale,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            ..RawOptions::default()
        })?;
        let call = Call::new(&[("q", q)], &args)?;
        self.check_dtype(&call)?;
        dispatch!(call.dtype, T => self.attention_impl::<T>(py, id, &call, &args, heads_q, return_lse))
    }

    fn __repr__(&self) -> String {
        format!(
            "KvCache(heads_kv={}, d_k={}, d_v={}, dtype={}, page_size={}, window={:?}, sequences={})",
            self.heads_kv(),
            self.d_k(),
            self.d_v(),
            self.dtype().name(),
            self.page_size(),
            self.window(),
            self.ids.len()
        )
    }
}
