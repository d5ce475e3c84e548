"""The numpy exercise this project starts from, against the package."""

import numpy as np
import pytest

import attention
from helpers import default_scale, output_bound, score_error


# ---- the seed's own numpy code -------------------------------------------------------
def softmax(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def compute_qkv(X, W_q, W_k, W_v):
    return X @ W_q, X @ W_k, X @ W_v


def self_attention(Q, K, V):
    d_k = Q.shape[-1]
    return softmax(Q @ K.T / np.sqrt(d_k)) @ V


def stable_self_attention(Q, K, V):
    """The seed with the row maximum subtracted first (what the package computes)."""
    s = Q @ K.T / np.sqrt(Q.shape[-1])
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ V


# ---------------------------------------------------------------------------------------


def test_seed_example_with_integer_arrays():
    X = np.array([[1, 0], [0, 1]])
    W_q = W_k = np.array([[1, 0], [0, 1]])
    W_v = np.array([[1, 2], [3, 4]])
    out = attention.self_attention(*attention.compute_qkv(X, W_q, W_k, W_v))
    assert out.dtype == np.float64  # integers convert to float64, as numpy would
    expected = self_attention(*compute_qkv(X, W_q, W_k, W_v))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        out, [[1.6604769, 2.6604769], [2.3395231, 3.3395231]], rtol=0, atol=5e-8
    )


def test_seed_example_with_lists():
    out = attention.self_attention(*attention.compute_qkv(
        [[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 2], [3, 4]]))
    np.testing.assert_allclose(out, [[1.6604769, 2.6604769], [2.3395231, 3.3395231]], atol=5e-8)


SHAPES = [(1, 1, 1, 1), (2, 2, 2, 2), (5, 8, 4, 3), (17, 16, 8, 8), (64, 32, 16, 16)]


@pytest.mark.parametrize("n, d_model, d_k, d_v", SHAPES)
def test_random_f64_matches_the_seed(n, d_model, d_k, d_v):
    """f64: the package against the seed's numpy, within 1e-12 of max(1, max|V|).

    Both evaluate the same formula in float64, each within the core's error bound
    (helpers.py; the seed's naive sums of n_kv <= 64 terms and its exp without the max
    subtracted have no larger first-order error at these sizes), so they differ by at
    most twice the bound, which the inputs keep below 1e-12 (asserted)."""
    rng = np.random.default_rng(n * 1000 + d_model)
    X = rng.standard_normal((n, d_model)) * 0.5
    W_q, W_k = rng.standard_normal((2, d_model, d_k)) * 0.25
    W_v = rng.standard_normal((d_model, d_v))
    Q, K, V = attention.compute_qkv(X, W_q, W_k, W_v)
    for got, w in ((Q, W_q), (K, W_k), (V, W_v)):
        # A length-d_model dot product: error <= d_model u sum|x||w| (Higham 3.1).
        bound = d_model * np.finfo(np.float64).eps * (np.abs(X) @ np.abs(w))
        assert np.all(np.abs(got - X @ w) <= bound)
    out = attention.self_attention(Q, K, V)
    want = self_attention(Q, K, V)
    eps = np.finfo(np.float64).eps
    bound = output_bound(score_error(Q, K, default_scale(d_k), 0.0, eps), V, eps)
    scale = max(1.0, np.abs(V).max())
    assert 2 * bound.max() <= 1e-12 * scale
    assert np.all(np.abs(out - want) <= 2 * bound)


@pytest.mark.parametrize("n, d_model, d_k, d_v", SHAPES)
def test_random_f32_matches_the_seed(n, d_model, d_k, d_v):
    """f32: the package on float32 inputs against the seed run in float64 on the same
    (float32) numbers, whose own error (~1e-15) is negligible: within the core's bound,
    entry by entry. (A worst-case bound cannot be 1e-6 in float32: one rounding of the
    sums alone is 6e-8 and S counts 6 or more; the observed error is far smaller.)"""
    rng = np.random.default_rng(7 + n)
    Q = (rng.standard_normal((n, d_k)) * 0.25).astype(np.float32)
    K = (rng.standard_normal((n, d_k)) * 0.25).astype(np.float32)
    V = rng.standard_normal((n, d_v)).astype(np.float32)
    out = attention.self_attention(Q, K, V)
    assert out.dtype == np.float32
    Q64, K64, V64 = (m.astype(np.float64) for m in (Q, K, V))
    want = self_attention(Q64, K64, V64)
    eps = float(np.finfo(np.float32).eps)
    bound = output_bound(score_error(Q64, K64, default_scale(d_k), 0.0, eps), V64, eps)
    assert np.all(np.abs(out - want) <= bound)
    # The seed itself in float32 obeys the same bound against the exact result.
    seed32 = self_attention(Q, K, V)
    assert np.all(np.abs(out - seed32) <= 2 * bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_scores_where_numpy_gives_nan(dtype):
    """q = k = 100 I: scores 1e4 / sqrt(d). numpy's exp overflows (inf / inf = NaN);
    the package returns what the stable formula gives."""
    d = 4
    Q = (100.0 * np.eye(d)).astype(dtype)
    K = Q.copy()
    V = np.arange(d * 3, dtype=dtype).reshape(d, 3)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = self_attention(Q, K, V)
    assert np.isnan(naive).any()
    out = attention.self_attention(Q, K, V)
    want = stable_self_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64))
    # Scores 5000 vs 0: the weights are one-hot to far below either epsilon, so each
    # output row is the matching V row (exactly, as exp(-5000) underflows to 0).
    np.testing.assert_array_equal(want, V.astype(np.float64))
    np.testing.assert_array_equal(out, V)
