"""`--bits-budget B`: choose a format per linear weight so the average bits/weight over the linear layers is <= B.

1. Measure: every weight not pinned by a GLOB=FORMAT rule is quantized with each candidate format on an evenly spaced
   sample of its rows (SAMPLE_ROWS; rows are quantized independently, so the sample's error estimates the whole's),
   giving its relative squared error e = ||W - W_hat||^2 / ||W||^2 per candidate. Bits are each format's stored bits
   per weight at the group size (codes + scales).
2. Per weight, keep the lower convex hull of (bits, e): a candidate that costs more and is no better, or that lies
   above the line between its neighbours, is never the best use of bits.
3. Greedy: start every weight at its cheapest candidate, then repeatedly take the upgrade (the next hull point of one
   weight) that removes the most error per bit spent, (e_before - e_after) / (params x bits added), while it fits.

The objective is the sum over weights of e, each weight counted once whatever its size: a weight's output error
relative to its output is what its e measures, and every linear layer's output lands on the residual stream alike.
That makes small, sensitive weights (k_proj, v_proj) cheap to upgrade, as llama.cpp's k-quant mixes also find.

With `--calibration` the plan is made the same way, from the formats GPTQ covers only (not fineq): GPTQ then rounds
each weight in its planned format and helps those formats a lot, which their plain weight error cannot show. With
fineq among the candidates, SmolLM2 at 3.25 bits got fineq on 46 of its 90 MLP weights and measured 99.0; without,
56.2 (models.md). Measuring instead each candidate's GPTQ output error on the calibration inputs, relative to the
output, tr(dW H dW^T) / tr(W H W^T), planned worse on SmolLM2 at 3.5 bits: perplexity 53.4 (52.8 with the error
measured on held-out calibration windows) against 44.3 with the weight-error plan, and weight error scaled by GPTQ's
gain in output error over plain rounding 56.4 (models.md). A weight's output error says nothing of how much the
model's loss depends on that output: those plans gave 2-bit formats to some down_proj weights, which matter most.

`--plan kl` (with calibration) measures that dependence instead of guessing it: each candidate's error is the KL
divergence the weight, quantized alone in that format by GPTQ, causes in the model's next-token distribution on the
calibration text (lutq/quantize/sensitivity.py), and the objective is the sum of those KLs. Slow (a partial forward
pass per weight and candidate, KL_CANDIDATES only), and on SmolLM2 at 3.5 bits the better plan (models.md).
"""

from __future__ import annotations

import heapq

import numpy as np

from lutq.errors import LutqError
from lutq.quantize.gptq import supports as gptq_supports
from lutq.quantize.registry import KEEP, get_format
from lutq.quantize.rules import AUTO, Choice

# (format, group size) pairs: the formats that led at their size for SmolLM2-135M (models.md; int2, int3 and ternary
# with fp16 parameters were dominated there), at G = 64 and G = 32, and the int-k formats (8-bit parameters), which
# give G = 32 accuracy at the G = 64 price.
CANDIDATES = (Choice("nf2", 64), Choice("int2k", 32), Choice("fineq", 64), Choice("nf3", 64), Choice("int3k", 32),
              Choice("nf3", 32), Choice("nf4", 64), Choice("int4", 64), Choice("int4k", 32), Choice("nf4", 32),
              Choice("int4", 32))
SAMPLE_ROWS = 128
# `--plan kl` measures every candidate through the model (slow): the GPTQ formats its SmolLM2 plans chose at 2.5-4.5
# bits (models.md), nf3:64 replaced by nf3k:32 (the same bits, G = 32 accuracy). nf3:32 was chosen for 2 of 210
# weights at 3.5 bits and is left out. At 3.5 bits a plan with nf3k measured 40.00, the nf3:64 plan rounded with
# nf3k 39.47 (recipes/smollm2-135m-kl3.5.rules): the candidates' KL, each weight alone and before GPTQ's refits,
# does not rank plans to 1%.
KL_CANDIDATES = (Choice("int2k", 32), Choice("nf3k", 32), Choice("int3k", 32), Choice("int4k", 32))


def bits_of(choice: Choice, shape: tuple[int, int]) -> float:
    """Stored bits per weight of a weight of this shape in this format (padding included)."""
    m, k = shape
    if choice.format == KEEP:
        return 16.0
    return 8 * get_format(choice.format).stored_bytes(m, k, choice.group_size) / (m * k)


def measure(w: np.ndarray, candidates: list[Choice], refine: bool) -> dict[Choice, float]:
    """Relative squared error of each candidate on a sample of w's rows."""
    rows = np.unique(np.linspace(0, w.shape[0] - 1, min(SAMPLE_ROWS, w.shape[0])).astype(int))
    sample = np.ascontiguousarray(w[rows])
    norm = float(np.sum(sample.astype(np.float64) ** 2)) or 1.0
    out = {}
    for c in candidates:
        f = get_format(c.format)
        w_hat = f.dequantize(f.quantize(sample, c.group_size, refine))
        out[c] = float(np.sum((w_hat.astype(np.float64) - sample) ** 2)) / norm
    return out


def hull(points: list[tuple[float, float, Choice]]) -> list[tuple[float, float, Choice]]:
    """Lower convex hull of (bits, error, choice), by bits ascending, error strictly falling."""
    out: list[tuple[float, float, Choice]] = []
    for p in sorted(points):
        if out and p[1] >= out[-1][1]:
            continue  # more bits, no less error
        while len(out) >= 2:
            (b0, e0, _), (b1, e1, _) = out[-2], out[-1]
            # drop the middle point when it lies on or above the segment from out[-2] to p
            if (e1 - e0) * (p[0] - b0) >= (p[1] - e0) * (b1 - b0):
                out.pop()
            else:
                break
        out.append(p)
    return out


def measured_errors(ckpt, shapes, free: list[str], candidates, options, on_progress=None) -> dict[str, dict]:
    """name -> {choice: error} for the free weights: relative weight error, or with `--plan kl` the KL divergence
    each choice alone causes in the model's output (lutq/quantize/sensitivity.py)."""
    fits = {}
    for name in free:
        fits[name] = [c for c in candidates if shapes[name][1] % c.group_size == 0]
        if not fits[name]:
            raise LutqError(f"{name}: K = {shapes[name][1]} is not a multiple of any candidate's group size")
    if options.plan == "kl":
        from lutq.quantize.calibration import calibration_windows
        from lutq.quantize.sensitivity import measure_kl

        windows = calibration_windows(ckpt, options.calibration)
        return measure_kl(ckpt, windows, fits, options.refine, on_progress)
    errors = {}
    for i, name in enumerate(free):
        source = name if ckpt.has(name) else "model.embed_tokens.weight"  # a tied lm_head reads the embedding
        errors[name] = measure(ckpt.load(source), fits[name], options.refine)
        if on_progress is not None:
            on_progress("plan", i + 1, len(free))
    return errors


def plan_budget(ckpt, shapes: dict[str, tuple[int, int]], pinned: dict[str, Choice], options, on_progress=None):
    """Linear weight name -> Choice, fitting options.bits_budget; pinned weights keep their rule's choice."""
    budget = options.bits_budget
    if budget <= 0:
        raise LutqError(f"--bits-budget must be positive, got {budget}")
    if options.rules.default.format != AUTO:
        raise LutqError("--bits-budget chooses the default format: give --format auto[,GLOB=FORMAT...] or no --format")
    free = [n for n in shapes if n not in pinned]
    params = {n: shapes[n][0] * shapes[n][1] for n in shapes}
    total_params = sum(params.values())
    candidates = CANDIDATES
    if options.plan == "kl":
        candidates = KL_CANDIDATES
    elif options.calibration is not None:
        candidates = tuple(c for c in CANDIDATES if gptq_supports(get_format(c.format)))
    errors = measured_errors(ckpt, shapes, free, candidates, options, on_progress)
    hulls = {name: hull([(bits_of(c, shapes[name]), e, c) for c, e in errors[name].items()]) for name in free}
    spent = sum(params[n] * bits_of(c, shapes[n]) for n, c in pinned.items())
    level = {n: 0 for n in free}
    spent += sum(params[n] * hulls[n][0][0] for n in free)
    allowed = budget * total_params
    if spent > allowed + 1e-6:
        raise LutqError(f"--bits-budget {budget} is below the cheapest plan, "
                        f"{spent / total_params:.3f} bits/weight over the linear layers")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i, h = level[name], hulls[name]
        if i + 1 < len(h):
            (b0, e0, _), (b1, e1, _) = h[i], h[i + 1]
            heapq.heappush(heap, (-(e0 - e1) / (params[name] * (b1 - b0)), name))

    for name in free:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        i, h = level[name], hulls[name]
        cost = params[name] * (h[i + 1][0] - h[i][0])
        if spent + cost > allowed:
            continue  # this upgrade does not fit; a cheaper one further down the heap still may
        spent += cost
        level[name] = i + 1
        push(name)
    return {**pinned, **{n: hulls[n][level[n]][2] for n in free}}
