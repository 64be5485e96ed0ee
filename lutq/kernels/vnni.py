"""The int2 x int8 dot-product kernel (llama.cpp TQ2_0 style): ternary's alternative to the LUT kernel.

Activations are quantized to int8 with one scale per quantization group; 2-bit codes (layout "crumbs") are
multiplied by them with VNNI's vpdpbusd (aarch64: dotprod's sdot; the codes, 0..3, are valid signed bytes too), 4
byte products summed into each int32 lane per instruction:

    per group of G columns:  sum_k W_k x_k  ~=  s * xscale * sum_k q_k xq_k  +  z * S        (S = exact x sum)

Which of this and the LUT kernel is faster depends on the shape; `lutq bench kernels` measures both (ternary and
ternary-vnni) and docs/KERNELS.md records the choice.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from lutq.errors import LutqError
from lutq.kernels.layout import TILE_M
from lutq.kernels.lut import ISA, PREFETCH_BYTES, store_rows, check_group, run_tiles
from lutq.kernels.simd import (
    broadcast4_x64,
    crumbs,
    dpbusd,
    fma_f32,
    i32_pair_to_f32,
    load_f16x32,
    load_i8x64,
    prefetch,
    splat_f32,
    splat_i32x16,
    zeros_f32x32,
)


@njit(cache=True)
def quantize_activations(x, group, xq, xscales, sums):
    """x f32[N, K] -> xq i8[N, K], xscales f32[N, K/G] (value of one step), sums f32[N, K/G] (exact)."""
    n_tok, k = x.shape
    for n in range(n_tok):
        for g in range(k // group):
            peak, total = 0.0, 0.0
            for i in range(g * group, (g + 1) * group):
                peak = max(peak, abs(np.float64(x[n, i])))
                total += x[n, i]
            inv = 127.0 / peak if peak > 0 else 0.0
            xscales[n, g] = peak / 127.0
            sums[n, g] = total
            for i in range(g * group, (g + 1) * group):
                xq[n, i] = np.int8(np.rint(x[n, i] * inv))


class Int8Activations:
    """Up to `tokens` rows of K activations as int8 with one scale per group of G: the VNNI kernel's input."""

    def __init__(self, k: int, group: int, tokens: int = 1):
        check_group(k, group)
        if group % 16:
            raise LutqError(f"unsupported shape: the VNNI kernel needs G a multiple of 16, got {group}")
        self.k, self.group = k, group
        self.xq = np.zeros((tokens, k), np.int8)
        self.xscales = np.zeros((tokens, k // group), np.float32)
        self.sums = np.zeros((tokens, k // group), np.float32)

    def build(self, x: np.ndarray) -> None:
        if x.dtype != np.float32 or x.shape != self.xq.shape:
            raise LutqError(f"activations {x.dtype}{list(x.shape)} do not match f32{list(self.xq.shape)}")
        quantize_activations(x, self.group, self.xq, self.xscales, self.sums)


# Per tile (32 rows) and block b of 16 columns, 128 bytes (layout.py "crumbs"):
#
#   bytes   0..63: rows  0-15, 4 bytes each      byte j of row r, crumb c = code of column 16b + 4c + j
#   bytes 64..127: rows 16-31
#
#   for c in 0..3:  acc_rows0_15  += vpdpbusd((bytes >> 2c) & 3, broadcast(xq[16b + 4c : +4]))   (NEON: 4 sdot)
#                   acc_rows16_31 += the same on the second 64 bytes
#   every G columns: rows_f32 += s * xscale * acc + z * S


@njit(cache=True, inline="always")
def _vnni_group(isa, packed, params, xq, xscales, sums, t, n, g, y):
    n_blocks = packed.shape[1]
    k = 16 * n_blocks
    n_groups = xscales.shape[1]
    blocks_per_group = n_blocks // n_groups
    acc_lo = splat_i32x16(0)
    acc_hi = splat_i32x16(0)
    for b in range(g * blocks_per_group, (g + 1) * blocks_per_group):
        off = (t * n_blocks + b) * 128
        prefetch(packed, off + PREFETCH_BYTES)
        prefetch(packed, off + PREFETCH_BYTES + 64)
        w_lo = load_i8x64(packed, off)
        w_hi = load_i8x64(packed, off + 64)
        for c in range(4):
            xb = broadcast4_x64(xq, n * k + 16 * b + 4 * c)
            acc_lo = dpbusd(isa, acc_lo, crumbs(w_lo, c), xb)
            acc_hi = dpbusd(isa, acc_hi, crumbs(w_hi, c), xb)
    dots = i32_pair_to_f32(acc_lo, acc_hi)
    poff = (t * n_groups + g) * 64
    scaled = fma_f32(load_f16x32(params, poff), splat_f32(xscales[n, g]), splat_f32(0.0))
    y = fma_f32(scaled, dots, y)
    return fma_f32(load_f16x32(params, poff + 32), splat_f32(sums[n, g]), y)


@njit(cache=True)
def _vnni_tiles(isa, packed, params, xq, xscales, sums, t0, t1, out):
    """Two tiles advance together, as in lut._simd_tiles (two DRAM streams)."""
    n_tok = out.shape[0]
    n_groups = xscales.shape[1]
    mid = (t1 - t0) // 2
    for t in range(t0, t0 + mid):
        for n in range(n_tok):
            ya = zeros_f32x32()
            yb = zeros_f32x32()
            for g in range(n_groups):
                ya = _vnni_group(isa, packed, params, xq, xscales, sums, t, n, g, ya)
                yb = _vnni_group(isa, packed, params, xq, xscales, sums, t + mid, n, g, yb)
            store_rows(out, n, t, ya)
            store_rows(out, n, t + mid, yb)
    for t in range(t0 + 2 * mid, t1):
        for n in range(n_tok):
            y = zeros_f32x32()
            for g in range(n_groups):
                y = _vnni_group(isa, packed, params, xq, xscales, sums, t, n, g, y)
            store_rows(out, n, t, y)


@njit(cache=True, parallel=True)
def _vnni_parallel(isa, packed, params, xq, xscales, sums, chunks, out):
    n_tiles = packed.shape[0]
    for c in prange(chunks):
        _vnni_tiles(isa, packed, params, xq, xscales, sums, c * n_tiles // chunks, (c + 1) * n_tiles // chunks, out)


def available() -> bool:
    """The dot-product instruction is there: VNNI on x86, dotprod (sdot) on aarch64. Without it ternary stays on the
    LUT kernel, which is the default everywhere anyway."""
    return ISA.dot


def gemv_crumbs(packed, params, acts: Int8Activations, out, threads: int | None = None) -> None:
    """out[n, m] = sum_k W[m, k] x[n, k] for 2-bit codes in layout.pack_crumbs (int2, ternary as q = t + 1)."""
    if not ISA.dot:
        raise LutqError(f"the dot-product kernel needs AVX512-VNNI, AVX-VNNI or ARMv8.2 dotprod; this CPU has "
                        f"{ISA.name} without it")
    n_tiles, n_blocks = packed.shape[:2]
    if packed.dtype != np.uint8 or packed.shape[2:] != (TILE_M, 4) or 16 * n_blocks != acts.k:
        raise LutqError(f"packed codes u8{list(packed.shape)} are not 2-bit crumbs of K = {acts.k}")
    if params.dtype != np.uint16 or params.shape != (n_tiles, acts.k // acts.group, 2, TILE_M):
        raise LutqError(f"params u16{list(params.shape)} do not match K = {acts.k}, G = {acts.group}")
    m = out.shape[-1]
    if out.dtype != np.float32 or out.shape != (acts.xq.shape[0], m) or not n_tiles * TILE_M - TILE_M < m \
            <= n_tiles * TILE_M:
        raise LutqError(f"output {out.dtype}{list(out.shape)} does not fit {n_tiles} tiles of {TILE_M} rows")
    if not (packed.flags.c_contiguous and params.flags.c_contiguous and out.flags.c_contiguous):
        raise LutqError("packed codes, params and output must be C-contiguous")
    run_tiles(_vnni_tiles, _vnni_parallel, (ISA, packed, params, acts.xq, acts.xscales, acts.sums), n_tiles,
              n_tiles * TILE_M * acts.k * out.shape[0], threads, out)
