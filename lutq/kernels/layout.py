"""The order in which packed weight codes are stored: exactly the order the LUT kernels stream them.

Scheme "bitserial" (layout version 1), for codes q: u8[M, K] of `bits` bits each (int2/3/4, ternary as q = w + 1):

    rows are cut into tiles of TILE_M = 32 (M is zero-padded up to a whole tile);
    K into pairs of activation groups, 8 columns each (two groups of g = 4 activations);
    for every tile t, pair p and bit-plane b, 32 bytes, one per row r of the tile:

        byte[t, p, b, r] = nibble(q[32t + r, 8p : 8p+4], b) | nibble(q[32t + r, 8p+4 : 8p+8], b) << 4
        nibble(q[0:4], b) = sum_k bit_b(q[k]) << k

    packed: u8[M_pad / 32, K / 8, bits, 32]     (tile-major: one tile's codes are one contiguous stream)

A 4-bit nibble is the index into the 16-entry table of its activation group: one byte shuffle (pshufb) looks up 32
rows of one plane at once, the low nibbles in group 2p's table and the high nibbles in group 2p+1's.
"""

from __future__ import annotations

import numpy as np

TILE_M = 32
K_MULTIPLE = 8
LAYOUT_VERSION = 1


def padded_rows(m: int) -> int:
    return -(-m // TILE_M) * TILE_M


def pack_bitserial(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: u8[M, K] with values < 2**bits -> u8[M_pad/32, K/8, bits, 32]."""
    m, k = codes.shape
    if k % K_MULTIPLE:
        raise ValueError(f"K = {k} is not a multiple of {K_MULTIPLE}")
    if codes.max(initial=0) >= 1 << bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    q = np.zeros((padded_rows(m), k), np.uint8)
    q[:m] = codes
    q = q.reshape(-1, TILE_M, k // 8, 2, 4)  # [t, r, p, half, k]
    planes = [((q >> b) & 1) for b in range(bits)]  # each [t, r, p, half, k]
    weights = (1 << np.arange(4, dtype=np.uint8))
    nib = [(pl * weights).sum(axis=-1, dtype=np.uint8) for pl in planes]  # [t, r, p, half]
    byte = [n[..., 0] | (n[..., 1] << 4) for n in nib]  # [t, r, p]
    return np.ascontiguousarray(np.stack(byte, axis=0).transpose(1, 3, 0, 2))  # [t, p, b, r]


def unpack_bitserial(packed: np.ndarray, bits: int, m: int, k: int) -> np.ndarray:
    """The inverse of pack_bitserial: u8[M, K]."""
    t, p, b, r = packed.shape
    if (p * 8, b, r) != (k, bits, TILE_M) or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m}x{k} codes of {bits} bits")
    byte = packed.transpose(0, 3, 1, 2)  # [t, r, p, b]
    nib = np.stack([byte & 0xF, byte >> 4], axis=3)  # [t, r, p, half, b]
    bitsk = (nib[..., None] >> np.arange(4, dtype=np.uint8)) & 1  # [t, r, p, half, b, k]
    q = (bitsk << np.arange(bits, dtype=np.uint8)[:, None]).sum(axis=4, dtype=np.uint8)  # [t, r, p, half, k]
    return q.reshape(t * TILE_M, k)[:m]
