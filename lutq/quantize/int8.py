"""int8: symmetric 8-bit codes with a per-group fp16 scale, for embeddings (`--embed int8`).

    W[m, k] = scales[m, k // G] * q[m, k],   q in [-127, 127], stored as i8[M, K] row-major

Row-major rather than bitserial: an embedding is read by gathering rows, never streamed through a LUT kernel.
Plain rounding uses the absmax scale; the scale search tries scales below absmax, refits the least-squares scale
for each candidate's codes, and keeps per group the better of that and absmax.
"""

from __future__ import annotations

import numpy as np

from lutq.quantize.packed import PackedTensor, check_shape, row_chunks, sq_error, stored_dims, to_f16

SCALE_GRID = np.linspace(0.8, 1.0, 5)


def fit_groups(x: np.ndarray, refine: bool):
    """x: f64[N, G] -> (scales f64[N] as fp16 values, codes f64[N, G])."""
    def codes(s):
        return np.clip(np.rint(x / np.where(s == 0, 1.0, s)[:, None]), -127, 127)

    s0 = to_f16(np.abs(x).max(axis=1) / 127)
    q0 = codes(s0)
    if not refine:
        return s0, q0
    err0 = sq_error(x, s0[:, None] * q0)
    best_err, best_s = err0, s0
    for f in SCALE_GRID:
        q = codes(s0 * f)
        sqq = np.einsum("ng,ng->n", q, q)
        s = to_f16(np.einsum("ng,ng->n", q, x) / np.where(sqq > 0, sqq, 1.0))
        err = sq_error(x, s[:, None] * codes(s))
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    return best_s, codes(best_s)


class Int8Format:
    family = "int8"
    name = "int8"
    bits = 8

    def nominal_bits(self, group_size: int) -> float:
        return 8 + 16 / group_size

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        return m * k + 2 * m * (k // group_size)

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size, k_multiple=1)
        ng = k // group_size
        q = np.empty((m, k), np.int8)
        scales = np.empty((m, ng), np.float16)
        for rows in row_chunks(m, k):
            s, codes = fit_groups(w[rows].astype(np.float64).reshape(-1, group_size), refine)
            q[rows] = codes.reshape(-1, k)
            scales[rows] = s.reshape(-1, ng)
        meta = {"format": self.name, "bits": 8, "group_size": group_size, "shape": [m, k],
                "layout": "rowmajor", "layout_version": 1}
        return PackedTensor({"codes": q, "scales": scales}, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        m, k, g = stored_dims(meta, 8, "rowmajor", k_multiple=1)
        return {"codes": (np.dtype(np.int8), (m, k)), "scales": (np.dtype(np.float16), (m, k // g))}

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        g = p.group_size
        w = np.array(p.arrays["codes"], np.float32).reshape(m, k // g, g)  # a copy: multiplied in place below
        w *= np.asarray(p.arrays["scales"], np.float32)[..., None]
        return w.reshape(m, k)
