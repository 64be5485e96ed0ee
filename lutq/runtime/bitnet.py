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
from lutq.runtime.decode_step import DecodeStep
from lutq.runtime.linear import Linear
from lutq.runtime.llama import LlamaModel, TensorSource, context_length, llama_layer_parts, rms_norm
from lutq.runtime.ops import add_rms_norm_into, fake_quant_int8, relu2_mul_into, rms_norm_into


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
    """Per-token symmetric int8 fake quantization, in place: x -> round(x * s).clip(-128, 127) / s, s = 127 / max|x|."""
    fake_quant_int8(x)
    return x


class BitNetModel(LlamaModel):
    def forward(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Like LlamaModel.forward: i64[T] -> f32[T, V] (all_logits) or f32[V]; one token runs the recorded step."""
        if len(tokens) == 1 and not all_logits:
            return self.decode(int(tokens[0]))
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
            act = np.empty((T, gate_up.shape[1] // 2), np.float32)
            relu2_mul_into(gate_up, act)  # (3) relu^2 ...
            x = x + layer.down_proj(quantize_activations(rms_norm(act, layer.ffn_sub_norm, eps)))  # ... ffn_sub_norm
        self.cache.pos += T
        if not all_logits:
            x = x[-1:]
        logits = self.lm_head(rms_norm(x, self.norm, eps))
        return logits if all_logits else logits[0]

    def record_decode(self, step: DecodeStep) -> None:
        """forward() for one token as the recorded step's calls (decode_step.py; LlamaModel.record_decode's order)."""
        x, h, att, act, delta, eps = step.x, step.h, step.att, step.act, step.delta, step.eps
        for i, layer in enumerate(self.layers):
            if i == 0:
                step.call(rms_norm_into, x, layer.input_norm, eps, h)
            else:
                step.call(add_rms_norm_into, x, delta, layer.input_norm, eps, h)
            step.call(fake_quant_int8, h)  # (1)
            step.linear(layer.qkv_proj, h, step.qkv)
            step.attention(i)
            step.call(rms_norm_into, att, layer.attn_sub_norm, eps, att)  # (2), in place
            step.call(fake_quant_int8, att)
            step.linear(layer.o_proj, att, delta)
            step.call(add_rms_norm_into, x, delta, layer.post_attention_norm, eps, h)
            step.call(fake_quant_int8, h)
            step.linear(layer.gate_up_proj, h, step.gate_up)
            step.call(relu2_mul_into, step.gate_up, act)  # (3)
            step.call(rms_norm_into, act, layer.ffn_sub_norm, eps, act)
            step.call(fake_quant_int8, act)
            step.linear(layer.down_proj, act, delta)
        step.call(add_rms_norm_into, x, delta, self.norm, eps, h)
        step.linear(self.lm_head, h, step.logits)


def load_bitnet(ckpt: Checkpoint, max_seq: int | None = None, kernels: bool = True,
                kv_cache: str = "f32") -> BitNetModel:
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
    return BitNetModel(cfg, embed, layers, norm, lm_head, context_length(cfg, max_seq), kv_cache)
