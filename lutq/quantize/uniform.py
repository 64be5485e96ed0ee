"""int2 / int3 / int4: uniform asymmetric quantization in groups of G consecutive weights along K.

    W[m, k] = scales[m, k // G] * q[m, k] + biases[m, k // G],   q in [0, 2^B)

The bias is the group's offset (its minimum under plain min/max rounding), as in llama.cpp's Q4_1: int4 with G = 32
and no refinement is Q4_1, so a Q4_1 checkpoint comes back exactly (scales and biases are fp16 like Q4_1's d and m).

Scale search (refine, on by default), per group and all groups of a tensor at once:
  1. a grid of step sizes around the min/max one, each assigning codes from the group's centre so that a finer step
     clips both tails evenly; for each, the least-squares (scale, bias) given those codes, in closed form;
  2. from the best grid point, a few Lloyd rounds (codes <- nearest level, (scale, bias) <- least squares);
  3. scale and bias rounded to fp16 and the codes reassigned to the rounded grid; the group keeps whichever of this
     and plain min/max rounding has the smaller squared error, so refinement never loses to min/max.
"""

from __future__ import annotations

import numpy as np

from lutq.kernels.layout import LAYOUT_VERSION, pack_bitserial, padded_rows, unpack_bitserial
from lutq.quantize.packed import PackedTensor, check_shape, for_row_chunks, sq_error, stored_dims, to_f16

# Step = (max - min) / nmax / f for f on this grid: f > 1 clips the tails to resolve the bulk more finely.
STEP_GRID = np.linspace(0.85, 1.6, 16)
LLOYD_ROUNDS = 3


def assign(x: np.ndarray, d: np.ndarray, m: np.ndarray, nmax: int) -> np.ndarray:
    """Nearest codes for x f64[N, G] on the grid m + d*q: f64[N, G] of integers in [0, nmax]."""
    safe = np.where(d == 0, 1.0, d)
    return np.clip(np.rint((x - m[:, None]) / safe[:, None]), 0, nmax)


def least_squares(x: np.ndarray, q: np.ndarray, sx: np.ndarray, sxx: np.ndarray):
    """Best (d, m) for fixed codes: minimise sum (d q + m - x)^2 per group. Returns d, m, squared error.

    Groups whose codes are all equal have no unique fit (the 2x2 system is singular); they get d = 0, m = mean.
    """
    n = x.shape[1]
    sq = q.sum(axis=1)
    sqq = np.einsum("ng,ng->n", q, q)
    sqx = np.einsum("ng,ng->n", q, x)
    det = n * sqq - sq * sq
    ok = det > 0
    det = np.where(ok, det, 1.0)
    d = np.where(ok, (n * sqx - sq * sx) / det, 0.0)
    m = np.where(ok, (sqq * sx - sq * sqx) / det, sx / n)
    err = sxx - 2 * d * sqx - 2 * m * sx + d * d * sqq + 2 * d * m * sq + n * m * m
    return d, m, err


def fit_groups(x: np.ndarray, bits: int, refine: bool):
    """x: f64[N, G] -> (scales f64[N], biases f64[N], codes f64[N, G]); scales and biases already fp16 values."""
    nmax = (1 << bits) - 1
    lo, hi = x.min(axis=1), x.max(axis=1)
    d0, m0 = to_f16((hi - lo) / nmax), to_f16(lo)
    q0 = assign(x, d0, m0, nmax)
    if not refine:
        return d0, m0, q0
    err0 = sq_error(x, d0[:, None] * q0 + m0[:, None])
    sx, sxx = x.sum(axis=1), np.einsum("ng,ng->n", x, x)
    centre, span = (hi + lo) / 2, np.where(hi > lo, hi - lo, 1.0)
    best_err = np.full(len(x), np.inf)
    best_d, best_m = d0.copy(), m0.copy()
    for f in STEP_GRID:
        step = span / (nmax * f)
        q = np.clip(np.rint((x - centre[:, None]) / step[:, None] + nmax / 2), 0, nmax)
        d, m, err = least_squares(x, q, sx, sxx)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
    d, m = best_d, best_m
    for _ in range(LLOYD_ROUNDS):
        d_new, m_new, _ = least_squares(x, assign(x, d, m, nmax), sx, sxx)
        keep = d_new > 0
        d, m = np.where(keep, d_new, d), np.where(keep, m_new, m)
    d, m = to_f16(d), to_f16(m)
    q = assign(x, d, m, nmax)
    better = sq_error(x, d[:, None] * q + m[:, None]) < err0
    return np.where(better, d, d0), np.where(better, m, m0), np.where(better[:, None], q, q0)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """The one place the uniform formats choose their code layout."""
    return pack_bitserial(q, bits)


class UniformFormat:
    family = "uniform"

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"

    def nominal_bits(self, group_size: int) -> float:
        return self.bits + 32 / group_size  # codes + fp16 scale + fp16 bias per group

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        return padded_rows(m) * k * self.bits // 8 + 2 * 2 * m * (k // group_size)

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size)
        ng = k // group_size
        q = np.empty((m, k), np.uint8)
        scales = np.empty((m, ng), np.float16)
        biases = np.empty((m, ng), np.float16)

        def fit(rows: slice) -> None:
            x = w[rows].astype(np.float64).reshape(-1, group_size)
            d, b, codes = fit_groups(x, self.bits, refine)
            q[rows] = codes.reshape(-1, k)
            scales[rows] = d.reshape(-1, ng)
            biases[rows] = b.reshape(-1, ng)

        for_row_chunks(m, k, fit)
        meta = {"format": self.name, "bits": self.bits, "group_size": group_size, "shape": [m, k],
                "layout": "bitserial", "layout_version": LAYOUT_VERSION}
        return PackedTensor({"codes": pack_codes(q, self.bits), "scales": scales, "biases": biases}, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        m, k, g = stored_dims(meta, self.bits, "bitserial")
        return {"codes": (np.dtype(np.uint8), (padded_rows(m) // 32, k // 8, self.bits, 32)),
                "scales": (np.dtype(np.float16), (m, k // g)), "biases": (np.dtype(np.float16), (m, k // g))}

    def codes(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        return unpack_bitserial(np.asarray(p.arrays["codes"]), p.bits, m, k)

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        g = p.group_size
        w = self.codes(p).reshape(m, k // g, g).astype(np.float32)
        w *= np.asarray(p.arrays["scales"], np.float32)[..., None]  # in place: no temporaries the size of W
        w += np.asarray(p.arrays["biases"], np.float32)[..., None]
        return w.reshape(m, k)
