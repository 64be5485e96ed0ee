"""Perplexity of a model on a text: the yardstick for every quantized format.

Protocol (the one models.md reports): the whole text is tokenized once, with exactly the special tokens the model's
tokenizer adds by itself (SmolLM2's adds none; a tokenizer whose post-processor adds BOS puts it once, at the start of
the text, not at the start of every window). The ids are cut into non-overlapping windows of `ctx` tokens, window i =
ids[i*ctx : (i+1)*ctx]; a trailing partial window is dropped. Each window runs from an empty KV cache and is scored on
every position but its first: the logits at position t predict token t+1, so a window gives ctx - 1 scored tokens.

    perplexity = exp( - sum over scored tokens of log p(token | window prefix) / scored tokens )

Log-softmax is taken in float64 so the sum over thousands of tokens does not lose the small terms.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from lutq.errors import LutqError


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    ctx: int
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows: logits f32[T, V], targets i64[T]; log-softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))  # f64[T]
    return float((log_norm - z[np.arange(len(targets)), targets]).sum())


def count_windows(n_tokens: int, ctx: int, max_windows: int | None) -> int:
    n = n_tokens // ctx
    return n if max_windows is None else min(n, max_windows)


def perplexity(model, ids: list[int] | np.ndarray, ctx: int, max_windows: int | None = None,
               on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score `ids` with `model` (a runtime LlamaModel whose KV cache holds at least ctx positions)."""
    if ctx < 2:
        raise LutqError(f"--ctx must be >= 2, got {ctx}")
    if max_windows is not None and max_windows < 1:
        raise LutqError(f"--max-windows must be >= 1, got {max_windows}")
    ids = np.asarray(ids, dtype=np.int64)
    n = count_windows(len(ids), ctx, max_windows)
    if n == 0:
        raise LutqError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    start = time.perf_counter()
    total = 0.0
    for w in range(n):
        window = ids[w * ctx : (w + 1) * ctx]
        model.reset()
        logits = model.forward(window, all_logits=True)  # f32[ctx, V]
        total += window_nll(logits[:-1], window[1:])
        if on_window is not None:
            on_window(w + 1, n)
    scored = n * (ctx - 1)
    nll = total / scored
    return EvalResult(math.exp(nll), nll, scored, ctx, n, time.perf_counter() - start)
