"""LUT GEMV/GEMM on bit-serial packed weights (int2 to int6, ternary): tables of activation sums, byte shuffles.

The math (T-MAC). Activations go in groups of g = 4; each group gets a 16-entry table

    T[j] = sum_k (bit k of j ? +x_k : -x_k),      T[15 - j] = -T[j]   (only 8 entries are computed)

so that for one bit-plane of 4 weights, sum_k bit_k x_k = (T[nibble] + S4) / 2 with S4 = sum_k x_k. With codes
q = sum_b 2^b bit_b and W = s q + z per quantization group of G columns:

    sum_k W_k x_k = s * (1/2 * sum_b 2^b sum_groups T_b  +  (2^B - 1)/2 * S)  +  z * S      (S = the group's x sum)

Tables are quantized to int8 with one scale per quantization group (the span of one int16 accumulation), so the
inner loop is integer: per 64 packed bytes, two pshufb (32 rows x 2 planes, low and high nibble groups) and two
pmaddubsw against (1, 2) that weight the plane pair and widen to int16, 32 rows in row order (NEON: eight tbl, and
per 16 bytes a sadalp + ssra). Every G columns the int16 sums go to f32, scaled by the table scale and the rows'
fp16 scales and biases.

Two kernels read the same layout: the SIMD one (int8 tables, the Isa witness picks AVX-512, AVX2 or NEON code), and
a plain numba one used with fp32 tables as the exact mode (tests, 1e-5) and with int8 tables on CPUs without SIMD.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from lutq.errors import LutqError
from lutq.kernels.layout import K_MULTIPLE, TILE_M
from lutq.kernels.simd import (
    broadcast16_x32,
    broadcast16_x64,
    fma_f32,
    high_nibbles,
    isa_for_host,
    i16_to_f32,
    lane_f32,
    load_f16,
    load_f16x32,
    load_i8x32,
    load_i8x64,
    low_nibbles,
    prefetch,
    shuffle_bytes,
    splat_f32,
    splat_i16x32,
    store_f32x32,
    vadd,
    weigh_pairs,
    widen_i8_i16,
    zeros_f32x32,
)

TABLE_MAX = 127  # int8 table entries lie in [-127, 127]: symmetric, so T[15 - j] = -T[j] survives quantization
MAX_GROUP = 256  # int16 accumulation over one group: G/8 pairs x 2 x 381 must stay below 32767
PREFETCH_BYTES = 2048  # how far ahead of a tile stream to prefetch (measured: 1-4 KB alike, 256 B 20% slower)


# ---------------------------------------------------------------------------------------------------------------------
# Tables


@njit(cache=True, inline="always")
def _group_table(x, n, k0, out):
    """out[0:8] = T[0:8] of the 4 activations x[n, k0:k0+4], in float64 (bit 3 clear: -x3)."""
    x0, x1, x2, x3 = np.float64(x[n, k0]), np.float64(x[n, k0 + 1]), np.float64(x[n, k0 + 2]), np.float64(x[n, k0 + 3])
    base = -x0 - x1 - x2 - x3
    for j in range(8):
        out[j] = base + 2.0 * (x0 * (j & 1) + x1 * ((j >> 1) & 1) + x2 * ((j >> 2) & 1))


# SIGNS[b, e] = +1 where bit b of entry e is set: row e of a table is SIGNS[:, e] . (x0, x1, x2, x3).
SIGNS = np.array([[1.0 if (e >> b) & 1 else -1.0 for e in range(16)] for b in range(4)], np.float32)


@njit(cache=True)
def build_tables_int8(x, group, tables, tscales, sums):
    """x: f32[N, K] -> tables i8[N, K/4, 16], tscales f32[N, K/G] (value of one table step), sums f32[N, K/G].

    All 16 entries of a table in one expression with constant signs: LLVM turns the loop over e into a few
    16-wide vector instructions and one 16-byte store (2.5x faster than 8 scalar entries and their mirrors, which
    decode pays four times a layer). Entry 15 - e has every sign flipped, and IEEE rounding and rint are symmetric,
    so T[15 - e] = -T[e] holds exactly without mirroring."""
    n_tok, k = x.shape
    for n in range(n_tok):
        for g in range(k // group):
            peak, total = np.float32(0.0), np.float32(0.0)
            for j in range(g * group // 4, (g + 1) * group // 4):  # the largest entry of a table is sum |x_k|
                x0, x1, x2, x3 = x[n, 4 * j], x[n, 4 * j + 1], x[n, 4 * j + 2], x[n, 4 * j + 3]
                total += (x0 + x1) + (x2 + x3)
                peak = max(peak, (abs(x0) + abs(x1)) + (abs(x2) + abs(x3)))
            inv = np.float32(TABLE_MAX) / peak if peak > 0 else np.float32(0.0)
            tscales[n, g] = peak / np.float32(TABLE_MAX)
            sums[n, g] = total
            for j in range(g * group // 4, (g + 1) * group // 4):
                y0, y1, y2, y3 = x[n, 4 * j] * inv, x[n, 4 * j + 1] * inv, x[n, 4 * j + 2] * inv, x[n, 4 * j + 3] * inv
                for e in range(16):
                    v = (y0 * SIGNS[0, e] + y1 * SIGNS[1, e]) + (y2 * SIGNS[2, e] + y3 * SIGNS[3, e])
                    tables[n, j, e] = np.int8(np.rint(v))


@njit(cache=True)
def build_tables_f32(x, group, tables, tscales, sums):
    """The exact mode's tables: f32[N, K/4, 16], tscales all 1."""
    half = np.empty(8, np.float64)
    n_tok, k = x.shape
    for n in range(n_tok):
        for g in range(k // group):
            total = 0.0
            for i in range(g * group, (g + 1) * group):
                total += x[n, i]
            sums[n, g] = total
            tscales[n, g] = 1.0
        for j in range(k // 4):
            _group_table(x, n, 4 * j, half)
            for e in range(8):
                tables[n, j, e] = half[e]
                tables[n, j, 15 - e] = -half[e]


# ---------------------------------------------------------------------------------------------------------------------
# SIMD kernel
#
# One tile = 32 rows. Per pair p of activation groups, the tile's block of bits x 32 bytes (layout.py):
#
#   int2:  [ r0b0 r0b1 r1b0 r1b1 ... r31b1 ]                      one 64-byte plane pair
#   int4:  [ r0b0 r0b1 ... r31b1 ][ r0b2 r0b3 ... r31b3 ]         two plane pairs
#   int3:  [ r0b0 r0b1 ... r31b1 ][ r0b2 ... r31b2 ]              a plane pair and a lone 32-byte plane
#   int5, int6: int4's two pairs, then a lone plane 4 (int5) or a third pair of planes 4 and 5 (int6)
#
#   each byte: low nibble -> T[2p] index, high nibble -> T[2p+1] index
#   pshufb(T[2p] in every lane, low nibbles) . (1,2)  -> int16 per row: T[lo, b0] + 2 T[lo, b1]   (pmaddubsw)
#   pshufb(T[2p+1] ..., high nibbles) . (1,2)         -> the same for the high group; both added to acc0
#   the lone plane: two 32-byte pshufb, widened to int16 (vpmovsxbw), into acc1
#   every G columns: rows_f32 += s * (tscale/2 * (acc0 + 4 acc1 + 16 acc2) + (2^B-1)/2 * S) + z * S
#
#   NEON, per 16 of the 64 bytes (8 rows x 2 planes):  tbl(T, nibbles) -> L = [r b0, r b1, ...]
#       acc += pairwise(L)             sadalp: r b0 + r b1, widened into the int16 row
#       acc += L as int16 >> 8         ssra:   + r b1 again (the odd byte, sign-extended)


@njit(cache=True, inline="always")
def _plane_pair(isa, packed, off, lo_table, hi_table, acc):
    """acc + one 64-byte plane pair of 32 rows: T[lo nibble, b] + 2 T[lo, b+1] + the same for the high nibbles."""
    w = load_i8x64(packed, off)
    acc = vadd(acc, weigh_pairs(isa, shuffle_bytes(isa, lo_table, low_nibbles(w)), 1, 2))
    return vadd(acc, weigh_pairs(isa, shuffle_bytes(isa, hi_table, high_nibbles(w)), 1, 2))


@njit(cache=True, inline="always")
def _lone_plane(isa, packed, off, tables, toff, acc):
    """acc + an odd last 32-byte plane of 32 rows, looked up in 32-byte halves and widened to int16."""
    w = load_i8x32(packed, off)
    lo = shuffle_bytes(isa, broadcast16_x32(tables, toff), low_nibbles(w))
    hi = shuffle_bytes(isa, broadcast16_x32(tables, toff + 16), high_nibbles(w))
    return vadd(acc, vadd(widen_i8_i16(lo), widen_i8_i16(hi)))


@njit(cache=True, inline="always")
def _simd_group(isa, packed, params, tables, tscales, sums, bits, t, n, g, y):
    """y + tile t's rows' sum over quantization group g for token n."""
    n_pairs = packed.shape[1]
    n_groups = tscales.shape[1]
    pairs_per_group = n_pairs // n_groups
    block = bits * 32
    acc0 = splat_i16x32(0)  # planes 0-1; then 2-3 (or the lone plane 2); then 4-5 (or 4): int16 sums of each
    acc1 = splat_i16x32(0)
    acc2 = splat_i16x32(0)
    for p in range(g * pairs_per_group, (g + 1) * pairs_per_group):
        off = (t * n_pairs + p) * block
        prefetch(packed, off + PREFETCH_BYTES)
        toff = (n * n_pairs + p) * 32
        lo_table = broadcast16_x64(tables, toff)
        hi_table = broadcast16_x64(tables, toff + 16)
        acc0 = _plane_pair(isa, packed, off, lo_table, hi_table, acc0)
        if bits >= 4:
            prefetch(packed, off + PREFETCH_BYTES + 64)
            acc1 = _plane_pair(isa, packed, off + 64, lo_table, hi_table, acc1)
        elif bits == 3:
            prefetch(packed, off + PREFETCH_BYTES + 64)
            acc1 = _lone_plane(isa, packed, off + 64, tables, toff, acc1)
        if bits >= 6:  # int6 (lm_head's default): a third plane pair, weight 16
            prefetch(packed, off + PREFETCH_BYTES + 128)
            acc2 = _plane_pair(isa, packed, off + 128, lo_table, hi_table, acc2)
        elif bits == 5:
            prefetch(packed, off + PREFETCH_BYTES + 128)
            acc2 = _lone_plane(isa, packed, off + 128, tables, toff, acc2)
    lookups = i16_to_f32(acc0)
    if bits > 2:
        lookups = fma_f32(i16_to_f32(acc1), splat_f32(4.0), lookups)
    if bits > 4:
        lookups = fma_f32(i16_to_f32(acc2), splat_f32(16.0), lookups)
    s_x = sums[n, g]
    inner = fma_f32(lookups, splat_f32(0.5 * tscales[n, g]), splat_f32(((1 << bits) - 1) * 0.5 * s_x))
    poff = (t * n_groups + g) * 64
    y = fma_f32(load_f16x32(params, poff), inner, y)
    return fma_f32(load_f16x32(params, poff + 32), splat_f32(s_x), y)


@njit(cache=True)
def _simd_tiles(isa, packed, params, tables, tscales, sums, bits, t0, t1, out):
    """Rows of tiles t0..t1 for every token. packed u8[T, K/8, bits, 32], params u16[T, K/G, 2, 32], out f32[N, M].

    Two tiles, one from each half of the range, advance group by group together: two sequential streams keep more
    DRAM requests in flight than one."""
    n_tok = out.shape[0]
    n_groups = tscales.shape[1]
    mid = (t1 - t0) // 2
    for t in range(t0, t0 + mid):
        for n in range(n_tok):
            ya = zeros_f32x32()
            yb = zeros_f32x32()
            for g in range(n_groups):
                ya = _simd_group(isa, packed, params, tables, tscales, sums, bits, t, n, g, ya)
                yb = _simd_group(isa, packed, params, tables, tscales, sums, bits, t + mid, n, g, yb)
            store_rows(out, n, t, ya)
            store_rows(out, n, t + mid, yb)
    for t in range(t0 + 2 * mid, t1):
        for n in range(n_tok):
            y = zeros_f32x32()
            for g in range(n_groups):
                y = _simd_group(isa, packed, params, tables, tscales, sums, bits, t, n, g, y)
            store_rows(out, n, t, y)


@njit(cache=True, inline="always")
def store_rows(out, n, t, y):
    """The 32 rows of tile t into out[n]; the last tile may hold fewer real rows."""
    m = out.shape[1]
    if TILE_M * (t + 1) <= m:
        store_f32x32(out, n * m + TILE_M * t, y)
    else:
        for r in range(m - TILE_M * t):
            out[n, TILE_M * t + r] = lane_f32(y, r)


# ---------------------------------------------------------------------------------------------------------------------
# Plain kernel: the same layout read byte by byte. Exact with fp32 tables (accumulates in float64).


@njit(cache=True, inline="always")
def plane_byte(b, r, bits):
    """Offset of row r's plane-b byte in a bitserial block: plane pairs row-interleaved, an odd last plane alone."""
    return 64 * (b // 2) + 2 * r + (b & 1) if b < bits - bits % 2 else 64 * (b // 2) + r


@njit(cache=True)
def _plain_tiles(packed, params, tables, tscales, sums, bits, t0, t1, out):
    n_tok, m = out.shape
    n_pairs = packed.shape[1]
    n_groups = tscales.shape[1]
    pairs_per_group = n_pairs // n_groups
    flat = packed.reshape(packed.shape[0], n_pairs, bits * 32)
    half_levels = ((1 << bits) - 1) * 0.5
    acc = np.empty(TILE_M, np.float64)
    for t in range(t0, t1):
        for n in range(n_tok):
            for r in range(TILE_M):
                acc[r] = 0.0
            for g in range(n_groups):
                s_x = np.float64(sums[n, g])
                ts = 0.5 * np.float64(tscales[n, g])
                poff = (t * n_groups + g) * 64
                for r in range(TILE_M):
                    lookups = 0.0
                    for p in range(g * pairs_per_group, (g + 1) * pairs_per_group):
                        for b in range(bits):
                            byte = flat[t, p, plane_byte(b, r, bits)]
                            lookups += (1 << b) * (np.float64(tables[n, 2 * p, byte & 15]) +
                                                   np.float64(tables[n, 2 * p + 1, byte >> 4]))
                    s = np.float64(load_f16(params, poff + r))
                    z = np.float64(load_f16(params, poff + 32 + r))
                    acc[r] += s * (ts * lookups + half_levels * s_x) + z * s_x
            for r in range(min(TILE_M, m - TILE_M * t)):
                out[n, TILE_M * t + r] = acc[r]


# ---------------------------------------------------------------------------------------------------------------------
# Threading: tiles split into contiguous runs, one per thread (each thread streams its own part of the weights).


@njit(cache=True, parallel=True)
def _simd_parallel(isa, packed, params, tables, tscales, sums, bits, chunks, out):
    n_tiles = packed.shape[0]
    for c in prange(chunks):
        _simd_tiles(isa, packed, params, tables, tscales, sums, bits, c * n_tiles // chunks,
                    (c + 1) * n_tiles // chunks, out)


@njit(cache=True, parallel=True)
def _plain_parallel(packed, params, tables, tscales, sums, bits, chunks, out):
    n_tiles = packed.shape[0]
    for c in prange(chunks):
        _plain_tiles(packed, params, tables, tscales, sums, bits, c * n_tiles // chunks, (c + 1) * n_tiles // chunks,
                     out)


# ---------------------------------------------------------------------------------------------------------------------
# Dequantization (prefill's BLAS path, and the baseline the benchmark compares against)


@njit(cache=True)
def _dequant_tiles(packed, params, bits, t0, t1, out):
    """Tiles t0..t1 as f32 rows: out[32 (t - t0) + r, k] = s q + z (out: f32[>= 32 (t1 - t0), K])."""
    n_pairs = packed.shape[1]
    n_groups = params.shape[1]
    group = 8 * n_pairs // n_groups
    flat = packed.reshape(packed.shape[0], n_pairs, bits * 32)
    q = np.empty((TILE_M, 8), np.int32)
    for t in range(t0, t1):
        for p in range(n_pairs):
            q[:] = 0
            for b in range(bits):
                for r in range(TILE_M):
                    byte = np.int32(flat[t, p, plane_byte(b, r, bits)])
                    for c in range(8):
                        q[r, c] |= ((byte >> c) & 1) << b
            poff = (t * n_groups + 8 * p // group) * 64
            for r in range(TILE_M):
                s, z = load_f16(params, poff + r), load_f16(params, poff + 32 + r)
                for c in range(8):
                    out[TILE_M * (t - t0) + r, 8 * p + c] = s * q[r, c] + z


@njit(cache=True, parallel=True, fastmath=True)
def dequant_gemv(packed, params, bits, x, chunks, out):
    """The plain alternative: dequantize a tile to f32 (L2-resident), then dot it with x (vectorised). out f32[M]."""
    n_tiles = packed.shape[0]
    m = out.shape[0]
    for c in prange(chunks):
        w = np.empty((TILE_M, x.shape[0]), np.float32)
        for t in range(c * n_tiles // chunks, (c + 1) * n_tiles // chunks):
            _dequant_tiles(packed, params, bits, t, t + 1, w)
            for r in range(min(TILE_M, m - TILE_M * t)):
                acc = np.float32(0.0)
                for i in range(x.shape[0]):
                    acc += w[r, i] * x[i]
                out[TILE_M * t + r] = acc


# ---------------------------------------------------------------------------------------------------------------------
# Entry points: checked shapes, ISA and thread dispatch. Outputs and tables are preallocated by the caller.

ISA = isa_for_host()
# Threading layer: numba's default (OpenMP here). Measured on the idle 2-core machine, TinyLlama-1.1B int2 decode on
# 2 threads: OpenMP 19.3 ms/token, workqueue 35 ms (slower than 1 thread's 30 ms: ~150 us per parallel launch).
# OpenMP's spinning workers collapse when another process holds a core (~8 ms per call measured under load), where
# workqueue degrades gracefully: NUMBA_THREADING_LAYER=workqueue, or --threads 1, is the choice on a busy machine.
PARALLEL_MIN_WEIGHTS = 1 << 19  # below ~0.5M weights per call, waking a second thread costs more than it gives


def current_threads() -> int:
    """numba.get_num_threads(), without its per-call thread-pool launch check once the pool is up (0.1 instead of
    0.7 us: the decode step asks on every kernel call, 121 times a SmolLM2 token)."""
    fast = getattr(numba.np.ufunc.parallel, "_get_num_threads", None)
    n = fast() if fast is not None else 0
    return n if n > 0 else numba.get_num_threads()


def check_group(k: int, group: int) -> None:
    if k % K_MULTIPLE or group % K_MULTIPLE or k % group or not 0 < group <= MAX_GROUP:
        raise LutqError(f"unsupported shape: K = {k}, group size {group} (need K % G == 0, G a multiple of 8, "
                        f"G <= {MAX_GROUP})")


class TableSet:
    """What every kind of activation tables offers: build(x) for one input, and bind(x) for an input buffer that is
    rewritten in place token after token (the decode step): checked once, then the compiled builder called directly.
    Subclasses say which builder runs on which arrays (`builder`)."""

    k: int
    tables: np.ndarray

    def builder(self, x: np.ndarray):
        """(compiled function, its arguments) that fill these tables from x."""
        raise NotImplementedError

    def check(self, x: np.ndarray) -> None:
        if x.dtype != np.float32 or x.shape != (self.tables.shape[0], self.k):
            raise LutqError(f"activations {x.dtype}{list(x.shape)} do not match tables for "
                            f"f32[{self.tables.shape[0]}, {self.k}]")

    def build(self, x: np.ndarray) -> None:
        """x: f32[tokens, K]."""
        self.check(x)
        fn, args = self.builder(x)
        fn(*args)

    def bind(self, x: np.ndarray):
        """build(x) now, and a call() that builds again from x's current contents."""
        self.check(x)
        fn, args = self.builder(x)
        fn(*args)
        return functools.partial(compiled(fn, args), *args)


class Tables(TableSet):
    """Activation tables of up to `tokens` rows of K activations for group size G: built once per input vector,
    shared by every layer that reads it (q/k/v, gate/up). exact=True keeps fp32 tables (slow, exact to 1e-5)."""

    def __init__(self, k: int, group: int, tokens: int = 1, exact: bool = False):
        check_group(k, group)
        self.k, self.group, self.exact = k, group, exact
        self.tables = np.zeros((tokens, k // 4, 16), np.float32 if exact else np.int8)
        self.tscales = np.zeros((tokens, k // group), np.float32)
        self.sums = np.zeros((tokens, k // group), np.float32)

    def builder(self, x: np.ndarray):
        build = build_tables_f32 if self.exact else build_tables_int8
        return build, (x, self.group, self.tables, self.tscales, self.sums)


def _check_bitserial(packed, params, bits, tables: Tables, out):
    n_tiles, n_pairs = packed.shape[:2]
    m = out.shape[-1]
    if bits not in (2, 3, 4, 5, 6) or packed.dtype != np.uint8 or packed.shape[2:] != (bits, TILE_M):
        raise LutqError(f"packed codes u8{list(packed.shape)} are not a bitserial layout of {bits} bits")
    if 8 * n_pairs != tables.k or params.shape != (n_tiles, tables.k // tables.group, 2, TILE_M) \
            or params.dtype != np.uint16:
        raise LutqError(f"weights ({8 * n_pairs} columns, params u16{list(params.shape)}) do not match tables of "
                        f"K = {tables.k}, G = {tables.group}")
    if out.dtype != np.float32 or out.shape != (tables.tables.shape[0], m) or not n_tiles * TILE_M - TILE_M < m \
            <= n_tiles * TILE_M:
        raise LutqError(f"output {out.dtype}{list(out.shape)} does not fit {n_tiles} tiles of {TILE_M} rows")
    if not (packed.flags.c_contiguous and params.flags.c_contiguous and out.flags.c_contiguous):
        raise LutqError("packed codes, params and output must be C-contiguous")


def run_tiles(serial, parallel, args, n_tiles: int, weights: int, threads: int | None, out, bind: bool = False):
    """serial(*args, t0, t1, out) over all tiles on this thread, or parallel(*args, chunks, out) over `threads`
    contiguous runs of tiles; small problems (`weights` multiply-adds) stay on one thread.

    bind=True runs once and returns call(out) for later runs with the same arguments but the output: the compiled
    function itself, which skips numba's per-call argument typing (about 4 us of a 576 x 576 decode GEMV's 7) and the
    caller's shape checks. The decode step uses it: its table buffers and weights stay put from token to token."""
    threads = current_threads() if threads is None else threads
    if threads == 1 or weights < PARALLEL_MIN_WEIGHTS:
        fn, prefix = serial, (*args, 0, n_tiles)
    else:
        fn, prefix = parallel, (*args, threads)
    fn(*prefix, out)
    if bind:
        return functools.partial(compiled(fn, (*prefix, out)), *prefix)
    return None


def compiled(dispatcher, args):
    """The compiled entry point of `dispatcher` for these arguments' types, compiled (or loaded from the cache) now
    if it does not exist yet: calling it skips numba's per-call argument typing."""
    sig = tuple(dispatcher.typeof_pyval(a) for a in args)
    cres = dispatcher.overloads.get(sig)
    if cres is None:
        dispatcher.compile(sig)
        cres = dispatcher.overloads.get(sig)
    return dispatcher if cres is None else cres.entry_point


def gemv_bitserial(packed, params, bits: int, tables: Tables, out, threads: int | None = None, bind: bool = False):
    """out[n, m] = sum_k W[m, k] x[n, k] for the tokens whose tables were built. With one token this is the decode
    GEMV; with N it is prefill's GEMM: each tile's weights come from memory once and serve all N tokens from cache
    (measured faster than dequantizing and calling BLAS up to N = 256, the largest tried; docs/KERNELS.md).
    packed: layout.pack_bitserial; params: layout.pack_group_params; out: f32[N, M], written. bind: see run_tiles."""
    _check_bitserial(packed, params, bits, tables, out)
    args = (packed, params, tables.tables, tables.tscales, tables.sums, bits)
    weights = packed.shape[0] * TILE_M * tables.k * out.shape[0]
    if tables.exact or ISA.name == "portable":
        return run_tiles(_plain_tiles, _plain_parallel, args, packed.shape[0], weights, threads, out, bind)
    return run_tiles(_simd_tiles, _simd_parallel, (ISA,) + args, packed.shape[0], weights, threads, out, bind)
