"""The HF directory reader: dtypes (bf16 read from raw bytes), sharded checkpoints, and the safetensors header checks."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.checkpoint.safetensors_io import SafetensorsFile
from lutq.errors import CheckpointError

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_widen_exactly(tmp_path, dtype):
    from tiny import make_hf_model

    model = make_hf_model(tmp_path, dtype=dtype, vocab_size=50)  # returned upcast to fp32 from the stored halves
    ckpt = open_checkpoint(tmp_path)
    for name, ref in model.state_dict().items():
        got = ckpt.load(name)
        assert got.dtype == np.float32
        assert np.array_equal(got, ref.numpy()), name  # bf16/fp16 -> fp32 is exact
    assert {t.dtype for t in ckpt.tensors()} == {"BF16" if dtype == "bfloat16" else "F16"}


def test_sharded_checkpoint(tmp_path):
    from tiny import make_hf_model

    model = make_hf_model(tmp_path / "src", vocab_size=50)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB", safe_serialization=True)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ckpt = open_checkpoint(tmp_path / "sharded")
    assert sorted(t.name for t in ckpt.tensors()) == sorted(model.state_dict())
    for name, ref in model.state_dict().items():
        assert np.array_equal(ckpt.load(name), ref.numpy())


def test_index_naming_missing_shard(tmp_path):
    from tiny import make_hf_model

    model = make_hf_model(tmp_path / "src", vocab_size=50)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB", safe_serialization=True)
    next((tmp_path / "sharded").glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard named in the index is missing"):
        open_checkpoint(tmp_path / "sharded")


def write_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, data, problem", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "past the end"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16, "needs"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
    ({"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, "lacks"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, b"\0" * 16, "past the end"),
])
def test_hostile_safetensors_headers(tmp_path, header, data, problem):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, header, data)
    with pytest.raises(CheckpointError, match=problem):
        SafetensorsFile(f)


def test_header_length_beyond_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(CheckpointError, match="bad header length"):
        SafetensorsFile(f)
