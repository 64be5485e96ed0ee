"""One decode step recorded as a flat list of compiled calls: LlamaModel.forward for a single token, replayed.

forward() reads top to bottom and allocates as it goes. For one token that costs more than the arithmetic around the
matrix products: measured on SmolLM2-135M int2 (1 thread), ~28 us a layer of Python, numba dispatch and temporaries
against ~9 us of norms, tables, attention and SiLU. This step runs the same operations in the same order on buffers
allocated once, each call bound to its compiled entry point and its arguments when the step is recorded, so a token
is `for call in calls: call()`. Recorded again when the thread count changes (kernels bind a serial or a parallel
entry point).

Buffers, one row each (D hidden, A = H hd, Q = A + 2 KV hd, F intermediate, V vocab):

    x      f32[1, D]   the residual stream
    h      f32[1, D]   x normalised: the input of qkv_proj and gate_up_proj
    qkv    f32[1, Q]   q, k, v side by side
    att    f32[1, A]   attention output: the input of o_proj
    delta  f32[1, D]   o_proj's, then down_proj's output, added into x by the next norm (add_rms_norm_into)
    gate_up f32[1, 2F] -> act f32[1, F] = silu(gate) * up: the input of down_proj
    logits f32[1, V]

Per layer: norm (+ residual), qkv tables and product, attention (appends k and v at the cache's position), o tables
and product, norm + residual, gate/up tables and product, SiLU, down tables and product.
"""

from __future__ import annotations

import functools

import numpy as np

from lutq.kernels.lut import compiled, current_threads
from lutq.runtime.ops import add_rms_norm_into, decode_attention, rms_norm_into, silu_mul_into


def bound(fn, *args):
    """call() = fn(*args) through fn's compiled entry point."""
    return functools.partial(compiled(fn, args), *args)


class DecodeStep:
    def __init__(self, model):
        cfg, cache = model.config, model.cache
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        A = cfg.num_attention_heads * cfg.head_dim
        Q = A + 2 * cfg.num_key_value_heads * cfg.head_dim
        self.model = model
        self.threads = current_threads()
        self.x, self.h, self.delta = (np.zeros((1, D), np.float32) for _ in range(3))
        self.qkv, self.att = np.zeros((1, Q), np.float32), np.zeros((1, A), np.float32)
        self.gate_up, self.act = np.zeros((1, 2 * F), np.float32), np.zeros((1, F), np.float32)
        self.logits = np.zeros((1, V), np.float32)
        eps = np.float32(cfg.rms_norm_eps)
        x, h, delta, act = self.x, self.h, self.delta, self.act

        self.calls: list = []
        self.products: list[int] = []  # indices of the calls that are matrix products (scripts/profile_decode.py)
        for i, layer in enumerate(model.layers):
            if i == 0:
                self.calls.append(bound(rms_norm_into, x, layer.input_norm, eps, h))
            else:  # x += down_proj's output of the layer before
                self.calls.append(bound(add_rms_norm_into, x, delta, layer.input_norm, eps, h))
            self.linear(layer.qkv_proj, h, self.qkv)
            self.calls.append(self.attention(i))
            self.linear(layer.o_proj, self.att, delta)
            self.calls.append(bound(add_rms_norm_into, x, delta, layer.post_attention_norm, eps, h))
            self.linear(layer.gate_up_proj, h, self.gate_up)
            self.calls.append(bound(silu_mul_into, self.gate_up, act))
            self.linear(layer.down_proj, act, delta)
        self.calls.append(bound(add_rms_norm_into, x, delta, model.norm, eps, h))
        self.linear(model.lm_head, h, self.logits)

    def linear(self, layer, x: np.ndarray, out: np.ndarray) -> None:
        prepare, product = layer.decode_calls(x, out, {})
        self.calls += prepare
        self.products += range(len(self.calls), len(self.calls) + len(product))
        self.calls += product

    def attention(self, i: int):
        """Layer i's attention: the position is read at call time, everything else is bound now."""
        cache = self.model.cache
        args = (self.qkv[0], cache.k[i], cache.v[i], cache.cos, cache.sin, 0, cache.scores, self.att[0])
        attend = compiled(decode_attention, args)
        qkv, k, v, cos, sin, _, scores, att = args
        return lambda: attend(qkv, k, v, cos, sin, cache.pos, scores, att)

    def __call__(self, token: int) -> np.ndarray:
        """The logits f32[V] after `token` at the cache's next position (a copy: the buffer is reused)."""
        cache = self.model.cache
        cache.check_room(1)
        self.x[:] = self.model.embed[np.array([token])]
        for call in self.calls:
            call()
        cache.pos += 1
        return self.logits[0].copy()
