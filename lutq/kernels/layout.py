"""The order in which packed weight codes are stored: exactly the order the LUT kernels stream them.

Scheme "bitserial" (layout version 2), for codes q: u8[M, K] of `bits` bits each (int2-6, ternary as q = w + 1):

    rows are cut into tiles of TILE_M = 32 (M is zero-padded up to a whole tile);
    K into pairs of activation groups, 8 columns each (two groups of g = 4 activations);
    one byte holds one row's bit-plane b of one pair, as two 4-bit table indices:

        byte(r, p, b) = nibble(q[r, 8p : 8p+4], b) | nibble(q[r, 8p+4 : 8p+8], b) << 4
        nibble(q[0:4], b) = sum_k bit_b(q[k]) << k

    packed: u8[M_pad / 32, K / 8, bits, 32]     (tile-major: one tile's codes are one contiguous stream)

    inside block [t, p] (bits * 32 bytes), planes go in pairs, row-interleaved, then an odd last plane alone:

        plane pair c (planes 2c, 2c+1), 64 bytes:   r0b0 r0b1 r1b0 r1b1 ... r31b1   (byte 64c + 2r + j: plane 2c+j)
        odd last plane (int3: plane 2), 32 bytes:   r0 r1 ... r31

A 4-bit nibble is the index into the 16-entry table of its activation group: one byte shuffle (pshufb) looks up 32
or 64 bytes at once, low nibbles in group 2p's table, high nibbles in group 2p+1's. Interleaving a pair's two planes
row by row puts each row's two lookups side by side, so one pmaddubsw with multipliers (1, 2) weights the planes and
widens to int16 in one instruction, 32 rows per 64 bytes, in row order.

Scheme "crumbs" (2-bit codes for the VNNI int2 x int8 kernel, ternary's alternative), four codes per byte:

    byte[t, b, r, j] = sum_c q[32t + r, 16b + 4c + j] << 2c          packed: u8[M_pad / 32, K / 16, 32, 4]

    one 64-byte load = 16 rows x 4 bytes; (byte >> 2c) & 3 gives each row the codes of columns 16b+4c .. +3 as
    4 consecutive bytes: exactly the u8 quad vpdpbusd multiplies with a broadcast quad of int8 activations.

Scheme "codebook" (nf4: a 16-entry table per activation, indexed by the whole 4-bit code), a code per nibble:

    per tile t and column quad j (columns 4j .. 4j+3), 64 bytes:
        bytes  0..31, row r:  q[r, 4j]     | q[r, 4j + 1] << 4
        bytes 32..63, row r:  q[r, 4j + 2] | q[r, 4j + 3] << 4          packed: u8[M_pad / 32, K / 4, 2, 32]

    low nibbles look up the tables of columns (4j, 4j+2) in lanes (0-1, 2-3), high nibbles those of (4j+1, 4j+3).

    Scheme "codebook2" (nf2) is this layout of the pair codes, two 2-bit codes per nibble (`pack_codebook_pairs`):
    column pair (2i, 2i+1) is the virtual column i with code q[2i] | q[2i+1] << 2, its table indexed by both codes
    at once; packed: u8[M_pad / 32, K / 8, 2, 32].

Scheme "codebook3" (nf3: a code per nibble, each nibble's spare bit 3 carrying a bit of a fourth code), 16 columns
in three 64-byte registers, column c = 16 b + 4 i + 2 h + j for register i, nibble h (0 low, 1 high), byte parity j:

    per tile t and column block b, register i = 0, 1, 2, byte 2r + j (row r: its two bytes side by side):
        low nibble:   q[r, 16b + 4i + j]      | bit_i(q[r, 16b + 12 + j]) << 3
        high nibble:  q[r, 16b + 4i + 2 + j]  | bit_i(q[r, 16b + 14 + j]) << 3        packed: u8[M_pad / 32, K / 16, 3, 64]

    the spare bits of the three registers make a fourth (columns 16b + 12 .. 15, simd.spare_codes); the index of
    each lookup is the nibble's 3-bit code with bit 3 = j (simd.code_index), into a pair table [cb x_2P | cb x_2P+1]
    of the column pair P = c // 2. Exactly 3 bits per weight, no bit-plane arithmetic: 8 lookups per 16 columns.

Group parameters (`pack_group_params`): per-row scales and biases of each quantization group as fp16, in the same tile
order, so a tile's 32 scales are one 64-byte load: u16[M_pad / 32, K / G, 2, 32] ([..., 0, :] scales, [..., 1, :]
biases; padding rows have zero scale and bias). `pack_group_scales` is the same without biases (nf, fineq).
"""

from __future__ import annotations

import numpy as np

TILE_M = 32
K_MULTIPLE = 8
LAYOUT_VERSION = 2
CODEBOOK_LAYOUT_VERSION = 1  # scheme "codebook" (nf4)
CODEBOOK3_LAYOUT_VERSION = 1  # scheme "codebook3" (nf3)
CODEBOOK2_LAYOUT_VERSION = 1  # scheme "codebook2" (nf2: pack_codebook_pairs)


def padded_rows(m: int) -> int:
    return -(-m // TILE_M) * TILE_M


CHUNK_CODES = 1 << 21


def tile_chunks(m: int, k: int) -> list[slice]:
    """Slices of whole 32-row tiles covering padded_rows(m) rows, about CHUNK_CODES codes each.

    Packing and unpacking work a chunk of tiles at a time (tiles are independent): their bit-plane temporaries are
    several times the codes' size, and over a whole lm_head they would dominate `lutq quantize`'s peak memory.
    """
    tiles, step = padded_rows(m) // TILE_M, max(1, CHUNK_CODES // (TILE_M * max(k, 1)))
    return [slice(t, min(tiles, t + step)) for t in range(0, tiles, step)]


def check_codes(codes: np.ndarray, bits: int, k_multiple: int) -> tuple[int, int]:
    """(M, K) of codes u8[M, K] that a layout can pack: K a multiple of k_multiple, every code below 2**bits."""
    m, k = codes.shape
    if k % k_multiple:
        raise ValueError(f"K = {k} is not a multiple of {k_multiple}")
    if codes.max(initial=0) >= 1 << bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    return m, k


def padded_to_tiles(codes: np.ndarray) -> np.ndarray:
    """codes u8[M, K] with zero rows appended up to M_pad (whole tiles of 32 rows)."""
    q = np.zeros((padded_rows(len(codes)), codes.shape[1]), np.uint8)
    q[: len(codes)] = codes
    return q


def pack_bitserial(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: u8[M, K] with values < 2**bits -> u8[M_pad/32, K/8, bits, 32]."""
    m, k = check_codes(codes, bits, K_MULTIPLE)
    out = np.empty((padded_rows(m) // TILE_M, k // 8, bits, TILE_M), np.uint8)
    for tiles in tile_chunks(m, k):
        rows = codes[tiles.start * TILE_M : tiles.stop * TILE_M]
        out[tiles] = _pack_bitserial_tiles(rows, bits)
    return out


def _pack_bitserial_tiles(codes: np.ndarray, bits: int) -> np.ndarray:
    """pack_bitserial of the rows of whole tiles (fewer rows: zero rows pad the last tile)."""
    k = codes.shape[1]
    q = padded_to_tiles(codes).reshape(-1, TILE_M, k // 8, 2, 4)  # [t, r, p, half, k]
    planes = [((q >> b) & 1) for b in range(bits)]  # each [t, r, p, half, k]
    weights = (1 << np.arange(4, dtype=np.uint8))
    nib = [(pl * weights).sum(axis=-1, dtype=np.uint8) for pl in planes]  # [t, r, p, half]
    byte = np.stack([n[..., 0] | (n[..., 1] << 4) for n in nib], axis=-1)  # [t, r, p, b]
    block = byte.transpose(0, 2, 3, 1).reshape(byte.shape[0], k // 8, bits * TILE_M)  # [t, p, b * r], plane-major
    return np.ascontiguousarray(block[..., _plane_order(bits)]).reshape(-1, k // 8, bits, TILE_M)


def _plane_order(bits: int) -> np.ndarray:
    """Flat index into [b, r] (plane-major) of each stored byte of a block: plane pairs row-interleaved, an odd plane
    last."""
    planes = np.arange(bits * TILE_M).reshape(bits, TILE_M)
    pairs = [planes[2 * c:2 * c + 2].T.reshape(-1) for c in range(bits // 2)]  # r0b0 r0b1 r1b0 ...
    return np.concatenate(pairs + ([planes[-1]] if bits % 2 else []))


def unpack_bitserial(packed: np.ndarray, bits: int, m: int, k: int) -> np.ndarray:
    """The inverse of pack_bitserial: u8[M, K]."""
    t, p, b, r = packed.shape
    if (p * 8, b, r) != (k, bits, TILE_M) or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m}x{k} codes of {bits} bits")
    out = np.empty((t * TILE_M, k), np.uint8)
    for tiles in tile_chunks(t * TILE_M, k):
        out[tiles.start * TILE_M : tiles.stop * TILE_M] = _unpack_bitserial_tiles(packed[tiles], bits)
    return out[:m]


def _unpack_bitserial_tiles(packed: np.ndarray, bits: int) -> np.ndarray:
    t, p, b, r = packed.shape
    k = p * 8
    byte = np.empty((t, p, bits * TILE_M), np.uint8)
    byte[..., _plane_order(bits)] = packed.reshape(t, p, -1)
    byte = byte.reshape(t, p, b, r).transpose(0, 3, 1, 2)  # [t, r, p, b]
    nib = np.stack([byte & 0xF, byte >> 4], axis=3)  # [t, r, p, half, b]
    bitsk = (nib[..., None] >> np.arange(4, dtype=np.uint8)) & 1  # [t, r, p, half, b, k]
    q = (bitsk << np.arange(bits, dtype=np.uint8)[:, None]).sum(axis=4, dtype=np.uint8)  # [t, r, p, half, k]
    return q.reshape(t * TILE_M, k)


def pack_crumbs(codes: np.ndarray) -> np.ndarray:
    """codes: u8[M, K] with values < 4, K a multiple of 16 -> u8[M_pad/32, K/16, 32, 4]."""
    _, k = check_codes(codes, 2, 16)
    q = padded_to_tiles(codes).reshape(-1, TILE_M, k // 16, 4, 4)  # [t, r, b, c, j]
    byte = (q << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=3, dtype=np.uint8)  # [t, r, b, j]
    return np.ascontiguousarray(byte.transpose(0, 2, 1, 3))


def unpack_crumbs(packed: np.ndarray, m: int, k: int) -> np.ndarray:
    """The inverse of pack_crumbs: u8[M, K]."""
    t, b, r, j = packed.shape
    if (b * 16, r, j) != (k, TILE_M, 4) or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m}x{k} 2-bit codes")
    q = (packed.transpose(0, 2, 1, 3)[:, :, :, None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    return q.reshape(t * TILE_M, k)[:m]


def pack_codebook(codes: np.ndarray) -> np.ndarray:
    """codes: u8[M, K] with values < 16, K a multiple of 4 -> u8[M_pad/32, K/4, 2, 32]."""
    _, k = check_codes(codes, 4, 4)
    q = padded_to_tiles(codes).reshape(-1, TILE_M, k // 4, 2, 2)  # [t, r, j, half, lo/hi]
    return np.ascontiguousarray((q[..., 0] | (q[..., 1] << 4)).transpose(0, 2, 3, 1))


def unpack_codebook(packed: np.ndarray, m: int, k: int) -> np.ndarray:
    """The inverse of pack_codebook: u8[M, K]."""
    t, j, h, r = packed.shape
    if (j * 4, h, r) != (k, 2, TILE_M) or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m}x{k} 4-bit codes")
    byte = packed.transpose(0, 3, 1, 2)  # [t, r, j, half]
    return np.stack([byte & 0xF, byte >> 4], axis=-1).reshape(t * TILE_M, k)[:m]


def pack_codebook_pairs(codes: np.ndarray) -> np.ndarray:
    """2-bit codes u8[M, K], K a multiple of 8 -> the codebook layout of the K/2 pair codes: u8[M_pad/32, K/8, 2, 32]"""
    check_codes(codes, 2, 8)
    return pack_codebook(codes[:, 0::2] | (codes[:, 1::2] << 2))


def unpack_codebook_pairs(packed: np.ndarray, m: int, k: int) -> np.ndarray:
    """The inverse of pack_codebook_pairs: u8[M, K]."""
    pairs = unpack_codebook(packed, m, k // 2)
    return np.stack([pairs & 3, pairs >> 2], axis=-1).reshape(m, k)


def pack_codebook3(codes: np.ndarray) -> np.ndarray:
    """codes: u8[M, K] with values < 8, K a multiple of 16 -> u8[M_pad/32, K/16, 3, 64]."""
    m, k = check_codes(codes, 3, 16)
    out = np.empty((padded_rows(m) // TILE_M, k // 16, 3, 2 * TILE_M), np.uint8)
    for tiles in tile_chunks(m, k):
        c = padded_to_tiles(codes[tiles.start * TILE_M : tiles.stop * TILE_M]).reshape(-1, TILE_M, k // 16, 4, 2, 2)
        regs = np.stack([c[:, :, :, i] | (((c[:, :, :, 3] >> i) & 1) << 3) for i in range(3)], axis=3)  # [t,r,b,i,h,j]
        byte = regs[..., 0, :] | (regs[..., 1, :] << 4)  # [t, r, b, i, j]
        out[tiles] = byte.transpose(0, 2, 3, 1, 4).reshape(-1, k // 16, 3, 2 * TILE_M)
    return out


def unpack_codebook3(packed: np.ndarray, m: int, k: int) -> np.ndarray:
    """The inverse of pack_codebook3: u8[M, K]."""
    t, b, i, r = packed.shape
    if (b * 16, i, r) != (k, 3, 2 * TILE_M) or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m}x{k} 3-bit codes")
    out = np.empty((t * TILE_M, k), np.uint8)
    for tiles in tile_chunks(t * TILE_M, k):
        byte = packed[tiles].reshape(-1, b, 3, TILE_M, 2).transpose(0, 3, 1, 2, 4)  # [t, r, b, i, j]
        nib = np.stack([byte & 0xF, byte >> 4], axis=4)  # [t, r, b, i, h, j]
        fourth = sum(((nib[:, :, :, i] >> 3) & 1) << i for i in range(3)).astype(np.uint8)  # [t, r, b, h, j]
        c = np.concatenate([nib & 7, fourth[:, :, :, None]], axis=3)  # [t, r, b, 4, h, j]
        out[tiles.start * TILE_M : tiles.stop * TILE_M] = c.reshape(-1, k)
    return out[:m]


def pack_group_scales(scales: np.ndarray) -> np.ndarray:
    """Scales alone (formats without biases): f32[M, K/G] -> u16[M_pad/32, K/G, 32], fp16 bits in tile order."""
    m, n = scales.shape
    out = np.zeros((padded_rows(m), n), np.float16)
    out[:m] = scales
    return np.ascontiguousarray(out.reshape(-1, TILE_M, n).transpose(0, 2, 1)).view(np.uint16)


def pack_group_params(scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """scales, biases: f32[M, K/G] -> u16[M_pad/32, K/G, 2, 32], fp16 bits in tile order (values round to fp16)."""
    if scales.shape != biases.shape or scales.ndim != 2:
        raise ValueError(f"scales {scales.shape} and biases {biases.shape} must be the same [M, K/G] shape")
    m, n = scales.shape
    out = np.zeros((padded_rows(m), 2, n), np.float16)
    out[:m, 0], out[:m, 1] = scales, biases
    return np.ascontiguousarray(out.reshape(-1, TILE_M, 2, n).transpose(0, 3, 2, 1)).view(np.uint16)
