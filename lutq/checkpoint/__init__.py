"""Checkpoint readers: HF directories, GGUF files and the built-in model, behind one interface (`open_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from lutq.checkpoint.base import Checkpoint, TensorInfo
from lutq.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
RANDOM_PREFIX = "random:"  # random:tinyllama-1.1b, a random-weight model of a real architecture (--shape)


def open_checkpoint(spec: str | Path) -> Checkpoint:
    """Open MODEL as the user named it: an HF directory, a .gguf file, a lutq directory, a built-in name such as
    `smollm2-135m`, or `random:SHAPE` (lutq/checkpoint/synthetic.py)."""
    from lutq.checkpoint import builtin

    spec_str = str(spec)
    if spec_str.startswith(RANDOM_PREFIX):
        from lutq.checkpoint.synthetic import SyntheticCheckpoint

        return SyntheticCheckpoint(spec_str[len(RANDOM_PREFIX) :])
    if spec_str in builtin.BUILTIN_MODELS:
        spec = builtin.resolve(spec_str)
    path = Path(spec)
    if not path.exists():
        names = ", ".join(builtin.BUILTIN_MODELS)
        raise CheckpointError(path, f"no such file or directory (MODEL is an HF directory, a .gguf file or one of: {names})")
    if path.is_dir():
        from lutq.checkpoint.hf import HFCheckpoint
        from lutq.checkpoint.lutq_dir import QUANT_METHOD, LutqCheckpoint, quant_method

        if quant_method(path) == QUANT_METHOD:
            return LutqCheckpoint(path)
        return HFCheckpoint(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(path, "pickle weights are never loaded (unsafe); use safetensors or GGUF")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from lutq.checkpoint.gguf_file import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(path, "not a GGUF file (bad magic bytes)")
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(path, "a bare .safetensors file has no config; pass the directory holding it and its config.json")
    raise CheckpointError(path, "unrecognised file: expected an HF directory or a .gguf file")


__all__ = ["Checkpoint", "TensorInfo", "CheckpointError", "open_checkpoint"]
