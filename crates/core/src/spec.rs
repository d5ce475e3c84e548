//! Validation: the public functions check every shape, value and option once, here, and
//! hand a [`Spec`] to the kernels, which then trust their inputs.

use crate::Element;
use crate::columns::for_each_column;
use crate::error::{AttentionError, Axis, Operand, check_dim};
use crate::options::{AttentionOptions, Causal, MatRef, Parallelism};
use crate::score::Band;

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
}

/// The first NaN or infinity of `m`, in column-major order, as an error; else the largest
/// magnitude in `m`.
pub(crate) fn check_finite<T: Element>(
    operand: Operand,
    m: &MatRef<'_, T>,
) -> Result<T, AttentionError> {
    // One branch-free pass over contiguous columns; only if something is not finite, a
    // second pass finds the first such entry.
    // (An integer max over |x|'s bits: it vectorises, and ∞/NaN are the largest bits.)
    let mut max_bits = 0u64;
    for_each_column(m, 0..m.nrows(), &mut Vec::new(), |_, col| {
        max_bits = max_bits.max(T::max_abs_bits(col));
    });
    if max_bits < T::INFINITY_BITS {
        return Ok(T::from_abs_bits(max_bits));
    }
    for c in 0..m.ncols() {
        for r in 0..m.nrows() {
            let x = m[(r, c)];
            if !x.finite() {
                return Err(AttentionError::NonFinite {
                    operand,
                    row: r,
                    column: c,
                    value: x.to_f64(),
                });
            }
        }
    }
    unreachable!("a non-finite entry was seen in the first pass")
}

/// The largest magnitudes of Q, K and V.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaxAbs<T> {
    pub q: T,
    pub k: T,
    pub v: T,
}

/// Checks the shapes of Q, K, V against each other and their values for NaN/∞; returns
/// their largest magnitudes.
pub(crate) fn check_qkv<T: Element>(
    q: &MatRef<'_, T>,
    k: &MatRef<'_, T>,
    v: &MatRef<'_, T>,
    parallel: bool,
) -> Result<MaxAbs<T>, AttentionError> {
    check_dim(
        Operand::Key,
        Axis::Columns,
        k.ncols(),
        q.ncols(),
        Operand::Query,
        "d_k must match",
    )?;
    check_dim(
        Operand::Value,
        Axis::Rows,
        v.nrows(),
        k.nrows(),
        Operand::Key,
        "one value row per key: n_kv must match",
    )?;
    // Large inputs are scanned in parallel (the scan is the only serial O(n·d) pass of a
    // call); errors are still reported in the order Q, K, V.
    let large = q.len() + k.len() + v.len() >= 1 << 18;
    let (rq, (rk, rv)) = if parallel && large {
        rayon::join(
            || check_finite(Operand::Query, q),
            || {
                rayon::join(
                    || check_finite(Operand::Key, k),
                    || check_finite(Operand::Value, v),
                )
            },
        )
    } else {
        (
            check_finite(Operand::Query, q),
            (
                check_finite(Operand::Key, k),
                check_finite(Operand::Value, v),
            ),
        )
    };
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

impl<'a, T: Element> Spec<'a, T> {
    /// Validates Q, K, V and the options.
    pub(crate) fn new(
        q: MatRef<'a, T>,
        k: MatRef<'a, T>,
        v: MatRef<'a, T>,
        options: &AttentionOptions<'a, T>,
    ) -> Result<Self, AttentionError> {
        let parallel = options.parallelism == Parallelism::Rayon;
        let max_abs = check_qkv(&q, &k, &v, parallel)?;
        let (n_q, d_k) = q.shape();
        let (n_kv, d_v) = (k.nrows(), v.ncols());
        let scale = check_scalars(options, d_k)?;
        check_mask_shapes(options, n_q, n_kv)?;
        let bias_range = match &options.bias {
            Some(bias) => check_bias(bias, n_q, n_kv)?,
            None => (0.0, 0.0),
        };
        // Shapes are bounded by memory, far below 2^62, so this cast is exact.
        let diag_offset = match options.causal {
            Some(Causal::TopLeft) => 0,
            _ => n_kv as i64 - n_q as i64,
        };
        let band = Band::new(diag_offset, options.causal.is_some(), options.window);
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

        Ok(Spec {
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
        })
    }
}

/// The scale (explicit, or `1/√d_k`), after checking it, the softcap and the ALiBi slope.
fn check_scalars<T: Element>(
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
    if let Some(m) = options.alibi_slope
        && !m.finite()
    {
        return Err(AttentionError::InvalidAlibiSlope { value: m.to_f64() });
    }
    Ok(scale)
}

/// The mask is `n_q × n_kv`, the key mask has `n_kv` entries.
fn check_mask_shapes<T: Element>(
    options: &AttentionOptions<'_, T>,
    n_q: usize,
    n_kv: usize,
) -> Result<(), AttentionError> {
    if let Some(mask) = &options.mask {
        let rule = "the mask is n_q x n_kv";
        check_dim(
            Operand::Mask,
            Axis::Rows,
            mask.nrows(),
            n_q,
            Operand::Query,
            rule,
        )?;
        check_dim(
            Operand::Mask,
            Axis::Columns,
            mask.ncols(),
            n_kv,
            Operand::Key,
            rule,
        )?;
    }
    if let Some(key_mask) = options.key_mask {
        let rule = "one key-mask entry per key";
        check_dim(
            Operand::KeyMask,
            Axis::Entries,
            key_mask.len(),
            n_kv,
            Operand::Key,
            rule,
        )?;
    }
    Ok(())
}

/// Checks the bias's shape (`n_q × n_kv`) and entries (finite or −∞: −∞ masks a position,
/// NaN and +∞ have no meaning); returns the range of its finite entries, which goes into
/// the score bound.
fn check_bias<T: Element>(
    bias: &MatRef<'_, T>,
    n_q: usize,
    n_kv: usize,
) -> Result<(f64, f64), AttentionError> {
    let rule = "the bias is n_q x n_kv";
    check_dim(
        Operand::Bias,
        Axis::Rows,
        bias.nrows(),
        n_q,
        Operand::Query,
        rule,
    )?;
    check_dim(
        Operand::Bias,
        Axis::Columns,
        bias.ncols(),
        n_kv,
        Operand::Key,
        rule,
    )?;
    let mut range = (0.0f64, 0.0f64);
    let mut first_bad = None;
    for_each_column(bias, 0..bias.nrows(), &mut Vec::new(), |c, col| {
        for (r, &x) in col.iter().enumerate() {
            if x.finite() {
                range.0 = range.0.min(x.to_f64());
                range.1 = range.1.max(x.to_f64());
            } else if x != T::NEG_INFINITY && first_bad.is_none() {
                first_bad = Some((r, c, x));
            }
        }
    });
    match first_bad {
        Some((row, column, x)) => Err(AttentionError::NonFinite {
            operand: Operand::Bias,
            row,
            column,
            value: x.to_f64(),
        }),
        None => Ok(range),
    }
}
