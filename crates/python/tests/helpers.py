"""Shared helpers of the tests: the golden files and the core's error bound.

The bound is the one the Rust core's own tests use (crates/core/tests/common/mod.rs, where
its derivation is written out): for query row i, with u the dtype's epsilon,
A_i = |scale| * max_j sum_p |q_ip| |k_jp| and B_i the largest |bias| + |ALiBi term| +
softcap of the row,

    Delta_i = (d_k + 4) u (A_i + B_i)                      (error of a score)
    S = (min(n_kv, 64) + 5 + 6 (G - 1)) u + 6 R u_64       (error of the softmax sums)
    |out_ic - exact| <= 2 (2 Delta_i + S) max_j |v_jc|
    |lse_i - exact|  <= 2 (Delta_i + S + u |lse_i|)
    |w_ij - exact|   <= 2 (2 Delta_i + S)

with t = ceil(n_kv / 60) key tiles, G = min(t, 8), R = ceil(t / 8) - 1, and the factor 2
covering second-order terms.
"""

import json
import math
from pathlib import Path

import numpy as np

DATA = Path(__file__).parents[2] / "testdata" / "data"


def load_cases(name):
    """The cases of a golden file (format: crates/testdata/data/README.md)."""
    with open(DATA / name) as f:
        return json.load(f)["cases"]


def matrix(values, rows, cols=None):
    """A flat row-major list (with "-inf"/"inf"/"nan" strings) as a float64 array."""
    a = np.array([float(x) for x in values], dtype=np.float64)
    if cols is None:
        cols = len(a) // rows if rows else 0
    return a.reshape(rows, cols)


def sum_error(n_kv, eps):
    tiles = -(-n_kv // 60)
    span = min(max(tiles, 1), 8)
    later = max(-(-tiles // 8) - 1, 0)
    return (min(n_kv, 64) + 5 + 6 * (span - 1)) * eps + 6 * later * np.finfo(np.float64).eps


def diag(i, n_q, n_kv, top_left):
    return i if top_left else i + n_kv - n_q


def extra(n_q, n_kv, top_left, bias, softcap, alibi):
    """B_i for each row."""
    out = np.zeros(n_q)
    for i in range(n_q):
        b = 0.0
        if bias is not None:
            row = bias[i][np.isfinite(bias[i])]
            b = float(np.abs(row).max()) if row.size else 0.0
        d = diag(i, n_q, n_kv, top_left)
        dist = max((abs(d - j) for j in range(n_kv)), default=0)
        out[i] = b + (abs(alibi) * dist if alibi is not None else 0.0) + (softcap or 0.0)
    return out


def score_error(q, k, scale, extra_row, eps):
    """Delta_i for each row."""
    a = (np.abs(q) @ np.abs(k).T).max(axis=1) if k.shape[0] else np.zeros(q.shape[0])
    return (q.shape[1] + 4) * eps * (abs(scale) * a + extra_row)


def output_bound(delta, v, eps):
    """2 (2 Delta_i + S) max_j |v_jc|, as an (n_q, d_v) array."""
    vmax = np.abs(v).max(axis=0) if v.shape[0] else np.zeros(v.shape[1])
    s = sum_error(v.shape[0], eps)
    return 2.0 * np.outer(2.0 * delta + s, vmax)


def lse_bound(delta, lse, n_kv, eps):
    s = sum_error(n_kv, eps)
    return 2.0 * (delta + s + eps * np.abs(np.where(np.isfinite(lse), lse, 0.0)))


def weights_bound(delta, n_kv, eps):
    return 2.0 * (2.0 * delta + sum_error(n_kv, eps))


def default_scale(d_k):
    return 1.0 / math.sqrt(d_k) if d_k else 1.0
