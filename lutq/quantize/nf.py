"""nf2 / nf3 / nf4: NormalFloat codebooks with a per-group scale.

    W[m, k] = scales[m, k // G] * codebook[q[m, k]]

The codebook is QLoRA's NormalFloat construction (also FLUTE's): quantiles of N(0, 1) normalised to [-1, 1], with
2^(B-1) positive levels, 2^(B-1) - 1 negative levels and an exact zero:

    positive = Phi^-1(linspace(OFFSET, 1/2, 2^(B-1) + 1)[:-1]),  negative = -Phi^-1(linspace(OFFSET, 1/2, 2^(B-1))[:-1])
    codebook = sorted(positive ∪ {0} ∪ negative) / Phi^-1(OFFSET),  OFFSET = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2

which gives NF4 exactly as bitsandbytes tabulates it, NF3 = [-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1] and
NF2 = [-1, 0, 0.3379, 1].

Plain rounding uses the absmax scale (the group's largest |w| lands on ±1). The scale search minimises the
|w|-weighted squared error sum |w| (w - s c)^2 (see packed.importance): it tries a grid of scales below absmax with
both signs (the codebook is lopsided: a negative scale mirrors it, so a group whose heavy side is negative gets the
denser half of the codebook there), fits the weighted least-squares scale for each candidate's codes, runs a few
Lloyd rounds, rounds to fp16, and keeps per group the better of that and absmax.

nf2k / nf3k / nf4k store the same codebook with 8-bit scales (double quantization, as int<B>k does), so a group
costs 8 bits of parameters instead of 16 and G = 32 fits where G = 64 did (nf3k:32 and nf3:64: 3.25 bits/weight):

    scale = fp16(scale_step * scale_codes[m, g])          scale_codes i8 in [-127, 127], scale_step f32 per tensor

Signed codes, because the search may choose a negative scale. scale_step = (the tensor's largest |scale|) / 127, so
no group clips. Each group's code is the nearest to its searched scale or one either side, or the plain absmax
code: with the search on, whichever has the least |w|-weighted error on the grid (so it never loses to plain
rounding there); without it, the absmax code. On SmolLM2 the 8-bit scales cost nf3 G = 32 at most 0.002 of relative
weight error (0.165-0.168, as with fp16 scales), where G = 64 has 0.180-0.186 (models.md).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from lutq.kernels.layout import (CODEBOOK2_LAYOUT_VERSION, CODEBOOK3_LAYOUT_VERSION, CODEBOOK_LAYOUT_VERSION,
                                 LAYOUT_VERSION, pack_codebook, pack_codebook3, pack_codebook_pairs,
                                 padded_rows, unpack_bitserial, unpack_codebook, unpack_codebook3,
                                 unpack_codebook_pairs)
from lutq.quantize.packed import (PackedTensor, check_shape, for_row_chunks, importance, stored_dims, to_f16,
                                  weighted_error)

OFFSET = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2  # QLoRA's 0.9677...
SCALE_CODE_MAX = 127  # the k variants' signed 8-bit scale codes
SCALE_GRID = np.linspace(0.55, 1.0, 16)  # candidate scale / absmax
LLOYD_ROUNDS = 3


def normal_float_codebook(bits: int) -> np.ndarray:
    """The 2^bits NormalFloat levels, ascending, in [-1, 1]."""
    ppf = NormalDist().inv_cdf
    half = 1 << (bits - 1)
    pos = [ppf(p) for p in np.linspace(OFFSET, 0.5, half + 1)[:-1]]
    neg = [-ppf(p) for p in np.linspace(OFFSET, 0.5, half)[:-1]]
    levels = np.array(sorted(pos + [0.0] + neg), np.float64)
    return (levels / levels.max()).astype(np.float32)


def nearest(u: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest level for each element of u (codebook ascending): the number of midpoints below u.

    Counting over at most 15 midpoints is about four times faster than np.searchsorted on arrays this size.
    """
    q = np.zeros(u.shape, np.uint8)
    for mid in (codebook[1:] + codebook[:-1]) / 2:
        q += u > mid
    return q


def fit_groups(x: np.ndarray, codebook: np.ndarray, refine: bool):
    """x: f64[N, G] -> (scales f64[N] as fp16 values, codes u8[N, G])."""
    cb = codebook.astype(np.float64)
    amax = np.abs(x).max(axis=1)
    s0 = to_f16(amax)
    q0 = codes_for(x, s0, cb)
    if not refine:
        return s0, q0
    wt = importance(x)
    err0 = weighted_error(x, s0[:, None] * np.take(cb, q0), wt)

    def lsq(q):
        c = np.take(cb, q)
        wc = wt * c
        scc = np.einsum("ng,ng->n", wc, c)
        return np.einsum("ng,ng->n", wc, x) / np.where(scc > 0, scc, 1.0)

    def error(s):
        return weighted_error(x, s[:, None] * np.take(cb, codes_for(x, s, cb)), wt)

    amax_safe = np.where(amax > 0, amax, 1.0)
    best_err, best_s = np.full(len(x), np.inf), s0.copy()
    for sign in (1.0, -1.0):
        for f in SCALE_GRID:
            s = lsq(codes_for(x, sign * f * amax_safe, cb))
            err = error(s)
            better = err < best_err
            best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    s = best_s
    for _ in range(LLOYD_ROUNDS):
        s_new = lsq(codes_for(x, s, cb))
        err = error(s_new)
        better = err < best_err
        best_err, s = np.where(better, err, best_err), np.where(better, s_new, s)
    s = to_f16(s)
    q = codes_for(x, s, cb)
    better = weighted_error(x, s[:, None] * np.take(cb, q), wt) < err0
    return np.where(better, s, s0), np.where(better[:, None], q, q0)


def scale_step(scales: np.ndarray) -> float:
    """The k variants' per-tensor step for groups' fitted scales (any shape): the largest |scale| over the codes."""
    peak = float(np.abs(np.asarray(scales, np.float64)).max(initial=0.0))
    return float(np.float32(peak / SCALE_CODE_MAX))


def expand_scales(scale_codes: np.ndarray, step: float) -> np.ndarray:
    """Scales f32 (fp16 values) from the k variants' codes."""
    return (np.float32(step) * scale_codes.astype(np.float32)).astype(np.float16).astype(np.float32)


def scale_codes_near(s: np.ndarray, step: float) -> np.ndarray:
    """The nearest scale codes f64 to scales s f64 (all zero when the step is: an all-zero tensor)."""
    if step <= 0:
        return np.zeros_like(s)
    return np.clip(np.rint(s / step), -SCALE_CODE_MAX, SCALE_CODE_MAX)


def fit_scale_codes(x: np.ndarray, s: np.ndarray, step: float, codebook: np.ndarray, refine: bool):
    """Groups x f64[N, G] with fitted scales s f64[N] -> (scale codes f64[N], codes u8[N, G]) on the grid of `step`:
    without refine the absmax scale's nearest code; with it the best by |w|-weighted error of that, the code nearest
    to s and its two neighbours."""
    cb = codebook.astype(np.float64)
    plain = scale_codes_near(to_f16(np.abs(x).max(axis=1)), step)
    if not refine:
        return plain, codes_for(x, expand_scales(plain, step).astype(np.float64), cb)
    wt = importance(x)
    near = scale_codes_near(s, step)
    best_err, best_c = np.full(len(x), np.inf), plain
    for c in (plain, near, np.clip(near - 1, -SCALE_CODE_MAX, SCALE_CODE_MAX),
              np.clip(near + 1, -SCALE_CODE_MAX, SCALE_CODE_MAX)):
        v = expand_scales(c, step).astype(np.float64)
        err = weighted_error(x, v[:, None] * np.take(cb, codes_for(x, v, cb)), wt)
        better = err < best_err
        best_err, best_c = np.where(better, err, best_err), np.where(better, c, best_c)
    return best_c, codes_for(x, expand_scales(best_c, step).astype(np.float64), cb)


def group_scales(p: PackedTensor) -> np.ndarray:
    """Scales f32[M, K/G] of a stored nf tensor: fp16 as stored, or expanded from the k variants' codes."""
    a = p.arrays
    if "scales" in a:
        return np.asarray(a["scales"], np.float32)
    return expand_scales(np.asarray(a["scale_codes"]), float(np.asarray(a["scale_step"])[0]))


def codes_for(x: np.ndarray, s: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Nearest codes of x f64[N, G] at scales s f64[N] (a zero scale codes everything as level 0's neighbour)."""
    return nearest(x / np.where(s == 0, 1.0, s)[:, None], cb)


def layout_of(bits: int) -> str:
    """The code layout each nf format's kernel streams: nf4 looks its whole 4-bit codes up in codebook tables
    (codebook.gemv_nf4), nf2 the codes of a column pair in the same kernel (a table per activation pair), nf3 its
    3-bit codes in pair tables (codebook.gemv_nf3)."""
    return {4: "codebook", 3: "codebook3", 2: "codebook2"}[bits]


LAYOUT_VERSIONS = {"bitserial": LAYOUT_VERSION, "codebook": CODEBOOK_LAYOUT_VERSION,
                   "codebook3": CODEBOOK3_LAYOUT_VERSION, "codebook2": CODEBOOK2_LAYOUT_VERSION}


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """The one place the nf formats choose their code layout."""
    packers = {"codebook": pack_codebook, "codebook3": pack_codebook3, "codebook2": pack_codebook_pairs}
    return packers[layout_of(bits)](q)


class NormalFloatFormat:
    family = "nf"

    def __init__(self, bits: int, quantized_params: bool = False):
        self.bits = bits
        self.quantized_params = quantized_params  # the nf<B>k variant: 8-bit scale codes
        self.name = f"nf{bits}k" if quantized_params else f"nf{bits}"
        self.codebook = normal_float_codebook(bits)

    @property
    def param_bits(self) -> int:
        return 8 if self.quantized_params else 16  # per group: the scale

    def nominal_bits(self, group_size: int) -> float:
        return self.bits + self.param_bits / group_size  # codes + one scale per group

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        extra = 4 if self.quantized_params else 0  # the f32 scale_step
        return (padded_rows(m) * k * self.bits // 8 + self.param_bits // 8 * m * (k // group_size)
                + 4 * len(self.codebook) + extra)

    def fit_tensor(self, w: np.ndarray, group_size: int, refine: bool) -> tuple[np.ndarray, np.ndarray]:
        """Every group's fitted fp16 scale and codes: (codes u8[M, K], scales f16[M, K/G])."""
        m, k = check_shape(w, group_size)
        ng = k // group_size
        q = np.empty((m, k), np.uint8)
        scales = np.empty((m, ng), np.float16)

        def fit(rows: slice) -> None:
            s, codes = fit_groups(w[rows].astype(np.float64).reshape(-1, group_size), self.codebook, refine)
            q[rows] = codes.reshape(-1, k)
            scales[rows] = s.reshape(-1, ng)

        for_row_chunks(m, k, fit)
        return q, scales

    def scale_step(self, w: np.ndarray, group_size: int, refine: bool) -> float:
        """The k variants' per-tensor scale step for w: what quantize stores as scale_step."""
        return scale_step(self.fit_tensor(w, group_size, refine)[1])

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size)
        ng = k // group_size
        q, scales = self.fit_tensor(w, group_size, refine)
        if not self.quantized_params:
            return self.pack(q, group_size, {"scales": scales})

        # Second pass: the step spans the whole tensor, so it is known only once every group is fitted.
        step = scale_step(scales)
        scale_codes = np.empty((m, ng), np.int8)

        def requantize(rows: slice) -> None:
            x = w[rows].astype(np.float64).reshape(-1, group_size)
            c, codes = fit_scale_codes(x, scales[rows].astype(np.float64).ravel(), step, self.codebook, refine)
            q[rows] = codes.reshape(-1, k)
            scale_codes[rows] = c.reshape(-1, ng)

        for_row_chunks(m, k, requantize)
        return self.pack(q, group_size, {"scale_codes": scale_codes, "scale_step": np.array([step], np.float32)})

    def pack(self, q: np.ndarray, group_size: int, params: dict[str, np.ndarray]) -> PackedTensor:
        """The stored tensor from codes u8[M, K] and its scales (f16[M, K/G] "scales", or the k variants'
        "scale_codes" i8[M, K/G] and "scale_step" f32[1]): the one place its arrays and metadata are put together,
        for plain rounding and GPTQ alike."""
        m, k = q.shape
        scheme = layout_of(self.bits)
        version = LAYOUT_VERSIONS[scheme]
        meta = {"format": self.name, "bits": self.bits, "group_size": group_size, "shape": [m, k],
                "layout": scheme, "layout_version": version}
        if self.quantized_params:
            meta["param_bits"] = 8
        arrays = {"codes": pack_codes(q, self.bits), **params, "codebook": self.codebook.copy()}
        return PackedTensor(arrays, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        # directories written before each nf format stored its own layout hold bitserial codes (repacked at load)
        scheme = "bitserial" if meta.get("layout") == "bitserial" else layout_of(self.bits)
        m, k, g = stored_dims(meta, self.bits, scheme)
        if scheme == "codebook":
            codes = (padded_rows(m) // 32, k // 4, 2, 32)
        elif scheme == "codebook2":
            codes = (padded_rows(m) // 32, k // 8, 2, 32)
        elif scheme == "codebook3":
            codes = (padded_rows(m) // 32, k // 16, 3, 64)
        else:
            codes = (padded_rows(m) // 32, k // 8, self.bits, 32)
        arrays = {"codes": (np.dtype(np.uint8), codes), "codebook": (np.dtype(np.float32), (1 << self.bits,))}
        if self.quantized_params:
            if meta.get("param_bits") != 8:
                raise ValueError(f"param_bits {meta.get('param_bits')!r}, but {self.name} stores 8-bit scale codes")
            return {**arrays, "scale_codes": (np.dtype(np.int8), (m, k // g)),
                    "scale_step": (np.dtype(np.float32), (1,))}
        return {**arrays, "scales": (np.dtype(np.float16), (m, k // g))}

    def codes(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        if p.meta.get("layout") == "codebook":
            return unpack_codebook(np.asarray(p.arrays["codes"]), m, k)
        if p.meta.get("layout") == "codebook3":
            return unpack_codebook3(np.asarray(p.arrays["codes"]), m, k)
        if p.meta.get("layout") == "codebook2":
            return unpack_codebook_pairs(np.asarray(p.arrays["codes"]), m, k)
        return unpack_bitserial(np.asarray(p.arrays["codes"]), p.bits, m, k)

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        g = p.group_size
        w = np.asarray(p.arrays["codebook"], np.float32)[self.codes(p)].reshape(m, k // g, g)
        w *= group_scales(p)[..., None]  # in place: no temporary the size of W
        return w.reshape(m, k)
