"""Float64 references: dequantize every format from its plain codes and scales, then multiply. Slow, obviously right.

They take the codes unpacked (u8[M, K]), never the kernels' layout, so a packing mistake cannot hide in both.
"""

from __future__ import annotations

import numpy as np


def _per_column(a: np.ndarray, k: int) -> np.ndarray:
    """f[M, K/G] -> f64[M, K]: each group's value repeated over its G columns."""
    return np.repeat(a.astype(np.float64), k // a.shape[1], axis=1)


def dequantize_uniform(q: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """int2/3/4 and ternary (q = t + 1, biases = -scales): W = s q + z, f64[M, K]."""
    k = q.shape[1]
    return _per_column(scales, k) * q + _per_column(biases, k)


def dequantize_codebook(q: np.ndarray, scales: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """nf2/nf3/nf4: W = s codebook[q], f64[M, K]."""
    return _per_column(scales, q.shape[1]) * codebook.astype(np.float64)[q]


def matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y[n, m] = sum_k w[m, k] x[n, k] in float64; x: [K] or [N, K]."""
    return np.asarray(x, np.float64) @ w.T
