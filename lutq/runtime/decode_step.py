"""One decode step recorded as a flat list of compiled calls: LlamaModel.forward for a single token, replayed.

forward() reads top to bottom and allocates as it goes. For one token that costs more than the arithmetic around the
matrix products: measured on SmolLM2-135M int2 (1 thread), ~28 us a layer of Python, numba dispatch and temporaries
against ~9 us of norms, tables, attention and SiLU. This step runs the same operations in the same order on buffers
allocated once, each call bound to its compiled entry point and its arguments when the step is recorded, so a token
is `for call in calls: call()`. One step is recorded per thread count (kernels bind a serial or a parallel entry
point), so switching threads between tokens, as `lutq bench` does, records nothing new. Each architecture records
its own sequence beside its forward pass (`record_decode` in llama.py and bitnet.py): the two must say the same
thing, and tests/test_quant_runtime.py checks that they compute the same.

Buffers, one row each (D hidden, A = H hd, Q = A + 2 KV hd, F intermediate, V vocab):

    x      f32[1, D]   the residual stream
    h      f32[1, D]   x normalised: the input of qkv_proj and gate_up_proj
    qkv    f32[1, Q]   q, k, v side by side
    att    f32[1, A]   attention output: the input of o_proj
    delta  f32[1, D]   o_proj's, then down_proj's output, added into x by the next norm (add_rms_norm_into)
    gate_up f32[1, 2F] -> act f32[1, F] = silu(gate) * up: the input of down_proj
    logits f32[1, V]

Per Llama layer: norm (+ residual), qkv tables and product, attention (appends k and v at the cache's position), o
tables and product, norm + residual, gate/up tables and product, SiLU, down tables and product.
"""

from __future__ import annotations

import functools

import numpy as np

from lutq.kernels.lut import compiled, current_threads
from lutq.runtime.ops import decode_attention


class DecodeStep:
    """The buffers and the calls; the architecture's model says which calls, in order (its record_decode)."""

    def __init__(self, model):
        cfg = model.config
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        A = cfg.num_attention_heads * cfg.head_dim
        Q = A + 2 * cfg.num_key_value_heads * cfg.head_dim
        self.model = model
        self.threads = current_threads()
        self.eps = np.float32(cfg.rms_norm_eps)
        self.x, self.h, self.delta = (np.zeros((1, D), np.float32) for _ in range(3))
        self.qkv, self.att = np.zeros((1, Q), np.float32), np.zeros((1, A), np.float32)
        self.gate_up, self.act = np.zeros((1, 2 * F), np.float32), np.zeros((1, F), np.float32)
        self.logits = np.zeros((1, V), np.float32)
        self.calls: list = []
        self.products: list[int] = []  # indices of the calls that are matrix products (scripts/profile_decode.py)
        model.record_decode(self)

    def call(self, fn, *args) -> None:
        """Append fn(*args), bound now to fn's compiled entry point."""
        self.calls.append(functools.partial(compiled(fn, args), *args))

    def linear(self, layer, x: np.ndarray, out: np.ndarray) -> None:
        """Append out = layer(x): its table builds, then its product."""
        prepare, product = layer.decode_calls(x, out, {})
        self.calls += prepare
        self.products += range(len(self.calls), len(self.calls) + len(product))
        self.calls += product

    def attention(self, i: int) -> None:
        """Append layer i's attention from qkv into att; the position is read at call time, the rest bound now."""
        cache = self.model.cache
        args = (self.qkv[0], cache.k[i], cache.v[i], cache.cos, cache.sin, 0, cache.scores, cache.exponent,
                self.att[0])
        attend = compiled(decode_attention, args)
        qkv, k, v, cos, sin, _, scores, exponent, att = args
        self.calls.append(lambda: attend(qkv, k, v, cos, sin, cache.pos, scores, exponent, att))

    def __call__(self, token: int) -> np.ndarray:
        """The logits f32[V] after `token` at the cache's next position (a copy: the buffer is reused)."""
        cache = self.model.cache
        cache.check_room(1)
        self.x[:] = self.model.embed[np.array([token])]
        for call in self.calls:
            call()
        cache.pos += 1
        return self.logits[0].copy()
