"""A 4096 x 4096 call (4096 queries, 4096 keys, d = 64) through Python gives the same bits
as the same call made by Rust: the `attention` command-line tool (crates/cli), which
calls attention-core directly on .npy files.

The tool is found through the ATTENTION_CLI environment variable (`.ci/run` sets it to
the binary `cargo test` built); without it, target/{release,debug}/attention is tried,
and the test is skipped only when neither exists.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import attention

ROOT = Path(__file__).resolve().parents[3]


def cli() -> Path:
    named = os.environ.get("ATTENTION_CLI")
    if named:
        path = Path(named)
        assert path.is_file(), f"ATTENTION_CLI={named} does not exist"
        return path
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / "attention"
        if path.is_file():
            return path
    pytest.skip("no attention binary: build crates/cli or set ATTENTION_CLI")


@pytest.mark.parametrize(
    "dtype, flags, kwargs",
    [
        (np.float32, [], {}),
        (np.float32, ["--causal", "bottom-right"], {"causal": "bottom_right"}),
        (np.float64, ["--window", "300,20", "--alibi", "0.01"], {"window": (300, 20), "alibi_slope": 0.01}),
    ],
)
def test_same_bits_as_the_rust_call(tmp_path, dtype, flags, kwargs):
    n, d = 4096, 64
    rng = np.random.default_rng(4096)
    q, k, v = (rng.standard_normal((n, d)).astype(dtype) for _ in range(3))
    for name, a in (("q", q), ("k", k), ("v", v)):
        np.save(tmp_path / f"{name}.npy", a)
    out_path = tmp_path / "out.npy"
    subprocess.run(
        [str(cli()), "run", "--q", str(tmp_path / "q.npy"), "--k", str(tmp_path / "k.npy"),
         "--v", str(tmp_path / "v.npy"), "--out", str(out_path), *flags],
        check=True,
        capture_output=True,
    )
    rust = np.load(out_path)
    python = attention.scaled_dot_product_attention(q, k, v, **kwargs)
    assert python.dtype == rust.dtype == dtype
    assert python.shape == rust.shape == (n, d)
    assert python.tobytes() == rust.tobytes()
