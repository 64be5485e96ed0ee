"""Tiny random checkpoints built by the tests themselves (nothing is downloaded): HF models via transformers, a
small byte-level BPE tokenizer trained on the spot."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris. "
    "A small model runs on a small computer. Numbers: 0 1 2 3 4 5 6 7 8 9. "
) * 4


def make_tokenizer(path: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer.json + tokenizer_config.json with a ChatML template; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": template}))
    return tok.get_vocab_size()


def make_hf_model(path: Path, arch: str = "llama", tie: bool = False, rope_scaling: dict | None = None,
                  dtype: str = "float32", seed: int = 0, vocab_size: int | None = None, **overrides):
    """Save a tiny random model (GQA: 4 heads, 2 kv heads) with a tokenizer to `path`; returns the torch model."""
    import torch
    import transformers

    path = Path(path)
    vocab = make_tokenizer(path) if vocab_size is None else vocab_size
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if rope_scaling:
            rope = {**rope_scaling, "rope_theta": 500000.0}
        config = transformers.LlamaConfig(**common, rope_parameters=rope)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # a visible spread of weights, so errors cannot hide under tiny activations
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    return model.float()


def make_bitnet_model(path: Path, linear_class: str = "autobitlinear", packed: bool = True, seed: int = 0):
    """A tiny random BitNet b1.58 checkpoint as transformers stores one (ternary weights, u8-packed when `packed`,
    a bf16 weight_scale per linear layer), loaded back with transformers' BitNet; returns the fp32 torch model."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from lutq.checkpoint.bitnet_packing import pack_ternary

    path = Path(path)
    vocab = make_tokenizer(path)
    config = transformers.BitNetConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    shapes = {n: tuple(t.shape) for n, t in transformers.BitNetForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("proj.weight"):
            ternary = torch.randint(-1, 2, shape, generator=gen)
            tensors[name] = torch.from_numpy(pack_ternary(ternary.numpy())) if packed else ternary.to(torch.bfloat16)
            scale = 0.02 + 0.05 * torch.rand(1, generator=gen)
            tensors[name + "_scale"] = (1 / scale if linear_class == "bitlinear" else scale).to(torch.bfloat16)
        elif "norm" in name:
            tensors[name] = (0.5 + torch.rand(shape, generator=gen)).to(torch.bfloat16)
        elif name != "lm_head.weight":  # tied
            tensors[name] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = config.to_dict()
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"}
    (path / "config.json").write_text(json.dumps(d))
    model = transformers.BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return torch.nn.Module.float(model)  # transformers refuses .float() on quantized models; the layers run fine in fp32


def make_numpy_model(path: Path, hidden: int = 64, intermediate: int = 160, layers: int = 2, seed: int = 0,
                     tokenizer_from: Path | None = None) -> Path:
    """A random Llama checkpoint written with numpy alone (no torch): quick to build at any size, for tests that
    need a model larger than the tiny one (slow enough to interrupt, large enough to measure memory).
    The tokenizer files are copied from `tokenizer_from` when given (training one takes a moment)."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(Path(tokenizer_from) / name, path / name)
        vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        vocab_size = len(vocab) + 3  # the special tokens
    else:
        vocab_size = make_tokenizer(path)
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.08).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden), "lm_head.weight": normal(vocab_size, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
                    p + "self_attn.q_proj.weight": normal(hidden, hidden),
                    p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": normal(hidden, hidden),
                    p + "mlp.gate_proj.weight": normal(intermediate, hidden),
                    p + "mlp.up_proj.weight": normal(intermediate, hidden),
                    p + "mlp.down_proj.weight": normal(hidden, intermediate)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
