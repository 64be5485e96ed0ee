"""Where a decode step's time goes: the whole step against its matrix products alone, and per kind of call.

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/profile_decode.py DIR [--position P] [--by-call]
                                                                                   [--cprofile]

DIR is a lutq directory (e.g. one `lutq bench` cached under ~/.cache/lutq/bench). After a prompt of P tokens
(default 10) and a few warm-up steps, 20 decode steps at position P are timed, then the recorded step's
matrix-product calls (lutq/runtime/decode_step.py: each kernel bound to its tables and output, with its bias/scale
epilogue) are replayed alone; 7 interleaved repeats, medians. Then the step runs with every product replaced by
zero-filling its output: what is left is the rest (tables, norms, attention, activations, Python).
--by-call first times each of the step's calls in place, summed by kind over 200 steps (the timer adds ~0.1 us a
call); --cprofile prints the functions that the rest spends its time in.
"""

from __future__ import annotations

import collections
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


def call_kind(step, i: int) -> str:
    if i in step.products:
        return "matrix products"
    fn = getattr(step.calls[i], "func", step.calls[i])
    name = getattr(fn, "__name__", "?")
    return "attention" if name == "<lambda>" else name  # the one call that reads the position at call time


def by_call(net, decode, steps: int = 200) -> None:
    """Each call of the recorded step timed in place, summed by kind."""
    step = net.step
    kinds = [call_kind(step, i) for i in range(len(step.calls))]
    spent = collections.Counter()
    clock = time.perf_counter

    def timed(call, kind):
        def run():
            start = clock()
            call()
            spent[kind] += clock() - start
        return run

    original = step.calls
    step.calls = [timed(call, kind) for call, kind in zip(original, kinds)]
    start = clock()
    for _ in range(steps):
        decode()
    total = (clock() - start) / steps
    step.calls = original
    counts = collections.Counter(kinds)
    print(f"step {total * 1e6:.0f} us at position {net.pos}:")
    for kind, seconds in spent.most_common():
        print(f"  {kind:24s} {seconds / steps * 1e6:8.1f} us  ({counts[kind]} calls)")
    print(f"  {'between the calls':24s} {(total - sum(spent.values()) / steps) * 1e6:8.1f} us")


def main(directory: str, position: int, calls: bool, profile: bool) -> None:
    net = load_model(open_checkpoint(directory), position + 64)
    net.forward(np.arange(position) % 1000 + 500)
    for _ in range(5):
        net.forward(np.array([100]))
    net.pos = position
    step = net.step
    products = [step.calls[i] for i in step.products]

    def decode():
        net.forward(np.array([100]))
        net.pos -= 1  # the same position every time: equal work per step

    def products_only():
        for call in products:
            call()

    if calls:
        by_call(net, decode)
    token, kernels = per_step(decode), per_step(products_only)
    for i in step.products:  # each a partial whose output is its `out` keyword (numpy) or last argument (kernels)
        call = step.calls[i]
        out = call.keywords.get("out", call.args[-1])
        step.calls[i] = functools.partial(out.fill, 0.0)  # a defined output, no product
    rest = per_step(decode)
    print(f"decode {1 / token:.1f} tok/s = {token * 1e3:.2f} ms/token; kernels alone {kernels * 1e3:.2f} ms "
          f"({len(products)} calls); ratio {token / kernels:.2f}; without the kernels {rest * 1e3:.2f} ms")
    if profile:
        cProfile.runctx("for _ in range(STEPS): step()", globals(), {"step": decode, "STEPS": STEPS},
                        "/tmp/decode.prof")
        pstats.Stats("/tmp/decode.prof").sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    args = sys.argv[1:]
    pos = int(args[args.index("--position") + 1]) if "--position" in args else 10
    main(args[0], pos, "--by-call" in args, "--cprofile" in args)
