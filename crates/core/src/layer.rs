//! [`MultiHeadAttention`]: a transformer's attention layer — the input projections, optional
//! rotary embeddings, multi-head (grouped-query) attention and the output projection —
//! validated once when it is built.

use nalgebra::{DMatrix, DVector};

use crate::Element;
use crate::backward::{Projected, multi_head_attention_backward, projections_backward};
use crate::cache::{KvCache, SeqId, cached_attention, check_before_append};
use crate::columns::owned_for_left_product;
use crate::error::{AttentionError, Axis, GradientOf, Operand, check_dim};
use crate::heads::{HeadLayout, multi_head_attention, multi_head_attention_with_lse};
use crate::memory::try_vector;
use crate::options::{AttentionOptions, MatRef};
use crate::projection::project;
use crate::rope::Rope;
use crate::spec::check_finite;
use crate::view::AsMatRef;

/// A multi-head attention layer with grouped-query heads, optional biases and optional
/// rotary position embeddings (RoPE).
///
/// For tokens `X` (n × d_model, one row per token):
/// ```text
/// Q = X·W_q + b_q        K = X·W_k + b_k        V = X·W_v + b_v
/// Q, K ← RoPE(Q), RoPE(K)                         (if set; positions 0, 1, …, n − 1)
/// A   = concat_h attention_h(Q, K, V)             (multi_head_attention: head h of Q
///                                                  reads K/V head h / (h_q / h_kv))
/// y   = A·W_o + b_o
/// ```
/// i.e. `y = concat_h(attention_h(X·W_q + b_q, X·W_k + b_k, X·W_v + b_v))·W_o + b_o`, with
/// `attention_h` the scaled dot-product attention of [`AttentionOptions`] (scale
/// `1/√d_head` unless set; causal, masks, window, softcap, ALiBi as given) on head `h`'s
/// column block. A bias is added to every row (broadcast over tokens).
///
/// # Weights multiply from the right
/// Rows are tokens, so every weight multiplies from the right (`X·W`, numpy's `X @ W`, the
/// seed example's convention). PyTorch's `nn.Linear` stores the transpose: for a
/// `linear = nn.Linear(d_in, d_out)`, `W = linear.weight.T` (d_in × d_out) and
/// `b = linear.bias`. For `nn.MultiheadAttention(E, h)`, `W_q`, `W_k`, `W_v` are the
/// transposes of the three row blocks of `in_proj_weight` (rows `0..E`, `E..2E`,
/// `2E..3E`), and `W_o = out_proj.weight.T`.
///
/// # Shapes
/// | weight | shape | bias |
/// |---|---|---|
/// | `W_q` | d_model × h_q·d_head | `b_q`: h_q·d_head |
/// | `W_k` | d_model × h_kv·d_head | `b_k`: h_kv·d_head |
/// | `W_v` | d_model × h_kv·d_v | `b_v`: h_kv·d_v |
/// | `W_o` | h_q·d_v × d_model | `b_o`: d_model |
///
/// Head `h` occupies columns `h·d_head .. (h+1)·d_head` of Q (PyTorch's
/// `view(n, heads, d_head)`), and likewise for K, V and A. `h_q` must be a multiple of
/// `h_kv` (`h_kv = h_q`: classic multi-head; `h_kv = 1`: multi-query). `d_v`, the value
/// head width, is usually `d_head`; it is read off `W_v`.
///
/// # Validation
/// Every shape and value is checked once, by [`new`](Self::new),
/// [`with_biases`](Self::with_biases) and [`with_rope`](Self::with_rope): a layer that
/// exists is consistent, and its weights are finite. A call then checks only its inputs
/// (and the options, as [`multi_head_attention`] does).
///
/// # Example
/// ```
/// use attention_core::{multi_head_attention, AttentionOptions, Causal, HeadLayout, MultiHeadAttention};
/// use nalgebra::{DMatrix, DVector};
///
/// // d_model = 4, two query heads of width 2 sharing one key/value head.
/// let w = |r, c, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 * s).sin());
/// let (w_q, w_k, w_v, w_o) = (w(4, 4, 0.7), w(4, 2, 1.3), w(4, 2, 0.4), w(4, 4, 0.9));
/// let b_o = DVector::from_element(4, 0.5);
/// let layer = MultiHeadAttention::new(2, 1, w_q.clone(), w_k.clone(), w_v.clone(), w_o.clone())?
///     .with_biases(None, None, None, Some(b_o.clone()))?;
///
/// let x = w(3, 4, 0.3); // three tokens
/// let options = AttentionOptions::new().with_causal(Causal::TopLeft);
/// let y = layer.forward(&x, &options)?;
///
/// // The same by hand: project, attend per head, project back.
/// let (q, k, v) = (&x * &w_q, &x * &w_k, &x * &w_v);
/// let a = multi_head_attention(&q, &k, &v, &HeadLayout::new(2, 1), &options)?;
/// let by_hand = a * w_o + DMatrix::from_fn(3, 4, |_, c| b_o[c]);
/// assert!((y - by_hand).amax() < 1e-14);
/// # Ok::<(), attention_core::AttentionError>(())
/// ```
#[derive(Clone, Debug)]
pub struct MultiHeadAttention<T: Element> {
    heads_q: usize,
    heads_kv: usize,
    d_head: usize,
    d_v: usize,
    w_q: DMatrix<T>,
    w_k: DMatrix<T>,
    w_v: DMatrix<T>,
    w_o: DMatrix<T>,
    b_q: Option<DVector<T>>,
    b_k: Option<DVector<T>>,
    b_v: Option<DVector<T>>,
    b_o: Option<DVector<T>>,
    rope: Option<Rope>,
}

impl<T: Element> MultiHeadAttention<T> {
    /// A layer of `heads_q` query heads reading `heads_kv` key/value heads, without biases
    /// or RoPE. `d_model` is `W_q`'s rows, `d_head` its columns over `heads_q`, `d_v`
    /// `W_v`'s columns over `heads_kv` (see the table in [`MultiHeadAttention`]).
    ///
    /// # Errors
    /// Checked in this order:
    /// - [`AttentionError::InvalidHeads`]: a head count of 0, or `heads_q` not a multiple
    ///   of `heads_kv`;
    /// - [`AttentionError::HeadSplit`]: `W_q`'s columns do not split into `heads_q`
    ///   heads ([`Operand::QueryWeight`]), `W_k`'s are not `heads_kv·d_head`
    ///   ([`Operand::KeyWeight`], with `head_width`), `W_v`'s do not split into
    ///   `heads_kv` heads ([`Operand::ValueWeight`]);
    /// - [`AttentionError::DimensionMismatch`]: `W_k` or `W_v` has other rows than `W_q`
    ///   (d_model); `W_o` ([`Operand::OutputWeight`]) does not have `heads_q·d_v` rows or
    ///   `d_model` columns;
    /// - [`AttentionError::NonFinite`]: the first NaN or ±∞ of `W_q`, `W_k`, `W_v`, `W_o`
    ///   (in that order, column-major within each).
    pub fn new(
        heads_q: usize,
        heads_kv: usize,
        w_q: DMatrix<T>,
        w_k: DMatrix<T>,
        w_v: DMatrix<T>,
        w_o: DMatrix<T>,
    ) -> Result<Self, AttentionError> {
        if heads_q == 0 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(AttentionError::InvalidHeads { heads_q, heads_kv });
        }
        let split = |operand, columns, heads, head_width| AttentionError::HeadSplit {
            operand,
            columns,
            heads,
            head_width,
        };
        if !w_q.ncols().is_multiple_of(heads_q) {
            return Err(split(Operand::QueryWeight, w_q.ncols(), heads_q, None));
        }
        let d_head = w_q.ncols() / heads_q;
        if w_k.ncols() != heads_kv * d_head {
            return Err(split(
                Operand::KeyWeight,
                w_k.ncols(),
                heads_kv,
                Some(d_head),
            ));
        }
        if !w_v.ncols().is_multiple_of(heads_kv) {
            return Err(split(Operand::ValueWeight, w_v.ncols(), heads_kv, None));
        }
        let d_v = w_v.ncols() / heads_kv;
        let d_model = w_q.nrows();
        for (operand, rows) in [
            (Operand::KeyWeight, w_k.nrows()),
            (Operand::ValueWeight, w_v.nrows()),
        ] {
            check_dim(
                operand,
                Axis::Rows,
                rows,
                d_model,
                Operand::QueryWeight,
                "every input projection has d_model rows",
            )?;
        }
        check_dim(
            Operand::OutputWeight,
            Axis::Rows,
            w_o.nrows(),
            heads_q * d_v,
            Operand::ValueWeight,
            "W_o has one row per column of the concatenated heads (h_q·d_v)",
        )?;
        check_dim(
            Operand::OutputWeight,
            Axis::Columns,
            w_o.ncols(),
            d_model,
            Operand::QueryWeight,
            "the layer maps d_model columns back to d_model",
        )?;
        for (operand, w) in [
            (Operand::QueryWeight, &w_q),
            (Operand::KeyWeight, &w_k),
            (Operand::ValueWeight, &w_v),
            (Operand::OutputWeight, &w_o),
        ] {
            check_finite(operand, &w.as_view())?;
        }
        Ok(MultiHeadAttention {
            heads_q,
            heads_kv,
            d_head,
            d_v,
            w_q,
            w_k,
            w_v,
            w_o,
            b_q: None,
            b_k: None,
            b_v: None,
            b_o: None,
            rope: None,
        })
    }

    /// Sets the biases (`None` for none; each replaces any earlier one): `b_q`
    /// (h_q·d_head entries), `b_k` (h_kv·d_head), `b_v` (h_kv·d_v), `b_o` (d_model).
    /// Llama has none, Qwen2 `b_q`, `b_k`, `b_v`, PyTorch's `nn.MultiheadAttention` all
    /// four.
    ///
    /// # Errors
    /// [`AttentionError::DimensionMismatch`] (`Axis::Entries`, naming
    /// [`Operand::QueryBias`] … [`Operand::OutputBias`]) for a bias of the wrong length,
    /// then [`AttentionError::NonFinite`] for the first NaN or ±∞ (biases in the order
    /// q, k, v, o). On error the layer is dropped: build it again.
    pub fn with_biases(
        self,
        b_q: Option<DVector<T>>,
        b_k: Option<DVector<T>>,
        b_v: Option<DVector<T>>,
        b_o: Option<DVector<T>>,
    ) -> Result<Self, AttentionError> {
        let checks = [
            (
                &b_q,
                Operand::QueryBias,
                self.w_q.ncols(),
                Operand::QueryWeight,
            ),
            (&b_k, Operand::KeyBias, self.w_k.ncols(), Operand::KeyWeight),
            (
                &b_v,
                Operand::ValueBias,
                self.w_v.ncols(),
                Operand::ValueWeight,
            ),
            (
                &b_o,
                Operand::OutputBias,
                self.w_o.ncols(),
                Operand::OutputWeight,
            ),
        ];
        for (b, operand, len, against) in &checks {
            if let Some(b) = b {
                check_dim(
                    *operand,
                    Axis::Entries,
                    b.len(),
                    *len,
                    *against,
                    "a bias has one entry per column of its weight",
                )?;
            }
        }
        for (b, operand, _, _) in &checks {
            if let Some(b) = b {
                check_finite(*operand, &b.into_mat_ref())?;
            }
        }
        Ok(MultiHeadAttention {
            b_q,
            b_k,
            b_v,
            b_o,
            ..self
        })
    }

    /// Rotates Q and K of every head by `rope` before attention, in
    /// [`forward`](Self::forward) (positions `0..n`) and
    /// [`forward_packed`](Self::forward_packed) (positions restarting at 0 in each
    /// sequence); not in [`forward_cross`](Self::forward_cross) (see there why).
    ///
    /// # Errors
    /// Those of [`Rope::apply`]'s parameters, checked here against the head width:
    /// [`AttentionError::InvalidRopeBase`], [`AttentionError::InvalidRotaryDim`] (odd, 0,
    /// or wider than `d_head`). On error the layer is dropped.
    pub fn with_rope(self, rope: Rope) -> Result<Self, AttentionError> {
        rope.check(0, self.w_q.ncols(), self.heads_q, &[])?;
        Ok(MultiHeadAttention {
            rope: Some(rope),
            ..self
        })
    }

    /// The number of query heads `h_q`.
    #[must_use]
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }

    /// The number of key/value heads `h_kv`.
    #[must_use]
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }

    /// The width of the layer's input and output, `d_model`.
    #[must_use]
    pub fn d_model(&self) -> usize {
        self.w_q.nrows()
    }

    /// The query/key head width `d_head`.
    #[must_use]
    pub fn d_head(&self) -> usize {
        self.d_head
    }

    /// The value head width `d_v` (usually `d_head`).
    #[must_use]
    pub fn d_v(&self) -> usize {
        self.d_v
    }

    /// The rotary embedding, if set.
    #[must_use]
    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_ref()
    }

    /// Self-attention of one sequence: `y = layer(X)` (the formula in
    /// [`MultiHeadAttention`]), RoPE at positions `0..n`.
    ///
    /// `options` are those of [`multi_head_attention`] for one sequence: causal (with
    /// n_q = n_kv, top-left and bottom-right agree), a mask or bias (n × n), a key padding
    /// mask (n), window, softcap, ALiBi (one slope or one per query head), the scale
    /// (default `1/√d_head`), the CPU path and threading.
    ///
    /// # Shapes
    /// `x` is n × d_model, a matrix or a view by value or by reference (any strides);
    /// returns n × d_model. n = 0 gives a 0 × d_model matrix.
    ///
    /// # Errors
    /// [`AttentionError::DimensionMismatch`] ([`Operand::Input`]) if `x` does not have
    /// d_model columns; [`AttentionError::NonFinite`] ([`Operand::Input`]) for a NaN or ∞
    /// in `x`; [`AttentionError::ProductOverflow`] if a projection leaves the type's range
    /// ([`Operand::Query`], `Key`, `Value`, or `Output` for `A·W_o + b_o`);
    /// [`AttentionError::RotationOverflow`] if RoPE does (entries above MAX/2 only); the
    /// option and score errors of [`multi_head_attention`]; [`AttentionError::TooLarge`].
    pub fn forward<'x>(
        &self,
        x: impl AsMatRef<'x, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        let x = x.into_mat_ref();
        let n = x.nrows();
        self.self_attention(x, &[n], false, options)
    }

    /// Self-attention of a packed batch of sequences (FlashAttention's varlen layout, no
    /// padding): `x`'s rows stack the tokens of each sequence, `seqlens[s]` of them for
    /// sequence `s` (0 allowed). Each sequence attends only to itself, exactly as
    /// [`forward`](Self::forward) on its rows alone would (RoPE positions restart at 0 in
    /// each sequence; causal, window and ALiBi count from its start).
    ///
    /// `options` are those of [`multi_head_attention`] with
    /// `HeadLayout::new(h_q, h_kv).with_seqlens(seqlens, seqlens)`: a key mask covers the
    /// packed tokens (Σ seqlens entries); masks and biases are per sequence
    /// ([`AttentionOptions::with_sequence_masks`],
    /// [`with_sequence_biases`](AttentionOptions::with_sequence_biases)).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and [`AttentionError::SequenceLengths`]
    /// ([`Operand::Input`]) if the lengths do not sum to `x`'s rows (checked before any
    /// value is read).
    ///
    /// # Example
    /// ```
    /// use attention_core::{AttentionOptions, Causal, MultiHeadAttention, Rope};
    /// use nalgebra::DMatrix;
    ///
    /// let w = |r, c, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 * s).cos());
    /// let layer = MultiHeadAttention::new(2, 2, w(8, 8, 0.3), w(8, 8, 0.5), w(8, 8, 0.7), w(8, 8, 1.1))?
    ///     .with_rope(Rope::new(4))?;
    /// let x = w(5, 8, 0.2); // sequences of 2 and 3 tokens
    /// let options = AttentionOptions::new().with_causal(Causal::BottomRight);
    /// let packed = layer.forward_packed(&x, &[2, 3], &options)?;
    /// let second = layer.forward(x.rows(2, 3), &options)?;
    /// assert!((packed.rows(2, 3) - second).amax() < 1e-14);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    pub fn forward_packed<'x>(
        &self,
        x: impl AsMatRef<'x, T>,
        seqlens: &[usize],
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        self.self_attention(x.into_mat_ref(), seqlens, true, options)
    }

    /// Cross-attention (encoder–decoder): queries from `x_q` (the decoder's tokens), keys
    /// and values from `x_kv` (the encoder's):
    /// `y = concat_h(attention_h(X_q·W_q + b_q, X_kv·W_k + b_k, X_kv·W_v + b_v))·W_o + b_o`.
    ///
    /// Padding of the encoder's tokens is masked with
    /// [`AttentionOptions::with_key_mask`] (n_kv entries, `true` = real token); a mask or
    /// bias is n_q × n_kv. Causal masking is rarely meant here: if set, it aligns as
    /// [`Causal`](crate::Causal) says.
    ///
    /// **RoPE is not applied**, even when the layer has one: rotary embeddings make
    /// `q_m·k_n` depend on the offset `m − n` between two tokens of one sequence, but here
    /// queries and keys index different sequences, so their offset means nothing (and
    /// RoPE models, decoder-only, have no cross-attention; encoder–decoder models position
    /// their tokens inside each stack's self-attention). A model that wants rotated
    /// cross-attention can project, rotate and attend itself with
    /// [`compute_qkv`](crate::compute_qkv), [`Rope::apply`] and [`multi_head_attention`].
    ///
    /// # Shapes
    /// `x_q` is n_q × d_model, `x_kv` n_kv × d_model (views accepted); returns
    /// n_q × d_model. n_kv = 0 gives `b_o` in every row (each head attends to nothing).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), with [`Operand::KeyValueInput`] for `x_kv`'s
    /// columns or values.
    ///
    /// # Example
    /// ```
    /// use attention_core::{AttentionOptions, MultiHeadAttention};
    /// use nalgebra::DMatrix;
    ///
    /// let w = |r, c, s: f32| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f32 * s).sin());
    /// let layer = MultiHeadAttention::new(2, 1, w(6, 6, 0.3), w(6, 3, 0.5), w(6, 3, 0.7), w(6, 6, 1.1))?;
    /// let decoder = w(2, 6, 0.9);
    /// let encoder = w(4, 6, 0.4); // its last token is padding
    /// let options = AttentionOptions::new().with_key_mask(&[true, true, true, false]);
    /// let y = layer.forward_cross(&decoder, &encoder, &options)?;
    /// // Padding is ignored: the same as attending to the three real tokens only.
    /// let trimmed = layer.forward_cross(&decoder, encoder.rows(0, 3), &AttentionOptions::new())?;
    /// assert!((y - trimmed).amax() < 1e-6);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    pub fn forward_cross<'q, 'kv>(
        &self,
        x_q: impl AsMatRef<'q, T>,
        x_kv: impl AsMatRef<'kv, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        let (x_q, x_kv) = (x_q.into_mat_ref(), x_kv.into_mat_ref());
        self.check_columns(&x_q, Operand::Input)?;
        self.check_columns(&x_kv, Operand::KeyValueInput)?;
        let x_q = self.checked_input(&x_q, Operand::Input)?;
        let x_kv = self.checked_input(&x_kv, Operand::KeyValueInput)?;
        let (x_q, x_kv) = (x_q.view(), x_kv.view());
        let q = project(&x_q, &self.w_q.as_view(), self.b_q.as_ref(), Operand::Query)?;
        let (k, v) = self.project_kv(&x_kv)?;
        self.attend_and_project(
            &q,
            &k,
            &v,
            &HeadLayout::new(self.heads_q, self.heads_kv),
            options,
        )
    }

    /// Self-attention of a sequence's new tokens through a KV cache, for decoding:
    /// `x_new` holds the next `n_new` tokens of sequence `seq` (a prompt to prefill, a
    /// chunk of it, or one generated token), whose keys and values are appended to `cache`
    /// before the tokens attend to the whole cached history and themselves.
    ///
    /// ```text
    /// p      = cache.len(seq)                         (the tokens already cached)
    /// Q, K, V = X_new·W_q + b_q, X_new·W_k + b_k, X_new·W_v + b_v
    /// Q, K   ← RoPE(Q), RoPE(K) at positions p .. p + n_new     (if the layer has RoPE)
    /// cache.append(seq, K, V)                         (keys stored after RoPE)
    /// y      = cached_attention(Q, cache, seq)·W_o + b_o
    /// ```
    ///
    /// Feeding a sequence through `forward_cached` in pieces of any sizes (a prompt, then
    /// one token at a time) gives, row for row, [`forward`](Self::forward) of the whole
    /// sequence with causal masking, within rounding (nalgebra's product of fewer than 6
    /// rows, and the attention kernels for few and for many queries, round differently;
    /// a first chunk of more than 8 tokens into an empty cache gives the bits of
    /// `forward` of those tokens alone); on a sliding-window cache of window
    /// `w`, `forward` with the window `(w − 1, 0)` added. Causal masking is implied
    /// (bottom-right: the last row is the newest token).
    ///
    /// `options` are those of [`cached_attention`]: the scale (default `1/√d_head`),
    /// softcap, ALiBi (one slope or one per query head; distances between absolute
    /// positions), a window on a cache without one, the CPU path and threading. Causal
    /// may be set only as [`Causal::BottomRight`](crate::Causal::BottomRight); masks,
    /// biases and key masks are refused (truncate the cache instead).
    ///
    /// # Shapes
    /// `x_new` is n_new × d_model (a matrix or a view); returns n_new × d_model.
    /// `cache` must have the layer's `h_kv` heads, of widths `d_head` (keys) and `d_v`
    /// (values). n_new = 0 appends nothing and returns a 0 × d_model matrix.
    ///
    /// # All or nothing
    /// On any error the cache is exactly as before, bit for bit. Everything that does not
    /// depend on the values (the input's width, the cache's heads and widths, the
    /// sequence, every option, the CPU path) is checked before anything is computed; the
    /// projections and RoPE run before the append. What can still fail after the append
    /// depends on the values — a score out of the type's range, the output projection
    /// overflowing, an allocation — and then the append is undone exactly (its pages back
    /// in place, the rows it overwrote restored), not just truncated: a window's evicted
    /// pages come back too.
    ///
    /// # Errors
    /// In this order: [`AttentionError::DimensionMismatch`] ([`Operand::Input`],
    /// columns) if `x_new` does not have d_model columns; [`AttentionError::DimensionMismatch`]
    /// ([`Operand::KvCache`] against the layer's weights) if the cache's heads
    /// ([`Axis::Heads`]), key width or value width ([`Axis::Columns`], `h_kv·d_head` and
    /// `h_kv·d_v`) are not the layer's; [`AttentionError::UnknownSequence`]; the option
    /// errors of [`cached_attention`] ([`AttentionError::InvalidOption`], invalid scale,
    /// softcap or slopes, a CPU path this CPU lacks); then those of
    /// [`forward`](Self::forward) for the values (NaN/∞ in `x_new`, `ProductOverflow`,
    /// `RotationOverflow`); [`AttentionError::TooLarge`] if the cache cannot grow; the
    /// score errors of [`cached_attention`] (`HeadScoreOverflow`, keys at absolute
    /// positions).
    ///
    /// # Example
    /// ```
    /// use attention_core::{AttentionOptions, Causal, KvCache, MultiHeadAttention, Rope};
    /// use nalgebra::DMatrix;
    ///
    /// let w = |r, c, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 * s).sin());
    /// // d_model 8, 4 query heads of width 2 reading 2 key/value heads, RoPE.
    /// let layer = MultiHeadAttention::new(4, 2, w(8, 8, 0.3), w(8, 4, 0.5), w(8, 4, 0.7), w(8, 8, 1.1))?
    ///     .with_rope(Rope::new(2))?;
    /// let mut cache = KvCache::new(layer.heads_kv(), layer.d_head(), layer.d_v())?;
    /// let seq = cache.add_sequence();
    ///
    /// let x = w(12, 8, 0.2);
    /// let prompt = layer.forward_cached(x.rows(0, 9), &mut cache, seq, &AttentionOptions::new())?;
    /// let mut steps = vec![prompt];
    /// for t in 9..12 {
    ///     steps.push(layer.forward_cached(x.rows(t, 1), &mut cache, seq, &AttentionOptions::new())?);
    /// }
    /// assert_eq!(cache.len(seq)?, 12);
    ///
    /// // The same as the whole sequence at once, with causal masking.
    /// let causal = AttentionOptions::new().with_causal(Causal::TopLeft);
    /// let full = layer.forward(&x, &causal)?;
    /// assert!((&steps[0] - full.rows(0, 9)).amax() < 1e-14);
    /// for (t, y) in (9..12).zip(&steps[1..]) {
    ///     assert!((y - full.rows(t, 1)).amax() < 1e-14);
    /// }
    /// // A prompt of more than 8 tokens into an empty cache: the same bits as `forward` of
    /// // the prompt alone.
    /// assert_eq!(steps[0], layer.forward(x.rows(0, 9), &causal)?);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    pub fn forward_cached<'x>(
        &self,
        x_new: impl AsMatRef<'x, T>,
        cache: &mut KvCache<T>,
        seq: SeqId,
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        let x = x_new.into_mat_ref();
        self.check_columns(&x, Operand::Input)?;
        self.check_cache(cache)?;
        let layout = HeadLayout::new(self.heads_q, self.heads_kv);
        check_before_append(cache, seq, self.w_q.ncols(), &layout, options)?;
        let start = cache.len(seq)?;

        let x = self.checked_input(&x, Operand::Input)?;
        let x = x.view();
        let mut q = project(&x, &self.w_q.as_view(), self.b_q.as_ref(), Operand::Query)?;
        let (mut k, v) = self.project_kv(&x)?;
        if let Some(rope) = &self.rope {
            let positions: Vec<usize> = (start..start + x.nrows()).collect();
            rope.apply(&mut q, self.heads_q, &positions)?;
            rope.apply(&mut k, self.heads_kv, &positions)?;
        }

        let undo = cache.append_undoable(seq, k.as_view(), v.as_view())?;
        let result = cached_attention(&q, cache, seq, &layout, options).and_then(|a| {
            project(
                &a.as_view(),
                &self.w_o.as_view(),
                self.b_o.as_ref(),
                Operand::Output,
            )
        });
        if let (Err(_), Some(undo)) = (&result, undo) {
            cache.undo(undo);
        }
        result
    }

    /// The cache holds this layer's key/value heads: `h_kv` of them, `d_head` and `d_v`
    /// wide.
    fn check_cache(&self, cache: &KvCache<T>) -> Result<(), AttentionError> {
        check_dim(
            Operand::KvCache,
            Axis::Heads,
            cache.heads_kv(),
            self.heads_kv,
            Operand::KeyWeight,
            "the cache holds the layer's key/value heads",
        )?;
        check_dim(
            Operand::KvCache,
            Axis::Columns,
            cache.heads_kv() * cache.d_k(),
            self.w_k.ncols(),
            Operand::KeyWeight,
            "the cache's keys are h_kv*d_head wide, as W_k's columns",
        )?;
        check_dim(
            Operand::KvCache,
            Axis::Columns,
            cache.heads_kv() * cache.d_v(),
            self.w_v.ncols(),
            Operand::ValueWeight,
            "the cache's values are h_kv*d_v wide, as W_v's columns",
        )
    }

    /// [`forward`](Self::forward) and [`forward_packed`](Self::forward_packed):
    /// `packed` says whether `seqlens` came from the caller (and goes to the layout).
    fn self_attention(
        &self,
        x: MatRef<'_, T>,
        seqlens: &[usize],
        packed: bool,
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        self.check_packed(&x, seqlens)?;
        let x = self.checked_input(&x, Operand::Input)?;
        let (q, k, v) = self.rotated_qkv(&x.view(), seqlens)?;
        let layout = self.layout(seqlens, packed);
        self.attend_and_project(&q, &k, &v, &layout, options)
    }

    /// Checks `x`'s columns and that `seqlens` sum to its rows.
    fn check_packed(&self, x: &MatRef<'_, T>, seqlens: &[usize]) -> Result<(), AttentionError> {
        self.check_columns(x, Operand::Input)?;
        // A sum past usize::MAX is reported as usize::MAX (it cannot equal the rows).
        let total = seqlens
            .iter()
            .try_fold(0usize, |a, &n| a.checked_add(n))
            .unwrap_or(usize::MAX);
        if total != x.nrows() {
            return Err(AttentionError::SequenceLengths {
                operand: Operand::Input,
                sum: total,
                rows: x.nrows(),
            });
        }
        Ok(())
    }

    /// Each token's RoPE position: `0..len` per sequence.
    fn positions(seqlens: &[usize]) -> Vec<usize> {
        seqlens.iter().flat_map(|&len| 0..len).collect()
    }

    /// Q, K (rotated, if the layer has RoPE, at positions restarting per sequence) and V
    /// of a validated `x`.
    #[allow(clippy::type_complexity)] // (Q, K, V)
    fn rotated_qkv(
        &self,
        x: &MatRef<'_, T>,
        seqlens: &[usize],
    ) -> Result<(DMatrix<T>, DMatrix<T>, DMatrix<T>), AttentionError> {
        let mut q = project(x, &self.w_q.as_view(), self.b_q.as_ref(), Operand::Query)?;
        let (mut k, v) = self.project_kv(x)?;
        if let Some(rope) = &self.rope {
            let positions = Self::positions(seqlens);
            rope.apply(&mut q, self.heads_q, &positions)?;
            rope.apply(&mut k, self.heads_kv, &positions)?;
        }
        Ok((q, k, v))
    }

    /// The head layout of a call on one sequence, or a packed batch.
    fn layout<'s>(&self, seqlens: &'s [usize], packed: bool) -> HeadLayout<'s> {
        let layout = HeadLayout::new(self.heads_q, self.heads_kv);
        if packed {
            layout.with_seqlens(seqlens, seqlens)
        } else {
            layout
        }
    }

    /// The gradients of [`forward`](Self::forward) for a scalar loss `L`, given
    /// `d_y = ∂L/∂y` (n × d_model): with respect to `x`, every weight and every bias the
    /// layer has. The forward is computed again (its Q, K, V, attention output and lse;
    /// nothing is kept between the calls), then, with `A` the heads' outputs side by side:
    ///
    /// ```text
    /// dW_o = Aᵀ·dY      db_o = Σ_rows dY      dA = dY·W_oᵀ
    /// dQ', dK', dV  = multi_head_attention_backward(Q', K', V, A, lse, dA)   (Q', K' rotated)
    /// dQ = R⁻¹·dQ'      dK = R⁻¹·dK'          (Rope::apply_inverse: the rotation's transpose)
    /// dW_q = Xᵀ·dQ      db_q = Σ_rows dQ      (likewise K, V)
    /// dX = dQ·W_qᵀ + dK·W_kᵀ + dV·W_vᵀ
    /// ```
    ///
    /// Bias gradients are summed in f64 and rounded once; products are nalgebra's in T,
    /// the attention's gradients those of [`multi_head_attention_backward`](crate::multi_head_attention_backward).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward); [`AttentionError::DimensionMismatch`] and
    /// [`AttentionError::NonFinite`] with [`Operand::OutputGradient`] for `d_y`;
    /// [`AttentionError::ProductOverflow`] with [`Operand::Gradient`] for a gradient out
    /// of the type's range.
    ///
    /// # Example
    /// ```
    /// use attention_core::{AttentionOptions, Causal, MultiHeadAttention, Rope};
    /// use nalgebra::{DMatrix, DVector};
    ///
    /// let w = |r, c, s: f64| DMatrix::from_fn(r, c, |i, j| ((i * c + j) as f64 * s).cos() * 0.5);
    /// let layer = MultiHeadAttention::new(2, 1, w(4, 4, 0.3), w(4, 2, 0.5), w(4, 2, 0.7), w(4, 4, 1.1))?
    ///     .with_biases(None, None, None, Some(DVector::from_element(4, 0.1)))?
    ///     .with_rope(Rope::new(2))?;
    /// let x = w(3, 4, 0.2);
    /// let options = AttentionOptions::new().with_causal(Causal::TopLeft);
    /// // L = Σ y: dY is all ones.
    /// let g = layer.backward(&x, &DMatrix::from_element(3, 4, 1.0), &options)?;
    /// assert_eq!(g.dx.shape(), (3, 4));
    /// assert_eq!(g.dw_k.shape(), (4, 2));
    /// // ∂(Σ y)/∂b_o = the number of rows; no other bias.
    /// assert_eq!(g.db_o, Some(DVector::from_element(4, 3.0)));
    /// assert_eq!(g.db_q, None);
    /// # Ok::<(), attention_core::AttentionError>(())
    /// ```
    pub fn backward<'x, 'g>(
        &self,
        x: impl AsMatRef<'x, T>,
        d_y: impl AsMatRef<'g, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<LayerGradients<T>, AttentionError> {
        let x = x.into_mat_ref();
        let n = x.nrows();
        self.self_attention_backward(x, &[n], false, d_y.into_mat_ref(), options)
    }

    /// The gradients of [`forward_packed`](Self::forward_packed): as
    /// [`backward`](Self::backward), on a packed batch (`seqlens` as there).
    ///
    /// # Errors
    /// Those of [`backward`](Self::backward) and of
    /// [`forward_packed`](Self::forward_packed).
    pub fn backward_packed<'x, 'g>(
        &self,
        x: impl AsMatRef<'x, T>,
        seqlens: &[usize],
        d_y: impl AsMatRef<'g, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<LayerGradients<T>, AttentionError> {
        self.self_attention_backward(x.into_mat_ref(), seqlens, true, d_y.into_mat_ref(), options)
    }

    /// [`backward`](Self::backward) and [`backward_packed`](Self::backward_packed).
    fn self_attention_backward(
        &self,
        x: MatRef<'_, T>,
        seqlens: &[usize],
        packed: bool,
        d_y: MatRef<'_, T>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<LayerGradients<T>, AttentionError> {
        self.check_packed(&x, seqlens)?;
        let rule = "the output's gradient has the output's shape";
        check_dim(
            Operand::OutputGradient,
            Axis::Rows,
            d_y.nrows(),
            x.nrows(),
            Operand::Input,
            rule,
        )?;
        check_dim(
            Operand::OutputGradient,
            Axis::Columns,
            d_y.ncols(),
            self.d_model(),
            Operand::OutputWeight,
            rule,
        )?;
        let x = self.checked_input(&x, Operand::Input)?;
        let x = x.view();
        check_finite(Operand::OutputGradient, &d_y)?;
        let (q, k, v) = self.rotated_qkv(&x, seqlens)?;
        let layout = self.layout(seqlens, packed);
        let (a, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, options)?;
        // The output projection: y = A·W_o + b_o.
        let output = Projected {
            g: d_y,
            g_operand: Operand::OutputGradient,
            w: self.w_o.as_view(),
            w_operand: Operand::OutputWeight,
            w_grad: GradientOf::OutputWeight,
        };
        let (d_a, dw_o) = projections_backward((&a.as_view(), GradientOf::HeadOutputs), &[output])?;
        let g = multi_head_attention_backward(&q, &k, &v, &a, &lse, &d_a, &layout, options)?;
        let (mut dq, mut dk, dv) = (g.dq, g.dk, g.dv);
        if let Some(rope) = &self.rope {
            let positions = Self::positions(seqlens);
            rope.apply_inverse(&mut dq, self.heads_q, &positions)?;
            rope.apply_inverse(&mut dk, self.heads_kv, &positions)?;
        }
        fn part<'a, T: Element>(
            g: &'a DMatrix<T>,
            of: GradientOf,
            w: &'a DMatrix<T>,
            (w_operand, w_grad): (Operand, GradientOf),
        ) -> Projected<'a, T> {
            Projected {
                g: g.as_view(),
                g_operand: Operand::Gradient(of),
                w: w.as_view(),
                w_operand,
                w_grad,
            }
        }
        let parts = [
            part(
                &dq,
                GradientOf::Query,
                &self.w_q,
                (Operand::QueryWeight, GradientOf::QueryWeight),
            ),
            part(
                &dk,
                GradientOf::Key,
                &self.w_k,
                (Operand::KeyWeight, GradientOf::KeyWeight),
            ),
            part(
                &dv,
                GradientOf::Value,
                &self.w_v,
                (Operand::ValueWeight, GradientOf::ValueWeight),
            ),
        ];
        let (dx, dw) = projections_backward((&x, GradientOf::Input), &parts)?;
        let [dw_q, dw_k, dw_v] = <[DMatrix<T>; 3]>::try_from(dw).expect("three weight gradients");
        let bias = |has: bool, g: &MatRef<'_, T>, of| has.then(|| column_sums(g, of)).transpose();
        Ok(LayerGradients {
            dx,
            dw_q,
            dw_k,
            dw_v,
            dw_o: dw_o.into_iter().next().expect("one weight gradient"),
            db_q: bias(self.b_q.is_some(), &dq.as_view(), GradientOf::QueryBias)?,
            db_k: bias(self.b_k.is_some(), &dk.as_view(), GradientOf::KeyBias)?,
            db_v: bias(self.b_v.is_some(), &dv.as_view(), GradientOf::ValueBias)?,
            db_o: bias(self.b_o.is_some(), &d_y, GradientOf::OutputBias)?,
        })
    }

    /// K and V projected from `x` (validated, not broadcast).
    fn project_kv(&self, x: &MatRef<'_, T>) -> Result<(DMatrix<T>, DMatrix<T>), AttentionError> {
        Ok((
            project(x, &self.w_k.as_view(), self.b_k.as_ref(), Operand::Key)?,
            project(x, &self.w_v.as_view(), self.b_v.as_ref(), Operand::Value)?,
        ))
    }

    /// `concat_h attention_h(Q, K, V) · W_o + b_o`.
    fn attend_and_project(
        &self,
        q: &DMatrix<T>,
        k: &DMatrix<T>,
        v: &DMatrix<T>,
        layout: &HeadLayout<'_>,
        options: &AttentionOptions<'_, T>,
    ) -> Result<DMatrix<T>, AttentionError> {
        let a = multi_head_attention(q, k, v, layout, options)?;
        project(
            &a.as_view(),
            &self.w_o.as_view(),
            self.b_o.as_ref(),
            Operand::Output,
        )
    }

    /// `x` must have d_model columns.
    fn check_columns(&self, x: &MatRef<'_, T>, operand: Operand) -> Result<(), AttentionError> {
        check_dim(
            operand,
            Axis::Columns,
            x.ncols(),
            self.d_model(),
            Operand::QueryWeight,
            "the layer's input has d_model columns (the rows of W_q)",
        )
    }

    /// Checks that `x` is finite, and copies it if nalgebra's product cannot read it in
    /// place (a broadcast or row-strided view: `owned_for_left_product`).
    fn checked_input<'a>(
        &self,
        x: &MatRef<'a, T>,
        operand: Operand,
    ) -> Result<Input<'a, T>, AttentionError> {
        check_finite(operand, x)?;
        Ok(match owned_for_left_product(x, operand)? {
            Some(owned) => Input::Owned(owned),
            None => Input::Borrowed(*x),
        })
    }
}

/// The gradients of [`MultiHeadAttention::backward`]: each the shape of what it is the
/// gradient of; a bias gradient is `Some` exactly when the layer has that bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGradients<T: Element> {
    /// `∂L/∂x`, n × d_model.
    pub dx: DMatrix<T>,
    /// `∂L/∂W_q`, d_model × h_q·d_head.
    pub dw_q: DMatrix<T>,
    /// `∂L/∂W_k`, d_model × h_kv·d_head.
    pub dw_k: DMatrix<T>,
    /// `∂L/∂W_v`, d_model × h_kv·d_v.
    pub dw_v: DMatrix<T>,
    /// `∂L/∂W_o`, h_q·d_v × d_model.
    pub dw_o: DMatrix<T>,
    /// `∂L/∂b_q`, h_q·d_head entries.
    pub db_q: Option<DVector<T>>,
    /// `∂L/∂b_k`, h_kv·d_head entries.
    pub db_k: Option<DVector<T>>,
    /// `∂L/∂b_v`, h_kv·d_v entries.
    pub db_v: Option<DVector<T>>,
    /// `∂L/∂b_o`, d_model entries.
    pub db_o: Option<DVector<T>>,
}

/// Each column's sum (a bias's gradient), in f64 and rounded once, or
/// [`AttentionError::ProductOverflow`] naming `of` for a sum out of the type's range.
fn column_sums<T: Element>(
    g: &MatRef<'_, T>,
    of: GradientOf,
) -> Result<DVector<T>, AttentionError> {
    let mut sums = try_vector(g.ncols(), T::zero(), Operand::Gradient(of))?;
    for (c, x) in sums.iter_mut().enumerate() {
        *x = T::from_f64_rounded(g.column(c).iter().map(|v| v.to_f64()).sum());
        if !x.finite() {
            return Err(AttentionError::ProductOverflow {
                operand: Operand::Gradient(of),
                row: c,
                column: 0,
            });
        }
    }
    Ok(sums)
}

/// A validated input, read in place or copied (broadcast views).
enum Input<'a, T: Element> {
    Borrowed(MatRef<'a, T>),
    Owned(DMatrix<T>),
}

impl<T: Element> Input<'_, T> {
    fn view(&self) -> MatRef<'_, T> {
        match self {
            Input::Borrowed(m) => *m,
            Input::Owned(m) => m.as_view(),
        }
    }
}
