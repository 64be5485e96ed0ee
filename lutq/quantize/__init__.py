"""Quantizers: one module per format family, a registry by name, the mixed-precision planner and the driver that
turns a checkpoint into a packed lutq directory."""

from lutq.quantize.packed import PackedTensor
from lutq.quantize.registry import FORMATS, dequantize, get_format

__all__ = ["FORMATS", "PackedTensor", "dequantize", "get_format"]
