"""Memory layouts, dtypes, unchanged inputs, threads: the same bits whatever the layout."""

import numpy as np
import pytest

import attention

rng = np.random.default_rng(0)


def base(dtype, shape):
    return rng.standard_normal(shape).astype(dtype)


def layouts(a):
    """`a` in several layouts, each with the same values: (name, array, read in place)."""
    n, d = a.shape
    big = np.zeros((n + 6, d + 9), a.dtype)
    big[1:1 + n, 2:2 + d] = a
    wide = np.zeros((n, 2 * d), a.dtype)
    wide[:, ::2] = a
    tall = np.zeros((3 * n, d), a.dtype)
    tall[::3] = a
    rev = np.ascontiguousarray(a[::-1])
    return [
        ("C", np.ascontiguousarray(a), True),
        ("F", np.asfortranarray(a), True),
        ("block", big[1:1 + n, 2:2 + d], True),
        ("column step", wide[:, ::2], True),
        ("row step", tall[::3], True),
        ("transposed", np.ascontiguousarray(a.T).T, True),
        ("reversed rows", rev[::-1], False),
        ("reversed columns", np.ascontiguousarray(a[:, ::-1])[:, ::-1], False),
    ]


def misaligned(a):
    """`a` at an address that is not a multiple of its item size (copied)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    m = raw[1:].view(a.dtype).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layout_gives_the_same_bits(dtype):
    q, k, v = base(dtype, (7, 5)), base(dtype, (9, 5)), base(dtype, (9, 3))
    bias = base(dtype, (7, 9))
    mask = rng.random((7, 9)) < 0.8
    want = attention.scaled_dot_product_attention(q, k, v, bias=bias, mask=mask, causal="bottom_right")
    for (nq, lq, _), (nk, lk, _), (nv, lv, _), (nb, lb, _) in zip(
            layouts(q), layouts(k), layouts(v), layouts(bias)):
        snapshot = [x.copy() for x in (lq, lk, lv, lb)]
        got = attention.scaled_dot_product_attention(lq, lk, lv, bias=lb, mask=mask, causal="bottom_right")
        np.testing.assert_array_equal(got, want, err_msg=nq)
        for before, after in zip(snapshot, (lq, lk, lv, lb)):
            np.testing.assert_array_equal(before, after)  # inputs unchanged
    for (name, lm, _) in layouts(mask):
        got = attention.scaled_dot_product_attention(q, k, v, bias=bias, mask=lm, causal="bottom_right")
        np.testing.assert_array_equal(got, want, err_msg=name)
    got = attention.scaled_dot_product_attention(misaligned(q), misaligned(k), misaligned(v),
                                                 bias=misaligned(bias), mask=mask, causal="bottom_right")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcast_inputs_are_copied(dtype):
    row = base(dtype, (1, 4))
    q = base(dtype, (5, 4))
    k = np.broadcast_to(row, (6, 4))      # row stride 0
    v = np.broadcast_to(base(dtype, (6, 1)), (6, 3))  # column stride 0
    want = attention.self_attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v))
    np.testing.assert_array_equal(attention.self_attention(q, k, v), want)
    # compute_qkv too (nalgebra's product misreads zero strides if they reach it).
    x = np.broadcast_to(row, (3, 4))
    w = base(dtype, (4, 2))
    for got, exp in zip(attention.compute_qkv(x, w, w, w),
                        attention.compute_qkv(np.ascontiguousarray(x), w, w, w)):
        np.testing.assert_array_equal(got, exp)


def test_non_native_byte_order():
    q = base(np.float64, (4, 3))
    want = attention.self_attention(q, q, q)
    swapped = q.astype(q.dtype.newbyteorder())
    got = attention.self_attention(swapped, swapped, swapped)
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_are_c_ordered_and_keep_the_dtype(dtype):
    q = np.asfortranarray(base(dtype, (6, 4)))
    out, lse = attention.scaled_dot_product_attention(q, q, q, return_lse=True)
    results = [out, attention.self_attention(q, q, q), attention.attention_weights(q, q, q),
               *attention.compute_qkv(q, q.T @ q, q.T @ q, q.T @ q),
               *attention.scaled_dot_product_attention_backward(q, q, q, out, lse, out),
               *attention.multi_head_attention(q, q, q, heads_q=2, return_lse=True),
               *attention.merge_partial_attention([(out, lse), (out, lse)])]
    for r in results:
        assert r.dtype == dtype
        assert r.flags.c_contiguous and r.flags.owndata and r.flags.writeable
    assert lse.ndim == 1 and lse.shape == (6,)


def test_zero_copy_reads_do_not_hold_on_to_inputs():
    """Results are new arrays, never views of the inputs."""
    q = base(np.float64, (4, 4))
    out = attention.self_attention(q, q, q)
    assert not np.shares_memory(out, q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_changes_no_bit(dtype):
    before = attention.get_num_threads()
    try:
        # Large enough for the core to split the work over threads (> 2**22 multiply-adds).
        q, k, v = base(dtype, (300, 64)), base(dtype, (280, 64)), base(dtype, (280, 64))
        d_out = base(dtype, (300, 64))
        results = []
        for n in (1, 2, 3):
            attention.set_num_threads(n)
            assert attention.get_num_threads() == n
            out, lse = attention.scaled_dot_product_attention(q, k, v, causal="top_left", return_lse=True)
            grads = attention.scaled_dot_product_attention_backward(
                q, k, v, out, lse, d_out, causal="top_left")
            mha = attention.multi_head_attention(q, k[:, :32], v[:, :32], heads_q=4, heads_kv=2)
            drop = attention.scaled_dot_product_attention(q, k, v, dropout_p=0.25, dropout_seed=9)
            results.append([out, lse, *grads, mha, drop])
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_array_equal(a, b)
    finally:
        attention.set_num_threads(before)


def test_dropout_is_deterministic_and_p0_is_none():
    q = base(np.float64, (8, 4))
    a = attention.scaled_dot_product_attention(q, q, q, dropout_p=0.5, dropout_seed=3)
    np.testing.assert_array_equal(a, attention.scaled_dot_product_attention(q, q, q, dropout_p=0.5, dropout_seed=3))
    assert not np.array_equal(a, attention.scaled_dot_product_attention(q, q, q, dropout_p=0.5, dropout_seed=4))
    np.testing.assert_array_equal(attention.scaled_dot_product_attention(q, q, q, dropout_p=0.0, dropout_seed=3),
                                  attention.self_attention(q, q, q))


def test_merge_matches_one_call():
    q, k, v = base(np.float64, (5, 4)), base(np.float64, (12, 4)), base(np.float64, (12, 3))
    parts = [attention.scaled_dot_product_attention(q, k[s], v[s], return_lse=True)
             for s in (slice(0, 5), slice(5, 12))]
    out, lse = attention.merge_partial_attention(parts)
    full, full_lse = attention.scaled_dot_product_attention(q, k, v, return_lse=True)
    # Error bound of the merge: a few roundings of quantities of size max|v| and |lse|.
    np.testing.assert_allclose(out, full, rtol=0, atol=1e-13 * np.abs(v).max())
    np.testing.assert_allclose(lse, full_lse, rtol=0, atol=1e-13 * max(1, np.abs(full_lse).max()))


def test_multi_head_matches_single_head_blocks():
    q, k, v = base(np.float32, (6, 12)), base(np.float32, (6, 6)), base(np.float32, (6, 6))
    slopes = attention.alibi_slopes(4)
    out = attention.multi_head_attention(q, k, v, heads_q=4, heads_kv=2, causal="top_left",
                                         alibi_slopes=slopes, seqlens_q=[2, 4])
    for h in range(4):
        g = h // 2
        for rows in (slice(0, 2), slice(2, 6)):
            alone = attention.scaled_dot_product_attention(
                q[rows, 3 * h:3 * h + 3], k[rows, 3 * g:3 * g + 3], v[rows, 3 * g:3 * g + 3],
                causal="top_left", alibi_slope=float(slopes[h]))
            np.testing.assert_array_equal(out[rows, 3 * h:3 * h + 3], alone)


def test_compute_qkv_backward_shapes():
    x, w = base(np.float64, (5, 4)), base(np.float64, (4, 3))
    g = base(np.float64, (5, 3))
    dx, dwq, dwk, dwv = attention.compute_qkv_backward(x, w, w, w, g, g, g)
    np.testing.assert_allclose(dwq, x.T @ g, atol=1e-14 * 20)
    np.testing.assert_allclose(dx, 3 * g @ w.T, atol=1e-14 * 60)
