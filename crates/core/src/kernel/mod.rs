//! The attention kernels and the routing between them (`attention`, `route`): the
//! row-at-a-time path for tiny calls (`direct.rs`), the decoding kernel for few queries
//! (`decode.rs`), the careful path for scores that may leave the type's range
//! (`careful.rs`), multi-head batches (`batch.rs`), and the block kernel: packing (`pack.rs`),
//! scheduling over query blocks and threads (`schedule.rs`), the tile loop with online
//! softmax (`block.rs`), and its CPU-specific compilation with all of the kernels'
//! `unsafe` (`simd.rs`); and the backward pass's tile loop (`grad.rs`).

pub(crate) mod batch;
mod block;
pub(crate) mod careful;
pub(crate) mod decode;
mod direct;
pub(crate) mod exp;
pub(crate) mod grad;
mod pack;
mod schedule;
pub(crate) mod simd;

use std::cell::{Cell, RefCell};

pub(crate) use pack::set_len;

use crate::cpu::CpuPath;
use crate::error::Operand;
use crate::memory::try_resize;
use crate::options::{AttentionOptions, MatRef};
use crate::score::{empty_row_lse, empty_row_output};
use crate::spec::{Deferred, Plain, Spec};
use crate::view::MatMut;
use crate::{AttentionError, Element};

/// Everything the block kernel reads: the checked problem, K and V packed.
pub(crate) struct Job<'a, T: Element> {
    pub spec: Spec<'a, T>,
    /// K in panels of `MR` keys: `kp[j/MR][p][j%MR]`, keys past n_kv zero.
    pub kp: &'a [T],
    /// V in panels of `MRV` value columns, `v_panel` (`n_kv_pad·MRV`) long each:
    /// `vp[c/MRV][j][c%MRV]`, columns past d_v (to `dvp`) and keys past n_kv zero.
    pub vp: &'a [T],
    /// Per value column, the power of two the output is multiplied by (empty: all 1).
    pub v_unscale: &'a [T],
    pub dvp: usize,
    pub v_panel: usize,
    /// Keys per super-block: the span of K and V a group of query blocks shares in cache.
    pub super_keys: usize,
    /// Query lanes the first block leaves empty, `blocks·BQ − n_q` (below `BQ`): the one
    /// short block is the first (see [`Job::block_rows`]).
    pub first_pad: usize,
}

impl<T: Element> Job<'_, T> {
    /// The queries of block `b` (`bq` per block): `[b·bq − first_pad, (b + 1)·bq −
    /// first_pad)` clipped to `0..n_q`, so that the only block with fewer than `bq` queries
    /// is the first. Under a causal band that block's keys end at its own last query: its
    /// empty lanes cost a few keys each, where at the end of the queries they would cost
    /// all of them (a packed batch of 64 causal sequences of 16..2048 tokens computes
    /// 0.950 useful scores per score this way, 0.903 with the short block last).
    pub(super) fn block_rows(&self, b: usize, bq: usize) -> std::ops::Range<usize> {
        let start = (b * bq).saturating_sub(self.first_pad);
        let end = ((b + 1) * bq - self.first_pad).min(self.spec.n_q);
        start..end.max(start)
    }
}

/// Per-thread working memory of the block kernel, reused from call to call.
///
/// The running sums (`acc`, `l`) and their rescale factors (`beta`) are f64 whatever `T`
/// is; the span sums (`acc_span`, `l_span`) are in T: see "Accuracy" in `block.rs`.
pub struct Scratch<T> {
    pub qt: LineAligned<T>,
    pub s: LineAligned<T>,
    pub acc: LineAligned<f64>,
    pub acc_span: LineAligned<T>,
    pub m: LineAligned<T>,
    pub m_run: LineAligned<T>,
    pub l: LineAligned<f64>,
    pub l_span: LineAligned<T>,
    pub alpha: LineAligned<T>,
    pub beta: LineAligned<f64>,
    pub probe: LineAligned<T>,
    pub alibi: LineAligned<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            qt: LineAligned::default(),
            s: LineAligned::default(),
            acc: LineAligned::default(),
            acc_span: LineAligned::default(),
            m: LineAligned::default(),
            m_run: LineAligned::default(),
            l: LineAligned::default(),
            l_span: LineAligned::default(),
            alpha: LineAligned::default(),
            beta: LineAligned::default(),
            probe: LineAligned::default(),
            alibi: LineAligned::default(),
        }
    }
}

impl<T: Element> Scratch<T> {
    /// Makes every buffer at least as long as a group of `group` blocks of `kernel` needs
    /// (no allocation when already so).
    fn fit(&mut self, kernel: &simd::Kernel<T>, d_k: usize, dvp: usize, group: usize) {
        let bq = kernel.bq;
        for (buf, len) in [
            (&mut self.qt, group * d_k * bq),
            (&mut self.s, kernel.bk * bq),
            (&mut self.acc_span, group * dvp * bq),
            (&mut self.m, group * bq),
            (&mut self.m_run, group * bq),
            (&mut self.l_span, group * bq),
            (&mut self.alpha, bq),
            (&mut self.probe, bq),
            (&mut self.alibi, bq + kernel.bk),
        ] {
            buf.fit(len, T::zero());
        }
        for (buf, len) in [
            (&mut self.acc, group * dvp * bq),
            (&mut self.l, group * bq),
            (&mut self.beta, bq),
        ] {
            buf.fit(len, 0.0);
        }
    }
}

/// Bytes per cache line (of every x86-64 CPU).
pub(crate) const LINE: usize = 64;

/// A buffer whose first element starts a cache line. The micro-kernels load and store
/// whole vectors at offsets that are multiples of 64 bytes from the start of each buffer
/// (blocks of 16 f32 or 8 f64 lanes): from a line's start, no vector straddles two lines.
/// (A `Vec`'s memory starts 16 bytes into a line as the allocator gives it, and then every
/// 512-bit access was split in two: measured on the scores loop alone, 69–80% of the FMA
/// peak against 79–91% aligned.)
pub struct LineAligned<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T> Default for LineAligned<T> {
    fn default() -> Self {
        LineAligned {
            buf: Vec::new(),
            start: 0,
            len: 0,
        }
    }
}

impl<T: Copy> LineAligned<T> {
    /// Elements allocated beyond `len` so that some start is on a line boundary.
    const SPARE: usize = LINE
        / if size_of::<T>() == 0 {
            1
        } else {
            size_of::<T>()
        };

    /// `len` elements of `buf` (which has `SPARE` more) from its first line boundary:
    /// below `SPARE` for f32/f64 (their memory reaches a line boundary within 16 or 8
    /// elements); 0, unaligned but correct, for a type that could not.
    fn aligned(buf: Vec<T>, len: usize) -> Self {
        let start = Some(buf.as_ptr().align_offset(LINE))
            .filter(|&s| s < Self::SPARE)
            .unwrap_or(0);
        LineAligned { buf, start, len }
    }

    /// At least `len` elements (new ones `zero`; contents are not kept when the buffer
    /// grows: every user writes before it reads).
    fn fit(&mut self, len: usize, zero: T) {
        if len > self.len {
            *self = Self::aligned(vec![zero; len + Self::SPARE], len);
        }
    }

    /// This buffer with `len` elements, in place when it has room (no new pages, so no
    /// page faults; the elements then hold whatever they held: every user writes before
    /// it reads), else a new one of `zero`s as [`try_zeroed`](Self::try_zeroed).
    pub(crate) fn try_reuse(
        mut self,
        len: usize,
        zero: T,
        operand: Operand,
    ) -> Result<Self, AttentionError> {
        if self.start + len > self.buf.len() {
            return Self::try_zeroed(len, zero, operand);
        }
        self.len = len;
        Ok(self)
    }

    /// The elements this buffer holds.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// `len` elements `zero`, or `TooLarge` for `operand` if they cannot be allocated.
    pub(crate) fn try_zeroed(
        len: usize,
        zero: T,
        operand: Operand,
    ) -> Result<Self, AttentionError> {
        let mut buf = Vec::new();
        try_resize(&mut buf, len.saturating_add(Self::SPARE), zero, operand)?;
        Ok(Self::aligned(buf, len))
    }
}

impl<T> std::ops::Deref for LineAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for LineAligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Per-calling-thread buffers of a call: packed K and V, and the row path's scores. Kept
/// between calls so that a loop of calls allocates nothing. (The block kernel writes each
/// query block's output straight into the caller's matrix: no output-sized buffer.)
pub struct Workspace<T> {
    kp: Vec<T>,
    vp: Vec<T>,
    /// The row path's scores of one query (`n_kv`).
    scores: Vec<T>,
    /// The log-sum-exp when the caller does not want it.
    lse: Vec<T>,
    /// Per value column scaling (only for values near the type's maximum).
    v_scale: Vec<T>,
    v_unscale: Vec<T>,
}

impl<T> Default for Workspace<T> {
    fn default() -> Self {
        Workspace {
            kp: Vec::new(),
            vp: Vec::new(),
            scores: Vec::new(),
            lse: Vec::new(),
            v_scale: Vec::new(),
            v_unscale: Vec::new(),
        }
    }
}

/// Buffers larger than this (in elements) are freed after the call instead of kept: a
/// call that needs more spends far longer computing than reallocating.
const KEEP_MAX_ELEMENTS: usize = 1 << 20;

/// What the kernel needs per element type: its compiled kernels and its thread-local
/// buffers. A supertrait of [`Element`] (through its seal), implemented for `f32` and
/// `f64` only, so that generic code reaches each type's own kernels and caches statically.
///
/// Nominally public (a supertrait of a public trait must be) but in a private module:
/// outside this crate it can be neither named nor implemented.
pub trait ElementKernels: Sized + 'static {
    /// The kernel for this type on `path`. An unsupported path falls back to the portable
    /// kernel (callers check support first and report it as an error).
    #[doc(hidden)]
    fn kernel(path: CpuPath) -> simd::Kernel<Self>
    where
        Self: Element;
    /// Runs `f` with this thread's cached workspace (see [`with_cached`]).
    #[doc(hidden)]
    fn with_workspace<R>(f: impl FnOnce(&mut Workspace<Self>) -> R) -> R;
    /// Runs `f` with this thread's cached block-kernel scratch (see [`with_cached`]).
    #[doc(hidden)]
    fn with_scratch<R>(f: impl FnOnce(&mut Scratch<Self>) -> R) -> R;
    /// `exp(self)` for `self ≤ 0` or −∞, vectorisable: the decoding kernel's softmax
    /// exponential (`exp.rs`).
    #[doc(hidden)]
    fn exp_nonpos<const FMA: bool>(self) -> Self;
    /// `tanh(self)`, branch-free and vectorisable, the same bits on every path: the
    /// softcap's (`exp.rs`, [`exp::tanh`]).
    #[doc(hidden)]
    fn softcap_tanh(self) -> Self;
    /// The decoding kernel's body compiled for `path` (`decode.rs`, `simd.rs`).
    #[doc(hidden)]
    fn decode(path: CpuPath) -> decode::PartFn<Self>
    where
        Self: Element;
    /// The backward pass's kernel compiled for `path` (`grad.rs`, `simd.rs`).
    #[doc(hidden)]
    fn grad(path: CpuPath) -> grad::GradKernel<Self>
    where
        Self: Element;
    /// `spec::check_finite`'s scan compiled for `path` (`simd.rs`, `abs_max_bits`).
    #[doc(hidden)]
    fn abs_max_scan(path: CpuPath) -> simd::AbsMaxFn<Self>;
    /// Runs `f` with this thread's cached backward chunks (see [`with_cached`]): their
    /// buffers are reused from call to call instead of freshly mapped each time.
    #[doc(hidden)]
    fn with_grad_chunks<R>(f: impl FnOnce(&mut Vec<grad::Chunk<Self>>) -> R) -> R;
    /// Runs `f` with this thread's cached backward layouts and f64 results (see
    /// [`grad::Buffers`]).
    #[doc(hidden)]
    fn with_grad_buffers<R>(f: impl FnOnce(&mut grad::Buffers<Self>) -> R) -> R;
}

/// Implements [`ElementKernels`] for one type: its kernels from `simd.rs`, its own
/// thread-local caches.
macro_rules! element_kernels {
    ($t:ty, $select:path, $decode:path, $grad:path, $abs_max:path) => {
        impl ElementKernels for $t {
            #[inline]
            fn abs_max_scan(path: CpuPath) -> simd::AbsMaxFn<$t> {
                $abs_max(path)
            }
            #[inline]
            fn grad(path: CpuPath) -> grad::GradKernel<$t> {
                $grad(path)
            }
            #[inline]
            fn decode(path: CpuPath) -> decode::PartFn<$t> {
                $decode(path)
            }
            #[inline]
            fn kernel(path: CpuPath) -> simd::Kernel<$t> {
                $select(path)
            }
            fn with_workspace<R>(f: impl FnOnce(&mut Workspace<$t>) -> R) -> R {
                thread_local! {
                    static WORKSPACE: RefCell<Workspace<$t>> = RefCell::default();
                }
                with_cached(&WORKSPACE, f)
            }
            fn with_grad_chunks<R>(f: impl FnOnce(&mut Vec<grad::Chunk<$t>>) -> R) -> R {
                thread_local! {
                    static CHUNKS: RefCell<Vec<grad::Chunk<$t>>> = RefCell::default();
                }
                with_cached(&CHUNKS, f)
            }
            fn with_grad_buffers<R>(f: impl FnOnce(&mut grad::Buffers<$t>) -> R) -> R {
                thread_local! {
                    static BUFFERS: RefCell<grad::Buffers<$t>> = RefCell::default();
                }
                with_cached(&BUFFERS, f)
            }
            fn with_scratch<R>(f: impl FnOnce(&mut Scratch<$t>) -> R) -> R {
                thread_local! {
                    static SCRATCH: RefCell<Scratch<$t>> = RefCell::default();
                }
                with_cached(&SCRATCH, f)
            }
            #[inline(always)]
            fn exp_nonpos<const FMA: bool>(self) -> $t {
                exp::exp_nonpos::<$t, FMA>(self)
            }
            #[inline(always)]
            fn softcap_tanh(self) -> $t {
                exp::tanh(self)
            }
        }
    };
}
element_kernels!(
    f32,
    simd::kernel_f32,
    simd::decode_f32,
    simd::grad_f32,
    simd::abs_max_f32
);
element_kernels!(
    f64,
    simd::kernel_f64,
    simd::decode_f64,
    simd::grad_f64,
    simd::abs_max_f64
);

/// Runs `f` with this thread's cached `X` from `cell` (a fresh one if it is already in
/// use, e.g. by a call that rayon nested on the same thread).
fn with_cached<X: Default + 'static, R>(
    cell: &'static std::thread::LocalKey<RefCell<X>>,
    f: impl FnOnce(&mut X) -> R,
) -> R {
    cell.with(|cell| match cell.try_borrow_mut() {
        Ok(mut x) => f(&mut x),
        Err(_) => f(&mut X::default()),
    })
}

/// Work (multiply-adds) below which the direct path is used: packing and blocking would
/// cost more than they save.
const DIRECT_MAX_WORK: usize = 8 * 1024;
/// Queries up to which a row-oriented kernel (the decoding kernel; before it, the row
/// path) beats the block kernel, whose query lanes (32–64 per block) would be mostly
/// empty. Measured for the row path (f32, one thread): n_kv = 4096, d = 128: 245 µs at
/// n_q = 1, 1.2 ms at 8, 2.3 ms at 16, block kernel 2.2 ms for any n_q ≤ 64; n_kv = 512,
/// d = 64: 17 / 85 µs at n_q = 1 / 8 against 126 µs.
pub(crate) const DIRECT_MAX_QUERIES: usize = 8;
/// Work below which a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 4 << 20;

/// Which code computed a call (test instrumentation: see [`last_kernel_run`]).
#[doc(hidden)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRun {
    /// Nothing to compute (no queries, no keys, or an empty output and no lse).
    Trivial,
    /// The row-at-a-time path (tiny calls, default path only; few queries whose values
    /// need scaling).
    Row,
    /// The block kernel compiled for this path.
    Block(CpuPath),
    /// The decoding kernel compiled for this path (few queries, `decode.rs`).
    Decode(CpuPath),
    /// The careful path, for scores that may leave the type's range (`careful.rs`).
    Careful,
    /// The materialised weights of `attention_weights`.
    Weights,
}

thread_local! {
    static LAST_RUN: Cell<Option<KernelRun>> = const { Cell::new(None) };
}

/// Records which code computed the current call (on the calling thread).
pub(crate) fn record_run(run: KernelRun) {
    LAST_RUN.with(|c| c.set(Some(run)));
}

/// Which code computed the last call made on this thread: lets tests prove that a forced
/// [`CpuPath`] really runs that path's kernel. Not part of the stable API.
#[doc(hidden)]
pub fn last_kernel_run() -> Option<KernelRun> {
    LAST_RUN.with(Cell::get)
}

/// Computes the attention output into `out` (n_q × d_v, overwritten) and, if given, the
/// log-sum-exp into `lse` (n_q).
///
/// Routed by [`route`]; scores that may leave the type's range go to the careful path on
/// every CPU path alike, so the outcome never depends on the path. A fast path that meets
/// a non-finite score (which `Spec::scores_in_range` rules out) hands the call to the
/// careful path. (The block kernel writes a group of query blocks' rows of `out` when the
/// group is done, so such a call could have written other groups' rows by then: the
/// careful path rewrites every row, or returns its error with those rows written. The
/// range proof bounds every score, so neither happens for any input that reaches here.)
pub(crate) fn attention<T: Element>(
    spec: &Spec<'_, T>,
    path: CpuPath,
    forced: bool,
    parallel: bool,
    out: &mut MatMut<'_, T>,
    mut lse: Option<&mut [T]>,
) -> Result<(), AttentionError> {
    let (n_q, d_v) = (spec.n_q, spec.d_v);
    debug_assert_eq!(out.shape(), (n_q, d_v));
    debug_assert!(lse.as_ref().is_none_or(|l| l.len() == n_q));
    match route(spec, forced, lse.is_some()) {
        Route::Empty => {
            // Every query attends to nothing.
            record_run(KernelRun::Trivial);
            out.fill(empty_row_output());
            if let Some(lse) = lse {
                lse.fill(empty_row_lse());
            }
            Ok(())
        }
        Route::Careful => {
            record_run(KernelRun::Careful);
            careful::attention(spec, out, lse)
        }
        Route::Nothing => {
            // No output to compute, and (scores in range) no error to report.
            record_run(KernelRun::Trivial);
            Ok(())
        }
        route => {
            let result = fast(route, spec, path, parallel, out, lse.as_deref_mut());
            if let Err(AttentionError::ScoreOverflow { .. }) = result {
                record_run(KernelRun::Careful);
                return careful::attention(spec, out, lse);
            }
            result
        }
    }
}

/// Multiply-adds of a call, `n_q·n_kv·(d_k + d_v)` (saturating): what the routing
/// thresholds compare.
fn work(n_q: usize, n_kv: usize, d_k: usize, d_v: usize) -> usize {
    n_q.saturating_mul(n_kv)
        .saturating_mul(d_k.saturating_add(d_v))
}

/// A single-head call that [`route`] would send to the row path with scores on the stack,
/// computed without a [`Spec`]: options that set only a scale, 1 to 8 queries and keys,
/// Q, K and V with contiguous columns (row stride 1), something to compute (at any head
/// width: [`route`] sends every call of so few queries and keys to the row path), no
/// forced CPU path, scores in range and values far from the type's maximum
/// ([`Plain::new`] checks the last two). The 2 × 2 seed call is one: most of its
/// time went to the general checks and loops. `None` (nothing written, nothing reported)
/// for any other call: the caller then takes the general route, which gives it the same
/// result. Errors are those of [`Spec::new`], in its order.
pub(crate) fn tiny<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    options: &AttentionOptions<'_, T>,
    out: &mut MatMut<'_, T>,
    lse: Option<&mut [T]>,
) -> Option<Result<(), AttentionError>> {
    let (n_q, n_kv) = (q.nrows(), k.nrows());
    let fits = (1..=direct::TINY_QUERIES).contains(&n_q)
        && (1..=direct::TINY_KEYS).contains(&n_kv)
        && q.strides().0 == 1
        && k.strides().0 == 1
        && v.strides().0 == 1
        && (v.ncols() >= 1 || lse.is_some());
    if !fits || CpuPath::forced_by_env() {
        return None;
    }
    let call = match Plain::new(q, k, v, options)? {
        Ok(call) => call,
        Err(e) => return Some(Err(e)),
    };
    debug_assert_eq!(out.shape(), (n_q, v.ncols()));
    debug_assert!(lse.as_ref().is_none_or(|l| l.len() == n_q));
    record_run(KernelRun::Row);
    direct::tiny(q, k, v, &call, out, lse);
    Some(Ok(()))
}

/// Whether a single-head call of `n_q` queries and `n_kv` keys might reach the decoding
/// kernel: worth trying [`attention_deferred`] first (a cheap test on sizes alone; the
/// route decides).
pub(crate) fn may_decode(n_q: usize, n_kv: usize) -> bool {
    n_q <= DIRECT_MAX_QUERIES && n_kv > direct::STACK_KEYS
}

/// A single-head call whose K and V have not been scanned ([`Spec::deferred`]), computed
/// by the decoding kernel scanning K and V as it reads them, when that is where the call
/// goes: `Some(())` with `out` (and `lse`) written. `None`, with nothing written, when the
/// call routes elsewhere, or K or V hold a NaN/∞, or their magnitudes route it elsewhere
/// (the careful path, value scaling): the caller then validates and routes the call as
/// usual. So the outcome is that of scanning first — the same route, the same kernel and
/// parts, the same maxima, the same bits, the same errors — with one read of K and V
/// instead of two (a decode step is the time to read them).
pub(crate) fn attention_deferred<T: Element>(
    deferred: &Deferred<'_, T>,
    (path, forced): (CpuPath, bool),
    parallel: bool,
    out: &mut MatMut<'_, T>,
    lse: Option<&mut [T]>,
) -> Option<()> {
    let with_lse = lse.is_some();
    // Larger K and V only ever move a call off the decoding kernel, never onto it.
    let provisional = deferred.provisional();
    if route(&provisional, forced, with_lse) != Route::Decode {
        return None;
    }
    let specs = [&provisional];
    let mut group = decode::Group::new(&specs);
    group.scan = true;
    let states = decode::states(&group, path, parallel);
    let (k_bits, v_bits) = decode::scanned_bits(&states);
    let spec = deferred.complete(k_bits, v_bits)?;
    if route(&spec, forced, with_lse) != Route::Decode {
        return None;
    }
    record_run(KernelRun::Decode(path));
    let specs = [&spec];
    let group = decode::Group {
        specs: &specs,
        q: group.q,
        n_q: group.n_q,
        segments: group.segments,
        by_rows: group.by_rows,
        scan: false,
        prefetch: group.prefetch,
    };
    decode::finish(&group, states, &mut [out], &mut [lse]);
    Some(())
}

/// Which code computes a call (see [`attention`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// No queries or no keys: every row is empty.
    Empty,
    /// Scores that may leave the type's range: the careful path.
    Careful,
    /// No output columns and no lse asked for: nothing to compute.
    Nothing,
    /// Row at a time, scores on the stack: tiny calls.
    RowStack,
    /// The decoding kernel: few queries (values not near the type's maximum).
    Decode,
    /// Row at a time, scores in the workspace: few queries whose values need scaling.
    Row,
    /// The block kernel.
    Block,
}

/// The route of a call, the one decision every caller (single-head, multi-head and
/// cached calls) asks for, so that they compute the same problem with the same code:
/// nothing to compute; scores not provably in range on the careful path; tiny calls on
/// the row path (unless a path was forced: then its kernels run at every size), and so
/// are up to 8 queries against up to 8 keys (the decoding kernel keeps `decode::LANES`
/// partial sums per query and value column whatever the number of keys: 8 queries
/// against 8 keys of width 128 took 16 µs there, 9 on the row path); few queries on the
/// decoding kernel (or the row path when values need scaling); the rest on the block
/// kernel. `with_lse`: whether the caller wants the log-sum-exp.
pub(crate) fn route<T: Element>(spec: &Spec<'_, T>, forced: bool, with_lse: bool) -> Route {
    let (n_q, n_kv, d_k, d_v) = (spec.n_q, spec.n_kv, spec.d_k, spec.d_v);
    let work = work(n_q, n_kv, d_k, d_v);
    if n_q == 0 || n_kv == 0 {
        Route::Empty
    } else if !spec.scores_in_range {
        Route::Careful
    } else if d_v == 0 && !with_lse {
        Route::Nothing
    } else if spec.dropout.is_some() {
        // Dropout is applied by the block kernel (and the careful path) only.
        Route::Block
    } else if !forced
        && n_kv <= direct::STACK_KEYS
        && (work <= DIRECT_MAX_WORK || (n_q <= DIRECT_MAX_QUERIES && n_kv <= direct::TINY_KEYS))
    {
        Route::RowStack
    } else if n_q <= DIRECT_MAX_QUERIES && decode::fits(spec) {
        Route::Decode
    } else if !forced && n_q <= DIRECT_MAX_QUERIES {
        Route::Row
    } else {
        Route::Block
    }
}

/// The fast route `route` (row path, decoding kernel or block kernel) of a call whose
/// scores are in range (see [`attention`]).
fn fast<T: Element>(
    route: Route,
    spec: &Spec<'_, T>,
    path: CpuPath,
    parallel: bool,
    out: &mut MatMut<'_, T>,
    lse: Option<&mut [T]>,
) -> Result<(), AttentionError> {
    match route {
        Route::RowStack => {
            record_run(KernelRun::Row);
            let mut scores = [T::zero(); direct::STACK_KEYS];
            return direct::attention(spec, out, lse, &mut scores);
        }
        Route::Decode => {
            record_run(KernelRun::Decode(path));
            let specs = [spec];
            let group = decode::Group::new(&specs);
            decode::attention(&group, path, parallel, &mut [out], &mut [lse]);
            return Ok(());
        }
        Route::Row => {
            // A few queries against many keys: row by row, scores in the workspace.
            record_run(KernelRun::Row);
            return T::with_workspace(|ws| {
                set_len(&mut ws.scores, spec.n_kv, Operand::Key)?;
                let result = direct::attention(spec, out, lse, &mut ws.scores);
                if ws.scores.capacity() > KEEP_MAX_ELEMENTS {
                    ws.scores = Vec::new();
                }
                result
            });
        }
        _ => debug_assert_eq!(route, Route::Block),
    }
    let mut result = [Ok(())];
    block_heads(&[spec], path, parallel, &mut [out], &mut [lse], &mut result);
    let [result] = result;
    result
}

/// The block kernel for query heads that share K and V (`specs`: one per head, all with
/// the same K and V, e.g. the query heads of one key/value head of one sequence): K and V
/// packed once, then each head in turn while they are still in cache; head `h`'s outcome
/// in `results[h]` (the same as a call of its own: the packing depends only on K, V and
/// `max|V|`). Every spec routes to [`Route::Block`].
fn block_heads<T: Element>(
    specs: &[&Spec<'_, T>],
    path: CpuPath,
    parallel: bool,
    outs: &mut [&mut MatMut<'_, T>],
    lses: &mut [Option<&mut [T]>],
    results: &mut [Result<(), AttentionError>],
) {
    let first = specs[0];
    debug_assert!(
        specs
            .iter()
            .all(|s| std::ptr::eq(s.k.as_ptr(), first.k.as_ptr())
                && std::ptr::eq(s.v.as_ptr(), first.v.as_ptr())
                && s.k.shape() == first.k.shape()
                && s.v.shape() == first.v.shape()
                && s.out_max == first.out_max)
    );
    record_run(KernelRun::Block(path));
    let (n_q, n_kv, d_k, d_v) = (first.n_q, first.n_kv, first.d_k, first.d_v);
    let parallel = parallel && work(n_q, n_kv, d_k, d_v) >= PARALLEL_MIN_WORK && n_q > 1;
    T::with_workspace(|ws| {
        match schedule::pack(first, path, parallel, ws) {
            Err(e) => results.fill(Err(e)),
            Ok(sizes) => {
                let mut lse_buf = std::mem::take(&mut ws.lse);
                for (h, spec) in specs.iter().enumerate() {
                    let lse = match lses[h].as_deref_mut() {
                        Some(lse) => Ok(lse),
                        None => {
                            lse_buf.clear();
                            try_resize(&mut lse_buf, spec.n_q, T::zero(), Operand::Lse)
                                .map(|()| &mut lse_buf[..])
                        }
                    };
                    results[h] = lse.and_then(|lse| {
                        let packed = (&*ws, sizes);
                        schedule::fused((*spec).clone(), path, parallel, packed, outs[h], lse)
                    });
                }
                ws.lse = lse_buf;
            }
        }
        for buf in [&mut ws.kp, &mut ws.vp, &mut ws.scores, &mut ws.lse] {
            if buf.capacity() > KEEP_MAX_ELEMENTS {
                *buf = Vec::new();
            }
        }
    });
}

/// [`attention`] for query heads that share K and V and all route to [`Route::Block`]
/// (see [`block_heads`]): one packing of K and V for all of them. A head whose fast run
/// meets an overflow is redone on the careful path, as [`attention`] does.
pub(crate) fn attention_heads<T: Element>(
    specs: &[&Spec<'_, T>],
    path: CpuPath,
    parallel: bool,
    outs: &mut [&mut MatMut<'_, T>],
    lses: &mut [Option<&mut [T]>],
    results: &mut [Result<(), AttentionError>],
) {
    block_heads(specs, path, parallel, outs, lses, results);
    for (h, spec) in specs.iter().enumerate() {
        if let Err(AttentionError::ScoreOverflow { .. }) = results[h] {
            record_run(KernelRun::Careful);
            results[h] = careful::attention(spec, outs[h], lses[h].as_deref_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LINE, LineAligned};

    fn check<T: Copy + PartialEq + std::fmt::Debug>(zero: T) {
        let mut buf = LineAligned::<T>::default();
        assert!(buf.is_empty());
        for len in [1, 3, 16, 17, 1000, 4096, 5000, 100] {
            buf.fit(len, zero);
            assert!(buf.len() >= len, "len {len}");
            assert_eq!(
                buf.as_ptr() as usize % LINE,
                0,
                "len {len}: not line-aligned"
            );
            // Every element is usable and starts as `zero` when the buffer grew.
            buf.iter().for_each(|&x| assert_eq!(x, zero));
        }
        // It never shrinks (a smaller fit keeps the buffer, no allocation).
        let (ptr, len) = (buf.as_ptr(), buf.len());
        buf.fit(10, zero);
        assert_eq!((buf.as_ptr(), buf.len()), (ptr, len));
    }

    #[test]
    fn line_aligned_buffers_start_a_cache_line() {
        check(0.0f32);
        check(0.0f64);
    }

    /// `try_reuse` keeps the buffer's memory when it has room (same address, still on a
    /// line), with exactly `len` elements.
    #[test]
    fn reused_buffers_keep_their_memory() {
        use crate::error::Operand;
        let mut buf = LineAligned::try_zeroed(1000, 0.0f32, Operand::Key).unwrap();
        let ptr = buf.as_ptr();
        for len in [1000, 10, 0, 999] {
            buf = buf.try_reuse(len, 0.0, Operand::Key).unwrap();
            assert_eq!((buf.as_ptr(), buf.len()), (ptr, len));
            buf.fill(7.0);
        }
        // Past its room: a new buffer, on a line, zero.
        buf = buf.try_reuse(5000, 0.0, Operand::Key).unwrap();
        assert_eq!((buf.len(), buf.as_ptr() as usize % LINE), (5000, 0));
        assert!(buf.iter().all(|&x| x == 0.0));
    }
}
