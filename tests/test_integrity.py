"""Integrity of a lutq directory: the recorded size and sha256 of each tensor file, `lutq verify`, `--verify`, and the
checks every load makes (sizes, and each quantized tensor's stored arrays against its metadata).

Each broken directory must end in one error line naming the file (and the tensor, where there is one), exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.checkpoint import lutq_dir
from lutq.checkpoint.integrity import verify_dir
from lutq.cli import main
from lutq.errors import CheckpointError
from lutq.quantize import FORMATS, get_format
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.rules import parse_rules

UP = "model.layers.0.mlp.up_proj"


def quantize(src, out, fmt="int4"):
    with open_checkpoint(src) as ckpt:
        quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(fmt), 32))
    return out


@pytest.fixture(scope="module")
def packed_dir(tiny_models, tmp_path_factory):
    return quantize(tiny_models("llama")[0], tmp_path_factory.mktemp("q") / "q", "int4,*.down_proj=nf3,lm_head=fineq")


@pytest.fixture
def q(packed_dir, tmp_path):
    """A fresh copy to break."""
    return shutil.copytree(packed_dir, tmp_path / "q")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the command line in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys, args, *needles) -> str:
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def edit_config(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def rerecord(path) -> None:
    """Record the files as they are now: a test that breaks a shard on purpose then reaches the checks behind
    the size and hash (as if the directory had been written that way)."""
    def update(cfg):
        cfg["quantization_config"]["checksums"] = {
            f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in path.glob("model*.safetensors")}
    edit_config(path, update)


def split_shard(path):
    data = (path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data[8 : 8 + n], data[8 + n :]


def write_shard(path, header: bytes, body: bytes) -> None:
    header += b" " * (-len(header) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + body)
    rerecord(path)


def rewrite_tensors(path, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = change(dict(load_file(path / "model.safetensors")))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "lutq", "lutq_format_version": "1"})
    rerecord(path)


# --- what the writer records, and verify on a good directory -----------------------------------------------------

def test_sizes_and_hashes_are_recorded(packed_dir):
    record = json.loads((packed_dir / "config.json").read_text())["quantization_config"]["checksums"]
    f = packed_dir / "model.safetensors"
    assert record == {"model.safetensors": {"bytes": f.stat().st_size,
                                            "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}}


def test_every_shard_is_recorded(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(lutq_dir, "SHARD_BYTES", 40_000)
    out = quantize(tiny_models("llama")[0], tmp_path / "q")
    record = json.loads((out / "config.json").read_text())["quantization_config"]["checksums"]
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(record) == shards
    assert verify_dir(out)["files"] == len(shards)
    (out / shards[1]).write_bytes((out / shards[1]).read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match=f"{shards[1]}: sha256 differs"):
        verify_dir(out)


def test_verify_a_good_directory(packed_dir, capsys):
    code, out, err = cli(capsys, "verify", packed_dir)
    assert code == 0 and out.startswith(f"OK {packed_dir}") and "sha256 verified" in out, err
    code, out, _ = cli(capsys, "verify", packed_dir, "--json")
    res = json.loads(out)
    assert code == 0 and res["sha256"] == "ok" and res["files"] == 1 and res["quantized"] == 2 * 7 + 1


def test_stored_arrays_are_what_each_format_writes():
    """The loader's expectation (format.stored_arrays(meta)) is exactly what quantize produces, for every format."""
    w = np.random.default_rng(0).standard_normal((70, 320)).astype(np.float32)
    for name in FORMATS:
        p = get_format(name).quantize(w, 64)
        assert get_format(name).stored_arrays(p.meta) == {k: (a.dtype, a.shape) for k, a in p.arrays.items()}, name
        for bad in ({"bits": 5}, {"group_size": 48}, {"shape": [70, 300]}, {"shape": [70]}, {"bits": True},
                    {"layout": "other"}):
            with pytest.raises(ValueError):
                get_format(name).stored_arrays({**p.meta, **bad})


# --- broken directories: each one error line, naming the file and the tensor --------------------------------------

def test_one_flipped_byte_fails_verify_naming_the_file(q, capsys):
    f = q / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 1  # tensor data: the header still parses, the size is unchanged
    f.write_bytes(bytes(data))
    assert_one_line_error(capsys, ["verify", q], "model.safetensors", "sha256 differs")
    assert_one_line_error(capsys, ["generate", q, "-p", "x", "-n", "1", "--verify"], "model.safetensors", "sha256")
    open_checkpoint(q)  # without --verify only sizes and shapes are checked: the flip goes unnoticed


def test_truncated_shard_fails_every_load(q, capsys):
    f = q / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: \d+ bytes, but \d+ were written"):
        open_checkpoint(q)
    assert_one_line_error(capsys, ["inspect", q], "model.safetensors", "were written")
    assert_one_line_error(capsys, ["verify", q], "model.safetensors", "were written")


def test_appended_bytes_fail_the_size_check(q):
    with open(q / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="were written"):
        open_checkpoint(q)


def test_metadata_shape_that_lies_fails_load(q, capsys):
    edit_config(q, lambda c: c["quantization_config"]["tensors"][UP].update(shape=[192, 64]))
    assert_one_line_error(capsys, ["inspect", q], "model.safetensors", f"'{UP}.codes' is U8 [5, 8, 4, 32]",
                          "implies U8 [6, 8, 4, 32]")


def test_model_config_that_lies_about_shapes(q, capsys):
    edit_config(q, lambda c: c.update(intermediate_size=192))
    assert_one_line_error(capsys, ["verify", q], "gate_proj.weight", "shape [160, 64], the config implies [192, 64]")
    assert_one_line_error(capsys, ["generate", q, "-p", "x", "-n", "1"], "gate_proj.weight", "[192, 64]")


@pytest.mark.parametrize("edit, needle", [
    ({"bits": 3}, "bits 3, but int4 stores 4-bit codes"),
    ({"group_size": 48}, "group size 48"),
    ({"shape": [2**62, 2**62]}, "is U8"),  # checked from the numbers alone: nothing is allocated
    ({"shape": "big"}, "bad shape 'big'"),
    ({"format": ["int4"]}, "unknown format ['int4']"),
    ({"layout": {"x": 1}}, "code layout {'x': 1}"),
    ({"layout": "weird", "layout_version": "none"}, "code layout 'weird' version 'none'"),
    ({"layout": "fineq-clusters", "layout_version": 1}, "but int4 stores its codes 'bitserial'"),
])
def test_impossible_metadata_is_refused(q, edit, needle):
    edit_config(q, lambda c: c["quantization_config"]["tensors"][UP].update(edit))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(q)
    assert needle in str(e.value)


def test_unknown_format_version(q, capsys):
    edit_config(q, lambda c: c["quantization_config"].update(format_version=2))
    assert_one_line_error(capsys, ["verify", q], "lutq format version 2 is not supported")
    assert_one_line_error(capsys, ["generate", q, "-p", "x", "-n", "1"], "lutq format version 2 is not supported")


def test_missing_arrays_and_tensors(q, capsys):
    rewrite_tensors(q, lambda t: {k: v for k, v in t.items() if k not in (f"{UP}.biases", "model.norm.weight")})
    assert_one_line_error(capsys, ["inspect", q], f"'{UP}.biases' is missing")
    edit_config(q, lambda c: c["quantization_config"]["tensors"][UP].update(format="nf4", bits=4))
    assert_one_line_error(capsys, ["inspect", q], f"'{UP}.codebook' is missing")


def test_missing_plain_tensor(q, capsys):
    rewrite_tensors(q, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    assert_one_line_error(capsys, ["verify", q], "'model.norm.weight' is missing")
    assert_one_line_error(capsys, ["generate", q, "-p", "x", "-n", "1"], "'model.norm.weight' is missing")


def test_wrong_dtype_and_stray_arrays(q, capsys):
    rewrite_tensors(q, lambda t: {**t, f"{UP}.codes": t[f"{UP}.codes"].view(np.int8)})
    assert_one_line_error(capsys, ["inspect", q], f"'{UP}.codes' is I8")
    rewrite_tensors(q, lambda t: {**t, f"{UP}.codes": t[f"{UP}.codes"].view(np.uint8),
                                  f"{UP}.codebook": np.zeros(16, np.float32)})
    assert_one_line_error(capsys, ["inspect", q], f"'{UP}.codebook' is not part of a int4 tensor")
    rewrite_tensors(q, lambda t: {**{k: v for k, v in t.items() if k != f"{UP}.codebook"},
                                  f"{UP}.weight": np.zeros((160, 64), np.float32)})
    assert_one_line_error(capsys, ["inspect", q], f"'{UP}.weight' is stored both quantized and unquantized")


def test_duplicated_tensor_name_in_the_header(q, capsys):
    header, body = split_shard(q)
    entries = json.loads(header)
    dup = json.dumps({"model.norm.weight": entries["model.norm.weight"]})[1:-1]
    write_shard(q, header.rstrip()[:-1] + b"," + dup.encode() + b"}", body)
    assert_one_line_error(capsys, ["inspect", q], "model.safetensors", "'model.norm.weight' appears twice")


def test_non_utf8_tensor_name(q, capsys):
    header, body = split_shard(q)
    write_shard(q, header.replace(b'"model.norm.weight"', b'"model.norm.\xff\xfe"'), body)
    assert_one_line_error(capsys, ["inspect", q], "model.safetensors", "not valid UTF-8 JSON")


def test_names_with_newlines_and_lone_surrogates_stay_one_printable_line(q, capsys):
    """JSON can spell any name, including a newline and a lone surrogate that UTF-8 cannot encode."""
    edit_config(q, lambda c: c["quantization_config"]["tensors"].update({"evil\nname\udc80": {"format": "x"}}))
    line = assert_one_line_error(capsys, ["inspect", q], "evil\\nname\\udc80", "unknown format")
    line.encode("utf-8")


def test_directories_without_hashes_still_load(q, capsys):
    edit_config(q, lambda c: c["quantization_config"].pop("checksums"))
    open_checkpoint(q).load(f"{UP}.weight")
    code, out, _ = cli(capsys, "verify", q)
    assert code == 0 and "no sha256 recorded" in out
    assert verify_dir(q)["sha256"] == "absent"


@pytest.mark.parametrize("record, needle", [
    ({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}, "not a file of the directory"),
    ({"model.safetensors": {"bytes": -1, "sha256": "0" * 64}}, "is not {\"bytes\": int"),
    ({"model.safetensors": {"bytes": 10, "sha256": "xyz"}}, "is not {\"bytes\": int"),
    ({}, "not a non-empty object"),
    ([1, 2], "not a non-empty object"),
    ({"model-00002-of-00002.safetensors": {"bytes": 0, "sha256": "0" * 64}}, "missing"),
])
def test_malformed_checksum_records(q, record, needle):
    edit_config(q, lambda c: c["quantization_config"].update(checksums=record))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(q)
    assert needle in str(e.value)


def test_record_and_shards_must_agree(q):
    size = (q / "model.safetensors").stat().st_size
    (q / "extra.safetensors").write_bytes(b"")
    edit_config(q, lambda c: c["quantization_config"]["checksums"].update(
        {"extra.safetensors": {"bytes": 0, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="extra.safetensors: recorded in quantization_config.checksums but not"):
        open_checkpoint(q)
    edit_config(q, lambda c: c["quantization_config"].update(
        checksums={"other.safetensors": {"bytes": size, "sha256": "0" * 64}}))
    (q / "other.safetensors").write_bytes(b"\0" * size)
    with pytest.raises(CheckpointError, match="model.safetensors: not in quantization_config.checksums"):
        open_checkpoint(q)


def test_verify_refuses_what_is_not_a_lutq_directory(tiny_models, tmp_path, capsys):
    assert_one_line_error(capsys, ["verify", tiny_models("llama")[0]], "not a lutq directory")
    assert_one_line_error(capsys, ["verify", tmp_path / "nope"], "nope", "not a directory")
    assert_one_line_error(capsys, ["generate", tiny_models("llama")[0], "-p", "x", "--verify"], "not a lutq directory")
