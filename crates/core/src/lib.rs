//! Exact, numerically safe, fast scaled dot-product attention on nalgebra matrices.
//!
//! ```text
//! Q = X·W_q,   K = X·W_k,   V = X·W_v
//! attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V
//! softmax(s)_ij = exp(s_ij − m_i) / Σ_j' exp(s_ij' − m_i),   m_i = max_j s_ij
//! ```
//!
//! Rows are tokens and columns are features, exactly as numpy's `X @ W_q`. Everything is
//! generic over `f32` and `f64` ([`Element`]).
//!
//! # Example: the numpy original
//! ```
//! use attention_core::{compute_qkv, self_attention};
//! use nalgebra::DMatrix;
//!
//! let x = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
//! let w_q = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
//! let w_k = w_q.clone();
//! let w_v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
//!
//! let (q, k, v) = compute_qkv(&x, &w_q, &w_k, &w_v)?;
//! let out = self_attention(&q, &k, &v)?;
//!
//! let expected = [[1.660_476_901_346_686, 2.660_476_901_346_686],
//!                 [2.339_523_098_653_314, 3.339_523_098_653_314]];
//! for i in 0..2 {
//!     for j in 0..2 {
//!         assert!((out[(i, j)] - expected[i][j]).abs() < 1e-12);
//!     }
//! }
//! # Ok::<(), attention_core::AttentionError>(())
//! ```
//!
//! # Coming from numpy / PyTorch
//! | numpy / PyTorch | here |
//! |---|---|
//! | `Q, K, V = X @ W_q, X @ W_k, X @ W_v` | [`compute_qkv`]`(&x, &w_q, &w_k, &w_v)?` |
//! | `softmax(Q @ K.T / sqrt(d_k)) @ V` | [`self_attention`]`(&q, &k, &v)?` |
//! | `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale)` | [`scaled_dot_product_attention`]`(&q, &k, &v, &options)?` |
//! | `attn_mask` (bool, `True` = attend) | [`AttentionOptions::with_mask`] (same convention) |
//! | float `attn_mask` | [`AttentionOptions::with_bias`] |
//! | `is_causal=True` | [`AttentionOptions::with_causal`]`(`[`Causal::TopLeft`]`)` |
//! | FlashAttention `causal=True` | [`Causal::BottomRight`] |
//! | FlashAttention `window_size`, `softcap`, `alibi_slopes` | [`AttentionOptions::with_window`], [`with_softcap`](AttentionOptions::with_softcap), [`with_alibi_slope`](AttentionOptions::with_alibi_slope) |
//! | `need_weights=True` | [`attention_weights`] |
//! | FlashAttention's `softmax_lse` | [`scaled_dot_product_attention_with_lse`] |
//! | `nn.MultiheadAttention(E, h)` (`y = x·Wᵀ + b`: pass `W = weight.T`) | [`MultiHeadAttention`]`::new(h, h, w_q, w_k, w_v, w_o)?.with_biases(..)?.forward(&x, &options)?` |
//! | rotary embeddings (`rotate_half` / GPT-J interleaved) on Q and K | [`Rope`]`::new(r).apply(&mut q, heads, &positions)?` |
//! | vLLM's paged KV cache, FlashAttention's `flash_attn_with_kvcache` (without the fused RoPE) | [`KvCache`]: `append(seq, &k_new, &v_new)?`, then [`cached_attention`]`(&q_new, &cache, seq, &layout, &options)?` |
//!
//! A numpy array `a` of shape `(n, d)` is `DMatrix::from_row_slice(n, d, a.ravel())`.
//! Where numpy's version overflows (`np.exp` of a score above ~88 in f32 or ~709 in f64
//! gives `inf` and then NaN), this crate subtracts each row's maximum first, so any finite
//! input gives a finite output. PyTorch returns NaN for a fully masked row; this crate
//! returns 0 (and log-sum-exp −∞), the convention FlashAttention uses.
//!
//! # Errors and guarantees
//! Every function returns [`AttentionError`] for bad input (mismatched shapes, NaN or ∞,
//! invalid options, sizes that cannot be allocated) and never panics on it. For finite
//! inputs the result is either computed within the error bound (never NaN; outputs stay
//! within `±max|V|`; a row with an allowed key never comes back as a masked row) or, when
//! a score that decides it lies outside the type's range,
//! [`AttentionError::ScoreOverflow`] naming the first such (query, key): the same outcome
//! on every CPU path and thread count. Results are computed by a fused kernel that
//! never builds the `n_q × n_kv` score matrix (see [`scaled_dot_product_attention`]);
//! [`attention_weights`] is the one function that does, because it returns it.
//! Accuracy is checked against the independent, more accurate `attention-reference` crate.

#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod api;
mod backward;
mod cache;
mod columns;
mod cpu;
mod dropout;
mod element;
mod error;
mod heads;
mod kernel;
mod layer;
mod memory;
mod merge;
mod options;
mod projection;
mod rope;
mod score;
mod spec;
mod view;
mod weights;

pub use api::{
    compute_qkv, scaled_dot_product_attention, scaled_dot_product_attention_into,
    scaled_dot_product_attention_with_lse, self_attention,
};
pub use backward::{
    AttentionGradients, QkvGradients, compute_qkv_backward, multi_head_attention_backward,
    scaled_dot_product_attention_backward, scaled_dot_product_attention_backward_into,
};
pub use cache::{
    CacheSnapshot, DEFAULT_PAGE_SIZE, KvCache, SeqId, cached_attention, cached_attention_with_lse,
};
pub use cpu::CpuPath;
pub use dropout::Dropout;
pub use element::Element;
pub use error::{AttentionError, Axis, GradientOf, Operand};
pub use heads::{
    HeadLayout, alibi_slopes, multi_head_attention, multi_head_attention_into,
    multi_head_attention_with_lse, multi_head_attention_with_lse_into,
};
#[doc(hidden)]
pub use kernel::{KernelRun, last_kernel_run};
pub use layer::{LayerGradients, MultiHeadAttention};
pub use merge::merge_partial_attention;
pub use options::{AttentionOptions, Causal, MatRef, Parallelism};
pub use rope::{Rope, RopeConvention};
pub use view::{AsMatMut, AsMatRef, MatMut};
pub use weights::attention_weights;

/// The README's Rust example, run as a doctest so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
