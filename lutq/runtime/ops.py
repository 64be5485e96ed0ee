"""The small per-token operations of a decode step, compiled with numba.

In a single-token step the matrix products are memory-bound and fast; what is left is a dozen small numpy calls per
layer (norm, rotary embedding, attention over the cache, activation), each costing more in dispatch and temporaries
than in arithmetic. These kernels do the same math in one pass each, into preallocated outputs; the forward passes
call them for any number of tokens, the recorded decode step (decode_step.py) on its own buffers.
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


@njit(cache=True, fastmath=True)
def add_rms_norm_into(x, delta, weight, eps, out):  # pragma: no cover - compiled
    """The residual step and the next norm in one pass: x += delta, then out = rms_norm(x) * weight."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for d in range(D):
            x[t, d] += delta[t, d]
            ss += x[t, d] * x[t, d]
        r = np.float32(1.0) / np.sqrt(ss / D + np.float32(eps))
        for d in range(D):
            out[t, d] = x[t, d] * r * weight[d]


@njit(cache=True, fastmath=True, error_model="numpy")  # numpy's: a NaN from an overflowed model flows on, no raise
def decode_attention(qkv, k_cache, v_cache, cos, sin, pos, scores, out):  # pragma: no cover - compiled
    """One token's attention, appending its key and value to the cache.

    qkv: f32[(H + 2KV) * hd] (q, k, v side by side, not yet rotated); k_cache, v_cache: f32[KV, max_seq, hd] (this
    layer's); cos, sin: f32[max_seq, hd/2], rows by position; scores: f32[S] scratch; out: f32[H * hd].
    Rotation pairs element i with i + hd/2 of each head (HF's rotate_half).
    """
    KV, _, hd = k_cache.shape
    H = qkv.shape[0] // hd - 2 * KV
    G, half, S = H // KV, hd // 2, pos + 1
    for j in range(KV):  # rotate and store k, store v
        kb, vb = (H + j) * hd, (H + KV + j) * hd
        for i in range(half):
            a, b = qkv[kb + i], qkv[kb + half + i]
            k_cache[j, pos, i] = a * cos[pos, i] - b * sin[pos, i]
            k_cache[j, pos, half + i] = b * cos[pos, i] + a * sin[pos, i]
        for i in range(hd):
            v_cache[j, pos, i] = qkv[vb + i]
    inv = np.float32(1.0 / math.sqrt(hd))
    q = np.empty(hd, np.float32)
    for h in range(H):
        j = h // G
        qb = h * hd
        for i in range(half):
            a, b = qkv[qb + i], qkv[qb + half + i]
            q[i] = (a * cos[pos, i] - b * sin[pos, i]) * inv
            q[half + i] = (b * cos[pos, i] + a * sin[pos, i]) * inv
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


# 2^r for r in [-1/2, 1/2], degree 5: a least-squares fit of the relative error at 2,000 Chebyshev nodes (numpy,
# float64), rounded to f32; max relative error 8e-8, about f32's half ulp.
EXP2_POLY = tuple(np.float32(c) for c in (1.0000001192092896, 0.6931469440460205, 0.24022121727466583,
                                           0.05550742521882057, 0.009675459936261177, 0.0013266970636323094))
LOG2E = np.float32(1.4426950408889634)


@njit(cache=True, fastmath=True, error_model="numpy")  # an overflowed activation gives inf/NaN, not an exception
def silu_mul_into(gate_up, out):  # pragma: no cover - compiled
    """out[t] = silu(gate) * up = gate / (1 + exp(-gate)) * up for gate_up: f32[T, 2F] = [gate | up].

    exp(-g) = 2^n 2^r with n = rint(-g log2 e) and |r| <= 1/2: 2^n is built in the exponent bits of an f32 (written
    into out first, read back as f32 in the second loop), 2^r by polynomial. Unlike libm's exp, both loops vectorise
    (F = 1536: 1.2 instead of 4 us, decode runs it once a layer). Relative error: below 6e-7 for |g| <= 10, 4e-6
    out to |g| = 87 (the f32 rounding of -g log2 e grows with |g|; libm reduces the range in extra precision).
    -g log2 e is clamped to [-126, 126], so 2^n stays a normal f32: silu(g) for g < -87 comes out tiny, not 0."""
    c0, c1, c2, c3, c4, c5 = EXP2_POLY
    T, F = out.shape
    exponent = out.view(np.int32)
    for t in range(T):
        for f in range(F):
            u = min(max(-gate_up[t, f] * LOG2E, np.float32(-126.0)), np.float32(126.0))
            exponent[t, f] = (np.int32(np.rint(u)) + 127) << 23  # the f32 bits of 2^n
        for f in range(F):
            g = gate_up[t, f]
            u = min(max(-g * LOG2E, np.float32(-126.0)), np.float32(126.0))
            r = u - np.rint(u)
            exp_neg_g = out[t, f] * (c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * c5)))))
            out[t, f] = g / (np.float32(1.0) + exp_neg_g) * gate_up[t, F + f]


@njit(cache=True, error_model="numpy")  # no fastmath: x / s must round as numpy's does (BitNet parity)
def fake_quant_int8(x):  # pragma: no cover - compiled
    """BitNet's activation quantization, in place per row of x: f32[T, D]: x -> clip(rint(x s), -128, 127) / s with
    s = 127 / max(max|x|, 1e-5)."""
    T, D = x.shape
    for t in range(T):
        peak = np.float32(1e-5)
        for d in range(D):
            peak = max(peak, abs(x[t, d]))
        s = np.float32(127.0) / peak
        for d in range(D):
            x[t, d] = min(max(np.rint(x[t, d] * s), np.float32(-128.0)), np.float32(127.0)) / s


@njit(cache=True, fastmath=True)
def relu2_mul_into(gate_up, out):  # pragma: no cover - compiled
    """out[t] = relu(gate)^2 * up for gate_up: f32[T, 2F] = [gate | up] (BitNet's MLP activation)."""
    T, F = out.shape
    for t in range(T):
        for f in range(F):
            g = max(gate_up[t, f], np.float32(0.0))
            out[t, f] = g * g * gate_up[t, F + f]
