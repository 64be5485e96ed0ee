"""BitNet b1.58 checkpoints as transformers stores them (`quantization_config.quant_method == "bitnet"`).

A ternary weight t: {-1,0,1}[M, K] is stored as u8[M/4, K], 2 bits a value holding t + 1, four row blocks interleaved:

    packed[r, k] = (t[r, k] + 1) | (t[R + r, k] + 1) << 2 | (t[2R + r, k] + 1) << 4 | (t[3R + r, k] + 1) << 6,  R = M/4

and each linear layer carries a scalar `weight_scale`: the layer computes (x @ t.T) * weight_scale for
linear_class "autobitlinear" (microsoft/bitnet-b1.58-2B-4T), and (x @ t.T) / weight_scale for "bitlinear".
"""

from __future__ import annotations

import numpy as np

from lutq.errors import CheckpointError


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """u8[M/4, K] -> f32[M, K] with values in {-1, 0, 1}."""
    blocks = [((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)]
    return np.concatenate(blocks, axis=0).astype(np.float32)


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """The inverse of unpack_ternary, for tests and for writing BitNet checkpoints: {-1,0,1}[M, K] -> u8[M/4, K]."""
    if t.shape[0] % 4:
        raise ValueError(f"{t.shape[0]} rows is not a multiple of 4")
    q = (np.asarray(t) + 1).astype(np.uint8).reshape(4, t.shape[0] // 4, t.shape[1])
    return (q[0] | q[1] << 2 | q[2] << 4 | q[3] << 6).astype(np.uint8)


def effective_weight(ternary: np.ndarray, weight_scale: np.ndarray, linear_class: str, where: str) -> np.ndarray:
    """The fp32 weight W with y = x @ W.T that the layer computes (the scale folded in: exact, t is +-1 or 0)."""
    if weight_scale.size != 1:
        raise CheckpointError(where, f"weight_scale has {weight_scale.size} values, expected one")
    s = np.float32(weight_scale.reshape(()))
    if linear_class == "bitlinear":
        if s == 0:
            raise CheckpointError(where, "weight_scale is zero")
        return ternary / s
    return ternary * s
