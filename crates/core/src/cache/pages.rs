//! The page layout of [`KvCache`](crate::KvCache): the contract between the cache and the
//! kernels that read its pages in place.
//!
//! # Layout
//! A page is one allocation of `page_size · heads_kv·(d_k + d_v)` elements: first K, one
//! `page_size · d_k` block per head, head after head, then V, one row-major
//! `page_size × d_v` block per head, head after head (element `(r, c)` of head `h` at
//! `(h·page_size + r)·d_v + c`: each token's values contiguous, as vLLM stores its value
//! blocks). A head's K block is cut into tiles of [`KEY_TILE`] rows (the last one
//! shorter when the page size is not a multiple), each a column-major `rows × d_k` block:
//! element `(r, c)` of head `h` at [`key_piece`]`(page_size, d_k, r).at(h, c)`. With
//! pages of at most [`KEY_TILE`] rows this is a column-major `page_size × heads_kv·d_k`
//! block (nalgebra's `DMatrix` layout, head `h` in columns `h·d_k ..`).
//!
//! The two layouts serve the decoding kernel's two products: scores `q·k_j` vectorise over
//! the keys of a column of K, the weighted sum `Σ_j p_j·v_j` over the columns of a row of
//! V. The kernel reads a head's keys in chunks of [`KEY_TILE`] (its online-softmax step),
//! each chunk all `d_k` columns: a tile is one contiguous run, and the tiles of a head
//! follow each other, so a page of `page_size` tokens is one run of `page_size · d_k`
//! elements per head for K and one for V (128 KiB each for 256 tokens of width 128 in
//! f32). Longer runs are read faster: reading 32 KiB runs scattered over memory reached
//! 14 GB/s on one Zen 4 core where 128 KiB runs reached 19 and 1 MiB runs 22
//! (`docs/PERFORMANCE.md`, "Longer runs per head"). Rows of all heads side by side would
//! put each head's next row 4 KiB further, across a memory page, where prefetchers stop.
//!
//! Row `r` of a sequence's page `p` is the token at absolute position
//! `first + p·page_size + r`, `first` being the position of the first page's row 0 (a
//! multiple of the page size). Rows past the sequence's length hold stale values and are
//! never shown.
//!
//! # What a kernel may assume
//! Every token shown was checked finite when it was appended; [`SeqPages`] shows exactly
//! the kept tokens, `kept` of them at positions `first_position .. first_position + kept`,
//! in order, page after page with no gap; a page's keys come as tiles
//! ([`PageView::key_tiles`]), each with row stride 1 and a column stride of its tile's
//! rows; only the first and the last page may show fewer than `page_size` rows (the last
//! when the sequence ends inside it; the first when the kept range starts inside it,
//! which the current cache never does, since it evicts whole pages, but a kernel must not
//! rely on that).

use std::ops::Range;

use nalgebra::Dyn;

use crate::{Element, MatRef};

/// Rows of a key tile (see the layout above): the decoding kernel's chunk, so that each
/// chunk of a page it reads is one contiguous run.
pub(crate) const KEY_TILE: usize = crate::kernel::decode::CHUNK;

/// Where rows `r ..` of one key tile lie in a page's K part ([`key_piece`]): row `r + i`
/// of column `c` of head `h` at [`at(h, c)`](Self::at)` + i`, for rows in `r`'s tile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyPiece {
    /// Elements per head (`page_size · d_k`).
    head: usize,
    /// Offset of row `r`, column 0, within a head's block.
    first: usize,
    /// Column stride: the tile's rows.
    pub(crate) stride: usize,
}

impl KeyPiece {
    /// The offset of row `r` of head `h`'s column `c`.
    #[inline]
    pub(crate) fn at(&self, h: usize, c: usize) -> usize {
        h * self.head + self.first + c * self.stride
    }
}

/// Where rows from `r` on, within `r`'s key tile, lie in a page of `page_size` rows whose
/// heads have `d_k` columns: head `h`'s block, then the tile of row `r` (`t0 = r − r mod
/// KEY_TILE`, after `t0·d_k` elements of earlier tiles), column-major with the tile's rows
/// as its column stride.
pub(crate) fn key_piece(page_size: usize, d_k: usize, r: usize) -> KeyPiece {
    let t0 = r - r % KEY_TILE;
    KeyPiece {
        head: page_size * d_k,
        first: t0 * d_k + (r - t0),
        stride: KEY_TILE.min(page_size - t0),
    }
}

/// The pieces of page rows `r0 .. r0 + n` that lie in one key tile each, in order, as
/// `(first row, rows)`: within a piece, each column of K is contiguous.
pub(crate) fn tile_pieces(r0: usize, n: usize) -> impl Iterator<Item = (usize, usize)> {
    let end = r0 + n;
    let mut r = r0;
    std::iter::from_fn(move || {
        (r < end).then(|| {
            let rows = (KEY_TILE - r % KEY_TILE).min(end - r);
            r += rows;
            (r - rows, rows)
        })
    })
}

/// One page's kept tokens, in place.
#[derive(Clone, Debug)]
pub(crate) struct PageView<'a, T: Element> {
    /// The page's keys (all heads' blocks, all rows), read through [`Self::key_tiles`].
    keys: &'a [T],
    /// The page's values (all heads' blocks, all rows), read through [`Self::value`].
    values: &'a [T],
    /// The first row shown, the page's rows, the head widths of K and V.
    r0: usize,
    page_size: usize,
    d_k: usize,
    d_v: usize,
    /// The absolute positions of the rows (`positions.len()` = `tokens`).
    pub(crate) positions: Range<usize>,
}

impl<'a, T: Element> PageView<'a, T> {
    /// Head `h`'s keys, tile by tile ([`KEY_TILE`] rows each, the first and last possibly
    /// fewer): for each, its first row counted from the page's first row shown, and its
    /// `rows × d_k` view (row stride 1, column stride the tile's rows in the page).
    /// The iterator borrows the page's memory, not the view.
    pub(crate) fn key_tiles(
        &self,
        h: usize,
    ) -> impl Iterator<Item = (usize, MatRef<'a, T>)> + use<'a, T> {
        let (keys, r0, page_size, d_k) = (self.keys, self.r0, self.page_size, self.d_k);
        tile_pieces(r0, self.positions.len()).map(move |(r, rows)| {
            let piece = key_piece(page_size, d_k, r);
            let stride = piece.stride;
            let data = if d_k == 0 {
                &[][..]
            } else {
                &keys[piece.at(h, 0)..]
            };
            let view = MatRef::from_slice_with_strides_generic(
                data,
                Dyn(rows),
                Dyn(d_k),
                Dyn(1),
                Dyn(stride),
            );
            (r - r0, view)
        })
    }

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
        let r0 = positions.start - start;
        let (k, v) = self.pages[p].split_at(self.page_size * self.key_width);
        let heads = self.page_max.1.max(1);
        PageView {
            keys: k,
            values: v,
            r0,
            page_size: self.page_size,
            d_k: self.key_width / heads,
            d_v: self.value_width / heads,
            positions,
        }
    }

    /// The pages in order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = PageView<'a, T>> + '_ {
        (0..self.len()).map(|p| self.page(p))
    }
}
