"""Writes the .npy files tests/npy_files.rs reads through the `attention` command.

Run from this folder with numpy installed (python3 make.py); the outputs are committed.
Values are formulas of (i, j) that the Rust test recomputes:
  f(i, j) = i * 10 + j + 0.25     (exact in float32 and float64)
  g(i, j) = sin(i + 2 j)           (float64; float32 holds it rounded)
  mask(i, j) = (i + j) % 3 != 0
"""

import math

import numpy as np

F = np.fromfunction(lambda i, j: i * 10 + j + 0.25, (3, 4))
G = np.array([[math.sin(i + 2 * j) for j in range(5)] for i in range(4)])


def save(name, array):
    np.save(name, array)


# Little-endian float32, C order: Q of the `run` test (3 x 4).
save("f32_c.npy", F.astype("<f4"))
# Float64 in Fortran order (4 x 5).
save("f64_fortran.npy", np.asfortranarray(G.astype("<f8")))
# Big-endian float64 (4 x 5), C order.
save("f64_big.npy", G.astype(">f8"))
# Big-endian float32 (3 x 4), Fortran order.
save("f32_big_fortran.npy", np.asfortranarray(F.astype(">f4")))
# A bool mask (3 x 5).
save("mask.npy", np.fromfunction(lambda i, j: (i + j) % 3 != 0, (3, 5)))
# Unsupported dtypes.
save("int64.npy", np.arange(6, dtype="<i8").reshape(2, 3))
save("float16.npy", np.ones((2, 3), dtype="<f2"))
# Wrong dimensionality.
save("one_d.npy", np.arange(4, dtype="<f8"))
save("three_d.npy", np.zeros((2, 3, 4), dtype="<f8"))
# A float32 file cut short: the header promises 3 x 4 values, 5 follow.
with open("f32_c.npy", "rb") as f:
    whole = f.read()
with open("truncated.npy", "wb") as f:
    f.write(whole[: len(whole) - 7 * 4])
# Not an .npy file at all.
with open("garbage.npy", "wb") as f:
    f.write(b"this is not a numpy file\n")
