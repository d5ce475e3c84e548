"""KvCache: prefill and decoding against multi_head_attention on the whole history."""

import numpy as np
import pytest

import attention
from helpers import output_bound, score_error


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefill_then_decode_matches_one_call(dtype):
    rng = np.random.default_rng(1)
    heads_q, heads_kv, d = 4, 2, 8
    n = 40
    q = rng.standard_normal((n, heads_q * d)).astype(dtype)
    k = rng.standard_normal((n, heads_kv * d)).astype(dtype)
    v = rng.standard_normal((n, heads_kv * d)).astype(dtype)
    cache = attention.KvCache(heads_kv, d, d, dtype=dtype, page_size=16)
    assert cache.dtype == np.dtype(dtype).name
    seq = cache.add_sequence()
    cache.append(seq, k[:37], v[:37])
    outs = [cache.cached_attention(q[:37], seq, heads_q=heads_q)]
    for t in range(37, n):
        cache.append(seq, k[t:t + 1], v[t:t + 1])
        outs.append(cache.cached_attention(q[t:t + 1], seq, heads_q=heads_q))
    assert cache.seq_len(seq) == n
    got = np.vstack(outs)
    want = attention.multi_head_attention(q, k, v, heads_q=heads_q, heads_kv=heads_kv,
                                          causal="bottom_right")
    # The prefill goes through the same kernels as the one call: the same bits. Decoding
    # steps use the decoding kernel, which sums in another order: both results lie within
    # the core's bound of the exact one (helpers.py), so they differ by at most twice it.
    np.testing.assert_array_equal(got[:37], want[:37])
    eps = float(np.finfo(dtype).eps)
    g = heads_q // heads_kv
    for h in range(heads_q):
        qh = q[:, h * d:(h + 1) * d].astype(np.float64)
        kh = k[:, (h // g) * d:(h // g + 1) * d].astype(np.float64)
        vh = v[:, (h // g) * d:(h // g + 1) * d].astype(np.float64)
        bound = output_bound(score_error(qh, kh, d ** -0.5, 0.0, eps), vh, eps)
        diff = np.abs(got[:, h * d:(h + 1) * d] - want[:, h * d:(h + 1) * d])
        assert np.all(diff <= 2 * bound)
    kk, vv = cache.gather(seq)
    np.testing.assert_array_equal(kk, k)
    np.testing.assert_array_equal(vv, v)


def test_errors_leave_the_cache_unchanged():
    cache = attention.KvCache(1, 2, 2)
    seq = cache.add_sequence()
    cache.append(seq, np.ones((3, 2)), np.ones((3, 2)))
    bad = np.ones((2, 2))
    bad[1, 0] = np.nan
    with pytest.raises(attention.AttentionError, match="is NaN"):
        cache.append(seq, bad, np.ones((2, 2)))
    assert cache.seq_len(seq) == 3
    with pytest.raises(attention.AttentionError, match="columns"):
        cache.append(seq, np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(TypeError, match="cache holds float64"):
        cache.append(seq, np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))
    with pytest.raises(attention.AttentionError, match="sequence 7 is not in this KV cache"):
        cache.append(7, np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(attention.AttentionError, match="truncate only shortens"):
        cache.truncate(seq, 5)
    cache.truncate(seq, 1)
    assert cache.seq_len(seq) == 1
    cache.remove(seq)
    assert cache.sequences() == []
    with pytest.raises(attention.AttentionError, match="not in this KV cache"):
        cache.seq_len(seq)
    with pytest.raises(TypeError, match="float32 or float64"):
        attention.KvCache(1, 2, 2, dtype=np.float16)
    with pytest.raises(attention.AttentionError):
        attention.KvCache(0, 2, 2)


def test_sliding_window_cache():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 2))
    cache = attention.KvCache(1, 2, 2, page_size=2, window=4)
    seq = cache.add_sequence()
    cache.append(seq, x[:6], x[:6])
    out = [cache.cached_attention(x[:6], seq, heads_q=1)]
    for t in range(6, 9):
        cache.append(seq, x[t:t + 1], x[t:t + 1])
        out.append(cache.cached_attention(x[t:t + 1], seq, heads_q=1))
    want = attention.multi_head_attention(x, x, x, heads_q=1, causal="bottom_right", window=(3, 0))
    eps = np.finfo(np.float64).eps
    bound = output_bound(score_error(x, x, 2 ** -0.5, 0.0, eps), x, eps)
    assert np.all(np.abs(np.vstack(out) - want) <= 2 * bound)
