"""Readers under attack: mutated GGUF and safetensors files either load or fail with a one-line CheckpointError.

Property-based (hypothesis): a valid tiny file is truncated, has bytes overwritten in its header, or has a length or
count field replaced by a huge value. Whatever comes out, the reader must not crash with another exception, hang,
or allocate from an unchecked field (every example runs under a deadline and an address-space cap would catch a
terabyte allocation as MemoryError, which is not a CheckpointError either).
"""

from __future__ import annotations

import hashlib
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lutq.checkpoint import open_checkpoint
from lutq.errors import CheckpointError

TRIED: dict[str, set] = {"gguf": set(), "safetensors": set()}

mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bytes"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("huge"), st.floats(0, 1), st.sampled_from([2**63 - 1, 2**64 - 1, 2**40, 2**32 - 1])),
)


def mutate(data: bytes, m, header_len: int) -> bytes:
    kind, where = m[0], m[1]
    if kind == "truncate":
        return data[: int(where * len(data))]
    at = int(where * max(header_len - 8, 1))  # aim at the header: that is where lengths and counts live
    patch = m[2] if kind == "bytes" else struct.pack("<Q", m[2])
    return data[:at] + patch + data[at + len(patch) :]


def load_everything(path) -> None:
    ckpt = open_checkpoint(path)
    for t in ckpt.tensors():
        ckpt.load(t.name)


def check(kind: str, path, data: bytes) -> None:
    TRIED[kind].add(hashlib.sha256(data).hexdigest())
    try:
        load_everything(path)
    except CheckpointError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    from test_gguf import tiny_file

    path, _ = tiny_file(tmp_path_factory.mktemp("gguf"), tokenizer=True)
    data = path.read_bytes()
    return data, data.index(b"token_embd.weight") + 200  # past the tensor infos: the whole header


@settings(max_examples=250, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_mutated_gguf(gguf_bytes, tmp_path, m):
    data = mutate(gguf_bytes[0], m, gguf_bytes[1])
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    check("gguf", f, data)


@pytest.fixture(scope="module")
def safetensors_dir(tiny_models):
    path, _ = tiny_models("llama")
    data = (path / "model.safetensors").read_bytes()
    return path, data, 8 + struct.unpack("<Q", data[:8])[0]


@settings(max_examples=250, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_mutated_safetensors(safetensors_dir, tmp_path, m):
    src, data, header_len = safetensors_dir
    dst = tmp_path / "model"
    if not dst.exists():
        shutil.copytree(src, dst)
    data = mutate(data, m, header_len)
    (dst / "model.safetensors").write_bytes(data)
    check("safetensors", dst, data)


def test_enough_distinct_inputs_were_tried():
    """The properties above must have met many distinct malformed files, not one mutation over and over."""
    print(f"\ndistinct mutated inputs tried: gguf {len(TRIED['gguf'])}, safetensors {len(TRIED['safetensors'])}")
    assert min(len(v) for v in TRIED.values()) >= 150
