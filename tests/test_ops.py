"""The decode step's compiled operations (lutq/runtime/ops.py) against float64 numpy, attention also against the
prefill path."""

from __future__ import annotations

import numpy as np
import pytest

from lutq.config import ModelConfig
from lutq.errors import LutqError
from lutq.runtime.attention import KVCache
from lutq.runtime.ops import add_rms_norm_into, rms_norm_into, silu_mul_into


def test_silu_mul_matches_float64():
    g = np.concatenate([np.linspace(-87, 87, 174001), [-1e-30, 0.0, 1e-30]]).astype(np.float32)
    up = np.random.default_rng(0).uniform(-3, 3, g.size).astype(np.float32)
    out = np.empty((1, g.size), np.float32)
    silu_mul_into(np.concatenate([g, up])[None], out)
    g64 = g.astype(np.float64)
    want = g64 / (1.0 + np.exp(-g64)) * up
    rel = np.abs(out[0] - want) / np.maximum(np.abs(want), 1e-300)
    assert rel[np.abs(g) <= 10].max() <= 6e-7
    assert rel.max() <= 4e-6


def test_silu_mul_far_tails_stay_finite():
    g = np.array([-1e4, -200.0, -88.0, 88.0, 200.0, 3e38], np.float32)
    out = np.empty((2, g.size), np.float32)
    gate_up = np.tile(np.concatenate([g, np.ones_like(g)]), (2, 1))
    silu_mul_into(gate_up, out)
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out[:, :3]) < 1e-30)  # silu(g) -> 0 for g << 0
    np.testing.assert_allclose(out[:, 3:], np.tile(g[3:], (2, 1)), rtol=1e-6)  # silu(g) -> g for g >> 0


def test_elementwise_ops_do_not_depend_on_where_their_output_lies():
    """The same inputs give the same bits whether the output buffer lies before or after the input in memory. LLVM
    versions a loop whose store may alias its loads (a vector body and a scalar fallback, chosen at run time by the
    addresses); under full fast-math the two rounded silu differently, so a model's logits changed between its
    first and later forwards (their buffers came from different places)."""
    from lutq.runtime.ops import relu2_mul_into

    rng = np.random.default_rng(3)
    T, F = 64, 1536
    gate_up = (rng.standard_normal((T, 2 * F)) * 3).astype(np.float32)
    x, weight = (rng.standard_normal((T, 576)) * 3).astype(np.float32), rng.standard_normal(576).astype(np.float32)
    for fn, src, n_out, extra in ((silu_mul_into, gate_up, F, ()), (relu2_mul_into, gate_up, F, ()),
                                  (rms_norm_into, x, x.shape[1], (weight, 1e-5))):
        results = []
        n_in, n_o = src.size, T * n_out
        buf = np.empty(n_in + n_o + 32, np.float32)
        for i0, o0 in ((0, n_in), (0, n_in + 5), (n_o, 0), (n_o + 7, 0)):  # output after the input, then before it
            inp = buf[i0:i0 + n_in].reshape(src.shape)
            inp[:] = src
            out = buf[o0:o0 + n_o].reshape(T, n_out)
            fn(inp, *extra, out)
            results.append(out.copy())
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0], err_msg=fn.__name__)


def test_add_rms_norm_is_the_residual_then_the_norm():
    rng = np.random.default_rng(1)
    x, delta = rng.standard_normal((3, 576)).astype(np.float32), rng.standard_normal((3, 576)).astype(np.float32)
    weight = rng.uniform(0.5, 2, 576).astype(np.float32)
    want_x = x.astype(np.float64) + delta
    want = want_x / np.sqrt((want_x ** 2).mean(-1, keepdims=True) + 1e-5) * weight
    out, plain = np.empty_like(x), np.empty_like(x)
    summed = x + delta
    rms_norm_into(summed, weight, 1e-5, plain)
    add_rms_norm_into(x, delta, weight, 1e-5, out)
    np.testing.assert_allclose(x, want_x, rtol=1e-6)  # x updated in place
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-7)


def attention_reference(qkv: np.ndarray, cfg, cos, sin) -> np.ndarray:
    """Causal GQA attention in float64 over all positions: qkv f32[T, (H + 2KV) hd] -> f32[T, H hd]."""
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T, half = qkv.shape[0], hd // 2
    x = qkv.astype(np.float64).reshape(T, H + 2 * KV, hd)
    c, s = cos[:T, None, :].astype(np.float64), sin[:T, None, :].astype(np.float64)
    rot = np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)
    q, k, v = rot[:, :H], rot[:, H:H + KV], x[:, H + KV:]
    out = np.empty((T, H, hd))
    for h in range(H):
        scores = q[:, h] @ k[:, h // (H // KV)].T / np.sqrt(hd)  # [T, T]
        scores[np.triu_indices(T, 1)] = -np.inf
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // (H // KV)]
    return out.reshape(T, H * hd)


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 16), (4, 4, 128), (8, 2, 36)])
def test_decode_attention_matches_prefill_and_float64(heads, kv_heads, head_dim, kv):
    """One token at a time (decode_attention, keys in blocks of 32 positions) against the whole sequence at once
    (numpy prefill) and float64, across block boundaries (positions 0..69), for head sizes that are and are not
    whole vectors of 32, with an f32 and an fp16 cache (fp16: keys and values rounded to 11 bits, so within 2e-3)."""
    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=heads * head_dim, intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=128)
    T = 70
    qkv = np.random.default_rng(2).standard_normal((T, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    stepped, whole = KVCache(cfg, 100, kv), KVCache(cfg, 100, kv)
    got = []
    for t in range(T):
        stepped.pos = t  # attend appends at pos; the model's forward advances it
        got.append(stepped.attend(1, qkv[t:t + 1], None))
    got = np.concatenate(got)
    want = whole.attend(1, qkv, whole.causal_mask(T))
    ref = attention_reference(qkv, cfg, whole.cos, whole.sin)
    tol = (2e-5 if kv == "f32" else 2e-3) * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=tol)
    np.testing.assert_allclose(want, ref, atol=tol)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(ref).max())  # the same cache contents either way
    # rotated keys to one rounding step: numba contracts the rotation into FMAs
    keys, stored = stepped.k_np[1].astype(np.float32), whole.k_np[1].astype(np.float32)
    np.testing.assert_allclose(keys, stored, rtol=1e-6 if kv == "f32" else 1e-3, atol=1e-6)
    np.testing.assert_array_equal(stepped.v[1], whole.v[1])


def test_kv_cache_type_is_checked():
    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    assert KVCache(cfg, 40, "f16").k.dtype == np.uint16 and KVCache(cfg, 40).k.dtype == np.float32
    with pytest.raises(LutqError, match="KV cache type"):
        KVCache(cfg, 40, "bf16")
