//! The decoding kernel: a few queries (n_q ≤ 8 per sequence, e.g. one new token) of every
//! query head of a key/value group against many keys, in one pass over K and V.
//!
//! The `R = g·n_q` rows of a group (g query heads reading one key/value head) take the keys
//! in parts of [`PART_KEYS`] (a number that depends only on n_kv), each computed on its
//! own (in parallel when asked), and the parts' `(m, l, acc)` are merged in order: the
//! result does not depend on the number of threads. Within a part ([`part`]), three
//! passes, one softmax step for the whole part:
//!
//! ```text
//! scores:    s_rj = Σ_p q_rp·k_jp          (K read once for every row)
//! softmax:   m_r = max_j s_rj              p_rj = exp(s_rj − m_r)      l_r = Σ_j p_rj
//! values:    acc_rc = Σ_j p_rj·v_jc        (V read once for every row)
//! ```
//! K and V are read once per group whatever g is; for decoding, reading them is the cost.
//! The part's scores (`R × PART_KEYS`) stay in the level-1 or level-2 cache in between.
//!
//! # The order of reading
//! A group of at most [`STREAM_ROWS`] rows whose part lies in one block of K and V stored
//! by columns (a `DMatrix`) reads each column from start to end ([`stream_scores`],
//! [`stream_values`]): long contiguous runs, which the hardware prefetchers follow.
//! Otherwise the part is read chunk by chunk ([`CHUNK`] keys: for each chunk all `d`
//! columns, [`chunk_scores`] with the rows' sums in registers), each chunk in place when K
//! and V have the contiguous runs the kernel reads (K's columns; V's columns, or its
//! rows), else copied first, the next chunk's cache lines requested as the loops over the
//! current one go ([`Ahead`]). Both orders take the same operations in the same order for
//! every sum, so the bits do not depend on which one ran (`tests/decode_order.rs`).
//!
//! # Values by columns or by rows
//! The weighted sums are computed one of two ways, decided once per group from V's layout
//! ([`Group::by_rows`]): values stored by columns (a `DMatrix`, each column's keys
//! contiguous) per row and column in [`LANES`] lanes over each chunk's keys, SIMD over
//! keys ([`lane_partials`]), the lanes added into [`LANES`] f64 lanes per row and column
//! (no horizontal sum until the part ends); values stored by rows (the KV cache's pages, a
//! row-major V) as `Σ_j p_rj·v_j` accumulated over each chunk's keys, SIMD over columns
//! ([`value_rows`]), which needs no horizontal sums and reads each value row once for 4
//! rows. `l = Σ_j p_j` is summed like a value column stored by columns, whatever the
//! layout: the lse does not depend on V's layout, and values stored by columns that are
//! all equal give exactly that value (numerator and denominator take the same steps).
//!
//! # Accuracy
//! Within a chunk, `Σ_j p_j` (and, by columns, `Σ_j p_j·v_jc`) is summed in T in [`LANES`]
//! lanes (key `j` in lane `j mod 16`: at most 4 terms each), then in f64 lanes across
//! chunks, the lanes added pairwise in f64 when a part ends; by rows, `Σ_j p_j·v_jc` is
//! summed in T key after key (at most 64 roundings, a tile of the block kernel), then in
//! f64 across chunks. So a term is rounded at most 64 times in T and about
//! `⌈n_kv/64⌉ + 5` times in f64 — within the block kernel's bound (`common/mod.rs` of the
//! tests, `sum_error`: at least `min(n_kv, 64)` roundings in T, since the block kernel sums
//! a tile's keys in order as well) for every n_kv.
//!
//! Used when the inputs allow it ([`fits`]): scores provably in range (else the careful
//! path decides) and values that need no scaling.
//!
//! # Checking K and V on the way
//! A single-head call whose K and V were not scanned before ([`Group::scan`], see
//! `kernel::attention_deferred`) folds its keys and values into an integer maximum of
//! their `|x|` bits as the kernel reads them (in the score loop itself, and in the first
//! row's weighted sums): every key and value, whether its weight is used or not, so that
//! the maxima equal those of a scan before the call.

use crate::Element;
use crate::cpu::DecodePrefetch;
use crate::kernel::ElementKernels;
use crate::kernel::LINE;
use crate::kernel::exp::madd;
use crate::kernel::simd::prefetch;
use crate::options::MatRef;
use crate::score::{row_lse, row_output};
use crate::spec::Spec;
use crate::view::{MatMut, transposed};
use nalgebra::{DMatrix, Dyn, U1};

/// Keys per chunk: the step of the online softmax.
pub(crate) const CHUNK: usize = 64;
/// Independent partial sums per chunk (see "Accuracy").
pub(crate) const LANES: usize = 16;
/// Keys per part: parts are the unit of work across threads.
pub(crate) const PART_KEYS: usize = 2048;

/// Whether the decoding kernel can compute `spec`.
pub(crate) fn fits<T: Element>(spec: &Spec<'_, T>) -> bool {
    spec.scores_in_range && !spec.needs_value_scaling()
}

/// The running softmax state of the group's rows over some keys: `m` (the rows' running
/// maxima), `l` (`Σ exp(s − m)`, f64) and `acc` (`R × d_v`, f64, row-major).
#[derive(Clone, Debug)]
pub struct State<T: Element> {
    m: Vec<T>,
    l: Vec<f64>,
    acc: Vec<f64>,
    /// Values stored by columns and read chunk by chunk: `acc` in [`LANES`] f64 lanes per
    /// row and column (`lanes[(r·d_v + c)·LANES + t]`), summed into `acc` when the part
    /// ends ([`State::fold_lanes`]); empty otherwise.
    lanes: Vec<f64>,
    /// The largest [`Element::abs_bits_native`] of the keys and of the values read, when
    /// the group scans them ([`Group::scan`]); NaN and ±∞ have the largest bits.
    scanned: (T::Bits, T::Bits),
}

thread_local! {
    /// A finished state's lane buffer, kept for the thread's next part: at 8 query rows of
    /// width 128 it is 128 KiB, which glibc's allocator handed out by `mmap` (zeroed by page
    /// faults) on every call: 8 queries against 16 keys of width 128 took 23–26 µs, 16 µs
    /// with the buffer kept.
    static SPARE_LANES: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Lane buffers up to this many elements (1 MiB) are kept for reuse.
const KEEP_LANES: usize = 1 << 17;

impl<T: Element> State<T> {
    fn new(rows: usize, d_v: usize, lanes: bool) -> Self {
        State {
            m: vec![T::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            acc: vec![0.0; rows * d_v],
            lanes: if lanes {
                let mut buf = SPARE_LANES.take();
                buf.clear();
                buf.resize(rows * d_v * LANES, 0.0);
                buf
            } else {
                Vec::new()
            },
            scanned: Default::default(),
        }
    }

    /// Sums each row's and column's lanes (if any) into `acc`, pairwise.
    fn fold_lanes(&mut self) {
        for (a, lanes) in self.acc.iter_mut().zip(self.lanes.chunks_exact(LANES)) {
            *a = pairwise(lanes.try_into().expect("LANES lanes"));
        }
        let buf = std::mem::take(&mut self.lanes);
        if buf.capacity() <= KEEP_LANES {
            SPARE_LANES.set(buf);
        }
    }

    /// Adds `other` (the state of later keys) into `self`: the exact merge of two softmax
    /// partial results.
    fn merge(&mut self, other: &State<T>, d_v: usize) {
        self.scanned.0 = self.scanned.0.max(other.scanned.0);
        self.scanned.1 = self.scanned.1.max(other.scanned.1);
        for r in 0..self.m.len() {
            let m = self.m[r].max(other.m[r]);
            if m == T::NEG_INFINITY {
                continue;
            }
            let wa = factor(self.m[r], m);
            let wb = factor(other.m[r], m);
            self.l[r] = self.l[r] * wa + other.l[r] * wb;
            let (a, b) = (
                &mut self.acc[r * d_v..][..d_v],
                &other.acc[r * d_v..][..d_v],
            );
            for (x, y) in a.iter_mut().zip(b) {
                *x = *x * wa + *y * wb;
            }
            self.m[r] = m;
        }
    }
}

/// `exp(m_old − m_new)` in f64, 0 when `m_old` is −∞ (nothing was summed yet).
#[inline(always)]
fn factor<T: Element>(m_old: T, m_new: T) -> f64 {
    if m_old == T::NEG_INFINITY {
        0.0
    } else {
        (m_old.to_f64() - m_new.to_f64()).exp()
    }
}

/// One group: the specs of its query heads (same keys, values and sizes; different
/// queries and per-head options), its queries gathered row-major (`R × d_k`, row
/// `h·n_q + i` is query `i` of head `h`).
pub struct Group<'s, 'a, T: Element> {
    pub(crate) specs: &'s [&'s Spec<'a, T>],
    pub(crate) q: Vec<T>,
    pub(crate) n_q: usize,
    /// The keys and values as consecutive blocks of rows (`(K block, V block)`, together
    /// the group's `n_kv` keys): the specs' own K and V, or the pages of a KV cache.
    pub(crate) segments: Vec<(MatRef<'a, T>, MatRef<'a, T>)>,
    /// Whether every segment's values are stored token by token (more than one column,
    /// column stride 1, row stride not 1: a KV cache's pages, a row-major V): then the weighted sums run over
    /// value columns ([`value_rows`]), else over keys ([`lane_partials`]). Decided once per
    /// group from the layout alone, so every chunk of a call sums the same way.
    pub(crate) by_rows: bool,
    /// Whether to find the largest magnitudes of K and V (and any NaN/∞) while reading
    /// them: for a call whose K and V were not scanned before (see
    /// [`attention_deferred`](crate::kernel::attention_deferred)). Every key and value is
    /// folded in, whether its weight is used or not.
    pub(crate) scan: bool,
    /// How the next chunk is requested while one is computed: by CPU model
    /// ([`crate::cpu::tuning`]).
    pub(crate) prefetch: DecodePrefetch,
}

/// Whether the values of `segments` are all stored token by token (see [`Group`]). A
/// single value column is contiguous either way: it is always summed over keys, so that
/// its bits do not depend on the strides a caller happened to give.
fn values_by_rows<T: Element>(segments: &[(MatRef<'_, T>, MatRef<'_, T>)]) -> bool {
    segments.iter().all(|(_, v)| {
        let (rs, cs) = v.strides();
        v.ncols() > 1 && cs == 1 && rs != 1
    })
}

impl<'s, 'a, T: Element> Group<'s, 'a, T> {
    /// The group of `specs` (all reading the same K and V), its queries gathered.
    pub(crate) fn new(specs: &'s [&'s Spec<'a, T>]) -> Self {
        let (n_q, d_k) = (specs[0].n_q, specs[0].d_k);
        let mut q = Vec::with_capacity(specs.len() * n_q * d_k);
        for spec in specs {
            for i in 0..n_q {
                q.extend((0..d_k).map(|p| spec.q[(i, p)]));
            }
        }
        let segments = vec![(specs[0].k, specs[0].v)];
        Group {
            specs,
            q,
            n_q,
            by_rows: values_by_rows(&segments),
            segments,
            scan: false,
            prefetch: crate::cpu::tuning().decode_prefetch,
        }
    }

    /// The group of `specs` whose keys and values are `segments` (consecutive blocks of
    /// rows, e.g. the pages of a KV cache, read in place); the specs' own K and V are not
    /// read, only their sizes and score options.
    pub(crate) fn paged(
        specs: &'s [&'s Spec<'a, T>],
        segments: Vec<(MatRef<'a, T>, MatRef<'a, T>)>,
    ) -> Self {
        debug_assert_eq!(
            segments.iter().map(|(k, _)| k.nrows()).sum::<usize>(),
            specs[0].n_kv
        );
        Group {
            by_rows: values_by_rows(&segments),
            segments,
            ..Group::new(specs)
        }
    }

    fn rows(&self) -> usize {
        self.specs.len() * self.n_q
    }
}

/// The group's state over keys `keys` (a part): the body the CPU paths compile (`simd.rs`,
/// `decode_kernel!`), `FMA` as the path has it.
///
/// One softmax step for the whole part, in three passes: every row's scores for the
/// part's keys (`s`, `rows × len`, row `r` at `r·len`), the softmax (`s` becomes the
/// weights `p = exp(s − m)`, `m` the part's maximum), then the weighted sums of the
/// values. When the part lies in one block of K and V stored by columns and the group has
/// at most [`STREAM_ROWS`] rows, each pass reads K's or V's columns from start to end
/// (long runs that the hardware prefetchers follow: a chunk's 64 keys of every column
/// were `d` runs of 256 bytes, as many streams as columns); otherwise chunk by chunk, each
/// chunk read in place or copied first. Both orders compute the same sums in the same
/// order, so the bits do not depend on which one ran.
#[inline(always)]
pub(crate) fn part<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    keys: std::ops::Range<usize>,
) -> State<T> {
    let spec = group.specs[0];
    let (d_k, d_v) = (spec.d_k, spec.d_v);
    let (rows, len) = (group.rows(), keys.len());
    let streamed = streamed(group, keys.clone());
    let chunks = if streamed.is_some() {
        Vec::new()
    } else {
        chunks(group, keys.clone())
    };
    let by_lanes = !group.by_rows && streamed.is_none();
    let mut state = State::new(rows, d_v, by_lanes);
    let mut s = vec![T::zero(); rows * len];
    let mut scratch = (DMatrix::zeros(0, d_k), DMatrix::zeros(0, d_v));

    // 1. The scores.
    let k_bits = if let Some(((k, _), at)) = streamed {
        let k = k.as_view::<Dyn, Dyn, U1, Dyn>();
        if group.scan {
            stream_scores::<T, FMA, true>(group, &k, at, len, &mut s)
        } else {
            stream_scores::<T, FMA, false>(group, &k, at, len, &mut s)
        }
    } else {
        let mut bits = T::Bits::default();
        for (i, chunk) in chunks.iter().enumerate() {
            // The next chunk's keys: requested all at once now, or a column at a time as
            // this chunk's columns are read (see [`Ahead`]).
            let next = next_in_place(&chunks, i).map(|(((k, _), at), n)| (k, at, n));
            let next_view = next
                .as_ref()
                .map(|(k, at, n)| (k.as_view::<Dyn, Dyn, U1, Dyn>(), *at, *n));
            let mut ahead = next_view.as_ref().map(|(k, at, n)| (k, *at, *n));
            if group.prefetch == DecodePrefetch::AtStart
                && let Some((k, at, n)) = ahead.take()
            {
                prefetch_keys(k, at, n);
            }
            let (k, at) = match chunk.place {
                Some(((k, _), at)) => (k, at),
                None => {
                    gather_keys(group, keys.start + chunk.off, chunk.len, &mut scratch.0);
                    ((&scratch.0).into(), 0)
                }
            };
            let k = k.as_view::<Dyn, Dyn, U1, Dyn>();
            let at = (at, chunk.off, chunk.len);
            bits = bits.max(chunk_scores::<T, FMA>(group, &k, at, len, ahead, &mut s));
        }
        bits
    };

    // 2. The softmax.
    let active = softmax::<T, FMA>(group, keys.start, len, &mut s, &mut state);

    // 3. The weighted sums of the values.
    let v_bits = if let Some(((_, v), at)) = streamed {
        stream_values::<T, FMA>(group, &v.as_view(), at, len, &s, &active, &mut state)
    } else {
        let mut bits = T::Bits::default();
        if group.by_rows {
            // Rows with nothing allowed here weigh nothing (their `s` still holds scores).
            for r in (0..rows).filter(|&r| !active[r]) {
                s[r * len..(r + 1) * len].fill(T::zero());
            }
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let next = next_in_place(&chunks, i).map(|(((_, v), at), n)| (v, at, n));
            let next_view = next
                .as_ref()
                .map(|(v, at, n)| (v.as_view::<Dyn, Dyn, U1, Dyn>(), *at, *n));
            let mut ahead = next_view.as_ref().map(|(v, at, n)| (v, *at, *n));
            // Values by rows may be requested as read; by columns they always are at once.
            if !(group.by_rows && group.prefetch == DecodePrefetch::AsRead)
                && let Some((v, at, n)) = ahead.take()
            {
                prefetch_values(group.by_rows, v, at, n);
            }
            let (v, at) = match chunk.place {
                Some(((_, v), at)) => (v, at),
                None => {
                    gather_values(group, keys.start + chunk.off, chunk.len, &mut scratch.1);
                    ((&scratch.1).into(), 0)
                }
            };
            let v = v.as_view::<Dyn, Dyn, U1, Dyn>();
            let at = (at, chunk.off, chunk.len);
            if group.by_rows {
                value_rows::<T, FMA>((&v, at, len), ahead, &s, &active, rows, &mut state);
            } else {
                value_lanes::<T, FMA>(&v, at, len, &s, &active, rows, &mut state);
            }
            if group.scan {
                let (at, _, n) = at;
                bits = bits.max(if group.by_rows {
                    // Column `at + j` of the transposed values is value row `j`.
                    scan(&v, at..at + n, 0, d_v)
                } else {
                    scan(&v, 0..d_v, at, n)
                });
            }
        }
        bits
    };
    state.scanned = (k_bits, v_bits);
    state.fold_lanes();
    state
}

/// Rows a group may have for its parts to be read as streams ([`streamed`]): their
/// scores, `rows × PART_KEYS`, then stay in the level-1 or level-2 cache while the values
/// are read (4 × 2048 × 4 bytes = 32 KiB in f32). Groups with more rows compute more per
/// byte read and read chunk by chunk, each chunk's weights in the level-1 cache.
const STREAM_ROWS: usize = 4;

/// The part's keys and values as one block read in place, K and V stored by columns, and
/// the row of the part's first key — when the group is read as streams (see [`part`]).
fn streamed<'a, T: Element>(
    group: &Group<'_, 'a, T>,
    keys: std::ops::Range<usize>,
) -> Option<Next<'a, T>> {
    if group.rows() > STREAM_ROWS || group.by_rows {
        return None;
    }
    let mut first = 0;
    for &(k, v) in &group.segments {
        if keys.start < first + k.nrows() {
            return in_place(group, (k, v), keys.start - first, keys.len());
        }
        first += k.nrows();
    }
    None
}

/// A chunk of a part: its first key counted from the part's start, its length (at most
/// [`CHUNK`]; chunks start every [`CHUNK`] keys from the part's start, whatever the
/// segments), and its keys and values as [`in_place`] gives them, or `None` when they
/// must be copied first ([`gather_keys`], [`gather_values`]): pages smaller than a chunk,
/// a row-strided view.
#[derive(Clone, Copy)]
struct Chunk<'a, T: Element> {
    off: usize,
    len: usize,
    place: Option<Next<'a, T>>,
}

/// The chunks of the part `keys`.
fn chunks<'a, T: Element>(
    group: &Group<'_, 'a, T>,
    keys: std::ops::Range<usize>,
) -> Vec<Chunk<'a, T>> {
    let mut out = Vec::with_capacity(keys.len().div_ceil(CHUNK));
    let (mut seg, mut first) = (0, 0);
    for start in keys.clone().step_by(CHUNK) {
        let len = CHUNK.min(keys.end - start);
        while first + group.segments[seg].0.nrows() <= start {
            first += group.segments[seg].0.nrows();
            seg += 1;
        }
        let place = in_place(group, group.segments[seg], start - first, len);
        out.push(Chunk {
            off: start - keys.start,
            len,
            place,
        });
    }
    out
}

/// Chunk `i + 1`, if it is read in place, and its length: what to prefetch while chunk
/// `i` is computed.
fn next_in_place<'a, T: Element>(
    chunks: &[Chunk<'a, T>],
    i: usize,
) -> Option<(Next<'a, T>, usize)> {
    let next = chunks.get(i + 1)?;
    Some((next.place?, next.len))
}

/// The chunk of `len` keys at row `at` of segment `(k, v)` as the kernel reads it in place
/// (V transposed when the group reads values by rows), or `None` when it must be copied
/// first: it runs past the segment, or K's or V's layout does not have the contiguous
/// runs the kernel reads.
fn in_place<'a, T: Element>(
    group: &Group<'_, 'a, T>,
    (k, v): (MatRef<'a, T>, MatRef<'a, T>),
    at: usize,
    len: usize,
) -> Option<Next<'a, T>> {
    let contiguous = k.strides().0 == 1 && (group.by_rows || v.strides().0 == 1);
    (at + len <= k.nrows() && contiguous).then(|| {
        let v = if group.by_rows { transposed(v) } else { v };
        ((k, v), at)
    })
}

/// Keys and values as [`in_place`] gives them, and the row of the first key.
type Next<'a, T> = ((MatRef<'a, T>, MatRef<'a, T>), usize);

/// The rows of the group's segments `start .. start + len`, each given to `copy` with its
/// segment and its row in the copy.
fn rows_of<'a, T: Element>(
    group: &Group<'_, 'a, T>,
    start: usize,
    len: usize,
) -> impl Iterator<Item = ((MatRef<'a, T>, MatRef<'a, T>), usize, usize)> {
    group
        .segments
        .iter()
        .scan(0, |first, &seg| {
            let s0 = *first;
            *first += seg.0.nrows();
            Some((seg, s0))
        })
        .flat_map(move |(seg, s0)| {
            let (lo, hi) = (s0.max(start), (s0 + seg.0.nrows()).min(start + len));
            (lo..hi).map(move |j| (seg, j - s0, j - start))
        })
}

/// Keys `start .. start + len` of the group's segments copied into `k` (resized to `len`
/// rows).
fn gather_keys<T: Element>(group: &Group<'_, '_, T>, start: usize, len: usize, k: &mut DMatrix<T>) {
    if k.nrows() != len {
        *k = DMatrix::zeros(len, k.ncols());
    }
    for ((ks, _), row, j) in rows_of(group, start, len) {
        for c in 0..k.ncols() {
            k[(j, c)] = ks[(row, c)];
        }
    }
}

/// Values `start .. start + len` of the group's segments copied into `v`: `len` rows, or
/// transposed to `len` columns when the group reads values by rows.
fn gather_values<T: Element>(
    group: &Group<'_, '_, T>,
    start: usize,
    len: usize,
    v: &mut DMatrix<T>,
) {
    let d_v = group.specs[0].d_v;
    let shape = if group.by_rows {
        (d_v, len)
    } else {
        (len, d_v)
    };
    if v.shape() != shape {
        *v = DMatrix::zeros(shape.0, shape.1);
    }
    for ((_, vs), row, j) in rows_of(group, start, len) {
        for c in 0..d_v {
            let at = if group.by_rows { (c, j) } else { (j, c) };
            v[at] = vs[(row, c)];
        }
    }
}

/// A view with contiguous columns (K, V, or V transposed).
type ColumnView<'r, 'a, T> =
    &'r nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'a, T, Dyn, Dyn, U1, Dyn>>;

/// Where a chunk is read and where its weights are: its row in K or V (`at`), its first
/// key counted from the part's start (the column of `s`), and its length.
type ChunkAt = (usize, usize, usize);

/// Prefetches the cache lines of `run`.
#[inline(always)]
fn prefetch_run<T>(run: &[T]) {
    for x in run.iter().step_by(LINE / size_of::<T>()) {
        prefetch(x);
    }
}

/// Requests the cache lines of `run`, a piece of the next chunk: unrolled for a whole
/// chunk's column (4 lines in f32, 8 in f64).
#[inline(always)]
fn prefetch_next<T>(run: &[T]) {
    let per = LINE / size_of::<T>();
    match run.first_chunk::<CHUNK>() {
        Some(full) => {
            for i in 0..CHUNK.div_ceil(per) {
                prefetch(&full[i * per]);
            }
        }
        None => prefetch_run(run),
    }
}

/// The next chunk, read in place, whose cache lines the loops over the current chunk
/// request as they go under [`DecodePrefetch::AsRead`] (the CPU's tuning, `cpu.rs`): `(view, at, n)`, its `n` keys at row `at` of K, or at column `at`
/// of V transposed. The score loop, reading column `p` of this chunk's keys, requests
/// column `p` of the next chunk's; the weighted sums by rows, reading value row `j` of
/// this chunk, request row `j` of the next: each request one chunk ahead of its use. A
/// chunk of the KV cache is one page's block of one head (32 KiB for 64 keys of width 128
/// in f32), a run the hardware prefetchers must pick up anew at every page; requested
/// this way, the next page's lines arrive while this one is computed (Zen 5, 32 query
/// heads over 8 KV heads, 32768 cached tokens, 2 threads: 1.64–1.76 → 1.43–1.52 times
/// the memory floor, with the loops' loads hoisted, see [`block_scores`]). Requesting a
/// whole chunk at once at its start filled the core's miss buffers and stalled the loop
/// behind them (no faster than no requests at all); requesting two chunks ahead, or one
/// line of each column's four, was no faster or slower. On the Xeon, requests spread
/// over the score loop measured slower than at the start (before the loads were
/// hoisted), so CPUs other than Zen 5 keep [`DecodePrefetch::AtStart`].
type Ahead<'r, 'a, T> = Option<(ColumnView<'r, 'a, T>, usize, usize)>;

/// Requests every cache line of a chunk's `n` keys (row `at` of `k`) at once, to arrive
/// while the chunk before it is computed ([`DecodePrefetch::AtStart`]).
#[inline(always)]
fn prefetch_keys<T: Element>(k: ColumnView<'_, '_, T>, at: usize, n: usize) {
    for p in 0..k.ncols() {
        prefetch_run(&k.column(p).as_slice()[at..at + n]);
    }
}

/// As [`prefetch_keys`], a chunk's values (`v` as [`in_place`] gives them): for values
/// stored by columns (read chunk by chunk, [`value_lanes`]) and under
/// [`DecodePrefetch::AtStart`].
#[inline(always)]
fn prefetch_values<T: Element>(by_rows: bool, v: ColumnView<'_, '_, T>, at: usize, n: usize) {
    if by_rows {
        for j in at..at + n {
            prefetch_run(v.column(j).as_slice());
        }
    } else {
        for c in 0..v.ncols() {
            prefetch_run(&v.column(c).as_slice()[at..at + n]);
        }
    }
}

/// `s[r][j] = Σ_p q_rp·k_jp` for the part's `len` keys (rows `at .. at + len` of `k`) and
/// every row, read as streams: four columns of K at a time from start to end, each row's
/// sums updated [`LANES`] keys at a time. Each sum takes the same operations in the same
/// order as in [`block_scores`] (`p` ascending from 0). With `SCAN`, returns the largest
/// [`Element::abs_bits_native`] of the keys read (else 0).
#[inline(always)]
fn stream_scores<T: Element, const FMA: bool, const SCAN: bool>(
    group: &Group<'_, '_, T>,
    k: ColumnView<'_, '_, T>,
    at: usize,
    len: usize,
    s: &mut [T],
) -> T::Bits {
    let (rows, d_k) = (group.rows(), k.ncols());
    let mut bits = [T::Bits::default(); LANES];
    let mut rest = T::Bits::default();
    let mut p = 0;
    while p + 4 <= d_k {
        let columns: [_; 4] = std::array::from_fn(|i| k.column(p + i));
        let runs: [&[T]; 4] = std::array::from_fn(|i| &columns[i].as_slice()[at..at + len]);
        // Keys from `head` in steps of LANES, the first column's loads whole cache lines
        // (`body`); the others one key at a time (every score is its own sum: how the keys
        // are grouped changes no bit). A load across two lines costs two: on an Ice Lake
        // Xeon the loop took 1.6–2 times as long on a `DMatrix` (its data 16 bytes past a
        // line).
        let head = runs[0].as_ptr().align_offset(LINE).min(len);
        let body: [&[T]; 4] = runs.map(|run| &run[head..]);
        let full = (len - head) / LANES * LANES;
        // Each row's sums of 16 keys: loaded whole and stored whole, so that no store
        // comes between loads (which the compiler could not reorder: it cannot tell `s`
        // from K).
        if rows == 1 {
            // One query (a decoding step of one head): its four values and every pointer
            // stay in registers. (The loop over rows below kept them on the stack and
            // checked bounds per row: on an Ice Lake Xeon about half of what its level-3
            // cache delivers.)
            let q: [T; 4] = group.q[p..p + 4].try_into().expect("4");
            let s = &mut s[head..len];
            for j in (0..full).step_by(LANES) {
                let kj = lanes_of::<T, SCAN>(&body, j, &mut bits);
                let sr = (&mut s[j..j + LANES]).try_into().expect("16");
                madd_columns::<T, FMA>(q, kj, sr);
            }
        } else {
            for j in (0..full).step_by(LANES) {
                let kj = lanes_of::<T, SCAN>(&body, j, &mut bits);
                for r in 0..rows {
                    // The query's values as locals: the stores to `s` cannot change them.
                    let q: [T; 4] = group.q[r * d_k + p..][..4].try_into().expect("4");
                    let sr = (&mut s[r * len + head + j..][..LANES])
                        .try_into()
                        .expect("16");
                    madd_columns::<T, FMA>(q, kj, sr);
                }
            }
        }
        let tail = len - head - full;
        if len < LANES {
            for j in 0..len {
                let at = (p, d_k);
                rest = rest.max(key_scores::<T, FMA, SCAN>(group, &runs, at, j, len, s));
            }
        } else {
            // The keys before `head` and after the last whole step: one step of LANES keys
            // each (the first LANES keys, the last LANES), only those lanes kept.
            let both = (p, d_k, len);
            if head > 0 {
                edge_step::<T, FMA, SCAN>(group, &runs, both, (0, 0..head), s, &mut bits);
            }
            if tail > 0 {
                let keep = LANES - tail..LANES;
                edge_step::<T, FMA, SCAN>(group, &runs, both, (len - LANES, keep), s, &mut bits);
            }
        }
        p += 4;
    }
    for p in p..d_k {
        let column = k.column(p);
        let run = &column.as_slice()[at..at + len];
        if SCAN {
            rest = run.iter().fold(rest, |m, x| m.max(x.abs_bits_native()));
        }
        for r in 0..rows {
            let q = group.q[r * d_k + p];
            for (x, &kj) in s[r * len..][..len].iter_mut().zip(run) {
                *x = madd::<T, FMA>(q, kj, *x);
            }
        }
    }
    max_of(&bits, rest)
}

/// Key `j`'s step of [`stream_scores`] for columns `p .. p + 4` of `d_k` (`runs`), one
/// key at a time: `s[r][j] += q_ri·k_ji` for each row `r` and column `i` in order; with
/// `SCAN`, returns the largest [`Element::abs_bits_native`] of the four values (else 0).
#[inline(always)]
fn key_scores<T: Element, const FMA: bool, const SCAN: bool>(
    group: &Group<'_, '_, T>,
    runs: &[&[T]; 4],
    (p, d_k): (usize, usize),
    j: usize,
    len: usize,
    s: &mut [T],
) -> T::Bits {
    for r in 0..group.rows() {
        let q = &group.q[r * d_k + p..][..4];
        let x = &mut s[r * len + j];
        for (i, run) in runs.iter().enumerate() {
            *x = madd::<T, FMA>(q[i], run[j], *x);
        }
    }
    match SCAN {
        true => runs
            .iter()
            .fold(T::Bits::default(), |m, run| m.max(run[j].abs_bits_native())),
        false => T::Bits::default(),
    }
}

/// The step of [`stream_scores`] at keys `j .. j + LANES` for columns `p .. p + 4` of
/// `d_k` (`runs`), its sums written only for the lanes `keep` (the keys `j + keep`); the
/// keys scanned into `bits` with `SCAN` (all of them: they are keys of the part).
#[inline(always)]
fn edge_step<T: Element, const FMA: bool, const SCAN: bool>(
    group: &Group<'_, '_, T>,
    runs: &[&[T]; 4],
    (p, d_k, len): (usize, usize, usize),
    (j, keep): (usize, std::ops::Range<usize>),
    s: &mut [T],
    bits: &mut [T::Bits; LANES],
) {
    let kj = lanes_of::<T, SCAN>(runs, j, bits);
    for r in 0..group.rows() {
        let q: [T; 4] = group.q[r * d_k + p..][..4].try_into().expect("4");
        let at = r * len + j;
        let mut sums: [T; LANES] = s[at..at + LANES].try_into().expect("16");
        madd_columns::<T, FMA>(q, kj, &mut sums);
        s[at + keep.start..at + keep.end].copy_from_slice(&sums[keep.clone()]);
    }
}

/// Keys `j .. j + LANES` of each of four runs; with `SCAN`, folded into `bits` as well.
#[inline(always)]
fn lanes_of<'a, T: Element, const SCAN: bool>(
    runs: &[&'a [T]; 4],
    j: usize,
    bits: &mut [T::Bits; LANES],
) -> [&'a [T; LANES]; 4] {
    let kj = runs.map(|run| run[j..j + LANES].try_into().expect("16"));
    if SCAN {
        *bits = max_bits(
            max_bits(max_bits(max_bits(*bits, kj[0]), kj[1]), kj[2]),
            kj[3],
        );
    }
    kj
}

/// `x_t += q_i·k_it` for the four columns `i` in order, lane by lane: one step of
/// [`stream_scores`].
#[inline(always)]
fn madd_columns<T: Element, const FMA: bool>(
    q: [T; 4],
    k: [&[T; LANES]; 4],
    sums: &mut [T; LANES],
) {
    let mut x = *sums;
    for t in 0..LANES {
        x[t] = madd::<T, FMA>(q[0], k[0][t], x[t]);
        x[t] = madd::<T, FMA>(q[1], k[1][t], x[t]);
        x[t] = madd::<T, FMA>(q[2], k[2][t], x[t]);
        x[t] = madd::<T, FMA>(q[3], k[3][t], x[t]);
    }
    *sums = x;
}

/// `s[r][off + j] = Σ_p q_rp·k_jp` for a chunk's keys (`(at, off, n)`: rows `at .. at + n`
/// of `k`) and every row (`s` row `r` at `r·stride`): for a full chunk, [`ROW_BLOCK`] rows
/// at a time with their `ROW_BLOCK × CHUNK` sums in registers, each column of K loaded once
/// per block. With [`Group::scan`], returns the largest [`Element::abs_bits_native`] of
/// the chunk's keys (else 0).
#[inline(always)]
fn chunk_scores<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    k: ColumnView<'_, '_, T>,
    (at, off, n): ChunkAt,
    stride: usize,
    ahead: Ahead<'_, '_, T>,
    s: &mut [T],
) -> T::Bits {
    let (rows, d_k) = (group.rows(), k.ncols());
    let mut r = 0;
    let mut scanned = None;
    let out = (at, off, stride);
    if n == CHUNK {
        // The first block also scans K when the group scans (K is the same for every
        // block).
        // The first block also requests the next chunk's keys.
        while r + ROW_BLOCK <= rows {
            let ahead = if r == 0 { ahead } else { None };
            if group.scan && r == 0 {
                scanned = Some(block_scores::<T, FMA, ROW_BLOCK, true>(
                    group, k, out, r, ahead, s,
                ));
            } else {
                block_scores::<T, FMA, ROW_BLOCK, false>(group, k, out, r, ahead, s);
            }
            r += ROW_BLOCK;
        }
        // The remaining rows one at a time, their 64 sums in registers as well.
        while r < rows {
            let ahead = if r == 0 { ahead } else { None };
            if group.scan && r == 0 {
                scanned = Some(block_scores::<T, FMA, 1, true>(group, k, out, r, ahead, s));
            } else {
                block_scores::<T, FMA, 1, false>(group, k, out, r, ahead, s);
            }
            r += 1;
        }
    }
    for rr in r..rows {
        s[rr * stride + off..][..n].fill(T::zero());
    }
    if r < rows {
        for p in 0..d_k {
            let column = k.column(p);
            let kc = &column.as_slice()[at..at + n];
            for rr in r..rows {
                let q = group.q[rr * d_k + p];
                for (x, &kj) in s[rr * stride + off..][..n].iter_mut().zip(kc) {
                    *x = madd::<T, FMA>(q, kj, *x);
                }
            }
        }
    }
    match scanned {
        Some(bits) => bits,
        None if group.scan => scan(k, 0..d_k, at, n),
        None => T::Bits::default(),
    }
}

/// The scores of rows `r .. r + B` for a full chunk (row `at` of `k`, column `off` of `s`,
/// whose rows are `stride` apart), their `B × CHUNK` sums in registers, each column of K
/// loaded once for the `B` rows; with `SCAN`, the largest [`Element::abs_bits_native`] of
/// the chunk's keys as well (else 0).
#[inline(always)]
fn block_scores<T: Element, const FMA: bool, const B: usize, const SCAN: bool>(
    group: &Group<'_, '_, T>,
    k: ColumnView<'_, '_, T>,
    (at, off, stride): (usize, usize, usize),
    r: usize,
    ahead: Ahead<'_, '_, T>,
    s: &mut [T],
) -> T::Bits {
    let d_k = k.ncols();
    // The rows' queries as slices of exactly `d_k`, so that indexing them by `p` needs no
    // check in the loop.
    let q: [&[T]; B] = std::array::from_fn(|b| &group.q[(r + b) * d_k..][..d_k]);
    let mut acc = [[T::zero(); CHUNK]; B];
    let mut bits = [T::Bits::default(); CHUNK];
    for (p, column) in k.column_iter().enumerate() {
        if let Some((next, at, n)) = ahead {
            prefetch_next(&next.column(p).as_slice()[at..at + n]);
        }
        // Copied to a local: loaded once for the `B` rows (as a reference, each row's
        // multiply-adds loaded it again).
        let kc: [T; CHUNK] = *column.as_slice()[at..].first_chunk().expect("a full chunk");
        for (acc_b, q_b) in acc.iter_mut().zip(q) {
            let q = q_b[p];
            for j in 0..CHUNK {
                acc_b[j] = madd::<T, FMA>(q, kc[j], acc_b[j]);
            }
        }
        if SCAN {
            for j in 0..CHUNK {
                bits[j] = bits[j].max(kc[j].abs_bits_native());
            }
        }
    }
    for (b, acc_b) in acc.iter().enumerate() {
        s[(r + b) * stride + off..][..CHUNK].copy_from_slice(acc_b);
    }
    max_of(&bits, T::Bits::default())
}

/// The largest [`Element::abs_bits_native`] of rows `at .. at + len` of columns
/// `columns` of `m`: for a full chunk in [`CHUNK`] lanes (as [`block_scores`] sums, so
/// that the lanes stay in registers and each vector costs a mask and an integer max),
/// else column by column, its whole chunks by [`chunks_abs_bits`] and the remainder
/// folded one by one.
#[inline(always)]
fn scan<T: Element>(
    m: ColumnView<'_, '_, T>,
    columns: std::ops::Range<usize>,
    at: usize,
    len: usize,
) -> T::Bits {
    if len == CHUNK {
        // Four vectors of lanes, passed by value so that they stay in registers.
        let mut lanes = [[T::Bits::default(); LANES]; CHUNK / LANES];
        for c in columns {
            let column = m.column(c);
            let run = &column.as_slice()[at..at + CHUNK];
            for (b, lane) in lanes.iter_mut().enumerate() {
                let piece: &[T; LANES] = run[b * LANES..][..LANES].try_into().expect("16");
                *lane = max_bits(*lane, piece);
            }
        }
        return lanes
            .iter()
            .fold(T::Bits::default(), |m, lane| max_of(lane, m));
    }
    let mut bits = T::Bits::default();
    for c in columns {
        let column = m.column(c);
        let run = &column.as_slice()[at..at + len];
        let full = len / CHUNK * CHUNK;
        bits = run[full..]
            .iter()
            .fold(bits.max(chunks_abs_bits(&run[..full])), |r, x| {
                r.max(x.abs_bits_native())
            });
    }
    bits
}

/// `lanes` raised to the `abs_bits_native` of `piece`, lane by lane (by value, so that
/// the lanes stay in registers from call to call).
#[inline(always)]
fn max_bits<T: Element, const N: usize>(mut lanes: [T::Bits; N], piece: &[T; N]) -> [T::Bits; N] {
    for t in 0..N {
        lanes[t] = lanes[t].max(piece[t].abs_bits_native());
    }
    lanes
}

/// The largest of `lanes` and `start`, by constant indices (a consuming iterator would
/// index the array at run time and keep it in memory instead of registers).
#[inline(always)]
fn max_of<B: Ord + Copy, const N: usize>(lanes: &[B; N], start: B) -> B {
    let mut m = start;
    for lane in lanes {
        m = m.max(*lane);
    }
    m
}

/// Per row, the part's score modifiers and its softmax: `s` (`rows × len`) becomes
/// `p = exp(s − m)` with `m` the row's largest score, `m` and `l = Σ_j p_j` are set (`l`
/// summed as each value column stored by columns is: chunk by chunk in [`LANES`] lanes in
/// T, the lanes added into f64 lanes, those summed pairwise — so that values that are all
/// equal give exactly that value, and the lse does not depend on V's layout). Returns
/// whether each row has an allowed key in the part (else its `s` still holds scores and
/// must not be used).
#[inline(always)]
fn softmax<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    start: usize,
    len: usize,
    s: &mut [T],
    state: &mut State<T>,
) -> [bool; MAX_ROWS] {
    let mut active = [false; MAX_ROWS];
    for r in 0..group.rows() {
        let spec = group.specs[r / group.n_q];
        let i = r % group.n_q;
        let sr = &mut s[r * len..(r + 1) * len];
        let (lo, hi) = spec.key_range(i);
        let (first, last) = (start as i64, (start + len) as i64 - 1);
        if last < lo || first > hi {
            continue; // outside the row's band: nothing allowed here
        }
        if spec.has_elementwise() || first < lo || last > hi {
            for (j, x) in sr.iter_mut().enumerate() {
                *x = spec.modify(i, start + j, *x * spec.scale);
            }
        } else {
            for x in sr.iter_mut() {
                *x *= spec.scale;
            }
        }
        let m = lane_max(sr);
        if m == T::NEG_INFINITY {
            continue;
        }
        for x in sr.iter_mut() {
            *x = (*x - m).exp_nonpos::<FMA>();
        }
        let mut l = [0.0f64; LANES];
        for pc in sr.chunks(CHUNK) {
            add_lanes(
                &mut l,
                lane_partials::<T, FMA>(pc, &[T::one(); CHUNK][..pc.len()]),
            );
        }
        (state.m[r], state.l[r]) = (m, pairwise(l));
        active[r] = true;
    }
    active
}

/// `acc_rc = Σ_j p_rj·v_jc` for the active rows and every value column stored by columns,
/// the part read as streams (`v` rows `at .. at + len`): each column once, while it is in
/// the level-1 cache for every row, chunk by chunk in [`LANES`] lanes in T, the lanes
/// added into f64 lanes, summed pairwise — as [`value_lanes`] then [`State::fold_lanes`]
/// sum chunk by chunk. With [`Group::scan`], returns the largest
/// [`Element::abs_bits_native`] of the values (else 0).
#[inline(always)]
fn stream_values<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    v: ColumnView<'_, '_, T>,
    at: usize,
    len: usize,
    s: &[T],
    active: &[bool; MAX_ROWS],
    state: &mut State<T>,
) -> T::Bits {
    let d_v = v.ncols();
    let mut bits = T::Bits::default();
    let mut rows = (0..group.rows()).filter(|&r| active[r]);
    let first = rows.next();
    // The f64 lanes in memory, not in locals: the compiler then adds them as vectors
    // (as locals, it split them into scalars and added two at a time).
    let mut lanes = Box::new([0.0f64; LANES]);
    let a = &mut *lanes;
    for c in 0..d_v {
        let column = v.column(c);
        let run = &column.as_slice()[at..at + len];
        // The column is scanned while the first row's sum reads it from memory (a pass
        // of its own would wait for memory, then compute: twice the time).
        match first {
            Some(r) if group.scan => {
                let (sum, b) = column_sum::<T, FMA, true>(&s[r * len..(r + 1) * len], run, a);
                (state.acc[r * d_v + c], bits) = (sum, bits.max(b));
            }
            Some(r) => {
                state.acc[r * d_v + c] =
                    column_sum::<T, FMA, false>(&s[r * len..(r + 1) * len], run, a).0;
            }
            None if group.scan => bits = bits.max(scan(v, c..c + 1, at, len)),
            None => {}
        }
        for r in rows.clone() {
            state.acc[r * d_v + c] =
                column_sum::<T, FMA, false>(&s[r * len..(r + 1) * len], run, a).0;
        }
    }
    bits
}

/// `Σ_j p_j·x_j` over a part's keys as [`stream_values`] sums it (chunk by chunk in
/// [`LANES`] lanes in T, added into f64 lanes, those summed pairwise); with `SCAN`, the
/// largest [`Element::abs_bits_native`] of `x` as well (else 0).
#[inline(always)]
fn column_sum<T: Element, const FMA: bool, const SCAN: bool>(
    p: &[T],
    x: &[T],
    a: &mut [f64; LANES],
) -> (f64, T::Bits) {
    // `add_lanes` by value. (`add_lanes` itself stays by reference: made by value at all
    // its call sites, one query against 4096 keys, f32, took 270–340 µs on one thread
    // instead of 177–225.)
    #[inline(always)]
    fn step<T: Element>(mut a: [f64; LANES], part: [T; LANES]) -> [f64; LANES] {
        for t in 0..LANES {
            a[t] += part[t].to_f64();
        }
        a
    }
    let full = p.len() / CHUNK * CHUNK;
    let mut lanes = [0.0; LANES];
    for (pc, xc) in p[..full]
        .chunks_exact(CHUNK)
        .zip(x[..full].chunks_exact(CHUNK))
    {
        lanes = step(lanes, lane_partials::<T, FMA>(pc, xc));
    }
    *a = lanes;
    // The scan after the sums, in a loop of its own (the run is then in cache), and the
    // f64 lanes passed by value from chunk to chunk: each loop is then vectorised on its
    // own. With the scan inside the sums' loop and the lanes added in memory, the
    // compiler built the scan's lanes element by element and moved the sums to 128-bit
    // registers, or kept the lanes in memory (a store-to-load chain per chunk): f32, one
    // query, 4096 keys, d 128, one thread, 165–450 µs a call depending on the build's
    // codegen units, 140–150 µs now (`docs/PERFORMANCE.md`).
    let bits = if SCAN {
        chunks_abs_bits(&x[..full])
    } else {
        T::Bits::default()
    };
    let mut rest = T::Bits::default();
    if full < p.len() {
        if SCAN {
            rest = x[full..]
                .iter()
                .fold(rest, |m, v| m.max(v.abs_bits_native()));
        }
        add_lanes(a, lane_partials::<T, FMA>(&p[full..], &x[full..]));
    }
    (pairwise(*a), bits.max(rest))
}

/// The largest [`Element::abs_bits_native`] of `x` (whole chunks), in [`CHUNK`] lanes
/// that stay in registers (passed by value from chunk to chunk).
#[inline(always)]
fn chunks_abs_bits<T: Element>(x: &[T]) -> T::Bits {
    let mut bits = [T::Bits::default(); CHUNK];
    for xc in x.chunks_exact(CHUNK) {
        bits = max_bits(bits, xc.try_into().expect("a full chunk"));
    }
    max_of(&bits, T::Bits::default())
}

/// A chunk's `Σ_j p_rj·v_jc` for the active rows and every value column stored by
/// columns (`(at, off, n)`: rows `at .. at + n` of `v`, columns `off ..` of `s`, whose
/// rows are `stride` apart), each column read once for all rows: in [`LANES`] lanes in T,
/// added lane by lane into the f64 lanes of [`State`] (no horizontal sums until the part
/// ends).
#[inline(always)]
fn value_lanes<T: Element, const FMA: bool>(
    v: ColumnView<'_, '_, T>,
    (at, off, n): ChunkAt,
    stride: usize,
    s: &[T],
    active: &[bool; MAX_ROWS],
    rows: usize,
    state: &mut State<T>,
) {
    let d_v = v.ncols();
    for c in 0..d_v {
        let column = v.column(c);
        let vc = &column.as_slice()[at..at + n];
        for r in (0..rows).filter(|&r| active[r]) {
            let part = lane_partials::<T, FMA>(&s[r * stride + off..][..n], vc);
            let a = &mut state.lanes[(r * d_v + c) * LANES..][..LANES];
            for t in 0..LANES {
                a[t] += part[t].to_f64();
            }
        }
    }
}

/// `acc_r ← acc_r + Σ_j p_rj·v_j` over a chunk's keys for the active rows, values stored
/// by rows (`vt`: column `at + j` is value row `j`, contiguous; the weights at column
/// `off` of `s`, whose rows are `stride` apart): each sum runs over the chunk's keys in T
/// (at most [`CHUNK`] roundings, as in one tile of the block kernel), vectorised over
/// columns, [`ROW_BLOCK`] rows × a tile of columns in registers, each value row loaded
/// once per block; then added in f64. The weights of inactive rows must be 0.
#[inline(always)]
fn value_rows<T: Element, const FMA: bool>(
    value: Values<'_, '_, T>,
    ahead: Ahead<'_, '_, T>,
    s: &[T],
    active: &[bool; MAX_ROWS],
    rows: usize,
    state: &mut State<T>,
) {
    // The first block also requests the next chunk's values.
    let mut r = 0;
    while r + ROW_BLOCK <= rows {
        let ahead = if r == 0 { ahead } else { None };
        value_block::<T, FMA, ROW_BLOCK>(value, r, ahead, s, active, state);
        r += ROW_BLOCK;
    }
    while r < rows {
        let ahead = if r == 0 { ahead } else { None };
        value_block::<T, FMA, 1>(value, r, ahead, s, active, state);
        r += 1;
    }
}

/// The transposed values of [`value_rows`] (column `at + j` is value row `j`), where the
/// chunk is, and the stride of the weights' rows.
type Values<'r, 'a, T> = (ColumnView<'r, 'a, T>, ChunkAt, usize);

/// Rows `r .. r + B` of [`value_rows`], the columns in tiles of 64 (f32) or 32 (f64) —
/// for `B` = 4, 256 bytes per row: sixteen 512-bit registers — then 8, then 1.
#[inline(always)]
fn value_block<T: Element, const FMA: bool, const B: usize>(
    value: Values<'_, '_, T>,
    r: usize,
    ahead: Ahead<'_, '_, T>,
    s: &[T],
    active: &[bool; MAX_ROWS],
    state: &mut State<T>,
) {
    let d_v = state.acc.len() / state.m.len();
    let mut c = 0;
    if size_of::<T>() == 4 {
        while c + 64 <= d_v {
            value_tile::<T, FMA, B, 64>(value, (r, c), ahead, s, active, state);
            c += 64;
        }
    } else {
        while c + 32 <= d_v {
            value_tile::<T, FMA, B, 32>(value, (r, c), ahead, s, active, state);
            c += 32;
        }
    }
    while c + 8 <= d_v {
        value_tile::<T, FMA, B, 8>(value, (r, c), ahead, s, active, state);
        c += 8;
    }
    while c < d_v {
        value_tile::<T, FMA, B, 1>(value, (r, c), ahead, s, active, state);
        c += 1;
    }
}

/// Rows `r .. r + B`, columns `c .. c + C` of [`value_rows`], the `B × C` sums in
/// registers.
#[inline(always)]
fn value_tile<T: Element, const FMA: bool, const B: usize, const C: usize>(
    (vt, (at, off, n), stride): Values<'_, '_, T>,
    (r, c): (usize, usize),
    ahead: Ahead<'_, '_, T>,
    s: &[T],
    active: &[bool; MAX_ROWS],
    state: &mut State<T>,
) {
    let d_v = state.acc.len() / state.m.len();
    // The rows' weights as slices of exactly `n`, so that indexing them by `j` needs no
    // check in the loop.
    let w: [&[T]; B] = std::array::from_fn(|b| &s[(r + b) * stride + off..][..n]);
    let mut acc = [[T::zero(); C]; B];
    for (j, column) in vt.columns_range(at..at + n).column_iter().enumerate() {
        if let Some((next, at, n)) = ahead
            && j < n
        {
            let next = next.column(at + j);
            let run: &[T; C] = next.as_slice()[c..].first_chunk().expect("a full tile");
            for i in (0..C).step_by(LINE / size_of::<T>()) {
                prefetch(&run[i]);
            }
        }
        // Copied to a local: loaded once for the `B` rows.
        let v: [T; C] = *column.as_slice()[c..].first_chunk().expect("a full tile");
        for (acc_b, w_b) in acc.iter_mut().zip(w) {
            let p = w_b[j];
            for t in 0..C {
                acc_b[t] = madd::<T, FMA>(p, v[t], acc_b[t]);
            }
        }
    }
    for (b, acc_b) in acc.iter().enumerate() {
        if active[r + b] {
            let out = &mut state.acc[(r + b) * d_v + c..][..C];
            for (o, x) in out.iter_mut().zip(acc_b) {
                *o += x.to_f64();
            }
        }
    }
}

/// Rows of a group handled together by the register-blocked loops.
const ROW_BLOCK: usize = 4;
/// The most rows a group has: 8 queries × 8 query heads per key/value head (larger
/// groups are split by the caller).
pub(crate) const MAX_ROWS: usize = 64;

/// `a += part` lane by lane, in f64.
#[inline(always)]
fn add_lanes<T: Element>(a: &mut [f64; LANES], part: [T; LANES]) {
    for t in 0..LANES {
        a[t] += part[t].to_f64();
    }
}

/// The sum of [`LANES`] lanes, pairwise.
#[inline(always)]
fn pairwise(mut x: [f64; LANES]) -> f64 {
    let mut width = LANES / 2;
    while width > 0 {
        for t in 0..width {
            x[t] += x[t + width];
        }
        width /= 2;
    }
    x[0]
}

/// `Σ_j p_j·x_j` over at most [`CHUNK`] keys in [`LANES`] partial sums in T (key `j` in
/// lane `j mod LANES`).
#[inline(always)]
fn lane_partials<T: Element, const FMA: bool>(p: &[T], x: &[T]) -> [T; LANES] {
    let mut lanes = [T::zero(); LANES];
    if let (Ok(p), Ok(x)) = (<&[T; CHUNK]>::try_from(p), <&[T; CHUNK]>::try_from(x)) {
        // A full chunk: fixed trip counts, the lanes in one register.
        for i in 0..CHUNK / LANES {
            for t in 0..LANES {
                lanes[t] = madd::<T, FMA>(p[i * LANES + t], x[i * LANES + t], lanes[t]);
            }
        }
        return lanes;
    }
    let full = p.len() / LANES * LANES;
    for (pc, xc) in p[..full]
        .chunks_exact(LANES)
        .zip(x[..full].chunks_exact(LANES))
    {
        for t in 0..LANES {
            lanes[t] = madd::<T, FMA>(pc[t], xc[t], lanes[t]);
        }
    }
    for (t, (&pj, &xj)) in p[full..].iter().zip(&x[full..]).enumerate() {
        lanes[t] = madd::<T, FMA>(pj, xj, lanes[t]);
    }
    lanes
}

/// The largest of `x` (−∞ if empty), in [`LANES`] lanes so that it vectorises (the
/// scores hold no NaN).
#[inline(always)]
fn lane_max<T: Element>(x: &[T]) -> T {
    let mut lanes = [T::NEG_INFINITY; LANES];
    let full = x.len() / LANES * LANES;
    for c in x[..full].chunks_exact(LANES) {
        for t in 0..LANES {
            lanes[t] = if c[t] > lanes[t] { c[t] } else { lanes[t] };
        }
    }
    for (t, &xj) in x[full..].iter().enumerate() {
        lanes[t] = if xj > lanes[t] { xj } else { lanes[t] };
    }
    lanes
        .iter()
        .fold(T::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// The parts of `n_kv` keys: `⌈n_kv / PART_KEYS⌉` ranges (depends on nothing else).
pub(crate) fn parts(n_kv: usize) -> Vec<std::ops::Range<usize>> {
    (0..n_kv.div_ceil(PART_KEYS))
        .map(|p| p * PART_KEYS..((p + 1) * PART_KEYS).min(n_kv))
        .collect()
}

/// Merges the parts' states in order and writes every row's output and log-sum-exp:
/// `outs[h]` (n_q × d_v) and `lses[h]` for head `h` of the group.
pub(crate) fn finish<T: Element>(
    group: &Group<'_, '_, T>,
    states: Vec<State<T>>,
    outs: &mut [&mut MatMut<'_, T>],
    lses: &mut [Option<&mut [T]>],
) {
    let d_v = group.specs[0].d_v;
    let mut states = states.into_iter();
    let mut total = states
        .next()
        .unwrap_or_else(|| State::new(group.rows(), d_v, false));
    for s in states {
        total.merge(&s, d_v);
    }
    for (h, spec) in group.specs.iter().enumerate() {
        for i in 0..group.n_q {
            let r = h * group.n_q + i;
            let (m, l) = (total.m[r], total.l[r]);
            if let Some(lse) = lses[h].as_deref_mut() {
                lse[i] = T::from_f64_rounded(row_lse(m.to_f64(), l));
            }
            let inv_l = 1.0 / l;
            for c in 0..d_v {
                outs[h][(i, c)] = row_output(total.acc[r * d_v + c], l, inv_l, 1.0, spec.v_max_abs);
            }
        }
    }
}

/// The group's result: parts computed by `compiled` (the path's instance of [`part`]), in
/// parallel over parts if `parallel`, merged in order.
pub(crate) fn attention<T: Element>(
    group: &Group<'_, '_, T>,
    path: crate::cpu::CpuPath,
    parallel: bool,
    outs: &mut [&mut MatMut<'_, T>],
    lses: &mut [Option<&mut [T]>],
) {
    let heads = group.specs.len();
    let per = (MAX_ROWS / group.n_q).max(1);
    if heads > per {
        // More rows than the kernel's per-row arrays hold (many query heads per key/value
        // head): sub-groups of heads, each its own pass over K and V.
        for (h0, (outs, lses)) in (0..heads)
            .step_by(per)
            .zip(outs.chunks_mut(per).zip(lses.chunks_mut(per)))
        {
            let sub = Group {
                specs: &group.specs[h0..(h0 + per).min(heads)],
                q: group.q[h0 * group.n_q * group.specs[0].d_k..]
                    [..(per.min(heads - h0)) * group.n_q * group.specs[0].d_k]
                    .to_vec(),
                n_q: group.n_q,
                segments: group.segments.clone(),
                by_rows: group.by_rows,
                scan: group.scan,
                prefetch: group.prefetch,
            };
            attention(&sub, path, parallel, outs, lses);
        }
        return;
    }
    finish(group, states(group, path, parallel), outs, lses);
}

/// The parts' states of a group of at most [`MAX_ROWS`] rows, computed by `path`'s
/// instance of [`part`], in parallel over parts if `parallel`.
pub(crate) fn states<T: Element>(
    group: &Group<'_, '_, T>,
    path: crate::cpu::CpuPath,
    parallel: bool,
) -> Vec<State<T>> {
    debug_assert!(group.rows() <= MAX_ROWS);
    let compiled = T::decode(path);
    let parts = parts(group.specs[0].n_kv);
    super::schedule::each_index(parts.len(), parallel, |p| compiled(group, parts[p].clone()))
}

/// The largest `abs_bits` of the keys and of the values the parts read (with
/// [`Group::scan`]), `INFINITY_BITS` where one was NaN/∞.
pub(crate) fn scanned_bits<T: Element>(states: &[State<T>]) -> (u64, u64) {
    let (k, v) = states
        .iter()
        .fold(Default::default(), |(k, v): (T::Bits, T::Bits), s| {
            (k.max(s.scanned.0), v.max(s.scanned.1))
        });
    (T::bits_to_u64(k), T::bits_to_u64(v))
}

/// The type of a path's compiled [`part`].
pub type PartFn<T> = for<'g, 's, 'a> fn(&'g Group<'s, 'a, T>, std::ops::Range<usize>) -> State<T>;

// Keep `ElementKernels` in scope for `T::decode` and `exp_nonpos`.
#[allow(unused_imports)]
use ElementKernels as _;
