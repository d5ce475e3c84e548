//! Validation: the public functions check every shape, value and option once, here, and
//! hand a [`Spec`] to the kernels, which then trust their inputs.

use std::borrow::Cow;
use std::ops::Range;

use crate::Element;
use crate::columns::for_each_column;
use crate::cpu::CpuPath;
use crate::dropout::DropoutMask;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::heads::HeadLayout;
use crate::kernel::simd::with_path_features;
use crate::options::{AttentionOptions, Causal, MatRef, Parallelism};
use crate::score::{Band, values_need_scaling};
use crate::view::block;

/// A checked attention problem: shapes, the resolved scale and the score modifiers.
#[derive(Clone, Debug)]
pub(crate) struct Spec<'a, T: Element> {
    pub q: MatRef<'a, T>,
    pub k: MatRef<'a, T>,
    pub v: MatRef<'a, T>,
    pub n_q: usize,
    pub n_kv: usize,
    /// The largest |v|: decides whether `Σ_j p_j·v_j` needs scaling (see `value_scale`),
    /// and bounds every output entry (a convex combination of values).
    pub v_max_abs: T,
    /// The largest |q| and |k|.
    pub q_max_abs: T,
    pub k_max_abs: T,
    /// Whether every score, at every position and every step of its definition, is
    /// provably at most a quarter of the type's range (see [`Spec::scores_in_range`]).
    /// When it is not, the careful path computes the call (`kernel/careful.rs`).
    pub scores_in_range: bool,
    pub d_k: usize,
    pub d_v: usize,
    pub scale: T,
    /// `diag(i) = i + diag_offset`.
    pub diag_offset: i64,
    /// Positional band from causal and window (see [`Band`]).
    pub band: Band,
    pub mask: Option<MatRef<'a, bool>>,
    pub key_mask: Option<&'a [bool]>,
    pub bias: Option<MatRef<'a, T>>,
    pub softcap: Option<T>,
    pub alibi_slope: Option<T>,
    /// Dropout on the weights (see `dropout.rs`), with this block's stream.
    pub dropout: Option<DropoutMask<T>>,
    /// The bound on every output entry: `max|v|`, times `1/(1 − p)` with dropout (a
    /// convex combination of values, scaled).
    pub out_max: T,
}

/// Entries up to which [`check_finite`] scans without vectors (the 2 × 2 seed's 4).
const TINY_SCAN_ENTRIES: usize = 16;

/// The first NaN or infinity of `m`, in column-major order, as an error; else the largest
/// magnitude in `m`.
///
/// One branch-free pass; only if something is not finite, a second pass
/// ([`first_non_finite`]) finds the first such entry. Up to [`TINY_SCAN_ENTRIES`]
/// entries are scanned right here, entry by entry and by index (any strides), and this
/// part is inlined: for a handful of entries, dispatching to the vector scan, making a
/// column view per column or the call itself cost more than the scan (the 2 × 2 seed call
/// scans three operands of four entries). Larger operands go to the scan of the default
/// CPU path (`simd.rs`, `abs_max_bits`: one loop per path; compiled for SSE2 as a plain
/// loop it was a seventh of an f32 n 64 d 64 call on Zen 5). Both are exact: the same
/// result on every path.
#[inline(always)]
pub(crate) fn check_finite<T: Element>(
    operand: Operand,
    m: &MatRef<'_, T>,
) -> Result<T, AttentionError> {
    if m.len() > TINY_SCAN_ENTRIES {
        return check_finite_scan(operand, m);
    }
    let (mut max, mut finite) = (T::zero(), true);
    for c in 0..m.ncols() {
        for r in 0..m.nrows() {
            let x = m[(r, c)];
            finite &= x.finite();
            max = if x.abs() > max { x.abs() } else { max };
        }
    }
    if finite {
        Ok(max)
    } else {
        Err(first_non_finite(operand, m))
    }
}

/// [`check_finite`] of an operand of more than [`TINY_SCAN_ENTRIES`] entries.
fn check_finite_scan<T: Element>(operand: Operand, m: &MatRef<'_, T>) -> Result<T, AttentionError> {
    let max_bits = T::abs_max_scan(CpuPath::detect())(m);
    if max_bits < T::INFINITY_BITS {
        Ok(T::from_abs_bits(max_bits))
    } else {
        Err(first_non_finite(operand, m))
    }
}

/// The error for the first NaN or infinity of `m` in column-major order, which the caller
/// has seen.
#[cold]
fn first_non_finite<T: Element>(operand: Operand, m: &MatRef<'_, T>) -> AttentionError {
    for c in 0..m.ncols() {
        for r in 0..m.nrows() {
            let x = m[(r, c)];
            if !x.finite() {
                return AttentionError::NonFinite {
                    operand,
                    row: r,
                    column: c,
                    value: x.to_f64(),
                };
            }
        }
    }
    unreachable!("a non-finite entry was seen in the first pass")
}

/// An `_into` function's output has `rows` rows (one per query) and `columns` columns
/// (`d_v`, or `h_q·d_v` for a multi-head call): the rule of every `_into` form.
pub(crate) fn check_output<T>(
    output: &crate::view::MatMut<'_, T>,
    rows: usize,
    columns: usize,
    rule: &'static str,
) -> Result<(), AttentionError> {
    check_dim(
        Operand::Output,
        Axis::Rows,
        output.nrows(),
        rows,
        Operand::Query,
        rule,
    )?;
    check_dim(
        Operand::Output,
        Axis::Columns,
        output.ncols(),
        columns,
        Operand::Value,
        rule,
    )
}

/// V has one row per key.
fn check_value_rows<T>(k: &MatRef<'_, T>, v: &MatRef<'_, T>) -> Result<(), AttentionError> {
    check_dim(
        Operand::Value,
        Axis::Rows,
        v.nrows(),
        k.nrows(),
        Operand::Key,
        "one value row per key: n_kv must match",
    )
}

/// The largest magnitudes of Q, K and V.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaxAbs<T> {
    pub q: T,
    pub k: T,
    pub v: T,
}

/// K has Q's width, V one row per key.
fn check_qkv_shapes<T>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
) -> Result<(), AttentionError> {
    check_dim(
        Operand::Key,
        Axis::Columns,
        k.ncols(),
        q.ncols(),
        Operand::Query,
        "d_k must match",
    )?;
    check_value_rows(k, v)
}

/// Entries from which a validation scan (Q, K and V; a bias) is split over rayon's threads
/// when the call is parallel: below it, handing the pieces to the threads costs more than
/// the scan.
const PARALLEL_SCAN_ENTRIES: usize = 1 << 18;

/// Checks the shapes of Q, K, V against each other and their values for NaN/∞; returns
/// their largest magnitudes. Inlined: returned through memory, the three magnitudes were
/// written one by one and read back together, a failed store forwarding in tiny calls.
#[inline(always)]
pub(crate) fn check_qkv<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    parallel: bool,
) -> Result<MaxAbs<T>, AttentionError> {
    check_qkv_shapes(q, k, v)?;
    // Large inputs are scanned in parallel (the scan is the only serial O(n·d) pass of a
    // call); errors are still reported in the order Q, K, V.
    let large = q.len() + k.len() + v.len() >= PARALLEL_SCAN_ENTRIES;
    if !(parallel && large) {
        // One after the other, each result taken as it comes (a tuple of three results,
        // each holding a possible error, was copied around: a tenth of the 2 × 2 call).
        return Ok(MaxAbs {
            q: check_finite(Operand::Query, q)?,
            k: check_finite(Operand::Key, k)?,
            v: check_finite(Operand::Value, v)?,
        });
    }
    let (rq, (rk, rv)) = rayon::join(
        || check_finite(Operand::Query, q),
        || {
            rayon::join(
                || check_finite(Operand::Key, k),
                || check_finite(Operand::Value, v),
            )
        },
    );
    Ok(MaxAbs {
        q: rq?,
        k: rk?,
        v: rv?,
    })
}

/// What bounds the magnitude of every score (see [`scores_in_range`]); all in f64.
struct ScoreBound {
    d_k: usize,
    q_max: f64,
    k_max: f64,
    scale: f64,
    softcap: Option<f64>,
    /// `|m| · max |diag(i) − j|`: the largest ALiBi term.
    alibi: Option<f64>,
    /// The lowest and highest finite bias entries.
    bias: (f64, f64),
}

/// The largest `|diag(i) − j|` over `i < n_q`, `j < n_kv`, `diag(i) = i + diag_offset`
/// (reached at a corner of the score matrix).
fn max_distance(n_q: usize, n_kv: usize, diag_offset: i64) -> f64 {
    if n_q == 0 || n_kv == 0 {
        return 0.0;
    }
    let (i_last, j_last) = ((n_q - 1) as f64, (n_kv - 1) as f64);
    let off = diag_offset as f64;
    [off, off - j_last, i_last + off, i_last + off - j_last]
        .into_iter()
        .map(f64::abs)
        .fold(0.0, f64::max)
}

/// Whether every score is provably far inside the type's range, so that the fast kernels
/// (which compute scores in `T` in any order and do not look for overflow in the score
/// modifiers) cannot produce a non-finite score anywhere.
///
/// With `u` the unit roundoff of `T` and `γ = 1 + 2(d_k + 4)·u` covering the rounding of
/// every step, every computed score satisfies, at every step of its definition:
/// ```text
/// |Σ_p q_ip·k_jp|              ≤ R  = γ·d_k·max|Q|·max|K|
/// |scale·q·k|                  ≤ S  = γ·R·|scale|          (then ≤ c after softcap c)
/// |s − ALiBi|                  ≤ SA = S' + γ·|m|·max|diag(i) − j|
/// s + bias                     ∈ [b_lo − SA, b_hi + SA]
/// ```
/// The fast path is used when `R`, `S` and `SA` are ≤ MAX/4, `b_hi + SA ≤ MAX/2` and
/// `b_lo − SA` rounds to a finite number (a bias of −MAX, the common "masked" value,
/// stays allowed). Outside these bounds the careful path decides every score exactly.
/// The bounds are computed in f64, where f32's range cannot overflow; for f64 an
/// overflowing bound is +∞ and fails the test.
fn scores_in_range<T: Element>(b: ScoreBound) -> bool {
    let max = T::MAX.to_f64();
    let gamma = 1.0 + 2.0 * (b.d_k as f64 + 4.0) * T::EPSILON.to_f64();
    let raw = gamma * b.d_k as f64 * b.q_max * b.k_max;
    let scaled = gamma * raw * b.scale.abs();
    let capped = b.softcap.map_or(scaled, |c| scaled.min(c));
    let with_alibi = capped + gamma * b.alibi.unwrap_or(0.0);
    let (b_lo, b_hi) = b.bias;
    // The lowest score must round to a finite value in `T`: for f32 (computed here in
    // f64) it may lie up to a quarter of an ulp of MAX below −MAX; for f64 the f64
    // computation itself rounds like the kernel's.
    let lowest_ok = if T::EPSILON.to_f64() > 1e-10 {
        b_lo - with_alibi >= -max - T::EPSILON.to_f64() * max / 8.0
    } else {
        (b_lo - gamma * with_alibi).is_finite()
    };
    raw <= max / 4.0
        && scaled <= max / 4.0
        && with_alibi <= max / 4.0
        && b_hi + with_alibi <= max / 2.0
        && lowest_ok
}

/// The first checks of a single-head call, in [`Spec::new`]'s order: the shapes of Q, K
/// and V, their values, then the options' scalars. Returns the largest magnitudes and the
/// resolved scale.
#[inline(always)]
fn check_operands<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    options: &AttentionOptions<'_, T>,
) -> Result<(MaxAbs<T>, T), AttentionError> {
    let parallel = options.parallelism == Parallelism::Rayon;
    let max_abs = check_qkv(q, k, v, parallel)?;
    let scale = check_scalars(options, q.ncols())?;
    Ok((max_abs, scale))
}

/// What a single-head call whose options set nothing but a scale, parallelism or
/// dropout's stream ([`AttentionOptions::sets_only_scale`]) needs once checked, when its
/// scores are provably in range and its values far from the type's maximum: the row
/// path's entry for tiny calls (`kernel/direct.rs`, `tiny`) computes it from this and Q,
/// K, V, without assembling a [`Spec`] (for such a call a [`Spec`] would hold the same
/// scale and `v_max_abs`, no score modifier, `scores_in_range` and no value scaling).
pub(crate) struct Plain<T> {
    pub scale: T,
    /// The largest |v|: bounds every output entry.
    pub v_max_abs: T,
}

impl<T: Element> Plain<T> {
    /// Validates as [`Spec::new`] does (the same checks in the same order, so the same
    /// error), for options that set only a scale. `None` when the options set anything
    /// else, or when the call needs the full route: scores not provably in range (the
    /// careful path), values that need scaling. Nothing is written either way. Q, K and V
    /// are taken by reference: copied into a callee, their fields written 8 bytes at a
    /// time and read back 16 at a time stalled the 2 × 2 call (failed store forwarding).
    #[inline]
    pub(crate) fn new(
        q: &MatRef<'_, T>,
        k: &MatRef<'_, T>,
        v: &MatRef<'_, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Option<Result<Self, AttentionError>> {
        if !options.sets_only_scale() {
            return None;
        }
        let (max_abs, scale) = match check_operands(q, k, v, options) {
            Ok(checked) => checked,
            Err(e) => return Some(Err(e)),
        };
        let in_range = scores_in_range::<T>(ScoreBound {
            d_k: q.ncols(),
            q_max: max_abs.q.to_f64(),
            k_max: max_abs.k.to_f64(),
            scale: scale.to_f64(),
            softcap: None,
            alibi: None,
            bias: (0.0, 0.0),
        });
        if !in_range || values_need_scaling(max_abs.v, k.nrows()) {
            return None;
        }
        Some(Ok(Plain {
            scale,
            v_max_abs: max_abs.v,
        }))
    }
}

impl<'a, T: Element> Spec<'a, T> {
    /// Validates Q, K, V and the options of a single-head call (one sequence, one head).
    #[inline]
    pub(crate) fn new(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        options: &AttentionOptions<'a, T>,
    ) -> Result<Self, AttentionError> {
        let (max_abs, scale) = check_operands(&q, &k, &v, options)?;
        let (n_q, n_kv) = (q.nrows(), k.nrows());
        check_lists(options, 1, 1)?;
        check_query_rows(options, 1, n_q)?;
        check_sequence_mask(options, 0, n_q, n_kv)?;
        check_key_mask(options, n_kv)?;
        let bias_range = check_sequence_bias(options, 0, n_q, n_kv)?;
        check_dropout(options, (n_q, n_kv), max_abs.v)?;
        let block = block_options(options, 0, 0, 0..n_kv);
        Ok(Spec::assemble(q, k, v, max_abs, scale, bias_range, &block))
    }

    /// Validates everything [`Spec::new`] does except the values of K and V: for the
    /// decoding kernel, which finds their largest magnitudes (and any NaN/∞) as it reads
    /// them ([`Deferred::complete`] then decides). `None` when any check fails: the caller
    /// then calls [`Spec::new`], which reports the first failure in its order (Q, K, V,
    /// then the options), so that deferring never changes which error a call returns.
    pub(crate) fn deferred(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        options: &AttentionOptions<'a, T>,
    ) -> Option<Deferred<'a, T>> {
        // Dropout's checks need max|V|, and its calls never take the decoding kernel.
        if options.dropout.is_some_and(|d| d.p > 0.0) {
            return None;
        }
        check_qkv_shapes(&q, &k, &v).ok()?;
        let q_max = check_finite(Operand::Query, &q).ok()?;
        let (n_q, d_k) = q.shape();
        let n_kv = k.nrows();
        let scale = check_scalars(options, d_k).ok()?;
        check_lists(options, 1, 1).ok()?;
        check_query_rows(options, 1, n_q).ok()?;
        check_sequence_mask(options, 0, n_q, n_kv).ok()?;
        check_key_mask(options, n_kv).ok()?;
        let bias_range = check_sequence_bias(options, 0, n_q, n_kv).ok()?;
        Some(Deferred {
            q,
            k,
            v,
            q_max,
            scale,
            bias_range,
            options: block_options(options, 0, 0, 0..n_kv).into_owned(),
        })
    }

    /// The spec of checked inputs: `options` are those of one block (see
    /// [`block_options`]), `scale` and `bias_range` what [`check_scalars`] and
    /// [`check_sequence_bias`] returned.
    #[inline(always)]
    pub(crate) fn assemble(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        max_abs: MaxAbs<T>,
        scale: T,
        bias_range: (f64, f64),
        options: &AttentionOptions<'a, T>,
    ) -> Self {
        let (n_q, d_k) = q.shape();
        let (n_kv, d_v) = (k.nrows(), v.ncols());
        // Shapes are bounded by memory, far below 2^62, so this cast is exact.
        let (first, total) = options.query_rows.unwrap_or((0, n_q));
        let diag_offset = match options.causal {
            Some(Causal::TopLeft) => first as i64,
            _ => first as i64 + n_kv as i64 - total as i64,
        };
        let band = Band::new(diag_offset, options.causal.is_some(), options.window);
        let (seq, head) = options.dropout_stream;
        // p = 0 is no dropout at all (the same route, hence the same bits).
        let dropout = options
            .dropout
            .filter(|d| d.p > 0.0)
            .map(|d| DropoutMask::<T>::new(d, seq, head, first));
        // max|v|/(1 − p), rounded up by 4 ulp (at most MAX/4: `check_dropout`).
        let out_max = match dropout {
            Some(d) => T::from_f64_rounded(
                max_abs.v.to_f64() * d.scale.to_f64() * (1.0 + 4.0 * T::EPSILON.to_f64()),
            ),
            None => max_abs.v,
        };
        let scores_in_range = scores_in_range::<T>(ScoreBound {
            d_k,
            q_max: max_abs.q.to_f64(),
            k_max: max_abs.k.to_f64(),
            scale: scale.to_f64(),
            softcap: options.softcap.map(T::to_f64),
            alibi: options
                .alibi_slope
                .map(|m| m.to_f64().abs() * max_distance(n_q, n_kv, diag_offset)),
            bias: bias_range,
        });
        Spec {
            q,
            k,
            v,
            n_q,
            n_kv,
            v_max_abs: max_abs.v,
            q_max_abs: max_abs.q,
            k_max_abs: max_abs.k,
            scores_in_range,
            d_k,
            d_v,
            scale,
            diag_offset,
            band,
            mask: options.mask,
            key_mask: options.key_mask,
            bias: options.bias,
            softcap: options.softcap,
            alibi_slope: options.alibi_slope,
            dropout,
            out_max,
        }
    }
}

/// A single-head call checked except for the values of K and V (see [`Spec::deferred`]).
pub(crate) struct Deferred<'a, T: Element> {
    q: MatRef<'a, T>,
    k: MatRef<'a, T>,
    v: MatRef<'a, T>,
    q_max: T,
    scale: T,
    bias_range: (f64, f64),
    options: AttentionOptions<'a, T>,
}

impl<'a, T: Element> Deferred<'a, T> {
    /// The spec as it would be if K and V were 0: its route says whether the call would
    /// reach the decoding kernel at all (larger values only ever lead elsewhere).
    pub(crate) fn provisional(&self) -> Spec<'a, T> {
        self.complete(0, 0).expect("0 is finite")
    }

    /// The spec given the largest `abs_bits` of K and V (as [`check_finite`]'s scan gives
    /// them); `None` if either is NaN/∞.
    pub(crate) fn complete(&self, k_bits: u64, v_bits: u64) -> Option<Spec<'a, T>> {
        if k_bits >= T::INFINITY_BITS || v_bits >= T::INFINITY_BITS {
            return None;
        }
        let max_abs = MaxAbs {
            q: self.q_max,
            k: T::from_abs_bits(k_bits),
            v: T::from_abs_bits(v_bits),
        };
        Some(Spec::assemble(
            self.q,
            self.k,
            self.v,
            max_abs,
            self.scale,
            self.bias_range,
            &self.options,
        ))
    }
}

/// The options of block (sequence `seq`, query head `head`) of a call whose keys of that
/// sequence are rows `keys` of K: the per-head slope and the sequence's mask, bias and
/// key-mask entries in the single-head fields. A single-head call is block (0, 0) of a
/// batch of one sequence. The lists' lengths have been checked ([`check_lists`]).
///
/// `options` themselves, borrowed, when they already are the block's (no list to pick
/// from, the block's dropout stream, the key mask whole): a single-head call's usual
/// case, where the copy was a tenth of the 2×2 seed call.
pub(crate) fn block_options<'o, 'a, T: Element>(
    options: &'o AttentionOptions<'a, T>,
    seq: usize,
    head: usize,
    keys: std::ops::Range<usize>,
) -> Cow<'o, AttentionOptions<'a, T>> {
    let unchanged = options.alibi_slopes.is_none()
        && options.sequence_masks.is_none()
        && options.sequence_biases.is_none()
        && options.dropout_stream == (seq, head)
        && options.key_mask.is_none_or(|m| keys == (0..m.len()));
    if unchanged {
        return Cow::Borrowed(options);
    }
    let mut block = options.clone();
    if let Some(slopes) = options.alibi_slopes {
        block.alibi_slope = Some(slopes[head]);
    }
    if let Some(masks) = options.sequence_masks {
        block.mask = Some(masks[seq]);
    }
    if let Some(biases) = options.sequence_biases {
        block.bias = Some(biases[seq]);
    }
    block.key_mask = options.key_mask.map(|m| &m[keys]);
    block.dropout_stream = (seq, head);
    block.alibi_slopes = None;
    block.sequence_masks = None;
    block.sequence_biases = None;
    Cow::Owned(block)
}

/// The per-head and per-sequence lists have one entry per query head / sequence and do
/// not clash with their single-value forms; a single mask or bias needs a call of one
/// sequence.
pub(crate) fn check_lists<T: Element>(
    options: &AttentionOptions<'_, T>,
    heads_q: usize,
    sequences: usize,
) -> Result<(), AttentionError> {
    let clash = |option, rule| Err(AttentionError::InvalidOption { option, rule });
    if options.alibi_slope.is_some() && options.alibi_slopes.is_some() {
        return clash(
            "with_alibi_slopes",
            "set one slope for every head (with_alibi_slope) or one per query head, not both",
        );
    }
    if options.mask.is_some() && options.sequence_masks.is_some() {
        return clash(
            "with_sequence_masks",
            "set one mask (with_mask) or one per sequence, not both",
        );
    }
    if options.bias.is_some() && options.sequence_biases.is_some() {
        return clash(
            "with_sequence_biases",
            "set one bias (with_bias) or one per sequence, not both",
        );
    }
    if sequences != 1 && options.mask.is_some() {
        return clash(
            "with_mask",
            "a mask covers one sequence; a batch of several takes with_sequence_masks",
        );
    }
    if sequences != 1 && options.bias.is_some() {
        return clash(
            "with_bias",
            "a bias covers one sequence; a batch of several takes with_sequence_biases",
        );
    }
    if let Some(slopes) = options.alibi_slopes {
        check_dim(
            Operand::AlibiSlopes,
            Axis::Entries,
            slopes.len(),
            heads_q,
            Operand::Query,
            "one ALiBi slope per query head",
        )?;
    }
    let per_sequence = "one per sequence of the batch";
    if let Some(masks) = options.sequence_masks {
        check_dim(
            Operand::SequenceMask(0),
            Axis::Entries,
            masks.len(),
            sequences,
            Operand::QueryLengths,
            per_sequence,
        )?;
    }
    if let Some(biases) = options.sequence_biases {
        check_dim(
            Operand::SequenceBias(0),
            Axis::Entries,
            biases.len(),
            sequences,
            Operand::QueryLengths,
            per_sequence,
        )?;
    }
    Ok(())
}

/// The scale (explicit, or `1/√d_k`), after checking it, the softcap and the ALiBi slope.
pub(crate) fn check_scalars<T: Element>(
    options: &AttentionOptions<'_, T>,
    d_k: usize,
) -> Result<T, AttentionError> {
    let scale = match options.scale {
        Some(s) if s.finite() => s,
        Some(s) => return Err(AttentionError::InvalidScale { value: s.to_f64() }),
        None if d_k == 0 => return Err(AttentionError::ZeroHeadDim),
        None => T::one() / T::from_count(d_k).sqrt(),
    };
    if let Some(c) = options.softcap
        && !(c.finite() && c > T::zero())
    {
        return Err(AttentionError::InvalidSoftcap { value: c.to_f64() });
    }
    let slopes = options
        .alibi_slope
        .iter()
        .chain(options.alibi_slopes.into_iter().flatten());
    if let Some(m) = slopes.into_iter().find(|m| !m.finite()) {
        return Err(AttentionError::InvalidAlibiSlope { value: m.to_f64() });
    }
    if let Some(d) = options.dropout
        && !(0.0..1.0).contains(&d.p)
    {
        return Err(AttentionError::InvalidOption {
            option: "dropout",
            rule: "the probability p is in [0, 1)",
        });
    }
    Ok(scale)
}

/// With dropout: indices that fit the generator's 32-bit counter words, and values whose
/// sums, scaled by `1/(1 − p)`, cannot overflow (so that no value scaling is needed and
/// every output is within `out_max`).
pub(crate) fn check_dropout<T: Element>(
    options: &AttentionOptions<'_, T>,
    (n_q, n_kv): (usize, usize),
    v_max: T,
) -> Result<(), AttentionError> {
    let Some(d) = options.dropout.filter(|d| d.p > 0.0) else {
        return Ok(());
    };
    // Dropout draws at row `first + i` of `total` (`with_query_rows`).
    let rows = options.query_rows.map_or(n_q, |(_, total)| total);
    if rows.max(n_kv) as u64 > u64::from(u32::MAX) {
        return Err(AttentionError::InvalidOption {
            option: "dropout",
            rule: "at most 2^32 - 1 queries and keys per sequence",
        });
    }
    let bound = v_max.to_f64() / (1.0 - d.p) / T::MAX.to_f64() * 2.0 * (n_kv as f64 + 1.0);
    if bound > 1.0 {
        return Err(AttentionError::InvalidOption {
            option: "dropout",
            rule: "values times 2(n_kv + 1)/(1 - p) must stay below the type's maximum",
        });
    }
    Ok(())
}

/// The key mask has one entry per key (of the whole packed batch).
pub(crate) fn check_key_mask<T: Element>(
    options: &AttentionOptions<'_, T>,
    n_kv: usize,
) -> Result<(), AttentionError> {
    if let Some(key_mask) = options.key_mask {
        check_dim(
            Operand::KeyMask,
            Axis::Entries,
            key_mask.len(),
            n_kv,
            Operand::Key,
            "one key-mask entry per key",
        )?;
    }
    Ok(())
}

/// `with_query_rows(first, total)`: the call's `n_q` queries lie within the `total` rows,
/// and it has one sequence (a packed batch counts each sequence's rows from its start).
pub(crate) fn check_query_rows<T: Element>(
    options: &AttentionOptions<'_, T>,
    sequences: usize,
    n_q: usize,
) -> Result<(), AttentionError> {
    let Some((first, total)) = options.query_rows else {
        return Ok(());
    };
    let reject = |rule| {
        Err(AttentionError::InvalidOption {
            option: "with_query_rows",
            rule,
        })
    };
    if sequences > 1 {
        return reject(
            "query rows place the queries of one sequence; a packed batch counts each sequence's rows from its start",
        );
    }
    if first.checked_add(n_q).is_none_or(|end| end > total) {
        return reject("the queries are rows first..first + n_q of total: first + n_q <= total");
    }
    Ok(())
}

/// Sequence `seq`'s mask (the single one, or its entry of the per-sequence list) is
/// `n_q × n_kv`.
pub(crate) fn check_sequence_mask<T: Element>(
    options: &AttentionOptions<'_, T>,
    seq: usize,
    n_q: usize,
    n_kv: usize,
) -> Result<(), AttentionError> {
    let mask = match options.sequence_masks {
        Some(masks) => Some((Operand::SequenceMask(seq), &masks[seq])),
        None => options.mask.as_ref().map(|m| (Operand::Mask, m)),
    };
    if let Some((operand, mask)) = mask {
        let rule = "the mask is n_q x n_kv";
        check_dim(operand, Axis::Rows, mask.nrows(), n_q, Operand::Query, rule)?;
        check_dim(
            operand,
            Axis::Columns,
            mask.ncols(),
            n_kv,
            Operand::Key,
            rule,
        )?;
    }
    Ok(())
}

/// Sequence `seq`'s bias (the single one, or its entry of the per-sequence list) is
/// `n_q × n_kv` with entries finite or −∞; returns the range of its finite entries (0, 0
/// without a bias), which goes into the score bound.
pub(crate) fn check_sequence_bias<T: Element>(
    options: &AttentionOptions<'_, T>,
    seq: usize,
    n_q: usize,
    n_kv: usize,
) -> Result<(f64, f64), AttentionError> {
    let bias = match options.sequence_biases {
        Some(biases) => Some((Operand::SequenceBias(seq), &biases[seq])),
        None => options.bias.as_ref().map(|b| (Operand::Bias, b)),
    };
    match bias {
        Some((operand, bias)) => check_bias(
            operand,
            bias,
            n_q,
            n_kv,
            options.parallelism == Parallelism::Rayon,
            // An unsupported forced path is reported by the call's own check; the scan
            // gives the same result on every path.
            CpuPath::for_call(options.cpu_path).map_or(CpuPath::Portable, |(path, _)| path),
        ),
        None => Ok((0.0, 0.0)),
    }
}

/// The range of the finite bias entries, widened to include 0, and whether any entry is
/// NaN or +∞, in 16 float lanes so that the pass vectorises even for baseline x86-64: −∞
/// (a masked entry) counts as 0, which changes nothing since the range includes 0; `y·0`
/// is NaN exactly for NaN and +∞ (then the poison sum is NaN).
struct BiasLanes<T> {
    lo: [T; 16],
    hi: [T; 16],
    poison: [T; 16],
}

impl<T: Element> BiasLanes<T> {
    fn new() -> Self {
        BiasLanes {
            lo: [T::zero(); 16],
            hi: [T::zero(); 16],
            poison: [T::zero(); 16],
        }
    }

    #[inline(always)]
    fn one(lanes: &mut [[T; 16]; 3], t: usize, x: T) {
        let [lo, hi, poison] = lanes;
        let y = if x == T::NEG_INFINITY { T::zero() } else { x };
        lo[t] = if y < lo[t] { y } else { lo[t] };
        hi[t] = if y > hi[t] { y } else { hi[t] };
        poison[t] += y * T::zero();
    }

    #[inline(always)]
    fn add(&mut self, col: &[T]) {
        // On local copies, which stay in registers: updating `self` in place stored and
        // reloaded the lanes every step (with masked stores, which stall the reload).
        let mut lanes = [self.lo, self.hi, self.poison];
        let chunks = col.chunks_exact(16);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (t, &x) in chunk.iter().enumerate() {
                Self::one(&mut lanes, t, x);
            }
        }
        for (t, &x) in rest.iter().enumerate() {
            Self::one(&mut lanes, t, x);
        }
        [self.lo, self.hi, self.poison] = lanes;
    }

    /// `(lowest, highest, any NaN/+∞)`, the range including 0.
    fn finish(&self) -> (T, T, bool) {
        let lo = self
            .lo
            .iter()
            .fold(T::zero(), |a, &b| if b < a { b } else { a });
        let hi = self
            .hi
            .iter()
            .fold(T::zero(), |a, &b| if b > a { b } else { a });
        (lo, hi, self.poison.iter().any(|p| !p.finite()))
    }
}

/// Checks the bias's shape (`n_q × n_kv`) and entries (finite or −∞: −∞ masks a position,
/// NaN and +∞ have no meaning); returns the range of its finite entries, which goes into
/// the score bound.
///
/// Large biases (`PARALLEL_SCAN_ENTRIES`) are scanned in column blocks over rayon's
/// threads when `parallel`; the result does not depend on the split (a minimum, a
/// maximum, a flag).
fn check_bias<T: Element>(
    operand: Operand,
    bias: &MatRef<'_, T>,
    n_q: usize,
    n_kv: usize,
    parallel: bool,
    path: CpuPath,
) -> Result<(f64, f64), AttentionError> {
    let rule = "the bias is n_q x n_kv";
    check_dim(operand, Axis::Rows, bias.nrows(), n_q, Operand::Query, rule)?;
    check_dim(
        operand,
        Axis::Columns,
        bias.ncols(),
        n_kv,
        Operand::Key,
        rule,
    )?;
    // One vectorised pass for the range and whether anything is NaN/+∞; only then a
    // second pass finds the first such entry.
    let scan = |columns: std::ops::Range<usize>| {
        let mut lanes = BiasLanes::new();
        let block = bias.columns(columns.start, columns.len());
        // Compiled for the call's CPU path (16 lanes of f32 are one AVX-512 register
        // instead of four SSE2 ones).
        with_path_features(
            path,
            #[inline(always)]
            || {
                for_each_column(
                    &block,
                    0..block.nrows(),
                    &mut Vec::new(),
                    #[inline(always)]
                    |_, col| lanes.add(col),
                )
            },
        );
        lanes.finish()
    };
    let n = bias.ncols();
    let (lo, hi, bad) = if parallel && bias.len() >= PARALLEL_SCAN_ENTRIES && n > 1 {
        use rayon::prelude::*;
        let blocks = (2 * rayon::current_num_threads()).min(n);
        (0..blocks)
            .into_par_iter()
            .map(|b| scan(b * n / blocks..(b + 1) * n / blocks))
            .reduce(
                || (T::zero(), T::zero(), false),
                |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 || b.2),
            )
    } else {
        scan(0..n)
    };
    if !bad {
        return Ok((lo.to_f64(), hi.to_f64()));
    }
    let mut first_bad = None;
    for_each_column(bias, 0..bias.nrows(), &mut Vec::new(), |c, col| {
        for (r, &x) in col.iter().enumerate() {
            if !x.finite() && x != T::NEG_INFINITY && first_bad.is_none() {
                first_bad = Some((r, c, x));
            }
        }
    });
    match first_bad {
        Some((row, column, x)) => Err(AttentionError::NonFinite {
            operand,
            row,
            column,
            value: x.to_f64(),
        }),
        None => unreachable!("a NaN/+inf entry was seen in the first pass"),
    }
}

/// One sequence of a packed batch: its rows of Q and its rows of K and V.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sequence {
    pub q_start: usize,
    pub n_q: usize,
    pub kv_start: usize,
    pub n_kv: usize,
}

/// A checked multi-head call: its layout and one [`Spec`] per (sequence, query head).
#[derive(Clone, Debug)]
pub(crate) struct Batch<'a, T: Element> {
    pub heads_q: usize,
    pub heads_kv: usize,
    pub d_v: usize,
    pub sequences: Vec<Sequence>,
    /// `specs[s · heads_q + h]`: sequence `s`, query head `h`, reading key/value head
    /// `h / (heads_q / heads_kv)`.
    pub specs: Vec<Spec<'a, T>>,
}

impl<'a, T: Element> Batch<'a, T> {
    /// The output's columns, `h_q · d_v`.
    pub(crate) fn out_columns(&self) -> usize {
        self.heads_q * self.d_v
    }

    /// Validates the layout, Q, K, V and the options of a multi-head call. Errors come in
    /// this order: head counts, column splits, V's rows, sequence lengths, NaN/∞ in Q, K,
    /// V (the first in column-major order of each), the scalars, the per-head and
    /// per-sequence lists, the masks, the key mask, the biases.
    pub(crate) fn new(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        layout: &HeadLayout<'_>,
        options: &AttentionOptions<'a, T>,
    ) -> Result<Self, AttentionError> {
        let (heads_q, heads_kv) = (layout.heads_q, layout.heads_kv);
        let (d_k, d_v) = check_head_split(&q, &k, &v, heads_q, heads_kv)?;
        let sequences = check_sequences(layout, q.nrows(), k.nrows())?;
        let group = heads_q / heads_kv;
        let q_blocks = head_blocks(q, &sequences, heads_q, d_k, true);
        let k_blocks = head_blocks(k, &sequences, heads_kv, d_k, false);
        let v_blocks = head_blocks(v, &sequences, heads_kv, d_v, false);
        let parallel = options.parallelism == Parallelism::Rayon;
        let q_rows: Vec<_> = sequences
            .iter()
            .map(|s| s.q_start..s.q_start + s.n_q)
            .collect();
        let kv_rows: Vec<_> = (sequences.iter())
            .map(|s| s.kv_start..s.kv_start + s.n_kv)
            .collect();
        let q_max = block_max_abs(Operand::Query, &q, &q_rows, (heads_q, d_k), parallel)?;
        let k_max = block_max_abs(Operand::Key, &k, &kv_rows, (heads_kv, d_k), parallel)?;
        let v_max = block_max_abs(Operand::Value, &v, &kv_rows, (heads_kv, d_v), parallel)?;

        let scale = check_scalars(options, d_k)?;
        check_lists(options, heads_q, sequences.len())?;
        for (s, seq) in sequences.iter().enumerate() {
            check_query_rows(options, sequences.len(), seq.n_q)?;
            check_sequence_mask(options, s, seq.n_q, seq.n_kv)?;
        }
        check_key_mask(options, k.nrows())?;
        let mut specs = Vec::with_capacity(q_blocks.len());
        for (s, seq) in sequences.iter().enumerate() {
            let bias_range = check_sequence_bias(options, s, seq.n_q, seq.n_kv)?;
            for h in 0..heads_q {
                let (iq, ikv) = (s * heads_q + h, s * heads_kv + h / group);
                let max_abs = MaxAbs {
                    q: q_max[iq],
                    k: k_max[ikv],
                    v: v_max[ikv],
                };
                check_dropout(options, (seq.n_q, seq.n_kv), max_abs.v)?;
                let keys = seq.kv_start..seq.kv_start + seq.n_kv;
                let block = block_options(options, s, h, keys);
                specs.push(Spec::assemble(
                    q_blocks[iq],
                    k_blocks[ikv],
                    v_blocks[ikv],
                    max_abs,
                    scale,
                    bias_range,
                    &block,
                ));
            }
        }
        Ok(Batch {
            heads_q,
            heads_kv,
            d_v,
            sequences,
            specs,
        })
    }
}

/// The head widths `(d_k, d_v)`: Q's columns split into `heads_q` heads of width `d_k`,
/// K's are `heads_kv · d_k`, V's split into `heads_kv` heads; V has K's rows.
fn check_head_split<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    heads_q: usize,
    heads_kv: usize,
) -> Result<(usize, usize), AttentionError> {
    if heads_q == 0 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
        return Err(AttentionError::InvalidHeads { heads_q, heads_kv });
    }
    let split = |operand, columns: usize, heads: usize, head_width| {
        Err(AttentionError::HeadSplit {
            operand,
            columns,
            heads,
            head_width,
        })
    };
    if !q.ncols().is_multiple_of(heads_q) {
        return split(Operand::Query, q.ncols(), heads_q, None);
    }
    let d_k = q.ncols() / heads_q;
    if k.ncols() != heads_kv * d_k {
        return split(Operand::Key, k.ncols(), heads_kv, Some(d_k));
    }
    if !v.ncols().is_multiple_of(heads_kv) {
        return split(Operand::Value, v.ncols(), heads_kv, None);
    }
    check_value_rows(k, v)?;
    Ok((d_k, v.ncols() / heads_kv))
}

/// The sequences of the layout (one spanning all rows when it gives no lengths), after
/// checking that there are as many key lengths as query lengths and that each list sums
/// to the rows it splits.
fn check_sequences(
    layout: &HeadLayout<'_>,
    q_rows: usize,
    kv_rows: usize,
) -> Result<Vec<Sequence>, AttentionError> {
    let Some((lens_q, lens_kv)) = layout.seqlens else {
        return Ok(vec![Sequence {
            q_start: 0,
            n_q: q_rows,
            kv_start: 0,
            n_kv: kv_rows,
        }]);
    };
    check_dim(
        Operand::KeyLengths,
        Axis::Entries,
        lens_kv.len(),
        lens_q.len(),
        Operand::QueryLengths,
        "one key length per sequence",
    )?;
    // A sum past usize::MAX is reported as usize::MAX (it cannot equal the rows).
    let sum = |lens: &[usize]| lens.iter().try_fold(0usize, |a, &n| a.checked_add(n));
    for (operand, lens, rows) in [
        (Operand::Query, lens_q, q_rows),
        (Operand::Key, lens_kv, kv_rows),
    ] {
        let total = sum(lens).unwrap_or(usize::MAX);
        if total != rows {
            return Err(AttentionError::SequenceLengths {
                operand,
                sum: total,
                rows,
            });
        }
    }
    let (mut q_start, mut kv_start) = (0, 0);
    Ok(lens_q
        .iter()
        .zip(lens_kv)
        .map(|(&n_q, &n_kv)| {
            let seq = Sequence {
                q_start,
                n_q,
                kv_start,
                n_kv,
            };
            q_start += n_q;
            kv_start += n_kv;
            seq
        })
        .collect())
}

/// The blocks (sequence `s`, head `h`) of `m`, at index `s · heads + h`: rows of the
/// sequence's queries (`query_rows`) or keys, columns `h·width ..`.
fn head_blocks<'a, T: Element>(
    m: MatRef<'a, T>,
    sequences: &[Sequence],
    heads: usize,
    width: usize,
    query_rows: bool,
) -> Vec<MatRef<'a, T>> {
    let mut blocks = Vec::with_capacity(sequences.len() * heads);
    for seq in sequences {
        let (start, n) = if query_rows {
            (seq.q_start, seq.n_q)
        } else {
            (seq.kv_start, seq.n_kv)
        };
        for h in 0..heads {
            blocks.push(block(m, start..start + n, h * width..(h + 1) * width));
        }
    }
    blocks
}

/// Rows of consecutive sequences one task of [`block_max_abs`] scans at least (unless the
/// batch has fewer): each of its columns is then read in runs of at least this many rows.
const SCAN_TASK_ROWS: usize = 1 << 13;

/// The largest magnitude of each block (sequence `s`, head `h`) of `whole`, at index
/// `s · heads + h`: the rows `rows[s]` (consecutive sequences, in order) of the columns
/// `h·width ..`; the first NaN/∞ of the whole matrix (column-major, as a single-head call
/// reports it) as an error.
///
/// The scan runs column by column through the rows of many sequences at once, each
/// block's column one segment of the run (a task of one sequence scans its block at
/// once). Block by block, a batch of short sequences was read in runs of one sequence (a
/// few hundred rows) in as many places as the heads have columns, each in another page,
/// which the hardware prefetchers start anew at every run: at 64 sequences of 128 rows
/// the whole call was 8–16% slower (`docs/PERFORMANCE.md`). Large matrices
/// (`PARALLEL_SCAN_ENTRIES`) are scanned in pieces (a head's columns over
/// [`SCAN_TASK_ROWS`] rows or more) over rayon's threads when `parallel`: this scan is
/// otherwise a serial pass over all of Q, K and V before the threads start. Each block's
/// maximum is the same either way.
fn block_max_abs<T: Element>(
    operand: Operand,
    whole: &MatRef<'_, T>,
    rows: &[Range<usize>],
    (heads, width): (usize, usize),
    parallel: bool,
) -> Result<Vec<T>, AttentionError> {
    // Tasks: (head, consecutive sequences s0..s1).
    let mut tasks = Vec::new();
    let mut s0 = 0;
    while s0 < rows.len() {
        let (mut s1, mut n) = (s0, 0);
        while s1 < rows.len() && (n < SCAN_TASK_ROWS || s1 == s0) {
            n += rows[s1].len();
            s1 += 1;
        }
        tasks.extend((0..heads).map(|h| (h, s0..s1)));
        s0 = s1;
    }
    // One task's maxima, one per sequence; None at a NaN/∞.
    let scan = |(h, seqs): &(usize, Range<usize>)| -> Option<Vec<T>> {
        if seqs.len() == 1 {
            // One sequence (a single one, or one long enough for a task): its block at
            // once, each column one run.
            let r = &rows[seqs.start];
            let b = whole.view((r.start, h * width), (r.len(), width));
            return Some(vec![check_finite(operand, &b).ok()?]);
        }
        let mut max = vec![T::zero(); seqs.len()];
        for c in h * width..(h + 1) * width {
            for (m, s) in max.iter_mut().zip(seqs.clone()) {
                let segment = whole.view((rows[s].start, c), (rows[s].len(), 1));
                let x = check_finite(operand, &segment).ok()?;
                *m = if x > *m { x } else { *m };
            }
        }
        Some(max)
    };
    let maxima: Option<Vec<Vec<T>>> =
        if parallel && whole.len() >= PARALLEL_SCAN_ENTRIES && tasks.len() > 1 {
            use rayon::prelude::*;
            tasks.par_iter().map(scan).collect()
        } else {
            tasks.iter().map(scan).collect()
        };
    let Some(maxima) = maxima else {
        return Err(check_finite(operand, whole).expect_err("a block has a NaN/inf"));
    };
    let mut out = vec![T::zero(); rows.len() * heads];
    for ((h, seqs), max) in tasks.iter().zip(maxima) {
        for (s, m) in seqs.clone().zip(max) {
            out[s * heads + h] = m;
        }
    }
    Ok(out)
}

/// The specs of a call through a KV cache: one per query head of the new queries `q`
/// (`n_q × h_q·d_k`) against the `n_kv` kept keys, whose magnitudes `max_abs(j) =
/// (max|K|, max|V|)` of key/value head `j` the cache keeps (they are not re-read). `k_shape`
/// and `v_shape` are shape-only views (`n_kv × d_k`, `n_kv × d_v`): only a kernel that
/// reads the pages themselves may run these specs (`kernel::batch::paged`). `options`
/// are the call's, masks already refused. Errors: Q's NaN/∞, then the scalars and lists.
pub(crate) fn cached_specs<'a, T: Element>(
    q: MatRef<'a, T>,
    (k_shape, v_shape): (MatRef<'a, T>, MatRef<'a, T>),
    (heads_q, heads_kv): (usize, usize),
    max_abs: impl Fn(usize) -> (T, T),
    options: &AttentionOptions<'a, T>,
) -> Result<Vec<Spec<'a, T>>, AttentionError> {
    let (n_q, n_kv, d_k) = (q.nrows(), k_shape.nrows(), k_shape.ncols());
    let sequence = [Sequence {
        q_start: 0,
        n_q,
        kv_start: 0,
        n_kv,
    }];
    let q_blocks = head_blocks(q, &sequence, heads_q, d_k, true);
    let parallel = options.parallelism == Parallelism::Rayon;
    let one = [Range { start: 0, end: n_q }];
    let q_max = block_max_abs(Operand::Query, &q, &one, (heads_q, d_k), parallel)?;
    let scale = check_scalars(options, d_k)?;
    check_lists(options, heads_q, 1)?;
    Ok(q_blocks
        .into_iter()
        .zip(q_max)
        .enumerate()
        .map(|(h, (qb, q_max))| {
            let (k, v) = max_abs(h / (heads_q / heads_kv));
            let max_abs = MaxAbs { q: q_max, k, v };
            let block = block_options(options, 0, h, 0..n_kv);
            Spec::assemble(qb, k_shape, v_shape, max_abs, scale, (0.0, 0.0), &block)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use attention_testdata::gaussian;
    use nalgebra::DMatrix;

    /// Sequences of every kind the scan's tasks meet: one long enough for a task alone
    /// (the first), then empty ones, single rows and short ones gathered with a long one
    /// into one task, and a last task of short ones.
    const LENS: [usize; 10] = [9000, 0, 3, 1, 17, 0, 8200, 5, 40, 1];
    const HEADS: usize = 3;
    const WIDTH: usize = 8;

    /// Gaussian entries (|x| < 10 in practice) with one planted magnitude per block, the
    /// block's alone, 100 + its index, at a row (first, last, middle) and a column (every
    /// column in turn, the last included) that vary from block to block.
    fn planted<T: Element>() -> (DMatrix<T>, Vec<Range<usize>>, Vec<T>) {
        let rows: usize = LENS.iter().sum();
        let mut m = gaussian(rows, HEADS * WIDTH, 1.0, 7).map(T::from_f64_rounded);
        let mut ranges = Vec::new();
        let mut expected = Vec::new();
        let mut start = 0;
        for (s, &n) in LENS.iter().enumerate() {
            ranges.push(start..start + n);
            for h in 0..HEADS {
                let i = s * HEADS + h;
                if n == 0 {
                    expected.push(T::zero());
                    continue;
                }
                let row = start + [0, n - 1, n / 2][i % 3];
                let column = h * WIDTH + WIDTH - 1 - (3 * i) % WIDTH;
                let x = 100.0 + i as f64;
                m[(row, column)] = T::from_f64_rounded(if i.is_multiple_of(2) { x } else { -x });
                expected.push(T::from_f64_rounded(x));
            }
            start += n;
        }
        (m, ranges, expected)
    }

    fn maxima_of_every_block<T: Element>() {
        let (m, rows, expected) = planted::<T>();
        let whole: MatRef<'_, T> = m.as_view();
        assert!(whole.len() >= PARALLEL_SCAN_ENTRIES, "both ways are tested");
        for parallel in [false, true] {
            let got = block_max_abs(Operand::Key, &whole, &rows, (HEADS, WIDTH), parallel)
                .expect("finite");
            assert_eq!(got, expected, "parallel: {parallel}");
        }
    }

    #[test]
    fn block_maxima_are_each_blocks_own_f32() {
        maxima_of_every_block::<f32>();
    }

    #[test]
    fn block_maxima_are_each_blocks_own_f64() {
        maxima_of_every_block::<f64>();
    }

    /// An empty sequence last, alone in its task after one long enough for a task: its
    /// blocks' maxima are 0.
    #[test]
    fn an_empty_last_sequence_has_maxima_of_zero() {
        let m = gaussian(9000, HEADS * WIDTH, 1.0, 3);
        let rows = [0..9000, 9000..9000];
        let got = block_max_abs(Operand::Query, &m.as_view(), &rows, (HEADS, WIDTH), false)
            .expect("finite");
        let direct = |h: usize| {
            (0..9000)
                .flat_map(|r| (h * WIDTH..(h + 1) * WIDTH).map(move |c| (r, c)))
                .map(|rc| m[rc].abs())
                .fold(0.0, f64::max)
        };
        let expected: Vec<f64> = (0..HEADS).map(direct).chain([0.0; HEADS]).collect();
        assert_eq!(got, expected);
    }

    /// A NaN in a short sequence's block and an infinity later in column-major order: the
    /// error names the NaN, as a single-head call's scan of the whole matrix would.
    #[test]
    fn block_scan_reports_the_first_non_finite_entry() {
        let (mut m, rows, _) = planted::<f64>();
        m[(rows[4].start + 2, WIDTH + 5)] = f64::NAN;
        m[(rows[3].start, 2 * WIDTH)] = f64::INFINITY;
        let whole: MatRef<'_, f64> = m.as_view();
        for parallel in [false, true] {
            let err = block_max_abs(Operand::Value, &whole, &rows, (HEADS, WIDTH), parallel)
                .expect_err("a NaN");
            match err {
                AttentionError::NonFinite {
                    operand: Operand::Value,
                    row,
                    column,
                    value,
                } => {
                    assert_eq!((row, column), (rows[4].start + 2, WIDTH + 5));
                    assert!(value.is_nan());
                }
                e => panic!("unexpected {e:?}"),
            }
        }
    }
}
