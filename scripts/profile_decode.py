"""Where a decode step's time goes: the whole step against the LUT kernels alone.

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_decode.py DIR [--cprofile]

DIR is a lutq directory (e.g. one `lutq bench` cached under ~/.cache/lutq/bench). After a short prompt and a few
warm-up steps, 20 decode steps are timed, then the same step's kernel calls (each QuantLinear's bound call, in model
order, into its own output) are replayed alone; 7 interleaved repeats, medians. Then the step runs with every kernel
call replaced by zero-filling its output: what is left is the rest (tables, norms, attention, activations, Python). --cprofile prints
the functions that rest spends its time in.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import numpy as np

from lutq.checkpoint import open_checkpoint
from lutq.runtime.model import load_model
from lutq.runtime.quant_linear import FusedLinear, QuantLinear

STEPS, REPEATS = 20, 7


def kernel_layers(net) -> list[QuantLinear]:
    """Every QuantLinear of the model, in the order a decode step calls them."""
    found = []

    def walk(layer):
        if isinstance(layer, QuantLinear):
            found.append(layer)
        elif isinstance(layer, FusedLinear):
            for part in layer.parts:
                walk(part)

    for block in net.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            walk(getattr(block, name))
    walk(net.lm_head)
    return found


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
    layers = kernel_layers(net)
    calls = [(next(iter(q.bound.values())), np.empty((1, q.out_features), np.float32)) for q in layers]

    def step():
        net.forward(np.array([100]))
        net.pos -= 1  # the same position every time: equal work per step

    def kernels_only():
        for call, out in calls:
            call(out)

    token, kernels = per_step(step), per_step(kernels_only)
    for q in layers:
        for key in q.bound:
            q.bound[key] = lambda out: out.fill(0.0)  # a defined output, no product
    rest = per_step(step)
    print(f"decode {1 / token:.1f} tok/s = {token * 1e3:.2f} ms/token; kernels alone {kernels * 1e3:.2f} ms "
          f"({len(calls)} calls); ratio {token / kernels:.2f}; without the kernels {rest * 1e3:.2f} ms")
    if profile:
        cProfile.runctx("for _ in range(STEPS): step()", globals(), {"step": step, "STEPS": STEPS}, "/tmp/decode.prof")
        pstats.Stats("/tmp/decode.prof").sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main(sys.argv[1], "--cprofile" in sys.argv[2:])
