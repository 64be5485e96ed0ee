"""The lutq directory (docs/FORMAT.md): a packed, quantized model in an HF-like directory, and its writer and loader.

    OUT/config.json          the model's HF config + quantization_config {quant_method: "lutq", format_version, ...,
                             tensors: {module: metadata}} (module = the HF weight name without ".weight")
    OUT/model.safetensors    (model-0000i-of-0000n.safetensors + model.safetensors.index.json above 2 GiB)
                             quantized weights as <module>.codes / .scales / .biases / .codebook / .tensor_scale,
                             every other tensor under its HF name
    OUT/tokenizer.json, tokenizer_config.json, ...
    OUT/quant_report.json

The writer streams: each array goes to the current shard's data file as it arrives, and the shard's safetensors header
is written in front of it at the end. Everything is written into a hidden temporary directory beside OUT that is
renamed to OUT only once complete, so a failure or Ctrl-C leaves no OUT behind.

The loader memory-maps the shards: `packed(name)` hands out the stored arrays as read-only views (no repacking), and
`load(name)` dequantizes, so the fp32 runtime runs a lutq directory like any other checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from lutq.checkpoint.base import TensorInfo
from lutq.checkpoint.hf import HFCheckpoint, read_json
from lutq.config import ModelConfig
from lutq.errors import CheckpointError, LutqError
from lutq.quantize.packed import PackedTensor

QUANT_METHOD = "lutq"
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
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
        self._file.write(array.tobytes())
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

    def finish(self, metadata: dict[str, str]) -> dict[str, str]:
        """Write the shard files; returns tensor name -> shard file name."""
        self.close()
        if not self.shards:
            self._next_shard()
            self.close()
        n = len(self.shards)
        weight_map = {}
        for i, shard in enumerate(self.shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header = json.dumps({"__metadata__": metadata, **shard["header"]}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # keeps the data 8-byte aligned, as the safetensors spec suggests
            with open(self.directory / fname, "wb") as out, open(shard["data"], "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(data, out, 16 << 20)
            shard["data"].unlink()
            weight_map |= {name: fname for name in shard["header"]}
        if n > 1:
            index = {"metadata": {"total_size": sum(s["size"] for s in self.shards)}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map


class LutqDirWriter:
    """Builds a lutq directory in a temporary directory beside `out`; `commit` renames it into place.

    Use as a context manager: leaving the block by an exception (Ctrl-C included) deletes the temporary directory.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise LutqError(f"{self.out}: already exists (pass --force to replace it)")
        if not self.out.parent.is_dir():
            raise LutqError(f"{self.out.parent}: no such directory")
        self.force = force
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        except OSError as e:
            raise LutqError(f"{self.out.parent}: cannot write ({e.strerror})") from None
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
        self.shards.finish({"format": QUANT_METHOD, "lutq_format_version": str(FORMAT_VERSION)})
        qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **quantization_config,
              "tensors": self.tensors}
        self.write_json("config.json", {**config.to_hf_dict(), "quantization_config": qc})
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, self.tmp / name)
        if self.out.exists():  # --force: the old OUT goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "x")
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)

    def abort(self) -> None:
        self.shards.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class LutqCheckpoint(HFCheckpoint):
    """A lutq directory: quantized weights come out dequantized from `load`, packed (memory-mapped) from `packed`."""

    format_name = "lutq"

    def __init__(self, path: Path):
        path = Path(path)
        qc = read_json(path / "config.json").get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(path / "config.json", "not a lutq directory (quantization_config.quant_method != 'lutq')")
        version = qc.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(path, f"lutq format version {version!r} is not supported by this lutq "
                                        f"(it reads version {FORMAT_VERSION}); use a matching lutq release")
        super().__init__(path)
        tensors = qc.get("tensors")
        if not isinstance(tensors, dict):
            raise CheckpointError(path / "config.json", "quantization_config has no 'tensors' object")
        self.quantization_config = qc
        self._packed_meta: dict[str, dict] = {}
        for module, meta in tensors.items():
            self._check_entry(module, meta)
            self._packed_meta[module + ".weight"] = meta

    def _check_entry(self, module: str, meta) -> None:
        from lutq.quantize.registry import FORMATS, LAYOUTS

        where = self.path / "config.json"
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            fmt = meta.get("format") if isinstance(meta, dict) else meta
            raise CheckpointError(where, f"tensor {module!r}: unknown format {fmt!r}")
        shape = meta.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise CheckpointError(where, f"tensor {module!r}: bad shape {shape!r}")
        scheme, version = meta.get("layout"), meta.get("layout_version")
        if scheme not in LAYOUTS or version != LAYOUTS[scheme]:
            raise CheckpointError(where, f"tensor {module!r}: code layout {scheme!r} version {version!r} is not the one "
                                         f"this lutq reads ({LAYOUTS.get(scheme, 'none')}); quantize the model again")
        params = "scale_codes" if meta.get("param_bits") == 8 else "scales"  # the int<B>k formats: 8-bit codes
        for key in ("codes", params):
            if f"{module}.{key}" not in self._where:
                raise CheckpointError(self.path, f"tensor {module}.{key} is missing")
        scales = self._where[f"{module}.{params}"].entries[f"{module}.{params}"][1]
        g = meta.get("group_size")
        if not isinstance(g, int) or g <= 0 or scales != (shape[0], shape[1] // g):
            raise CheckpointError(self.path, f"tensor {module}.{params} has shape {list(scales)}, "
                                             f"group size {g!r} of {shape} implies another")

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
    """Rows of an int8 embedding (`--embed int8`), dequantized only as they are gathered: codes * group scale."""

    def __init__(self, p: PackedTensor):
        self.codes, self.scales, self.group = p.arrays["codes"], p.arrays["scales"], p.group_size
        self.shape = p.shape

    def __getitem__(self, ids) -> np.ndarray:
        q = self.codes[ids].astype(np.float32)  # [T, K]
        s = self.scales[ids].astype(np.float32)  # [T, K/G]
        return (q.reshape(len(q), -1, self.group) * s[..., None]).reshape(q.shape)
