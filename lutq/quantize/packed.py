"""PackedTensor: one quantized weight matrix as plain arrays plus a small metadata dict, exactly what the lutq dir
stores and what the kernels stream. Also the helpers every format shares: grouping along K and fp16 rounding.

Arrays by name (not every format has every array):
    codes        u8   codes in the kernel's streaming layout (see lutq/kernels/layout.py, or fineq.py for fineq)
    scales       f16  [M, K/G]  per-group scale
    biases       f16  [M, K/G]  per-group offset (the group's "min", llama.cpp Q4_1 style) for the affine formats
    codebook     f32  [2^bits]  the levels a code indexes (nf formats)
    tensor_scale f32  [1]       the exact per-tensor scale (ternary)
Metadata: format, bits (code bits), group_size, shape [M, K], layout (scheme name), layout_version, and any
format-specific keys documented in docs/FORMAT.md.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Weights quantized per numpy pass: large enough that numpy's per-call overhead vanishes, small enough that the
# float64 temporaries of a search step stay in a few megabytes and a 576 x 576 weight still splits across threads.
CHUNK_ELEMENTS = 1 << 18


@dataclass
class PackedTensor:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.meta["format"]

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self.meta["shape"]
        return int(m), int(k)

    @property
    def group_size(self) -> int:
        return int(self.meta["group_size"])

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes, scales, everything) per weight of the original matrix."""
        m, k = self.shape
        return 8 * self.nbytes / (m * k)


def row_chunks(m: int, k: int, elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of rows covering [0, m), about `elements` weights each."""
    step = max(1, elements // max(k, 1))
    return [slice(start, min(m, start + step)) for start in range(0, m, step)]


def worker_count() -> int:
    """Threads for quantizing: --threads (which sets OMP_NUM_THREADS), else every core."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    return int(n) if n.isdigit() and int(n) > 0 else (os.cpu_count() or 1)


def for_row_chunks(m: int, k: int, fn: Callable[[slice], None], elements: int = CHUNK_ELEMENTS) -> None:
    """Call fn(rows) for every chunk of rows, on worker threads.

    Rows are quantized independently, so the result does not depend on the chunking; numpy releases the GIL inside
    its array loops, so threads run the chunks in parallel. fn writes its rows of preallocated outputs.
    """
    chunks = row_chunks(m, k, elements)
    workers = min(worker_count(), len(chunks))
    if workers <= 1:
        for rows in chunks:
            fn(rows)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, chunks))  # list(): re-raises a worker's exception here


def check_shape(w: np.ndarray, group_size: int, k_multiple: int = 8) -> tuple[int, int]:
    """Validate a weight for grouped quantization; returns (M, K)."""
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {w.shape}")
    m, k = w.shape
    if group_size not in (32, 64, 128):
        raise ValueError(f"group size must be 32, 64 or 128, got {group_size}")
    if k % group_size or k % k_multiple:
        raise ValueError(f"K = {k} is not a multiple of the group size {group_size}")
    return m, k


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stored_dims(meta: dict, bits: int, layout: str, k_multiple: int = 8) -> tuple[int, int, int]:
    """(M, K, G) from a stored tensor's metadata, checked against what its format writes (ValueError if not).

    The formats' `stored_arrays(meta)` build on it: the loader compares every stored array with what the metadata
    implies before any kernel indexes into one.
    """
    shape, g = meta.get("shape"), meta.get("group_size")
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(v) and v > 0 for v in shape)):
        raise ValueError(f"bad shape {shape!r}")
    m, k = shape
    if not is_int(g) or g not in (32, 64, 128):
        raise ValueError(f"group size {g!r} is not 32, 64 or 128")
    if k % g or k % k_multiple:
        raise ValueError(f"K = {k} is not a multiple of the group size {g} (and of {k_multiple})")
    if not is_int(meta.get("bits")) or meta["bits"] != bits:
        raise ValueError(f"bits {meta.get('bits')!r}, but {meta.get('format')} stores {bits}-bit codes")
    if meta.get("layout") != layout:
        raise ValueError(f"layout {meta.get('layout')!r}, but {meta.get('format')} stores its codes {layout!r}")
    return m, k, g


def to_f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 (what is stored) and back to float64 (what the search keeps computing with)."""
    return x.astype(np.float16).astype(np.float64)


def importance(x: np.ndarray) -> np.ndarray:
    """The weight each element's squared error gets in the nf scale search: its magnitude |w|.

    Plain squared error lets the search shrink an nf scale, clipping a group's large weights to resolve its many small
    ones more finely; on SmolLM2 that lowers weight MSE yet raises perplexity (large weights carry more of a model's
    function). Weighted by |w|, nf3 measured perplexity 74.9 instead of 91.6 (nf4: 43.2 vs 43.0, a tie). The uniform
    formats keep plain squared error: their offset already places the grid, and weighting measured no better there.
    """
    return np.abs(x)


def weighted_error(x: np.ndarray, y: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Per-group sum of wt (x - y)^2: f64[N, G] -> f64[N]."""
    d = x - y
    return np.einsum("ng,ng,ng->n", wt, d, d)


def sq_error(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-group squared error: x, y f64[N, G] -> f64[N]."""
    d = x - y
    return np.einsum("ng,ng->n", d, d)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||W - W_hat|| / ||W|| (Frobenius), the error quant_report.json and the planner use.

    Summed in float64 over chunks of rows: a float64 copy of a whole lm_head would double quantize's peak memory.
    """
    a, b = (x.reshape(1, -1) if x.ndim != 2 else x for x in (w, w_hat))
    num = den = 0.0
    for rows in row_chunks(*a.shape):
        x = a[rows].astype(np.float64)
        d = x - b[rows]
        num += float(np.einsum("ij,ij->", d, d))
        den += float(np.einsum("ij,ij->", x, x))
    num, den = float(np.sqrt(num)), float(np.sqrt(den))
    return num / den if den else (0.0 if num == 0 else float("inf"))
