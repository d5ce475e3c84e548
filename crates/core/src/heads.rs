//! Multi-head, grouped-query and packed variable-length attention: the public functions
//! and the [`HeadLayout`] that says how Q, K and V split into heads and sequences.

use nalgebra::DMatrix;

use crate::cpu::CpuPath;
use crate::error::{Axis, Operand, check_dim};
use crate::kernel;
use crate::memory::try_matrix;
use crate::options::Parallelism;
use crate::spec::{Batch, check_output};
use crate::view::{AsMatMut, AsMatRef};
use crate::{AttentionError, AttentionOptions, Element};

/// How the columns of Q, K, V split into heads and their rows into sequences.
///
/// **Heads.** Head `h` of Q occupies columns `h·d_k .. (h+1)·d_k`, PyTorch's
/// `x.view(n, heads, d)`; likewise K, V (`heads_kv` heads) and the output. With
/// `heads_q = g·heads_kv` query head `h` reads key/value head `h / g`: `g = 1` is
/// multi-head attention, `heads_kv = 1` multi-query, anything between grouped-query. K and
/// V are never copied per query head.
///
/// **Sequences** (FlashAttention's varlen layout, without padding): with
/// [`with_seqlens`](Self::with_seqlens), Q's rows stack the queries of each sequence and
/// K's and V's rows the keys; sequence `s` attends only to its own keys. Row and key
/// indices of causal, window and ALiBi count from the sequence's start, and
/// `diag(i) = i + n_kv(s) − n_q(s)` (bottom-right) unless causal is top-left (`diag(i) =
/// i`). Without lengths the whole of Q and K is one sequence.
///
/// # Example
/// ```
/// use attention_core::HeadLayout;
/// // 8 query heads reading 2 key/value heads (groups of 4), three sequences.
/// let layout = HeadLayout::new(8, 2).with_seqlens(&[5, 0, 7], &[5, 3, 7]);
/// assert_eq!((layout.heads_q(), layout.heads_kv()), (8, 2));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout<'a> {
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) seqlens: Option<(&'a [usize], &'a [usize])>,
}

impl<'a> HeadLayout<'a> {
    /// `heads_q` query heads reading `heads_kv` key/value heads, one sequence. Both must be
    /// ≥ 1 and `heads_q` a multiple of `heads_kv` (checked by the call that uses it:
    /// [`AttentionError::InvalidHeads`]).
    #[must_use]
    pub fn new(heads_q: usize, heads_kv: usize) -> Self {
        HeadLayout {
            heads_q,
            heads_kv,
            seqlens: None,
        }
    }

    /// A packed batch: sequence `s` has `seqlens_q[s]` query rows and `seqlens_kv[s]` key
    /// rows (either may be 0). The lists must be as long as each other and sum to the rows
    /// of Q and of K.
    #[must_use]
    pub fn with_seqlens(mut self, seqlens_q: &'a [usize], seqlens_kv: &'a [usize]) -> Self {
        self.seqlens = Some((seqlens_q, seqlens_kv));
        self
    }

    /// The number of query heads.
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }

    /// The number of key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }

    /// The sequence lengths `(seqlens_q, seqlens_kv)`, if given.
    pub fn seqlens(&self) -> Option<(&'a [usize], &'a [usize])> {
        self.seqlens
    }
}

/// Attention of every query head of every sequence of a packed batch, in one call.
///
/// For sequence `s` and query head `h` (reading key/value head `h / g`, `g = h_q / h_kv`):
/// ```text
/// O[rows of s, h·d_v ..] = attention(Q[rows of s, h·d_k ..], K[keys of s, (h/g)·d_k ..],
///                                    V[keys of s, (h/g)·d_v ..])
/// ```
/// with the options of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention)
/// applied within the sequence: the scale (default `1/√d_k` of the head width), causal,
/// window, softcap and ALiBi as there, with row and key indices counted from the sequence's
/// start; ALiBi as one slope for all heads or one per query head
/// ([`AttentionOptions::with_alibi_slopes`]); the key mask over the packed keys (`Σn_kv`
/// entries); a mask or bias per sequence ([`AttentionOptions::with_sequence_masks`],
/// [`with_sequence_biases`](AttentionOptions::with_sequence_biases)), shared by the heads
/// (a single [`with_mask`](AttentionOptions::with_mask) / `with_bias` when there is one
/// sequence). Each (sequence, head) is computed exactly as the single-head call on its
/// blocks would compute it (the same bits), never copying K or V.
///
/// Work is split over threads by (sequence, key/value head) and within each by query
/// blocks; results do not depend on the number of threads.
///
/// # Shapes
/// Q `Σn_q × h_q·d_k`, K `Σn_kv × h_kv·d_k`, V `Σn_kv × h_kv·d_v` (any strides: views by
/// value or reference); returns `Σn_q × h_q·d_v`. Rows with no allowed key are 0.
///
/// # Errors
/// [`AttentionError::InvalidHeads`]; [`AttentionError::HeadSplit`] when Q's or V's columns
/// do not split into their heads or K's are not `h_kv·d_k`;
/// [`AttentionError::DimensionMismatch`] for V's rows, a key-length list of another
/// length than the query lengths, a slope list not of `h_q` entries, a mask list not of one
/// per sequence, a mask, bias or key mask of the wrong shape;
/// [`AttentionError::SequenceLengths`] when lengths do not sum to the rows;
/// [`AttentionError::InvalidOption`] for options set twice (one slope and per-head slopes,
/// one mask and per-sequence masks) or a single mask or bias with several sequences; the
/// value errors of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention);
/// [`AttentionError::HeadScoreOverflow`] instead of `ScoreOverflow`.
///
/// # Example
/// ```
/// use attention_core::{multi_head_attention, scaled_dot_product_attention, AttentionOptions, Causal, HeadLayout};
/// use nalgebra::DMatrix;
///
/// // 4 query heads sharing 2 key/value heads, width 3; two sequences of 2 and 3 tokens.
/// let q = DMatrix::<f64>::from_fn(5, 12, |i, j| ((i * 12 + j) as f64 * 0.37).sin());
/// let k = DMatrix::<f64>::from_fn(5, 6, |i, j| ((i * 6 + j) as f64 * 0.61).cos());
/// let v = DMatrix::<f64>::from_fn(5, 6, |i, j| (i + j) as f64);
/// let layout = HeadLayout::new(4, 2).with_seqlens(&[2, 3], &[2, 3]);
/// let options = AttentionOptions::new().with_causal(Causal::BottomRight);
/// let out = multi_head_attention(&q, &k, &v, &layout, &options)?;
///
/// // Query head 3 of the second sequence reads key/value head 1 of rows 2..5.
/// let alone = scaled_dot_product_attention(
///     q.view((2, 9), (3, 3)), k.view((2, 3), (3, 3)), v.view((2, 3), (3, 3)), &options)?;
/// assert_eq!(out.view((2, 9), (3, 3)), alone);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn multi_head_attention<'q, 'k, 'v, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<DMatrix<T>, AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let batch = Batch::new(q, k, v, layout, options)?;
    let mut out = try_matrix(q.nrows(), batch.out_columns(), T::zero(), Operand::Output)?;
    run(batch, options, (&mut out).into_mat_mut(), None)?;
    Ok(out)
}

/// [`multi_head_attention`] writing into a caller's `Σn_q × h_q·d_v` matrix or mutable
/// view (any strides, e.g. a column block of a wider matrix).
///
/// # Errors
/// Those of [`multi_head_attention`], and [`AttentionError::DimensionMismatch`] with
/// [`Operand::Output`] when `output` has the wrong shape. On every error of the inputs or
/// of a score `output` keeps its old contents.
///
/// # Example
/// ```
/// use attention_core::{multi_head_attention, multi_head_attention_into, AttentionOptions, HeadLayout};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f32>::from_fn(4, 8, |i, j| ((i * 8 + j) as f32 * 0.3).sin());
/// let layout = HeadLayout::new(2, 2);
/// let mut out = DMatrix::from_element(4, 8, f32::NAN);
/// multi_head_attention_into(&x, &x, &x, &layout, &AttentionOptions::new(), &mut out)?;
/// assert_eq!(out, multi_head_attention(&x, &x, &x, &layout, &AttentionOptions::new())?);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn multi_head_attention_into<'q, 'k, 'v, 'o, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
    output: impl AsMatMut<'o, T>,
) -> Result<(), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let output = output.into_mat_mut();
    let batch = Batch::new(q, k, v, layout, options)?;
    let rule = "the output is sum(n_q) x h_q*d_v";
    check_output(&output, q.nrows(), batch.out_columns(), rule)?;
    run(batch, options, output, None)
}

/// [`multi_head_attention`] that also returns the log-sum-exp of every row and head.
///
/// # Shapes
/// Output `Σn_q × h_q·d_v`; lse `Σn_q × h_q` (row = token, column = query head; −∞ for a
/// row with no allowed key), the layout of FlashAttention's `softmax_lse` transposed.
///
/// # Errors
/// Those of [`multi_head_attention`].
///
/// # Example
/// ```
/// use attention_core::{multi_head_attention_with_lse, AttentionOptions, HeadLayout};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::zeros(1, 4);
/// let kv = DMatrix::<f64>::zeros(3, 2);
/// let (_, lse) = multi_head_attention_with_lse(&q, &kv, &kv, &HeadLayout::new(2, 1), &AttentionOptions::new())?;
/// assert_eq!(lse.shape(), (1, 2));
/// assert!((lse[(0, 1)] - 3f64.ln()).abs() < 1e-15); // three scores of 0
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[allow(clippy::type_complexity)] // (output, lse) is the documented pair
pub fn multi_head_attention_with_lse<'q, 'k, 'v, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
) -> Result<(DMatrix<T>, DMatrix<T>), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let batch = Batch::new(q, k, v, layout, options)?;
    let mut out = try_matrix(
        q.nrows(),
        v.ncols() / layout.heads_kv * layout.heads_q,
        T::zero(),
        Operand::Output,
    )?;
    let mut lse = try_matrix(q.nrows(), layout.heads_q, T::zero(), Operand::Lse)?;
    run(batch, options, (&mut out).into_mat_mut(), Some(&mut lse))?;
    Ok((out, lse))
}

/// [`multi_head_attention_with_lse`] writing into a caller's output (`Σn_q × h_q·d_v`,
/// any matrix or mutable view) and lse (`Σn_q × h_q`): a loop of calls of one shape (a
/// ring of key blocks, a decoding loop) then reuses its buffers instead of allocating
/// and faulting in fresh pages every call.
///
/// # Errors
/// Those of [`multi_head_attention_into`], and [`AttentionError::DimensionMismatch`] with
/// [`Operand::Lse`] when `lse` has the wrong shape. On every error of the inputs or of a
/// score, `output` and `lse` keep their old contents.
///
/// # Example
/// ```
/// use attention_core::{multi_head_attention_with_lse, multi_head_attention_with_lse_into, AttentionOptions, HeadLayout};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::<f64>::from_fn(4, 6, |i, j| ((i * 6 + j) as f64 * 0.3).sin());
/// let layout = HeadLayout::new(2, 1);
/// let (mut out, mut lse) = (DMatrix::from_element(4, 6, f64::NAN), DMatrix::from_element(4, 2, f64::NAN));
/// multi_head_attention_with_lse_into(&x, x.columns(0, 3), x.columns(3, 3), &layout,
///     &AttentionOptions::new(), &mut out, &mut lse)?;
/// let want = multi_head_attention_with_lse(&x, x.columns(0, 3), x.columns(3, 3), &layout, &AttentionOptions::new())?;
/// assert_eq!((out, lse), want);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
pub fn multi_head_attention_with_lse_into<'q, 'k, 'v, 'o, T: Element>(
    query: impl AsMatRef<'q, T>,
    key: impl AsMatRef<'k, T>,
    value: impl AsMatRef<'v, T>,
    layout: &HeadLayout<'_>,
    options: &AttentionOptions<'_, T>,
    output: impl AsMatMut<'o, T>,
    lse: &mut DMatrix<T>,
) -> Result<(), AttentionError> {
    let (q, k, v) = (
        query.into_mat_ref(),
        key.into_mat_ref(),
        value.into_mat_ref(),
    );
    let output = output.into_mat_mut();
    let batch = Batch::new(q, k, v, layout, options)?;
    check_output(
        &output,
        q.nrows(),
        batch.out_columns(),
        "the output is sum(n_q) x h_q*d_v",
    )?;
    for (axis, found, expected) in [
        (Axis::Rows, lse.nrows(), q.nrows()),
        (Axis::Columns, lse.ncols(), layout.heads_q),
    ] {
        check_dim(
            Operand::Lse,
            axis,
            found,
            expected,
            Operand::Query,
            "the lse is sum(n_q) x h_q",
        )?;
    }
    run(batch, options, output, Some(lse))
}

/// Picks the CPU path and runs the batch.
fn run<T: Element>(
    batch: Batch<'_, T>,
    options: &AttentionOptions<'_, T>,
    out: crate::MatMut<'_, T>,
    lse: Option<&mut DMatrix<T>>,
) -> Result<(), AttentionError> {
    let (path, forced) = CpuPath::for_call(options.cpu_path)?;
    let parallel = options.parallelism == Parallelism::Rayon;
    kernel::batch::attention(batch, path, forced, parallel, out, lse)
}

/// The standard ALiBi slopes of `heads` heads (Press et al. 2022, as Hugging Face's
/// `get_alibi_slopes` computes them), for [`AttentionOptions::with_alibi_slopes`].
///
/// For `n` a power of two, head `h` (0-based) gets `2^(−8(h+1)/n)`: a geometric sequence
/// from `2^(−8/n)` down to `2^(−8)`. For other counts, the `p` slopes of the largest power
/// of two `p < heads` come first, then every other slope of `2p` heads,
/// `2^(−8(2i+1)/(2p))` for `i = 0, 1, …`, until there are `heads`. Computed in f64 and
/// rounded once to `T`.
///
/// # Example
/// ```
/// use attention_core::alibi_slopes;
/// assert_eq!(alibi_slopes::<f64>(8), [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
/// // 6 heads: the 4 slopes of 4 heads, then the first and third of 8 heads'.
/// assert_eq!(alibi_slopes::<f64>(6), [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]);
/// ```
#[must_use]
pub fn alibi_slopes<T: Element>(heads: usize) -> Vec<T> {
    // 2^(−8k/n) with n a power of two: the exponent is a dyadic rational, exact in f64.
    let slope = |k: usize, n: usize| T::from_f64_rounded((-8.0 * k as f64 / n as f64).exp2());
    if heads == 0 {
        return Vec::new();
    }
    let p = if heads.is_power_of_two() {
        heads
    } else {
        heads.next_power_of_two() / 2
    };
    (1..=p)
        .map(|h| slope(h, p))
        .chain((0..heads - p).map(|i| slope(2 * i + 1, 2 * p)))
        .collect()
}
