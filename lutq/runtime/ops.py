"""The small per-token operations of a decode step, compiled with numba.

In a single-token step the matrix products are memory-bound and fast; what is left is a dozen small numpy calls per
layer (norm, rotary embedding, attention over the cache, activation), each costing more in dispatch and temporaries
than in arithmetic. These kernels do the same math in one pass each, into preallocated outputs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def rms_norm_into(x, weight, eps, out):  # pragma: no cover - compiled
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x: f32[T, D]."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for d in range(D):
            ss += x[t, d] * x[t, d]
        r = np.float32(1.0) / np.sqrt(ss / D + np.float32(eps))
        for d in range(D):
            out[t, d] = x[t, d] * r * weight[d]


@njit(cache=True, fastmath=True, error_model="numpy")  # numpy's: a NaN from an overflowed model flows on, no raise
def decode_attention(qkv, k_cache, v_cache, cos, sin, pos, scores, out):  # pragma: no cover - compiled
    """One token's attention, appending its key and value to the cache.

    qkv: f32[(H + 2KV) * hd] (q, k, v side by side, not yet rotated); k_cache, v_cache: f32[KV, max_seq, hd] (this
    layer's); cos, sin: f32[hd/2] for position `pos`; scores: f32[S] scratch; out: f32[H * hd].
    Rotation pairs element i with i + hd/2 of each head (HF's rotate_half).
    """
    KV, _, hd = k_cache.shape
    H = qkv.shape[0] // hd - 2 * KV
    G, half, S = H // KV, hd // 2, pos + 1
    for j in range(KV):  # rotate and store k, store v
        kb, vb = (H + j) * hd, (H + KV + j) * hd
        for i in range(half):
            a, b = qkv[kb + i], qkv[kb + half + i]
            k_cache[j, pos, i] = a * cos[i] - b * sin[i]
            k_cache[j, pos, half + i] = b * cos[i] + a * sin[i]
        for i in range(hd):
            v_cache[j, pos, i] = qkv[vb + i]
    inv = np.float32(1.0 / math.sqrt(hd))
    q = np.empty(hd, np.float32)
    for h in range(H):
        j = h // G
        qb = h * hd
        for i in range(half):
            a, b = qkv[qb + i], qkv[qb + half + i]
            q[i] = (a * cos[i] - b * sin[i]) * inv
            q[half + i] = (b * cos[i] + a * sin[i]) * inv
        m = np.float32(-np.inf)
        for s in range(S):
            acc = np.float32(0.0)
            for i in range(hd):
                acc += q[i] * k_cache[j, s, i]
            scores[s] = acc
            m = max(m, acc)
        total = np.float32(0.0)
        for s in range(S):
            e = np.exp(scores[s] - m)
            scores[s] = e
            total += e
        for i in range(hd):
            out[h * hd + i] = 0.0
        for s in range(S):
            p = scores[s] / total
            for i in range(hd):
                out[h * hd + i] += p * v_cache[j, s, i]


@njit(cache=True, fastmath=True, error_model="numpy")  # an overflowed activation gives inf/NaN, not an exception
def silu_mul_into(gate_up, out):  # pragma: no cover - compiled
    """out[t] = silu(gate) * up for gate_up: f32[T, 2F] = [gate | up]."""
    T, F = out.shape
    for t in range(T):
        for f in range(F):
            g = gate_up[t, f]
            out[t, f] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, F + f]
