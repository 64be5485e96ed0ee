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

from lutq.kernels.simd import (fma_f32, load_f32_from, load_f32x32_from, splat_f32, store_f32_to, store_f32x32, vadd,
                               zeros_f32x32)


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


# 2^r for r in [-1/2, 1/2], degree 5: a least-squares fit of the relative error at 2,000 Chebyshev nodes (numpy,
# float64), rounded to f32; max relative error 8e-8, about f32's half ulp.
EXP2_POLY = tuple(np.float32(c) for c in (1.0000001192092896, 0.6931469440460205, 0.24022121727466583,
                                           0.05550742521882057, 0.009675459936261177, 0.0013266970636323094))
LOG2E = np.float32(1.4426950408889634)

# A vectorisable 2^u, used in two passes over an array (libm's exp keeps a loop scalar): 2^u = 2^n 2^r with
# n = rint(u), |r| <= 1/2. The first pass writes the f32 bits of 2^n into an int32 array, the second reads them back
# as f32 through a view and multiplies by the polynomial 2^r. u is clamped to [-126, 126]: 2^n stays a normal f32.


@njit(inline="always")
def exp2_exponent_bits(u):  # pragma: no cover - compiled
    """The f32 bits of 2^rint(u)."""
    u = min(max(u, np.float32(-126.0)), np.float32(126.0))
    return (np.int32(np.rint(u)) + 127) << 23


@njit(inline="always")
def exp2_fraction(u):  # pragma: no cover - compiled
    """2^(u - rint(u))."""
    c0, c1, c2, c3, c4, c5 = EXP2_POLY
    u = min(max(u, np.float32(-126.0)), np.float32(126.0))
    r = u - np.rint(u)
    return c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * c5))))


# Decode attention over the cache (one token, all heads). The keys are stored in blocks of 32 positions:
#
#   k_cache[kv head, block, i, lane] = key element i of position 32 block + lane      (8 KB a block at hd = 64)
#
# so 32 positions' scores are one f32x32 accumulator: hd fused multiply-adds of a contiguous 32-float row by a splat
# query element, no horizontal sums (four accumulators in flight: an FMA's latency is four issue slots). The values
# stay position-major, v_cache[kv head, position, i]: 32 output elements of a head are one accumulator over positions.
# The G query heads sharing a key/value head go through each block while it is in L1, so the cache is read from
# memory once per token, not G times. Scores of positions past the last in a block are computed and never read.


@njit(cache=True, fastmath=True, error_model="numpy")  # numpy's: a NaN from an overflowed model flows on, no raise
def decode_attention(qkv, k_cache, v_cache, cos, sin, pos, scores, exponent, out):  # pragma: no cover - compiled
    """One token's attention at position `pos`, appending its key and value to the cache.

    qkv: f32[(H + 2KV) * hd] (q, k, v side by side, not yet rotated); k_cache: [KV, NB, hd, 32] (this layer's, in
    blocks as drawn above); v_cache: [KV, max_seq, hd], both f32 or u16 holding fp16 (KVCache's dtype: read and
    written through load_f32x32_from / store_f32_to); cos, sin: f32[max_seq, hd/2], rows by position; scores:
    f32[G * NB * 32] and exponent: i32[NB * 32], scratch; out: f32[H * hd]. Rotation pairs element i with i + hd/2 of
    each head (HF's rotate_half).
    """
    KV, NB, hd, _ = k_cache.shape
    H = qkv.shape[0] // hd - 2 * KV
    G, half, S, M, P = H // KV, hd // 2, pos + 1, v_cache.shape[1], NB * 32
    last, lane = pos // 32, pos % 32
    for j in range(KV):  # rotate and store k, store v
        kb, vb = (H + j) * hd, (H + KV + j) * hd
        for i in range(half):
            a, b = qkv[kb + i], qkv[kb + half + i]
            key = ((j * NB + last) * hd + i) * 32 + lane
            store_f32_to(k_cache, key, a * cos[pos, i] - b * sin[pos, i])
            store_f32_to(k_cache, key + half * 32, b * cos[pos, i] + a * sin[pos, i])
        for i in range(hd):
            store_f32_to(v_cache, (j * M + pos) * hd + i, qkv[vb + i])
    inv = np.float32(1.0 / math.sqrt(hd))
    q = np.empty(G * hd, np.float32)
    bits = exponent[:S]
    powers = bits.view(np.float32)
    for j in range(KV):
        for g in range(G):  # the G rotated queries, scaled by 1/sqrt(hd)
            qb, qg = (j * G + g) * hd, g * hd
            for i in range(half):
                a, b = qkv[qb + i], qkv[qb + half + i]
                q[qg + i] = (a * cos[pos, i] - b * sin[pos, i]) * inv
                q[qg + half + i] = (b * cos[pos, i] + a * sin[pos, i]) * inv
        for blk in range(last + 1):  # scores[g * P + s] = q_g . key_s
            kbase = (j * NB + blk) * hd * 32
            for g in range(G):
                acc0 = acc1 = acc2 = acc3 = zeros_f32x32()
                qg = g * hd
                for i in range(0, hd - 3, 4):
                    row = kbase + i * 32
                    acc0 = fma_f32(load_f32x32_from(k_cache, row), splat_f32(q[qg + i]), acc0)
                    acc1 = fma_f32(load_f32x32_from(k_cache, row + 32), splat_f32(q[qg + i + 1]), acc1)
                    acc2 = fma_f32(load_f32x32_from(k_cache, row + 64), splat_f32(q[qg + i + 2]), acc2)
                    acc3 = fma_f32(load_f32x32_from(k_cache, row + 96), splat_f32(q[qg + i + 3]), acc3)
                for i in range(hd - hd % 4, hd):
                    acc0 = fma_f32(load_f32x32_from(k_cache, kbase + i * 32), splat_f32(q[qg + i]), acc0)
                store_f32x32(scores, g * P + blk * 32, vadd(vadd(acc0, acc1), vadd(acc2, acc3)))
        for g in range(G):  # softmax: the scores become the value rows' weights
            row = scores[g * P:g * P + S]
            m = np.float32(-np.inf)
            for s in range(row.shape[0]):
                if row[s] > m:
                    m = row[s]
            for s in range(row.shape[0]):
                bits[s] = exp2_exponent_bits((row[s] - m) * LOG2E)
            total = np.float32(0.0)
            for s in range(row.shape[0]):
                row[s] = powers[s] * exp2_fraction((row[s] - m) * LOG2E)
                total += row[s]
            r = np.float32(1.0) / total
            for s in range(row.shape[0]):
                row[s] *= r
        heads = out[j * G * hd:(j + 1) * G * hd]
        heads[:] = 0.0
        for s0 in range(0, S, 32):  # out_g = sum_s weight_gs value_s, 32 positions (8 KB) at a time for all G
            s1 = min(s0 + 32, S)
            for g in range(G):
                w, o = g * P, (j * G + g) * hd
                if hd % 32:  # no whole vectors along hd: plain loops
                    for s in range(s0, s1):
                        p, row = scores[w + s], (j * M + s) * hd
                        for i in range(hd):
                            out[o + i] += p * load_f32_from(v_cache, row + i)
                    continue
                for c in range(0, hd, 32):
                    acc0 = acc1 = acc2 = acc3 = zeros_f32x32()
                    for s in range(s0, s1 - 3, 4):
                        row = (j * M + s) * hd + c
                        acc0 = fma_f32(load_f32x32_from(v_cache, row), splat_f32(scores[w + s]), acc0)
                        acc1 = fma_f32(load_f32x32_from(v_cache, row + hd), splat_f32(scores[w + s + 1]), acc1)
                        acc2 = fma_f32(load_f32x32_from(v_cache, row + 2 * hd), splat_f32(scores[w + s + 2]), acc2)
                        acc3 = fma_f32(load_f32x32_from(v_cache, row + 3 * hd), splat_f32(scores[w + s + 3]), acc3)
                    for s in range(s1 - (s1 - s0) % 4, s1):
                        acc0 = fma_f32(load_f32x32_from(v_cache, (j * M + s) * hd + c), splat_f32(scores[w + s]), acc0)
                    acc = vadd(vadd(acc0, acc1), vadd(acc2, acc3))
                    store_f32x32(out, o + c, vadd(load_f32x32_from(out, o + c), acc))


# fastmath only 'contract' (FMAs): with the full set, the loop's vector body and its scalar fallback rounded
# differently (1 ulp), and LLVM picks one or the other at run time by where out lies from gate_up, so the same
# model's logits changed between forwards (tests/test_ops.py). Decode speed unchanged (1.4-1.5 us at F = 1536).
# numpy's error model: an overflowed activation gives inf/NaN, not an exception.
@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def silu_mul_into(gate_up, out):  # pragma: no cover - compiled
    """out[t] = silu(gate) * up = gate / (1 + exp(-gate)) * up for gate_up: f32[T, 2F] = [gate | up].

    exp(-g) in two passes, exp2_exponent_bits into out's bits, then exp2_fraction: unlike libm's exp, both loops
    vectorise (F = 1536: 1.2 instead of 4 us, decode runs it once a layer). Relative error: below 6e-7 for
    |g| <= 10, 4e-6 out to |g| = 87 (the f32 rounding of -g log2 e grows with |g|; libm reduces the range in extra
    precision). -g log2 e is clamped to [-126, 126], so 2^n stays a normal f32: silu(g) for g < -87 comes out tiny,
    not 0."""
    T, F = out.shape
    exponent = out.view(np.int32)
    for t in range(T):
        for f in range(F):
            exponent[t, f] = exp2_exponent_bits(-gate_up[t, f] * LOG2E)
        for f in range(F):
            g = gate_up[t, f]
            out[t, f] = g / (np.float32(1.0) + out[t, f] * exp2_fraction(-g * LOG2E)) * gate_up[t, F + f]


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
