"""The Llama-family forward pass (Llama 1-3, SmolLM, Mistral without sliding window, Qwen2-style biases), in numpy fp32.

Read it like llama2.c's `forward`: one function, top to bottom, shapes beside each step. A prompt is processed in one
batched pass (prefill, T tokens at once); generation then runs the same code with T = 1 (decode). Keys and values live
in a cache allocated once for `max_seq` positions (lutq/runtime/attention.py).

Shapes: T tokens this call, D = hidden_size, H heads, KV key/value heads, hd = head_dim, F = intermediate_size,
V = vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lutq.checkpoint.base import Checkpoint
from lutq.config import ModelConfig
from lutq.errors import CheckpointError
from lutq.kernels.lut import current_threads
from lutq.runtime.attention import KVCache
from lutq.runtime.decode_step import DecodeStep
from lutq.runtime.linear import DenseLinear, Linear
from lutq.runtime.ops import add_rms_norm_into, rms_norm_into, silu_mul_into


@dataclass
class LlamaLayer:
    input_norm: np.ndarray  # f32[D]
    qkv_proj: Linear  # D -> (H + 2 KV) * hd, q, k and v together: one pass over x (stacked, or shared tables)
    o_proj: Linear  # H * hd -> D
    post_attention_norm: np.ndarray  # f32[D]
    gate_up_proj: Linear  # D -> 2F, gate and up together
    down_proj: Linear  # F -> D


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: f32[T, D] -> x / sqrt(mean(x^2) + eps) * weight."""
    out = np.empty_like(x)
    rms_norm_into(x, weight, eps, out)
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """gate_up: f32[T, 2F] = [gate | up] -> silu(gate) * up: f32[T, F]."""
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    silu_mul_into(gate_up, out)
    return out


class LlamaModel:
    def __init__(self, config: ModelConfig, embed, layers: list[LlamaLayer], norm: np.ndarray,
                 lm_head: DenseLinear, max_seq: int, kv_cache: str = "f32"):
        self.config = config
        self.embed = embed  # [V, D] rows: embed[ids] -> f32[T, D] (stored fp16/fp32/int8, Checkpoint.rows)
        self.layers = layers
        self.norm = norm  # f32[D]
        self.lm_head = lm_head  # D -> V (the embedding itself, in fp32, when tied)
        self.cache = KVCache(config, max_seq, kv_cache)  # f32 or f16
        self.steps: dict[int, DecodeStep] = {}  # recorded decode steps by thread count, made at first use
        self.step = None  # the one in use

    @property
    def max_seq(self) -> int:
        return self.cache.max_seq

    @property
    def pos(self) -> int:
        return self.cache.pos

    @pos.setter
    def pos(self, value: int) -> None:
        self.cache.pos = value

    def reset(self) -> None:
        self.cache.pos = 0

    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run tokens: i64[T] at the next T positions, appending their keys/values to the cache.

        Returns f32[T, V] logits when all_logits (perplexity, parity tests), else f32[V] for the last token only.
        A single token (decode) runs this same math as a recorded step (decode_step.py).
        """
        if len(tokens) == 1 and not all_logits:
            return self.decode(int(tokens[0]))
        eps, T = self.config.rms_norm_eps, len(tokens)
        self.cache.check_room(T)
        mask = self.cache.causal_mask(T)  # f32[T, S] or None
        x = self.embed[tokens].astype(np.float32)  # f32[T, D]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, eps)  # f32[T, D]
            att = self.cache.attend(i, layer.qkv_proj(h), mask)  # f32[T, H*hd]
            x = x + layer.o_proj(att)  # f32[T, D]
            h = rms_norm(x, layer.post_attention_norm, eps)
            x = x + layer.down_proj(silu_mul(layer.gate_up_proj(h)))  # f32[T, D]
        self.cache.pos += T
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(rms_norm(x, self.norm, eps))  # f32[T or 1, V]
        return logits if all_logits else logits[0]

    def record_decode(self, step: DecodeStep) -> None:
        """forward() for one token as the recorded step's calls, on its buffers (decode_step.py)."""
        x, h, delta, eps = step.x, step.h, step.delta, step.eps
        for i, layer in enumerate(self.layers):
            if i == 0:
                step.call(rms_norm_into, x, layer.input_norm, eps, h)
            else:  # x += the layer before's down_proj output, then the norm
                step.call(add_rms_norm_into, x, delta, layer.input_norm, eps, h)
            step.linear(layer.qkv_proj, h, step.qkv)
            step.attention(i)  # qkv -> att
            step.linear(layer.o_proj, step.att, delta)
            step.call(add_rms_norm_into, x, delta, layer.post_attention_norm, eps, h)
            step.linear(layer.gate_up_proj, h, step.gate_up)
            step.call(silu_mul_into, step.gate_up, step.act)
            step.linear(layer.down_proj, step.act, delta)
        step.call(add_rms_norm_into, x, delta, self.norm, eps, h)
        step.linear(self.lm_head, h, step.logits)

    def decode(self, token: int) -> np.ndarray:
        """forward([token]) -> f32[V] on preallocated buffers: decode_step.py."""
        threads = current_threads()
        if self.step is None or self.step.threads != threads:  # kernels bind a serial or a parallel entry point
            if threads not in self.steps:
                self.steps[threads] = DecodeStep(self)
            self.step = self.steps[threads]
        return self.step(token)


class TensorSource:
    """Reads a checkpoint's tensors, checking each against the shape the config implies, and makes its linear layers:
    fp32 (DenseLinear) from ordinary checkpoints, LUT-kernel layers from the packed weights of a lutq directory."""

    def __init__(self, ckpt: Checkpoint, kernels: bool = True):
        self.ckpt = ckpt
        self.shapes = {t.name: t.shape for t in ckpt.tensors()}
        # kernels=False runs packed weights dequantized to fp32: the reference the LUT path is tested against.
        self.quantized = kernels and getattr(ckpt, "is_packed", None) is not None
        if self.quantized:
            from lutq.runtime.quant_linear import TablePool

            self.pool = TablePool()  # one set of table buffers for the whole model

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """That tensor `name` exists with the shape the config implies."""
        if name not in self.shapes:
            raise CheckpointError(self.ckpt.path, f"tensor {name!r} is missing")
        if tuple(self.shapes[name]) != shape:
            raise CheckpointError(self.ckpt.path, f"tensor {name!r} has shape {list(self.shapes[name])}, "
                                                  f"the config implies {list(shape)}")

    def get(self, name: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray | None:
        if optional and name not in self.shapes:
            return None
        self.check(name, shape)
        return self.ckpt.load(name)

    def linear(self, name: str, rows: int, cols: int):
        """The layer `name` (without .weight): y = x @ W.T + b, W [rows, cols]."""
        bias = self.get(name + ".bias", (rows,), optional=True)
        if self.quantized and self.ckpt.is_packed(name + ".weight"):
            from lutq.runtime.quant_linear import make_linear

            self.check(name + ".weight", (rows, cols))
            return make_linear(self.ckpt.packed(name + ".weight"), bias, self.pool)
        return DenseLinear(self.get(name + ".weight", (rows, cols)), bias)

    def fused(self, layers: list[tuple[str, int, int]]):
        """Several layers reading the same input as one: a stacked matrix (fp32) or shared activation tables."""
        parts = [self.linear(*spec) for spec in layers]
        if all(isinstance(p, DenseLinear) for p in parts):
            return DenseLinear.fuse([(p.weight, p.bias) for p in parts])
        from lutq.runtime.quant_linear import FusedLinear

        fused = FusedLinear(parts)
        return fused.parts[0] if len(fused.parts) == 1 else fused  # all stacked into one kernel call

    def embedding_and_head(self):
        """(embedding, lm_head). The embedding is rows to gather (`[ids]` -> f32[T, D]) kept in its stored type
        (Checkpoint.rows); a tied head is the embedding as one fp32 matrix for BLAS, which both then share."""
        cfg = self.ckpt.config
        name, shape = "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
        if "lm_head.weight" in self.shapes:
            self.check(name, shape)
            return self.ckpt.rows(name), self.linear("lm_head", cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            embed = self.get(name, shape)
            return embed, DenseLinear(embed)  # shares the embedding's memory
        raise CheckpointError(self.ckpt.path, "tensor 'lm_head.weight' is missing and tie_word_embeddings is false")


def context_length(cfg: ModelConfig, max_seq: int | None) -> int:
    return min(max_seq or cfg.max_position_embeddings, cfg.max_position_embeddings)


def llama_layer_parts(src: TensorSource, i: int) -> dict:
    """The tensors every Llama-shaped block has (BitNet adds its sub-norms), keyed by LlamaLayer's field names."""
    cfg, p = src.ckpt.config, f"model.layers.{i}."
    D, H, KV, hd, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.intermediate_size)
    return dict(
        input_norm=src.get(p + "input_layernorm.weight", (D,)),
        qkv_proj=src.fused([(p + "self_attn.q_proj", H * hd, D), (p + "self_attn.k_proj", KV * hd, D),
                            (p + "self_attn.v_proj", KV * hd, D)]),
        o_proj=src.linear(p + "self_attn.o_proj", D, H * hd),
        post_attention_norm=src.get(p + "post_attention_layernorm.weight", (D,)),
        gate_up_proj=src.fused([(p + "mlp.gate_proj", F, D), (p + "mlp.up_proj", F, D)]),
        down_proj=src.linear(p + "mlp.down_proj", D, F),
    )


def load_llama(ckpt: Checkpoint, max_seq: int | None = None, kernels: bool = True, kv_cache: str = "f32") -> LlamaModel:
    """Build the model from a checkpoint, reading one tensor at a time."""
    cfg, src = ckpt.config, TensorSource(ckpt, kernels)
    embed, lm_head = src.embedding_and_head()
    layers = [LlamaLayer(**llama_layer_parts(src, i)) for i in range(cfg.num_hidden_layers)]
    norm = src.get("model.norm.weight", (cfg.hidden_size,))
    return LlamaModel(cfg, embed, layers, norm, lm_head, context_length(cfg, max_seq), kv_cache)
