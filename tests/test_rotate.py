"""--rotate (lutq/quantize/rotate.py): the orthogonal matrices, the rotated model's equivalence to the original (lutq's
runtime and transformers), the refusals, and quantizing a rotated model end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.errors import LutqError
from lutq.quantize.rotate import RotatedCheckpoint, RotationSpec, hadamard, orthogonal
from lutq.runtime.llama import load_llama
from test_cli import assert_clean_error, lutq


def test_hadamard_against_its_definition():
    for n in (1, 2, 4, 8, 16, 64):
        h = hadamard(n)
        i = np.arange(n)
        # Sylvester's matrix: H[i, j] = (-1)^(popcount(i & j))
        popcount = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
        assert np.array_equal(h, (-1.0) ** popcount)
        assert np.array_equal(h @ h.T, n * np.eye(n))
    with pytest.raises(ValueError):
        hadamard(12)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("n", [1, 9, 12, 48, 64, 72, 576])
def test_rotations_are_orthogonal(n, kind):
    q = orthogonal(n, kind, np.random.default_rng(0))
    assert q.shape == (n, n)
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-10
    assert np.array_equal(q, orthogonal(n, kind, np.random.default_rng(0)))  # seeded
    if kind == "hadamard":
        p = n & -n  # the power-of-two factor: |entries| are those of the normalised Hadamard times R_m's
        odd = n // p
        blocks = np.abs(q).reshape(p, odd, p, odd).transpose(0, 2, 1, 3)  # [i, j] block = |H[i, j]| |R_m| / sqrt(p)
        assert np.allclose(blocks, blocks[0, 0][None, None])
        if odd == 1:
            assert np.allclose(np.abs(q), 1 / np.sqrt(n))


def logits(ckpt, ids):
    return load_llama(ckpt, 64).forward(ids, all_logits=True)


# (make_hf_model arguments): GQA (4 heads, 2 KV heads) throughout; hidden 48 and 72 have odd factors 3 and 9 and
# head_dim 12 and 18 (not powers of two); qwen2 has q/k/v biases, the llama variant o_proj and MLP biases.
VARIANTS = {
    "untied-48": dict(hidden_size=48),
    "tied-72": dict(hidden_size=72, tie=True),
    "tied-64": dict(tie=True),
    "qwen2-biases": dict(arch="qwen2"),
    "llama-biases": dict(hidden_size=48, attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    from tiny import make_hf_model

    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            make_hf_model(path, **VARIANTS[name])
            built[name] = path
        return built[name]

    return get


@pytest.mark.parametrize("kind,keep", [("hadamard", 0), ("random", 0), ("hadamard", 3)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotated_model_is_equivalent(variant_dirs, variant, kind, keep):
    path = variant_dirs(variant)
    src = open_checkpoint(path)
    rot = RotatedCheckpoint(src, RotationSpec(kind, 3, keep))
    ids = np.arange(1, 48)
    want, got = logits(src, ids), logits(rot, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # it is a different model: norms folded (ones but on the channels kept out), weights turned, a head of its own
    norm = "model.layers.0.input_layernorm.weight"
    ones = np.ones(src.config.hidden_size, np.float32)
    ones[rot.kept] = src.load(norm)[rot.kept]
    assert len(rot.kept) == keep and np.array_equal(rot.load(norm), ones)
    assert np.abs(rot.q @ rot.q.T - np.eye(len(ones))).max() < 1e-10
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(rot.load(q), src.load(q), atol=1e-3)
    assert rot.has("lm_head.weight") and rot.config.tie_word_embeddings is False
    assert rot.head_untied == (not src.has("lm_head.weight"))


def test_massive_channels_are_found(tmp_path):
    """A channel the embedding makes 40x larger than the others is the one --rotate-keep 1 leaves alone."""
    from safetensors.numpy import load_file, save_file
    from tiny import make_numpy_model

    from lutq.quantize.rotate import massive_channels

    path = make_numpy_model(tmp_path / "m", hidden=64)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"][:, 37] = 3.0  # others ~0.08
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ckpt = open_checkpoint(path)
    assert massive_channels(ckpt, 1, 0).tolist() == [37]
    rot = RotatedCheckpoint(ckpt, RotationSpec("hadamard", 0, 1))
    assert rot.q[37, 37] == 1 and np.count_nonzero(rot.q[37]) == 1 and np.count_nonzero(rot.q[:, 37]) == 1
    with pytest.raises(LutqError, match="--rotate-keep"):
        RotatedCheckpoint(ckpt, RotationSpec("hadamard", 0, 64))


def test_rotated_weights_run_in_transformers(variant_dirs, tmp_path):
    """The rotated, unquantized weights written as an HF checkpoint give transformers the original's logits."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    for variant in ("tied-72", "qwen2-biases"):
        path = variant_dirs(variant)
        rot = RotatedCheckpoint(open_checkpoint(path), RotationSpec("hadamard", 0))
        out = tmp_path / variant
        out.mkdir()
        save_file({t.name: rot.load(t.name) for t in rot.tensors()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
        ids = torch.arange(1, 40)[None]
        with torch.no_grad():
            want = transformers.AutoModelForCausalLM.from_pretrained(path).float()(ids).logits[0].numpy()
            got = transformers.AutoModelForCausalLM.from_pretrained(out).float()(ids).logits[0].numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_rotate_refuses_bitnet_ternary_and_bad_options(tiny_models, tmp_path):
    from tiny import make_bitnet_model

    bitnet = tmp_path / "bitnet"
    make_bitnet_model(bitnet)
    with pytest.raises(LutqError, match="--rotate supports Llama-family"):
        RotatedCheckpoint(open_checkpoint(bitnet), RotationSpec())
    assert_clean_error(lutq("quantize", bitnet, tmp_path / "a", "--format", "int4", "-g", "32", "--rotate"),
                       "--rotate", "bitnet")
    tiny = tiny_models("llama")[0]
    for fmt in ("ternary", "int4,*.down_proj=ternary-group"):
        assert_clean_error(lutq("quantize", tiny, tmp_path / "b", "--format", fmt, "--rotate"), "--rotate", "ternary")
    assert_clean_error(lutq("quantize", tiny, tmp_path / "c", "--format", "int4", "--rotate", "--rotate-kind", "x"),
                       "--rotate-kind")
    assert_clean_error(lutq("quantize", tiny, tmp_path / "d", "--format", "int4", "--rotate-seed", "1"), "--rotate")
    assert_clean_error(lutq("quantize", tiny, tmp_path / "d", "--format", "int4", "--rotate", "--rotate-keep", "99"),
                       "--rotate-keep")
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_quantize_rotated_end_to_end(tiny_models, tmp_path, fmt):
    """A tied tiny model quantized with --rotate: the config records the rotation, the head is its own tensor, it
    runs on the LUT kernels and generates, and its logits stay as close to the fp model's as without rotation."""
    tiny = tiny_models("llama-tied")[0]
    outs = {}
    for name, extra in (("plain", []), ("rot", ["--rotate", "--rotate-seed", "5"])):
        outs[name] = tmp_path / name
        res = lutq("quantize", tiny, outs[name], "--format", fmt, "-g", "32", "--threads", "1", "--json", *extra)
        assert res.returncode == 0, res.stderr
    config = json.loads((outs["rot"] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["rotate"] == {"kind": "hadamard", "seed": 5, "keep": 0} and "rotate" not in json.loads(
        (outs["plain"] / "config.json").read_text())["quantization_config"]
    assert config["tie_word_embeddings"] is False and qc["tensors"]["lm_head"]["format"] == "int6k"
    gen = lutq("generate", outs["rot"], "-p", "The capital of", "-n", "6", "--temperature", "0", "--threads", "1")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The capital of")
    from lutq.runtime.model import load_model

    ids = np.arange(1, 100)
    ref = load_model(open_checkpoint(tiny), 128, kernels=False).forward(ids, all_logits=True)
    err = {n: np.linalg.norm(load_model(open_checkpoint(d), 128).forward(ids, all_logits=True) - ref)
           for n, d in outs.items()}
    assert err["rot"] < 2 * err["plain"]  # random weights have no outliers to gain from; nothing must break


def test_rotated_tied_head_with_budget_and_rules(tiny_models, tmp_path):
    """How a head that rotation unties is stored: its rule's format (lm_head=fp16 cannot stay tied: an fp16 tensor),
    and with a bits budget fp16 outside the budget, as the tied head was; the calibration composes."""
    from tiny import TEXT

    tiny = tiny_models("llama-tied")[0]
    res = lutq("quantize", tiny, tmp_path / "fp16", "--format", "int4,lm_head=fp16", "-g", "32", "--rotate", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["formats"]["fp16"]["tensors"] == 2  # the embedding and the head
    assert summary["bits_per_weight_layers"] == pytest.approx(5.0)  # int4 G = 32: fp16 scale and offset per group
    assert summary["bits_per_weight"] > summary["bits_per_weight_layers"]  # the fp16 head is counted
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 3)
    res = lutq("quantize", tiny, tmp_path / "budget", "--bits-budget", "3.6", "--calibration", str(text), "--rotate",
               "--rotate-keep", "2", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["bits_per_weight_layers"] <= 3.6
    qc = json.loads((tmp_path / "budget" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in qc["tensors"] and qc["rotate"] == {"kind": "hadamard", "seed": 0, "keep": 2}
    assert "calibration" in qc
    from lutq.runtime.model import load_model

    model = load_model(open_checkpoint(tmp_path / "budget"), 64)
    assert np.isfinite(model.forward(np.arange(1, 20), all_logits=True)).all()
    shutil.rmtree(tmp_path / "budget")


def test_budget_plans_from_the_source(tiny_models, tmp_path):
    """--bits-budget with --rotate gives every weight the format it gets without (the plan reads the source)."""
    tiny = tiny_models("llama")[0]
    formats = {}
    for name, extra in (("plain", []), ("rot", ["--rotate"])):
        res = lutq("quantize", tiny, tmp_path / name, "--bits-budget", "3.5", "--threads", "1", *extra)
        assert res.returncode == 0, res.stderr
        report = json.loads((tmp_path / name / "quant_report.json").read_text())
        formats[name] = {t["name"]: (t["format"], t["group_size"]) for t in report["tensors"]}
    assert formats["rot"] == formats["plain"]
    assert len({f for f in formats["plain"].values() if f[1]}) > 1  # a real mix, not one format everywhere
