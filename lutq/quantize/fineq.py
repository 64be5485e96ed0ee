"""fineq: FineQ-style fine-grained outlier clusters, 8 bits per cluster of 3 weights (2.67 bits/weight + scales).

Each row (K padded with zero columns to a multiple of 3) is cut into clusters of 3 consecutive weights, and each
cluster is one byte: a 2-bit mode in bits 7-6 and 6 bits of payload.

    mode 0  (normal):  three 2-bit codes c0, c1, c2 in bits 1-0, 3-2, 5-4;   w_i = s * (c_i - 1.5)
    mode j  (j=1..3):  weight j-1 is zero; the other two, in order, hold 3-bit codes
                       d0 in bits 2-0 and d1 in bits 5-3;                     w = s * (d - 3.5)

Both grids are symmetric and mid-rise with the same step s, so the 3-bit grid extends the 2-bit one (±0.5s, ±1.5s)
out to ±3.5s: a cluster holding an outlier trades its weight closest to zero for the range to represent the outlier.
Every cluster takes the mode with the smallest squared error (all four are evaluated exactly).

Where the paper leaves it open, lutq chooses:
- The scale: one fp16 scale per group, and a group is made of whole clusters: cluster c (weights 3c..3c+2) uses the
  scale of group (3c) // G. So a cluster never straddles two scales (a LUT kernel multiplies a cluster's table sum by
  one scale), the scales array is [M, K/G] like every other format's, and with G = 64 the groups hold 22, 21, 21, ...
  clusters (their first weights fall in [gG, (g+1)G)).
- Plain rounding puts the group's largest |w| on the outermost 3-bit level: s = absmax / 3.5. The scale search tries
  smaller scales (finer 2-bit steps, relying on outlier clusters for the tails), refits the least-squares scale for
  each candidate's codes, runs Lloyd rounds, rounds to fp16, and keeps per group the better of that and plain.
- Padding columns (zeros, at most 2) are "don't care": they never count in the error and dequantize drops them.

Packed layout 2 (the kernel streams whole tiles of 32 rows): clusters u8[M_pad / 32, C, 32], rows innermost, so byte
[t, c, r] is cluster c of row 32t + r and one 32-byte load serves 32 rows of one cluster. Each is stored with its
bit pairs 7-6 and 5-4 swapped (`stored_bytes`: the mode in bits 5-4), so that the kernel's table indices are the
byte's low six bits and its high nibble as they stand (lutq/kernels/fineq.py). Layout 1 stored the cluster bytes
unchanged; directories holding it are still read (dequantize, and the runtime re-orders the bytes at load).
"""

from __future__ import annotations

import numpy as np

from lutq.kernels.layout import TILE_M, padded_rows
from lutq.quantize.packed import PackedTensor, check_shape, for_row_chunks, is_int, stored_dims, to_f16

LAYOUT_VERSION = 2
READABLE_LAYOUT_VERSIONS = (1, 2)  # layout 1: cluster bytes as they are (no swap)
SCALE_GRID = np.linspace(0.35, 1.0, 8, dtype=np.float32)  # candidate scale / plain scale
LLOYD_ROUNDS = 3
# For mode j (1..3), the positions (within the cluster) of the two weights kept at 3 bits.
KEPT = np.array([[1, 2], [0, 2], [0, 1]])


def cluster_groups(n_clusters: int, group_size: int) -> np.ndarray:
    """Index of the scale group of each cluster: i64[C]."""
    return (3 * np.arange(n_clusters)) // group_size


def assign(u: np.ndarray, care: np.ndarray | None):
    """Best mode per cluster for u = x / s: f32[R, C, 3] in units of the scale.

    Returns (outlier f32[R, C, 3]: one-hot of the zeroed weight, all zero for a normal cluster; c2, c3: the 2- and
    3-bit codes of every weight; err f32[R, C]: the cluster's squared error in units of s^2).
    care: f32[C, 3], 0 on padding columns, or None when there are none.
    """
    c2 = np.clip(np.rint(u + 1.5), 0, 3)  # 2-bit code: level c2 - 1.5
    c3 = np.clip(np.rint(u + 3.5), 0, 7)  # 3-bit code: level c3 - 3.5
    r2 = (u - (c2 - 1.5)) ** 2
    r3 = (u - (c3 - 3.5)) ** 2
    z = u * u
    if care is not None:
        r2, r3, z = r2 * care, r3 * care, z * care
    # Mode j+1 costs z_j plus the 3-bit error of the other two = sum(r3) + (z_j - r3_j): pick the cheapest j.
    trade = z - r3
    j = np.argmin(trade, axis=-1)  # [R, C]
    e_out = r3.sum(-1) + np.take_along_axis(trade, j[..., None], -1)[..., 0]
    e_norm = r2.sum(-1)
    outlier = (e_out < e_norm)[..., None] & (np.arange(3) == j[..., None])  # [R, C, 3]
    return outlier, c2, c3, np.minimum(e_norm, e_out)


def values(outlier: np.ndarray, c2: np.ndarray, c3: np.ndarray) -> np.ndarray:
    """The levels a cluster decodes to, in units of the scale: f32[R, C, 3]."""
    has = outlier.any(-1, keepdims=True)
    return np.where(has, np.where(outlier, 0, c3 - 3.5), c2 - 1.5)


def to_bytes(outlier: np.ndarray, c2: np.ndarray, c3: np.ndarray) -> np.ndarray:
    """The cluster bytes: u8[R, C]."""
    c2, c3 = c2.astype(np.uint8), c3.astype(np.uint8)
    byte = c2[..., 0] | (c2[..., 1] << 2) | (c2[..., 2] << 4)
    for j in range(3):
        a, b = KEPT[j]
        byte = np.where(outlier[..., j], ((j + 1) << 6) | c3[..., a] | (c3[..., b] << 3), byte)
    return byte.astype(np.uint8)


def cluster_table() -> np.ndarray:
    """Every byte's three values in units of the scale, f32[256, 3]: the map docs/FORMAT.md tabulates."""
    table = np.zeros((256, 3), np.float32)
    for b in range(256):
        mode, payload = b >> 6, b & 63
        if mode == 0:
            table[b] = [((payload >> (2 * i)) & 3) - 1.5 for i in range(3)]
        else:
            table[b, KEPT[mode - 1]] = [(payload & 7) - 3.5, (payload >> 3) - 3.5]
    return table


CLUSTER_VALUES = cluster_table()


def group_sum(v: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum f64[R, C] over each group's clusters: f64[R, n_groups]."""
    return np.add.reduceat(v, starts, axis=1)


def fit_rows(x: np.ndarray, group_size: int, refine: bool, care: np.ndarray | None):
    """x: f32[R, C, 3] -> (bytes u8[R, C], scales f32[R, n_groups] as fp16 values)."""
    gidx = cluster_groups(x.shape[1], group_size)
    starts = np.flatnonzero(np.diff(gidx, prepend=-1))
    amax = np.maximum.reduceat(np.abs(x).max(-1), starts, axis=1)  # [R, n_groups]
    s0 = to_f16(amax / 3.5).astype(np.float32)
    # All-zero groups, and groups so small (|w| < ~1e-7) that their scale is below fp16's smallest: searched with
    # any scale, stored as 0 (mid-rise grids have no exact zero, and a made-up scale would decode them as +-0.5).
    zero = s0 == 0
    s0 = np.where(zero, 1.0, s0)

    def encode(s):
        return assign(x / s[:, gidx, None], care)

    def group_error(s):
        return group_sum(encode(s)[3], starts) * s * s

    if not refine:
        return to_bytes(*encode(s0)[:3]), np.where(zero, 0, s0)
    err0 = group_error(s0)
    best_err, best_s = np.full(s0.shape, np.inf, np.float32), s0
    for f in SCALE_GRID:
        err = group_error(s0 * f)
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s0 * f, best_s)
    s = best_s
    for _ in range(LLOYD_ROUNDS):
        v = values(*encode(s)[:3])  # least-squares scale for these codes: sum(v x) / sum(v v) per group
        svx = group_sum(np.einsum("rci,rci->rc", v, x), starts)
        svv = group_sum(np.einsum("rci,rci->rc", v, v), starts)
        s = np.where((svv > 0) & (svx > 0), svx / np.where(svv > 0, svv, 1), s)
    s = to_f16(s).astype(np.float32)
    s = np.where(s > 0, s, s0)
    better = group_error(s) < err0
    s = np.where(better, s, s0)
    return to_bytes(*encode(s)[:3]), np.where(zero, 0, s)


def stored_bytes(b: np.ndarray) -> np.ndarray:
    """Cluster bytes <-> stored bytes (layout 2): bits 7-6 and 5-4 swapped, mode << 6 | payload becoming
    (payload >> 4) << 6 | mode << 4 | (payload & 15). Its own inverse."""
    return (b & 0x0F) | ((b & 0x30) << 2) | ((b & 0xC0) >> 2)


def pack(clusters: np.ndarray) -> np.ndarray:
    """Cluster bytes u8[M, C] -> stored u8[M_pad/32, C, 32]: tiles of 32 rows, rows innermost (zero rows pad the last
    tile)."""
    m, c = clusters.shape
    out = np.zeros((padded_rows(m), c), np.uint8)
    out[:m] = stored_bytes(clusters)
    return np.ascontiguousarray(out.reshape(-1, TILE_M, c).transpose(0, 2, 1))


def unpack(packed: np.ndarray, m: int, version: int = LAYOUT_VERSION) -> np.ndarray:
    """The inverse of pack: cluster bytes u8[M, C], from codes stored in layout `version`."""
    t, c, r = packed.shape
    if r != TILE_M or t * TILE_M < m:
        raise ValueError(f"packed shape {packed.shape} does not hold {m} rows")
    rows = packed.transpose(0, 2, 1).reshape(t * TILE_M, c)[:m]
    return stored_bytes(rows) if version >= 2 else rows


class FineQFormat:
    family = "fineq"
    name = "fineq"

    def nominal_bits(self, group_size: int) -> float:
        return 8 / 3 + 16 / group_size

    def stored_bytes(self, m: int, k: int, group_size: int) -> int:
        return padded_rows(m) * -(-k // 3) + 2 * m * (k // group_size)

    def quantize(self, w: np.ndarray, group_size: int = 64, refine: bool = True) -> PackedTensor:
        m, k = check_shape(w, group_size, k_multiple=1)
        k_pad = -(-k // 3) * 3
        n_clusters = k_pad // 3
        care = None
        if k_pad > k:
            care = np.ones(k_pad, np.float32)
            care[k:] = 0
            care = care.reshape(n_clusters, 3)
        clusters = np.empty((m, n_clusters), np.uint8)
        scales = np.empty((m, k // group_size), np.float16)

        def fit(rows: slice) -> None:
            x = np.zeros((rows.stop - rows.start, k_pad), np.float32)
            x[:, :k] = w[rows]
            clusters[rows], scales[rows] = fit_rows(x.reshape(len(x), n_clusters, 3), group_size, refine, care)

        for_row_chunks(m, k_pad, fit)
        meta = {"format": self.name, "bits": 8, "group_size": group_size, "shape": [m, k], "k_padded": k_pad,
                "layout": "fineq-clusters", "layout_version": LAYOUT_VERSION}
        return PackedTensor({"codes": pack(clusters), "scales": scales}, meta)

    def stored_arrays(self, meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Array name -> (dtype, shape) that a tensor with this metadata stores (ValueError: impossible metadata)."""
        m, k, g = stored_dims(meta, 8, "fineq-clusters", k_multiple=1)
        k_pad = meta.get("k_padded")
        if not is_int(k_pad) or k_pad != -(-k // 3) * 3:
            raise ValueError(f"k_padded {k_pad!r}, but K = {k} pads to {-(-k // 3) * 3}")
        return {"codes": (np.dtype(np.uint8), (padded_rows(m) // TILE_M, k_pad // 3, TILE_M)),
                "scales": (np.dtype(np.float16), (m, k // g))}

    def dequantize(self, p: PackedTensor) -> np.ndarray:
        m, k = p.shape
        clusters = unpack(np.asarray(p.arrays["codes"]), m, p.meta.get("layout_version", LAYOUT_VERSION))  # [M, C]
        gidx = cluster_groups(clusters.shape[1], p.group_size)
        w = CLUSTER_VALUES[clusters]  # [M, C, 3]
        w *= np.asarray(p.arrays["scales"], np.float32)[:, gidx, None]  # in place: no temporary the size of W
        return w.reshape(m, -1)[:, :k]
