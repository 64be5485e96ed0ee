"""The model configuration: one dataclass with HuggingFace field names, read from and written to config.json.

Both spellings of RoPE settings are accepted: transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5
(`rope_parameters`); internally lutq keeps the transformers 4 names, the ones most checkpoints in the wild carry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lutq.errors import CheckpointError

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                           "bitnet": "BitNetForCausalLM"}
# The MLP activation each architecture is written for (relu2: squared ReLU, BitNet b1.58's).
ACTIVATIONS = {"llama": ("silu", "swish"), "qwen2": ("silu", "swish"), "mistral": ("silu", "swish"), "bitnet": ("relu2",)}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases (Qwen2 has q/k/v biases regardless of this flag)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)  # every other field of config.json, kept for the round trip

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def quantization_config(self) -> dict:
        q = self.extra.get("quantization_config")
        return q if isinstance(q, dict) else {}

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Validate an HF config dict; every problem becomes a CheckpointError naming `source`."""
        if not isinstance(d, dict):
            raise CheckpointError(source, "config is not a JSON object")
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHITECTURES:
            archs = d.get("architectures")
            raise CheckpointError(
                source,
                f"unsupported architecture {model_type or archs!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            )
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        rope_theta = d.pop("rope_theta", None)
        rope_scaling = d.pop("rope_scaling", None)
        if isinstance(rope, dict):
            rope_theta = rope.get("rope_theta", rope_theta)
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if isinstance(rope_scaling, dict):
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if not isinstance(rtype, str) or rtype not in SUPPORTED_ROPE_TYPES:
                raise CheckpointError(source, f"unsupported rope scaling {rtype!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            if rtype == "default":
                rope_scaling = None
        elif rope_scaling is not None:
            raise CheckpointError(source, "rope_scaling must be an object or null")

        def need_int(name, default=None):
            v = d.pop(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise CheckpointError(source, f"field {name!r} must be a positive integer, got {v!r}")
            return v

        hidden = need_int("hidden_size")
        heads = need_int("num_attention_heads")
        kv_heads = need_int("num_key_value_heads", heads)
        head_dim = d.pop("head_dim", None) or hidden // heads
        if heads % kv_heads:
            raise CheckpointError(source, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise CheckpointError(source, f"head_dim {head_dim!r} must be a positive even integer")
        hidden_act = d.pop("hidden_act", ACTIVATIONS[model_type][0])
        if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS[model_type]:
            raise CheckpointError(source, f"unsupported hidden_act {hidden_act!r} for {model_type} "
                                          f"(supported: {', '.join(ACTIVATIONS[model_type])})")
        eps = d.pop("rms_norm_eps", 1e-6)
        theta = rope_theta if rope_theta is not None else 10000.0
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in (eps, theta)):
            raise CheckpointError(source, "rms_norm_eps and rope_theta must be positive numbers")
        for name in ("bos_token_id", "eos_token_id"):
            v = d.get(name)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise CheckpointError(source, f"field {name!r} must be a token id, a list of them or null, got {v!r}")
        cfg = cls(
            model_type=d.pop("model_type"),
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=need_int("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.pop("tie_word_embeddings", False)),
            attention_bias=bool(d.pop("attention_bias", False)),
            mlp_bias=bool(d.pop("mlp_bias", False)),
            hidden_act="silu" if hidden_act == "swish" else hidden_act,
            bos_token_id=d.pop("bos_token_id", None),
            eos_token_id=d.pop("eos_token_id", None),
        )
        cfg.extra = d
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.setdefault("architectures", [SUPPORTED_ARCHITECTURES[self.model_type]])
        return out
