"""Every kind of bad input: the right exception and message, never a panic."""

import numpy as np
import pytest

import attention

Q = np.ones((3, 4))
K = np.ones((5, 4))
V = np.ones((5, 2))


def test_attention_error_is_a_value_error():
    assert issubclass(attention.AttentionError, ValueError)


@pytest.mark.parametrize("args, message", [
    ((np.ones((3, 4)), np.ones((5, 3)), V), "key has 3 columns but query has 4 (d_k must match)"),
    ((Q, K, np.ones((4, 2))), "value has 4 rows but key has 5"),
])
def test_wrong_shapes_give_the_core_message(args, message):
    with pytest.raises(attention.AttentionError) as e:
        attention.scaled_dot_product_attention(*args)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("bad, text", [(np.nan, "NaN"), (np.inf, "+inf"), (-np.inf, "-inf")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_inputs(bad, text, dtype):
    k = K.astype(dtype)
    k[2, 1] = bad
    with pytest.raises(attention.AttentionError) as e:
        attention.self_attention(Q.astype(dtype), k, V.astype(dtype))
    assert str(e.value) == f"key[2, 1] is {text}: inputs must be finite"


def test_nan_bias():
    bias = np.zeros((3, 5))
    bias[1, 4] = np.nan
    with pytest.raises(attention.AttentionError, match=r"bias\[1, 4\] is NaN"):
        attention.scaled_dot_product_attention(Q, K, V, bias=bias)


@pytest.mark.parametrize("softcap", [0.0, -1.0, np.inf, np.nan])
def test_bad_softcap(softcap):
    with pytest.raises(attention.AttentionError, match="softcap is .*: it must be finite and > 0"):
        attention.scaled_dot_product_attention(Q, K, V, softcap=softcap)


def test_bad_scale_and_slope():
    with pytest.raises(attention.AttentionError, match="scale is NaN: it must be finite"):
        attention.scaled_dot_product_attention(Q, K, V, scale=np.nan)
    # A float64 scale beyond float32's range becomes inf in a float32 call.
    with pytest.raises(attention.AttentionError, match="scale is inf: it must be finite"):
        attention.scaled_dot_product_attention(*(m.astype(np.float32) for m in (Q, K, V)), scale=1e300)
    with pytest.raises(attention.AttentionError, match="ALiBi slope is inf"):
        attention.scaled_dot_product_attention(Q, K, V, alibi_slope=np.inf)


@pytest.mark.parametrize("causal", ["TopLeft", "", "causal", "top-left"])
def test_bad_causal(causal):
    with pytest.raises(attention.AttentionError, match="causal must be None, 'top_left' or 'bottom_right'"):
        attention.scaled_dot_product_attention(Q, K, V, causal=causal)


def test_causal_not_a_string():
    with pytest.raises(TypeError):
        attention.scaled_dot_product_attention(Q, K, V, causal=True)


@pytest.mark.parametrize("window", [3, (1,), (1, 2, 3), "ab", (1.5, 2), ("a", 1)])
def test_window_not_a_pair_of_ints(window):
    with pytest.raises(TypeError, match="window"):
        attention.scaled_dot_product_attention(Q, K, V, window=window)


def test_negative_window():
    with pytest.raises(attention.AttentionError, match="window's left side is -1"):
        attention.scaled_dot_product_attention(Q, K, V, window=(-1, 0))


def test_window_with_unbounded_side():
    a = attention.scaled_dot_product_attention(Q, K, V, window=(None, 0))
    b = attention.scaled_dot_product_attention(Q, K, V, causal="bottom_right")
    np.testing.assert_array_equal(a, b)


def test_mixed_dtypes_name_each_operand():
    with pytest.raises(TypeError) as e:
        attention.self_attention(Q.astype(np.float32), K, V.astype(np.float32))
    assert "q is float32, k is float64, v is float32" in str(e.value)
    # Integers convert to float64, so they do not mix with float32 either.
    with pytest.raises(TypeError, match="k is float64"):
        attention.self_attention(Q.astype(np.float32), K.astype(np.int32), V.astype(np.float32))
    # The bias takes part in the check.
    with pytest.raises(TypeError, match="bias is float32"):
        attention.scaled_dot_product_attention(Q, K, V, bias=np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.complex128, object, np.longdouble, "U3"])
def test_unsupported_dtypes(dtype):
    if np.dtype(dtype) == np.float64:  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="has dtype"):
        attention.self_attention(Q.astype(dtype), K, V)


def test_unconvertible_objects():
    with pytest.raises(TypeError, match="q has dtype"):
        attention.self_attention([[1, "a"]], K, V)
    with pytest.raises(TypeError, match="q has dtype"):
        attention.self_attention("text", K, V)


@pytest.mark.parametrize("kw, value", [
    ("mask", np.ones((3, 5))),
    ("mask", np.ones((3, 5), dtype=np.int8)),
    ("key_mask", np.ones(5)),
    ("key_mask", [1, 0, 1, 1, 1]),
])
def test_non_bool_masks(kw, value):
    with pytest.raises(TypeError, match="masks must be bool arrays.*bias"):
        attention.scaled_dot_product_attention(Q, K, V, **{kw: value})


def test_mask_of_wrong_shape():
    with pytest.raises(attention.AttentionError, match="mask"):
        attention.scaled_dot_product_attention(Q, K, V, mask=np.ones((3, 4), bool))
    with pytest.raises(attention.AttentionError, match="mask must be a 2-D array"):
        attention.scaled_dot_product_attention(Q, K, V, mask=np.ones(15, bool))
    with pytest.raises(attention.AttentionError, match="key_mask must be a 1-D array"):
        attention.scaled_dot_product_attention(Q, K, V, key_mask=np.ones((1, 5), bool))


@pytest.mark.parametrize("shape", [(), (4,), (1, 3, 4)])
def test_not_2d(shape):
    with pytest.raises(attention.AttentionError, match=r"^q must be a 2-D array"):
        attention.self_attention(np.ones(shape), K, V)
    with pytest.raises(attention.AttentionError, match=r"^w_v must be a 2-D array"):
        attention.compute_qkv(Q, K.T, K.T, np.ones(shape))


def test_lse_must_be_1d():
    out, lse = attention.scaled_dot_product_attention(Q, K, V, return_lse=True)
    with pytest.raises(attention.AttentionError, match="lse must be a 1-D array"):
        attention.scaled_dot_product_attention_backward(Q, K, V, out, lse[:, None], out)


def test_backward_errors():
    out, lse = attention.scaled_dot_product_attention(Q, K, V, return_lse=True)
    with pytest.raises(attention.AttentionError, match="bias"):
        attention.scaled_dot_product_attention_backward(Q, K, V, out, lse, out, return_d_bias=True)
    with pytest.raises(attention.AttentionError, match="log-sum-exp has 2 entries but query has 3"):
        attention.scaled_dot_product_attention_backward(Q, K, V, out, lse[:2], out)


def test_zero_head_dim_and_empty():
    with pytest.raises(attention.AttentionError, match="d_k = 0"):
        attention.self_attention(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 2)))
    out = attention.scaled_dot_product_attention(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 2)), scale=1.0)
    np.testing.assert_array_equal(out, np.ones((2, 2)))
    assert attention.self_attention(np.ones((0, 4)), K, V).shape == (0, 2)
    np.testing.assert_array_equal(attention.self_attention(Q, np.ones((0, 4)), np.ones((0, 2))), np.zeros((3, 2)))


def test_score_overflow():
    big = np.full((1, 1), 1e300)
    with pytest.raises(attention.AttentionError, match="lies outside the element type's range"):
        attention.self_attention(big, big, np.ones((1, 1)))


def test_merge_errors():
    with pytest.raises(attention.AttentionError, match="at least one partial"):
        attention.merge_partial_attention([])
    out, lse = attention.scaled_dot_product_attention(Q, K, V, return_lse=True)
    with pytest.raises(attention.AttentionError, match="partial"):
        attention.merge_partial_attention([(out, lse), (out[:2], lse[:2])])
    with pytest.raises(TypeError, match=r"partials\[1\]\[0\] is float32"):
        attention.merge_partial_attention([(out, lse), (out.astype(np.float32), lse)])


def test_multi_head_errors():
    x = np.ones((4, 6))
    with pytest.raises(attention.AttentionError, match="query heads"):
        attention.multi_head_attention(x, x, x, heads_q=3, heads_kv=2)
    with pytest.raises(attention.AttentionError, match="do not split into 4 heads"):
        attention.multi_head_attention(x, x, x, heads_q=4)
    with pytest.raises(attention.AttentionError, match="lengths sum to 5"):
        attention.multi_head_attention(x, x, x, heads_q=2, seqlens_q=[2, 3])
    with pytest.raises(attention.AttentionError, match="seqlens_kv needs seqlens_q"):
        attention.multi_head_attention(x, x, x, heads_q=2, seqlens_kv=[4])
    with pytest.raises(attention.AttentionError, match="not both"):
        attention.multi_head_attention(x, x, x, heads_q=2, bias=np.zeros((4, 4)), biases=[np.zeros((4, 4))])
    with pytest.raises(OverflowError):
        attention.multi_head_attention(x, x, x, heads_q=-1)


def test_dropout_errors():
    with pytest.raises(attention.AttentionError, match="dropout"):
        attention.scaled_dot_product_attention(Q, K, V, dropout_p=1.0)
    with pytest.raises(attention.AttentionError, match="dropout"):
        attention.scaled_dot_product_attention(Q, K, V, dropout_p=np.nan)


def test_set_num_threads_bounds():
    with pytest.raises(ValueError, match="1 to 1024 threads, not 0"):
        attention.set_num_threads(0)
    # Rejected before any thread starts (rayon would start them all).
    with pytest.raises(ValueError, match="1 to 1024 threads"):
        attention.set_num_threads(2**62)
    with pytest.raises(ValueError, match="1 to 1024 threads"):
        attention.set_num_threads(1025)
    with pytest.raises(OverflowError):
        attention.set_num_threads(-1)


def test_alibi_slopes():
    np.testing.assert_array_equal(attention.alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625])
    assert attention.alibi_slopes(0).shape == (0,)
    with pytest.raises(attention.AttentionError, match="needs more memory than can be allocated"):
        attention.alibi_slopes(2**62)
