"""LUT kernels for codebook formats (nf2/nf3/nf4): W = s * codebook[q] per group, never dequantized.

nf4 has the codebook layout (layout.pack_codebook: one code per nibble) and a 16-entry table per activation,
T_k[j] = codebook[j] x_k. nf2 runs on the same kernel with two codes per nibble (layout.pack_codebook_pairs) and a
16-entry table per activation pair, T_i[j] = cb[j & 3] x_2i + cb[j >> 2] x_2i+1.

nf3 has its own layout (layout.pack_codebook3: a 3-bit code per nibble, the nibbles' spare fourth bits holding every
fourth code) and a table per column pair, T_P[e] = cb[e & 7] x_(2P + e // 8): one lookup per weight.

(nf2 and nf3 once ran on the bitserial layout, each codebook value a multilinear polynomial of the code's bits and
one bit-plane product looked up per bit subset: 3 subsets for nf2, 7 for nf3, which took 1.9-2x int3's time.)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from lutq.errors import LutqError
from lutq.kernels.layout import TILE_M
from lutq.kernels.lut import ISA, PREFETCH_BYTES, TABLE_MAX, TableSet, store_rows, check_group, run_tiles
from lutq.kernels.simd import (
    broadcast16_pair,
    broadcast16_x64,
    code_index,
    fma_f32,
    half,
    high_nibbles,
    i16_to_f32,
    load_f16,
    load_f16x32,
    load_f32x16,
    load_i8x64,
    low_nibbles,
    prefetch,
    shuffle_bytes,
    splat_f32,
    spare_codes,
    splat_f32x16,
    splat_i16x32,
    times,
    store_rint_i8x16,
    vadd,
    vmul,
    weigh_pairs,
    widen_i8_i16,
    zeros_f32x32,
)


# ---------------------------------------------------------------------------------------------------------------------
# nf4 (and nf2 as pair codes) on the codebook layout: a table per activation (per activation pair)
#
#   per tile and column quad j, 64 bytes:  [ r0..r31: q4j | q4j+1 << 4 ][ r0..r31: q4j+2 | q4j+3 << 4 ]
#   tables, per quad: [ T4j | T4j+2 | T4j+1 | T4j+3 ]  (16 bytes each)
#   pshufb((T4j, T4j, T4j+2, T4j+2), low nibbles) -> rows 0-31 of column 4j, then of column 4j+2
#   pshufb((T4j+1, ..., T4j+3, ...), high nibbles) -> columns 4j+1, 4j+3; the four 32-byte halves widen to int16
#   every G columns: rows_f32 += s * tscale * acc


# Entry e of a span-2 (nf2 pairs) table weighs x_2i by cb[e & 3] and x_2i+1 by cb[e >> 2]: these pick the codebook
# entries into constant-position coefficient vectors (CodebookTables builds them once, 16 floats each).
PAIR_LO = np.array([e & 3 for e in range(16)], np.int64)
PAIR_HI = np.array([e >> 2 for e in range(16)], np.int64)


@njit(cache=True, inline="always")
def _codebook_peak(x, n, i0, i1, span, cb_max, cb_min):
    """The largest |entry| of the tables of virtual columns i0..i1, in closed form (f32). Span 1: max |cb| max |x|.
    Span 2: max_(a,b) |cb_a x0 + cb_b x1| is, per pair, the larger of (sum of each term's max) and -(sum of each
    term's min), a term's extremes being cb_max x and cb_min x."""
    peak = np.float32(0.0)
    if span == 1:
        for i in range(i0, i1):
            peak = max(peak, abs(x[n, i]))
        return peak * max(abs(cb_max), abs(cb_min))
    for i in range(i0, i1):
        x0, x1 = x[n, 2 * i], x[n, 2 * i + 1]
        a0, b0, a1, b1 = cb_max * x0, cb_min * x0, cb_max * x1, cb_min * x1
        peak = max(peak, max(a0, b0) + max(a1, b1), -(min(a0, b0) + min(a1, b1)))
    return peak


@njit(cache=True)
def build_codebook_tables_int8(x, coefs, cb_max, cb_min, group, span, tables, tscales):
    """x f32[N, K] -> tables i8[N, K/(4 span), 4, 16] in quad order (virtual columns 4j, 4j+2, 4j+1, 4j+3), tscales
    f32[N, K/G] (the value of one step: the group's largest |entry| at 127). Entry e of virtual column i: cb[e] x_i
    (span 1, nf4) or cb[e & 3] x_2i + cb[e >> 2] x_2i+1 (span 2, nf2). coefs f32[2, 16]: the per-entry weights of
    x_i (or x_2i) and of x_2i+1 (CodebookTables); cb_max, cb_min: the codebook's extremes.

    f32 throughout, as lut.build_tables_int8: the peak in closed form (_codebook_peak), then per virtual column all
    16 entries as one f32x16 expression over the coefficient vectors (lo, hi) times the activations scaled by
    127/peak, rounded and stored as 16 bytes (simd.store_rint_i8x16; written as a loop over e, LLVM left it scalar).
    5-8x faster than the earlier float64 scalar build at K = 2048 (nf2 pairs 24.6 -> 5.1 us, nf4 37.6 -> 4.7)."""
    n_tok, k = x.shape
    n_quads = tables.shape[1]
    lo_v, hi_v = load_f32x16(coefs[0], 0), load_f32x16(coefs[1], 0)
    per_group = group // span
    for n in range(n_tok):
        for g in range(k // group):
            peak = _codebook_peak(x, n, g * per_group, (g + 1) * per_group, span, cb_max, cb_min)
            inv = np.float32(TABLE_MAX) / peak if peak > 0 else np.float32(0.0)
            tscales[n, g] = peak / np.float32(TABLE_MAX)
            for j in range(g * per_group // 4, (g + 1) * per_group // 4):
                off = (n * n_quads + j) * 64
                for c in range(4):  # virtual column 4j + c at slot (0, 2, 1, 3)[c]
                    slot = off + 16 * ((c & 1) * 2 + (c >> 1))
                    if span == 1:
                        store_rint_i8x16(tables, slot, vmul(lo_v, splat_f32x16(x[n, 4 * j + c] * inv)))
                    else:
                        i = 2 * (4 * j + c)
                        store_rint_i8x16(tables, slot, vadd(vmul(lo_v, splat_f32x16(x[n, i] * inv)),
                                                            vmul(hi_v, splat_f32x16(x[n, i + 1] * inv))))


@njit(cache=True)
def build_codebook_tables_f32(x, codebook, span, tables):
    """The exact mode's tables: build_codebook_tables_int8's entries unscaled and unrounded, f32 (tscales stay 1)."""
    n_tok, k = x.shape
    for n in range(n_tok):
        for i in range(k // span):
            slot = tables[n, i // 4, (i & 1) * 2 + ((i >> 1) & 1)]  # 4j + c at slot (0, 2, 1, 3)[c]
            for e in range(16):
                if span == 1:
                    slot[e] = codebook[e] * x[n, i]
                else:
                    slot[e] = codebook[e & 3] * x[n, 2 * i] + codebook[e >> 2] * x[n, 2 * i + 1]


@njit(cache=True, inline="always")
def _nf4_group(isa, packed, scales, tables, tscales, t, n, g, y):
    n_quads = packed.shape[1]
    n_groups = tscales.shape[1]
    quads_per_group = n_quads // n_groups
    acc = splat_i16x32(0)
    for j in range(g * quads_per_group, (g + 1) * quads_per_group):
        off = (t * n_quads + j) * 64
        prefetch(packed, off + PREFETCH_BYTES)
        toff = (n * n_quads + j) * 64
        w = load_i8x64(packed, off)
        lo = shuffle_bytes(isa, broadcast16_pair(tables, toff), low_nibbles(w))
        hi = shuffle_bytes(isa, broadcast16_pair(tables, toff + 32), high_nibbles(w))
        acc = vadd(acc, vadd(widen_i8_i16(half(lo, 0)), widen_i8_i16(half(lo, 1))))
        acc = vadd(acc, vadd(widen_i8_i16(half(hi, 0)), widen_i8_i16(half(hi, 1))))
    scale = load_f16x32(scales, (t * n_groups + g) * 32)
    return fma_f32(scale, fma_f32(i16_to_f32(acc), splat_f32(tscales[n, g]), zeros_f32x32()), y)


@njit(cache=True)
def _nf4_tiles(isa, packed, scales, tables, tscales, t0, t1, out):
    """nf4; two tiles advance together, as in lut._simd_tiles (two DRAM streams)."""
    n_tok = out.shape[0]
    n_groups = tscales.shape[1]
    mid = (t1 - t0) // 2
    for t in range(t0, t0 + mid):
        for n in range(n_tok):
            ya = zeros_f32x32()
            yb = zeros_f32x32()
            for g in range(n_groups):
                ya = _nf4_group(isa, packed, scales, tables, tscales, t, n, g, ya)
                yb = _nf4_group(isa, packed, scales, tables, tscales, t + mid, n, g, yb)
            store_rows(out, n, t, ya)
            store_rows(out, n, t + mid, yb)
    for t in range(t0 + 2 * mid, t1):
        for n in range(n_tok):
            y = zeros_f32x32()
            for g in range(n_groups):
                y = _nf4_group(isa, packed, scales, tables, tscales, t, n, g, y)
            store_rows(out, n, t, y)


@njit(cache=True)
def _nf4_plain_tiles(packed, scales, tables, tscales, t0, t1, out):
    n_tok, m = out.shape
    n_quads = packed.shape[1]
    n_groups = tscales.shape[1]
    quads_per_group = n_quads // n_groups
    for t in range(t0, t1):
        for n in range(n_tok):
            for r in range(min(TILE_M, m - TILE_M * t)):
                acc = 0.0
                for g in range(n_groups):
                    lookups = 0.0
                    for j in range(g * quads_per_group, (g + 1) * quads_per_group):
                        for h in range(2):
                            byte = packed[t, j, h, r]
                            lookups += (np.float64(tables[n, j, h, byte & 15]) +
                                        np.float64(tables[n, j, 2 + h, byte >> 4]))
                    scale = np.float64(load_f16(scales, (t * n_groups + g) * 32 + r))
                    acc += scale * np.float64(tscales[n, g]) * lookups
                out[n, TILE_M * t + r] = acc


class CodebookTables(TableSet):
    """Tables for the codebook layout: nf4 (16 levels) gets a table per activation, T_k[j] = cb[j] x_k; nf2 (4 levels,
    layout.pack_codebook_pairs) a table per activation pair, T_i[j] = cb[j & 3] x_2i + cb[j >> 2] x_2i+1. int8 with
    one scale per group (exact=True: fp32)."""

    def __init__(self, k: int, group: int, codebook: np.ndarray, tokens: int = 1, exact: bool = False):
        check_group(k, group)
        if len(codebook) not in (4, 16) or (not exact and group > 128):
            raise LutqError(f"unsupported: codebook tables need 4 or 16 levels and G <= 128, "
                            f"got {len(codebook)} levels, G = {group}")
        self.k, self.group, self.exact = k, group, exact
        self.span = 2 if len(codebook) == 4 else 1  # activations per table
        self.codebook = cb = np.asarray(codebook, np.float32)
        # the int8 build's coefficient vectors, once per table set rather than per build (the decode path allocates
        # nothing): cb itself (span 1), or the codebook entries each pair entry weighs x_2i and x_2i+1 by (span 2)
        self.coefs = np.ascontiguousarray([cb, cb] if self.span == 1 else [cb[PAIR_LO], cb[PAIR_HI]], np.float32)
        self.cb_max, self.cb_min = cb.max(), cb.min()
        self.tables = np.zeros((tokens, k // (4 * self.span), 4, 16), np.float32 if exact else np.int8)
        self.tscales = np.ones((tokens, k // group), np.float32)  # the exact mode's stay 1

    def builder(self, x: np.ndarray):
        if self.exact:
            return build_codebook_tables_f32, (x, self.codebook, self.span, self.tables)
        return build_codebook_tables_int8, (x, self.coefs, self.cb_max, self.cb_min, self.group, self.span,
                                            self.tables, self.tscales)


# ---------------------------------------------------------------------------------------------------------------------
# nf3 on the codebook3 layout: a code per nibble, a table per activation pair
#
#   per tile t and column block b (16 columns), three 64-byte registers R0 R1 R2 (layout.py), byte 2r + j of row r:
#       Ri nibble h:  code of column 16b + 4i + 2h + j  (bits 0-2)  |  bit i of the code of column 16b + 12 + 2h + j
#       R3 = spare_codes(R0, R1, R2): the codes of columns 16b + 12 .. 15, in the same places
#   tables, per column pair P (16 bytes): [ cb[0..7] x_2P | cb[0..7] x_2P+1 ], in every lane
#   pshufb(table of pair 8b + 2i + h, code_index(Ri, h)): byte 2r + j = T[code + 8j] = cb[code] x_(16b + 4i + 2h + j)
#   pmaddubsw with (1, 1): int16 per row = its two columns, 32 rows in row order; 8 lookups per 16 columns
#   per block b: acc_int16 += (its 8 lookups' sum) * m_b;  every G columns: rows_f32 += s * tscale * acc
#
# Table steps: one int8 step per group would round every entry to the group's largest |cb x| / 127, and a group's
# activations span a wide range (SmolLM2's massive channels), so its quiet blocks lost most of their bits: nf3's
# layer outputs had ~3x the relative error of int3/int4's, whose tables are per 4 activations. Each block of 16
# columns therefore gets its own step, m_b times the group's finest step u = P / (127 M) (P: the group's largest
# |entry|), m_b in [1, M] the least that keeps the block's entries within +-127: ceil(M p_b / P), p_b the block's
# largest |entry|. M, per token and group, is the most the int16 accumulator allows: a row's sum is at most
# sum_c max_e |T_c[e]| m_b (each column's largest entry, in units of u) <= M (127 S / P + G / 2) with S = sum_c
# max|cb| |x_c| (the G / 2: rounding), kept within 32000. Gaussian activations, G = 64: M ~ 11; a group with one
# channel 50x the rest: M ~ 100. The cost is one int16 multiply per 16 columns.


# A pair table's entry e multiplies x_2P (e < 8) or x_2P+1 (e >= 8): 0/1 weights folded into the codebook (cb16
# first, cb16 second; PairTables builds them once), so all 16 entries are one expression with constant coefficients.
FIRST = np.array([1.0] * 8 + [0.0] * 8, np.float32)
SECOND = np.array([0.0] * 8 + [1.0] * 8, np.float32)
ACC_BOUND = 32000  # the largest |int16 sum| a group's steps may allow (32767 less a margin for f32 rounding)


@njit(cache=True, inline="always")
def _block_abs(x, n, i0):
    """(max, sum) of |x[n, i0:i0 + 16]| in four independent chains (one chain's latency made the build 2x slower)."""
    m0 = m1 = m2 = m3 = s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(i0, i0 + 16, 4):
        a0, a1, a2, a3 = abs(x[n, i]), abs(x[n, i + 1]), abs(x[n, i + 2]), abs(x[n, i + 3])
        m0, m1, m2, m3 = max(m0, a0), max(m1, a1), max(m2, a2), max(m3, a3)
        s0, s1, s2, s3 = s0 + a0, s1 + a1, s2 + a2, s3 + a3
    return max(max(m0, m1), max(m2, m3)), (s0 + s1) + (s2 + s3)


@njit(cache=True)
def build_pair_tables_int8(x, coefs, cb_peak, group, tables, tscales, steps):
    """x f32[N, K] -> tables i8[N, K/2, 16]: entry e of pair P is cb[e & 7] x_(2P + e // 8) in steps of
    tscales[n, g] * steps[n, b] (the layout comment above). tscales f32[N, K/G]: u = P / (127 M), P the group's
    largest |entry| (max |cb| max |x|), M the most that keeps the int16 sums within ACC_BOUND; steps i32[N, K/16]:
    per 16-column block, the least multiple of u in [1, M] that keeps the block's largest |entry| within 127 steps.
    f32 throughout, all 16 entries of a pair in one f32x16 expression, cb16 first * y0 + cb16 second * y1, rounded
    and stored as 16 bytes (build_codebook_tables_int8). coefs f32[2, 16]: (cb16 first, cb16 second); cb_peak:
    max |cb| (PairTables)."""
    n_tok, k = x.shape
    n_pairs = tables.shape[1]
    first, second = load_f32x16(coefs[0], 0), load_f32x16(coefs[1], 0)
    for n in range(n_tok):
        for g in range(k // group):
            peak = np.float32(0.0)
            total = np.float32(0.0)
            for b in range(g * group // 16, (g + 1) * group // 16):
                block_peak, block_total = _block_abs(x, n, 16 * b)
                peak = max(peak, block_peak)
                total += block_total
            peak *= cb_peak
            most = 1  # M; 1 (one step per group, entries within 127) is always safe: G 127 <= 32767
            if peak > 0:
                per_step = np.float32(TABLE_MAX) * (total * cb_peak / peak) + np.float32(group // 2)
                most = max(1, int(np.float32(ACC_BOUND) / per_step))
            tscales[n, g] = peak / np.float32(TABLE_MAX * most)
            per_peak = np.float32(most) / peak if peak > 0 else np.float32(0.0)  # M / P
            for b in range(g * group // 16, (g + 1) * group // 16):
                block_peak = _block_abs(x, n, 16 * b)[0] * cb_peak
                # ceil(M p_b / P) in f32: a quotient rounded down past an integer leaves entries within 127 (1 + 1e-6)
                step = min(most, max(1, int(np.ceil(block_peak * per_peak))))
                steps[n, b] = step
                inv = np.float32(TABLE_MAX) * per_peak / np.float32(step)
                for pair in range(8 * b, 8 * b + 8):
                    y0, y1 = splat_f32x16(x[n, 2 * pair] * inv), splat_f32x16(x[n, 2 * pair + 1] * inv)
                    store_rint_i8x16(tables, (n * n_pairs + pair) * 16, vadd(vmul(first, y0), vmul(second, y1)))


@njit(cache=True)
def build_pair_tables_f32(x, codebook, tables):
    """The exact mode's tables: the entries unscaled and unrounded, f32 (tscales stay 1)."""
    n_tok, k = x.shape
    for n in range(n_tok):
        for pair in range(k // 2):
            for e in range(16):
                tables[n, pair, e] = codebook[e & 7] * x[n, 2 * pair + (e >> 3)]


@njit(cache=True, inline="always")
def _pair_lookups(isa, tables, toff, codes):
    """int16 per row: the sums of both nibbles' lookups of one register (tables of pairs toff/16, toff/16 + 1)."""
    lo = weigh_pairs(isa, shuffle_bytes(isa, broadcast16_x64(tables, toff), code_index(codes, 0)), 1, 1)
    return vadd(lo, weigh_pairs(isa, shuffle_bytes(isa, broadcast16_x64(tables, toff + 16), code_index(codes, 1)),
                                1, 1))


@njit(cache=True, inline="always")
def _nf3_group(isa, packed, scales, tables, tscales, steps, t, n, g, y):
    """y + tile t's rows' sum over quantization group g for token n (nf3 on codebook3 codes)."""
    n_blocks = packed.shape[1]
    n_groups = tscales.shape[1]
    blocks_per_group = n_blocks // n_groups
    acc = splat_i16x32(0)
    for b in range(g * blocks_per_group, (g + 1) * blocks_per_group):
        off = (t * n_blocks + b) * 192
        prefetch(packed, off + PREFETCH_BYTES)
        prefetch(packed, off + PREFETCH_BYTES + 64)
        prefetch(packed, off + PREFETCH_BYTES + 128)
        toff = (n * n_blocks + b) * 128
        r0, r1, r2 = load_i8x64(packed, off), load_i8x64(packed, off + 64), load_i8x64(packed, off + 128)
        block = vadd(_pair_lookups(isa, tables, toff, r0), _pair_lookups(isa, tables, toff + 32, r1))
        block = vadd(block, _pair_lookups(isa, tables, toff + 64, r2))
        block = vadd(block, _pair_lookups(isa, tables, toff + 96, spare_codes(r0, r1, r2)))
        acc = vadd(acc, times(block, steps[n, b]))
    scale = load_f16x32(scales, (t * n_groups + g) * 32)
    return fma_f32(scale, fma_f32(i16_to_f32(acc), splat_f32(tscales[n, g]), zeros_f32x32()), y)


@njit(cache=True)
def _nf3_tiles(isa, packed, scales, tables, tscales, steps, t0, t1, out):
    """nf3: packed u8[T, K/16, 3, 64] (codebook3), scales u16[T, K/G, 32], pair tables [N, K/2, 16] with their steps
    (tscales [N, K/G], steps [N, K/16]); two tiles advance together, as in lut._simd_tiles (two DRAM streams)."""
    n_tok = out.shape[0]
    n_groups = tscales.shape[1]
    mid = (t1 - t0) // 2
    for t in range(t0, t0 + mid):
        for n in range(n_tok):
            ya = zeros_f32x32()
            yb = zeros_f32x32()
            for g in range(n_groups):
                ya = _nf3_group(isa, packed, scales, tables, tscales, steps, t, n, g, ya)
                yb = _nf3_group(isa, packed, scales, tables, tscales, steps, t + mid, n, g, yb)
            store_rows(out, n, t, ya)
            store_rows(out, n, t + mid, yb)
    for t in range(t0 + 2 * mid, t1):
        for n in range(n_tok):
            y = zeros_f32x32()
            for g in range(n_groups):
                y = _nf3_group(isa, packed, scales, tables, tscales, steps, t, n, g, y)
            store_rows(out, n, t, y)


@njit(cache=True)
def _nf3_plain_tiles(packed, scales, tables, tscales, steps, t0, t1, out):
    """The same layout read nibble by nibble (exact with f32 tables; the kernel of CPUs without SIMD)."""
    n_tok, m = out.shape
    n_blocks = packed.shape[1]
    n_groups = tscales.shape[1]
    blocks_per_group = n_blocks // n_groups
    for t in range(t0, t1):
        for n in range(n_tok):
            for r in range(min(TILE_M, m - TILE_M * t)):
                acc = 0.0
                for g in range(n_groups):
                    lookups = 0.0
                    for b in range(g * blocks_per_group, (g + 1) * blocks_per_group):
                        block = 0.0
                        for j in range(2):
                            for h in range(2):
                                fourth = 0
                                for i in range(3):
                                    nibble = (packed[t, b, i, 2 * r + j] >> (4 * h)) & 15
                                    fourth |= (nibble >> 3) << i
                                    block += np.float64(tables[n, 8 * b + 2 * i + h, 8 * j + (nibble & 7)])
                                block += np.float64(tables[n, 8 * b + 6 + h, 8 * j + fourth])
                        lookups += block * np.float64(steps[n, b])
                    scale = np.float64(load_f16(scales, (t * n_groups + g) * 32 + r))
                    acc += scale * np.float64(tscales[n, g]) * lookups
                out[n, TILE_M * t + r] = acc


class PairTables(TableSet):
    """Tables for the codebook3 layout (nf3): per activation pair, T_P[e] = cb[e & 7] x_(2P + e // 8). int8 with a
    step per 16 columns, a multiple of the group's finest step (exact=True: fp32, steps of 1)."""

    def __init__(self, k: int, group: int, codebook: np.ndarray, tokens: int = 1, exact: bool = False):
        check_group(k, group)
        if len(codebook) != 8 or k % 16 or group % 16:
            raise LutqError(f"unsupported: pair tables need 8 levels, K and G multiples of 16, got {len(codebook)} "
                            f"levels, K = {k}, G = {group}")
        self.k, self.group, self.exact = k, group, exact
        self.codebook = cb = np.asarray(codebook, np.float32)
        cb16 = cb[np.arange(16) & 7]  # the int8 build's coefficients, once per table set (no allocation per build)
        self.coefs = np.ascontiguousarray([cb16 * FIRST, cb16 * SECOND], np.float32)
        self.cb_peak = np.abs(cb).max()
        self.tables = np.zeros((tokens, k // 2, 16), np.float32 if exact else np.int8)
        self.tscales = np.ones((tokens, k // group), np.float32)  # the exact mode's stay 1
        self.block_steps = np.ones((tokens, k // 16), np.int32)  # and its block steps 1

    def builder(self, x: np.ndarray):
        if self.exact:
            return build_pair_tables_f32, (x, self.codebook, self.tables)
        return build_pair_tables_int8, (x, self.coefs, self.cb_peak, self.group, self.tables, self.tscales,
                                        self.block_steps)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def _check(packed, scales, out, k, group, tokens, tail):
    n_tiles = packed.shape[0]
    m = out.shape[-1]
    if packed.dtype != np.uint8 or packed.shape[2:] != tail:
        raise LutqError(f"packed codes u8{list(packed.shape)} are not in the expected layout (.., {tail})")
    if scales.dtype != np.uint16 or scales.shape != (n_tiles, k // group, TILE_M):
        raise LutqError(f"scales u16{list(scales.shape)} do not match K = {k}, G = {group} (layout.pack_group_scales)")
    if out.dtype != np.float32 or out.shape != (tokens, m) or not n_tiles * TILE_M - TILE_M < m <= n_tiles * TILE_M:
        raise LutqError(f"output {out.dtype}{list(out.shape)} does not fit {n_tiles} tiles of {TILE_M} rows")
    if not (packed.flags.c_contiguous and scales.flags.c_contiguous and out.flags.c_contiguous):
        raise LutqError("packed codes, scales and output must be C-contiguous")


def gemv_nf4(packed, scales, tables: CodebookTables, out, threads: int | None = None, bind: bool = False):
    """nf4 (packed: layout.pack_codebook) or nf2 (packed: layout.pack_codebook_pairs, 4-level tables):
    out[n, m] = sum_k s codebook[q] x; scales: layout.pack_group_scales."""
    if packed.shape[1] * 4 * tables.span != tables.k:
        raise LutqError(f"weights with {packed.shape[1] * 4 * tables.span} columns do not match tables of "
                        f"K = {tables.k}")
    _check(packed, scales, out, tables.k, tables.group, tables.tables.shape[0], (2, TILE_M))
    args = (packed, scales, tables.tables, tables.tscales)
    weights = packed.shape[0] * TILE_M * tables.k * out.shape[0]
    if tables.exact or ISA.name == "portable":
        return run_tiles(_nf4_plain_tiles, _parallel_plain_nf4, args, packed.shape[0], weights, threads, out, bind)
    return run_tiles(_nf4_tiles, _parallel_nf4, (ISA,) + args, packed.shape[0], weights, threads, out, bind)


def gemv_nf3(packed, scales, tables: PairTables, out, threads: int | None = None, bind: bool = False):
    """nf3: out[n, m] = sum_k s codebook[q] x. packed: layout.pack_codebook3; scales: layout.pack_group_scales."""
    if packed.shape[1] * 16 != tables.k:
        raise LutqError(f"weights with {packed.shape[1] * 16} columns do not match tables of K = {tables.k}")
    _check(packed, scales, out, tables.k, tables.group, tables.tables.shape[0], (3, 2 * TILE_M))
    args = (packed, scales, tables.tables, tables.tscales, tables.block_steps)
    weights = packed.shape[0] * TILE_M * tables.k * out.shape[0]
    if tables.exact or ISA.name == "portable":
        return run_tiles(_nf3_plain_tiles, _parallel_plain_nf3, args, packed.shape[0], weights, threads, out, bind)
    return run_tiles(_nf3_tiles, _parallel_nf3, (ISA,) + args, packed.shape[0], weights, threads, out, bind)


# Thread splits (one contiguous run of tiles per thread; a single run is a plain call).


@njit(cache=True, parallel=True)
def _parallel_nf4(isa, packed, scales, tables, tscales, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _nf4_tiles(isa, packed, scales, tables, tscales, c * n // chunks, (c + 1) * n // chunks, out)


@njit(cache=True, parallel=True)
def _parallel_plain_nf4(packed, scales, tables, tscales, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _nf4_plain_tiles(packed, scales, tables, tscales, c * n // chunks, (c + 1) * n // chunks, out)


@njit(cache=True, parallel=True)
def _parallel_nf3(isa, packed, scales, tables, tscales, steps, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _nf3_tiles(isa, packed, scales, tables, tscales, steps, c * n // chunks, (c + 1) * n // chunks, out)


@njit(cache=True, parallel=True)
def _parallel_plain_nf3(packed, scales, tables, tscales, steps, chunks, out):
    n = packed.shape[0]
    for c in prange(chunks):
        _nf3_plain_tiles(packed, scales, tables, tscales, steps, c * n // chunks, (c + 1) * n // chunks, out)
