"""Rotary position embeddings: the inverse frequencies (plain, `linear`, `llama3` scaling) and their cos/sin tables.

lutq keeps q/k in HF's layout, where a head's first half pairs with its second half ("rotate_half"), not llama.cpp's
interleaved pairs: the GGUF reader undoes llama.cpp's row permutation so one convention serves every checkpoint.
"""

from __future__ import annotations

import math

import numpy as np

from lutq.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """f64[head_dim/2]: theta^(-2i/d), rescaled as cfg.rope_scaling says."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    kind, s = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / float(s["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended linearly.
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: f32[max_seq, head_dim/2], computed in float64 once."""
    angles = np.outer(np.arange(max_seq, dtype=np.float64), inv_frequencies(cfg))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate x: f32[T, n_heads, head_dim] in place; cos, sin: f32[T, head_dim/2] for its positions."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half].copy(), x[..., half:]
    x[..., :half] = x1 * c - x2 * s
    x[..., half:] = x2 * c + x1 * s
