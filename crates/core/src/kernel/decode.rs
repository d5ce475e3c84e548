//! The decoding kernel: a few queries (n_q ≤ 8 per sequence, e.g. one new token) of every
//! query head of a key/value group against many keys, in one pass over K and V.
//!
//! The `R = g·n_q` rows of a group (g query heads reading one key/value head) walk the keys
//! in chunks of [`CHUNK`]: for each chunk, all rows' scores `s_rj = Σ_p q_rp·k_jp` (column p
//! of K holds the chunk's keys contiguously, so the innermost loop runs over keys and
//! vectorises), then per row the score modifiers, the online softmax step and the
//! weighted sums of the chunk's values. K and V are read once per group whatever g is;
//! for decoding, reading them is the cost.
//!
//! ```text
//! per chunk c, row r:   m' = max(m, max_j s_rj)        α = exp(m − m')   (0 if m = −∞)
//!                       p_j = exp(s_rj − m')           l ← α·l + Σ_j p_j
//!                       acc_c' ← α·acc_c' + Σ_j p_j·v_jc'
//! ```
//! The keys are split into parts of [`PART_KEYS`] (a number that depends only on n_kv),
//! each computed on its own (in parallel when asked), and the parts' `(m, l, acc)` merged
//! in order: the result does not depend on the number of threads.
//!
//! # Values by columns or by rows
//! The weighted sums are computed one of two ways, decided once per group from V's layout
//! ([`Group::by_rows`]): values stored by columns (a `DMatrix`, each column's keys
//! contiguous) per row and column in [`LANES`] lanes over the chunk's keys, SIMD over keys
//! ([`lane_partials`]), the lanes added into [`LANES`] f64 lanes per row and column (no
//! horizontal sum until the part ends); values stored by rows (the KV cache's pages, a
//! row-major V) as `Σ_j p_rj·v_j` accumulated over the chunk's keys, SIMD over columns
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
//! path decides) and values that need no scaling. K and V are read in place when they have
//! the contiguous runs the kernel reads (K's columns; V's columns, or its rows), else each
//! chunk is copied first. The next chunk's cache lines are prefetched while a chunk is
//! computed.
//!
//! # Checking K and V on the way
//! A single-head call whose K and V were not scanned before ([`Group::scan`], see
//! `kernel::attention_deferred`) folds each chunk's keys and values into an integer
//! maximum of their `|x|` bits while they are in the level-1 cache (the keys in the score
//! loop itself): every key and value, whether its weight is used or not, so that the
//! maxima equal those of a scan before the call.

use crate::Element;
use crate::kernel::ElementKernels;
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
    /// Values stored by columns: `acc` in [`LANES`] f64 lanes per row and column
    /// (`lanes[(r·d_v + c)·LANES + t]`), summed into `acc` when the part ends
    /// ([`State::fold_lanes`]); empty otherwise.
    lanes: Vec<f64>,
    /// `l` in [`LANES`] f64 lanes per row (`l_lanes[r·LANES + t]`), summed into `l` when
    /// the part ends: as each value column stored by columns is summed, so that constant
    /// values give exactly that constant, whatever V's layout (so that the lse does not
    /// depend on it).
    l_lanes: Vec<f64>,
    /// The largest [`Element::abs_bits_native`] of the keys and of the values read, when
    /// the group scans them ([`Group::scan`]); NaN and ±∞ have the largest bits.
    scanned: (T::Bits, T::Bits),
}

impl<T: Element> State<T> {
    fn new(rows: usize, d_v: usize, by_rows: bool) -> Self {
        State {
            m: vec![T::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            acc: vec![0.0; rows * d_v],
            lanes: if by_rows {
                Vec::new()
            } else {
                vec![0.0; rows * d_v * LANES]
            },
            l_lanes: vec![0.0; rows * LANES],
            scanned: Default::default(),
        }
    }

    /// Sums each row's and column's lanes into `l` and `acc`, pairwise.
    fn fold_lanes(&mut self) {
        let pairs = (self.acc.iter_mut().zip(self.lanes.chunks_exact(LANES)))
            .chain(self.l.iter_mut().zip(self.l_lanes.chunks_exact(LANES)));
        for (a, lanes) in pairs {
            let mut x: [f64; LANES] = lanes.try_into().expect("LANES lanes");
            let mut width = LANES / 2;
            while width > 0 {
                for t in 0..width {
                    x[t] += x[t + width];
                }
                width /= 2;
            }
            *a = x[0];
        }
        self.lanes = Vec::new();
        self.l_lanes = Vec::new();
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
    /// them: for a call whose K and V were not scanned before (see [`checked_on_the_way`]).
    /// Every key and value is folded in, whether its weight is used or not.
    pub(crate) scan: bool,
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

/// The group's state over keys `keys` (a part), computed chunk by chunk: the body the
/// CPU paths compile (`simd.rs`, `decode_kernel!`), `FMA` as the path has it.
#[inline(always)]
pub(crate) fn part<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    keys: std::ops::Range<usize>,
) -> State<T> {
    let spec = group.specs[0];
    let (d_k, d_v) = (spec.d_k, spec.d_v);
    let rows = group.rows();
    let mut state = State::new(rows, d_v, group.by_rows);
    let mut s = vec![T::zero(); rows * CHUNK];
    // Chunks start every CHUNK keys from the part's start (parts start at multiples of
    // CHUNK), whatever the segments: the sums, hence the bits, do not depend on how the
    // keys are stored. A chunk inside one segment with contiguous columns is read in
    // place; one that spans segments (pages smaller than a chunk) or sits in a row-strided
    // view is copied first.
    let starts: Vec<usize> = group
        .segments
        .iter()
        .scan(0, |at, (k, _)| {
            let start = *at;
            *at += k.nrows();
            Some(start)
        })
        .collect();
    let (mut kc, mut vc) = (DMatrix::zeros(0, d_k), DMatrix::zeros(0, d_v));
    let mut seg = 0;
    let mut start = keys.start;
    while start < keys.end {
        let len = CHUNK.min(keys.end - start);
        while starts[seg] + group.segments[seg].0.nrows() <= start {
            seg += 1;
        }
        let (k, v) = group.segments[seg];
        let at = start - starts[seg];
        let next = next_in_place(group, &starts, seg, start + len);
        if let Some(((k, v), at)) = in_place(group, (k, v), at, len) {
            chunk_of::<T, FMA>(group, (k, v), (start, at), len, next, &mut s, &mut state);
        } else {
            gather(group, &starts, start, len, (&mut kc, &mut vc));
            chunk_of::<T, FMA>(
                group,
                ((&kc).into(), (&vc).into()),
                (start, 0),
                len,
                next,
                &mut s,
                &mut state,
            );
        }
        start += len;
    }
    state.fold_lanes();
    state
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

/// The chunk from key `start` (the next one, for [`prefetch`]) if it is a whole chunk read
/// in place.
fn next_in_place<'a, T: Element>(
    group: &Group<'_, 'a, T>,
    starts: &[usize],
    mut seg: usize,
    start: usize,
) -> Option<Next<'a, T>> {
    while seg < starts.len() && starts[seg] + group.segments[seg].0.nrows() <= start {
        seg += 1;
    }
    let segment = *group.segments.get(seg)?;
    in_place(group, segment, start - starts[seg], CHUNK)
}

/// A chunk's K and V as [`in_place`] gives them, and its row: for the next chunk, the
/// cache lines the kernel prefetches while it computes the current one.
type Next<'a, T> = ((MatRef<'a, T>, MatRef<'a, T>), usize);

/// Keys `start .. start + len` of the group's segments copied into `k` (resized to `len`
/// rows) and `v` (`len` rows, or transposed to `len` columns when the group reads values
/// by rows).
fn gather<T: Element>(
    group: &Group<'_, '_, T>,
    starts: &[usize],
    start: usize,
    len: usize,
    (k, v): (&mut DMatrix<T>, &mut DMatrix<T>),
) {
    let (d_k, d_v) = (k.ncols(), group.specs[0].d_v);
    if k.nrows() != len {
        *k = DMatrix::zeros(len, d_k);
        *v = if group.by_rows {
            DMatrix::zeros(d_v, len)
        } else {
            DMatrix::zeros(len, d_v)
        };
    }
    for (&(ks, vs), &s0) in group.segments.iter().zip(starts) {
        let (lo, hi) = (s0.max(start), (s0 + ks.nrows()).min(start + len));
        for j in lo..hi {
            for c in 0..d_k {
                k[(j - start, c)] = ks[(j - s0, c)];
            }
            for c in 0..d_v {
                let at = if group.by_rows {
                    (c, j - start)
                } else {
                    (j - start, c)
                };
                v[at] = vs[(j - s0, c)];
            }
        }
    }
}

/// One chunk of `len` keys (key `start`, row `at` of `k` and `v`, whose columns are
/// contiguous). A function, not a closure: closures are not compiled with the target
/// features of the function that defines them, and `part` must inline whole into each
/// path's `#[target_feature]` instance.
#[inline(always)]
fn chunk_of<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    (k, v): (MatRef<'_, T>, MatRef<'_, T>),
    (start, at): (usize, usize),
    len: usize,
    next: Option<Next<'_, T>>,
    s: &mut [T],
    state: &mut State<T>,
) {
    let (d_k, d_v) = (k.ncols(), group.specs[0].d_v);
    let k = k.as_view::<Dyn, Dyn, U1, Dyn>();
    let v = v.as_view::<Dyn, Dyn, U1, Dyn>();
    let (next, next_at) = next.map_or((None, 0), |(kv, at)| (Some(kv), at));
    let next = next
        .as_ref()
        .map(|(k, v)| (k.as_view::<Dyn, Dyn, U1, Dyn>(), v.as_view()));
    let next = next.as_ref().map(|(k, v)| (k, v, next_at));
    chunk::<T, FMA>(group, (&k, &v, d_k, d_v), (start, at), len, next, s, state);
}

/// A view with contiguous columns (K, V, or V transposed).
type ColumnView<'r, 'a, T> =
    &'r nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'a, T, Dyn, Dyn, U1, Dyn>>;

/// Prefetches the cache lines of `run`.
#[inline(always)]
fn prefetch_run<T>(run: &[T]) {
    for x in run.iter().step_by(LINE / size_of::<T>()) {
        prefetch(x);
    }
}

/// Bytes per cache line (of every x86-64 CPU).
const LINE: usize = 64;

/// K with contiguous columns, V with contiguous columns (or, when the group reads values
/// by rows, V transposed: column `j` is value row `j`), and the head widths.
type Columns<'r, 'a, T> = (
    &'r nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'a, T, Dyn, Dyn, U1, Dyn>>,
    &'r nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'a, T, Dyn, Dyn, U1, Dyn>>,
    usize,
    usize,
);

/// One chunk of `len` keys from key `start` (row `at` of `k` and `v`) for every row of the
/// group.
#[inline(always)]
fn chunk<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    (k, v, d_k, d_v): Columns<'_, '_, T>,
    (start, at): (usize, usize),
    len: usize,
    next: Option<(ColumnView<'_, '_, T>, ColumnView<'_, '_, T>, usize)>,
    s: &mut [T],
    state: &mut State<T>,
) {
    let rows = group.rows();
    if let Some(next) = next {
        prefetch_chunk(group.by_rows, next, d_k, d_v);
    }
    let k_scanned = scores::<T, FMA>(group, k, d_k, at, len, s);
    let (alpha, active) = softmax_step::<T, FMA>(group, start, len, s, state);
    if group.by_rows {
        value_rows::<T, FMA>(v, at, len, s, (&alpha, &active), rows, state);
    } else {
        // Σ_j p_rj·v_jc for every value column, the column read once for all rows: in
        // LANES lanes in T over the chunk, added lane by lane into f64 lanes (no
        // horizontal sums until the part ends).
        for c in 0..d_v {
            let column = v.column(c);
            let vc = &column.as_slice()[at..at + len];
            for r in 0..rows {
                if active[r] {
                    let part = lane_partials::<T, FMA>(&s[r * CHUNK..r * CHUNK + len], vc);
                    let a: &mut [f64; LANES] = (&mut state.lanes[(r * d_v + c) * LANES..][..LANES])
                        .try_into()
                        .expect("LANES lanes");
                    for t in 0..LANES {
                        a[t] = madd::<f64, FMA>(a[t], alpha[r], part[t].to_f64());
                    }
                }
            }
        }
    }
    if group.scan {
        // The chunk is in the level-1 cache now: scanning it costs no memory traffic.
        let (ks, vs) = &mut state.scanned;
        *ks = (*ks).max(k_scanned.unwrap_or_else(|| scan(k, 0..d_k, at, len)));
        *vs = (*vs).max(if group.by_rows {
            // Column `at + j` of the transposed values is value row `j`.
            scan(v, at..at + len, 0, d_v)
        } else {
            scan(v, 0..d_v, at, len)
        });
    }
}

/// The largest [`Element::abs_bits_native`] of rows `at .. at + len` of columns
/// `columns` of `m`: for a full chunk in [`CHUNK`] lanes (as [`block_scores`] sums, so
/// that the lanes stay in registers and each vector costs a mask and an integer max),
/// else in [`LANES`] lanes per column with the remainder folded one by one.
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
    let mut lanes = [T::Bits::default(); LANES];
    let mut rest = T::Bits::default();
    for c in columns {
        let column = m.column(c);
        let pieces = column.as_slice()[at..at + len].chunks_exact(LANES);
        rest = pieces
            .remainder()
            .iter()
            .fold(rest, |r, x| r.max(x.abs_bits_native()));
        for piece in pieces {
            for t in 0..LANES {
                lanes[t] = lanes[t].max(piece[t].abs_bits_native());
            }
        }
    }
    max_of(&lanes, rest)
}

/// `lanes` raised to the `abs_bits_native` of `piece`, lane by lane.
#[inline(always)]
fn max_bits<T: Element>(mut lanes: [T::Bits; LANES], piece: &[T; LANES]) -> [T::Bits; LANES] {
    for t in 0..LANES {
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

/// Requests every cache line of the next chunk's keys and values (`(k, v, at)` as
/// [`in_place`] gives them), to arrive while this chunk is computed: all at once, since
/// spreading the requests over the loops measured slower.
#[inline(always)]
fn prefetch_chunk<T: Element>(
    by_rows: bool,
    (k, v, at): (ColumnView<'_, '_, T>, ColumnView<'_, '_, T>, usize),
    d_k: usize,
    d_v: usize,
) {
    for p in 0..d_k {
        prefetch_run(&k.column(p).as_slice()[at..at + CHUNK]);
    }
    if by_rows {
        for j in at..at + CHUNK {
            prefetch_run(v.column(j).as_slice());
        }
    } else {
        for c in 0..d_v {
            prefetch_run(&v.column(c).as_slice()[at..at + CHUNK]);
        }
    }
}

/// Per row, the chunk's score modifiers and the online softmax step: `s` becomes `p`, `m`
/// and `l` are updated; returns each row's `α = exp(m_old − m_new)` and whether the row
/// has an allowed key in the chunk (else its `s` is left as is and must not be used).
#[inline(always)]
fn softmax_step<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    start: usize,
    len: usize,
    s: &mut [T],
    state: &mut State<T>,
) -> ([f64; MAX_ROWS], [bool; MAX_ROWS]) {
    let mut alpha = [0.0f64; MAX_ROWS];
    let mut active = [false; MAX_ROWS];
    for r in 0..group.rows() {
        let spec = group.specs[r / group.n_q];
        let i = r % group.n_q;
        let sr = &mut s[r * CHUNK..r * CHUNK + len];
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
        let m_chunk = lane_max(sr);
        let m_old = state.m[r];
        let m_new = m_old.max(m_chunk);
        if m_new == T::NEG_INFINITY {
            continue;
        }
        for x in sr.iter_mut() {
            *x = (*x - m_new).exp_nonpos::<FMA>();
        }
        alpha[r] = factor(m_old, m_new);
        active[r] = true;
        // As each value column stored by columns is summed (`chunk`), with values 1.
        let part = lane_partials::<T, FMA>(sr, &[T::one(); CHUNK][..len]);
        let l = &mut state.l_lanes[r * LANES..][..LANES];
        for t in 0..LANES {
            l[t] = madd::<f64, FMA>(l[t], alpha[r], part[t].to_f64());
        }
        state.m[r] = m_new;
    }
    (alpha, active)
}

/// `acc_r ← α_r·acc_r + Σ_j p_rj·v_j` for the active rows, values stored by rows (`vt`:
/// column `at + j` is value row `j`, contiguous): each sum runs over the chunk's keys in T
/// (at most [`CHUNK`] roundings, as in one tile of the block kernel), vectorised over
/// columns, [`ROW_BLOCK`] rows × a tile of columns in registers, each value row loaded
/// once per block; then added in f64.
#[inline(always)]
fn value_rows<T: Element, const FMA: bool>(
    vt: &nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'_, T, Dyn, Dyn, U1, Dyn>>,
    at: usize,
    len: usize,
    s: &mut [T],
    (alpha, active): (&[f64; MAX_ROWS], &[bool; MAX_ROWS]),
    rows: usize,
    state: &mut State<T>,
) {
    // Rows with nothing allowed here weigh nothing (their `s` still holds scores).
    for r in 0..rows {
        if !active[r] {
            s[r * CHUNK..r * CHUNK + len].fill(T::zero());
        }
    }
    let mut r = 0;
    while r + ROW_BLOCK <= rows {
        value_block::<T, FMA, ROW_BLOCK>((vt, at, len), r, s, (alpha, active), state);
        r += ROW_BLOCK;
    }
    while r < rows {
        value_block::<T, FMA, 1>((vt, at, len), r, s, (alpha, active), state);
        r += 1;
    }
}

/// The transposed values of [`value_rows`] (column `at + j` is value row `j`) and the
/// chunk's length.
type Values<'r, 'a, T> = (
    &'r nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'a, T, Dyn, Dyn, U1, Dyn>>,
    usize,
    usize,
);

/// Rows `r .. r + B` of [`value_rows`], the columns in tiles of 64 (f32) or 32 (f64) —
/// for `B` = 4, 256 bytes per row: sixteen 512-bit registers — then 8, then 1.
#[inline(always)]
fn value_block<T: Element, const FMA: bool, const B: usize>(
    value: Values<'_, '_, T>,
    r: usize,
    s: &[T],
    weights: (&[f64; MAX_ROWS], &[bool; MAX_ROWS]),
    state: &mut State<T>,
) {
    let d_v = state.acc.len() / state.m.len();
    let mut c = 0;
    if size_of::<T>() == 4 {
        while c + 64 <= d_v {
            value_tile::<T, FMA, B, 64>(value, (r, c), s, weights, state);
            c += 64;
        }
    } else {
        while c + 32 <= d_v {
            value_tile::<T, FMA, B, 32>(value, (r, c), s, weights, state);
            c += 32;
        }
    }
    while c + 8 <= d_v {
        value_tile::<T, FMA, B, 8>(value, (r, c), s, weights, state);
        c += 8;
    }
    while c < d_v {
        value_tile::<T, FMA, B, 1>(value, (r, c), s, weights, state);
        c += 1;
    }
}

/// Rows `r .. r + B`, columns `c .. c + C` of [`value_rows`], the `B × C` sums in
/// registers.
#[inline(always)]
fn value_tile<T: Element, const FMA: bool, const B: usize, const C: usize>(
    (vt, at, len): Values<'_, '_, T>,
    (r, c): (usize, usize),
    s: &[T],
    (alpha, active): (&[f64; MAX_ROWS], &[bool; MAX_ROWS]),
    state: &mut State<T>,
) {
    let d_v = state.acc.len() / state.m.len();
    let mut acc = [[T::zero(); C]; B];
    for j in 0..len {
        let column = vt.column(at + j);
        let v: &[T; C] = column.as_slice()[c..c + C].try_into().expect("a full tile");
        for (b, acc_b) in acc.iter_mut().enumerate() {
            let p = s[(r + b) * CHUNK + j];
            for t in 0..C {
                acc_b[t] = madd::<T, FMA>(p, v[t], acc_b[t]);
            }
        }
    }
    for (b, acc_b) in acc.iter().enumerate() {
        if active[r + b] {
            let out = &mut state.acc[(r + b) * d_v + c..][..C];
            for (o, x) in out.iter_mut().zip(acc_b) {
                *o = *o * alpha[r + b] + x.to_f64();
            }
        }
    }
}

/// Rows of a group handled together by the register-blocked loops.
const ROW_BLOCK: usize = 4;
/// The most rows a group has: 8 queries × 8 query heads per key/value head (larger
/// groups are split by the caller).
pub(crate) const MAX_ROWS: usize = 64;

/// `s[r][j] = Σ_p q_rp·k_jp` for the chunk's `len` keys (row `at` of `k`) and every row:
/// for a full chunk, [`ROW_BLOCK`] rows at a time with their `ROW_BLOCK × CHUNK` sums in
/// registers, each column of K loaded once per block.
#[inline(always)]
fn scores<T: Element, const FMA: bool>(
    group: &Group<'_, '_, T>,
    k: &nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'_, T, Dyn, Dyn, U1, Dyn>>,
    d_k: usize,
    at: usize,
    len: usize,
    s: &mut [T],
) -> Option<T::Bits> {
    let rows = group.rows();
    let mut r = 0;
    let mut scanned = None;
    if len == CHUNK {
        // The first block also scans K when the group scans (K is the same for every
        // block).
        while r + ROW_BLOCK <= rows {
            if group.scan && r == 0 {
                scanned = Some(block_scores::<T, FMA, ROW_BLOCK, true>(
                    group, k, d_k, at, r, s,
                ));
            } else {
                block_scores::<T, FMA, ROW_BLOCK, false>(group, k, d_k, at, r, s);
            }
            r += ROW_BLOCK;
        }
        // The remaining rows one at a time, their 64 sums in registers as well.
        while r < rows {
            if group.scan && r == 0 {
                scanned = Some(block_scores::<T, FMA, 1, true>(group, k, d_k, at, r, s));
            } else {
                block_scores::<T, FMA, 1, false>(group, k, d_k, at, r, s);
            }
            r += 1;
        }
    }
    if r < rows {
        s[r * CHUNK..rows * CHUNK].fill(T::zero());
        for p in 0..d_k {
            let column = k.column(p);
            let kc = &column.as_slice()[at..at + len];
            for rr in r..rows {
                let q = group.q[rr * d_k + p];
                let sr = &mut s[rr * CHUNK..rr * CHUNK + len];
                for (x, &kj) in sr.iter_mut().zip(kc) {
                    *x = madd::<T, FMA>(q, kj, *x);
                }
            }
        }
    }
    scanned
}

/// The scores of rows `r .. r + B` for a full chunk (row `at` of `k`), their `B × CHUNK`
/// sums in registers, each column of K loaded once for the `B` rows; with `SCAN`, the
/// largest [`Element::abs_bits_native`] of the chunk's keys as well (else 0).
#[inline(always)]
fn block_scores<T: Element, const FMA: bool, const B: usize, const SCAN: bool>(
    group: &Group<'_, '_, T>,
    k: &nalgebra::Matrix<T, Dyn, Dyn, nalgebra::ViewStorage<'_, T, Dyn, Dyn, U1, Dyn>>,
    d_k: usize,
    at: usize,
    r: usize,
    s: &mut [T],
) -> T::Bits {
    let mut acc = [[T::zero(); CHUNK]; B];
    let mut bits = [T::Bits::default(); CHUNK];
    for p in 0..d_k {
        let column = k.column(p);
        let kc: &[T; CHUNK] = column.as_slice()[at..at + CHUNK]
            .try_into()
            .expect("a full chunk");
        for (b, acc_b) in acc.iter_mut().enumerate() {
            let q = group.q[(r + b) * d_k + p];
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
        s[(r + b) * CHUNK..(r + b + 1) * CHUNK].copy_from_slice(acc_b);
    }
    max_of(&bits, T::Bits::default())
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
        .unwrap_or_else(|| State::new(group.rows(), d_v, true));
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
            for c in 0..d_v {
                outs[h][(i, c)] = row_output(total.acc[r * d_v + c], l, 1.0, spec.v_max_abs);
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
    use rayon::prelude::*;
    debug_assert!(group.rows() <= MAX_ROWS);
    let compiled = T::decode(path);
    let parts = parts(group.specs[0].n_kv);
    if parallel && parts.len() > 1 {
        parts
            .into_par_iter()
            .map(|keys| compiled(group, keys))
            .collect()
    } else {
        parts
            .into_iter()
            .map(|keys| compiled(group, keys))
            .collect()
    }
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
