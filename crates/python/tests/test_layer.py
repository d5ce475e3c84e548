"""MultiHeadAttention: the golden layer cases, decoding through a KvCache, the backward."""

import numpy as np
import pytest

import attention
from helpers import load_cases, matrix

LAYER = load_cases("layer_cases.json")


def layer_of(c, dtype=np.float64, rope_dim=None):
    d = c["d_model"]
    w = {name: matrix(c[name], d) .astype(dtype) for name in ("w_q", "w_k", "w_v")}
    w_o = matrix(c["w_o"], c["h_q"] * c["d_head"]).astype(dtype)
    b = {name: (None if c.get(name) is None else np.array(c[name], dtype=dtype))
         for name in ("b_q", "b_k", "b_v", "b_o")}
    return attention.MultiHeadAttention(c["h_q"], w["w_q"], w["w_k"], w["w_v"], w_o,
                                        heads_kv=c["h_kv"], rope_dim=rope_dim, **b)


def output_scale(c):
    """Y = max_r sum_c M_V(c) |W_o[c, r]| + |b_o[r]|, M_V(c) = max_i |V[i, c]|: the size
    the output is formed at (the core's layer test, crates/core/tests/layer.rs)."""
    x = matrix(c["x"], c["n"])
    v = x @ matrix(c["w_v"], c["d_model"]) + (0 if c.get("b_v") is None else np.array(c["b_v"]))
    w_o = matrix(c["w_o"], c["h_q"] * c["d_head"])
    # With grouped heads, query head h's output columns come from key/value head h // g.
    g = c["h_q"] // c["h_kv"]
    d = c["d_head"]
    m_v = np.abs(v).max(axis=0)
    m_a = np.concatenate([m_v[(h // g) * d:(h // g + 1) * d] for h in range(c["h_q"])])
    b_o = 0 if c.get("b_o") is None else np.abs(np.array(c["b_o"]))
    return float((m_a @ np.abs(w_o) + b_o).max())


@pytest.mark.parametrize("c", LAYER, ids=[c["name"] for c in LAYER])
def test_golden_layer(c):
    """Within 1e-12 * Y of PyTorch's float64 output, the core's own criterion (its derived
    worst-case bound for these sizes is a few 1e-12 * Y)."""
    layer = layer_of(c)
    x = matrix(c["x"], c["n"])
    y = layer.forward(x, causal=c.get("causal"))
    want = matrix(c["output"], c["n"])
    assert y.shape == want.shape and y.flags.c_contiguous
    assert np.abs(y - want).max() <= 1e-12 * output_scale(c)
    # A packed batch of one sequence gives the same bits.
    np.testing.assert_array_equal(layer.forward(x, seqlens=[c["n"]], causal=c.get("causal")), y)


def test_decoding_through_a_cache_matches_forward():
    c = next(c for c in LAYER if c["n"] >= 8 and c["h_q"] != c["h_kv"])
    layer = layer_of(c, rope_dim=2)
    x = matrix(c["x"], c["n"])
    full = layer.forward(x, causal="top_left")
    cache = attention.KvCache(c["h_kv"], c["d_head"], c["d_head"])
    seq = cache.add_sequence()
    p = c["n"] - 3
    parts = [layer.forward_cached(x[:p], cache, seq)]
    for t in range(p, c["n"]):
        parts.append(layer.forward_cached(x[t:t + 1], cache, seq))
    assert cache.seq_len(seq) == c["n"]
    assert np.abs(np.vstack(parts) - full).max() <= 1e-12 * output_scale(c)
    with pytest.raises(TypeError, match="cache holds float64|layer holds"):
        layer.forward_cached(x[:1].astype(np.float32), cache, seq)
    assert cache.seq_len(seq) == c["n"]


def test_backward_matches_finite_differences():
    """Directional derivatives of L = sum(y * d_y) by central differences in float64: the
    truncation error is h^2/6 |L'''| and the rounding error ~u |L| / h; with h = 1e-5 and
    |L|, |L'''| of order 10-100 both are below 1e-8, far inside the 1e-6 tolerance."""
    rng = np.random.default_rng(5)
    d, n = 8, 6
    w = [rng.standard_normal((d, d)) * 0.4 for _ in range(4)]
    b = rng.standard_normal(d) * 0.1
    layer = attention.MultiHeadAttention(2, *w, b_o=b, b_q=b)
    x = rng.standard_normal((n, d))
    d_y = rng.standard_normal((n, d))
    g = layer.backward(x, d_y, causal="top_left")
    assert set(g) == {"dx", "dw_q", "dw_k", "dw_v", "dw_o", "db_q", "db_o"}
    np.testing.assert_allclose(g["db_o"], d_y.sum(axis=0), rtol=0, atol=1e-14 * n * 4)
    e = rng.standard_normal((n, d))
    h = 1e-5

    def loss(x):
        return float((layer.forward(x, causal="top_left") * d_y).sum())

    numeric = (loss(x + h * e) - loss(x - h * e)) / (2 * h)
    assert abs(numeric - float((g["dx"] * e).sum())) <= 1e-6 * max(1.0, abs(numeric))


def test_layer_errors():
    w = np.eye(4)
    with pytest.raises(TypeError, match="the operands are float32 but the layer holds float64"):
        attention.MultiHeadAttention(2, w, w, w, w).forward(np.eye(4, dtype=np.float32))
    with pytest.raises(TypeError, match="mixed float32 and float64"):
        attention.MultiHeadAttention(2, w, w, w, w.astype(np.float32))
    with pytest.raises(attention.AttentionError, match="rope_convention"):
        attention.MultiHeadAttention(2, w, w, w, w, rope_dim=2, rope_convention="x")
    with pytest.raises(attention.AttentionError, match="rotary dimension 3"):
        attention.MultiHeadAttention(2, w, w, w, w, rope_dim=3)
    with pytest.raises(attention.AttentionError, match="do not split into 3 heads"):
        attention.MultiHeadAttention(3, w, w, w, w)
    with pytest.raises(attention.AttentionError, match="input has 3 columns"):
        attention.MultiHeadAttention(2, w, w, w, w).forward(np.ones((2, 3)))
