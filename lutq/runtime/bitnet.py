"""The BitNet b1.58 forward pass (transformers' BitNetForCausalLM), in numpy fp32.

Llama's shape with three differences, each marked below: every linear layer of a block sees its input quantized to
8 bits per token (absmax), the attention output is normalised (attn_sub_norm) before o_proj, and the MLP is
down(ffn_sub_norm(relu(gate)^2 * up)). The ternary weights arrive with their weight_scale already folded in
(lutq/checkpoint/bitnet_packing.py); lm_head is an ordinary linear layer.

Shapes: T tokens this call, D = hidden_size, H heads, hd = head_dim, F = intermediate_size, V = vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lutq.checkpoint.base import Checkpoint
from lutq.runtime.attention import KVCache
from lutq.runtime.linear import Linear
from lutq.runtime.llama import LlamaModel, TensorSource, context_length, llama_layer_parts, rms_norm


@dataclass
class BitNetLayer:
    input_norm: np.ndarray  # f32[D]
    qkv_proj: Linear  # D -> (H + 2 KV) * hd
    attn_sub_norm: np.ndarray  # f32[D]
    o_proj: Linear  # H * hd -> D
    post_attention_norm: np.ndarray  # f32[D]
    gate_up_proj: Linear  # D -> 2F
    ffn_sub_norm: np.ndarray  # f32[F]
    down_proj: Linear  # F -> D


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """Per-token symmetric int8 fake quantization: x -> round(x * s).clip(-128, 127) / s, s = 127 / max|x|."""
    scale = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * scale), -128, 127) / scale


class BitNetModel(LlamaModel):
    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Like LlamaModel.forward: i64[T] -> f32[T, V] (all_logits) or f32[V]."""
        eps, T = self.config.rms_norm_eps, len(tokens)
        self.cache.check_room(T)
        mask = self.cache.causal_mask(T)
        x = self.embed[tokens].astype(np.float32)  # f32[T, D]
        for i, layer in enumerate(self.layers):
            h = quantize_activations(rms_norm(x, layer.input_norm, eps))  # (1) 8-bit activations
            att = self.cache.attend(i, layer.qkv_proj(h), mask)  # f32[T, H*hd]
            att = quantize_activations(rms_norm(att, layer.attn_sub_norm, eps))  # (2) attn_sub_norm
            x = x + layer.o_proj(att)  # f32[T, D]
            h = quantize_activations(rms_norm(x, layer.post_attention_norm, eps))
            gate_up = layer.gate_up_proj(h)  # f32[T, 2F]
            F = gate_up.shape[1] // 2
            act = np.square(np.maximum(gate_up[:, :F], 0)) * gate_up[:, F:]  # (3) relu^2 ...
            x = x + layer.down_proj(quantize_activations(rms_norm(act, layer.ffn_sub_norm, eps)))  # ... ffn_sub_norm
        self.cache.pos += T
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(rms_norm(x, self.norm, eps))
        return logits if all_logits else logits[0]


def load_bitnet(ckpt: Checkpoint, max_seq: int | None = None, kernels: bool = True) -> BitNetModel:
    cfg, src = ckpt.config, TensorSource(ckpt, kernels)
    D, F = cfg.hidden_size, cfg.intermediate_size
    embed, lm_head = src.embedding_and_head()
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(BitNetLayer(**llama_layer_parts(src, i),
                                  attn_sub_norm=src.get(p + "self_attn.attn_sub_norm.weight", (D,)),
                                  ffn_sub_norm=src.get(p + "mlp.ffn_sub_norm.weight", (F,))))
    norm = src.get("model.norm.weight", (D,))
    return BitNetModel(cfg, embed, layers, norm, lm_head, context_length(cfg, max_seq))
