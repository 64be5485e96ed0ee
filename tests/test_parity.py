"""The fp32 runtime against transformers (torch, fp32): logits and greedy continuations."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_VARIANTS
from lutq.checkpoint import open_checkpoint
from lutq.runtime.model import load_model

torch = pytest.importorskip("torch")


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def greedy(net, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids: one prefill, then single-token decode steps (EOS ignored)."""
    net.reset()
    logits, out = net.forward(np.asarray(ids)), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = net.forward(np.asarray(out[-1:]))
    return out


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        res = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return res[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_logits_match_transformers(tiny_models, variant):
    path, model = tiny_models(variant)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 90)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].double().numpy()
    net = load_model(open_checkpoint(path), 128)
    assert rel_err(net.forward(ids, all_logits=True), ref) <= 1e-3
    # The same logits when the prompt arrives in pieces: a prefill, then single-token decode through the KV cache.
    net.reset()
    parts = [net.forward(ids[:50], all_logits=True)] + [net.forward(ids[i : i + 1])[None] for i in range(50, 90)]
    assert rel_err(np.concatenate(parts), ref) <= 1e-3


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_greedy_matches_transformers(tiny_models, variant):
    path, model = tiny_models(variant)
    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, 12).tolist()
    net = load_model(open_checkpoint(path), 64)
    assert greedy(net, ids, 32) == hf_greedy(model, ids, 32)


def test_tied_model_has_no_lm_head_and_shares_embedding(tiny_models):
    path, _ = tiny_models("llama-tied")
    ckpt = open_checkpoint(path)
    assert not ckpt.has("lm_head.weight")
    net = load_model(ckpt, 16)
    assert np.shares_memory(net.lm_head.weight, net.embed)


def test_qwen2_biases_are_loaded(tiny_models):
    path, model = tiny_models("qwen2-bias")
    net = load_model(open_checkpoint(path), 16)
    bias = net.layers[0].qkv_proj.bias
    ref = model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    assert bias is not None and np.array_equal(bias[: ref.size], ref)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    """SmolLM2-135M from its Q4_1 GGUF: transformers dequantizes the same file to fp32, so both run identical weights."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    ids = [504, 3575, 282, 4649, 314] + np.random.default_rng(3).integers(0, 49152, 59).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    net = load_model(open_checkpoint(smollm2_gguf), 128)
    assert rel_err(net.forward(np.asarray(ids), all_logits=True), ref) <= 1e-3
    prompt = ids[:5]
    assert greedy(net, prompt, 32) == hf_greedy(model, prompt, 32)


BITNET_VARIANTS = {"autobitlinear-packed": ("autobitlinear", True), "autobitlinear-bf16": ("autobitlinear", False),
                   "bitlinear-packed": ("bitlinear", True)}


@pytest.fixture(scope="module", params=list(BITNET_VARIANTS))
def bitnet(request, tmp_path_factory):
    from tiny import make_bitnet_model

    path = tmp_path_factory.mktemp(request.param)
    return path, make_bitnet_model(path, *BITNET_VARIANTS[request.param])


def test_bitnet_matches_transformers(bitnet):
    """transformers' BitNet (8-bit activations, sub-norms, relu^2, weight_scale) on a tiny random ternary checkpoint."""
    path, model = bitnet
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, 70)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].double().numpy()
    net = load_model(open_checkpoint(path), 128)
    assert rel_err(net.forward(ids, all_logits=True), ref) <= 1e-3
    prompt = ids[:10].tolist()
    assert greedy(net, prompt, 32) == hf_greedy(model, prompt, 32)


def test_bitnet_weights_are_exactly_ternary_times_scale(bitnet):
    path, model = bitnet
    ckpt = open_checkpoint(path)
    w = ckpt.load("model.layers.0.mlp.down_proj.weight")
    info = {t.name: t for t in ckpt.tensors()}["model.layers.0.mlp.down_proj.weight"]
    assert info.shape == (64, 160)
    scale = np.abs(w).max()
    assert set(np.unique(w / scale)) <= {-1.0, 0.0, 1.0}
