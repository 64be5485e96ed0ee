"""The Llama-family forward pass (Llama 1-3, SmolLM, Mistral without sliding window, Qwen2-style biases), in numpy fp32.

Read it like llama2.c's `forward`: one function, top to bottom, shapes beside each step. A prompt is processed in one
batched pass (prefill, T tokens at once); generation then runs the same code with T = 1 (decode). Keys and values live
in a cache allocated once for `max_seq` positions.

Shapes: T tokens this call, P = start position, S = P + T positions attended to, D = hidden_size, H heads, KV key/value
heads, G = H / KV queries per key/value head (grouped-query attention), hd = head_dim, F = intermediate_size, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lutq.checkpoint.base import Checkpoint
from lutq.config import ModelConfig
from lutq.errors import CheckpointError, LutqError
from lutq.runtime.linear import DenseLinear
from lutq.runtime.rope import apply_rope, rope_tables


@dataclass
class LlamaLayer:
    input_norm: np.ndarray  # f32[D]
    qkv_proj: DenseLinear  # D -> (H + 2 KV) * hd, q, k and v stacked: one matmul reads x once
    o_proj: DenseLinear  # H * hd -> D
    post_attention_norm: np.ndarray  # f32[D]
    gate_up_proj: DenseLinear  # D -> 2F, gate and up stacked
    down_proj: DenseLinear  # F -> D


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: f32[T, D] -> x / sqrt(mean(x^2) + eps) * weight."""
    ms = np.einsum("td,td->t", x, x)[:, None] / x.shape[1]
    return x * (1.0 / np.sqrt(ms + eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class LlamaModel:
    def __init__(self, config: ModelConfig, embed: np.ndarray, layers: list[LlamaLayer], norm: np.ndarray,
                 lm_head: DenseLinear, max_seq: int):
        cfg = self.config = config
        self.embed = embed  # f32[V, D]
        self.layers = layers
        self.norm = norm  # f32[D]
        self.lm_head = lm_head  # D -> V (the embedding itself when tied)
        self.max_seq = max_seq
        n_layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # The KV cache, allocated once: [layer, kv head, position, hd], so one head's keys are contiguous for q @ K^T.
        self.k_cache = np.zeros((n_layers, kv, max_seq, hd), np.float32)
        self.v_cache = np.zeros((n_layers, kv, max_seq, hd), np.float32)
        self.cos, self.sin = rope_tables(cfg, max_seq)  # f32[max_seq, hd/2]
        self.pos = 0  # positions filled in the cache

    def reset(self) -> None:
        self.pos = 0

    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run tokens: i64[T] at positions pos..pos+T-1, append their keys/values to the cache.

        Returns f32[T, V] logits when all_logits (perplexity, parity tests), else f32[V] for the last token only.
        """
        cfg = self.config
        T, P = len(tokens), self.pos
        S = P + T
        if S > self.max_seq:
            raise LutqError(f"context full: {S} tokens exceed the context window of {self.max_seq}")
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G, eps = H // KV, cfg.rms_norm_eps
        cos, sin = self.cos[P:S], self.sin[P:S]  # f32[T, hd/2]
        # Causal mask for the new queries: query t (position P+t) sees keys 0..P+t.
        mask = None
        if T > 1:
            mask = np.triu(np.full((T, S), -np.inf, np.float32), k=P + 1)  # f32[T, S]

        x = self.embed[tokens].astype(np.float32)  # f32[T, D]
        for li, layer in enumerate(self.layers):
            # --- attention: h = x + o_proj(attn(rope(q), rope(k), v)) ---
            h = rms_norm(x, layer.input_norm, eps)  # f32[T, D]
            qkv = layer.qkv_proj(h)  # f32[T, (H + 2KV) * hd]
            q = qkv[:, : H * hd].reshape(T, H, hd)
            k = qkv[:, H * hd : (H + KV) * hd].reshape(T, KV, hd)
            v = qkv[:, (H + KV) * hd :].reshape(T, KV, hd)
            q = np.ascontiguousarray(q)
            k = np.ascontiguousarray(k)
            apply_rope(q, cos, sin)
            apply_rope(k, cos, sin)
            self.k_cache[li, :, P:S] = k.transpose(1, 0, 2)  # [KV, T, hd]
            self.v_cache[li, :, P:S] = v.transpose(1, 0, 2)
            keys, values = self.k_cache[li, :, :S], self.v_cache[li, :, :S]  # f32[KV, S, hd]
            # Group the G query heads that share a key/value head: [KV, G*T, hd], rows ordered (g, t).
            qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)
            scores = qg @ keys.transpose(0, 2, 1)  # f32[KV, G*T, S]
            scores *= 1.0 / np.sqrt(hd)
            if mask is not None:
                scores = scores.reshape(KV, G, T, S)
                scores += mask
                scores = scores.reshape(KV, G * T, S)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            att = scores @ values  # f32[KV, G*T, hd]
            att = att.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)  # heads back in order
            x = x + layer.o_proj(att)  # f32[T, D]
            # --- MLP: x = x + down(silu(gate(h)) * up(h)) ---
            h = rms_norm(x, layer.post_attention_norm, eps)
            gate_up = layer.gate_up_proj(h)  # f32[T, 2F]
            F = gate_up.shape[1] // 2
            x = x + layer.down_proj(silu(gate_up[:, :F]) * gate_up[:, F:])  # f32[T, D]

        self.pos = S
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(rms_norm(x, self.norm, eps))  # f32[T or 1, V]
        return logits if all_logits else logits[0]


def load_llama(ckpt: Checkpoint, max_seq: int | None = None) -> LlamaModel:
    """Build the fp32 model from a checkpoint, reading one tensor at a time."""
    cfg = ckpt.config
    shapes = {t.name: t.shape for t in ckpt.tensors()}
    D, H, KV, hd, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)

    def get(name: str, shape: tuple[int, ...], optional: bool = False) -> np.ndarray | None:
        if name not in shapes:
            if optional:
                return None
            raise CheckpointError(ckpt.path, f"tensor {name!r} is missing")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(ckpt.path, f"tensor {name!r} has shape {list(shapes[name])}, the config implies {list(shape)}")
        return ckpt.load(name)

    embed = get("model.embed_tokens.weight", (V, D))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = [(get(p + f"self_attn.{n}_proj.weight", (rows, D)), get(p + f"self_attn.{n}_proj.bias", (rows,), True))
                for n, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd))]
        mlp = [(get(p + f"mlp.{n}_proj.weight", (F, D)), get(p + f"mlp.{n}_proj.bias", (F,), True)) for n in ("gate", "up")]
        layers.append(LlamaLayer(
            input_norm=get(p + "input_layernorm.weight", (D,)),
            qkv_proj=DenseLinear.fuse(attn),
            o_proj=DenseLinear(get(p + "self_attn.o_proj.weight", (D, H * hd)), get(p + "self_attn.o_proj.bias", (D,), True)),
            post_attention_norm=get(p + "post_attention_layernorm.weight", (D,)),
            gate_up_proj=DenseLinear.fuse(mlp),
            down_proj=DenseLinear(get(p + "mlp.down_proj.weight", (D, F)), get(p + "mlp.down_proj.bias", (D,), True)),
        ))
    norm = get("model.norm.weight", (D,))
    if "lm_head.weight" in shapes:
        lm_head = DenseLinear(get("lm_head.weight", (V, D)))
    elif cfg.tie_word_embeddings:
        lm_head = DenseLinear(embed)  # shares the embedding's memory
    else:
        raise CheckpointError(ckpt.path, "tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
    max_seq = min(max_seq or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return LlamaModel(cfg, embed, layers, norm, lm_head, max_seq)
