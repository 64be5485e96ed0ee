"""SIMD layer: which vector instructions this CPU has, and numba intrinsics that emit them.

The LUT kernels need instructions LLVM never derives from plain loops: a byte shuffle doing 32/64 table lookups at
once (pshufb), multiply-add of unsigned by signed bytes into int16 (pmaddubsw), the VNNI byte dot product
(vpdpbusd) and VBMI's 64-entry byte table (vpermb). Numba reaches them through vector-valued numba types whose LLVM
type is `<N x iB>` and `numba.extending.intrinsic`s whose code generation calls the `llvm.x86.*` intrinsics, or on
aarch64 the `llvm.aarch64.neon.*` ones (tbl1/tbl4 for the shuffles, sdot for the dot product).

Kernels are written once, for 64-byte logical vectors, and take an `Isa` witness as their first argument. The
intrinsics read the witness's numba type at compile time and emit the instruction of that ISA: AVX-512BW does a
64-byte vector in one instruction, AVX2 splits it into two 32-byte halves, NEON into four 16-byte quarters. Generic
LLVM operations (and, shifts, adds, widening, float math) need no witness: LLVM legalises them for whatever the
target has. An intrinsic the target lacks aborts the whole process inside LLVM (and one the CPU lacks dies with
SIGILL), so `isa_for_host()` only ever returns what both numba's target and the CPU have, and each ISA is a distinct
argument type: a compiled (and cached) kernel never runs on the wrong one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

from lutq.errors import LutqError

# ---------------------------------------------------------------------------------------------------------------------
# ISA detection


def target_arch(triple: str | None = None) -> str:
    """The architecture numba compiles for (this process's own): x86_64, aarch64 or other."""
    triple = (triple or llvm.get_process_triple()).lower()
    if triple.startswith(("x86_64", "amd64")):
        return "x86_64"
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    return "other"


ARCH = target_arch()
ISA_ORDERS = {"x86_64": ("portable", "avx2", "avx512"), "aarch64": ("portable", "neon")}  # weakest to strongest
ISA_ORDER = ISA_ORDERS.get(ARCH, ("portable",))

# Linux aarch64 hwcaps (getauxval(AT_HWCAP), asm/hwcap.h): what the kernel says the CPU executes. qemu-user answers
# for the emulated CPU, so they are right under emulation too, where LLVM's host detection (it parses
# /proc/cpuinfo) sees the x86 host and finds nothing.
AT_HWCAP = 16
HWCAPS = {"asimd": 1 << 1, "asimddp": 1 << 20}
HWCAP_FEATURE = {"neon": "asimd", "dotprod": "asimddp"}  # LLVM feature -> the hwcap the CPU must show for it


def cpu_hwcaps() -> set[str] | None:
    """The hwcaps above that this CPU has, on Linux aarch64; None where there are no hwcaps to ask."""
    if ARCH != "aarch64":
        return None
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):  # not Linux (macOS has no getauxval): trust LLVM's features
        return None
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    bits = getauxval(AT_HWCAP)
    return {name for name, bit in HWCAPS.items() if bits & bit}


def target_features() -> set[str]:
    """CPU features numba's code generator may use and the CPU executes: the host's, unless NUMBA_CPU_NAME pins
    another target, whose features are then the ones NUMBA_CPU_FEATURES turns on (x86: `+avx2,+fma,...`; aarch64:
    `+dotprod`). Advanced SIMD is the aarch64 baseline: every core and LLVM target has it unless `-neon` says not."""
    if config.CPU_NAME and config.CPU_NAME != "host":
        feats = (config.CPU_FEATURES or "").split(",")
        found = {f[1:] for f in feats if f.startswith("+")}
    else:
        feats = []
        found = {k for k, v in llvm.get_host_cpu_features().items() if v}
    if ARCH == "aarch64":
        if "-neon" not in feats:
            found.add("neon")
        hw = cpu_hwcaps()
        if hw is not None:  # a feature the code generator may use but the CPU lacks would end in SIGILL
            found -= {f for f, cap in HWCAP_FEATURE.items() if cap not in hw}
    return found


def detect_isa(features: set[str], arch: str = "x86_64") -> str:
    if arch == "aarch64":
        return "neon" if "neon" in features else "portable"
    if arch != "x86_64":
        return "portable"
    if {"avx512bw", "avx512vl", "avx512f", "f16c", "fma"} <= features:
        return "avx512"
    if {"avx2", "f16c", "fma"} <= features:
        return "avx2"
    return "portable"


def has_dot(features: set[str], isa: str) -> bool:
    """A 4-byte dot product into int32 lanes: vpdpbusd on 64-byte vectors (AVX512-VNNI) or on 32-byte halves
    (AVX-VNNI / AVX512-VNNI with VL); sdot on 16-byte quarters (ARMv8.2 dotprod: Cortex-A55/A76 and later, Pi 5)."""
    if isa == "avx512":
        return "avx512vnni" in features
    if isa == "neon":
        return "dotprod" in features
    return isa == "avx2" and "avxvnni" in features


def host_isa() -> str:
    """The widest ISA usable here; LUTQ_ISA may lower it (to test the narrower paths), never raise it."""
    best = detect_isa(target_features(), ARCH)
    want = os.environ.get("LUTQ_ISA", "").strip().lower()
    if not want:
        return best
    if want not in ISA_ORDER:
        raise LutqError(f"LUTQ_ISA={want!r}: expected one of {', '.join(ISA_ORDER)} on {ARCH}")
    if ISA_ORDER.index(want) > ISA_ORDER.index(best):
        raise LutqError(f"LUTQ_ISA={want}: this CPU supports at most {best}")
    return want


# ---------------------------------------------------------------------------------------------------------------------
# The ISA witness: a zero-sized argument whose numba type carries the ISA name.


# Numba's cache keys a kernel on its own source file only, not on the intrinsics it inlines from this one; the
# witness type carries a digest of this file, so changing an intrinsic changes every SIMD kernel's signature.
SOURCE_DIGEST = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]


class Isa:
    """name: portable, avx2, avx512 or neon. dot: the 4-byte dot product (`has_dot`: vpdpbusd, sdot). vbmi: vpermb
    (a 64-entry byte table), AVX-512 only. Each combination is its own numba type, so its own compiled kernel."""

    def __init__(self, name: str, dot: bool = False, vbmi: bool = False):
        self.name, self.dot, self.vbmi = name, dot, vbmi and name == "avx512"

    def __repr__(self):
        return f"Isa({self.name!r}, dot={self.dot}, vbmi={self.vbmi})"


class IsaType(types.Type):
    def __init__(self, name: str, dot: bool, vbmi: bool, digest: str = SOURCE_DIGEST):
        self.isa, self.dot, self.vbmi = name, dot, vbmi
        super().__init__(name=f"Isa[{name}{',dot' if dot else ''}{',vbmi' if vbmi else ''},{digest}]")


@typeof_impl.register(Isa)
def _typeof_isa(val, c):
    return IsaType(val.name, val.dot, val.vbmi)


register_model(IsaType)(models.OpaqueModel)


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_constant_null(typ))


def isa_for_host() -> Isa:
    name = host_isa()
    features = target_features()
    return Isa(name, has_dot(features, name), "avx512vbmi" in features)


# ---------------------------------------------------------------------------------------------------------------------
# Vector types: numba values that are LLVM vectors (kept in registers by LLVM after mem2reg).


class Vec(types.Type):
    def __init__(self, kind: str, bits: int, count: int):
        self.kind, self.bits, self.count = kind, bits, count
        super().__init__(name=f"vec<{count}x{kind}{bits}>")

    @property
    def llvm_type(self):
        elem = {"i": ir.IntType(self.bits), "f": ir.FloatType()}[self.kind]
        return ir.VectorType(elem, self.count)


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


i8x32, i8x64 = Vec("i", 8, 32), Vec("i", 8, 64)
i16x32, i32x16, f32x32 = Vec("i", 16, 32), Vec("i", 32, 16), Vec("f", 32, 32)
f32x16 = Vec("f", 32, 16)  # the 16 entries of one activation table, before rounding (the table builds)

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _halves(builder, v, n):
    """Split an n-element vector into its two halves (shufflevector, free when the halves are two registers)."""
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n // 2), list(range(n // 2))))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n // 2), list(range(n // 2, n))))
    return lo, hi


def _concat(builder, lo, hi):
    n = lo.type.count
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))


def _split_call(builder, isa, name512, name256, ret_elem, ret_count, args):
    """Call the 512-bit intrinsic, or on AVX2 the 256-bit one on both halves of every argument."""
    if isa == "avx512":
        return _call(builder, name512, ir.VectorType(ret_elem, ret_count), args)
    parts = [_halves(builder, a, a.type.count) for a in args]
    half = ir.VectorType(ret_elem, ret_count // 2)
    lo = _call(builder, name256, half, [p[0] for p in parts])
    hi = _call(builder, name256, half, [p[1] for p in parts])
    return _concat(builder, lo, hi)


def _ptr(context, builder, arrty, arr, index, vty):
    """Pointer to element `index` of a contiguous array, typed as a pointer to the vector vty."""
    a = context.make_array(arrty)(context, builder, arr)
    p = builder.gep(a.data, [index])
    return builder.bitcast(p, vty.as_pointer())


def _check_isa(isa):
    if not isinstance(isa, IsaType) or isa.isa == "portable":
        raise TypeError(f"a SIMD intrinsic needs an avx2/avx512/neon Isa witness, got {isa}")


def _pieces(builder, v, width):
    """An n-element vector as n / width consecutive `width`-element vectors (free: they are separate registers)."""
    n = v.type.count
    return [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(i, i + width))))
            for i in range(0, n, width)]


def _join(builder, pieces):
    """The inverse of _pieces."""
    while len(pieces) > 1:
        pieces = [_concat(builder, pieces[i], pieces[i + 1]) for i in range(0, len(pieces), 2)]
    return pieces[0]


def _tbl1(builder, table, index):
    """pshufb on NEON: one tbl per 16-byte quarter, each quarter of `table` its own 16-entry table.

    tbl zeroes an index >= 16 where pshufb zeroes an index with bit 7 set and otherwise reads index & 15; index &
    0x8f makes the two agree on every byte. The kernels' indices are nibbles, so LLVM drops the and (known bits)."""
    index = builder.and_(index, _splat(index.type, 0x8F))
    q16 = ir.VectorType(I8, 16)
    return _join(builder, [_call(builder, "llvm.aarch64.neon.tbl1.v16i8", q16, [t, i])
                           for t, i in zip(_pieces(builder, table, 16), _pieces(builder, index, 16))])


# ---------------------------------------------------------------------------------------------------------------------
# Memory: unaligned vector loads/stores at an element index, 16-byte table broadcast, software prefetch.


def _loader(vecty):
    @intrinsic
    def load(typingctx, arr, index):
        def codegen(context, builder, sig, args):
            return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], vecty.llvm_type), align=1)

        return vecty(arr, index), codegen

    return load


load_i8x64 = _loader(i8x64)  # 64 bytes of a u8/i8 array
load_i8x32 = _loader(i8x32)
load_f32x16 = _loader(f32x16)  # 16 values of an f32 array


@intrinsic
def store_rint_i8x16(typingctx, arr, index, v):
    """arr[index:index+16] = rint(v) as int8 (or int16, for an int16 array), for |v| < 127.5 (the tables): round to
    nearest even, convert, narrow, one 16- (32-) byte store (AVX-512: vcvtps2dq + vpmovdb; NEON: frintx, fcvtzs,
    two xtn)."""
    if v != f32x16 or not isinstance(arr, types.Array) or arr.dtype not in (types.int8, types.int16):
        return None
    elem = I8 if arr.dtype == types.int8 else I16

    def codegen(context, builder, sig, args):
        r = _call(builder, "llvm.rint.v16f32", f32x16.llvm_type, [args[2]])
        q = builder.trunc(builder.fptosi(r, ir.VectorType(I32, 16)), ir.VectorType(elem, 16))
        builder.store(q, _ptr(context, builder, sig.args[0], args[0], args[1], q.type), align=1)
        return context.get_dummy_value()

    return types.none(arr, index, v), codegen


# f32 or fp16 storage (the KV cache): an f32 array, or a u16 array holding fp16 bits, read and written as f32.


def _f16_or_f32(arrty):
    return isinstance(arrty, types.Array) and arrty.dtype in (types.float32, types.uint16)


def _f32_reader(count: int):
    """An intrinsic reading `count` (1 or 32) consecutive values of an f32 array, or of a u16 array holding fp16 bits
    (widened: vcvtph2ps), as f32."""
    vec = count > 1
    f32, f16, i16 = ((f32x32.llvm_type, ir.VectorType(ir.HalfType(), count), ir.VectorType(I16, count)) if vec
                     else (ir.FloatType(), ir.HalfType(), I16))

    @intrinsic
    def read(typingctx, arr, index):
        if not _f16_or_f32(arr):
            return None

        def codegen(context, builder, sig, args):
            if sig.args[0].dtype == types.float32:
                return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], f32), align=1)
            h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], i16), align=1)
            return builder.fpext(builder.bitcast(h, f16), f32)

        return (f32x32 if vec else types.float32)(arr, index), codegen

    return read


load_f32x32_from = _f32_reader(32)
load_f32_from = _f32_reader(1)


@intrinsic
def store_f32_to(typingctx, arr, index, value):
    """arr[index] = value for an f32 array, or value rounded to fp16 (nearest even) for a u16 array of fp16 bits."""
    if not _f16_or_f32(arr):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.float32)
        if sig.args[0].dtype == types.float32:
            builder.store(v, _ptr(context, builder, sig.args[0], args[0], args[1], ir.FloatType()), align=1)
        else:
            h = builder.bitcast(builder.fptrunc(v, ir.HalfType()), I16)
            builder.store(h, _ptr(context, builder, sig.args[0], args[0], args[1], I16), align=1)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def load_f16x32(typingctx, arr, index):
    """32 fp16 values (a u16 array holding their bits) widened to f32 (vcvtph2ps)."""

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(I16, 32)), align=1)
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 32)), f32x32.llvm_type)

    return f32x32(arr, index), codegen


@intrinsic
def store_f32x32(typingctx, arr, index, v):
    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], f32x32.llvm_type), align=1)
        return context.get_dummy_value()

    return types.none(arr, index, v), codegen


def _broadcaster(vecty):
    @intrinsic
    def broadcast16(typingctx, arr, index):
        """The 16 bytes at arr[index:index+16] repeated in every 128-bit lane (vbroadcasti128/32x4)."""

        def codegen(context, builder, sig, args):
            t = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(I8, 16)), align=1)
            mask = ir.Constant(ir.VectorType(I32, vecty.count), [i % 16 for i in range(vecty.count)])
            return builder.shuffle_vector(t, t, mask)

        return vecty(arr, index), codegen

    return broadcast16


broadcast16_x64 = _broadcaster(i8x64)
broadcast16_x32 = _broadcaster(i8x32)


@intrinsic
def broadcast16_pair(typingctx, arr, index):
    """Two 16-byte tables at arr[index:index+32] as lanes (A, A, B, B): 64 lookups, the first 32 bytes in A."""

    def codegen(context, builder, sig, args):
        t = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], i8x32.llvm_type), align=1)
        mask = [i % 16 + 16 * (i // 32) for i in range(64)]
        return builder.shuffle_vector(t, t, ir.Constant(ir.VectorType(I32, 64), mask))

    return i8x64(arr, index), codegen


@intrinsic
def broadcast4_x64(typingctx, arr, index):
    """The 4 bytes at arr[index:index+4] repeated 16 times (vpbroadcastd): one activation quad for every row."""

    def codegen(context, builder, sig, args):
        d = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], I32), align=1)
        return builder.bitcast(_splat_value(builder, ir.VectorType(I32, 16), d), i8x64.llvm_type)

    return i8x64(arr, index), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask for the cache line holding arr[index] (read, keep in all levels); never faults, even past the end."""

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        p = builder.bitcast(builder.gep(a.data, [args[1]]), I8.as_pointer())
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [p, I32(0), I32(3), I32(1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


# ---------------------------------------------------------------------------------------------------------------------
# Integer lane arithmetic (generic LLVM: legalised for the target).


def _splat(vty, value):
    return ir.Constant(vty, [ir.Constant(vty.element, value)] * vty.count)


def _splat_value(builder, vty, value):
    """A run-time scalar (already of vty's element type) in every lane of vty."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, I32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count))


def _const_vec(vecty):
    @intrinsic
    def const(typingctx, value):
        if not isinstance(value, types.IntegerLiteral):
            return None

        def codegen(context, builder, sig, args):
            return _splat(vecty.llvm_type, value.literal_value)

        return vecty(value), codegen

    return const


splat_i16x32, splat_i32x16 = _const_vec(i16x32), _const_vec(i32x16)


@intrinsic
def zeros_f32x32(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(f32x32.llvm_type, [ir.Constant(ir.FloatType(), 0.0)] * 32)

    return f32x32(), codegen


@intrinsic
def low_nibbles(typingctx, v):
    """v & 0x0f per byte: the table index of the low half of each byte."""

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _splat(args[0].type, 0x0F))

    return v(v), codegen


@intrinsic
def high_nibbles(typingctx, v):
    """v >> 4 per byte (logical): the table index of the high half of each byte."""

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], _splat(args[0].type, 4))

    return v(v), codegen


@intrinsic
def vadd(typingctx, a, b):
    if a != b:
        return None

    def codegen(context, builder, sig, args):
        if sig.args[0].kind == "f":
            return builder.fadd(args[0], args[1])
        return builder.add(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def times(typingctx, v, n):
    """v * n per lane, n a run-time integer (one factor for every lane: x86 vpmullw by a broadcast, NEON mul)."""
    if not isinstance(v, Vec) or v.kind != "i" or not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        factor = context.cast(builder, args[1], sig.args[1], getattr(types, f"int{v.bits}"))
        return builder.mul(args[0], _splat_value(builder, v.llvm_type, factor))

    return v(v, n), codegen


@intrinsic
def crumbs(typingctx, v, c):
    """(v >> 2c) & 3 per byte: the c-th 2-bit code of every byte."""

    def codegen(context, builder, sig, args):
        sv = _splat_value(builder, i8x64.llvm_type, builder.trunc(args[1], I8))
        return builder.and_(builder.lshr(args[0], builder.add(sv, sv)), _splat(i8x64.llvm_type, 3))

    return i8x64(v, c), codegen


@intrinsic
def half(typingctx, v, which):
    """Bytes 0-31 (which = 0) or 32-63 (which = 1) of a 64-byte vector."""
    if not isinstance(which, types.IntegerLiteral):
        return None
    start = 32 * which.literal_value

    def codegen(context, builder, sig, args):
        mask = ir.Constant(ir.VectorType(I32, 32), list(range(start, start + 32)))
        return builder.shuffle_vector(args[0], args[0], mask)

    return i8x32(v, which), codegen


@intrinsic
def code_index(typingctx, v, which):
    """The 3-bit codes of a codebook3 register (layout.py) as table indices: the low (which = 0) or high (1) nibble's
    bits 0-2, and bit 3 set on odd bytes, so even bytes read entries 0-7 (the pair's first activation) and odd bytes
    entries 8-15 (its second). AVX-512: one vpternlogd (plus the shift for the high nibbles)."""
    if v != i8x64 or not isinstance(which, types.IntegerLiteral):
        return None
    shift = 4 * which.literal_value

    def codegen(context, builder, sig, args):
        odd = ir.Constant(i8x64.llvm_type, [ir.Constant(I8, 8 * (i & 1)) for i in range(64)])
        codes = builder.lshr(args[0], _splat(i8x64.llvm_type, shift)) if shift else args[0]
        return builder.or_(builder.and_(codes, _splat(i8x64.llvm_type, 7)), odd)

    return i8x64(v, which), codegen


@intrinsic
def spare_codes(typingctx, r0, r1, r2):
    """The fourth register of a codebook3 block from the spare bit 3 of every nibble of the three stored ones: bit b
    of each nibble's code comes from register b, (r0 >> 3) & 0x11 | (r1 >> 2) & 0x22 | (r2 >> 1) & 0x44."""
    if not r0 == r1 == r2 == i8x64:
        return None

    def codegen(context, builder, sig, args):
        parts = [builder.and_(builder.lshr(r, _splat(i8x64.llvm_type, 3 - b)), _splat(i8x64.llvm_type, 0x11 << b))
                 for b, r in enumerate(args)]
        return builder.or_(builder.or_(parts[0], parts[1]), parts[2])

    return i8x64(r0, r1, r2), codegen


@intrinsic
def widen_i8_i16(typingctx, v):
    """Sign-extend 32 int8 to 32 int16 (vpmovsxbw)."""

    def codegen(context, builder, sig, args):
        return builder.sext(args[0], i16x32.llvm_type)

    return i16x32(v), codegen


@intrinsic
def i16_to_f32(typingctx, v):
    """32 int16 -> 32 f32 exactly (vpmovsxwd + vcvtdq2ps)."""

    def codegen(context, builder, sig, args):
        return builder.sitofp(builder.sext(args[0], ir.VectorType(I32, 32)), f32x32.llvm_type)

    return f32x32(v), codegen


@intrinsic
def i32_pair_to_f32(typingctx, lo, hi):
    """Two int32x16 (rows 0-15, 16-31) -> 32 f32 in row order."""

    def codegen(context, builder, sig, args):
        return builder.sitofp(_concat(builder, args[0], args[1]), f32x32.llvm_type)

    return f32x32(lo, hi), codegen


# ---------------------------------------------------------------------------------------------------------------------
# Float lane arithmetic.


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c per lane (vfmadd)."""

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v32f32", f32x32.llvm_type, list(args))

    return f32x32(a, b, c), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b per lane (float vectors: IEEE, unfused)."""
    if a != b or not isinstance(a, Vec) or a.kind != "f":
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return a(a, b), codegen


def _splat_f32_codegen(vec):
    """Codegen of a splat: the scalar argument (any number type, converted to f32) in every lane of vec."""

    def codegen(context, builder, sig, args):
        return _splat_value(builder, vec.llvm_type, context.cast(builder, args[0], sig.args[0], types.float32))

    return codegen


@intrinsic
def splat_f32x16(typingctx, s):
    """A scalar (converted to f32) in all 16 lanes."""
    return f32x16(s), _splat_f32_codegen(f32x16)


@intrinsic
def splat_f32(typingctx, s):
    """A scalar (any number type, converted to f32) in all 32 lanes."""
    return f32x32(s), _splat_f32_codegen(f32x32)


@intrinsic
def load_f16(typingctx, arr, index):
    """One fp16 value (bits in a u16 array) as f32: numba has no float16 type."""

    def codegen(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], I16), align=1)
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return types.float32(arr, index), codegen


@intrinsic
def lane_f32(typingctx, v, i):
    """One lane of an f32 vector as a scalar."""

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])

    return types.float32(v, i), codegen




# ---------------------------------------------------------------------------------------------------------------------
# The instructions LLVM will not find by itself.


@intrinsic
def shuffle_bytes(typingctx, isa, table, index):
    """pshufb: out[i] = table[lane(i)][index[i] & 15], 0 where index[i] >= 128; lane(i) = i // 16. 32 or 64 byte
    lookups in one instruction (AVX2: 2 for 64; NEON: tbl, 2 or 4)."""
    _check_isa(isa)
    if table != index or table not in (i8x32, i8x64):
        return None

    def codegen(context, builder, sig, args):
        if isa.isa == "neon":
            return _tbl1(builder, args[1], args[2])
        if sig.args[1] == i8x32:
            return _call(builder, "llvm.x86.avx2.pshuf.b", i8x32.llvm_type, list(args[1:]))
        return _split_call(builder, isa.isa, "llvm.x86.avx512.pshuf.b.512", "llvm.x86.avx2.pshuf.b", I8, 64,
                           list(args[1:]))

    return table(isa, table, index), codegen


@intrinsic
def lookup64(typingctx, isa, tables, index, idx):
    """out[i] = T[idx[i] & 63] for 32 indices, T = the 64 bytes at tables[index:] (four 16-entry tables in a row).
    VBMI: one vpermb. NEON: tbl with a four-register (64-byte) table, one per 16 indices. Otherwise: four pshufb,
    each byte keeping the one its top index bits name."""
    _check_isa(isa)
    if idx != i8x32:
        return None

    def codegen(context, builder, sig, args):
        if isa.isa == "neon":
            q16 = ir.VectorType(I8, 16)
            t = [builder.load(_ptr(context, builder, sig.args[1], args[1], builder.add(args[2], args[2].type(16 * j)),
                                   q16), align=1) for j in range(4)]
            low6 = builder.and_(args[3], _splat(i8x32.llvm_type, 63))  # tbl4 zeroes >= 64; & 63 is lookup64's rule
            return _join(builder, [_call(builder, "llvm.aarch64.neon.tbl4.v16i8", q16, t + [i])
                                   for i in _pieces(builder, low6, 16)])
        if isa.vbmi:
            t = builder.load(_ptr(context, builder, sig.args[1], args[1], args[2], i8x64.llvm_type), align=1)
            wide = builder.shuffle_vector(args[3], args[3], ir.Constant(ir.VectorType(I32, 64), list(range(32)) * 2))
            out = _call(builder, "llvm.x86.avx512.permvar.qi.512", i8x64.llvm_type, [t, wide])
            return builder.shuffle_vector(out, out, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        top = builder.and_(builder.lshr(args[3], _splat(i8x32.llvm_type, 4)), _splat(i8x32.llvm_type, 3))
        low = builder.and_(args[3], _splat(i8x32.llvm_type, 15))
        out = None
        for j in range(4):
            q = builder.load(_ptr(context, builder, sig.args[1], args[1], builder.add(args[2], args[2].type(16 * j)),
                                  ir.VectorType(I8, 16)), align=1)
            t = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, 32), [i % 16 for i in range(32)]))
            hit = _call(builder, "llvm.x86.avx2.pshuf.b", i8x32.llvm_type, [t, low])
            out = hit if out is None else builder.select(
                builder.icmp_unsigned("==", top, _splat(i8x32.llvm_type, j)), hit, out)
        return out

    return i8x32(isa, tables, index, idx), codegen


@intrinsic
def lookup64_words(typingctx, isa, tables, index, idx):
    """out[i] = T[idx[i] & 63] as int16 for 32 indices, T = the 64 int16 at tables[index:] (four 16-entry tables in a
    row, widened when built): AVX-512BW's two-register word permute, vpermt2w, on the zero-extended indices. For
    AVX-512 without VBMI, where a 64-entry byte lookup takes four pshufb and three blends and then a widening."""
    _check_isa(isa)
    if idx != i8x32 or isa.isa != "avx512" or not isinstance(tables, types.Array) or tables.dtype != types.int16:
        return None

    def codegen(context, builder, sig, args):
        lo, hi = (builder.load(_ptr(context, builder, sig.args[1], args[1], builder.add(args[2], args[2].type(32 * j)),
                                    i16x32.llvm_type), align=2) for j in range(2))
        return _call(builder, "llvm.x86.avx512.vpermi2var.hi.512", i16x32.llvm_type,
                     [lo, builder.zext(args[3], i16x32.llvm_type), hi])

    return i16x32(isa, tables, index, idx), codegen


@intrinsic
def lookup16_words(typingctx, isa, tables, index, idx):
    """out[i] = T[idx[i] >> 4] as int16 for 32 indices, T = the 16 int16 at tables[index:]: vpermw on the high
    nibbles (the table read twice into one register: vpermw reads five index bits)."""
    _check_isa(isa)
    if idx != i8x32 or isa.isa != "avx512" or not isinstance(tables, types.Array) or tables.dtype != types.int16:
        return None

    def codegen(context, builder, sig, args):
        q = builder.load(_ptr(context, builder, sig.args[1], args[1], args[2], ir.VectorType(I16, 16)), align=2)
        t = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, 32), [i % 16 for i in range(32)]))
        i = builder.lshr(builder.zext(args[3], i16x32.llvm_type), _splat(i16x32.llvm_type, 4))
        return _call(builder, "llvm.x86.avx512.permvar.hi.512", i16x32.llvm_type, [t, i])

    return i16x32(isa, tables, index, idx), codegen


@intrinsic
def maddubs(typingctx, isa, unsigned, signed):
    """pmaddubsw: int16 out[i] = u[2i] * s[2i] + u[2i+1] * s[2i+1] (u unsigned bytes, s signed; saturating)."""
    _check_isa(isa)
    if unsigned != i8x64 or signed != i8x64:
        return None

    def codegen(context, builder, sig, args):
        if isa.isa == "neon":  # no such instruction: widen (ushll/sshll), multiply, add even and odd with saturation
            wide = ir.VectorType(I16, 64)
            prod = builder.mul(builder.zext(args[1], wide), builder.sext(args[2], wide))  # |u s| < 2^15: exact
            even, odd = ([builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(I32, 32), list(range(j, 64, 2))))
                          for j in (0, 1)])
            return _call(builder, "llvm.sadd.sat.v32i16", i16x32.llvm_type, [even, odd])
        return _split_call(builder, isa.isa, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx2.pmadd.ub.sw", I16, 32,
                           list(args[1:]))

    return i16x32(isa, unsigned, signed), codegen


@intrinsic
def weigh_pairs(typingctx, isa, v, even, odd):
    """int16 out[i] = even * v[2i] + odd * v[2i+1] for 64 signed bytes and literal weights (even, odd >= 0,
    even + odd < 256: never saturates). x86: pmaddubsw against the constant weights. NEON, (1, 2), the bit-plane
    pair of lut.py: saddlp (pairwise widening add) + each odd byte as int16 (the 16-bit lane shifted right by 8):
    LLVM folds both into the accumulator (sadalp, ssra), 2 instructions per 16 bytes where maddubs' widen, multiply
    and pairwise add cost 6. (1, 1), codebook3's two columns of a row: saddlp alone. Other weights: the even and odd
    bytes as int16 (shifts), multiplied and added."""
    _check_isa(isa)
    if v != i8x64 or not isinstance(even, types.IntegerLiteral) or not isinstance(odd, types.IntegerLiteral):
        return None
    a, b = even.literal_value, odd.literal_value
    if a < 0 or b < 0 or a + b > 255:
        raise TypeError(f"weigh_pairs: weights ({a}, {b}) must be >= 0 with a sum below 256")

    def codegen(context, builder, sig, args):
        v = args[1]
        if isa.isa != "neon":
            w = ir.Constant(i8x64.llvm_type, [ir.Constant(I8, b if i & 1 else a) for i in range(64)])
            return _split_call(builder, isa.isa, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx2.pmadd.ub.sw", I16,
                               32, [w, v])
        lanes = builder.bitcast(v, i16x32.llvm_type)
        odd_bytes = builder.ashr(lanes, _splat(lanes.type, 8))
        if (a, b) in ((1, 1), (1, 2)):
            q8 = ir.VectorType(I16, 8)
            pairs = _join(builder, [_call(builder, "llvm.aarch64.neon.saddlp.v8i16.v16i8", q8, [q])
                                    for q in _pieces(builder, v, 16)])
            return pairs if b == 1 else builder.add(pairs, odd_bytes)
        even_bytes = builder.ashr(builder.shl(lanes, _splat(lanes.type, 8)), _splat(lanes.type, 8))
        return builder.add(builder.mul(even_bytes, _splat(lanes.type, a)),
                           builder.mul(odd_bytes, _splat(lanes.type, b)))

    return i16x32(isa, v, even, odd), codegen


@intrinsic
def dpbusd(typingctx, isa, acc, unsigned, signed):
    """vpdpbusd (VNNI): int32 acc[i] += sum_j u[4i+j] * s[4i+j], u unsigned bytes, s signed bytes.

    NEON (dotprod): sdot on each 16-byte quarter, which reads u as signed too: exact while every u < 128 (the crumbs
    kernel's u are 2-bit codes). usdot, the mixed-sign one, needs i8mm, which the Cortex-A76 (Pi 5) lacks."""
    _check_isa(isa)
    if not isa.dot or acc != i32x16 or unsigned != i8x64 or signed != i8x64:
        return None

    def codegen(context, builder, sig, args):
        if isa.isa == "neon":
            q4 = ir.VectorType(I32, 4)
            parts = zip(*(_pieces(builder, v, w) for v, w in zip(args[1:], (4, 16, 16))))
            return _join(builder, [_call(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", q4, list(p)) for p in parts])
        a, u, s = (builder.bitcast(v, ir.VectorType(I32, 16)) for v in args[1:])
        if isa.isa == "avx512":
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", i32x16.llvm_type, [a, u, s])
        parts = [_halves(builder, v, 16) for v in (a, u, s)]
        half = ir.VectorType(I32, 8)
        lo = _call(builder, "llvm.x86.avx512.vpdpbusd.256", half, [p[0] for p in parts])
        hi = _call(builder, "llvm.x86.avx512.vpdpbusd.256", half, [p[1] for p in parts])
        return _concat(builder, lo, hi)

    return i32x16(isa, acc, unsigned, signed), codegen
