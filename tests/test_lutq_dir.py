"""The lutq directory: write, load (dequantized and packed), refuse what it cannot read, and never leave half an OUT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.checkpoint import lutq_dir
from lutq.checkpoint.lutq_dir import LutqCheckpoint
from lutq.errors import CheckpointError, LutqError
from lutq.quantize import get_format
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.rules import parse_rules

ALL_FORMATS = ["int2", "int3", "int4", "int2k", "int3k", "int4k", "nf2", "nf3", "nf4", "nf2k", "nf3k", "nf4k", "ternary", "ternary-group", "fineq", "int8"]


def quantize(src, out, fmt="int4", group_size=32, **kw):
    with open_checkpoint(src) as ckpt:
        return quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(fmt), group_size, **kw))


@pytest.fixture
def tiny(tiny_models):
    return tiny_models("llama")[0]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_writes_and_loads_back(tiny, tmp_path, fmt):
    out = tmp_path / "q"
    quantize(tiny, out, f"{fmt},lm_head={fmt}")
    src = open_checkpoint(tiny)
    q = open_checkpoint(out)
    assert isinstance(q, LutqCheckpoint)
    assert {t.name for t in q.tensors()} == {t.name for t in src.tensors()}
    for t in src.tensors():
        w = src.load(t.name)
        got = q.load(t.name)
        assert got.shape == w.shape and got.dtype == np.float32
        if q.is_packed(t.name):
            # exactly what the format's own round trip gives: nothing is lost on the way through the files
            assert np.array_equal(got, get_format(fmt).dequantize(get_format(fmt).quantize(w, 32)))
        elif t.name == "model.embed_tokens.weight":
            assert np.array_equal(got, w.astype(np.float16).astype(np.float32))
        else:
            assert np.array_equal(got, w)  # norms stay fp32
    assert sum(q.is_packed(t.name) for t in q.tensors()) == 2 * 7 + 1  # 7 linears a layer and the untied lm_head


def test_packed_arrays_are_memory_mapped_views(tiny, tmp_path):
    quantize(tiny, tmp_path / "q", "nf3")
    q = open_checkpoint(tmp_path / "q")
    p = q.packed("model.layers.1.mlp.down_proj.weight")
    assert p.format == "nf3" and p.shape == (64, 160) and p.group_size == 32
    for a in p.arrays.values():
        assert not a.flags.writeable and not a.flags.owndata  # views of the map, not copies
    assert p.arrays["codes"].shape == (2, 160 // 16, 3, 64)  # layout.pack_codebook3
    assert p.arrays["scales"].dtype == np.float16 and p.arrays["codebook"].dtype == np.float32
    with pytest.raises(CheckpointError, match="not quantized"):
        q.packed("model.norm.weight")


def test_config_and_report(tiny, tmp_path):
    report = quantize(tiny, tmp_path / "q", "nf4,*.down_proj=int4,lm_head=fp16")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lutq" and qc["format_version"] == lutq_dir.FORMAT_VERSION
    assert qc["tensors"]["model.layers.0.mlp.down_proj"]["format"] == "int4"
    assert qc["tensors"]["model.layers.0.mlp.up_proj"] == {
        "format": "nf4", "bits": 4, "group_size": 32, "shape": [160, 64], "layout": "codebook",
        "layout_version": qc["tensors"]["model.layers.0.mlp.up_proj"]["layout_version"]}
    assert "lm_head" not in qc["tensors"]
    saved = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    rows = {t["name"]: t for t in saved["tensors"]}
    assert rows["lm_head.weight"]["format"] == "fp16"
    assert rows["model.layers.1.self_attn.q_proj.weight"]["format"] == "nf4"
    assert 0 < rows["model.layers.1.self_attn.q_proj.weight"]["rel_error"] < 0.2
    assert saved["summary"]["bits_per_weight"] == report.summary()["bits_per_weight"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (tiny / name).read_bytes()


def test_tied_lm_head_is_quantized_int6k_unless_kept_fp16(tiny_models, tmp_path):
    tied = tiny_models("llama-tied")[0]
    emb = open_checkpoint(tied).load("model.embed_tokens.weight")
    quantize(tied, tmp_path / "a", "int4,lm_head=fp16")
    assert not open_checkpoint(tmp_path / "a").has("lm_head.weight")
    assert open_checkpoint(tmp_path / "a").config.tie_word_embeddings is True
    for rules, fmt, group in (("nf3", "int6k", 32), ("int4,lm_head=nf4", "nf4", 32)):
        quantize(tied, tmp_path / fmt, rules)
        q = open_checkpoint(tmp_path / fmt)
        assert q.packed("lm_head.weight").format == fmt and q.config.tie_word_embeddings is False
        want = get_format(fmt).dequantize(get_format(fmt).quantize(emb, group))
        assert np.array_equal(q.load("lm_head.weight"), want)


def test_embed_int8(tiny, tmp_path):
    quantize(tiny, tmp_path / "q", "int4", embed="int8")
    q = open_checkpoint(tmp_path / "q")
    assert q.packed("model.embed_tokens.weight").arrays["codes"].dtype == np.int8
    w = open_checkpoint(tiny).load("model.embed_tokens.weight")
    assert np.abs(q.load("model.embed_tokens.weight") - w).max() < np.abs(w).max() / 100


@pytest.mark.parametrize("embed", ["fp16", "int8"])
def test_embedding_rows_are_gathered_from_the_stored_type(tiny, tmp_path, embed):
    """The runtime keeps the embedding as stored (fp16 memory map or int8 codes) and widens only the rows it gathers."""
    from lutq.runtime.model import load_model

    quantize(tiny, tmp_path / "q", "int4", embed=embed)
    q = open_checkpoint(tmp_path / "q")
    net = load_model(q, 16)
    assert not isinstance(net.embed, np.ndarray)  # no fp32 copy of the whole table
    ids = np.array([3, 0, 3, 250])
    np.testing.assert_array_equal(net.embed[ids], q.load("model.embed_tokens.weight")[ids])
    assert net.embed[ids].dtype == np.float32


def test_shards_above_the_limit(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(lutq_dir, "SHARD_BYTES", 40_000)
    quantize(tiny, tmp_path / "q", "int4")
    shards = sorted(p.name for p in (tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "q" / "model.safetensors").exists()
    q, src = open_checkpoint(tmp_path / "q"), open_checkpoint(tiny)
    assert np.array_equal(q.load("model.norm.weight"), src.load("model.norm.weight"))
    assert q.load("model.layers.1.mlp.up_proj.weight").shape == (160, 64)


def test_safetensors_files_are_standard(tiny, tmp_path):
    from safetensors.numpy import load_file

    quantize(tiny, tmp_path / "q", "fineq")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.o_proj.codes"].dtype == np.uint8
    assert tensors["model.layers.0.self_attn.o_proj.scales"].shape == (64, 2)


def edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_format_version_is_refused(tiny, tmp_path):
    quantize(tiny, tmp_path / "q")
    edit_config(tmp_path / "q", lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="lutq format version 99 is not supported"):
        open_checkpoint(tmp_path / "q")


def test_fineq_layout_1_is_still_read_and_others_refused(tiny, tmp_path):
    """fineq directories written before layout 2 (cluster bytes unswapped) open and dequantize as layout 1; a
    version this lutq never wrote is refused."""
    from lutq.quantize import fineq

    quantize(tiny, tmp_path / "q", "fineq")
    name = "model.layers.0.mlp.up_proj"
    with open_checkpoint(tmp_path / "q") as ckpt:
        assert ckpt.packed(name + ".weight").meta["layout_version"] == 2
        codes = np.asarray(ckpt.packed(name + ".weight").arrays["codes"])
        m = ckpt.packed(name + ".weight").shape[0]
    edit_config(tmp_path / "q", lambda c: c["quantization_config"]["tensors"][name].update(layout_version=1))
    with open_checkpoint(tmp_path / "q") as ckpt:  # read as layout 1: the same bytes taken as unswapped
        p = ckpt.packed(name + ".weight")
        assert np.array_equal(fineq.unpack(np.asarray(p.arrays["codes"]), m, p.meta["layout_version"]),
                              fineq.unpack(codes, m, 1))
    edit_config(tmp_path / "q", lambda c: c["quantization_config"]["tensors"][name].update(layout_version=3))
    with pytest.raises(CheckpointError, match="code layout 'fineq-clusters' version 3"):
        open_checkpoint(tmp_path / "q")


def test_stale_code_layout_and_broken_entries_are_refused(tiny, tmp_path):
    quantize(tiny, tmp_path / "q")
    name = "model.layers.0.mlp.up_proj"
    edit_config(tmp_path / "q", lambda c: c["quantization_config"]["tensors"][name].update(layout_version=0))
    with pytest.raises(CheckpointError, match="code layout 'bitserial' version 0"):
        open_checkpoint(tmp_path / "q")
    edit_config(tmp_path / "q", lambda c: c["quantization_config"]["tensors"][name].update(layout_version=None,
                                                                                              format="int9"))
    with pytest.raises(CheckpointError, match="unknown format 'int9'"):
        open_checkpoint(tmp_path / "q")
    quantize(tiny, tmp_path / "r")
    edit_config(tmp_path / "r", lambda c: c["quantization_config"]["tensors"][name].update(group_size=64))
    with pytest.raises(CheckpointError, match=r"up_proj.scales' is F16 \[160, 2\], but .* implies F16 \[160, 1\]"):
        open_checkpoint(tmp_path / "r")


def test_existing_out_is_refused_unless_forced(tiny, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LutqError, match="already exists"):
        quantize(tiny, out)
    assert (out / "keep.txt").read_text() == "mine"
    with open_checkpoint(tiny) as ckpt:
        quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules("int4"), 32), force=True)
    assert not (out / "keep.txt").exists() and isinstance(open_checkpoint(out), LutqCheckpoint)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


class FailingCheckpoint:
    """Wraps a checkpoint and raises on the n-th tensor load."""

    def __init__(self, ckpt, n, exc):
        self._ckpt, self._n, self._exc = ckpt, n, exc

    def load(self, name):
        self._n -= 1
        if self._n == 0:
            raise self._exc
        return self._ckpt.load(name)

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)


@pytest.mark.parametrize("exc", [CheckpointError("x", "tensor is corrupt"), KeyboardInterrupt()])
def test_interrupted_quantize_leaves_nothing(tiny, tmp_path, exc):
    out = tmp_path / "q"
    with pytest.raises(type(exc)):
        quantize_checkpoint(FailingCheckpoint(open_checkpoint(tiny), 9, exc), out, QuantizeOptions(parse_rules("nf4"), 32))
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_are_refused(tiny, tmp_path):
    class NaNs(FailingCheckpoint):
        def load(self, name):
            w = self._ckpt.load(name)
            return np.full_like(w, np.nan) if "up_proj" in name else w

    with pytest.raises(LutqError, match="NaN"):
        quantize_checkpoint(NaNs(open_checkpoint(tiny), 0, None), tmp_path / "q", QuantizeOptions(parse_rules("int4"), 32))
    assert list(tmp_path.iterdir()) == []


def test_group_size_must_divide_k(tiny, tmp_path):
    with pytest.raises(LutqError, match="K = 160 is not a multiple of the group size 64"):
        quantize(tiny, tmp_path / "q", group_size=64)
    assert list(tmp_path.iterdir()) == []


def test_quantized_model_runs_and_stays_close(tiny, tmp_path):
    from lutq.runtime.model import load_model

    quantize(tiny, tmp_path / "q", "int4")
    ids = np.arange(1, 40) % 250
    ref = load_model(open_checkpoint(tiny), 64).forward(ids, all_logits=True)
    got = load_model(open_checkpoint(tmp_path / "q"), 64).forward(ids, all_logits=True)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95  # a random tiny model: measured 0.978


def test_copy_of_a_lutq_dir_still_loads(tiny, tmp_path):
    quantize(tiny, tmp_path / "q", "ternary")
    shutil.copytree(tmp_path / "q", tmp_path / "copy")
    assert isinstance(open_checkpoint(tmp_path / "copy"), LutqCheckpoint)
