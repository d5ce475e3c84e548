//! The paged KV cache: [`KvCache`] stores the keys and values of many sequences in
//! fixed-size pages from one pool (vLLM's layout), so growing a sequence never copies its
//! old tokens and memory stays within a page per sequence of what is used.
//!
//! - `mod.rs` (here): the cache, its bookkeeping and its public methods;
//! - `pages.rs`: the page layout, the contract with the kernels that read pages in place
//!   ([`SeqPages`]);
//! - `attend.rs`: [`cached_attention`](crate::cached_attention), attention of new queries
//!   through the cache.

mod attend;
mod pages;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use nalgebra::DMatrix;

pub(crate) use attend::check_before_append;
pub use attend::{cached_attention, cached_attention_with_lse};
pub(crate) use pages::SeqPages;
use pages::{key_piece, tile_pieces};

use crate::columns::for_each_column;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::memory::too_large;
use crate::spec::check_finite;
use crate::view::AsMatRef;
use crate::{Element, MatRef};

/// The page size [`KvCache::new`] uses: 256 tokens, four of the decoding kernel's 64-key
/// chunks. Each head's keys and values of a page are one contiguous run each (see
/// [`KvCache`]'s storage), and longer runs are read from memory faster: decoding 32 query
/// heads over 8 KV heads (d 128, f32, 32768 cached tokens) took 9.6–11.9 ms per token on a
/// 2-thread Zen 4 VM against 11.6–12.8 ms with pages of 64. A sequence wastes less than
/// a page; [`KvCache::with_page_size`] sets another size (smaller pages for many short
/// sequences or small windows).
pub const DEFAULT_PAGE_SIZE: usize = 256;

/// A sequence of a [`KvCache`]: returned by [`KvCache::add_sequence`], valid until
/// [`KvCache::remove`].
///
/// Ids count up from 0 within each cache and are never reused, so an id kept after
/// `remove` is an [`AttentionError::UnknownSequence`], never another sequence. An id is
/// meaningful only for the cache that returned it (another cache may hold a sequence with
/// the same number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The id's number (0 for a cache's first sequence, then 1, 2, …).
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One page: `page_size` tokens of K (per head, tiles of column-major blocks) followed by
/// the same tokens of V (per head a row-major `page_size × d_v` block). See `pages.rs`.
type Page<T> = Box<[T]>;

/// A sequence's bookkeeping. Invariant: `pages.len() == ⌈(len − first) / page_size⌉`, and
/// page `p` holds the tokens at absolute positions `first + p·page_size ..` (row `r` of
/// the page is position `first + p·page_size + r`). `first` is a multiple of the page size
/// (whole pages are evicted), and 0 without a window.
struct Sequence<T> {
    pages: Vec<Page<T>>,
    first: usize,
    len: usize,
    /// Per page and key/value head (index `p·heads_kv + h`), the largest |k| and |v| of
    /// the page's kept rows (set by appends, recomputed for the last page by a truncation;
    /// whole pages are evicted): a call through the cache bounds its scores and clamps its
    /// outputs with the kept tokens' own magnitudes, head by head as a call on contiguous
    /// K and V would, without reading them (see [`SeqPages::max_abs`]).
    page_max: Vec<(T, T)>,
}

/// A paged key/value cache for `heads_kv` heads of widths `d_k` and `d_v`, serving any
/// number of sequences (continuous batching).
///
/// **Storage.** Tokens live in pages of `page_size` tokens (default
/// [`DEFAULT_PAGE_SIZE`]) taken from a pool the cache owns: a sequence's page list grows a
/// page at a time, so appending never copies old tokens, and
/// [`truncate`](Self::truncate), [`remove`](Self::remove) and window eviction return pages
/// to the pool, where later appends of any sequence reuse them. Memory is
/// [`memory_bytes`](Self::memory_bytes): whole pages, so a sequence wastes less than a page
/// (≤ 10% once it fills 10 pages); [`release_free_pages`](Self::release_free_pages) gives
/// the pool's unused pages back to the allocator. Each page holds its K head by head,
/// each head's keys in tiles of 64 tokens, each tile column-major (the tokens of each
/// feature contiguous), and its V as one row-major `page_size × d_v` block per head (each
/// token's values contiguous): each head's K and V of a page are one contiguous run each,
/// which the attention kernels read in place.
///
/// **Positions** are absolute: a sequence's tokens are numbered from 0 in the order they
/// were appended, whatever page or slot holds them, and causal masks, windows and ALiBi
/// distances count in them. The cache stores keys as given, so keys are appended **after
/// RoPE** ([`Rope::apply`](crate::Rope::apply) with the tokens' absolute positions).
///
/// **Sliding window** ([`with_window`](Self::with_window)`(w)`): attention through the
/// cache equals windowed attention with window `(w − 1, 0)`, bottom-right, over the whole
/// history. After appending `n` tokens the cache keeps at least the last `w − 1 + n` (so
/// every query of a chunked prefill still sees its `w − 1` predecessors) and evicts the
/// pages whose every token is older; the kept tokens are [`kept`](Self::kept).
///
/// **Errors.** Every method that takes a [`SeqId`] returns
/// [`AttentionError::UnknownSequence`] for an id that is not in the cache. A method that
/// returns an error has changed nothing: [`append`](Self::append) is all-or-nothing, even
/// when a page cannot be allocated.
///
/// # Example
/// ```
/// use attention_core::{cached_attention, multi_head_attention, AttentionOptions, Causal, HeadLayout, KvCache};
/// use nalgebra::DMatrix;
///
/// // 2 key/value heads of width 4, read by 4 query heads; pages of 16 tokens.
/// let mut cache = KvCache::<f32>::new(2, 4, 4)?.with_page_size(16)?;
/// let seq = cache.add_sequence();
/// let k = DMatrix::<f32>::from_fn(40, 8, |i, j| ((i * 8 + j) as f32 * 0.1).sin());
/// let v = DMatrix::<f32>::from_fn(40, 8, |i, j| ((i + j) as f32 * 0.2).cos());
/// let q = DMatrix::<f32>::from_fn(40, 16, |i, j| ((i * 16 + j) as f32 * 0.3).cos());
/// let layout = HeadLayout::new(4, 2);
///
/// // A prompt of 37 tokens, then three decoding steps of one token each.
/// cache.append(seq, k.rows(0, 37), v.rows(0, 37))?;
/// for t in 37..40 {
///     cache.append(seq, k.rows(t, 1), v.rows(t, 1))?;
/// }
/// assert_eq!((cache.len(seq)?, cache.kept(seq)?), (40, 0..40));
///
/// // The newest token's queries attend to the whole history: attention over the
/// // contiguous K and V with bottom-right causal alignment, within rounding (the cache
/// // stores values token by token and sums them in another order than a column-major V;
/// // given V row-major, `multi_head_attention` gives the same bits).
/// let out = cached_attention(q.rows(39, 1), &cache, seq, &layout, &AttentionOptions::new())?;
/// let full = multi_head_attention(q.rows(39, 1), &k, &v, &layout,
///     &AttentionOptions::new().with_causal(Causal::BottomRight))?;
/// assert!((&out - &full).amax() < 1e-5);
///
/// // Speculative decoding rejected the last two tokens: roll back, pages return to the pool.
/// cache.truncate(seq, 38)?;
/// assert_eq!(cache.len(seq)?, 38);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub struct KvCache<T: Element> {
    heads_kv: usize,
    d_k: usize,
    d_v: usize,
    page_size: usize,
    window: Option<usize>,
    /// `heads_kv·d_k` and `heads_kv·d_v`.
    key_width: usize,
    value_width: usize,
    sequences: BTreeMap<SeqId, Sequence<T>>,
    /// The pool's unused pages (contents stale), reused last-freed first.
    free: Vec<Page<T>>,
    next_id: u64,
}

impl<T: Element> fmt::Debug for KvCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvCache")
            .field("heads_kv", &self.heads_kv)
            .field("d_k", &self.d_k)
            .field("d_v", &self.d_v)
            .field("page_size", &self.page_size)
            .field("window", &self.window)
            .field("sequences", &self.sequences.len())
            .field("pages_used", &self.pages_used())
            .field("pages_free", &self.free.len())
            .finish()
    }
}

impl<T: Element> KvCache<T> {
    /// An empty cache for `heads_kv` key/value heads of widths `d_k` (keys) and `d_v`
    /// (values), pages of [`DEFAULT_PAGE_SIZE`] tokens, no window. Allocates nothing.
    ///
    /// # Errors
    /// [`AttentionError::InvalidOption`] if `heads_kv` is 0; [`AttentionError::TooLarge`]
    /// ([`Operand::KvCache`]) if a page's size overflows.
    pub fn new(heads_kv: usize, d_k: usize, d_v: usize) -> Result<Self, AttentionError> {
        if heads_kv == 0 {
            return Err(AttentionError::InvalidOption {
                option: "KvCache::new",
                rule: "a KV cache holds at least one key/value head",
            });
        }
        let key_width = heads_kv
            .checked_mul(d_k)
            .ok_or_else(|| too_large(Operand::KvCache, heads_kv, d_k))?;
        let value_width = heads_kv
            .checked_mul(d_v)
            .ok_or_else(|| too_large(Operand::KvCache, heads_kv, d_v))?;
        let cache = KvCache {
            heads_kv,
            d_k,
            d_v,
            page_size: DEFAULT_PAGE_SIZE,
            window: None,
            key_width,
            value_width,
            sequences: BTreeMap::new(),
            free: Vec::new(),
            next_id: 0,
        };
        cache.page_elements()?;
        Ok(cache)
    }

    /// Pages of `page_size` tokens (any ≥ 1). Set it before adding sequences.
    ///
    /// # Errors
    /// [`AttentionError::InvalidOption`] for 0 or when the cache already has sequences
    /// (the cache is then dropped: call this right after [`new`](Self::new));
    /// [`AttentionError::TooLarge`] if a page's size overflows.
    pub fn with_page_size(mut self, page_size: usize) -> Result<Self, AttentionError> {
        self.check_empty("with_page_size")?;
        if page_size == 0 {
            return Err(AttentionError::InvalidOption {
                option: "with_page_size",
                rule: "a page holds at least one token",
            });
        }
        self.page_size = page_size;
        self.page_elements()?;
        self.free.clear();
        Ok(self)
    }

    /// Sliding-window mode: attention through the cache is windowed attention with window
    /// `(w − 1, 0)` (the token itself and the `w − 1` before it), and tokens no query can
    /// see any more are evicted (see the type's documentation). Set it before adding
    /// sequences.
    ///
    /// # Errors
    /// [`AttentionError::InvalidOption`] for `w = 0` or when the cache already has
    /// sequences (the cache is then dropped).
    pub fn with_window(mut self, w: usize) -> Result<Self, AttentionError> {
        self.check_empty("with_window")?;
        if w == 0 {
            return Err(AttentionError::InvalidOption {
                option: "with_window",
                rule: "the window holds at least one token (the query's own)",
            });
        }
        self.window = Some(w);
        Ok(self)
    }

    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    /// Width of a key head.
    pub fn d_k(&self) -> usize {
        self.d_k
    }
    /// Width of a value head.
    pub fn d_v(&self) -> usize {
        self.d_v
    }
    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// The window `w` in sliding-window mode.
    pub fn window(&self) -> Option<usize> {
        self.window
    }
    /// The number of sequences.
    pub fn sequence_count(&self) -> usize {
        self.sequences.len()
    }
    /// The sequences, in the order they were added.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// A new, empty sequence. Allocates no page until its first append.
    #[must_use = "the id is the only way to reach the sequence"]
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(
            id,
            Sequence {
                pages: Vec::new(),
                first: 0,
                len: 0,
                page_max: Vec::new(),
            },
        );
        id
    }

    /// The number of tokens appended to `seq` and not truncated: the absolute position
    /// the next appended token will have. Counts evicted tokens.
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize, AttentionError> {
        Ok(self.sequence(seq)?.len)
    }

    /// Whether `seq` has no tokens.
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`].
    pub fn is_empty(&self, seq: SeqId) -> Result<bool, AttentionError> {
        Ok(self.sequence(seq)?.len == 0)
    }

    /// The absolute positions of the tokens `seq` still holds: `0..len` without a window;
    /// with one, from the first token of the oldest kept page.
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`].
    pub fn kept(&self, seq: SeqId) -> Result<Range<usize>, AttentionError> {
        let s = self.sequence(seq)?;
        Ok(s.first..s.len)
    }

    /// Appends `n` tokens to `seq`: `key` is `n × heads_kv·d_k` and `value`
    /// `n × heads_kv·d_v` (any matrix or view), the tokens taking absolute positions
    /// `len .. len + n`. Only these rows are checked; in sliding-window mode the pages whose
    /// tokens all lie before `len + n − (w − 1 + n)` then go back to the pool.
    ///
    /// All-or-nothing: on any error the cache is exactly as before (every page, every
    /// length). Pages are taken from the pool first and allocated only when it is empty;
    /// old tokens are never moved.
    ///
    /// # Errors
    /// In this order: [`AttentionError::UnknownSequence`];
    /// [`AttentionError::DimensionMismatch`] when `key` does not have `heads_kv·d_k` columns
    /// ([`Operand::NewKeys`] against [`Operand::KvCache`]), `value` not as many rows as
    /// `key` or not `heads_kv·d_v` columns ([`Operand::NewValues`]);
    /// [`AttentionError::NonFinite`] for the first NaN or ±∞ of `key`, then of `value`
    /// (column-major order; `row` counts from the first new row);
    /// [`AttentionError::TooLarge`] ([`Operand::KvCache`]) when a page cannot be allocated.
    pub fn append<'k, 'v>(
        &mut self,
        seq: SeqId,
        key: impl AsMatRef<'k, T>,
        value: impl AsMatRef<'v, T>,
    ) -> Result<(), AttentionError> {
        self.append_impl(seq, key.into_mat_ref(), value.into_mat_ref(), false)
            .map(|_| ())
    }

    /// [`append`](Self::append) that also returns what [`undo`](Self::undo) needs to put
    /// back every bit it changed (`None` when it appended nothing): the layer's
    /// `forward_cached` appends, then attends, and undoes the append if attending fails.
    /// The journal costs one copy of the rows the append overwrites (as many elements as
    /// the new K and V), allocated before anything changes.
    pub(crate) fn append_undoable(
        &mut self,
        seq: SeqId,
        k: MatRef<'_, T>,
        v: MatRef<'_, T>,
    ) -> Result<Option<AppendUndo<T>>, AttentionError> {
        self.append_impl(seq, k, v, true)
    }

    /// Undoes the append that returned `undo`, which must be the last change made to the
    /// cache: afterwards [`snapshot`](Self::snapshot) is what it was before that append
    /// (the same pages at the same addresses, in the sequence and in the pool, with the
    /// same bits, stale rows included). Never allocates and never fails: every capacity
    /// it needs was reserved by the append.
    pub(crate) fn undo(&mut self, undo: AppendUndo<T>) {
        let page_size = self.page_size;
        let widths = (self.key_width, self.heads_kv, self.d_v);
        let s = self
            .sequences
            .get_mut(&undo.seq)
            .expect("undo follows its append");
        // The overwritten slots, in the order they were saved.
        let mut at = 0;
        for_each_slot(page_size, widths, undo.start, undo.rows, |p, slots| {
            let n = slots.len();
            s.pages[p][slots].copy_from_slice(&undo.saved[at..at + n]);
            at += n;
        });
        // The added pages: fresh ones were pushed last (dropped here), those from the pool
        // go back in the reverse order of their pops.
        for _ in 0..undo.extra - undo.from_pool {
            drop(s.pages.pop());
        }
        for _ in 0..undo.from_pool {
            let page = s.pages.pop().expect("pages taken from the pool");
            self.free.push(page);
        }
        // The evicted pages are the pool's last ones again: back to the front.
        let from = self.free.len() - undo.evicted;
        s.pages.splice(0..0, self.free.drain(from..));
        (s.first, s.len) = (undo.first, undo.len);
        s.page_max.clear();
        s.page_max.extend_from_slice(&undo.page_max);
    }

    /// [`append`](Self::append), journaled for [`undo`](Self::undo) if `journal`.
    fn append_impl(
        &mut self,
        seq: SeqId,
        k: MatRef<'_, T>,
        v: MatRef<'_, T>,
        journal: bool,
    ) -> Result<Option<AppendUndo<T>>, AttentionError> {
        let s = self.sequence(seq)?;
        let (len, first, have) = (s.len, s.first, s.pages.len());
        let n = k.nrows();
        check_dim(
            Operand::NewKeys,
            Axis::Columns,
            k.ncols(),
            self.key_width,
            Operand::KvCache,
            "new keys are n x heads_kv*d_k",
        )?;
        check_dim(
            Operand::NewValues,
            Axis::Rows,
            v.nrows(),
            n,
            Operand::NewKeys,
            "one value row per key row",
        )?;
        check_dim(
            Operand::NewValues,
            Axis::Columns,
            v.ncols(),
            self.value_width,
            Operand::KvCache,
            "new values are n x heads_kv*d_v",
        )?;
        check_finite(Operand::NewKeys, &k)?;
        check_finite(Operand::NewValues, &v)?;
        if n == 0 {
            return Ok(None);
        }
        let new_len = len
            .checked_add(n)
            .ok_or_else(|| too_large(Operand::KvCache, n, self.key_width))?;

        // Plan: evict whole pages before `keep_from`, then hold `[first', new_len)`.
        let keep_from = match self.window {
            Some(w) => new_len.saturating_sub((w - 1).saturating_add(n)),
            None => 0,
        };
        let evict = keep_from.saturating_sub(first) / self.page_size;
        let new_first = first + evict * self.page_size;
        let need = (new_len - new_first).div_ceil(self.page_size);
        let extra = need - (have - evict);
        let fresh = extra.saturating_sub(self.free.len() + evict);

        // Everything that can fail, before anything changes.
        let mut new_pages = Vec::new();
        new_pages
            .try_reserve_exact(fresh)
            .map_err(|_| too_large(Operand::KvCache, fresh, 1))?;
        for _ in 0..fresh {
            new_pages.push(self.new_page()?);
        }
        let s = self.sequences.get_mut(&seq).expect("looked up above");
        s.pages
            .try_reserve(extra)
            .map_err(|_| too_large(Operand::KvCache, have + extra, 1))?;
        let heads = self.heads_kv;
        s.page_max
            .try_reserve(extra * heads)
            .map_err(|_| too_large(Operand::KvCache, have + extra, 2 * heads))?;
        let mut old_max = Vec::new();
        if journal {
            old_max
                .try_reserve_exact(have * heads)
                .map_err(|_| too_large(Operand::KvCache, have, 2 * heads))?;
            old_max.extend_from_slice(&s.page_max);
        }
        self.free
            .try_reserve(evict)
            .map_err(|_| too_large(Operand::KvCache, self.free.len() + evict, 1))?;
        let columns = self.key_width + self.value_width;
        let mut saved = Vec::new();
        if journal {
            saved
                .try_reserve_exact(n * columns)
                .map_err(|_| too_large(Operand::KvCache, n, columns))?;
        }

        // Commit: nothing below allocates or fails.
        let undo = AppendUndo {
            seq,
            len,
            first,
            page_max: old_max,
            evicted: evict,
            extra,
            from_pool: extra.min(self.free.len() + evict),
            start: len - new_first,
            rows: n,
            saved: Vec::new(),
        };
        self.free.extend(s.pages.drain(..evict));
        s.page_max.drain(..evict * heads);
        s.page_max
            .extend(std::iter::repeat_n((T::zero(), T::zero()), extra * heads));
        for _ in 0..extra {
            let page = match self.free.pop() {
                Some(page) => page,
                None => new_pages.pop().expect("planned fresh pages"),
            };
            s.pages.push(page);
        }
        debug_assert!(new_pages.is_empty());
        if journal {
            let widths = (self.key_width, self.heads_kv, self.d_v);
            for_each_slot(self.page_size, widths, len - new_first, n, |p, slots| {
                saved.extend_from_slice(&s.pages[p][slots]);
            });
        }
        s.first = new_first;
        s.len = new_len;
        write_rows(
            &mut s.pages,
            &mut s.page_max,
            (self.page_size, heads),
            self.key_width,
            len - new_first,
            &k,
            &v,
        );
        Ok(journal.then_some(AppendUndo { saved, ..undo }))
    }

    /// Shortens `seq` to its first `len` tokens (speculative decoding, beam rollback);
    /// the pages past them return to the pool. `len` equal to the current length changes
    /// nothing.
    ///
    /// In sliding-window mode the next append needs the last `w − 1` tokens before `len`:
    /// truncating is allowed to 0, or to a length whose last `w − 1` tokens are all kept
    /// (after an append of `n` tokens, rolling back up to `n` of them always is).
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`]; [`AttentionError::TruncateBeyond`] when `len`
    /// exceeds the sequence's length; [`AttentionError::Evicted`] when the window has
    /// evicted tokens the shortened sequence would need.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), AttentionError> {
        let page_size = self.page_size;
        let window = self.window;
        let s = self.sequence(seq)?;
        if len > s.len {
            return Err(AttentionError::TruncateBeyond {
                len,
                history: s.len,
            });
        }
        let needed_from = len.saturating_sub(window.map_or(usize::MAX, |w| w - 1));
        if len > 0 && needed_from < s.first {
            return Err(AttentionError::Evicted {
                needed_from,
                first_kept: s.first,
            });
        }
        let (first, keep) = if len == 0 {
            (0, 0)
        } else {
            (s.first, (len - s.first).div_ceil(page_size))
        };
        let drop = s.pages.len() - keep;
        self.free
            .try_reserve(drop)
            .map_err(|_| too_large(Operand::KvCache, self.free.len() + drop, 1))?;
        let s = self.sequences.get_mut(&seq).expect("looked up above");
        self.free.extend(s.pages.drain(keep..));
        let heads = self.heads_kv;
        s.page_max.truncate(keep * heads);
        s.first = first;
        s.len = len;
        // The last page's magnitudes, now over its kept rows only.
        if let Some(page) = s.pages.last() {
            let rows = len - first - (keep - 1) * page_size;
            let (d_k, d_v) = (self.d_k, self.d_v);
            for (h, max) in s.page_max[(keep - 1) * heads..].iter_mut().enumerate() {
                *max = page_max(page, page_size, (self.key_width, d_k, d_v), h, rows);
            }
        }
        Ok(())
    }

    /// Removes `seq`; its pages return to the pool and its id becomes unknown.
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`].
    pub fn remove(&mut self, seq: SeqId) -> Result<(), AttentionError> {
        let pages = self.sequence(seq)?.pages.len();
        self.free
            .try_reserve(pages)
            .map_err(|_| too_large(Operand::KvCache, self.free.len() + pages, 1))?;
        let s = self.sequences.remove(&seq).expect("looked up above");
        self.free.extend(s.pages);
        Ok(())
    }

    /// Bytes the cache holds for K and V: every page, the pool's unused ones included
    /// (`pages · page_size · heads_kv·(d_k + d_v) · size_of::<T>()`; the page lists and
    /// other bookkeeping are not counted).
    pub fn memory_bytes(&self) -> usize {
        (self.pages_used() + self.free.len()) * self.page_bytes()
    }

    /// Bytes of the pages the sequences hold (the pool's unused pages excluded).
    pub fn used_bytes(&self) -> usize {
        self.pages_used() * self.page_bytes()
    }

    /// Frees the pool's unused pages (they stay allocated otherwise, for later appends).
    pub fn release_free_pages(&mut self) {
        self.free = Vec::new();
    }

    /// A copy of `seq`'s kept keys and values as contiguous matrices
    /// (`kept × heads_kv·d_k` and `kept × heads_kv·d_v`, row `r` being absolute position
    /// `kept().start + r`).
    ///
    /// # Errors
    /// [`AttentionError::UnknownSequence`]; [`AttentionError::TooLarge`] when the copies
    /// cannot be allocated.
    #[allow(clippy::type_complexity)] // (keys, values) is the documented pair
    pub fn gather(&self, seq: SeqId) -> Result<(DMatrix<T>, DMatrix<T>), AttentionError> {
        attend::gather(&self.pages(seq)?, self.key_width, self.value_width)
    }

    /// `seq`'s kept tokens, page by page, read in place: what the attention kernels use
    /// (see [`SeqPages`] for the layout contract).
    pub(crate) fn pages(&self, seq: SeqId) -> Result<SeqPages<'_, T>, AttentionError> {
        let s = self.sequence(seq)?;
        Ok(SeqPages::new(
            &s.pages,
            self.page_size,
            self.key_width,
            self.value_width,
            s.first..s.len,
            (&s.page_max, self.heads_kv),
        ))
    }

    /// Every bit of the cache's state, for tests that check that a failed call changed
    /// nothing: the configuration, each sequence's id, length, first position, pages
    /// (address and every element's bits, stale rows included) and magnitude bounds, and
    /// the pool's pages.
    #[doc(hidden)]
    pub fn snapshot(&self) -> CacheSnapshot {
        let page = |p: &Page<T>| {
            (
                p.as_ptr() as usize,
                p.iter().map(|x| x.to_f64().to_bits()).collect(),
            )
        };
        CacheSnapshot {
            config: [
                self.heads_kv,
                self.d_k,
                self.d_v,
                self.page_size,
                self.window.unwrap_or(0),
            ],
            next_id: self.next_id,
            sequences: self
                .sequences
                .iter()
                .map(|(id, s)| (id.0, s.len, s.first, s.pages.iter().map(page).collect()))
                .collect(),
            max_abs: self
                .sequences
                .values()
                .map(|s| {
                    s.page_max
                        .iter()
                        .map(|(k, v)| (k.to_f64().to_bits(), v.to_f64().to_bits()))
                        .collect()
                })
                .collect(),
            free: self.free.iter().map(page).collect(),
        }
    }

    fn sequence(&self, seq: SeqId) -> Result<&Sequence<T>, AttentionError> {
        self.sequences
            .get(&seq)
            .ok_or(AttentionError::UnknownSequence { sequence: seq })
    }

    fn check_empty(&self, option: &'static str) -> Result<(), AttentionError> {
        if self.sequences.is_empty() {
            Ok(())
        } else {
            Err(AttentionError::InvalidOption {
                option,
                rule: "set it before adding sequences",
            })
        }
    }

    fn pages_used(&self) -> usize {
        self.sequences.values().map(|s| s.pages.len()).sum()
    }

    /// Elements of one page (K and V), or `TooLarge` if its bytes overflow.
    fn page_elements(&self) -> Result<usize, AttentionError> {
        let width = self.key_width + self.value_width;
        self.page_size
            .checked_mul(width)
            .filter(|&n| {
                n.checked_mul(std::mem::size_of::<T>())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| too_large(Operand::KvCache, self.page_size, width))
    }

    fn page_bytes(&self) -> usize {
        self.page_size * (self.key_width + self.value_width) * std::mem::size_of::<T>()
    }

    /// A fresh page of zeros, or `TooLarge`.
    fn new_page(&self) -> Result<Page<T>, AttentionError> {
        let width = self.key_width + self.value_width;
        let err = || too_large(Operand::KvCache, self.page_size, width);
        #[cfg(test)]
        if fail_injection::should_fail() {
            return Err(err());
        }
        let len = self.page_elements()?;
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| err())?;
        data.resize(len, T::zero());
        Ok(data.into_boxed_slice())
    }
}

/// Copies the rows of `k` and `v` into `pages`, row 0 going to offset `start` of the
/// pages (token `start` counted from the first page's row 0), which already exist.
fn write_rows<T: Element>(
    pages: &mut [Page<T>],
    page_max: &mut [(T, T)],
    (page_size, heads): (usize, usize),
    key_width: usize,
    start: usize,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
) {
    let n = k.nrows();
    // Head widths (a head count of at least 1 is checked when the cache is made).
    let (d_k, d_v) = (k.ncols() / heads, v.ncols() / heads);
    let mut row = 0;
    let mut buf = Vec::new();
    while row < n {
        let (p, r0) = ((start + row) / page_size, (start + row) % page_size);
        let count = (page_size - r0).min(n - row);
        let (kp, vp) = pages[p].split_at_mut(page_size * key_width);
        let max = &mut page_max[p * heads..(p + 1) * heads];
        if r0 == 0 {
            // The page's first rows: whatever it held before (a pool page) is stale.
            max.fill((T::zero(), T::zero()));
        }
        // K's columns, piece by piece of the rows within one key tile: one run each.
        for (r, n) in tile_pieces(r0, count) {
            let (piece, from) = (key_piece(page_size, d_k, r), row + (r - r0));
            // Column `c` of head `h`, stepped (no division per column: a one-token
            // append visits every column).
            let (mut h, mut c) = (0, 0);
            for_each_column(k, from..from + n, &mut buf, |_, col| {
                let at = piece.at(h, c);
                kp[at..at + n].copy_from_slice(col);
                let m = &mut max[h].0;
                *m = col.iter().fold(*m, |a, x| a.max(x.abs()));
                (h, c) = if c + 1 == d_k { (h + 1, 0) } else { (h, c + 1) };
            });
        }
        for_each_column(v, row..row + count, &mut buf, |c, col| {
            let (h, c) = (c / d_v, c % d_v);
            for (i, &x) in col.iter().enumerate() {
                vp[(h * page_size + r0 + i) * d_v + c] = x;
            }
            let m = &mut max[h].1;
            *m = col.iter().fold(*m, |a, x| a.max(x.abs()));
        });
        row += count;
    }
}

/// The largest |k| and |v| of head `h` in a page's first `rows` rows.
fn page_max<T: Element>(
    page: &[T],
    page_size: usize,
    (key_width, d_k, d_v): (usize, usize, usize),
    h: usize,
    rows: usize,
) -> (T, T) {
    let (kp, vp) = page.split_at(page_size * key_width);
    let abs_max = |a: T, x: &T| a.max(x.abs());
    // Head `h`'s block: its first `rows` rows are the first tiles' columns, each tile's
    // columns a run of the tile's shown rows.
    let k_max = tile_pieces(0, rows)
        .flat_map(|(r, n)| {
            let piece = key_piece(page_size, d_k, r);
            (0..d_k).map(move |c| {
                let at = piece.at(h, c);
                at..at + n
            })
        })
        .flat_map(|run| &kp[run])
        .fold(T::zero(), abs_max);
    let v_start = h * page_size * d_v;
    let v_max = vp[v_start..v_start + rows * d_v]
        .iter()
        .fold(T::zero(), abs_max);
    (k_max, v_max)
}

/// Calls `f(p, range)` for the slots `start .. start + n` (token rows counted from the
/// first page's row 0) of a run of pages (the layout of `pages.rs`: per head, K's tiles
/// of `d_k` columns, then per head `page_size` rows of `d_v` values): for each page
/// touched, each column of K within each key tile piece and then each head's rows of V,
/// the page's index and the range of elements, in that order. Loops, not an iterator of
/// iterators: the layer's cached step journals every column of K for one token.
fn for_each_slot(
    page_size: usize,
    (key_width, heads, d_v): (usize, usize, usize),
    start: usize,
    n: usize,
    mut f: impl FnMut(usize, Range<usize>),
) {
    let d_k = key_width / heads;
    let mut row = 0;
    while row < n {
        let (p, r0) = ((start + row) / page_size, (start + row) % page_size);
        let count = (page_size - r0).min(n - row);
        row += count;
        for (r, m) in tile_pieces(r0, count) {
            let piece = key_piece(page_size, d_k, r);
            for h in 0..heads {
                for c in 0..d_k {
                    let at = piece.at(h, c);
                    f(p, at..at + m);
                }
            }
        }
        for h in 0..heads {
            let at = page_size * key_width + (h * page_size + r0) * d_v;
            f(p, at..at + count * d_v);
        }
    }
}

/// What one [`KvCache::append_undoable`] changed: the sequence's bookkeeping before it,
/// how many pages moved where, and the elements its rows overwrote.
pub(crate) struct AppendUndo<T> {
    seq: SeqId,
    len: usize,
    first: usize,
    /// The sequence's per-page magnitudes before.
    page_max: Vec<(T, T)>,
    /// Pages evicted from the front of the sequence into the pool.
    evicted: usize,
    /// Pages added at the end of the sequence: the first `from_pool` popped from the pool
    /// (after the evicted ones were pushed to it), the rest fresh.
    extra: usize,
    from_pool: usize,
    /// The appended rows: `rows` tokens from row `start` of the sequence's (new) pages.
    start: usize,
    rows: usize,
    /// The elements those rows overwrote, in [`for_each_slot`] order.
    saved: Vec<T>,
}

/// The state [`KvCache::snapshot`] returns: compare two with `==`.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// heads_kv, d_k, d_v, page size, window (0 for none).
    pub config: [usize; 5],
    /// The next id `add_sequence` returns.
    pub next_id: u64,
    /// Per sequence: id, length, first position, pages (address, element bits).
    #[allow(clippy::type_complexity)] // a flat record for equality checks only
    pub sequences: Vec<(u64, usize, usize, Vec<(usize, Vec<u64>)>)>,
    /// Per sequence, in the same order: the bits of each page's max |k| and max |v|.
    pub max_abs: Vec<Vec<(u64, u64)>>,
    /// The pool's unused pages (address, element bits).
    pub free: Vec<(usize, Vec<u64>)>,
}

/// Test-only fault injection: makes the `n`-th next page allocation of this thread fail,
/// so that the all-or-nothing rule of `append` is tested on a real allocation failure.
#[cfg(test)]
mod fail_injection {
    use std::cell::Cell;

    thread_local! {
        static FAIL_AFTER: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Page allocations after the next `n` succeed fail (until `clear`).
    pub(crate) fn fail_after(n: usize) {
        FAIL_AFTER.with(|f| f.set(Some(n)));
    }

    pub(crate) fn clear() {
        FAIL_AFTER.with(|f| f.set(None));
    }

    pub(super) fn should_fail() -> bool {
        FAIL_AFTER.with(|f| match f.get() {
            Some(0) => true,
            Some(n) => {
                f.set(Some(n - 1));
                false
            }
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, width: usize, seed: usize) -> DMatrix<f32> {
        DMatrix::from_fn(n, width, |i, j| {
            ((seed * 131 + i * 17 + j) as f32 * 0.37).sin()
        })
    }

    /// Every entry of the tuning table (`cpu::TUNINGS`: how the decoding kernel requests
    /// the next page while it reads one) gives the same bits, and the result is the
    /// attention of the gathered K and V: both request orders run here, on any CPU.
    /// Pages of 64 (whole chunks read in place) and 16 (chunks copied), 4 query heads per
    /// key/value head (values read by rows), f32 and one query, and two queries.
    #[test]
    fn every_tuning_gives_the_same_bits() {
        use crate::cpu::{TUNINGS, forced_tuning};
        use crate::{AttentionOptions, HeadLayout, cached_attention, multi_head_attention};
        let (h_kv, h_q, d, n) = (2, 8, 32, 300);
        let layout = HeadLayout::new(h_q, h_kv);
        let options = AttentionOptions::new();
        for page in [64, 16] {
            let mut cache = KvCache::<f32>::new(h_kv, d, d)
                .unwrap()
                .with_page_size(page)
                .unwrap();
            let seq = cache.add_sequence();
            cache
                .append(seq, &rows(n, h_kv * d, 1), &rows(n, h_kv * d, 2))
                .unwrap();
            let (k, v) = cache.gather(seq).unwrap();
            for n_q in [1, 2] {
                let q = rows(n_q, h_q * d, 3);
                let want = multi_head_attention(
                    &q,
                    &k,
                    &v,
                    &layout,
                    &options.clone().with_causal(crate::Causal::BottomRight),
                )
                .unwrap();
                let mut first: Option<DMatrix<f32>> = None;
                for (i, tuning) in TUNINGS.iter().enumerate() {
                    forced_tuning::set(Some(i));
                    let got = cached_attention(&q, &cache, seq, &layout, &options).unwrap();
                    forced_tuning::set(None);
                    let err = (&got - &want).abs().max();
                    assert!(
                        err < 1e-5,
                        "{}: page {page} n_q {n_q}: {err}",
                        TUNINGS[i].name
                    );
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert!(
                            f.iter()
                                .zip(got.iter())
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{}: page {page} n_q {n_q}: bits differ",
                            tuning.name
                        ),
                    }
                }
            }
        }
    }

    /// A failed page allocation in the middle of an append (the pool too small, several
    /// fresh pages needed, window eviction planned) leaves every bit of the cache as it
    /// was; the same append then succeeds and holds the right tokens.
    #[test]
    fn allocation_failure_changes_nothing() {
        for window in [None, Some(2)] {
            let mut cache = KvCache::<f32>::new(2, 3, 2)
                .unwrap()
                .with_page_size(4)
                .unwrap();
            if let Some(w) = window {
                cache = cache.with_window(w).unwrap();
            }
            let a = cache.add_sequence();
            let b = cache.add_sequence();
            let (k, v) = (rows(36, 6, 1), rows(36, 4, 2));
            cache.append(a, k.rows(0, 6), v.rows(0, 6)).unwrap();
            cache.append(b, &rows(9, 6, 3), &rows(9, 4, 4)).unwrap();
            cache.remove(b).unwrap(); // 3 pages in the pool
            let before = cache.snapshot();
            // 30 more tokens need 7 more pages: 3 from the pool, 4 fresh (with w = 2 the
            // first page is evicted and reused: 3 fresh).
            for succeed in 0..3 {
                fail_injection::fail_after(succeed);
                let err = cache.append(a, k.rows(6, 30), v.rows(6, 30)).unwrap_err();
                fail_injection::clear();
                assert!(
                    matches!(
                        err,
                        AttentionError::TooLarge {
                            operand: Operand::KvCache,
                            ..
                        }
                    ),
                    "{err:?}"
                );
                assert!(
                    cache.snapshot() == before,
                    "a failed append changed the cache"
                );
            }
            cache.append(a, k.rows(6, 30), v.rows(6, 30)).unwrap();
            let kept = cache.kept(a).unwrap();
            assert_eq!(
                (cache.len(a).unwrap(), kept.clone()),
                (36, window.map_or(0, |_| 4)..36)
            );
            let (gk, gv) = cache.gather(a).unwrap();
            assert_eq!(gk, k.rows(kept.start, kept.len()));
            assert_eq!(gv, v.rows(kept.start, kept.len()));
            let pages = if window.is_some() { 8 } else { 9 };
            assert_eq!(cache.memory_bytes(), pages * 4 * 10 * 4);
        }
    }

    /// `undo` after `append_undoable` gives back every bit, whatever the append did:
    /// filled a partial page, took pages from the pool, allocated fresh ones, evicted
    /// pages under a window (and reused them); appending again afterwards works.
    #[test]
    fn undo_restores_every_bit() {
        for window in [None, Some(1), Some(3), Some(6)] {
            for page_size in [1, 2, 4, 5] {
                for (history, pooled, n) in [(0, 0, 3), (3, 0, 1), (6, 2, 7), (7, 9, 2), (9, 1, 13)]
                {
                    let mut cache = KvCache::<f32>::new(2, 3, 2)
                        .unwrap()
                        .with_page_size(page_size)
                        .unwrap();
                    if let Some(w) = window {
                        cache = cache.with_window(w).unwrap();
                    }
                    let a = cache.add_sequence();
                    let b = cache.add_sequence();
                    let (k, v) = (rows(history + n, 6, 1), rows(history + n, 4, 2));
                    cache
                        .append(b, &rows(pooled, 6, 3), &rows(pooled, 4, 4))
                        .unwrap();
                    cache
                        .append(a, k.rows(0, history), v.rows(0, history))
                        .unwrap();
                    cache.remove(b).unwrap(); // its pages (stale data) go to the pool
                    let before = cache.snapshot();
                    let undo = cache
                        .append_undoable(
                            a,
                            k.rows(history, n).into_mat_ref(),
                            v.rows(history, n).into_mat_ref(),
                        )
                        .unwrap()
                        .expect("rows appended");
                    assert_eq!(cache.len(a).unwrap(), history + n);
                    cache.undo(undo);
                    let label = format!(
                        "window {window:?}, pages of {page_size}, {history} + {n} tokens, {pooled} pooled"
                    );
                    assert!(
                        cache.snapshot() == before,
                        "{label}: undo left a difference"
                    );
                    cache
                        .append(a, k.rows(history, n), v.rows(history, n))
                        .unwrap();
                    let kept = cache.kept(a).unwrap();
                    let (gk, gv) = cache.gather(a).unwrap();
                    assert_eq!(gk, k.rows(kept.start, kept.len()), "{label}");
                    assert_eq!(gv, v.rows(kept.start, kept.len()), "{label}");
                }
            }
        }
    }

    /// The page layout the kernels rely on: K a column-major block (each feature's tokens
    /// contiguous), V a row-major block per head (each token's values contiguous), page
    /// `p` at positions `first + p·page_size ..`.
    #[test]
    fn pages_hold_k_by_columns_and_v_by_rows() {
        let mut cache = KvCache::<f32>::new(2, 3, 2)
            .unwrap()
            .with_page_size(4)
            .unwrap();
        let s = cache.add_sequence();
        let (k, v) = (rows(10, 6, 1), rows(10, 4, 2));
        cache.append(s, k.rows(0, 3), v.rows(0, 3)).unwrap();
        cache.append(s, k.rows(3, 7), v.rows(3, 7)).unwrap();
        let pages = cache.pages(s).unwrap();
        assert_eq!(
            (pages.kept(), pages.first_position(), pages.len()),
            (10, 0, 3)
        );
        for (p, page) in pages.iter().enumerate() {
            assert_eq!(page.positions, 4 * p..(4 * p + 4).min(10));
            for h in 0..2 {
                assert_eq!(page.value(h).strides(), (2, 1));
                let tiles: Vec<_> = page.key_tiles(h).collect();
                assert_eq!(tiles.len(), 1);
                assert_eq!((tiles[0].0, tiles[0].1.strides()), (0, (1, 4)));
            }
            let raw = &cache.sequences[&s].pages[p];
            for (r, t) in page.positions.clone().enumerate() {
                for c in 0..6 {
                    let (h, c_h) = (c / 3, c % 3);
                    assert_eq!(page.key_tiles(h).next().unwrap().1[(r, c_h)], k[(t, c)]);
                    assert_eq!(raw[c * 4 + r], k[(t, c)]);
                }
                for (h, c) in (0..2).flat_map(|h| (0..2).map(move |c| (h, c))) {
                    assert_eq!(page.value(h)[(r, c)], v[(t, 2 * h + c)]);
                    assert_eq!(raw[24 + (4 * h + r) * 2 + c], v[(t, 2 * h + c)]);
                }
            }
        }
    }

    /// Pages of more than one key tile: per head, tiles of 64 rows (the last of 36 in a
    /// page of 100), each column-major; a head's tiles one after the other.
    #[test]
    fn pages_of_several_tiles_hold_each_heads_keys_in_one_run() {
        let mut cache = KvCache::<f32>::new(2, 3, 2)
            .unwrap()
            .with_page_size(100)
            .unwrap();
        let s = cache.add_sequence();
        let (k, v) = (rows(230, 6, 1), rows(230, 4, 2));
        cache.append(s, k.rows(0, 70), v.rows(0, 70)).unwrap();
        cache.append(s, k.rows(70, 160), v.rows(70, 160)).unwrap();
        let pages = cache.pages(s).unwrap();
        for (p, page) in pages.iter().enumerate() {
            let raw = &cache.sequences[&s].pages[p];
            for (r, t) in page.positions.clone().enumerate() {
                // Row r of head h: tile 0 (rows 0..64, column stride 64) or tile 1 (rows
                // 64..100, column stride 36, after tile 0's 64·3 elements).
                for c in 0..6 {
                    let (h, c_h) = (c / 3, c % 3);
                    let at = if r < 64 {
                        h * 300 + c_h * 64 + r
                    } else {
                        h * 300 + 192 + c_h * 36 + (r - 64)
                    };
                    assert_eq!(raw[at], k[(t, c)], "page {p} row {r} column {c}");
                }
            }
            for h in 0..2 {
                let tiles: Vec<_> = page.key_tiles(h).collect();
                let shown = page.positions.len();
                let want: Vec<(usize, usize, usize)> =
                    [(0, shown.min(64), 64), (64, shown.saturating_sub(64), 36)]
                        .into_iter()
                        .filter(|t| t.1 > 0)
                        .collect();
                let got: Vec<_> = tiles
                    .iter()
                    .map(|(r, m)| (*r, m.nrows(), m.strides().1))
                    .collect();
                assert_eq!(got, want, "page {p} head {h}");
                for (r0, m) in &tiles {
                    for (r, c) in (0..m.nrows()).flat_map(|r| (0..3).map(move |c| (r, c))) {
                        let t = page.positions.start + r0 + r;
                        assert_eq!(m[(r, c)], k[(t, 3 * h + c)]);
                    }
                }
            }
        }
        assert_eq!(cache.gather(s).unwrap(), (k, v));
    }
}
