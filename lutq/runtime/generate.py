"""The generation loop: prefill the prompt, decode token by token, stream text, stop at EOS or a stop string."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lutq.errors import LutqError
from lutq.runtime.sampling import Sampler, SamplingParams


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated ids (the stop token excluded)
    text: str = ""
    stop_reason: str = "length"  # "eos", "stop", "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time in single-token forward passes
    decode_steps: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back what is not final yet:
    an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could begin a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.emitted = 0  # characters of the text already handed out
        self.text = ""

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """(new final text, stop string seen)."""
        self.text = self.decode(ids)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        end = len(self.text)
        if self.text.endswith("\ufffd"):
            end -= 1
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for n in range(min(len(s) - 1, end), 0, -1):
                if self.text[end - n : end] == s[:n]:
                    end -= n
                    break
        return self._take(end), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta


def check_prompt_fits(model, n_prompt: int) -> None:
    room = model.max_seq - model.pos
    if n_prompt > room:
        raise LutqError(f"prompt of {n_prompt} tokens does not fit the context window "
                        f"({room} positions left of {model.max_seq})")


def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
             stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
             keep_cache: bool = False) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids.

    The model's KV cache starts empty unless keep_cache (chat: the conversation so far is already cached and
    prompt_ids are only the new turn's tokens).
    """
    if not prompt_ids:
        raise LutqError("the prompt is empty")
    if not keep_cache:
        model.reset()
    check_prompt_fits(model, len(prompt_ids))
    max_new_tokens = min(max_new_tokens, model.max_seq - model.pos - len(prompt_ids))
    sampler = Sampler(params)
    stream = TextStream(tokenizer.decode, stop or [])
    eos = set(tokenizer.eos_token_ids)
    res = GenerationResult(prompt_tokens=len(prompt_ids))
    context = list(prompt_ids)

    t0 = time.perf_counter()
    logits = model.forward(np.asarray(prompt_ids, dtype=np.int64))
    res.prefill_s = time.perf_counter() - t0
    for i in range(max_new_tokens):
        tok = sampler(logits, context)
        if tok in eos:
            res.stop_reason = "eos"
            break
        res.tokens.append(tok)
        context.append(tok)
        delta, stopped = stream.push(res.tokens)
        if delta and on_text:
            on_text(delta)
        if stopped:
            res.stop_reason = "stop"
            break
        if i + 1 == max_new_tokens:
            break
        t0 = time.perf_counter()
        logits = model.forward(np.asarray([tok], dtype=np.int64))
        res.decode_s += time.perf_counter() - t0
        res.decode_steps += 1
    if res.stop_reason != "stop" and on_text:
        tail = stream.flush()
        if tail:
            on_text(tail)
    res.text = stream.text
    return res
