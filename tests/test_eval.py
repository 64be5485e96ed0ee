"""Perplexity: lutq's against an independent float64 computation from transformers' logits, and the eval command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.errors import LutqError
from lutq.eval import perplexity, window_nll
from lutq.runtime.model import load_model
from lutq.runtime.tokenizer import Tokenizer
from test_cli import assert_clean_error, lutq
from tiny import TEXT


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


def reference_perplexity(torch_model, ids: list[int], ctx: int, windows: int) -> float:
    """transformers' logits, log-softmax in float64 by torch, the same windows: the protocol written out again."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = torch.tensor(ids[w * ctx : (w + 1) * ctx])[None]
            logp = torch.log_softmax(torch_model(window).logits[0].double(), dim=-1)
            nll -= logp[torch.arange(ctx - 1), window[0, 1:]].sum().item()
            count += ctx - 1
    return math.exp(nll / count)


def test_perplexity_matches_transformers(tiny_models, text_file):
    path, torch_model = tiny_models("llama")
    ckpt = open_checkpoint(path)
    ids = Tokenizer(path).encode(text_file.read_text())
    ctx = 48
    res = perplexity(load_model(ckpt, ctx), ids, ctx, max_windows=5)
    assert res.windows == 5 and res.tokens == 5 * (ctx - 1) and res.ctx == ctx
    assert res.perplexity == pytest.approx(reference_perplexity(torch_model, ids, ctx, 5), rel=1e-4)
    assert res.nll == pytest.approx(math.log(res.perplexity))


def test_windows_and_limits(tiny_models):
    model = load_model(open_checkpoint(tiny_models("llama")[0]), 16)
    ids = list(range(5, 5 + 50))
    assert perplexity(model, ids, 16).windows == 3  # the partial fourth window is dropped
    assert perplexity(model, ids, 16, max_windows=2).tokens == 2 * 15
    with pytest.raises(LutqError, match="fewer than one window"):
        perplexity(model, ids[:10], 16)
    with pytest.raises(LutqError, match="--ctx"):
        perplexity(model, ids, 1)


def test_window_nll_is_exact_for_extreme_logits():
    logits = np.array([[0.0, 1000.0, -1000.0], [5.0, 5.0, 5.0]], np.float32)
    assert window_nll(logits, np.array([1, 2])) == pytest.approx(math.log(3))


def test_eval_command_json(tiny_models, text_file, tmp_path):
    path = tiny_models("llama")[0]
    res = lutq("eval", path, "--text", text_file, "--ctx", "32", "--max-windows", "3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"perplexity", "tokens", "ctx", "windows", "model", "seconds"} <= set(out)
    assert out["windows"] == 3 and out["tokens"] == 93 and out["ctx"] == 32
    ids = Tokenizer(path).encode(text_file.read_text())
    direct = perplexity(load_model(open_checkpoint(path), 32), ids, 32, 3).perplexity
    assert out["perplexity"] == pytest.approx(direct, rel=1e-6)
    # a quantized model: int4 stays close, int2 drifts further
    ppl = {}
    for fmt in ("int4", "int2"):
        q = lutq("quantize", path, tmp_path / fmt, "--format", fmt, "-g", "32", "--json")
        assert q.returncode == 0, q.stderr
        r = lutq("eval", tmp_path / fmt, "--text", text_file, "--ctx", "32", "--max-windows", "3", "--json")
        ppl[fmt] = json.loads(r.stdout)["perplexity"]
    assert abs(math.log(ppl["int4"] / direct)) < abs(math.log(ppl["int2"] / direct))
    plain = lutq("eval", path, "--text", text_file, "--ctx", "32", "--max-windows", "1")
    assert plain.returncode == 0 and plain.stdout.startswith("perplexity ")
    half = lutq("eval", path, "--text", text_file, "--ctx", "32", "--max-windows", "3", "--json", "--kv-cache", "f16")
    assert json.loads(half.stdout)["perplexity"] == pytest.approx(direct, rel=1e-3)  # keys/values to 11 bits


def test_eval_dense_runs_the_dequantized_weights(tiny_models, text_file, tmp_path):
    """`--dense`: a quantized model's perplexity through its dequantized weights equals transformers' on the same
    model with those weights copied in; through the kernels (int8 tables) it differs."""
    import copy

    import torch

    path, torch_model = tiny_models("llama")
    q = lutq("quantize", path, tmp_path / "nf3", "--format", "nf3", "-g", "32", "--json")
    assert q.returncode == 0, q.stderr
    args = ("eval", tmp_path / "nf3", "--text", text_file, "--ctx", "32", "--max-windows", "3", "--json")
    dense, kernels = (json.loads(lutq(*args, *extra).stdout) for extra in (("--dense",), ()))
    assert dense["dense"] and not kernels["dense"]
    model = copy.deepcopy(torch_model)
    with open_checkpoint(tmp_path / "nf3") as ckpt, torch.no_grad():
        for name, param in model.named_parameters():
            if ckpt.has(name):
                param.copy_(torch.from_numpy(np.asarray(ckpt.load(name), np.float32)))
    ids = Tokenizer(path).encode(text_file.read_text())
    assert dense["perplexity"] == pytest.approx(reference_perplexity(model, ids, 32, 3), rel=1e-4)
    assert kernels["perplexity"] != dense["perplexity"]


def test_eval_command_errors(tiny_models, text_file, tmp_path):
    path = tiny_models("llama")[0]
    assert_clean_error(lutq("eval", path, "--text", tmp_path / "none.txt"), "none.txt")
    assert_clean_error(lutq("eval", path, "--text", text_file, "--ctx", "100000"), "context window")
    assert_clean_error(lutq("eval", path, "--text", text_file, "--ctx", "1"), "--ctx")
    short = tmp_path / "short.txt"
    short.write_text("hi")
    assert_clean_error(lutq("eval", path, "--text", short, "--ctx", "64"), "fewer than one window")
    assert_clean_error(lutq("eval", path, "--text", text_file, "--max-windows", "0"), "--max-windows")
    assert_clean_error(lutq("eval", path, "--text", text_file, "--kv-cache", "f8"), "--kv-cache", "f16")
