"""Pick the forward pass for a checkpoint's architecture."""

from __future__ import annotations

from lutq.checkpoint.base import Checkpoint
from lutq.runtime.bitnet import load_bitnet
from lutq.runtime.llama import LlamaModel, load_llama


def load_model(ckpt: Checkpoint, max_seq: int | None = None, kernels: bool = True,
               kv_cache: str = "f32") -> LlamaModel:
    """The runnable model; max_seq bounds the KV cache (default: the config's context window), kv_cache is its type
    (f32 or f16). A lutq directory runs on the LUT kernels, or with kernels=False on its weights dequantized to fp32."""
    if ckpt.config.model_type == "bitnet":
        return load_bitnet(ckpt, max_seq, kernels, kv_cache)
    # llama, mistral and qwen2 share one forward pass; biases are found by tensor name.
    return load_llama(ckpt, max_seq, kernels, kv_cache)
