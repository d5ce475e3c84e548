//! The page layout of [`KvCache`](crate::KvCache): the contract between the cache and the
//! kernels that read its pages in place.
//!
//! # Layout
//! A page is one allocation of `page_size · heads_kv·(d_k + d_v)` elements: first K, a
//! column-major `page_size × heads_kv·d_k` block (element `(r, c)` at `c·page_size + r`:
//! column `c` is feature `c` of the page's tokens, the tokens contiguous, head `h` in
//! columns `h·d_k ..`, exactly nalgebra's `DMatrix` layout), then V, one row-major
//! `page_size × d_v` block per head, head after head (element `(r, c)` of head `h` at
//! `(h·page_size + r)·d_v + c`: each token's values contiguous, as vLLM stores its value
//! blocks). The two layouts serve the decoding kernel's two products: scores `q·k_j`
//! vectorise over the keys of a column of K, the weighted sum `Σ_j p_j·v_j` over the
//! columns of a row of V; and each head's K and V are contiguous runs of memory, which the
//! hardware prefetcher follows (rows of all heads side by side would put each head's next
//! row 4 KiB further, across a memory page, where prefetchers stop).
//! V. Row `r` of a sequence's page `p` is the
//! token at absolute position `first + p·page_size + r`, `first` being the position of the
//! first page's row 0 (a multiple of the page size). Rows past the sequence's length hold
//! stale values and are never shown.
//!
//! # What a kernel may assume
//! Every token shown was checked finite when it was appended; [`SeqPages`] shows exactly
//! the kept tokens, `kept` of them at positions `first_position .. first_position + kept`,
//! in order, page after page with no gap; each page's views have row stride 1 and column
//! stride `page_size`; only the first and the last page may show fewer than `page_size`
//! rows (the last when the sequence ends inside it; the first when the kept range starts
//! inside it, which the current cache never does, since it evicts whole pages, but a
//! kernel must not rely on that).

use std::ops::Range;

use nalgebra::Dyn;

use crate::{Element, MatRef};

/// One page's kept tokens, in place.
#[derive(Clone, Debug)]
pub(crate) struct PageView<'a, T: Element> {
    /// `tokens × heads_kv·d_k`, row stride 1, column stride `page_size`.
    pub(crate) key: MatRef<'a, T>,
    /// The page's values (all heads' blocks, all rows), read through [`Self::value`].
    values: &'a [T],
    /// The first row shown, the page's rows, the head width of V.
    r0: usize,
    page_size: usize,
    d_v: usize,
    /// The absolute positions of the rows (`positions.len()` = `tokens`).
    pub(crate) positions: Range<usize>,
}

impl<'a, T: Element> PageView<'a, T> {
    /// Head `h`'s values: `tokens × d_v`, row stride `d_v`, column stride 1.
    pub(crate) fn value(&self, h: usize) -> MatRef<'a, T> {
        let (d_v, rows) = (self.d_v, self.positions.len());
        let data = if d_v == 0 {
            &[][..]
        } else {
            &self.values[(h * self.page_size + self.r0) * d_v..]
        };
        MatRef::from_slice_with_strides_generic(data, Dyn(rows), Dyn(d_v), Dyn(d_v), Dyn(1))
    }
}

/// A sequence's kept tokens as a list of pages, read in place (see the module
/// documentation for the layout). Cheap to make: borrows the sequence's page list.
#[derive(Clone, Debug)]
pub(crate) struct SeqPages<'a, T: Element> {
    pages: &'a [Box<[T]>],
    page_size: usize,
    key_width: usize,
    value_width: usize,
    /// Absolute position of row 0 of `pages[0]`.
    base: usize,
    /// Absolute positions of the kept tokens.
    kept: Range<usize>,
    /// Per page and key/value head (`p·heads + h`), the largest |k| and |v| of the page's
    /// kept rows; and the number of heads.
    page_max: (&'a [(T, T)], usize),
}

impl<'a, T: Element> SeqPages<'a, T> {
    /// `pages[p]` row `r` is position `base + p·page_size + r`; shows `kept`.
    pub(super) fn new(
        pages: &'a [Box<[T]>],
        page_size: usize,
        key_width: usize,
        value_width: usize,
        kept: Range<usize>,
        page_max: (&'a [(T, T)], usize),
    ) -> Self {
        debug_assert_eq!(pages.len(), (kept.end - kept.start).div_ceil(page_size));
        SeqPages {
            pages,
            page_size,
            key_width,
            value_width,
            base: kept.start - kept.start % page_size,
            kept,
            page_max,
        }
    }

    /// `(max|K|, max|V|)` of key/value head `h` over the kept tokens, from the per-page
    /// magnitudes the cache keeps up to date (appends set them, a truncation recomputes
    /// the last page's, whole pages are evicted): exact, as a call on the contiguous K and
    /// V would find them, and no call re-reads the cache for them.
    pub(crate) fn max_abs(&self, h: usize) -> (T, T) {
        let (maxima, heads) = self.page_max;
        maxima
            .iter()
            .skip(h)
            .step_by(heads.max(1))
            .fold((T::zero(), T::zero()), |(k, v), &(pk, pv)| {
                (k.max(pk), v.max(pv))
            })
    }

    /// A `rows × columns` view that repeats one element of the first page (zero strides):
    /// the shape of the kept keys or values, for the specs of a call whose kernel reads
    /// the pages themselves. `None` if there is no page.
    pub(crate) fn shape_only(&self, rows: usize, columns: usize) -> Option<MatRef<'a, T>> {
        let first = self.pages.first()?.get(..1)?;
        Some(MatRef::from_slice_with_strides_generic(
            first,
            Dyn(rows),
            Dyn(columns),
            Dyn(0),
            Dyn(0),
        ))
    }

    /// The number of kept tokens (the rows of all pages together).
    pub(crate) fn kept(&self) -> usize {
        self.kept.len()
    }

    /// The absolute position of the first kept token.
    pub(crate) fn first_position(&self) -> usize {
        self.kept.start
    }

    /// The number of key/value heads.
    pub(crate) fn heads(&self) -> usize {
        self.page_max.1
    }

    /// The number of pages.
    pub(crate) fn len(&self) -> usize {
        self.pages.len()
    }

    /// Page `p` (`p < len()`): its kept rows as K and V views and their positions.
    pub(crate) fn page(&self, p: usize) -> PageView<'a, T> {
        let start = self.base + p * self.page_size;
        let positions = start.max(self.kept.start)..(start + self.page_size).min(self.kept.end);
        let (r0, rows) = (positions.start - start, positions.len());
        let (k, v) = self.pages[p].split_at(self.page_size * self.key_width);
        PageView {
            key: block(k, r0, rows, self.key_width, self.page_size),
            values: v,
            r0,
            page_size: self.page_size,
            d_v: self.value_width / self.page_max.1.max(1),
            positions,
        }
    }

    /// The pages in order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = PageView<'a, T>> + '_ {
        (0..self.len()).map(|p| self.page(p))
    }
}

/// Rows `r0 .. r0 + rows` of the column-major `page_size × columns` block `data`.
fn block<T: Element>(
    data: &[T],
    r0: usize,
    rows: usize,
    columns: usize,
    page_size: usize,
) -> MatRef<'_, T> {
    let data = if columns == 0 { &[][..] } else { &data[r0..] };
    MatRef::from_slice_with_strides_generic(data, Dyn(rows), Dyn(columns), Dyn(1), Dyn(page_size))
}
