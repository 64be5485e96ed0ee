"""Grouped-query attention over a preallocated KV cache, shared by every architecture's forward pass.

Shapes: T new tokens at positions P..P+T-1, S = P + T positions attended to, H query heads, KV key/value heads,
G = H / KV query heads per key/value head, hd = head_dim.
"""

from __future__ import annotations

import numpy as np

from lutq.config import ModelConfig
from lutq.errors import LutqError
from lutq.runtime.ops import decode_attention
from lutq.runtime.rope import apply_rope, rope_tables


KV_DTYPES = ("f32", "f16")


class KVCache:
    """Keys and values of every layer for up to max_seq positions, in f32 or fp16 (`dtype`; fp16, llama.cpp's default,
    halves the memory and, at long contexts where decode attention streams the whole cache every token, its time)."""

    def __init__(self, cfg: ModelConfig, max_seq: int, dtype: str = "f32"):
        if dtype not in KV_DTYPES:
            raise LutqError(f"KV cache type must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        self.max_seq, self.dtype = max_seq, dtype
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        blocks = -(-max_seq // 32)
        # Keys [layer, kv head, block, hd, 32]: positions in blocks of 32, each block transposed (ops.py draws it);
        # values [layer, kv head, position, hd]. fp16 is stored as its u16 bits (numba has no float16 arrays);
        # k_np/v_np are the same memory as numpy sees it (float16), for prefill.
        store = np.float32 if dtype == "f32" else np.uint16
        self.k = np.zeros((cfg.num_hidden_layers, self.kv_heads, blocks, self.head_dim, 32), store)
        self.v = np.zeros((cfg.num_hidden_layers, self.kv_heads, max_seq, self.head_dim), store)
        self.k_np, self.v_np = (self.k, self.v) if dtype == "f32" else (self.k.view(np.float16),
                                                                         self.v.view(np.float16))
        self.cos, self.sin = rope_tables(cfg, max_seq)  # f32[max_seq, hd/2]
        self.pos = 0  # positions filled
        self.scores = np.zeros(self.heads // self.kv_heads * blocks * 32, np.float32)  # decode scratch
        self.exponent = np.zeros(blocks * 32, np.int32)

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_seq:
            raise LutqError(f"context full: {self.pos + n} tokens exceed the context window of {self.max_seq}")

    def causal_mask(self, T: int) -> np.ndarray | None:
        """f32[T, S]: query t (position P+t) sees keys 0..P+t; None for a single token, which sees everything."""
        if T == 1:
            return None
        return np.triu(np.full((T, self.pos + T), -np.inf, np.float32), k=self.pos + 1)

    def attend(self, layer: int, qkv: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """qkv: f32[T, (H + 2KV) * hd], q, k, v side by side -> attention output f32[T, H * hd].

        Rotates q and k, appends k and v at positions P..P+T-1 of this layer's cache (P = self.pos; the caller
        advances pos once all layers have run).
        """
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        T, P = qkv.shape[0], self.pos
        if T == 1:  # decode: one compiled pass instead of a dozen small numpy calls
            out = np.empty((1, H * hd), np.float32)
            decode_attention(qkv[0], self.k[layer], self.v[layer], self.cos, self.sin, P, self.scores, self.exponent,
                             out[0])
            return out
        S, G = P + T, H // KV
        q = np.ascontiguousarray(qkv[:, : H * hd]).reshape(T, H, hd)
        k = np.ascontiguousarray(qkv[:, H * hd : (H + KV) * hd]).reshape(T, KV, hd)
        v = qkv[:, (H + KV) * hd :].reshape(T, KV, hd)
        apply_rope(q, self.cos[P:S], self.sin[P:S])
        apply_rope(k, self.cos[P:S], self.sin[P:S])
        positions = np.arange(P, S)
        self.k_np[layer][:, positions // 32, :, positions % 32] = k  # k: [T, KV, hd] into [KV, block, hd, lane]
        self.v_np[layer, :, P:S] = v.transpose(1, 0, 2)
        blocks = -(-S // 32)
        keys = self.k_np[layer, :, :blocks].transpose(0, 2, 1, 3).reshape(KV, hd, 32 * blocks)[:, :, :S]
        keys = keys.astype(np.float32, copy=False)  # f32[KV, hd, S]
        values = self.v_np[layer, :, :S].astype(np.float32, copy=False)  # f32[KV, S, hd]
        # The G query heads sharing a key/value head form one batch: [KV, G*T, hd], rows ordered (g, t).
        qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)
        scores = qg @ keys  # f32[KV, G*T, S]
        scores *= 1.0 / np.sqrt(hd)
        if mask is not None:
            scores = scores.reshape(KV, G, T, S)
            scores += mask
            scores = scores.reshape(KV, G * T, S)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        att = scores @ values  # f32[KV, G*T, hd]
        return att.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)  # heads back in order
