"""A strict safetensors reader over a memory map.

Written here rather than through the `safetensors` package for two reasons: numpy has no bfloat16, so BF16 tensors are
read as raw uint16 and widened (bf16 is the top half of an fp32), and every header field is checked against the file
before anything is sized from it, so a hostile header cannot make us allocate or read out of bounds.

Layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, ...,
"__metadata__": {str: str}}, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import numpy as np

from lutq.errors import CheckpointError

# dtype name -> (numpy dtype of the stored bytes, bytes per element)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook that refuses a key given twice (json.loads would silently keep the last one)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bf16 pattern is the high half of the fp32 pattern."""
    wide = raw.astype(np.uint32)
    wide <<= 16  # in place: a second temporary the size of the fp32 tensor would double a load's peak
    return wide.view(np.float32)


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors come out as numpy views (raw) or fresh fp32 arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(self.path, f"cannot open: {e.strerror}") from None
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(self.path, f"truncated: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(self.path, f"bad header length {n} for a file of {size} bytes (truncated or not safetensors)")
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(self.path, "header is not valid UTF-8 JSON (not a safetensors file?)") from None
        except DuplicateKey as e:
            raise CheckpointError(self.path, f"tensor {e.args[0]!r} appears twice in the header") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
                raise CheckpointError(self.path, f"tensor {name!r}: header entry lacks dtype/shape/data_offsets")
            dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(self.path, f"tensor {name!r}: unsupported dtype {dtype!r}")
            if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
                raise CheckpointError(self.path, f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
                raise CheckpointError(self.path, f"tensor {name!r}: bad data_offsets {offs!r}")
            begin, end = offs
            want = math.prod(shape) * DTYPES[dtype].itemsize
            if not (0 <= begin <= end <= data_len):
                raise CheckpointError(self.path, f"tensor {name!r}: data_offsets {offs} point past the end of the file (truncated?)")
            if end - begin != want:
                raise CheckpointError(self.path, f"tensor {name!r}: {end - begin} bytes stored but shape {shape} of {dtype} needs {want}")
            self.entries[name] = (dtype, tuple(shape), begin, end)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(self.path, f"tensors {n0!r} and {n1!r} overlap in the file")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def raw(self, name: str) -> np.ndarray:
        """The stored array, a read-only view of the memory map (BF16 as uint16)."""
        dtype, shape, begin, end = self.entries[name]
        buf = memoryview(self._mm)[self.data_start + begin : self.data_start + end]
        return np.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)

    def load_f32(self, name: str) -> np.ndarray:
        dtype = self.entries[name][0]
        raw = self.raw(name)
        if dtype == "BF16":
            return bf16_to_f32(raw)
        return np.array(raw, dtype=np.float32, order="C")

    def close(self):
        # Views handed out keep the map alive through their buffer; only close the file handle.
        self._fh.close()
