"""Where a decode step's time goes: the whole step against its matrix products alone.

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_decode.py DIR [--cprofile]

DIR is a lutq directory (e.g. one `lutq bench` cached under ~/.cache/lutq/bench). After a short prompt and a few
warm-up steps, 20 decode steps are timed, then the recorded step's matrix-product calls (lutq/runtime/decode_step.py:
each kernel bound to its tables and output, with its bias/scale epilogue) are replayed alone; 7 interleaved repeats,
medians. Then the step runs with every product replaced by zero-filling its output: what is left is the rest (tables,
norms, attention, activations, Python). --cprofile prints the functions that rest spends its time in.
"""

from __future__ import annotations

import cProfile
import functools
import pstats
import sys
import time

import numpy as np

from lutq.checkpoint import open_checkpoint
from lutq.runtime.model import load_model

STEPS, REPEATS = 20, 7


def per_step(fn) -> float:
    """Median seconds per call of fn over REPEATS runs of STEPS calls."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(STEPS):
            fn()
        times.append((time.perf_counter() - start) / STEPS)
    return float(np.median(times))


def main(directory: str, profile: bool) -> None:
    net = load_model(open_checkpoint(directory), 256)
    net.forward(np.arange(5) + 500)
    for _ in range(5):
        net.forward(np.array([100]))
    step = net.step
    products = [step.calls[i] for i in step.products]

    def decode():
        net.forward(np.array([100]))
        net.pos -= 1  # the same position every time: equal work per step

    def products_only():
        for call in products:
            call()

    token, kernels = per_step(decode), per_step(products_only)
    for i in step.products:  # each a partial whose output is its `out` keyword (numpy) or last argument (kernels)
        call = step.calls[i]
        out = call.keywords.get("out", call.args[-1])
        step.calls[i] = functools.partial(out.fill, 0.0)  # a defined output, no product
    rest = per_step(decode)
    print(f"decode {1 / token:.1f} tok/s = {token * 1e3:.2f} ms/token; kernels alone {kernels * 1e3:.2f} ms "
          f"({len(products)} calls); ratio {token / kernels:.2f}; without the kernels {rest * 1e3:.2f} ms")
    if profile:
        cProfile.runctx("for _ in range(STEPS): step()", globals(), {"step": decode, "STEPS": STEPS}, "/tmp/decode.prof")
        pstats.Stats("/tmp/decode.prof").sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main(sys.argv[1], "--cprofile" in sys.argv[2:])
