"""The decode step's small compiled operations (lutq/runtime/ops.py) against float64 numpy."""

from __future__ import annotations

import numpy as np

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
