"""HuggingFace checkpoint directories: config.json + model.safetensors (or a sharded index) + tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lutq.checkpoint.base import Checkpoint, TensorInfo
from lutq.checkpoint.bitnet_packing import effective_weight, unpack_ternary
from lutq.checkpoint.safetensors_io import SafetensorsFile
from lutq.config import ModelConfig
from lutq.errors import CheckpointError

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"malformed JSON ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror}") from None


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = ModelConfig.from_hf_dict(read_json(self.path / "config.json"), str(self.path / "config.json"))
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        single, index = self.path / "model.safetensors", self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(index, "no valid 'weight_map'")
            for shard in sorted(set(weight_map.values())):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise CheckpointError(index, f"shard name {shard!r} points outside the directory")
                if not (self.path / shard).exists():
                    raise CheckpointError(self.path / shard, "shard named in the index is missing")
                self._files[shard] = SafetensorsFile(self.path / shard)
            for name, shard in weight_map.items():
                if name not in self._files[shard].entries:
                    raise CheckpointError(self.path / shard, f"tensor {name!r} listed in the index is not in this shard")
                self._where[name] = self._files[shard]
        elif single.exists():
            f = self._files["model.safetensors"] = SafetensorsFile(single)
            self._where = {name: f for name in f.entries}
        else:
            pickles = [n for n in PICKLE_NAMES if (self.path / n).exists()]
            if pickles:
                raise CheckpointError(self.path / pickles[0], "pickle weights are never loaded (unsafe); convert the checkpoint to safetensors")
            raise CheckpointError(self.path, "no model.safetensors or model.safetensors.index.json")
        # BitNet: `X.weight` (ternary, packed in u8 or plain) comes with `X.weight_scale`; lutq folds the scale into
        # the weight it hands out, so every reader yields the weight the layer multiplies by.
        self._bitnet_class = None
        if self.config.quantization_config.get("quant_method") == "bitnet":
            self._bitnet_class = self.config.quantization_config.get("linear_class", "bitlinear")
        self._scales = {n[: -len("_scale")]: n for n in self._where if n.endswith(".weight_scale")}
        if self._scales and self._bitnet_class is None:
            raise CheckpointError(self.path / "config.json", "tensors carry weight_scale but quantization_config "
                                                             "does not say quant_method 'bitnet'")

    format_name = "HF safetensors"

    def tensors(self) -> list[TensorInfo]:
        out = []
        for name, f in self._where.items():
            if name.endswith(".weight_scale"):
                continue  # folded into its weight
            dtype, shape, begin, end = f.entries[name]
            if name in self._scales and dtype == "U8":
                shape, dtype = (shape[0] * 4, *shape[1:]), "TERNARY"  # four 2-bit values a byte
            out.append(TensorInfo(name, shape, dtype, end - begin))
        return out

    def load(self, name: str) -> np.ndarray:
        if name not in self._where or name.endswith(".weight_scale"):
            raise CheckpointError(self.path, f"tensor {name!r} is missing")
        f = self._where[name]
        if name not in self._scales:
            return f.load_f32(name)
        raw = f.raw(name)
        ternary = unpack_ternary(raw) if raw.dtype == np.uint8 else f.load_f32(name)
        scale_name = self._scales[name]
        scale = self._where[scale_name].load_f32(scale_name)
        return effective_weight(ternary, scale, self._bitnet_class, f"{f.path}: {scale_name}")

    def rows(self, name: str):
        if name in self._where and name not in self._scales:
            f = self._where[name]
            if f.entries[name][0] in ("F16", "F32") and len(f.entries[name][1]) == 2:
                return Float32Rows(f.raw(name))
        return super().rows(name)

    def tokenizer_dir(self) -> Path:
        if not (self.path / "tokenizer.json").exists():
            raise CheckpointError(self.path / "tokenizer.json", "missing (lutq needs a fast tokenizer file)")
        return self.path

    def file_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self._files.values())

    def close(self):
        for f in self._files.values():
            f.close()


class Float32Rows:
    """Rows of a memory-mapped fp16/fp32 matrix, widened to fp32 only as they are gathered."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def __getitem__(self, ids) -> np.ndarray:
        return self.array[ids].astype(np.float32)
