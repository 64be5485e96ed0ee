"""`lutq bench kernels`: GEMV speed of every format's LUT kernel against numpy's fp32 GEMV and a numba
dequantize-then-dot kernel, measured as ratios inside one process.

The machine is shared and noisy, so nothing here is an absolute claim on its own: the three contenders run
interleaved (one call each, in turn, repeated), each figure is a median, and the speedups compare medians taken
over the same stretch of time. Weights are cold, as in decode, where every layer's weights come from DRAM: each
contender cycles through copies of its weights totalling more than COLD_BYTES, so no call finds its weights cached.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from lutq.errors import LutqError
from lutq.kernels import codebook, fineq, lut, vnni
from lutq.kernels.layout import (pack_bitserial, pack_codebook, pack_codebook3, pack_codebook_pairs, pack_crumbs,
                                 pack_group_params,
                                 pack_group_scales)

SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (5632, 2048), (4096, 4096)]
COLD_BYTES = 192 << 20  # more than the last-level cache: every call streams its weights from DRAM
MIN_CALLS = 15
MAX_COPIES = 2048
BURST_SECONDS = 0.02
BURST_SETTLE = 0.003


@dataclass
class Contender:
    """One way of computing y = W x on one shape: its weight copies and how to run on copy i."""

    run: Callable[[int], None]
    copies: int
    nbytes: int  # bytes of weights one call streams


def blas_threads():
    """A setter for numpy's OpenBLAS thread count, or None when this numpy's BLAS cannot be reached."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


def copies_for(nbytes: int) -> int:
    """Copies of a weight that together exceed COLD_BYTES; capped, so tiny shapes (which no decode streams from
    DRAM anyway) stay quick."""
    return min(MAX_COPIES, max(2, -(-COLD_BYTES // nbytes)))


# ---------------------------------------------------------------------------------------------------------------------
# Formats: random codes and scales of the right kind, packed as the quantizers pack them.


def uniform_weights(rng, m, k, group, bits, ternary=False):
    q = rng.integers(0, 3 if ternary else 1 << bits, (m, k)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (m, k // group)).astype(np.float32)
    z = -s if ternary else rng.uniform(-0.2, 0.2, (m, k // group)).astype(np.float32)
    return pack_bitserial(q, bits), pack_group_params(s, z)


def bitserial_contenders(rng, m, k, group, bits, ternary, x, tables):
    packed, params = uniform_weights(rng, m, k, group, bits, ternary)
    n = copies_for(packed.nbytes + params.nbytes)
    weights = [(packed.copy(), params.copy()) for _ in range(n)]
    out, out1 = np.zeros((1, m), np.float32), np.zeros(m, np.float32)

    def run_lut(i):
        tables.build(x)
        lut.gemv_bitserial(*weights[i % n], bits, tables, out)

    def run_dequant(i):
        lut.dequant_gemv(*weights[i % n], bits, x[0], numba.get_num_threads(), out1)

    nbytes = packed.nbytes + params.nbytes
    return Contender(run_lut, n, nbytes), Contender(run_dequant, n, nbytes), packed.nbytes


def vnni_contenders(rng, m, k, group, x, tables):
    """Ternary on the int8 dot-product kernel; its dequantize baseline is the bitserial one (same codes)."""
    q = rng.integers(0, 3, (m, k)).astype(np.uint8)
    s = rng.uniform(0.01, 0.1, (m, k // group)).astype(np.float32)
    packed, params = pack_crumbs(q), pack_group_params(s, -s)
    n = copies_for(packed.nbytes + params.nbytes)
    weights = [(packed.copy(), params.copy()) for _ in range(n)]
    acts = vnni.Int8Activations(k, group)
    out = np.zeros((1, m), np.float32)

    def run_vnni(i):
        acts.build(x)
        vnni.gemv_crumbs(*weights[i % n], acts, out)

    _, dequant, _ = bitserial_contenders(rng, m, k, group, 2, True, x, tables)
    return Contender(run_vnni, n, packed.nbytes + params.nbytes), dequant, packed.nbytes


def nf_contenders(rng, m, k, group, bits, x, tables):
    """nf3 on codebook3 codes with a table per activation pair; nf4 (nf2) on nibble codes with a table per activation
    (activation pair). Random sorted levels: the speed does not depend on them, and lutq.kernels imports nothing
    from quantize. The dequantize baseline is the uniform one of the same bits (same decode work, an affine map
    instead of a codebook lookup)."""
    cb = np.sort(rng.uniform(-1, 1, 1 << bits)).astype(np.float32)  # speed does not depend on the levels
    q = rng.integers(0, 1 << bits, (m, k)).astype(np.uint8)
    packed = {2: pack_codebook_pairs, 3: pack_codebook3, 4: pack_codebook}[bits](q)
    scales = pack_group_scales(rng.uniform(0.01, 0.1, (m, k // group)).astype(np.float32))
    n = copies_for(packed.nbytes + scales.nbytes)
    weights = [(packed.copy(), scales.copy()) for _ in range(n)]
    out = np.zeros((1, m), np.float32)
    if bits != 3:
        cb_tables = codebook.CodebookTables(k, group, cb)

        def run_nf(i):
            cb_tables.build(x)
            codebook.gemv_nf4(*weights[i % n], cb_tables, out)
    else:
        pair_tables = codebook.PairTables(k, group, cb)

        def run_nf(i):
            pair_tables.build(x)
            codebook.gemv_nf3(*weights[i % n], pair_tables, out)

    _, dequant, _ = bitserial_contenders(rng, m, k, group, bits, False, x, tables)
    return Contender(run_nf, n, packed.nbytes + scales.nbytes), dequant, packed.nbytes


def fineq_contenders(rng, m, k, group, x, tables):
    """fineq: random cluster bytes (any byte is a valid cluster), fp16 scales."""
    packed = rng.integers(0, 256, (-(-m // 32), -(-k // 3), 32)).astype(np.uint8)
    scales = pack_group_scales(rng.uniform(0.01, 0.1, (m, k // group)).astype(np.float32))
    n = copies_for(packed.nbytes + scales.nbytes)
    weights = [(packed.copy(), scales.copy()) for _ in range(n)]
    cluster_tables = fineq.ClusterTables(k, group)
    values = fineq.byte_values()
    out, out1 = np.zeros((1, m), np.float32), np.zeros(m, np.float32)

    def run_fineq(i):
        cluster_tables.build(x)
        fineq.gemv_fineq(*weights[i % n], cluster_tables, out)

    def run_dequant(i):
        fineq.dequant_gemv(*weights[i % n], values, group, x[0], numba.get_num_threads(), out1)

    nbytes = packed.nbytes + scales.nbytes
    return Contender(run_fineq, n, nbytes), Contender(run_dequant, n, nbytes), packed.nbytes


FORMATS = {  # name -> (bits per code, contenders(rng, m, k, group, x, tables))
    "int2": (2, lambda *a: bitserial_contenders(*a[:4], 2, False, *a[4:])),
    "int3": (3, lambda *a: bitserial_contenders(*a[:4], 3, False, *a[4:])),
    "int4": (4, lambda *a: bitserial_contenders(*a[:4], 4, False, *a[4:])),
    "ternary": (1.58, lambda *a: bitserial_contenders(*a[:4], 2, True, *a[4:])),
    "nf2": (2, lambda *a: nf_contenders(*a[:4], 2, *a[4:])),
    "nf3": (3, lambda *a: nf_contenders(*a[:4], 3, *a[4:])),
    "nf4": (4, lambda *a: nf_contenders(*a[:4], 4, *a[4:])),
    "fineq": (8 / 3, fineq_contenders),
}
if vnni.available():
    FORMATS["ternary-vnni"] = (1.58, vnni_contenders)


# ---------------------------------------------------------------------------------------------------------------------


def measure(contenders: list[Contender], calls: int) -> list[float]:
    """Median seconds per call of each contender, run interleaved in bursts: a a a, b b b, c c c, a a a, ...

    Bursts, not single calls, because the contenders own different thread pools (numba's, OpenBLAS's) whose idle
    threads spin for a while after a call and would steal the cores of the next contender's first calls; the
    first BURST_SETTLE seconds of every burst are run but not counted.
    """
    for c in contenders:  # compile, warm the code paths
        c.run(0)
    times = [[] for _ in contenders]
    done = [0] * len(contenders)
    while min(len(t) for t in times) < calls:
        for j, (c, t) in enumerate(zip(contenders, times)):
            burst_start, kept = time.perf_counter(), 0
            while True:
                start = time.perf_counter()
                done[j] += 1
                c.run(done[j])
                end = time.perf_counter()
                if start - burst_start >= BURST_SETTLE:
                    t.append(end - start)
                    kept += 1
                if end - burst_start >= BURST_SECONDS and kept:
                    break
    return [float(np.median(t)) for t in times]


def run(shapes, formats, threads_list, group: int = 64, seed: int = 0, progress=None) -> list[dict]:
    """One record per (shape, format, threads); see `lutq bench kernels --help` for the fields."""
    set_blas = blas_threads()
    rng = np.random.default_rng(seed)
    records = []
    for m, k in shapes:
        x = rng.standard_normal((1, k)).astype(np.float32)
        dense = rng.standard_normal((m, k)).astype(np.float32)
        n_dense = copies_for(dense.nbytes)
        denses = [dense.copy() for _ in range(n_dense)]
        y = np.zeros(m, np.float32)
        numpy_gemv = Contender(lambda i: np.matmul(denses[i % n_dense], x[0], out=y), n_dense, dense.nbytes)
        tables = lut.Tables(k, group)
        for name in formats:
            bits, make = FORMATS[name]
            ours, dequant, code_bytes = make(rng, m, k, group, x, tables)
            for threads in threads_list:
                numba.set_num_threads(threads)
                if set_blas is not None:
                    set_blas(threads)
                calls = max(MIN_CALLS, ours.copies, numpy_gemv.copies)
                t_ours, t_numpy, t_dequant = measure([ours, numpy_gemv, dequant], calls)
                rec = {"m": m, "k": k, "format": name, "bits": bits, "group": group, "threads": threads,
                       "us": t_ours * 1e6, "gbps": ours.nbytes / t_ours / 1e9, "gbps_codes": code_bytes / t_ours / 1e9,
                       "speedup_vs_numpy": t_numpy / t_ours, "speedup_vs_dequant": t_dequant / t_ours,
                       "numpy_us": t_numpy * 1e6, "numpy_gbps": dense.nbytes / t_numpy / 1e9,
                       "blas_threads_set": set_blas is not None}
                records.append(rec)
                if progress:
                    progress(rec)
            del ours, dequant
    return records


def parse_shapes(text: str | None, group: int) -> list[tuple[int, int]]:
    """"576x576,4096x4096" -> [(576, 576), (4096, 4096)]; None -> the standard six. Each K must suit group G."""
    if not text:
        return SHAPES
    shapes = []
    for item in text.split(","):
        try:
            m, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise LutqError(f"--shapes: {item!r} is not MxK (e.g. 2048x2048)") from None
        if m < 1:
            raise LutqError(f"--shapes: {item!r} has no rows")
        lut.check_group(k, group)
        shapes.append((m, k))
    return shapes


def parse_formats(text: str | None) -> list[str]:
    if not text:
        return list(FORMATS)
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if bad:
        raise LutqError(f"--formats: unknown {', '.join(bad)} (choose from {', '.join(FORMATS)})")
    return items


def table(records: list[dict]):
    """The records as a rich table."""
    from rich.table import Table

    t = Table(title=f"LUT GEMV, cold weights, ISA {lut.ISA.name} (medians of interleaved bursts)")
    for col in ("M x K", "format", "threads", "µs", "GB/s", "× numpy fp32", "× numba dequant", "numpy µs"):
        t.add_column(col, justify="left" if col in ("M x K", "format") else "right", no_wrap=True)
    for r in records:
        t.add_row(f"{r['m']} x {r['k']}", r["format"], str(r["threads"]), f"{r['us']:.1f}", f"{r['gbps']:.2f}",
                  f"{r['speedup_vs_numpy']:.2f}", f"{r['speedup_vs_dequant']:.1f}", f"{r['numpy_us']:.0f}")
    return t


def first_calls(threads: int = 2) -> list[tuple[str, float]]:
    """Call every kernel once on a tiny problem: (name, seconds) for each, in order. In a fresh process these are
    the first-call times: compilation, or loading from numba's on-disk cache when an earlier run left it there."""
    k, group, m = 192, 64, 40
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k)).astype(np.float32)
    q = rng.integers(0, 4, (m, k)).astype(np.uint8)
    s = np.ones((m, k // group), np.float32)
    params, scales = pack_group_params(s, -s), pack_group_scales(s)
    out = np.zeros((1, m), np.float32)
    tables, exact = lut.Tables(k, group), lut.Tables(k, group, exact=True)
    cb2, cb4 = np.linspace(-1, 1, 4).astype(np.float32), np.linspace(-1, 1, 16).astype(np.float32)
    nf2, nf4 = codebook.CodebookTables(k, group, cb2), codebook.CodebookTables(k, group, cb4)
    clusters = fineq.ClusterTables(k, group)
    pairs = codebook.PairTables(k, group, cb4[::2])
    acts = vnni.Int8Activations(k, group) if vnni.available() else None
    steps = [
        ("tables int8", lambda: tables.build(x)),
        ("tables fp32 (exact)", lambda: exact.build(x)),
        ("int2/3/4 GEMV", lambda: lut.gemv_bitserial(pack_bitserial(q, 2), params, 2, tables, out, threads=1)),
        ("int2/3/4 GEMV, threads", lambda: lut._simd_parallel(lut.ISA, pack_bitserial(q, 2), params, tables.tables,
                                                             tables.tscales, tables.sums, 2, threads, out)
         if lut.ISA.name != "portable" else None),
        ("int2/3/4 exact", lambda: lut.gemv_bitserial(pack_bitserial(q, 2), params, 2, exact, out, threads=1)),
        ("nf2 tables + GEMV", lambda: (nf2.build(x), codebook.gemv_nf4(pack_codebook_pairs(q), scales, nf2, out, 1))),
        ("nf3 tables + GEMV", lambda: (pairs.build(x), codebook.gemv_nf3(pack_codebook3(q), scales, pairs, out, 1))),
        ("nf4 tables + GEMV", lambda: (nf4.build(x), codebook.gemv_nf4(pack_codebook(q), scales, nf4, out, 1))),
        ("fineq tables + GEMV", lambda: (clusters.build(x), fineq.gemv_fineq(
            rng.integers(0, 256, (2, k // 3, 32)).astype(np.uint8), scales, clusters, out, 1))),
    ]
    if acts is not None:
        steps.append(("ternary VNNI", lambda: (acts.build(x), vnni.gemv_crumbs(pack_crumbs(q), params, acts, out, 1))))
    times = []
    for name, step in steps:
        start = time.perf_counter()
        step()
        times.append((name, time.perf_counter() - start))
    return times


def compiled_signatures() -> int:
    """How many kernel signatures this process compiled (rather than loaded from the cache)."""
    from numba.core.registry import CPUDispatcher

    n = 0
    for module in (lut, vnni, codebook, fineq):
        for obj in vars(module).values():
            if isinstance(obj, CPUDispatcher):
                n += sum(obj.stats.cache_misses.values())
    return n
