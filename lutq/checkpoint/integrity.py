"""Integrity of a lutq directory: the size and sha256 of each tensor file, recorded by the writer and checked here.

The record is `quantization_config.checksums` in config.json, {file name: {"bytes": n, "sha256": hex}} for each
model*.safetensors (docs/FORMAT.md). Loading always compares sizes (a stat per file: catches truncation and
appended junk for free); the content hash costs a read of every byte, so only `lutq verify` and `--verify` run it.
Directories written before the record existed have none: they load, and verify says the hashes are absent.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lutq.errors import CheckpointError, LutqError

CHUNK = 16 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror}") from None
    return h.hexdigest()


def is_plain_name(name: str) -> bool:
    """A file name directly inside the directory: nothing a record names may point elsewhere."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name


def check_record(directory: Path, record) -> dict[str, dict] | None:
    """Validate the checksums record and compare each file's size with it; returns the record (None when absent)."""
    if record is None:
        return None
    where = directory / "config.json"
    if not isinstance(record, dict) or not record:
        raise CheckpointError(where, "quantization_config.checksums is not a non-empty object")
    for name, entry in record.items():
        if not is_plain_name(name):
            raise CheckpointError(where, f"quantization_config.checksums names {name!r}, not a file of the directory")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            raise CheckpointError(where, f"quantization_config.checksums[{name!r}] is not "
                                         f"{{\"bytes\": int, \"sha256\": 64 hex digits}}")
        try:
            actual = (directory / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(directory / name, "missing (recorded in quantization_config.checksums)") from None
        except OSError as e:
            raise CheckpointError(directory / name, f"cannot read: {e.strerror}") from None
        if actual != size:
            raise CheckpointError(directory / name, f"{actual} bytes, but {size} were written (truncated or modified "
                                                    f"since; `lutq quantize` it again)")
    return record


def check_files_recorded(directory: Path, record: dict | None, files) -> None:
    """Every tensor file the loader reads is in the record, and the record names no file the loader does not read."""
    if record is None:
        return
    for name in files:
        if name not in record:
            raise CheckpointError(directory / name, "not in quantization_config.checksums (not written with this "
                                                    "directory's config.json)")
    for name in record:
        if name not in files:
            raise CheckpointError(directory / name, "recorded in quantization_config.checksums but not part of the "
                                                    "model (a missing model.safetensors.index.json?)")


def verify_dir(path: Path) -> dict:
    """Everything `lutq verify` checks: format version, file sizes, the sha256 of every tensor file, the stored
    arrays of every quantized tensor against its metadata, and every tensor the config implies against its shape.
    Returns a summary; the first problem found raises a one-line CheckpointError."""
    from lutq.checkpoint.lutq_dir import QUANT_METHOD, LutqCheckpoint, quant_method
    from lutq.checkpoint.synthetic import tensor_shapes

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a directory (lutq verify checks a lutq directory)")
    if quant_method(path) != QUANT_METHOD:
        raise CheckpointError(path, "not a lutq directory (config.json has no quantization_config.quant_method "
                                    "'lutq'); only lutq directories carry hashes to verify")
    with LutqCheckpoint(path) as ckpt:  # format version, sizes, shapes of the packed arrays
        record = ckpt.quantization_config.get("checksums")
        files = sorted(ckpt.shard_files())
        for name in files if record is not None else ():
            if sha256_file(path / name) != record[name]["sha256"]:
                raise CheckpointError(path / name, "sha256 differs from the one recorded when it was written "
                                                   "(the file is corrupt or was modified)")
        shapes = {t.name: tuple(t.shape) for t in ckpt.tensors()}
        for name, shape in tensor_shapes(ckpt.config).items():
            if name not in shapes:
                raise CheckpointError(path, f"tensor {name!r} is missing")
            if shapes[name] != shape:
                raise CheckpointError(path, f"tensor {name!r} has shape {list(shapes[name])}, the config implies "
                                            f"{list(shape)}")
        return {"path": str(path), "format_version": ckpt.quantization_config["format_version"],
                "files": len(files), "bytes": sum((path / n).stat().st_size for n in files),
                "sha256": "ok" if record is not None else "absent",
                "tensors": len(shapes), "quantized": sum(ckpt.is_packed(n) for n in shapes)}


def verify_before_loading(model: str) -> dict:
    """`--verify`: the full check of a lutq directory before a command loads it; refuses anything else."""
    from lutq.checkpoint.lutq_dir import QUANT_METHOD, quant_method

    if not Path(model).is_dir() or quant_method(Path(model)) != QUANT_METHOD:
        raise LutqError(f"--verify: {model} is not a lutq directory (only those carry hashes to check)")
    return verify_dir(Path(model))
