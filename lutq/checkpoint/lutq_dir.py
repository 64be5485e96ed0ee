"""The lutq directory (docs/FORMAT.md): a packed, quantized model in an HF-like directory, and its writer and loader.

    OUT/config.json          the model's HF config + quantization_config {quant_method: "lutq", format_version, ...,
                             tensors: {module: metadata}} (module = the HF weight name without ".weight")
    OUT/model.safetensors    (model-0000i-of-0000n.safetensors + model.safetensors.index.json above 2 GiB)
                             quantized weights as <module>.codes / .scales / .biases / .codebook / .tensor_scale,
                             every other tensor under its HF name
    OUT/tokenizer.json, tokenizer_config.json, ...
    OUT/quant_report.json

The writer streams: each array goes to the current shard's data file as it arrives, and the shard's safetensors header
is written in front of it at the end, hashing the shard (sha256) on the way: config.json records each shard's size and
hash (quantization_config.checksums, lutq/checkpoint/integrity.py). Everything is written into a hidden temporary
directory beside OUT that is renamed to OUT only once complete, under a lock that keeps a second writer of the same
OUT out (lutq/checkpoint/out_dir.py), so a failure, Ctrl-C or kill -9 leaves no OUT behind, never a partial one.

The loader memory-maps the shards: `packed(name)` hands out the stored arrays as read-only views (no repacking), and
`load(name)` dequantizes, so the fp32 runtime runs a lutq directory like any other checkpoint. Opening checks what is
cheap to check, so that no kernel ever indexes past an array: the format version, each shard's size against the
record, and each quantized tensor's stored arrays (names, dtypes, shapes) against what its metadata implies.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from itertools import chain
from pathlib import Path

import numpy as np

from lutq.checkpoint import integrity
from lutq.checkpoint.base import TensorInfo
from lutq.checkpoint.hf import HFCheckpoint, read_json
from lutq.checkpoint.out_dir import OutputClaim
from lutq.config import ModelConfig
from lutq.errors import CheckpointError
from lutq.quantize.packed import PackedTensor

QUANT_METHOD = "lutq"
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
COPY_CHUNK = 4 << 20  # bytes per read when the shard's data is copied behind its header (and hashed)
PACKED_ARRAYS = ("codes", "scales", "biases", "codebook", "tensor_scale", "scale_codes", "zero_codes", "scale_step")
DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
               np.dtype(np.int8): "I8", np.dtype(np.int32): "I32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def quant_method(directory: Path) -> str | None:
    """The quant_method a directory's config.json declares, or None (no config, not JSON, no quantization_config)."""
    try:
        with open(Path(directory) / "config.json", encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


class ShardWriter:
    """Safetensors shards written tensor by tensor: data to a side file, the header in front at the end."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.shards: list[dict] = []  # {"data": path, "header": {...}, "size": bytes}
        self._file = None

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: cannot store dtype {array.dtype}")
        if not self.shards or (self.shards[-1]["size"] and self.shards[-1]["size"] + array.nbytes > SHARD_BYTES):
            self._next_shard()
        shard = self.shards[-1]
        begin = shard["size"]
        self._file.write(memoryview(array).cast("B"))  # the array's own bytes: no copy of a large tensor
        shard["size"] += array.nbytes
        shard["header"][name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                                 "data_offsets": [begin, shard["size"]]}

    def _next_shard(self) -> None:
        self.close()
        path = self.directory / f".data-{len(self.shards)}"
        self._file = open(path, "wb")
        self.shards.append({"data": path, "header": {}, "size": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def finish(self, metadata: dict[str, str]) -> dict[str, dict]:
        """Write the shard files; returns the checksums record: shard file name -> {"bytes": n, "sha256": hex}."""
        self.close()
        if not self.shards:
            self._next_shard()
            self.close()
        n = len(self.shards)
        weight_map, checksums = {}, {}
        for i, shard in enumerate(self.shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header = json.dumps({"__metadata__": metadata, **shard["header"]}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # keeps the data 8-byte aligned, as the safetensors spec suggests
            digest, size = hashlib.sha256(), 0
            with open(self.directory / fname, "wb") as out, open(shard["data"], "rb") as data:
                chunks = iter(lambda: data.read(COPY_CHUNK), b"")
                for chunk in chain([struct.pack("<Q", len(header)) + header], chunks):
                    out.write(chunk)
                    digest.update(chunk)  # hashed as written: the file is read once, not twice
                    size += len(chunk)
            shard["data"].unlink()
            weight_map |= {name: fname for name in shard["header"]}
            checksums[fname] = {"bytes": size, "sha256": digest.hexdigest()}
        if n > 1:
            index = {"metadata": {"total_size": sum(s["size"] for s in self.shards)}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return checksums


class LutqDirWriter:
    """Builds a lutq directory in a temporary directory beside `out`; `commit` renames it into place.

    Use as a context manager: leaving the block by an exception (Ctrl-C included) deletes the temporary directory.
    Refuses an existing `out` unless `force`, and an `out` another process is writing (lutq/checkpoint/out_dir.py).
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.claim = OutputClaim(self.out, force)
        self.tmp = self.claim.tmp
        self.shards = ShardWriter(self.tmp)
        self.tensors: dict[str, dict] = {}  # module -> metadata, for quantization_config

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def add_packed(self, module: str, p: PackedTensor) -> None:
        for key, array in p.arrays.items():
            self.shards.add(f"{module}.{key}", array)
        self.tensors[module] = dict(p.meta)

    def add_plain(self, name: str, array: np.ndarray) -> None:
        self.shards.add(name, array)

    def write_json(self, filename: str, obj) -> None:
        with open(self.tmp / filename, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    def commit(self, config: ModelConfig, quantization_config: dict, tokenizer_dir: Path) -> None:
        """Write config, shards and tokenizer files, then move the directory into place."""
        checksums = self.shards.finish({"format": QUANT_METHOD, "lutq_format_version": str(FORMAT_VERSION)})
        qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **quantization_config,
              "checksums": checksums, "tensors": self.tensors}
        self.write_json("config.json", {**config.to_hf_dict(), "quantization_config": qc})
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, self.tmp / name)
        self.claim.commit()  # --force: the old OUT goes only once the new one is in place

    def abort(self) -> None:
        self.shards.close()
        self.claim.release()


class LutqCheckpoint(HFCheckpoint):
    """A lutq directory: quantized weights come out dequantized from `load`, packed (memory-mapped) from `packed`."""

    format_name = "lutq"

    def __init__(self, path: Path):
        path = Path(path)
        cfg = read_json(path / "config.json")
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(path / "config.json", "not a lutq directory (quantization_config.quant_method != 'lutq')")
        version = qc.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise CheckpointError(path, f"lutq format version {version!r} is not supported by this lutq "
                                        f"(it reads version {FORMAT_VERSION}); use a matching lutq release")
        # Sizes before parsing the shards: a truncated file is reported as truncated, not as a header that lies.
        checksums = integrity.check_record(path, qc.get("checksums"))
        super().__init__(path)
        integrity.check_files_recorded(path, checksums, self._files)
        tensors = qc.get("tensors")
        if not isinstance(tensors, dict):
            raise CheckpointError(path / "config.json", "quantization_config has no 'tensors' object")
        self.quantization_config = qc
        self._packed_meta: dict[str, dict] = {}
        for module, meta in tensors.items():
            self._check_entry(module, meta)
            self._packed_meta[module + ".weight"] = meta

    def _check_entry(self, module: str, meta) -> None:
        """A quantized tensor's metadata is one this lutq reads, and its stored arrays are exactly the ones, of the
        dtypes and shapes, that the metadata implies: nothing downstream indexes past an array."""
        from lutq.quantize.registry import FORMATS, LAYOUTS, READABLE_LAYOUTS

        where = self.path / "config.json"
        fmt = meta.get("format") if isinstance(meta, dict) else meta
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise CheckpointError(where, f"tensor {module!r}: unknown format {fmt!r}")
        scheme, version = meta.get("layout"), meta.get("layout_version")
        known = LAYOUTS.get(scheme) if isinstance(scheme, str) else None
        if known is None or isinstance(version, bool) or version not in READABLE_LAYOUTS.get(scheme, (known,)):
            raise CheckpointError(where, f"tensor {module!r}: code layout {scheme!r} version {version!r} is not the one "
                                         f"this lutq reads ({known or 'none'}); quantize the model again")
        try:
            want = FORMATS[fmt].stored_arrays(meta)
        except ValueError as e:
            raise CheckpointError(where, f"tensor {module!r}: {e}") from None
        if f"{module}.weight" in self._where:
            raise CheckpointError(self._where[f"{module}.weight"].path,
                                  f"tensor {module + '.weight'!r} is stored both quantized and unquantized")
        for key in PACKED_ARRAYS:
            name = f"{module}.{key}"
            stored = self._where.get(name)
            if key not in want:
                if stored is not None:
                    raise CheckpointError(stored.path, f"tensor {name!r} is not part of a {fmt} tensor")
                continue
            if stored is None:
                raise CheckpointError(self.path, f"tensor {name!r} is missing")
            dtype, shape = stored.entries[name][:2]
            want_dtype, want_shape = DTYPE_NAMES[want[key][0]], want[key][1]
            if (dtype, tuple(shape)) != (want_dtype, want_shape):
                raise CheckpointError(stored.path, f"tensor {name!r} is {dtype} {list(shape)}, but its metadata "
                                                   f"({fmt}, shape {meta['shape']}, group size {meta['group_size']}) "
                                                   f"implies {want_dtype} {list(want_shape)}")

    def shard_files(self) -> list[str]:
        """The names of the tensor files (model.safetensors, or the shards the index names)."""
        return list(self._files)

    def _is_part(self, name: str) -> bool:
        module, _, key = name.rpartition(".")
        return key in PACKED_ARRAYS and module + ".weight" in self._packed_meta

    def tensors(self) -> list[TensorInfo]:
        out = [t for t in super().tensors() if not self._is_part(t.name)]
        for name, meta in self._packed_meta.items():
            nbytes = sum(self._where[n].entries[n][3] - self._where[n].entries[n][2]
                         for n in (f"{module_name(name)}.{k}" for k in PACKED_ARRAYS) if n in self._where)
            out.append(TensorInfo(name, tuple(meta["shape"]), meta["format"].upper(), nbytes))
        return out

    def is_packed(self, name: str) -> bool:
        return name in self._packed_meta

    def packed(self, name: str) -> PackedTensor:
        """The stored PackedTensor of weight `name` ("...q_proj.weight"): arrays are read-only memory-map views."""
        if name not in self._packed_meta:
            raise CheckpointError(self.path, f"tensor {name!r} is not quantized")
        module = module_name(name)
        arrays = {k: self._where[n].raw(n) for k in PACKED_ARRAYS if (n := f"{module}.{k}") in self._where}
        return PackedTensor(arrays, dict(self._packed_meta[name]))

    def rows(self, name: str):
        if name in self._packed_meta and self._packed_meta[name].get("format") == "int8":
            return Int8Rows(self.packed(name))
        return super().rows(name)

    def load(self, name: str) -> np.ndarray:
        if name not in self._packed_meta:
            if self._is_part(name):
                raise CheckpointError(self.path, f"tensor {name!r} is missing")
            return super().load(name)
        from lutq.quantize.registry import dequantize

        try:
            return dequantize(self.packed(name))
        except (ValueError, IndexError, KeyError) as e:
            raise CheckpointError(self.path, f"tensor {name!r} is corrupt ({type(e).__name__}: {e})") from None


class Int8Rows:
    """Rows of an int8 embedding (`--embed int8`), dequantized only as they are gathered."""

    def __init__(self, p: PackedTensor):
        self.packed = p
        self.shape = p.shape

    def __getitem__(self, ids) -> np.ndarray:
        from lutq.quantize.registry import dequantize

        a = self.packed.arrays
        rows = PackedTensor({"codes": a["codes"][ids], "scales": a["scales"][ids]},
                            {**self.packed.meta, "shape": [len(ids), self.shape[1]]})
        return dequantize(rows)
