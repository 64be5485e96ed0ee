"""The emulated aarch64 run's end-to-end case (scripts/test-arm64): a tiny random Llama with every LUT kernel in it,
quantized and decoded greedily on the host; tests/test_neon.py decodes it again under qemu and compares.

    python tests/arm64_fixture.py DIR      writes DIR/hf (the model), DIR/q (lutq dir), DIR/expected.npz

Only numpy, safetensors and tokenizers build it: the emulated root has no torch. The kernels' sums are integer and
their float steps fused multiply-adds in the same order on every ISA, so a layer's output on the same input is the
same to the bit on x86 and NEON. Through the model it is not: numpy/OpenBLAS round the other steps (norms,
attention, softmax) differently per architecture by ~1e-7, enough to move an int8 table entry by one step now and
then, so the logits agree to about 1% and the greedy tokens exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

# Every kernel the runtime has, one per linear layer: bitserial int2/int3/int4/int4k/ternary, nf2 on pair
# codes (the codebook kernel), nf3 on the codebook3 layout, nf4 on the codebook layout, fineq clusters.
RULES = ("int2,*.0.self_attn.k_proj=int3,*.0.self_attn.v_proj=int4,*.0.self_attn.o_proj=nf2,*.0.mlp.gate_proj=nf3,"
         "*.0.mlp.up_proj=nf4,*.0.mlp.down_proj=fineq,*.1.self_attn.q_proj=ternary,*.1.self_attn.k_proj=int4k,"
         "*.1.self_attn.v_proj=ternary-group,*.1.self_attn.o_proj=int3,*.1.mlp.gate_proj=fineq,*.1.mlp.down_proj=nf4,"
         "lm_head=int4")
GROUP = 32
PROMPT = "The quick brown fox"
NEW_TOKENS = 8


def make_llama(path: Path, seed: int = 0) -> None:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, FFN 160) with random fp32 weights and a trained BPE tokenizer."""
    from safetensors.numpy import save_file

    from lutq.checkpoint.synthetic import tensor_shapes
    from lutq.config import ModelConfig
    from tiny import make_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=make_tokenizer(path),
                  hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(ModelConfig.from_hf_dict(dict(config), source=str(path))).items():
        if "norm" in name:
            tensors[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # a visible spread of weights, as tests/tiny.py does, so errors cannot hide under tiny activations
            tensors[name] = rng.normal(0, 0.08 if len(shape) == 2 and "embed" not in name else 1.0, shape)
            tensors[name] = tensors[name].astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=1))


def greedy(model_dir: Path, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, logits f32[new_tokens, V]) of greedy decoding on the LUT kernels: one prefill (GEMM), then GEMVs."""
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.model import load_model

    net = load_model(open_checkpoint(model_dir), len(prompt_ids) + new_tokens)
    logits = np.asarray(net.forward(np.asarray(prompt_ids)), np.float32)
    tokens, steps = [], []
    for _ in range(new_tokens):
        steps.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = np.asarray(net.forward(np.asarray(tokens[-1:])), np.float32)
    return np.asarray(tokens), np.stack(steps)


def layer_outputs(model_dir: Path) -> dict[str, np.ndarray]:
    """Each packed linear layer on fixed activations, prefill (N = 3, GEMM) and decode (N = 1, GEMV), by
    "layer:NAME:N" -> f32[N, M]. The same tables go into the same integer sums and fused multiply-adds on every ISA:
    the NEON results must equal the host's bit for bit."""
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.quant_linear import TablePool, make_linear

    ckpt = open_checkpoint(model_dir)
    rng = np.random.default_rng(1)
    found = {}
    for t in ckpt.tensors():
        if ckpt.is_packed(t.name):
            layer = make_linear(ckpt.packed(t.name), None, TablePool())
            for n in (3, 1):
                x = rng.standard_normal((n, layer.in_features)).astype(np.float32)
                found[f"layer:{t.name}:{n}"] = np.asarray(layer(x), np.float32).copy()
    return found


def prepare(out: Path) -> None:
    from lutq.checkpoint import open_checkpoint
    from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
    from lutq.quantize.rules import parse_rules
    from lutq.runtime.tokenizer import Tokenizer

    make_llama(out / "hf")
    with open_checkpoint(out / "hf") as ckpt:
        quantize_checkpoint(ckpt, out / "q", QuantizeOptions(parse_rules(RULES), GROUP))
    prompt_ids = Tokenizer(out / "q").encode(PROMPT)
    tokens, logits = greedy(out / "q", prompt_ids)
    np.savez(out / "expected.npz", prompt_ids=np.asarray(prompt_ids), tokens=tokens, logits=logits,
             **layer_outputs(out / "q"))


if __name__ == "__main__":
    prepare(Path(sys.argv[1]))
