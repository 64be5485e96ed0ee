"""A bounds-checked walk over a GGUF file's header, run before the `gguf` package parses it.

gguf's reader trusts the header: a count or length pointing past the end of the file makes it read short slices,
stop advancing and loop for as long as the count says (a header can ask for 2^64 strings). This walk checks every
count, length and offset against the bytes actually present, so a hostile or truncated file costs at most one pass
over its own header and ends in a one-line CheckpointError.

Layout (little-endian): "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count entries of (string key, u32
value type, value); tensor_count entries of (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset);
padding to `general.alignment` (default 32); tensor data, each tensor at data_start + offset. A string is u64 length +
bytes; an array is u32 element type + u64 count + elements.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lutq.errors import CheckpointError

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 8


class HeaderWalker:
    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, problem: str):
        raise CheckpointError(self.path, f"corrupt GGUF header: {problem}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, past the end of the file ({len(self.buf)} bytes)")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        """Skip (or, for the few values lutq needs, return) one value of type vtype."""
        if vtype in SCALAR_SIZES:
            raw = self.take(SCALAR_SIZES[vtype], what)
            return int.from_bytes(raw, "little") if vtype in (4, 10) else None
        if vtype == STRING:
            self.string(what)
            return None
        if vtype == ARRAY and depth < 2:
            etype, count = self.u32(what + " element type"), self.u64(what + " count")
            least = SCALAR_SIZES.get(etype, 8 if etype == STRING else 12)  # smallest encoding of one element
            if count * least > len(self.buf) - self.pos:
                self.fail(f"{what} claims {count} elements, more than the file holds")
            if etype in SCALAR_SIZES:
                self.take(count * SCALAR_SIZES[etype], what)
            else:
                for _ in range(count):
                    self.value(etype, what, depth + 1)
            return None
        self.fail(f"{what} has unknown value type {vtype}")


def check_gguf_header(path: Path) -> None:
    """Raise CheckpointError unless every header field and every tensor's data lies within the file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CheckpointError(path, f"truncated GGUF: {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = HeaderWalker(buf, path)
            if w.take(4, "magic") != b"GGUF":
                w.fail("bad magic bytes")
            version = w.u32("version")
            if version not in (2, 3):
                w.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = w.u64("tensor count"), w.u64("metadata count")
            if n_kv * 13 > size or n_tensors * 29 > size:  # the smallest possible entries
                w.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
            alignment = 32
            for i in range(n_kv):
                key = w.string(f"metadata key #{i}")
                v = w.value(w.u32(f"type of {key!r}"), f"metadata {key!r}")
                if key == "general.alignment":
                    if not v or v & (v - 1):
                        w.fail(f"general.alignment {v} is not a power of two")
                    alignment = v
            tensors = []
            for i in range(n_tensors):
                name = w.string(f"tensor name #{i}")
                n_dims = w.u32(f"tensor {name!r} rank")
                if not 1 <= n_dims <= MAX_DIMS:
                    w.fail(f"tensor {name!r} has {n_dims} dimensions")
                dims = [w.u64(f"tensor {name!r} shape") for _ in range(n_dims)]
                ttype, offset = w.u32(f"tensor {name!r} type"), w.u64(f"tensor {name!r} offset")
                tensors.append((name, dims, ttype, offset))
            data_start = -(-w.pos // alignment) * alignment
            for name, dims, ttype, offset in tensors:
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    w.fail(f"tensor {name!r} has unknown ggml type {ttype}")
                if dims[0] % block:
                    w.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of its block of {block}")
                count = 1
                for d in dims:
                    count *= d
                nbytes = count // block * type_size
                if data_start + offset + nbytes > size:
                    raise CheckpointError(path, f"truncated GGUF: tensor {name!r} ({nbytes} bytes at offset {offset}) "
                                                f"ends past the end of the file")
