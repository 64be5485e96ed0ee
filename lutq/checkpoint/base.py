"""The one interface every checkpoint reader offers: a config, a list of tensors, and fp32 tensors one at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lutq.config import ModelConfig


@dataclass(frozen=True)
class TensorInfo:
    name: str  # HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # HF layout: linear weights are [out_features, in_features]
    dtype: str  # the stored type: "F32", "BF16", "Q4_1", ...
    nbytes: int  # bytes on disk


class Checkpoint(ABC):
    """A model on disk. Tensors are read lazily from memory maps: the whole model is never in RAM twice."""

    path: Path
    config: ModelConfig

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every tensor, with HF names, in file order."""

    @abstractmethod
    def load(self, name: str) -> np.ndarray:
        """One tensor as a fresh C-contiguous float32 array in HF layout."""

    @abstractmethod
    def tokenizer_dir(self) -> Path:
        """A directory holding tokenizer.json (and tokenizer_config.json when there is one)."""

    def rows(self, name: str):
        """A 2-D tensor for gathering rows: `rows(name)[ids]` gives f32[len(ids), cols] (the token embedding).

        Readers that can gather from their memory map without widening the whole tensor to fp32 override this (an
        fp16 embedding stays fp16 in the page cache: SmolLM2's is 57 MB instead of 113 MB, TinyLlama's 131 instead
        of 262)."""
        return self.load(name)

    def file_bytes(self) -> int:
        """Bytes on disk of everything that holds tensors."""
        return sum(t.nbytes for t in self.tensors())

    format_name = "checkpoint"  # shown by `lutq inspect`

    def has(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors())

    def close(self) -> None:
        """Release memory maps."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
