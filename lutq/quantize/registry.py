"""Every format by name. Adding a format means its module, one line here, and its kernel."""

from __future__ import annotations

from lutq.errors import LutqError
from lutq.kernels import layout
from lutq.quantize import fineq
from lutq.quantize.fineq import FineQFormat
from lutq.quantize.int8 import Int8Format
from lutq.quantize.nf import NormalFloatFormat
from lutq.quantize.packed import PackedTensor
from lutq.quantize.ternary import TernaryFormat
from lutq.quantize.uniform import UniformFormat

FORMATS = {f.name: f for f in (
    UniformFormat(2), UniformFormat(3), UniformFormat(4), UniformFormat(6),
    *(UniformFormat(bits, quantized_params=True) for bits in (2, 3, 4, 6)),
    NormalFloatFormat(2), NormalFloatFormat(3), NormalFloatFormat(4),
    *(NormalFloatFormat(bits, quantized_params=True) for bits in (2, 3, 4)),
    TernaryFormat(per_group=False), TernaryFormat(per_group=True),
    FineQFormat(),
    Int8Format(),
)}
# Code layout scheme -> the version this lutq writes and reads.
LAYOUTS = {"bitserial": layout.LAYOUT_VERSION, "codebook": layout.CODEBOOK_LAYOUT_VERSION,
           "codebook3": layout.CODEBOOK3_LAYOUT_VERSION, "codebook2": layout.CODEBOOK2_LAYOUT_VERSION,
           "fineq-clusters": fineq.LAYOUT_VERSION, "rowmajor": 1}
# Older versions still read (converted where they are used): scheme -> every version read.
READABLE_LAYOUTS = {"fineq-clusters": fineq.READABLE_LAYOUT_VERSIONS}
KEEP = "fp16"  # not a format: the rule that leaves a tensor unquantized (stored as fp16)


def get_format(name: str):
    if name not in FORMATS:
        raise LutqError(f"unknown format {name!r} (formats: {', '.join(FORMATS)}, or {KEEP} to keep a tensor)")
    return FORMATS[name]


def dequantize(p: PackedTensor):
    """f32[M, K] for any PackedTensor: the reference the tests use and the runtime's fallback path."""
    return get_format(p.format).dequantize(p)
