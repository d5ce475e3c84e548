"""Exact, fast scaled dot-product attention on numpy arrays (float32 and float64).

See the module docstring (``help(attention)``) for dtypes, copies and errors.
"""

from collections.abc import Sequence
from typing import Literal, final, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray


__all__ = [
    "AttentionError",
    "compute_qkv",
    "compute_qkv_backward",
    "self_attention",
    "scaled_dot_product_attention",
    "attention_weights",
    "scaled_dot_product_attention_backward",
    "merge_partial_attention",
    "alibi_slopes",
    "multi_head_attention",
    "multi_head_attention_backward",
    "set_num_threads",
    "get_num_threads",
    "_time_sdpa",
    "KvCache",
    "MultiHeadAttention",
]

_Causal = Literal["top_left", "bottom_right"] | None
_Window = tuple[int | None, int | None] | None

class AttentionError(ValueError):
    """Bad input: shapes, NaN or infinity, options, scores beyond the dtype's range."""

def compute_qkv(
    x: ArrayLike, w_q: ArrayLike, w_k: ArrayLike, w_v: ArrayLike
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """``(x @ w_q, x @ w_k, x @ w_v)``."""

def compute_qkv_backward(
    x: ArrayLike,
    w_q: ArrayLike,
    w_k: ArrayLike,
    w_v: ArrayLike,
    d_q: ArrayLike,
    d_k: ArrayLike,
    d_v: ArrayLike,
) -> tuple[
    NDArray[np.floating], NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]
]:
    """``(dx, dw_q, dw_k, dw_v)``: the gradients of compute_qkv."""

def self_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike) -> NDArray[np.floating]:
    """``softmax(q @ k.T / sqrt(d_k)) @ v``, computed stably."""

@overload
def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: Literal[False] = False,
) -> NDArray[np.floating]: ...
@overload
def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: Literal[True],
) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
def attention_weights(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
) -> NDArray[np.floating]:
    """The (n_q, n_kv) attention weights ``softmax(s)``."""

def scaled_dot_product_attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    d_out: ArrayLike,
    *,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_d_bias: bool = False,
) -> tuple[NDArray[np.floating], ...]:
    """``(dq, dk, dv)``, or ``(dq, dk, dv, d_bias)`` with return_d_bias."""

def merge_partial_attention(
    partials: Sequence[tuple[ArrayLike, ArrayLike]],
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Merges ``(out_b, lse_b)`` over disjoint key blocks into ``(out, lse)``."""

def alibi_slopes(heads: int) -> NDArray[np.float64]:
    """The standard ALiBi slopes of ``heads`` query heads."""

@overload
def multi_head_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    heads_q: int,
    heads_kv: int | None = None,
    seqlens_q: Sequence[int] | None = None,
    seqlens_kv: Sequence[int] | None = None,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    masks: Sequence[ArrayLike] | None = None,
    biases: Sequence[ArrayLike] | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    alibi_slopes: Sequence[float] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: Literal[False] = False,
) -> NDArray[np.floating]: ...
@overload
def multi_head_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    heads_q: int,
    heads_kv: int | None = None,
    seqlens_q: Sequence[int] | None = None,
    seqlens_kv: Sequence[int] | None = None,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    masks: Sequence[ArrayLike] | None = None,
    biases: Sequence[ArrayLike] | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    alibi_slopes: Sequence[float] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: Literal[True],
) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
def multi_head_attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    d_out: ArrayLike,
    *,
    heads_q: int,
    heads_kv: int | None = None,
    seqlens_q: Sequence[int] | None = None,
    seqlens_kv: Sequence[int] | None = None,
    scale: float | None = None,
    mask: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    masks: Sequence[ArrayLike] | None = None,
    biases: Sequence[ArrayLike] | None = None,
    causal: _Causal = None,
    window: _Window = None,
    softcap: float | None = None,
    alibi_slope: float | None = None,
    alibi_slopes: Sequence[float] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """``(dq, dk, dv)``: the gradients of multi_head_attention."""

@final
class KvCache:
    """A paged key/value cache for decoding (see ``help(attention.KvCache)``)."""

    def __new__(
        cls,
        heads_kv: int,
        d_k: int,
        d_v: int,
        *,
        dtype: DTypeLike | None = None,
        page_size: int | None = None,
        window: int | None = None,
    ) -> KvCache: ...
    @property
    def dtype(self) -> str: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def d_k(self) -> int: ...
    @property
    def d_v(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def window(self) -> int | None: ...
    def add_sequence(self) -> int: ...
    def sequences(self) -> list[int]: ...
    def seq_len(self, seq: int) -> int: ...
    def append(self, seq: int, k: ArrayLike, v: ArrayLike) -> None: ...
    def truncate(self, seq: int, length: int) -> None: ...
    def remove(self, seq: int) -> None: ...
    def gather(self, seq: int) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
    @overload
    def cached_attention(
        self,
        q: ArrayLike,
        seq: int,
        *,
        heads_q: int,
        scale: float | None = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
        return_lse: Literal[False] = False,
    ) -> NDArray[np.floating]: ...
    @overload
    def cached_attention(
        self,
        q: ArrayLike,
        seq: int,
        *,
        heads_q: int,
        scale: float | None = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
        return_lse: Literal[True],
    ) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...

@final
class MultiHeadAttention:
    """A multi-head attention layer (see ``help(attention.MultiHeadAttention)``)."""

    def __new__(
        cls,
        heads_q: int,
        w_q: ArrayLike,
        w_k: ArrayLike,
        w_v: ArrayLike,
        w_o: ArrayLike,
        *,
        heads_kv: int | None = None,
        b_q: ArrayLike | None = None,
        b_k: ArrayLike | None = None,
        b_v: ArrayLike | None = None,
        b_o: ArrayLike | None = None,
        rope_dim: int | None = None,
        rope_base: float = 10000.0,
        rope_convention: Literal["half", "interleaved"] = "half",
    ) -> MultiHeadAttention: ...
    @property
    def dtype(self) -> str: ...
    @property
    def heads_q(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    def forward(
        self,
        x: ArrayLike,
        *,
        seqlens: Sequence[int] | None = None,
        scale: float | None = None,
        mask: ArrayLike | None = None,
        key_mask: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        masks: Sequence[ArrayLike] | None = None,
        biases: Sequence[ArrayLike] | None = None,
        causal: _Causal = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
        dropout_p: float = 0.0,
        dropout_seed: int = 0,
    ) -> NDArray[np.floating]: ...
    def forward_cross(
        self,
        x_q: ArrayLike,
        x_kv: ArrayLike,
        *,
        scale: float | None = None,
        mask: ArrayLike | None = None,
        key_mask: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        causal: _Causal = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
    ) -> NDArray[np.floating]: ...
    def forward_cached(
        self,
        x_new: ArrayLike,
        cache: KvCache,
        seq: int,
        *,
        scale: float | None = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
    ) -> NDArray[np.floating]: ...
    def backward(
        self,
        x: ArrayLike,
        d_y: ArrayLike,
        *,
        seqlens: Sequence[int] | None = None,
        scale: float | None = None,
        mask: ArrayLike | None = None,
        key_mask: ArrayLike | None = None,
        bias: ArrayLike | None = None,
        masks: Sequence[ArrayLike] | None = None,
        biases: Sequence[ArrayLike] | None = None,
        causal: _Causal = None,
        window: _Window = None,
        softcap: float | None = None,
        alibi_slope: float | None = None,
        alibi_slopes: Sequence[float] | None = None,
        dropout_p: float = 0.0,
        dropout_seed: int = 0,
    ) -> dict[str, NDArray[np.floating]]: ...

def set_num_threads(n: int) -> None:
    """Runs the following calls on ``n >= 1`` threads (results are bitwise identical)."""

def get_num_threads() -> int:
    """The number of threads calls run on."""

def _time_sdpa(q: ArrayLike, k: ArrayLike, v: ArrayLike, reps: int) -> list[float]:
    """Seconds per core call, timed in Rust (for benchmarks)."""
