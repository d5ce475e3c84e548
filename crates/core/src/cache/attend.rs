//! Attention of new queries through a [`KvCache`]: [`cached_attention`] and its `_with_lse`
//! form. The checks and the mapping of options live in [`CachedCall::new`]; the
//! computation in [`CachedCall::run`], the one place a kernel that reads the pages in
//! place replaces the copy.

use nalgebra::DMatrix;

use super::{KvCache, SeqId, SeqPages};
use crate::cpu::CpuPath;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::heads::{HeadLayout, multi_head_attention_with_lse};
use crate::kernel::batch::paged;
use crate::memory::try_matrix;
use crate::options::Parallelism;
use crate::spec::{cached_specs, check_lists, check_scalars};
use crate::view::{AsMatMut, AsMatRef, block};
use crate::{AttentionOptions, Causal, Element, MatRef, multi_head_attention};

/// Attention of `seq`'s newest tokens' queries over its cached keys and values.
///
/// `query` holds the queries of the last `n_q` tokens of the sequence (`n_q × h_q·d_k`),
/// whose keys and values were already appended. Query `i` is the token at absolute
/// position `len − n_q + i` and attends, per head as in
/// [`multi_head_attention`](crate::multi_head_attention) (query head `h` reads the cache's
/// key/value head `h / (h_q / heads_kv)`), to the kept keys at positions up to its own:
/// causal attention, bottom-right aligned. The result is that of `multi_head_attention`
/// over the whole history with [`Causal::BottomRight`], and in sliding-window mode (window
/// `w`) with the window `(w − 1, 0)` added: the same bits, without a window, when that
/// call is given the values row-major (the cache stores each token's values contiguously,
/// and the decoding kernel sums values stored that way in its own order); within rounding
/// for a column-major V.
///
/// Options: the scale (default `1/√d_k`), softcap, ALiBi (one slope or per-head slopes;
/// distances are between absolute positions), parallelism and the CPU path apply as in
/// `multi_head_attention`. Causal is always bottom-right (setting it is allowed only as
/// [`Causal::BottomRight`]); a window may be set on a cache without one (its `diag(i)` is
/// the query's absolute position), while a sliding-window cache applies its own. Masks,
/// biases and key masks are not accepted: a cached token is either kept or removed
/// ([`KvCache::truncate`]).
///
/// # Shapes
/// `query` `n_q × h_q·d_k` with `d_k` the cache's; returns `n_q × h_q·d_v`. With `n_q >
/// len` the first `n_q − len` rows see no key and are 0.
///
/// # Errors
/// In this order: [`AttentionError::UnknownSequence`]; [`AttentionError::InvalidOption`]
/// for a layout with sequence lengths, a mask, bias, key mask or per-sequence
/// mask/bias, top-left causal, or a window on a sliding-window cache;
/// [`AttentionError::InvalidHeads`]; [`AttentionError::DimensionMismatch`]
/// ([`Operand::HeadLayout`], [`Axis::Heads`]) when the layout's `heads_kv` is not the
/// cache's; [`AttentionError::HeadSplit`] when `query` is not `h_q·d_k` wide;
/// [`AttentionError::Evicted`] when the window has evicted keys an early query needs
/// (more queries than the last append had rows); then the errors of
/// `multi_head_attention` for the query and options (NaN/∞ in `query`, invalid scale, …),
/// with [`AttentionError::HeadScoreOverflow`]'s `key` an absolute position.
///
/// # Example
/// ```
/// use attention_core::{cached_attention, multi_head_attention, AttentionOptions, Causal, HeadLayout, KvCache};
/// use nalgebra::DMatrix;
///
/// // Sliding window of 4 tokens, one head of width 2, pages of 2 tokens.
/// let mut cache = KvCache::<f64>::new(1, 2, 2)?.with_page_size(2)?.with_window(4)?;
/// let seq = cache.add_sequence();
/// let x = DMatrix::<f64>::from_fn(9, 2, |i, j| ((2 * i + j) as f64 * 0.7).sin());
/// cache.append(seq, x.rows(0, 6), x.rows(0, 6))?; // a chunk of 6 (prefill)
/// for t in 6..9 {
///     cache.append(seq, x.rows(t, 1), x.rows(t, 1))?; // then one at a time
/// }
/// assert_eq!(cache.kept(seq)?, 4..9); // older pages were evicted
/// let layout = HeadLayout::new(1, 1);
/// let out = cached_attention(x.rows(8, 1), &cache, seq, &layout, &AttentionOptions::new())?;
/// // = windowed attention over the whole history.
/// let full = multi_head_attention(x.rows(8, 1), &x, &x, &layout,
///     &AttentionOptions::new().with_causal(Causal::BottomRight).with_window(3, 0))?;
/// assert!((out - full).amax() < 1e-15);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn cached_attention<'q, T: Element>(
    query: impl AsMatRef<'q, T>,
    cache: &KvCache<T>,
    seq: SeqId,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<DMatrix<T>, AttentionError> {
    let call = CachedCall::new(query.into_mat_ref(), cache, seq, layout, options)?;
    call.run(false).map(|(out, _)| out)
}

/// [`cached_attention`] that also returns the log-sum-exp of every query and head
/// (`n_q × h_q`, as [`multi_head_attention_with_lse`](crate::multi_head_attention_with_lse)).
///
/// # Errors
/// Those of [`cached_attention`].
///
/// # Example
/// ```
/// use attention_core::{cached_attention_with_lse, AttentionOptions, HeadLayout, KvCache};
/// use nalgebra::DMatrix;
///
/// let mut cache = KvCache::<f64>::new(1, 2, 1)?;
/// let seq = cache.add_sequence();
/// cache.append(seq, &DMatrix::zeros(3, 2), &DMatrix::zeros(3, 1))?;
/// let q = DMatrix::<f64>::zeros(1, 2);
/// let (_, lse) = cached_attention_with_lse(&q, &cache, seq, &HeadLayout::new(1, 1), &AttentionOptions::new())?;
/// assert!((lse[(0, 0)] - 3f64.ln()).abs() < 1e-15); // three scores of 0
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::type_complexity)] // (output, lse) is the documented pair
pub fn cached_attention_with_lse<'q, T: Element>(
    query: impl AsMatRef<'q, T>,
    cache: &KvCache<T>,
    seq: SeqId,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<(DMatrix<T>, DMatrix<T>), AttentionError> {
    let call = CachedCall::new(query.into_mat_ref(), cache, seq, layout, options)?;
    let (out, lse) = call.run(true)?;
    Ok((out, lse.expect("asked for")))
}

/// A checked cached-attention call: the pages to read and the options as
/// `multi_head_attention` over the kept tokens takes them.
struct CachedCall<'a, T: Element> {
    query: MatRef<'a, T>,
    pages: SeqPages<'a, T>,
    key_width: usize,
    value_width: usize,
    layout: HeadLayout<'a>,
    /// The caller's options with causal bottom-right and the cache's window.
    options: AttentionOptions<'a, T>,
}

impl<'a, T: Element> CachedCall<'a, T> {
    fn new(
        query: MatRef<'a, T>,
        cache: &'a KvCache<T>,
        seq: SeqId,
        layout: &HeadLayout<'_>,
        options: &AttentionOptions<'a, T>,
    ) -> Result<Self, AttentionError> {
        let pages = cache.pages(seq)?;
        check_options_and_heads(cache, query.ncols(), layout, options)?;
        let (heads_q, heads_kv) = (layout.heads_q, layout.heads_kv);
        let n_q = query.nrows();
        let len = pages.first_position() + pages.kept();
        let mut effective = options.clone().with_causal(Causal::BottomRight);
        if let Some(w) = cache.window {
            let needed_from = len.saturating_sub(n_q).saturating_sub(w - 1);
            if needed_from < pages.first_position() {
                return Err(AttentionError::Evicted {
                    needed_from,
                    first_kept: pages.first_position(),
                });
            }
            effective = effective.with_window(w - 1, 0);
        }
        Ok(CachedCall {
            query,
            pages,
            key_width: cache.key_width,
            value_width: cache.value_width,
            layout: HeadLayout::new(heads_q, heads_kv),
            options: effective,
        })
    }

    /// Computes the call: output, and the lse if `with_lse`.
    ///
    /// The decoding kernel on the pages in place when every head takes it (few queries:
    /// decoding); otherwise the kept pages are copied into contiguous K and V (O(kept),
    /// and a re-validation of cached rows) for `multi_head_attention`, whose other kernels
    /// (more queries, tiny calls, the careful path) do not depend on V's layout.
    #[allow(clippy::type_complexity)] // (output, optional lse)
    fn run(self, with_lse: bool) -> Result<(DMatrix<T>, Option<DMatrix<T>>), AttentionError> {
        if let Some(result) = self.run_in_place(with_lse)? {
            return Ok(result);
        }
        let (k, v) = gather(&self.pages, self.key_width, self.value_width)?;
        let result = if with_lse {
            multi_head_attention_with_lse(self.query, &k, &v, &self.layout, &self.options)
                .map(|(out, lse)| (out, Some(lse)))
        } else {
            multi_head_attention(self.query, &k, &v, &self.layout, &self.options)
                .map(|out| (out, None))
        };
        let first = self.pages.first_position();
        result.map_err(|e| match e {
            AttentionError::HeadScoreOverflow { head, query, key } => {
                AttentionError::HeadScoreOverflow {
                    head,
                    query,
                    key: key + first,
                }
            }
            other => other,
        })
    }
}

impl<T: Element> CachedCall<'_, T> {
    /// The decoding kernel on the pages in place (`kernel::batch::paged`): for a few new
    /// queries, the common case of decoding. `None`, having written nothing, when the call
    /// needs another kernel (then [`run`](Self::run) copies the pages).
    #[allow(clippy::type_complexity)] // (output, optional lse)
    fn run_in_place(
        &self,
        with_lse: bool,
    ) -> Result<Option<(DMatrix<T>, Option<DMatrix<T>>)>, AttentionError> {
        let (heads_q, heads_kv) = (self.layout.heads_q, self.layout.heads_kv);
        let (d_k, d_v) = (self.key_width / heads_kv, self.value_width / heads_kv);
        let (n_q, kept) = (self.query.nrows(), self.pages.kept());
        if n_q == 0 || n_q > crate::kernel::DIRECT_MAX_QUERIES {
            return Ok(None);
        }
        let (Some(k_shape), Some(v_shape)) = (
            self.pages.shape_only(kept, d_k),
            self.pages.shape_only(kept, d_v),
        ) else {
            return Ok(None);
        };
        let specs = cached_specs(
            self.query,
            (k_shape, v_shape),
            (heads_q, heads_kv),
            |j| self.pages.max_abs(j),
            &self.options,
        )?;
        let (path, forced) = CpuPath::for_call(self.options.cpu_path)?;
        let segments = (0..heads_kv)
            .map(|j| {
                // One segment per key tile: each a contiguous run of K.
                self.pages
                    .iter()
                    .flat_map(|p| {
                        let value = p.value(j);
                        p.key_tiles(j).map(move |(r, k)| {
                            let rows = r..r + k.nrows();
                            (k, block(value, rows, 0..d_v))
                        })
                    })
                    .collect()
            })
            .collect();
        let mut out = try_matrix(n_q, heads_q * d_v, T::zero(), Operand::Output)?;
        let mut lse = match with_lse {
            true => Some(try_matrix(n_q, heads_q, T::zero(), Operand::Lse)?),
            false => None,
        };
        let parallel = self.options.parallelism == Parallelism::Rayon;
        let done = paged(
            &specs,
            segments,
            (path, forced),
            parallel,
            (&mut out).into_mat_mut(),
            lse.as_mut(),
        );
        Ok(done.then_some((out, lse)))
    }
}

/// The checks of [`CachedCall::new`] that read neither the query's values nor the
/// sequence: the options a cached call refuses, the layout against the cache, and the
/// query's width (`query_columns`).
fn check_options_and_heads<T: Element>(
    cache: &KvCache<T>,
    query_columns: usize,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<(), AttentionError> {
    let reject = |option: &'static str, rule: &'static str| {
        Err(AttentionError::InvalidOption { option, rule })
    };
    if layout.seqlens.is_some() {
        return reject(
            "with_seqlens",
            "cached attention attends one sequence; call it once per sequence",
        );
    }
    if options.dropout.is_some_and(|d| d.p > 0.0) {
        return reject(
            "dropout",
            "cached attention is for inference: it takes no dropout",
        );
    }
    if options.query_rows.is_some() {
        return reject(
            "with_query_rows",
            "the cache places its queries: the last n_q positions of the sequence",
        );
    }
    let no_mask = "cached attention takes no mask or bias: truncate the cache instead";
    for (set, option) in [
        (options.mask.is_some(), "with_mask"),
        (options.bias.is_some(), "with_bias"),
        (options.key_mask.is_some(), "with_key_mask"),
        (options.sequence_masks.is_some(), "with_sequence_masks"),
        (options.sequence_biases.is_some(), "with_sequence_biases"),
    ] {
        if set {
            return reject(option, no_mask);
        }
    }
    if options.causal == Some(Causal::TopLeft) {
        return reject(
            "with_causal",
            "cached attention is causal bottom-right: the last query is the newest token",
        );
    }
    if cache.window.is_some() && options.window.is_some() {
        return reject(
            "with_window",
            "a sliding-window KV cache applies its own window (w - 1, 0)",
        );
    }
    let (heads_q, heads_kv) = (layout.heads_q, layout.heads_kv);
    if heads_q == 0 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
        return Err(AttentionError::InvalidHeads { heads_q, heads_kv });
    }
    check_dim(
        Operand::HeadLayout,
        Axis::Heads,
        heads_kv,
        cache.heads_kv,
        Operand::KvCache,
        "the layout's key/value heads are the cache's",
    )?;
    if heads_q.checked_mul(cache.d_k) != Some(query_columns) {
        return Err(AttentionError::HeadSplit {
            operand: Operand::Query,
            columns: query_columns,
            heads: heads_q,
            head_width: Some(cache.d_k),
        });
    }
    Ok(())
}

/// Every check of a [`cached_attention`] call on `cache` that can be made before the new
/// tokens are appended: the sequence, the options a cached call refuses, the layout
/// against the cache, the query's width, the scalars (scale, softcap, ALiBi), the
/// per-head slopes and the CPU path. What is left to fail after the append depends on
/// the values: NaN/∞ in the query (the layer's projections rule it out), a score out of
/// range, an allocation. The layer's `forward_cached` runs this before appending.
pub(crate) fn check_before_append<T: Element>(
    cache: &KvCache<T>,
    seq: SeqId,
    query_columns: usize,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<(), AttentionError> {
    cache.pages(seq)?;
    check_options_and_heads(cache, query_columns, layout, options)?;
    check_scalars(options, cache.d_k)?;
    check_lists(options, layout.heads_q, 1)?;
    if let Some(path) = options.cpu_path {
        path.check()?;
    }
    Ok(())
}

/// The kept tokens of `pages` as contiguous K and V.
#[allow(clippy::type_complexity)] // (keys, values)
pub(super) fn gather<T: Element>(
    pages: &SeqPages<'_, T>,
    key_width: usize,
    value_width: usize,
) -> Result<(DMatrix<T>, DMatrix<T>), AttentionError> {
    use crate::memory::try_matrix;
    let mut k = try_matrix(pages.kept(), key_width, T::zero(), Operand::Key)?;
    let mut v = try_matrix(pages.kept(), value_width, T::zero(), Operand::Value)?;
    let heads = pages.heads();
    let mut row = 0;
    for page in pages.iter() {
        debug_assert_eq!(page.positions.start, pages.first_position() + row);
        let n = page.positions.len();
        let (d_k, d_v) = (key_width / heads.max(1), value_width / heads.max(1));
        for h in 0..heads {
            for (r, tile) in page.key_tiles(h) {
                k.view_mut((row + r, h * d_k), tile.shape())
                    .copy_from(&tile);
            }
            v.view_mut((row, h * d_v), (n, d_v))
                .copy_from(&page.value(h));
        }
        row += n;
    }
    Ok((k, v))
}
