"""The golden cases (PyTorch float64, crates/testdata/data) through the Python API.

Tolerances:
- sdpa_cases.json: the core's error bound (helpers.py), exactly what the Rust golden test
  (crates/core/tests/golden.rs) applies: in float64 against the golden numbers; in float32
  (inputs rounded to float32) against the package's float64 result on the same rounded
  inputs, whose own error is ~1e-16 relative, negligible against float32's bound.
- mha_cases.json: 1e-12 * max|V| for outputs and 1e-12 * max(1, |lse|) for lse, as the
  core's multi_head.rs: at these sizes (d <= 16, n <= 40) the float64 bound is
  below 1e-13 * max|V|.
- backward_cases.json: 1e-11 of max(1, max |gradient|) over the case's gradients, as the
  core's backward.rs (some gradients are all 0, so the scale is the case's, not each
  tensor's); the gradients are sums of ~n_kv * d products of weights and values.
Fully masked rows must be exactly 0 with lse -inf.
"""

import numpy as np
import pytest

import attention
from helpers import (
    default_scale, extra, load_cases, lse_bound, matrix, output_bound, score_error,
    weights_bound,
)

SDPA = load_cases("sdpa_cases.json")
MHA = load_cases("mha_cases.json")
BACKWARD = load_cases("backward_cases.json")


def test_case_counts():
    assert (len(SDPA), len(MHA), len(BACKWARD)) == (113, 42, 40)


def sdpa_inputs(c, dtype):
    q = matrix(c["q"], c["n_q"], c["d_k"]).astype(dtype)
    k = matrix(c["k"], c["n_kv"], c["d_k"]).astype(dtype)
    v = matrix(c["v"], c["n_kv"], c["d_v"]).astype(dtype)
    opts = {}
    for name in ("scale", "softcap", "alibi_slope", "causal"):
        if c.get(name) is not None:
            opts[name] = c[name]
    if c.get("window") is not None:
        opts["window"] = tuple(c["window"])
    if c.get("mask") is not None:
        opts["mask"] = np.array(c["mask"], dtype=bool).reshape(c["n_q"], c["n_kv"])
    if c.get("key_mask") is not None:
        opts["key_mask"] = np.array(c["key_mask"], dtype=bool)
    if c.get("bias") is not None:
        opts["bias"] = matrix(c["bias"], c["n_q"], c["n_kv"]).astype(dtype)
    return q, k, v, opts


def bounds(c, q, k, v, opts, eps):
    bias = opts.get("bias")
    b = extra(c["n_q"], c["n_kv"], c.get("causal") == "top_left",
              None if bias is None else bias.astype(np.float64),
              c.get("softcap"), c.get("alibi_slope"))
    scale = c["scale"] if c.get("scale") is not None else default_scale(c["d_k"])
    return score_error(q.astype(np.float64), k.astype(np.float64), scale, b, eps)


@pytest.mark.parametrize("c", SDPA, ids=[c["name"] for c in SDPA])
def test_sdpa_case_f64(c):
    q, k, v, opts = sdpa_inputs(c, np.float64)
    out, lse = attention.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
    want = matrix(c["output"], c["n_q"], c["d_v"])
    want_lse = np.array([float(x) for x in c["lse"]])
    eps = np.finfo(np.float64).eps
    delta = bounds(c, q, k, v, opts, eps)
    masked = want_lse == -np.inf
    assert np.array_equal(lse == -np.inf, masked)
    assert np.all(out[masked] == 0.0)
    assert np.all(np.abs(out - want) <= output_bound(delta, v, eps))
    fin = ~masked
    assert np.all(np.abs(lse[fin] - want_lse[fin]) <= lse_bound(delta, want_lse, c["n_kv"], eps)[fin])
    # The plain call gives the same bits as the one with lse.
    np.testing.assert_array_equal(attention.scaled_dot_product_attention(q, k, v, **opts), out)
    if c.get("weights") is not None:
        w = attention.attention_weights(q, k, v, **opts)
        want_w = matrix(c["weights"], c["n_q"], c["n_kv"])
        assert np.all(np.abs(w - want_w) <= weights_bound(delta, c["n_kv"], eps)[:, None])


@pytest.mark.parametrize("c", SDPA, ids=[c["name"] for c in SDPA])
def test_sdpa_case_f32(c):
    q, k, v, opts = sdpa_inputs(c, np.float32)
    eps = float(np.finfo(np.float32).eps)
    delta = bounds(c, q, k, v, opts, eps)
    try:
        out, lse = attention.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
    except attention.AttentionError as e:
        # Cases built with scores beyond float32's range are rejected, never wrong.
        assert "outside the element type's range" in str(e)
        return
    opts64 = {key: (val.astype(np.float64) if key == "bias" else val) for key, val in opts.items()}
    ref, ref_lse = attention.scaled_dot_product_attention(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), return_lse=True,
        **opts64)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert np.array_equal(lse == -np.inf, ref_lse == -np.inf)
    assert np.all(np.abs(out - ref) <= output_bound(delta, v.astype(np.float64), eps))
    fin = ref_lse != -np.inf
    assert np.all(np.abs(lse[fin] - ref_lse[fin]) <= lse_bound(delta, ref_lse, c["n_kv"], eps)[fin])


def mha_args(c, dtype):
    n_q, n_kv = sum(c["seqlens_q"]), sum(c["seqlens_kv"])
    q = matrix(c["q"], n_q, c["h_q"] * c["d_k"]).astype(dtype)
    k = matrix(c["k"], n_kv, c["h_kv"] * c["d_k"]).astype(dtype)
    v = matrix(c["v"], n_kv, c["h_kv"] * c["d_v"]).astype(dtype)
    opts = dict(heads_q=c["h_q"], heads_kv=c["h_kv"], seqlens_q=c["seqlens_q"],
                seqlens_kv=c["seqlens_kv"])
    for name in ("scale", "softcap", "causal", "alibi_slopes"):
        if c.get(name) is not None:
            opts[name] = c[name]
    if c.get("window") is not None:
        opts["window"] = tuple(c["window"])
    if c.get("key_mask") is not None:
        opts["key_mask"] = np.array(c["key_mask"], dtype=bool)
    return q, k, v, opts


@pytest.mark.parametrize("c", MHA, ids=[c["name"] for c in MHA])
def test_mha_case(c):
    q, k, v, opts = mha_args(c, np.float64)
    out, lse = attention.multi_head_attention(q, k, v, return_lse=True, **opts)
    want = matrix(c["output"], q.shape[0], c["h_q"] * c["d_v"])
    want_lse = matrix(c["lse"], q.shape[0], c["h_q"])
    vmax = max(np.abs(v).max(initial=0.0), 1e-300)
    assert np.abs(out - want).max(initial=0.0) <= 1e-12 * vmax
    assert np.array_equal(lse == -np.inf, want_lse == -np.inf)
    fin = want_lse != -np.inf
    assert np.all(np.abs(lse[fin] - want_lse[fin]) <= 1e-12 * np.maximum(1.0, np.abs(want_lse[fin])))
    np.testing.assert_array_equal(attention.multi_head_attention(q, k, v, **opts), out)


@pytest.mark.parametrize("c", BACKWARD, ids=[c["name"] for c in BACKWARD])
def test_backward_case(c):
    q, k, v, opts = mha_args(c, np.float64)
    n_q = q.shape[0]
    out = matrix(c["output"], n_q, c["h_q"] * c["d_v"])
    lse = matrix(c["lse"], n_q, c["h_q"])
    d_out = matrix(c["d_out"], n_q, c["h_q"] * c["d_v"])
    want = [matrix(c[g], *m.shape) for g, m in (("dq", q), ("dk", k), ("dv", v))]
    magnitude = max([1.0] + [np.abs(w).max(initial=0.0) for w in want])
    single = c["name"].startswith("bwd_bias")
    if single:
        # Single head, one sequence: the single-head backward, with the bias gradient.
        sopts = {key: val for key, val in opts.items()
                 if key not in ("heads_q", "heads_kv", "seqlens_q", "seqlens_kv", "alibi_slopes")}
        if c.get("alibi_slopes") is not None:
            sopts["alibi_slope"] = c["alibi_slopes"][0]
        if c.get("mask") is not None:
            sopts["mask"] = np.array(c["mask"], dtype=bool).reshape(n_q, k.shape[0])
        sopts["bias"] = matrix(c["bias"], n_q, k.shape[0])
        dq, dk, dv, d_bias = attention.scaled_dot_product_attention_backward(
            q, k, v, out, lse[:, 0], d_out, return_d_bias=True, **sopts)
        want_bias = matrix(c["d_bias"], n_q, k.shape[0])
        mag_b = max(magnitude, np.abs(want_bias).max(initial=0.0))
        assert np.abs(d_bias - want_bias).max(initial=0.0) <= 1e-11 * mag_b
        got = (dq, dk, dv)
        # The same case through the multi-head call, with per-sequence mask and bias.
        mopts = dict(opts, biases=[sopts["bias"]])
        if "mask" in sopts:
            mopts["masks"] = [sopts["mask"]]
        mh = attention.multi_head_attention_backward(q, k, v, out, lse, d_out, **mopts)
        for g, w in zip(mh, want):
            assert np.abs(g - w).max(initial=0.0) <= 1e-11 * magnitude
    else:
        got = attention.multi_head_attention_backward(q, k, v, out, lse, d_out, **opts)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert np.abs(g - w).max(initial=0.0) <= 1e-11 * magnitude, name
