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

int2k / int3k / int4k store the same grid with its parameters themselves quantized (double quantization, as in
llama.cpp's K-quants and QLoRA), so a group costs 16 bits of parameters instead of 32 and G = 32 fits in 4.5
bits/weight at 4 bits:

    scale = fp16(scale_step * scale_codes[m, g])                       scale_codes u8, scale_step f32 per tensor
    bias  = fp16(-scale * zero_codes[m, g] * (2^B - 1) / 255)          zero_codes u8: a zero point in [0, 2^B - 1]

A zero point rather than an independent bias: its error is relative to the group's own scale (one 255th of the code
range), where an 8-bit bias on a per-tensor grid would be coarse for small groups. Clamping it to [0, 2^B - 1]
costs nothing in practice: a group whose weights all share a sign gets z = 0 (or 2^B - 1) and its codes still
cover it from zero. The per-tensor linear step was measured against a per-row step and a per-tensor log grid on
SmolLM2 (int4 G = 32): relative weight error 0.006-0.008 vs 0.005 and 0.0065, for 16 fewer bits per row; all far
below G = 64 with fp16 parameters (0.07).
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


def zero_point_grid(bits: int) -> float:
    """The zero point one step of zero_codes is worth."""
    return ((1 << bits) - 1) / 255


def expand_params(scale_codes: np.ndarray, zero_codes: np.ndarray, scale_step: float, bits: int):
    """Double-quantized parameters -> (scales, biases) f32[M, K/G], fp16 values: exactly what the kernels use."""
    scales = (np.float32(scale_step) * scale_codes.astype(np.float32)).astype(np.float16).astype(np.float32)
    zeros = zero_codes.astype(np.float32) * np.float32(zero_point_grid(bits))
    return scales, (-scales * zeros).astype(np.float16).astype(np.float32)


def scale_for_zero_point(d: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """A constant group (d = 0) keeps its value through the zero point only with a scale: c = d * nmax at code nmax
    (c > 0), or c = -d * nmax as the bias (c < 0)."""
    return np.where(d > 0, d, to_f16(np.abs(b) / ((1 << bits) - 1)))


def expand_params_f64(sq, zq, step: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """expand_params in float64, for the search: the same fp16 values."""
    s, b = expand_params(sq, zq, step, bits)
    return s.astype(np.float64), b.astype(np.float64)


def expand_levels(sq, zq, codes, step: float, bits: int) -> np.ndarray:
    """Groups' values f64[N, G] from their parameter codes and codes (what dequantize gives)."""
    s, b = expand_params_f64(sq, zq, step, bits)
    return s[:, None] * codes + b[:, None]


def requantize_params(x: np.ndarray, d: np.ndarray, m: np.ndarray, step: float, bits: int):
    """Fitted (d, m) of groups x f64[N, G] -> (scale codes, zero codes, codes) on the double-quantized grid.

    The scale is rounded to its 8-bit grid; then, twice, the zero point is refitted by least squares for the current
    codes, rounded to its grid, and the codes reassigned to the resulting levels.
    """
    nmax = (1 << bits) - 1
    sq = np.clip(np.rint(d / step), 0, 255) if step > 0 else np.zeros_like(d)
    zq = np.clip(np.rint(-m / np.where(d > 0, d, 1.0) / zero_point_grid(bits)), 0, 255)
    for _ in range(2):
        s_hat, b_hat = expand_params_f64(sq, zq, step, bits)
        q = assign(x, s_hat, b_hat, nmax)
        safe = np.where(s_hat > 0, s_hat, 1.0)
        z = -(x - s_hat[:, None] * q).mean(axis=1) / safe
        zq = np.where(s_hat > 0, np.clip(np.rint(z / zero_point_grid(bits)), 0, 255), 0)
    s_hat, b_hat = expand_params_f64(sq, zq, step, bits)
    return sq.astype(np.uint8), zq.astype(np.uint8), assign(x, s_hat, b_hat, nmax)


def tensor_step(scales: np.ndarray, plain_peak: np.ndarray, refine: bool) -> float:
    """The k variants' scale step: the largest first-pass scale (or plain min/max scale, with the search on, which
    may still pick it) over 255 codes, so no group's scale clips."""
    peak = max(float(scales.astype(np.float64).max(initial=0)), float(plain_peak.max(initial=0)) if refine else 0)
    return float(np.float32(peak / 255))


def fit_params_k(x: np.ndarray, d: np.ndarray, b: np.ndarray, step: float, bits: int, refine: bool):
    """Groups x f64[N, G] with fitted (d, b) -> (scale codes, zero codes, codes) on the k variants' grid of `step`.

    With the search on, each group keeps whichever of its fitted and its plain min/max parameters has the smaller
    error on that grid, so the search never loses to min/max rounding there either.
    """
    sq, zq, codes = requantize_params(x, d, b, step, bits)
    if refine:
        d0, b0, _ = fit_groups(x, bits, False)
        sq0, zq0, codes0 = requantize_params(x, scale_for_zero_point(d0, b0, bits), b0, step, bits)
        err = sq_error(x, expand_levels(sq, zq, codes, step, bits))
        plain = sq_error(x, expand_levels(sq0, zq0, codes0, step, bits)) < err
        sq, zq = np.where(plain, sq0, sq), np.where(plain, zq0, zq)
        codes = np.where(plain[:, None], codes0, codes)
    return sq, zq, codes


def group_params(p: PackedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(scales, biases) f32[M, K/G] of a stored affine tensor (int, int-k, ternary-group): fp16 as stored, or
    expanded from their codes for the k variants."""
    a = p.arrays
    if "scales" in a:
        return np.asarray(a["scales"], np.float32), np.asarray(a["biases"], np.float32)
    return expand_params(np.asarray(a["scale_codes"]), np.asarray(a["zero_codes"]),
                         float(np.asarray(a["scale_step"])[0]), p.bits)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """The one place the uniform formats choose their code layout."""
    return pack_bitserial(q, bits)


class UniformFormat:
    family = "uniform"

    def __init__(self, bits: int, quantized_params: bool = False):
        self.bits = bits
        self.quantized_params = quantized_params  # the int<B>k variant: 8-bit scale and zero codes
        self.name = f"int{bits}k" if quantized_params else f"int{bits}"

    @property
    def param_bits(self) -> int:
        return 16 if self.quantized_params else 32  # per group: scale + bias

    def nominal_bits(self, group_size: int) -> float:
        return self.bits + self.param_bits / group_size

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        extra = 4 if self.quantized_params else 0  # the f32 scale_step
        return padded_rows(m) * k * self.bits // 8 + self.param_bits // 8 * m * (k // group_size) + extra

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size)
        ng = k // group_size
        q, scales, biases, plain_peak = self.fit_tensor(w, group_size, refine)
        if not self.quantized_params:
            return self.pack(q, group_size, {"scales": scales, "biases": biases})

        # Second pass: the scale grid spans the whole tensor, so it is known only once every group is fitted. With
        # the search on, each group again keeps whichever of its searched and plain parameters has the smaller error,
        # now on that grid, so the search never loses to min/max rounding here either.
        step = tensor_step(scales, plain_peak, refine)
        scale_codes = np.empty((m, ng), np.uint8)
        zero_codes = np.empty((m, ng), np.uint8)

        def requantize(rows: slice) -> None:
            x = w[rows].astype(np.float64).reshape(-1, group_size)
            d, b = scales[rows].astype(np.float64).ravel(), biases[rows].astype(np.float64).ravel()
            sq, zq, codes = fit_params_k(x, d, b, step, self.bits, refine)
            q[rows] = codes.reshape(-1, k)
            scale_codes[rows], zero_codes[rows] = sq.reshape(-1, ng), zq.reshape(-1, ng)

        for_row_chunks(m, k, requantize)
        return self.pack(q, group_size, {"scale_codes": scale_codes, "zero_codes": zero_codes,
                                         "scale_step": np.array([step], np.float32)})

    def fit_tensor(self, w: np.ndarray, group_size: int, refine: bool):
        """The first pass: every group's fitted grid, (codes u8[M, K], scales f16[M, K/G], biases f16[M, K/G],
        plain_peak f64[M]). For the k variants the scales already hold a zero point's scale (scale_for_zero_point)
        and plain_peak is each row's largest min/max scale, the other candidate for the tensor's scale step."""
        m, k = check_shape(w, group_size)
        ng = k // group_size
        q = np.empty((m, k), np.uint8)
        scales = np.empty((m, ng), np.float16)
        biases = np.empty((m, ng), np.float16)
        plain_peak = np.zeros(m)

        def fit(rows: slice) -> None:
            x = w[rows].astype(np.float64).reshape(-1, group_size)
            d, b, codes = fit_groups(x, self.bits, refine)
            if self.quantized_params:
                d = scale_for_zero_point(d, b, self.bits)
                plain_peak[rows] = ((x.max(axis=1) - x.min(axis=1)) / ((1 << self.bits) - 1)).reshape(-1, ng).max(1)
            q[rows] = codes.reshape(-1, k)
            scales[rows] = d.reshape(-1, ng)
            biases[rows] = b.reshape(-1, ng)

        for_row_chunks(m, k, fit)
        return q, scales, biases, plain_peak

    def scale_step(self, w: np.ndarray, group_size: int, refine: bool) -> float:
        """The k variants' per-tensor scale step for w: what quantize stores as scale_step."""
        _, scales, _, plain_peak = self.fit_tensor(w, group_size, refine)
        return tensor_step(scales, plain_peak, refine)

    def pack(self, q: np.ndarray, group_size: int, params: dict[str, np.ndarray]) -> PackedTensor:
        """The stored tensor from codes u8[M, K] and its parameter arrays (scales and biases, or the k variants'
        scale_codes, zero_codes and scale_step): the one place its arrays and metadata are put together, for plain
        rounding and GPTQ alike."""
        m, k = q.shape
        meta = {"format": self.name, "bits": self.bits, "group_size": group_size, "shape": [m, k],
                "layout": "bitserial", "layout_version": LAYOUT_VERSION}
        if self.quantized_params:
            meta["param_bits"] = 8
        return PackedTensor({"codes": pack_codes(q, self.bits), **params}, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        m, k, g = stored_dims(meta, self.bits, "bitserial")
        codes = {"codes": (np.dtype(np.uint8), (padded_rows(m) // 32, k // 8, self.bits, 32))}
        if self.quantized_params:
            if meta.get("param_bits") != 8:
                raise ValueError(f"param_bits {meta.get('param_bits')!r}, but {self.name} stores 8-bit parameter codes")
            return {**codes, "scale_codes": (np.dtype(np.uint8), (m, k // g)),
                    "zero_codes": (np.dtype(np.uint8), (m, k // g)), "scale_step": (np.dtype(np.float32), (1,))}
        return {**codes, "scales": (np.dtype(np.float16), (m, k // g)), "biases": (np.dtype(np.float16), (m, k // g))}

    def codes(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        return unpack_bitserial(np.asarray(p.arrays["codes"]), p.bits, m, k)

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        g = p.group_size
        w = self.codes(p).reshape(m, k // g, g).astype(np.float32)
        s, b = group_params(p)
        w *= s[..., None]  # in place: no temporaries the size of W
        w += b[..., None]
        return w.reshape(m, k)
