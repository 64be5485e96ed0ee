"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lutq.errors import LutqError


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise LutqError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LutqError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LutqError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise LutqError(f"--min-p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise LutqError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int]) -> int:
        """logits: f32[V] for the next position; context: the token ids so far (for the repetition penalty)."""
        p = self.p
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and context:
            # CTRL's penalty, as transformers applies it: push seen tokens' logits towards "less likely".
            seen = np.unique(np.asarray(context))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits /= p.temperature
        if p.top_k and p.top_k < len(logits):
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
            cut = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1
            probs[order[cut:]] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
