"""ternary (BitNet b1.58): W = s * t with t in {-1, 0, +1}.

`ternary` has one scale per tensor, as BitNet trains it; `ternary-group` one per group of G weights along K.
Stored like int2 so the int2 kernels run it: q = t + 1 packed bitserial, scales = s and biases = -s (fp16, [M, K/G]),
plus the per-tensor scale in fp32 (`tensor_scale`), which is the exact one: a checkpoint that is already ternary
({-a, 0, a}) comes back bit for bit, W == dequantize(quantize(W)).

Plain rounding is BitNet's: s = mean |W| (absmean), t = clip(round(W / s), -1, 1).
The scale search is exact rather than a grid: for a fixed set of k non-zero weights the best scale is their mean |w|
and the best set is the k largest |w|, so with |w| sorted descending and P_k the prefix sums the squared error is
sum w^2 - P_k^2 / k; the minimising k gives the optimal (s, t). One sort per tensor (or per group, along the row).
"""

from __future__ import annotations

import numpy as np

from lutq.kernels.layout import LAYOUT_VERSION, pack_bitserial, padded_rows, unpack_bitserial
from lutq.quantize.packed import CHUNK_ELEMENTS, PackedTensor, check_shape, row_chunks, stored_dims, to_f16


def optimal_scale(a: np.ndarray) -> np.ndarray:
    """a: f64[N, n] of |w| -> the scale minimising each row's ternary squared error, f64[N]."""
    srt = -np.sort(-a, axis=1)  # descending
    prefix = np.cumsum(srt, axis=1)
    k = np.arange(1, a.shape[1] + 1, dtype=np.float64)
    best = np.argmax(prefix * prefix / k, axis=1)  # max P_k^2/k = min error
    rows = np.arange(len(a))
    return prefix[rows, best] / k[best]


def plain_scale(a: np.ndarray) -> np.ndarray:
    """BitNet's absmean, except that an already-ternary row ({0, ±a} only) gets a itself, so it stays exact."""
    amax = a.max(axis=1)
    ternary = np.all((a == 0) | (a == amax[:, None]), axis=1)
    return np.where(ternary, amax, a.mean(axis=1, dtype=np.float64))


def whole_tensor_scale(w: np.ndarray, refine: bool) -> float:
    """The one scale of a whole tensor: optimal_scale (or plain_scale) of all its weights as one row.

    Memory: a float32 copy of |W| sorted in place, then the prefix sums in float64 a chunk at a time (carried over,
    so they are the same sequential sums as over the whole array); float64 copies of the whole tensor, as
    optimal_scale makes, would take ~15 times its size (3.7 GiB for TinyLlama's lm_head).
    """
    a = np.abs(w, dtype=np.float32).reshape(-1)
    if not refine:
        return float(plain_scale(a.reshape(1, -1))[0])
    a.sort()
    desc = a[::-1]
    best_val, best, carry = -1.0, 0.0, 0.0
    for start in range(0, len(desc), CHUNK_ELEMENTS):
        prefix = np.cumsum(np.concatenate(([carry], desc[start : start + CHUNK_ELEMENTS])))[1:]
        k = np.arange(start + 1, start + len(prefix) + 1, dtype=np.float64)
        val = prefix * prefix / k  # max P_k^2/k = min error
        i = int(np.argmax(val))
        if val[i] > best_val:
            best_val, best = float(val[i]), float(prefix[i] / k[i])
        carry = float(prefix[-1])
    return best


def to_ternary(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Nearest of {-s, 0, s}: t in {-1, 0, 1} (f64), rows of x scaled by s[:, None]."""
    safe = np.where(s == 0, 1.0, s)
    return np.clip(np.rint(x / safe[:, None]), -1, 1)


def pack_codes(q: np.ndarray) -> np.ndarray:
    """The one place ternary chooses its code layout: int2's."""
    return pack_bitserial(q, 2)


class TernaryFormat:
    family = "ternary"
    bits = 2  # stored bits per code; the information is log2(3) = 1.58

    def __init__(self, per_group: bool):
        self.per_group = per_group
        self.name = "ternary-group" if per_group else "ternary"

    def nominal_bits(self, group_size: int) -> float:
        return 2 + 32 / group_size  # codes + the int2-compatible fp16 scale and bias per group

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        return padded_rows(m) * k // 4 + 2 * 2 * m * (k // group_size) + 4

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size)
        ng = k // group_size
        choose = optimal_scale if refine else plain_scale
        q = np.empty((m, k), np.uint8)
        if self.per_group:
            scales = np.empty((m, ng), np.float16)
            for rows in row_chunks(m, k):
                x = w[rows].astype(np.float64).reshape(-1, group_size)
                s = to_f16(choose(np.abs(x)))
                q[rows] = (to_ternary(x, s) + 1).reshape(-1, k)
                scales[rows] = s.reshape(-1, ng)
            tensor_scale = np.ones(1, np.float32)
        else:
            # float32 is what is stored, so the codes are assigned against the fp32 value of the scale.
            s = float(np.float32(whole_tensor_scale(w, refine)))
            for rows in row_chunks(m, k):
                q[rows] = to_ternary(w[rows].astype(np.float64), np.full(rows.stop - rows.start, s)) + 1
            scales = np.full((m, ng), s, np.float16)
            tensor_scale = np.array([s], np.float32)
        meta = {"format": self.name, "bits": 2, "group_size": group_size, "shape": [m, k],
                "layout": "bitserial", "layout_version": LAYOUT_VERSION}
        arrays = {"codes": pack_codes(q), "scales": scales, "biases": -scales, "tensor_scale": tensor_scale}
        return PackedTensor(arrays, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        m, k, g = stored_dims(meta, 2, "bitserial")
        return {"codes": (np.dtype(np.uint8), (padded_rows(m) // 32, k // 8, 2, 32)),
                "scales": (np.dtype(np.float16), (m, k // g)), "biases": (np.dtype(np.float16), (m, k // g)),
                "tensor_scale": (np.dtype(np.float32), (1,))}

    def codes(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        return unpack_bitserial(np.asarray(p.arrays["codes"]), 2, m, k)

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        g = p.group_size
        t = self.codes(p).astype(np.float32)
        t -= 1  # in place, here and below: no temporaries the size of W
        if not self.per_group:
            t *= np.float32(np.asarray(p.arrays["tensor_scale"])[0])
            return t
        t = t.reshape(m, k // g, g)
        t *= np.asarray(p.arrays["scales"], np.float32)[..., None]
        return t.reshape(m, k)
