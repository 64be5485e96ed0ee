"""Readers under attack: mutated GGUF files, safetensors files and lutq directories either load or fail with a
one-line CheckpointError (LutqError for the runtime's own checks).

Property-based (hypothesis): a valid tiny file is truncated, has bytes overwritten in its header, or has a length or
count field replaced by a huge value. Whatever comes out, the reader must not crash with another exception, hang,
or allocate from an unchecked field (every example runs under a deadline and an address-space cap would catch a
terabyte allocation as MemoryError, which is not a CheckpointError either).

A lutq directory is attacked three ways: its config.json (quantization_config's fields, tensor metadata, module
names, the checksums record, the model's own shape fields) gets hostile JSON values, its model.safetensors gets the
byte mutations above, or its safetensors header is edited as JSON (entries' dtype/shape/offsets, duplicated and
non-UTF-8 names). "Loads" means everything: every tensor loaded and unpacked, the runtime model built, and
`lutq verify`'s full check. The record of sizes is rewritten to match in half the byte-mutated examples, so the
safetensors parser is attacked too, not only the size check in front of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lutq.checkpoint import open_checkpoint
from lutq.errors import CheckpointError, LutqError

# kind -> {sha256 of a distinct mutated input: "clean error" or "loaded"} (a harmless mutation may load)
TRIED: dict[str, dict[str, str]] = {"gguf": {}, "safetensors": {}, "lutq": {}}

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
    outcome = "loaded"
    try:
        load_everything(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
        outcome = "clean error"
    TRIED[kind][hashlib.sha256(data).hexdigest()] = outcome


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


# --- lutq directories -----------------------------------------------------------------------------------------

LUTQ_RULES = "int4,*.down_proj=nf3,*.v_proj=nf4,*.o_proj=ternary,lm_head=fineq"  # every kind of stored array
TENSOR_FIELDS = ["format", "bits", "group_size", "shape", "layout", "layout_version", "k_padded"]
QC_FIELDS = ["quant_method", "format_version", "tensors", "checksums"]
MODEL_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "head_dim", "tie_word_embeddings", "max_position_embeddings", "model_type"]
FUZZ = settings(max_examples=200, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])

hostile_value = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 4, 8, 32, 48, 64, 2**31, 2**62, 2**64, 10**30]),
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["int4", "nf3", "fineq", "int8", "ternary", "bitserial", "fineq-clusters", "rowmajor", "lutq"]),
    st.text(max_size=6), st.lists(st.integers(-3, 2**40), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-1, 2**40), max_size=2),
)


class Files(tuple):
    def __repr__(self):  # hypothesis prints the arguments of a failing example: not 100 kB of bytes
        return f"lutq_files({self[0]})"


@pytest.fixture(scope="module")
def lutq_files(tiny_models, tmp_path_factory):
    """(pristine directory, config.json bytes, model.safetensors bytes, header length) of a small lutq directory."""
    from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
    from lutq.quantize.rules import parse_rules

    out = tmp_path_factory.mktemp("lutq") / "q"
    with open_checkpoint(tiny_models("llama")[0]) as ckpt:
        quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(LUTQ_RULES), 32, embed="int8"))
    data = (out / "model.safetensors").read_bytes()
    return Files((out, (out / "config.json").read_bytes(), data, 8 + struct.unpack("<Q", data[:8])[0]))


def lutq_dir(lutq_files, tmp_path, config: bytes, shard: bytes, rerecord: bool = False):
    dst = tmp_path / "q"
    if not dst.exists():
        shutil.copytree(lutq_files[0], dst)
    if rerecord:  # the record matches the mutated file: the parser behind the size check gets the mutation
        cfg = json.loads(config)
        cfg["quantization_config"]["checksums"] = {"model.safetensors": {
            "bytes": len(shard), "sha256": hashlib.sha256(shard).hexdigest()}}
        config = json.dumps(cfg).encode()
    (dst / "config.json").write_bytes(config)
    (dst / "model.safetensors").write_bytes(shard)
    return dst


def check_lutq(path, record: bool = True) -> str:
    from lutq.checkpoint.integrity import verify_dir
    from lutq.runtime.model import load_model

    key = hashlib.sha256((path / "config.json").read_bytes() + b"\0" + (path / "model.safetensors").read_bytes())
    outcome = "loaded"
    try:
        ckpt = open_checkpoint(path)
        for t in ckpt.tensors():
            ckpt.load(t.name)
            if getattr(ckpt, "is_packed", lambda n: False)(t.name):
                ckpt.packed(t.name)
        load_model(ckpt, 8)
        verify_dir(path)
    except LutqError as e:
        assert "\n" not in str(e)
        outcome = "clean error"
    if record:
        TRIED["lutq"][key.hexdigest()] = outcome
    return outcome


@FUZZ
@given(data=st.data())
def test_mutated_lutq_config(lutq_files, tmp_path, data):
    cfg = json.loads(lutq_files[1])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        qc = cfg.get("quantization_config")
        target = data.draw(st.sampled_from(["tensor", "tensor", "qc", "checksums", "module name", "model"]))
        if target == "module name" and isinstance(qc, dict) and isinstance(qc.get("tensors"), dict) and qc["tensors"]:
            old = data.draw(st.sampled_from(sorted(qc["tensors"])))
            qc["tensors"][data.draw(st.text(max_size=40))] = qc["tensors"].pop(old)
            continue
        if target == "tensor" and isinstance(qc, dict) and isinstance(qc.get("tensors"), dict) and qc["tensors"]:
            obj = qc["tensors"][data.draw(st.sampled_from(sorted(qc["tensors"])))]
            key = data.draw(st.sampled_from(TENSOR_FIELDS))
        elif target == "checksums" and isinstance(qc, dict) and isinstance(qc.get("checksums"), dict) \
                and qc["checksums"]:
            obj = next(iter(qc["checksums"].values()))
            key = data.draw(st.sampled_from(["bytes", "sha256"]))
        elif target == "qc" and isinstance(qc, dict):
            obj, key = qc, data.draw(st.sampled_from(QC_FIELDS))
        else:
            obj, key = cfg, data.draw(st.sampled_from(MODEL_FIELDS))
        if not isinstance(obj, dict):
            continue
        if data.draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = data.draw(hostile_value)
    config = json.dumps(cfg, allow_nan=True).encode()
    check_lutq(lutq_dir(lutq_files, tmp_path, config, lutq_files[2]))


@FUZZ
@given(m=mutation, rerecord=st.booleans())
def test_mutated_lutq_safetensors(lutq_files, tmp_path, m, rerecord):
    shard = mutate(lutq_files[2], m, lutq_files[3])
    check_lutq(lutq_dir(lutq_files, tmp_path, lutq_files[1], shard, rerecord))


@FUZZ
@given(data=st.data())
def test_mutated_lutq_header(lutq_files, tmp_path, data):
    raw = lutq_files[2]
    n = lutq_files[3] - 8
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    extra = b""
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        name = data.draw(st.sampled_from(names))
        kind = data.draw(st.sampled_from(["field", "field", "rename", "duplicate", "non-utf8", "drop", "metadata"]))
        if name not in header:
            continue
        if kind == "field" and isinstance(header[name], dict):
            header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(st.one_of(
                hostile_value, st.sampled_from(["U8", "I8", "F16", "F32", "BF16", "F64", "BOOL"]),
                st.lists(st.integers(0, 300_000), min_size=2, max_size=2)))
        elif kind == "rename":
            header[data.draw(st.text(max_size=30))] = header.pop(name)
        elif kind == "duplicate":
            extra += b"," + json.dumps({name: header[name]})[1:-1].encode()
        elif kind == "non-utf8":
            extra += b',"' + name.encode() + data.draw(st.binary(min_size=1, max_size=3)) + b'":' + json.dumps(
                header[name]).encode()
        elif kind == "drop":
            del header[name]
        else:
            header["__metadata__"] = data.draw(hostile_value)
    text = json.dumps(header).encode()
    text = text[:-1] + extra + b"}" if extra else text
    text += b" " * (-len(text) % 8)
    shard = struct.pack("<Q", len(text)) + text + body
    check_lutq(lutq_dir(lutq_files, tmp_path, lutq_files[1], shard, rerecord=True))


def test_the_pristine_lutq_dir_loads(lutq_files, tmp_path):
    """The fuzz's starting point is valid: the mutations, not the fixture, are what the errors above refuse."""
    assert check_lutq(lutq_dir(lutq_files, tmp_path, lutq_files[1], lutq_files[2]), record=False) == "loaded"


def test_enough_distinct_inputs_were_tried():
    """The properties above must have met many distinct malformed files, not one mutation over and over."""
    print("\ndistinct mutated inputs tried (every one loaded or ended in a one-line CheckpointError/LutqError): "
          + "; ".join(f"{k} {len(v)} ({sum(o == 'clean error' for o in v.values())} clean errors, "
                      f"{sum(o == 'loaded' for o in v.values())} loaded)" for k, v in TRIED.items()))
    assert min(len(v) for v in TRIED.values()) >= 150
