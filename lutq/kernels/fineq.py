"""LUT kernel for fineq: clusters of 3 weights, one byte each (lutq/quantize/fineq.py, docs/FORMAT.md).

A cluster byte is a 2-bit mode and 6 bits of payload; mode 0 holds three 2-bit codes, modes 1-3 zero one weight and
give the other two (a, b) 3-bit codes. The stored byte (layout 2) keeps the mode in bits 5-4, so that its low six
bits are the index of the mode's table and its high nibble the index of the table shared by all modes:

    stored = h2 << 6 | mode << 4 | lo           (lo = payload bits 3-0, h2 = payload bits 5-4)
    lo6 = stored & 63 = mode << 4 | lo,   hi = stored >> 4 = h2 << 2 | mode

Its dot product with the cluster's activations (x0, x1, x2), in units of the group scale, splits into a part of lo6
and a part of hi:

    mode 0:  (c0 - 1.5) x0 + (c1 - 1.5) x1 + (c2 - 1.5) x2  =  A0[lo] + B[hi]
             A0[lo] = ((lo & 3) - 1.5) x0 + ((lo >> 2) - 1.5) x1,      B[h2 << 2 | 0] = (h2 - 1.5) x2
    mode j:  (d0 - 3.5) x_a + (d1 - 3.5) x_b               =  Aj[lo] + B[hi]          (d1 = lo >> 3 | h2 << 1)
             Aj[lo] = ((lo & 7) - 3.5) x_a + ((lo >> 3) - 0.5) x_b,   B[h2 << 2 | j] = (2 h2 - 3) x_b

so per cluster five 16-entry tables (A0..A3, B) replace the 256-entry one: B by one pshufb on the high nibbles, A as
one 64-entry table indexed by the stored byte itself (one vpermb with AVX512-VBMI, which reads only the low six index
bits: no index arithmetic; AVX-512BW without VBMI: the tables kept as int16, A by vpermt2w and B by vpermw on the
zero-extended bytes, already widened (word_tables); NEON: tbl with a four-register table after & 63; else four
pshufb, each byte keeping the one of its own mode). Layout 1 stored the mode in bits 7-6 and cost three more
instructions per 32 bytes to form the index (measured: the kernel took 9-16% longer). The grid offsets are split so
every table is centred on zero (the int8 step follows the largest entry: centring makes it ~3x finer than keeping the
offsets in one table), and no activation sums are needed.

    per tile and cluster c, 32 bytes (one per row):  a = vpermb(A0..A3, stored),  b = pshufb(B, stored >> 4)
    acc_int16 += a + b (widened);  per block of BLOCK clusters: group_f32 += tscale * acc;
    at each group end: rows_f32 += s * group_f32
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from lutq.errors import LutqError
from lutq.kernels.layout import TILE_M
from lutq.kernels.lut import ISA, PREFETCH_BYTES, TABLE_MAX, TableSet, store_rows, run_tiles
from lutq.kernels.simd import (
    broadcast16_x32,
    fma_f32,
    high_nibbles,
    i16_to_f32,
    load_f16,
    load_f16x32,
    load_f32x16,
    load_i8x32,
    lookup16_words,
    lookup64,
    lookup64_words,
    prefetch,
    shuffle_bytes,
    splat_f32,
    splat_f32x16,
    splat_i16x32,
    store_rint_i8x16,
    vadd,
    vmul,
    widen_i8_i16,
    zeros_f32x32,
)

# Mode j (1..3) keeps weights KEPT[j - 1] of its cluster (quantize/fineq.py): (1, 2), (0, 2), (0, 1).
# Clusters per table scale. A table's int8 step follows its block's largest entry; blocks finer than a group cost one
# int16 -> f32 flush per block (cheap) and make the step ~1.5x finer than one scale per 64-weight group.
BLOCK = 8


# The levels each table entry multiplies (quantize/fineq.py's byte map): A0[lo] = LO4[lo] x0 + HI4[lo] x1;
# mode m's Am[lo] = LO8[lo] xa + HI8[lo] xb (m = 1, 2, 3 keep (x1, x2), (x0, x2), (x0, x1)); B[h2 << 2 | m] =
# B_LEVELS[h2 << 2 | m] times x2 (modes 0-2) or x1 (mode 3): B_X2 + B_X1 with each zero where the other is not.
# f32 (the levels are halves, exact) so the table builds stay f32 throughout.
LO4 = np.array([(lo & 3) - 1.5 for lo in range(16)], np.float32)
HI4 = np.array([(lo >> 2) - 1.5 for lo in range(16)], np.float32)
LO8 = np.array([(lo & 7) - 3.5 for lo in range(16)], np.float32)
HI8 = np.array([(lo >> 3) - 0.5 for lo in range(16)], np.float32)
B_LEVELS = np.array([(e >> 2) - 1.5 if e & 3 == 0 else 2 * (e >> 2) - 3.0 for e in range(16)], np.float32)
B_X2 = np.where(np.arange(16) & 3 != 3, B_LEVELS, 0).astype(np.float32)
B_X1 = np.where(np.arange(16) & 3 != 3, 0, B_LEVELS).astype(np.float32)


@njit(cache=True, inline="always")
def _group_clusters(g, group, n_clusters):
    """Clusters of group g: those whose first weight 3c falls in [gG, (g+1)G)."""
    return -(-g * group // 3), min(n_clusters, -(-(g + 1) * group // 3))


@njit(cache=True, inline="always")
def _cluster_x(x, n, c):
    """The activations of cluster c of token n; the last cluster's padding columns read 0 (zero weights)."""
    k = x.shape[1]
    x1 = x[n, 3 * c + 1] if 3 * c + 1 < k else np.float32(0.0)
    x2 = x[n, 3 * c + 2] if 3 * c + 2 < k else np.float32(0.0)
    return x[n, 3 * c], x1, x2


@njit(cache=True, inline="always")
def _cluster_peak(x0, x1, x2):
    """The largest |entry| of a cluster's five tables, in closed form (each table's extreme entry has every term's
    sign matched to its activation's): A0 1.5|x0| + 1.5|x1|, Am 3.5|xa| + 0.5|xb|, B 3 max(|x1|, |x2|). f32."""
    a0, a1, a2 = abs(x0), abs(x1), abs(x2)
    h, q, s = np.float32(0.5), np.float32(1.5), np.float32(3.5)
    peak = max(q * a0 + q * a1, s * a1 + h * a2, s * a0 + h * a2)
    return max(peak, s * a0 + h * a1, np.float32(3.0) * max(a1, a2))


@njit(cache=True, inline="always")
def _cluster_int8(tables, off, y0, y1, y2):
    """tables[off:off+80] = A0, A1, A2, A3, B of one cluster (int8, flat) from its activations times 127/peak: each
    table one 16-wide expression over constant level vectors, rounded, and one 16-byte store."""
    v0, v1, v2 = splat_f32x16(y0), splat_f32x16(y1), splat_f32x16(y2)
    lo4, hi4, lo8, hi8 = load_f32x16(LO4, 0), load_f32x16(HI4, 0), load_f32x16(LO8, 0), load_f32x16(HI8, 0)
    store_rint_i8x16(tables, off, vadd(vmul(lo4, v0), vmul(hi4, v1)))
    store_rint_i8x16(tables, off + 16, vadd(vmul(lo8, v1), vmul(hi8, v2)))  # mode 1 keeps (x1, x2)
    store_rint_i8x16(tables, off + 32, vadd(vmul(lo8, v0), vmul(hi8, v2)))  # mode 2 keeps (x0, x2)
    store_rint_i8x16(tables, off + 48, vadd(vmul(lo8, v0), vmul(hi8, v1)))  # mode 3 keeps (x0, x1)
    store_rint_i8x16(tables, off + 64, vadd(vmul(load_f32x16(B_X2, 0), v2), vmul(load_f32x16(B_X1, 0), v1)))


@njit(cache=True, inline="always")
def _cluster_tables(x0, x1, x2, out):
    """out [5, 16]: A0, A1, A2, A3, B of one cluster, unscaled (the exact mode's f32 tables; byte_values)."""
    for e in range(16):
        out[0, e] = LO4[e] * x0 + HI4[e] * x1
        out[1, e] = LO8[e] * x1 + HI8[e] * x2
        out[2, e] = LO8[e] * x0 + HI8[e] * x2
        out[3, e] = LO8[e] * x0 + HI8[e] * x1
        out[4, e] = B_X2[e] * x2 + B_X1[e] * x1


@njit(cache=True)
def _build_int8(x, group, tables, tscales):
    """tables i8[N, C, 5, 16] (or the same values in i16: word_tables) with one scale per block of BLOCK clusters of
    a group, tscales f32[N, K/G, blocks per group] (the value of one step), from x f32[N, K]. f32 throughout; two
    passes per block: the peak in closed form, then each cluster's activations times 127/peak into its five tables
    (_cluster_int8)."""
    n_tok, k = x.shape
    n_clusters = tables.shape[1]
    for n in range(n_tok):
        for g in range(k // group):
            c0, c1 = _group_clusters(g, group, n_clusters)
            for blk, start in enumerate(range(c0, c1, BLOCK)):
                stop = min(c1, start + BLOCK)
                peak = np.float32(0.0)
                for c in range(start, stop):
                    x0, x1, x2 = _cluster_x(x, n, c)
                    peak = max(peak, _cluster_peak(x0, x1, x2))
                inv = np.float32(TABLE_MAX) / peak if peak > 0 else np.float32(0.0)
                tscales[n, g, blk] = peak / np.float32(TABLE_MAX)
                for c in range(start, stop):
                    x0, x1, x2 = _cluster_x(x, n, c)
                    _cluster_int8(tables, (n * n_clusters + c) * 80, x0 * inv, x1 * inv, x2 * inv)


@njit(cache=True)
def _build_f32(x, tables):
    """The exact mode's tables: f32[N, C, 5, 16], unscaled (tscales stay 1)."""
    n_tok = x.shape[0]
    for n in range(n_tok):
        for c in range(tables.shape[1]):
            x0, x1, x2 = _cluster_x(x, n, c)
            _cluster_tables(x0, x1, x2, tables[n, c])


class ClusterTables(TableSet):
    """fineq's activation tables: five 16-entry tables per cluster of 3 activations, int8 per group (or fp32), kept
    as int16 for the word permutes of AVX-512 without VBMI (word_tables)."""

    def __init__(self, k: int, group: int, tokens: int = 1, exact: bool = False, isa=None):
        if k < 1 or group < 3 or k % group:
            raise LutqError(f"unsupported shape: K = {k}, group size {group} (need K % G == 0)")
        self.k, self.group, self.exact = k, group, exact
        dtype = np.float32 if exact else np.int16 if word_tables(isa or ISA) else np.int8  # isa: the kernel's
        self.tables = np.zeros((tokens, -(-k // 3), 5, 16), dtype)
        self.tscales = np.ones((tokens, k // group, -(-(group // 3 + 1) // BLOCK)), np.float32)  # exact: stay 1

    def builder(self, x: np.ndarray):
        if self.exact:
            return _build_f32, (x, self.tables)
        return _build_int8, (x, self.group, self.tables, self.tscales)


def word_tables(isa) -> bool:
    """Whether the int8 tables are kept widened to int16: on AVX-512 without VBMI, whose word permutes (vpermt2w,
    vpermw) then look up A and B already widened, where bytes would take four pshufb, three blends and two widenings
    per 32 rows."""
    return isa.name == "avx512" and not isa.vbmi


def _cluster_sum(isa, tables, toff, w):
    """A[w & 63] + B[w >> 4] of one cluster for 32 stored bytes w, as int16 (compiled per tables' dtype: below)."""


@overload(_cluster_sum, inline="always")
def _cluster_sum_impl(isa, tables, toff, w):
    if tables.dtype == types.int16:
        def words(isa, tables, toff, w):
            return vadd(lookup64_words(isa, tables, toff, w), lookup16_words(isa, tables, toff + 64, w))
        return words

    def nbytes(isa, tables, toff, w):
        a = lookup64(isa, tables, toff, w)  # the low six bits: mode << 4 | lo
        b = shuffle_bytes(isa, broadcast16_x32(tables, toff + 64), high_nibbles(w))
        return vadd(widen_i8_i16(a), widen_i8_i16(b))
    return nbytes


@njit(cache=True, inline="always")
def _fineq_group(isa, packed, scales, tables, tscales, group, t, n, g, y):
    n_clusters = packed.shape[1]
    n_groups = tscales.shape[1]
    c0, c1 = _group_clusters(g, group, n_clusters)
    in_group = zeros_f32x32()
    for blk, start in enumerate(range(c0, c1, BLOCK)):
        acc = splat_i16x32(0)
        for c in range(start, min(c1, start + BLOCK)):
            off = (t * n_clusters + c) * TILE_M
            prefetch(packed, off + PREFETCH_BYTES)
            toff = (n * n_clusters + c) * 80
            acc = vadd(acc, _cluster_sum(isa, tables, toff, load_i8x32(packed, off)))
        in_group = fma_f32(i16_to_f32(acc), splat_f32(tscales[n, g, blk]), in_group)
    return fma_f32(load_f16x32(scales, (t * n_groups + g) * 32), in_group, y)


@njit(cache=True)
def _fineq_tiles(isa, packed, scales, tables, tscales, group, t0, t1, out):
    """Two tiles advance together, as in lut._simd_tiles (two DRAM streams)."""
    n_tok = out.shape[0]
    n_groups = tscales.shape[1]
    mid = (t1 - t0) // 2
    for t in range(t0, t0 + mid):
        for n in range(n_tok):
            ya = zeros_f32x32()
            yb = zeros_f32x32()
            for g in range(n_groups):
                ya = _fineq_group(isa, packed, scales, tables, tscales, group, t, n, g, ya)
                yb = _fineq_group(isa, packed, scales, tables, tscales, group, t + mid, n, g, yb)
            store_rows(out, n, t, ya)
            store_rows(out, n, t + mid, yb)
    for t in range(t0 + 2 * mid, t1):
        for n in range(n_tok):
            y = zeros_f32x32()
            for g in range(n_groups):
                y = _fineq_group(isa, packed, scales, tables, tscales, group, t, n, g, y)
            store_rows(out, n, t, y)


@njit(cache=True)
def _fineq_plain_tiles(packed, scales, tables, tscales, group, t0, t1, out):
    n_tok, m = out.shape
    n_clusters = packed.shape[1]
    n_groups = tscales.shape[1]
    for t in range(t0, t1):
        for n in range(n_tok):
            for r in range(min(TILE_M, m - TILE_M * t)):
                acc = 0.0
                for g in range(n_groups):
                    c0, c1 = _group_clusters(g, group, n_clusters)
                    in_group = 0.0
                    for c in range(c0, c1):
                        byte = packed[t, c, r]
                        in_group += np.float64(tscales[n, g, (c - c0) // BLOCK]) * (
                            np.float64(tables[n, c, (byte >> 4) & 3, byte & 15]) + np.float64(tables[n, c, 4, byte >> 4]))
                    acc += np.float64(load_f16(scales, (t * n_groups + g) * 32 + r)) * in_group
                out[n, TILE_M * t + r] = acc


@njit(cache=True, parallel=True)
def _fineq_parallel(isa, packed, scales, tables, tscales, group, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _fineq_tiles(isa, packed, scales, tables, tscales, group, c * n // chunks, (c + 1) * n // chunks, out)


@njit(cache=True, parallel=True)
def _fineq_plain_parallel(packed, scales, tables, tscales, group, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _fineq_plain_tiles(packed, scales, tables, tscales, group, c * n // chunks, (c + 1) * n // chunks, out)


def gemv_fineq(packed, scales, tables: ClusterTables, out, threads: int | None = None, bind: bool = False):
    """out[n, m] = sum_k W[m, k] x[n, k]. packed: u8[M_pad/32, C, 32] (quantize/fineq.py's pack); scales:
    layout.pack_group_scales of the fp16 scales; out: f32[N, M], written."""
    n_tiles = packed.shape[0]
    m = out.shape[-1]
    if packed.dtype != np.uint8 or packed.ndim != 3 or packed.shape[1:] != tables.tables.shape[1:2] + (TILE_M,):
        raise LutqError(f"packed clusters u8{list(packed.shape)} do not match tables of K = {tables.k}")
    if tables.group > 255 or scales.dtype != np.uint16 or scales.shape != (n_tiles, tables.k // tables.group, TILE_M):
        raise LutqError(f"scales u16{list(scales.shape)} do not match K = {tables.k}, G = {tables.group}")
    if out.dtype != np.float32 or out.shape != (tables.tables.shape[0], m) or not n_tiles * TILE_M - TILE_M < m \
            <= n_tiles * TILE_M:
        raise LutqError(f"output {out.dtype}{list(out.shape)} does not fit {n_tiles} tiles of {TILE_M} rows")
    if not (packed.flags.c_contiguous and scales.flags.c_contiguous and out.flags.c_contiguous):
        raise LutqError("packed clusters, scales and output must be C-contiguous")
    args = (packed, scales, tables.tables, tables.tscales, tables.group)
    weights = n_tiles * TILE_M * tables.k * out.shape[0]
    if tables.exact or ISA.name == "portable":
        return run_tiles(_fineq_plain_tiles, _fineq_plain_parallel, args, n_tiles, weights, threads, out, bind)
    return run_tiles(_fineq_tiles, _fineq_parallel, (ISA,) + args, n_tiles, weights, threads, out, bind)


@njit(cache=True)
def _unit_tables(x0, x1, x2, out):
    _cluster_tables(x0, x1, x2, out)


def byte_values() -> np.ndarray:
    """Every stored byte's three weights in units of the scale, f32[256, 3]: the tables with x = unit vectors."""
    out = np.zeros((256, 3), np.float32)
    t = np.empty((5, 16))
    for i in range(3):
        x0, x1, x2 = np.eye(3)[i]
        _unit_tables(x0, x1, x2, t)
        for byte in range(256):
            out[byte, i] = t[(byte >> 4) & 3, byte & 15] + t[4, byte >> 4]
    return out


@njit(cache=True, parallel=True, fastmath=True)
def dequant_gemv(packed, scales, values, group, x, chunks, out):
    """The plain alternative (benchmark): dequantize a tile's rows to f32, then dot them with x. out f32[M]."""
    n_tiles, n_clusters = packed.shape[:2]
    n_groups = scales.shape[1]
    k = x.shape[0]
    m = out.shape[0]
    for ch in prange(chunks):
        w = np.zeros(3 * n_clusters, np.float32)
        for t in range(ch * n_tiles // chunks, (ch + 1) * n_tiles // chunks):
            for r in range(min(TILE_M, m - TILE_M * t)):
                for c in range(n_clusters):
                    s = load_f16(scales, (t * n_groups + 3 * c // group) * 32 + r)
                    byte = packed[t, c, r]
                    for i in range(3):
                        w[3 * c + i] = s * values[byte, i]
                acc = np.float32(0.0)
                for i in range(k):
                    acc += w[i] * x[i]
                out[TILE_M * t + r] = acc
