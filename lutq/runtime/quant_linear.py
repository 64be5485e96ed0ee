"""Quantized linear layers: a PackedTensor run on its LUT kernel, never dequantized.

T-MAC's tables depend only on the input vector, so every layer that reads the same input shares them (LUT Tensor
Core's operator fusion): q/k/v read one normalised hidden state, gate/up another. `FusedLinear` builds each distinct
table set once per call and lets every part look up into it; `TablePool` keeps the table buffers between calls, so a
decode step allocates no tables.

Which kernel runs which format:
    int2/3/4/6, their k variants, ternary    lut.gemv_bitserial   (+-x tables, kind "pm")
    nf2                                      codebook.gemv_nf4     (tables per activation pair, kind "cb")
    nf3                                      codebook.gemv_nf3     (codebook x activation pair tables, "pair")
    nf4                                      codebook.gemv_nf4     (codebook x activation tables, kind "cb")
    fineq                                    fineq.gemv_fineq      (five tables per 3-activation cluster, "fq")
    anything else (int8)                     dequantized once at load, then BLAS (DenseLinear)
"""

from __future__ import annotations

import functools

import numpy as np

from lutq.kernels import codebook as cb_kernels
from lutq.kernels import fineq as fq_kernels
from lutq.kernels import lut
from lutq.kernels.layout import TILE_M, pack_group_params, pack_group_scales, unpack_bitserial
from lutq.quantize import fineq as fineq_layout
from lutq.quantize.nf import group_scales as nf_group_scales
from lutq.quantize.nf import pack_codes
from lutq.quantize.packed import PackedTensor
from lutq.quantize.registry import dequantize
from lutq.quantize.uniform import group_params
from lutq.runtime.linear import DenseLinear

BITSERIAL = {"int2": 2, "int3": 3, "int4": 4, "int6": 6, "int2k": 2, "int3k": 3, "int4k": 4, "int6k": 6, "ternary": 2,
             "ternary-group": 2}
# nf formats -> the table kind of their kernel: nf3's pair tables, else a codebook table per activation (pair)
NF_TABLE_KINDS = {"nf2": "cb", "nf3": "pair", "nf4": "cb"}  # the k variants (8-bit scale codes) share their kernels
NF_TABLE_KINDS.update({name + "k": kind for name, kind in NF_TABLE_KINDS.items()})


class TablePool:
    """Activation table buffers by (kind, K, G[, codebook]) for one token, reused across decode steps and layers.
    A prefill of N tokens gets fresh buffers: N varies from call to call, and one allocation per layer is nothing
    next to an N-token product."""

    def __init__(self):
        self.tables: dict[tuple, object] = {}

    def get(self, key: tuple, tokens: int):
        if tokens != 1:
            return self.make(key, tokens)
        if key not in self.tables:
            self.tables[key] = self.make(key, 1)
        return self.tables[key]

    @staticmethod
    def make(key: tuple, tokens: int):
        kind, k, group = key[:3]
        if kind == "pm":
            return lut.Tables(k, group, tokens)
        if kind == "fq":
            return fq_kernels.ClusterTables(k, group, tokens)
        if kind == "pair":
            return cb_kernels.PairTables(k, group, np.frombuffer(key[3], np.float32), tokens)
        return cb_kernels.CodebookTables(k, group, np.frombuffer(key[3], np.float32), tokens)


class QuantLinear:
    """y = x @ W.T (+ bias) with W a PackedTensor on its LUT kernel."""

    def __init__(self, p: PackedTensor, bias: np.ndarray | None, pool: TablePool):
        self.out_features, self.in_features = m, k = p.shape
        self.format, self.group = p.format, p.group_size
        self.bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        self.pool = pool
        self.post_scale = None  # per-tensor ternary: the exact fp32 scale, applied after the kernel
        a = p.arrays
        self.codes = np.ascontiguousarray(a["codes"])
        self.nbytes = p.nbytes
        # Scales and biases are small (1/16 of the codes at G = 64): laid out in tile order here, at load.
        if p.format in BITSERIAL:
            scales, biases = group_params(p)
            if p.format == "ternary":
                self.post_scale = np.float32(np.asarray(a["tensor_scale"])[0])
                scales, biases = np.ones_like(scales), -np.ones_like(scales)
            self.params = pack_group_params(scales, biases)
            self.bits = BITSERIAL[p.format]
            self.table_key = ("pm", k, self.group)
        elif p.format in NF_TABLE_KINDS:
            self.params = pack_group_scales(nf_group_scales(p))
            codebook = np.ascontiguousarray(a["codebook"], np.float32)
            if p.meta.get("layout") == "bitserial":  # written before the nf formats stored their own layouts
                self.codes = pack_codes(unpack_bitserial(self.codes, p.bits, m, k), p.bits)  # repacked (nf4: slow)
            self.table_key = (NF_TABLE_KINDS[p.format], k, self.group, codebook.tobytes())
        elif p.format == "fineq":
            self.params = pack_group_scales(np.asarray(a["scales"], np.float32))
            if p.meta.get("layout_version") == 1:  # written before layout 2: the cluster bytes re-ordered here
                self.codes = fineq_layout.stored_bytes(self.codes)
            self.table_key = ("fq", k, self.group)
        else:
            raise ValueError(f"no LUT kernel for format {p.format!r}")

    def kernel(self, tables, out: np.ndarray, bind: bool = False):
        """The format's kernel over tables into out (bind: and return call(out) for reruns, lut.run_tiles)."""
        if self.format in BITSERIAL:
            return lut.gemv_bitserial(self.codes, self.params, self.bits, tables, out, bind=bind)
        if self.format in NF_TABLE_KINDS:  # nf2: nf4's kernel on pair codes and tables per activation pair
            kernel = cb_kernels.gemv_nf3 if NF_TABLE_KINDS[self.format] == "pair" else cb_kernels.gemv_nf4
            return kernel(self.codes, self.params, tables, out, bind=bind)
        return fq_kernels.gemv_fineq(self.codes, self.params, tables, out, bind=bind)

    def run(self, tables, out: np.ndarray) -> None:
        """out: f32[N, out_features] from tables of the input (built by the caller)."""
        self.kernel(tables, out)
        if self.post_scale is not None:
            out *= self.post_scale
        if self.bias is not None:
            out += self.bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: f32[N, K] -> f32[N, out_features]."""
        x = np.ascontiguousarray(x, np.float32)
        tables = self.pool.get(self.table_key, x.shape[0])
        tables.build(x)
        out = np.empty((x.shape[0], self.out_features), np.float32)
        self.run(tables, out)
        return out

    def decode_calls(self, x: np.ndarray, out: np.ndarray, built: dict) -> tuple[list, list]:
        """Linear.decode_calls: the pool's one-token tables bound to x, the kernel bound to them and out."""
        prepare = []
        tables = built.get(self.table_key)
        if tables is None:
            tables = built[self.table_key] = self.pool.get(self.table_key, 1)
            prepare.append(tables.bind(x))
        product = [functools.partial(self.kernel(tables, out, bind=True), out)]
        if self.post_scale is not None:
            product.append(functools.partial(np.multiply, out, self.post_scale, out=out))
        if self.bias is not None:
            product.append(functools.partial(np.add, out, self.bias, out=out))
        return prepare, product

    def stackable_with(self, other: "QuantLinear") -> bool:
        """Whether two layers over the same input can run as one kernel call: same kernel, tables and constants,
        and whole tiles (row counts a multiple of 32, so stacking tiles stacks rows)."""
        return (self.format == other.format and self.table_key == other.table_key
                and self.post_scale is None and other.post_scale is None
                and self.out_features % TILE_M == 0 and other.out_features % TILE_M == 0
                and (self.bias is None) == (other.bias is None))  # a codebook is part of its table key

    @classmethod
    def stack(cls, parts: list["QuantLinear"]) -> "QuantLinear":
        """One layer whose tiles are the parts' tiles in order: q/k/v (or gate/up) in a single kernel call.
        Copies the parts' codes once at load; per token it saves a kernel call and a concatenation per part."""
        merged = object.__new__(cls)
        merged.__dict__.update(parts[0].__dict__)
        merged.codes = np.concatenate([p.codes for p in parts], axis=0)
        merged.params = np.concatenate([p.params for p in parts], axis=0)
        merged.out_features = sum(p.out_features for p in parts)
        merged.nbytes = sum(p.nbytes for p in parts)
        if parts[0].bias is not None:
            merged.bias = np.concatenate([p.bias for p in parts])
        return merged


class FusedLinear:
    """Several linear layers reading one input: y = [x @ W1.T | x @ W2.T | ...], tables built once per kind, and
    neighbours that can share a kernel call stacked into one."""

    def __init__(self, parts: list):
        stacked = [parts[0]]
        for part in parts[1:]:
            last = stacked[-1]
            if isinstance(part, QuantLinear) and isinstance(last, QuantLinear) and last.stackable_with(part):
                stacked[-1] = QuantLinear.stack([last, part])
            else:
                stacked.append(part)
        self.parts = stacked
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features
        self.nbytes = sum(p.nbytes for p in parts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: f32[N, K] -> f32[N, sum of out_features]."""
        x = np.ascontiguousarray(x, np.float32)
        n = x.shape[0]
        built = {}
        outs = []
        for part in self.parts:
            if isinstance(part, DenseLinear):
                outs.append(part(x))
                continue
            tables = built.get(part.table_key)
            if tables is None:
                tables = built[part.table_key] = part.pool.get(part.table_key, n)
                tables.build(x)
            out = np.empty((n, part.out_features), np.float32)
            part.run(tables, out)
            outs.append(out)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


    def decode_calls(self, x: np.ndarray, out: np.ndarray, built: dict) -> tuple[list, list]:
        """Linear.decode_calls: each part writes its columns of out (a [1, n] slice is contiguous); parts reading
        the same kind of tables share one build."""
        prepare, product, col = [], [], 0
        for part in self.parts:
            part_prepare, part_product = part.decode_calls(x, out[:, col:col + part.out_features], built)
            prepare += part_prepare
            product += part_product
            col += part.out_features
        return prepare, product


def make_linear(p: PackedTensor, bias: np.ndarray | None, pool: TablePool):
    """The fastest layer for a PackedTensor: its LUT kernel, or dequantized fp32 where it has none."""
    fmt = p.format
    if fmt in BITSERIAL or fmt in NF_TABLE_KINDS or fmt == "fineq":
        return QuantLinear(p, bias, pool)
    return DenseLinear(dequantize(p), bias)
