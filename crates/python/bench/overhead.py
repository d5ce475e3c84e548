"""Overhead of the Python bindings.

(a) the 2x2 seed self_attention call from Python: median microseconds per call;
(b) n = 4096, d = 64 and 128, float32: scaled_dot_product_attention from Python against
    the same core call timed inside Rust (attention._time_sdpa: the core writing into a
    preallocated output, inside the same thread pool), medians and their ratio.

Run: python crates/python/bench/overhead.py [--reps N]
"""

import argparse
import statistics
import time

import numpy as np

import attention


def median_us(f, calls, rounds=15):
    """Median over `rounds` of the mean time of `calls` calls, in microseconds."""
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=11, help="calls per large size")
    args = parser.parse_args()
    print(f"threads: {attention.get_num_threads()}")

    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    w_v = np.array([[1.0, 2.0], [3.0, 4.0]])
    q, k, v = attention.compute_qkv(x, x, x, w_v)
    seed_us = median_us(lambda: attention.self_attention(q, k, v), 20000)
    empty_us = median_us(lambda: attention.get_num_threads(), 20000)
    print(f"(a) 2x2 seed self_attention (float64): {seed_us:.2f} us per call "
          f"(a no-op binding call: {empty_us:.2f} us)")

    rng = np.random.default_rng(0)
    n = 4096
    for d in (64, 128):
        q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
        attention.scaled_dot_product_attention(q, k, v)  # warm up
        # Alternate the two so that load from other processes affects both alike.
        py_times, rust_times = [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            attention.scaled_dot_product_attention(q, k, v)
            py_times.append(time.perf_counter() - start)
            rust_times.extend(attention._time_sdpa(q, k, v, 1))
        py_ms = statistics.median(py_times) * 1e3
        rust_ms = statistics.median(rust_times) * 1e3
        print(f"(b) n={n} d={d} float32: Python {py_ms:.2f} ms, Rust {rust_ms:.2f} ms, "
              f"ratio {py_ms / rust_ms:.3f}")


if __name__ == "__main__":
    main()
