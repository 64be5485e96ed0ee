"""Random-weight models of real architectures (`--shape tinyllama-1.1b`), for measuring speed without downloads.

Decode speed depends on the shapes and formats, not on the weight values, so a model of the right shape with random
weights measures what the real one would. Tensors are generated on demand, each from a seed derived from its name
(the same name gives the same tensor in every run); nothing is written to disk. The tokenizer is byte-level BPE
with no merges, padded to the architecture's vocabulary with placeholder tokens: enough for `lutq generate` to run.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from lutq.checkpoint.base import Checkpoint, TensorInfo
from lutq.checkpoint.cache import cache_root, cached_dir
from lutq.config import ModelConfig
from lutq.errors import CheckpointError

SHAPES: dict[str, dict] = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5,
                           rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-3.2-1B
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # microsoft/bitnet-b1.58-2B-4T: ternary linear layers (weight_scale folded in), 8-bit activations
    "bitnet-2b": dict(model_type="bitnet", vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                      num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5, head_dim=128,
                      hidden_act="relu2", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of every tensor of the architecture."""
    D, H, KV, hd, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (H * hd, D),
                   p + "self_attn.k_proj.weight": (KV * hd, D), p + "self_attn.v_proj.weight": (KV * hd, D),
                   p + "self_attn.o_proj.weight": (D, H * hd), p + "post_attention_layernorm.weight": (D,),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)}
        if cfg.model_type == "bitnet":
            shapes |= {p + "self_attn.attn_sub_norm.weight": (D,), p + "mlp.ffn_sub_norm.weight": (F,)}
    shapes["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


class SyntheticCheckpoint(Checkpoint):
    format_name = "random weights"

    def __init__(self, shape: str):
        if shape not in SHAPES:
            raise CheckpointError(f"random:{shape}", f"unknown shape (known: {', '.join(SHAPES)})")
        self.shape = shape
        self.path = Path(f"random:{shape}")
        self.config = ModelConfig.from_hf_dict(dict(SHAPES[shape]), source=f"random:{shape}")
        self._shapes = tensor_shapes(self.config)
        self._tokenizer: Path | None = None

    def tensors(self) -> list[TensorInfo]:
        # Sized as the real checkpoint stores them: bf16.
        return [TensorInfo(n, s, "BF16", 2 * int(np.prod(s))) for n, s in self._shapes.items()]

    def load(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise CheckpointError(self.path, f"tensor {name!r} is missing")
        shape = self._shapes[name]
        rng = np.random.default_rng(zlib.crc32(f"{self.shape}/{name}".encode()))
        # Drawing a billion normals takes a minute; a block of 2^20 (an odd count of rows apart, so rows differ)
        # repeated over the tensor has the same statistics for every purpose here.
        n = min(int(np.prod(shape)), (1 << 20) + 7)
        if name.endswith("norm.weight"):
            block = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
        elif self.config.model_type == "bitnet" and name.endswith("proj.weight"):
            block = rng.integers(-1, 2, n).astype(np.float32) * np.float32(0.02)  # ternary x a per-tensor scale
        else:
            block = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        return np.resize(block, shape)

    def tokenizer_dir(self) -> Path:
        if self._tokenizer is None:  # written once per vocabulary size, kept in the cache (not a temp dir per run)
            vocab = self.config.vocab_size
            self._tokenizer = cached_dir(cache_root("random-tokenizers") / f"bytes-{vocab}",
                                         lambda out: write_byte_tokenizer(out, vocab))
        return self._tokenizer


def write_byte_tokenizer(path: Path, vocab_size: int) -> None:
    """Byte-level BPE without merges: token ids 0-255 spell the bytes, the rest are `<|placeholder_i|>`; eos = id 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([f"<|placeholder_{i}|>" for i in range(len(vocab), vocab_size)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": alphabet[2]}))
