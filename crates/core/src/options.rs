//! [`AttentionOptions`]: everything that adjusts or restricts the score matrix.

use nalgebra::{DMatrixView, Dyn};

use crate::dropout::Dropout;
use crate::view::AsMatRef;
use crate::{CpuPath, Element};

/// A borrowed matrix with any row and column strides: what every function of this crate
/// reads. `&DMatrix<T>`, `&DMatrixView<T>`, a column block of a wider matrix (by value or
/// by reference), or a view with swapped strides (a transposed view) all convert into it
/// without a copy ([`AsMatRef`](crate::AsMatRef)).
///
/// Zero strides (a broadcast row or column, numpy's `broadcast_to`) are read correctly
/// too: the attention kernels read them in place; [`compute_qkv`](crate::compute_qkv) and
/// [`attention_weights`](crate::attention_weights), which hand whole matrices to
/// nalgebra's product (which misreads such views), copy them to contiguous storage first.
pub type MatRef<'a, T> = DMatrixView<'a, T, Dyn, Dyn>;

/// How a causal mask is aligned when `n_q ≠ n_kv`.
///
/// Query `i` may attend to key `j` only if `j ≤ diag(i)`, where
/// - `TopLeft`: `diag(i) = i` (PyTorch's `is_causal=True`, JAX);
/// - `BottomRight`: `diag(i) = i + n_kv − n_q` (FlashAttention ≥ 2.1; decoding with a KV
///   cache, where the last query is the newest token and sees every key).
///
/// With `n_q = 3`, `n_kv = 5` (`■` = may attend):
/// ```text
/// TopLeft        BottomRight
/// ■ · · · ·      ■ ■ ■ · ·
/// ■ ■ · · ·      ■ ■ ■ ■ ·
/// ■ ■ ■ · ·      ■ ■ ■ ■ ■
/// ```
/// The two agree when `n_q = n_kv`. With `BottomRight` and `n_q > n_kv`, the first
/// `n_q − n_kv` queries see no key at all: their output is 0 and their log-sum-exp −∞.
///
/// # Example
/// ```
/// use attention_core::{AttentionOptions, Causal};
/// let options = AttentionOptions::<f32>::new().with_causal(Causal::BottomRight);
/// assert_eq!(options.causal(), Some(Causal::BottomRight));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Causal {
    /// `j ≤ i`.
    TopLeft,
    /// `j ≤ i + n_kv − n_q`.
    BottomRight,
}

/// How many threads a call may use.
///
/// # Example
/// ```
/// use attention_core::{AttentionOptions, Parallelism};
/// let options = AttentionOptions::<f64>::new().with_parallelism(Parallelism::Sequential);
/// assert_eq!(options.parallelism(), Parallelism::Sequential);
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Parallelism {
    /// Split query blocks over rayon's current thread pool (all cores by default; run the
    /// call inside `ThreadPool::install` to choose the pool). Results are bitwise identical
    /// whatever the number of threads: each query row is computed by exactly one thread in
    /// a fixed order.
    #[default]
    Rayon,
    /// Run on the calling thread only, for callers that parallelise above this crate.
    Sequential,
}

/// Options of [`scaled_dot_product_attention`](crate::scaled_dot_product_attention).
///
/// All options combine. For query `i` and key `j` the score is built in this order
/// (the golden cases' order, PyTorch's where it has the option):
///
/// 1. `s = scale · q_i · k_j`, `scale` defaulting to `1/√d_k`;
/// 2. softcap `c`: `s ← c · tanh(s / c)` (Gemma 2);
/// 3. ALiBi slope `m`: `s ← s − m · |diag(i) − j|`;
/// 4. bias: `s ← s + bias[i, j]` (−∞ masks);
/// 5. disallowed positions (mask false, key mask false, beyond the causal diagonal, outside
///    the window) become −∞;
/// 6. `weights_i = softmax(s_i)`, `output_i = Σ_j weights_ij · v_j`,
///    `lse_i = ln Σ_j exp(s_ij)`.
///
/// `diag(i)` is `i` when `causal` is [`Causal::TopLeft`] and `i + n_kv − n_q` otherwise
/// (bottom-right, FlashAttention's convention, also when there is no causal mask).
/// A row in which no key is allowed has output exactly 0, weights 0 and log-sum-exp −∞;
/// values and bias at disallowed positions never affect the result.
///
/// The struct borrows masks and bias (`'a`) so that building options copies nothing.
/// Options are checked when a call starts; a mask of the wrong size, a NaN bias, a
/// softcap ≤ 0 and the like return an [`AttentionError`](crate::AttentionError).
///
/// # Example
/// ```
/// use attention_core::{scaled_dot_product_attention, AttentionOptions, Causal};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
/// let options = AttentionOptions::new().with_causal(Causal::TopLeft).with_scale(0.5);
/// let out = scaled_dot_product_attention(&q, &q, &v, &options)?;
/// // The first query sees only the first key.
/// assert_eq!((out[(0, 0)], out[(0, 1)]), (1.0, 2.0));
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct AttentionOptions<'a, T: Element> {
    pub(crate) scale: Option<T>,
    pub(crate) causal: Option<Causal>,
    pub(crate) mask: Option<MatRef<'a, bool>>,
    pub(crate) key_mask: Option<&'a [bool]>,
    pub(crate) bias: Option<MatRef<'a, T>>,
    pub(crate) window: Option<(usize, usize)>,
    pub(crate) softcap: Option<T>,
    pub(crate) alibi_slope: Option<T>,
    pub(crate) alibi_slopes: Option<&'a [T]>,
    pub(crate) sequence_masks: Option<&'a [MatRef<'a, bool>]>,
    pub(crate) sequence_biases: Option<&'a [MatRef<'a, T>]>,
    pub(crate) parallelism: Parallelism,
    pub(crate) cpu_path: Option<CpuPath>,
    pub(crate) dropout: Option<Dropout>,
    /// `(first, total)`: the queries are rows `first .. first + n_q` of `total`.
    pub(crate) query_rows: Option<(usize, usize)>,
    /// The (sequence, query head) of a block of a multi-head call: the dropout stream.
    pub(crate) dropout_stream: (usize, usize),
}

impl<T: Element> Default for AttentionOptions<'_, T> {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl<T: Element> AttentionOptions<'_, T> {
    /// The defaults as a constant: `&AttentionOptions::DEFAULT` is a reference to static
    /// data, where `&AttentionOptions::default()` builds the struct (about 200 bytes) on
    /// every call.
    pub(crate) const DEFAULT: Self = Self {
        scale: None,
        causal: None,
        mask: None,
        key_mask: None,
        bias: None,
        window: None,
        softcap: None,
        alibi_slope: None,
        alibi_slopes: None,
        sequence_masks: None,
        sequence_biases: None,
        parallelism: Parallelism::Rayon,
        cpu_path: None,
        dropout: None,
        query_rows: None,
        dropout_stream: (0, 0),
    };
}

impl<T: Element> AttentionOptions<'_, T> {
    /// True if these options set nothing that acts on scores, positions or the CPU path:
    /// at most a scale, the parallelism (which never changes a result) and dropout's
    /// stream (unused without dropout). Such a call is plain attention with that scale.
    /// Every field is named, so that a new option cannot be forgotten here.
    pub(crate) fn sets_only_scale(&self) -> bool {
        let AttentionOptions {
            scale: _,
            causal,
            mask,
            key_mask,
            bias,
            window,
            softcap,
            alibi_slope,
            alibi_slopes,
            sequence_masks,
            sequence_biases,
            parallelism: _,
            cpu_path,
            dropout,
            query_rows,
            dropout_stream: _,
        } = self;
        causal.is_none()
            && mask.is_none()
            && key_mask.is_none()
            && bias.is_none()
            && window.is_none()
            && softcap.is_none()
            && alibi_slope.is_none()
            && alibi_slopes.is_none()
            && sequence_masks.is_none()
            && sequence_biases.is_none()
            && cpu_path.is_none()
            && dropout.is_none()
            && query_rows.is_none()
    }
}

impl<'a, T: Element> AttentionOptions<'a, T> {
    /// No mask, scale `1/√d_k`, all threads: plain `softmax(Q·Kᵀ/√d_k)·V`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Multiplies `Q·Kᵀ` by `scale` instead of `1/√d_k`. Any finite value, 0 and negative
    /// included; needed when `d_k = 0`.
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::from_row_slice(1, 1, &[1.0]);
    /// let k = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
    /// let v = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
    /// // Scale ln 3 makes the scores (ln 3, 0): weights (3/4, 1/4).
    /// let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_scale(3f64.ln()))?;
    /// assert!((out[(0, 0)] - 0.75).abs() < 1e-15);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_scale(mut self, scale: T) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Restricts query `i` to keys `j ≤ diag(i)`; see [`Causal`] for the two alignments.
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions, Causal};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f32>::zeros(2, 1); // all scores equal
    /// let v = DMatrix::from_row_slice(3, 1, &[3.0, 6.0, 9.0]);
    /// let k = DMatrix::zeros(3, 1);
    /// let tl = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_causal(Causal::TopLeft))?;
    /// let br = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_causal(Causal::BottomRight))?;
    /// assert_eq!((tl[(0, 0)], tl[(1, 0)]), (3.0, 4.5)); // sees key 0; keys 0–1
    /// assert_eq!((br[(0, 0)], br[(1, 0)]), (4.5, 6.0)); // sees keys 0–1; keys 0–2
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_causal(mut self, causal: Causal) -> Self {
        self.causal = Some(causal);
        self
    }

    /// A boolean mask of shape `n_q × n_kv`; **`true` = may attend** (PyTorch SDPA's and
    /// JAX's convention, the opposite of `nn.MultiheadAttention`'s `attn_mask`).
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::zeros(2, 1);
    /// let k = DMatrix::zeros(2, 1);
    /// let v = DMatrix::from_row_slice(2, 1, &[1.0, 5.0]);
    /// let mask = DMatrix::from_row_slice(2, 2, &[true, false, false, false]);
    /// let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_mask(&mask))?;
    /// assert_eq!(out[(0, 0)], 1.0); // only key 0
    /// assert_eq!(out[(1, 0)], 0.0); // fully masked row: 0, not NaN
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_mask(mut self, mask: impl AsMatRef<'a, bool>) -> Self {
        self.mask = Some(mask.into_mat_ref());
        self
    }

    /// One boolean per key (`n_kv` of them): `true` = real token, `false` = padding that no
    /// query may attend to. Cheaper than the equivalent `n_q × n_kv` mask.
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::zeros(1, 1);
    /// let k = DMatrix::zeros(3, 1);
    /// let v = DMatrix::from_row_slice(3, 1, &[1.0, 2.0, 1e30]); // key 2 is padding
    /// let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_key_mask(&[true, true, false]))?;
    /// assert_eq!(out[(0, 0)], 1.5);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_key_mask(mut self, key_mask: &'a [bool]) -> Self {
        self.key_mask = Some(key_mask);
        self
    }

    /// An additive bias of shape `n_q × n_kv`, added to the scores after softcap and ALiBi.
    /// Entries must be finite or −∞ (−∞ masks the position).
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::zeros(1, 1);
    /// let k = DMatrix::zeros(2, 1);
    /// let v = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
    /// let bias = DMatrix::from_row_slice(1, 2, &[3f64.ln(), f64::NEG_INFINITY]);
    /// let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_bias(&bias))?;
    /// assert_eq!(out[(0, 0)], 1.0); // key 1 masked by −∞
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_bias(mut self, bias: impl AsMatRef<'a, T>) -> Self {
        self.bias = Some(bias.into_mat_ref());
        self
    }

    /// A sliding window: query `i` sees keys `j` with `diag(i) − left ≤ j ≤ diag(i) + right`
    /// (FlashAttention's `window_size`). Combined with `causal`, the intersection applies.
    /// Pass `usize::MAX` for an unbounded side.
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::zeros(4, 1);
    /// let k = DMatrix::zeros(4, 1);
    /// let v = DMatrix::from_row_slice(4, 1, &[0.0, 1.0, 2.0, 3.0]);
    /// // Each query sees itself and the key before it (n_q = n_kv: diag(i) = i).
    /// let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new().with_window(1, 0))?;
    /// assert_eq!(out.as_slice(), &[0.0, 0.5, 1.5, 2.5]);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_window(mut self, left: usize, right: usize) -> Self {
        self.window = Some((left, right));
        self
    }

    /// Caps scores smoothly: `s ← c · tanh(s / c)`, applied first (Gemma 2). `c` must be
    /// finite and > 0.
    ///
    /// ```
    /// use attention_core::{attention_weights, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::from_row_slice(1, 1, &[1000.0]);
    /// let k = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
    /// // Scores (1000, 0) capped at c = 1: (tanh 1000, 0) ≈ (1, 0).
    /// let w = attention_weights(&q, &k, &k, &AttentionOptions::new().with_softcap(1.0))?;
    /// let e = std::f64::consts::E;
    /// assert!((w[(0, 0)] - e / (e + 1.0)).abs() < 1e-15);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_softcap(mut self, cap: T) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Attention dropout for training (PyTorch's `dropout_p`): each attention weight is
    /// dropped with probability `p` and the kept ones are scaled by `1/(1 − p)`; the mask
    /// comes from Philox4x32-10 keyed by `seed` at counter (query, key, head, sequence),
    /// indices counted within the sequence, so the backward regenerates it and the result
    /// does not depend on paths or threads (see [`Dropout`]). The log-sum-exp is the
    /// softmax's, before dropout. `p` must be in `[0, 1)` (0 is no dropout at all);
    /// [`attention_weights`] and cached attention reject `p > 0`. Calls with dropout run
    /// on the block kernel (the careful path for scores out of range), its mask applied
    /// pair by pair (a scalar Philox per weight: slower than no dropout).
    ///
    /// [`attention_weights`]: crate::attention_weights
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::from_fn(4, 3, |i, j| (i + j) as f64 * 0.1);
    /// let v = DMatrix::from_fn(4, 2, |i, j| (i * 2 + j) as f64);
    /// let options = AttentionOptions::new().with_dropout(0.5, 42);
    /// let a = scaled_dot_product_attention(&q, &q, &v, &options)?;
    /// // The same seed gives the same mask; p = 0 is no dropout at all.
    /// assert_eq!(a, scaled_dot_product_attention(&q, &q, &v, &options)?);
    /// let plain = scaled_dot_product_attention(&q, &q, &v, &AttentionOptions::new())?;
    /// let p0 = AttentionOptions::new().with_dropout(0.0, 42);
    /// assert_eq!(plain, scaled_dot_product_attention(&q, &q, &v, &p0)?);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Self {
        self.dropout = Some(Dropout { p, seed });
        self
    }

    /// ALiBi (Press et al. 2022) with slope `m`: `s ← s − m · |diag(i) − j|`. `m` must be finite.
    ///
    /// ```
    /// use attention_core::{attention_weights, AttentionOptions};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::zeros(1, 1);
    /// let k = DMatrix::zeros(2, 1);
    /// // One query, two keys: diag(0) = 0 + 2 − 1 = 1, so key 0 is 1 away, key 1 is 0.
    /// let w = attention_weights(&q, &k, &k, &AttentionOptions::new().with_alibi_slope(2f64.ln()))?;
    /// assert!((w[(0, 0)] - 1.0 / 3.0).abs() < 1e-15); // scores (−ln 2, 0)
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_alibi_slope(mut self, slope: T) -> Self {
        self.alibi_slope = Some(slope);
        self
    }

    /// One ALiBi slope per query head: head `h`'s scores get `s ← s − slopes[h]·|diag(i) − j|`
    /// ([`alibi_slopes`](crate::alibi_slopes) gives the standard ones). A single-head call
    /// has one head, so it takes one slope. Each must be finite; setting this and
    /// [`with_alibi_slope`](Self::with_alibi_slope) together is an
    /// [`InvalidOption`](crate::AttentionError::InvalidOption) error.
    ///
    /// ```
    /// use attention_core::{alibi_slopes, multi_head_attention, AttentionOptions, HeadLayout};
    /// use nalgebra::DMatrix;
    /// let x = DMatrix::<f64>::from_fn(5, 8, |i, j| ((i * 8 + j) as f64).sin());
    /// let slopes = alibi_slopes::<f64>(4);
    /// let options = AttentionOptions::new().with_alibi_slopes(&slopes);
    /// let out = multi_head_attention(&x, &x, &x, &HeadLayout::new(4, 4), &options)?;
    /// assert_eq!(out.shape(), (5, 8));
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_alibi_slopes(mut self, slopes: &'a [T]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// One boolean mask per sequence of a packed batch (sequence `s`'s is its
    /// `n_q(s) × n_kv(s)`, `true` = may attend), shared by all heads. A call with one
    /// sequence may use [`with_mask`](Self::with_mask) instead; setting both is an
    /// [`InvalidOption`](crate::AttentionError::InvalidOption) error.
    ///
    /// ```
    /// use attention_core::{multi_head_attention, AttentionOptions, HeadLayout, MatRef};
    /// use nalgebra::DMatrix;
    /// let x = DMatrix::<f64>::from_fn(5, 2, |i, j| (i + j) as f64);
    /// // Two sequences of 2 and 3 tokens; the first may not look at its own first token.
    /// let m0 = DMatrix::from_row_slice(2, 2, &[false, true, false, true]);
    /// let m1 = DMatrix::from_element(3, 3, true);
    /// let masks: [MatRef<'_, bool>; 2] = [(&m0).into(), (&m1).into()];
    /// let layout = HeadLayout::new(1, 1).with_seqlens(&[2, 3], &[2, 3]);
    /// let out = multi_head_attention(&x, &x, &x, &layout, &AttentionOptions::new().with_sequence_masks(&masks))?;
    /// assert_eq!(out.row(0), x.row(1)); // only token 1 of sequence 0
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_sequence_masks(mut self, masks: &'a [MatRef<'a, bool>]) -> Self {
        self.sequence_masks = Some(masks);
        self
    }

    /// One additive bias per sequence of a packed batch (sequence `s`'s is its
    /// `n_q(s) × n_kv(s)`, entries finite or −∞), shared by all heads. A call with one
    /// sequence may use [`with_bias`](Self::with_bias) instead; setting both is an
    /// [`InvalidOption`](crate::AttentionError::InvalidOption) error.
    #[must_use]
    pub fn with_sequence_biases(mut self, biases: &'a [MatRef<'a, T>]) -> Self {
        self.sequence_biases = Some(biases);
        self
    }

    /// Says that the call's queries are rows `first .. first + n_q` of a query matrix of
    /// `total` rows, so that it returns exactly those rows of the call with all `total`:
    /// `diag(i) = first + i` with [`Causal::TopLeft`] and `first + i + n_kv − total`
    /// otherwise, for causal, window and ALiBi alike, and dropout draws at row
    /// `first + i`. A mask or bias covers only the given rows (`n_q × n_kv`: pass
    /// `mask.rows(first, n_q)`). Computing a long query matrix in row chunks this way
    /// (e.g. to report progress) gives the rows of one call within the error bound, and
    /// the same bits when each chunk starts at a multiple of 64 rows (the kernels' query
    /// blocks) and takes the same kernel route as the whole call (more than 8 rows and
    /// more than 64 keys in both, scores in range in both). Without this option
    /// `first = 0` and `total = n_q`.
    ///
    /// Errors ([`InvalidOption`](crate::AttentionError::InvalidOption)): `first + n_q >
    /// total`; a packed batch of several sequences (each counts rows from its own start);
    /// cached attention (the cache positions its queries).
    ///
    /// ```
    /// use attention_core::{scaled_dot_product_attention, AttentionOptions, Causal};
    /// use nalgebra::DMatrix;
    /// let q = DMatrix::<f64>::from_fn(6, 4, |i, j| ((3 * i + j) as f64).sin());
    /// let causal = AttentionOptions::new().with_causal(Causal::BottomRight);
    /// let all = scaled_dot_product_attention(&q, &q, &q, &causal)?;
    /// // Rows 2..5 alone, placed where they are in the whole call.
    /// let rows = scaled_dot_product_attention(q.rows(2, 3), &q, &q, &causal.clone().with_query_rows(2, 6))?;
    /// for i in 0..3 {
    ///     for c in 0..4 {
    ///         assert!((rows[(i, c)] - all[(2 + i, c)]).abs() < 1e-15);
    ///     }
    /// }
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    #[must_use]
    pub fn with_query_rows(mut self, first: usize, total: usize) -> Self {
        self.query_rows = Some((first, total));
        self
    }

    /// Chooses between all of rayon's threads (the default) and the calling thread only.
    #[must_use]
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Forces a kernel path instead of [`CpuPath::detect`]'s choice (for tests and
    /// benchmarks); a path this CPU lacks makes calls fail with
    /// [`AttentionError::UnsupportedCpuPath`](crate::AttentionError::UnsupportedCpuPath).
    #[must_use]
    pub fn with_cpu_path(mut self, path: CpuPath) -> Self {
        self.cpu_path = Some(path);
        self
    }

    /// The forced kernel path, if any.
    pub fn cpu_path(&self) -> Option<CpuPath> {
        self.cpu_path
    }

    /// The explicit scale, if one was set.
    pub fn scale(&self) -> Option<T> {
        self.scale
    }
    /// The causal alignment, if any.
    pub fn causal(&self) -> Option<Causal> {
        self.causal
    }
    /// The boolean mask, if any.
    pub fn mask(&self) -> Option<&MatRef<'a, bool>> {
        self.mask.as_ref()
    }
    /// The key mask, if any.
    pub fn key_mask(&self) -> Option<&'a [bool]> {
        self.key_mask
    }
    /// The additive bias, if any.
    pub fn bias(&self) -> Option<&MatRef<'a, T>> {
        self.bias.as_ref()
    }
    /// The window `(left, right)`, if any.
    pub fn window(&self) -> Option<(usize, usize)> {
        self.window
    }
    /// The softcap, if any.
    pub fn softcap(&self) -> Option<T> {
        self.softcap
    }
    /// The ALiBi slope, if any.
    pub fn alibi_slope(&self) -> Option<T> {
        self.alibi_slope
    }
    /// The per-query-head ALiBi slopes, if any.
    pub fn alibi_slopes(&self) -> Option<&'a [T]> {
        self.alibi_slopes
    }
    /// The per-sequence masks, if any.
    pub fn sequence_masks(&self) -> Option<&'a [MatRef<'a, bool>]> {
        self.sequence_masks
    }
    /// The per-sequence biases, if any.
    pub fn sequence_biases(&self) -> Option<&'a [MatRef<'a, T>]> {
        self.sequence_biases
    }
    /// `(first, total)` of [`with_query_rows`](Self::with_query_rows).
    pub fn query_rows(&self) -> Option<(usize, usize)> {
        self.query_rows
    }

    /// The threading mode.
    pub fn parallelism(&self) -> Parallelism {
        self.parallelism
    }
}
