"""Linear layers the runtime calls. `DenseLinear` is the fp32 reference; quantized layers (quant_linear.py) offer
the same call: layer(x: f32[T, in]) -> f32[T, out], with `in_features`, `out_features` and `nbytes`."""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np


class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def decode_calls(self, x: np.ndarray, out: np.ndarray, built: dict) -> tuple[list, list]:
        """For the recorded decode step (decode_step.py): argument-free calls computing out = layer(x) from x's
        contents at call time, x: f32[1, in], out: f32[1, out] (C-contiguous buffers that stay put). Returned as
        (prepare, product): input-side work (activation tables, skipped when `built` already holds this input's
        tables of that kind) and the matrix product with its epilogue."""
        ...


class DenseLinear:
    """y = x @ W.T + b with W: f32[out, in] kept in HF layout (BLAS reads the transpose without copying)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: f32[T, in] -> f32[T, out]."""
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def decode_calls(self, x: np.ndarray, out: np.ndarray, built: dict) -> tuple[list, list]:
        product = [functools.partial(np.matmul, x, self.weight.T, out=out)]
        if self.bias is not None:
            product.append(functools.partial(np.add, out, self.bias, out=out))
        return [], product

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    @classmethod
    def fuse(cls, parts: list[tuple[np.ndarray, np.ndarray | None]]) -> "DenseLinear":
        """One layer computing several that read the same input (q/k/v, gate/up): rows stacked, one GEMM instead of many."""
        weight = np.concatenate([w for w, _ in parts], axis=0)
        if all(b is None for _, b in parts):
            return cls(weight)
        bias = np.concatenate([np.zeros(w.shape[0], np.float32) if b is None else b for w, b in parts])
        return cls(weight, bias)
