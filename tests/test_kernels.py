"""LUT kernels against the float64 references: every format, awkward shapes, both SIMD widths, exact and int8 tables."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lutq.errors import LutqError
from lutq.kernels import codebook, fineq, lut, reference, simd, vnni
from lutq.kernels.layout import (pack_bitserial, pack_codebook, pack_codebook3, pack_codebook_pairs, pack_crumbs,
                                 pack_group_params, pack_group_scales, unpack_bitserial, unpack_codebook,
                                 unpack_codebook3, unpack_codebook_pairs, unpack_crumbs)

HOST = simd.detect_isa(simd.target_features(), simd.ARCH)
# Every SIMD ISA this CPU has (x86: avx2, avx512; aarch64: neon), not only the widest the dispatcher picks.
SIMD_ISAS = [name for name in simd.ISA_ORDER[1:] if simd.ISA_ORDER.index(name) <= simd.ISA_ORDER.index(HOST)]
needs_simd = pytest.mark.skipif(not SIMD_ISAS, reason="no AVX2 or NEON on this CPU")
DOT = simd.has_dot(simd.target_features(), HOST)  # the dot-product instruction (VNNI, dotprod) for every SIMD ISA

INT8_TOL = 0.02  # max |y - y_ref| / max |y_ref| with int8 tables
EXACT_TOL = 1e-5


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def fp16_exact(a):
    """Scales as the quantizers store them: fp16 values, widened to f32."""
    return a.astype(np.float16).astype(np.float32)


def uniform_case(rng, m, k, group, bits, ternary=False):
    if ternary:
        q = rng.integers(0, 3, (m, k)).astype(np.uint8)
        s = fp16_exact(rng.uniform(0.5, 2.0, (m, k // group)))
        return q, s, -s
    q = rng.integers(0, 1 << bits, (m, k)).astype(np.uint8)
    return q, fp16_exact(rng.uniform(0.01, 0.1, (m, k // group))), fp16_exact(rng.uniform(-0.2, 0.2, (m, k // group)))


# ---------------------------------------------------------------------------------------------------------------------
# The SIMD layer


@needs_simd
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_intrinsics_match_numpy(isa):
    from numba import njit

    from lutq.kernels.simd import (Isa, broadcast16_x64, i16_to_f32, load_i8x64, low_nibbles, maddubs, shuffle_bytes,
                                   store_f32x32)

    @njit
    def shuffle_then_madd(w, table, idx, unsigned, out):
        looked = shuffle_bytes(w, broadcast16_x64(table, 0), low_nibbles(load_i8x64(idx, 0)))
        store_f32x32(out, 0, i16_to_f32(maddubs(w, load_i8x64(unsigned, 0), looked)))

    rng = np.random.default_rng(1)
    table = rng.integers(-128, 128, 16).astype(np.int8)
    idx = rng.integers(0, 256, 64).astype(np.uint8)
    unsigned = rng.integers(0, 256, 64).astype(np.uint8)
    out = np.zeros(32, np.float32)
    shuffle_then_madd(Isa(isa), table, idx, unsigned, out)
    pairs = (unsigned.astype(np.int32) * table[idx & 15]).reshape(32, 2).sum(axis=1)
    np.testing.assert_array_equal(out, np.clip(pairs, -32768, 32767))


@needs_simd
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_weigh_pairs_matches_numpy(isa):
    """weigh_pairs(v, a, b): int16 a v[2i] + b v[2i+1]; NEON has its own sequences for the kernels' (1, 2) and
    (1, 1), and shifts and multiplies for any other pair."""
    from numba import njit

    from lutq.kernels.simd import Isa, i16_to_f32, load_i8x64, store_f32x32, weigh_pairs

    @njit
    def weigh(w, v, out):
        x = load_i8x64(v, 0)
        store_f32x32(out, 0, i16_to_f32(weigh_pairs(w, x, 1, 2)))
        store_f32x32(out, 32, i16_to_f32(weigh_pairs(w, x, 1, 0)))
        store_f32x32(out, 64, i16_to_f32(weigh_pairs(w, x, 1, 1)))
        store_f32x32(out, 96, i16_to_f32(weigh_pairs(w, x, 200, 55)))

    v = np.random.default_rng(4).integers(-128, 128, 64).astype(np.int8)
    v[:4] = [-128, -128, 127, 127]
    out = np.zeros(128, np.float32)
    weigh(Isa(isa), v, out)
    pairs = v.astype(np.int32).reshape(32, 2)
    for i, (a, b) in enumerate([(1, 2), (1, 0), (1, 1), (200, 55)]):
        np.testing.assert_array_equal(out[32 * i:32 * (i + 1)], a * pairs[:, 0] + b * pairs[:, 1], err_msg=f"{a, b}")


@needs_simd
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_byte_tables_are_pshufb_and_vpermb(isa):
    """shuffle_bytes keeps pshufb's rule for any index byte (high bit: 0, else the low nibble), also where the
    instruction is NEON's tbl (which zeroes every index >= 16); lookup64 reads T[idx & 63] (vpermb, tbl4, 4 pshufb)."""
    from numba import njit

    from lutq.kernels.simd import (Isa, half, i16_to_f32, load_i8x32, load_i8x64, lookup64, shuffle_bytes,
                                   store_f32x32, widen_i8_i16)

    @njit
    def lookups(w, tables, idx, out):  # out f32[4, 32]: bytes exactly, through int16 and f32
        looked = shuffle_bytes(w, load_i8x64(tables, 0), load_i8x64(idx, 0))
        store_f32x32(out, 0, i16_to_f32(widen_i8_i16(half(looked, 0))))
        store_f32x32(out, 32, i16_to_f32(widen_i8_i16(half(looked, 1))))
        store_f32x32(out, 64, i16_to_f32(widen_i8_i16(lookup64(w, tables, 0, load_i8x32(idx, 0)))))
        small = shuffle_bytes(w, half(load_i8x64(tables, 0), 1), load_i8x32(idx, 32))
        store_f32x32(out, 96, i16_to_f32(widen_i8_i16(small)))

    rng = np.random.default_rng(2)
    tables = rng.integers(-128, 128, 64).astype(np.int8)
    idx = rng.integers(0, 256, 64).astype(np.uint8)
    idx[:8] = [0, 15, 16, 127, 128, 143, 200, 255]  # the bytes where pshufb and tbl differ
    for vbmi in sorted({False, "avx512vbmi" in simd.target_features()}):  # vpermb only where the CPU has it
        out = np.zeros(128, np.float32)
        lookups(Isa(isa, vbmi=vbmi), tables, idx, out)
        out = out.reshape(2, 64)
        lane = np.arange(64) // 16
        np.testing.assert_array_equal(out[0], np.where(idx >= 128, 0, tables[16 * lane + (idx & 15)]))
        np.testing.assert_array_equal(out[1, :32], tables[idx[:32] & 63])
        np.testing.assert_array_equal(out[1, 32:], np.where(idx[32:] >= 128, 0,
                                                                 tables[32 + 16 * lane[:32] + (idx[32:] & 15)]))


@pytest.mark.skipif(not (SIMD_ISAS and DOT), reason="no VNNI or dotprod on this CPU")
@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_dot_product_matches_numpy(isa):
    """dpbusd: int32 lanes += 4 byte products; unsigned bytes below 128 (sdot on NEON reads them as signed)."""
    from numba import njit

    from lutq.kernels.simd import Isa, dpbusd, i32_pair_to_f32, load_i8x64, splat_i32x16, store_f32x32

    @njit
    def dot(w, u, s, out):
        acc = dpbusd(w, splat_i32x16(1000), load_i8x64(u, 0), load_i8x64(s, 0))
        store_f32x32(out, 0, i32_pair_to_f32(acc, splat_i32x16(0)))

    rng = np.random.default_rng(3)
    u = rng.integers(0, 128, 64).astype(np.uint8)
    s = rng.integers(-128, 128, 64).astype(np.int8)
    out = np.zeros(32, np.float32)
    dot(Isa(isa, dot=True), u, s, out)
    np.testing.assert_array_equal(out[:16], 1000 + (u.astype(np.int32) * s).reshape(16, 4).sum(axis=1))


def test_isa_override_never_raises_above_the_host(monkeypatch):
    monkeypatch.setenv("LUTQ_ISA", "portable")
    assert simd.host_isa() == "portable"
    monkeypatch.setenv("LUTQ_ISA", "sse9")
    with pytest.raises(LutqError):
        simd.host_isa()
    if HOST != "avx512":
        monkeypatch.setenv("LUTQ_ISA", "avx512")
        with pytest.raises(LutqError):
            simd.host_isa()


def test_detect_isa_needs_every_feature():
    assert simd.detect_isa({"avx2", "fma", "f16c"}) == "avx2"
    assert simd.detect_isa({"avx2", "fma"}) == "portable"
    assert simd.detect_isa({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}) == "avx512"
    assert simd.detect_isa({"neon"}, "aarch64") == "neon" and simd.detect_isa(set(), "aarch64") == "portable"
    assert simd.detect_isa({"avx2", "fma", "f16c"}, "aarch64") == "portable"
    assert simd.has_dot({"neon", "dotprod"}, "neon") and not simd.has_dot({"neon"}, "neon")
    assert simd.target_arch("aarch64-unknown-linux-gnu") == simd.target_arch("arm64-apple-darwin") == "aarch64"
    assert simd.target_arch("x86_64-unknown-linux-gnu") == "x86_64"


# ---------------------------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bitserial_round_trip(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (45, 24)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_bitserial(pack_bitserial(q, bits), bits, 45, 24), q)


def test_group_params_pad_rows_with_zeros():
    s = np.arange(1, 41, dtype=np.float32).reshape(40, 1)
    p = pack_group_params(s, -s).view(np.float16)
    assert p.shape == (2, 1, 2, 32)
    assert p[1, 0, 0, 7] == 40 and p[1, 0, 1, 7] == -40 and not p[1, 0, :, 8:].any()


# ---------------------------------------------------------------------------------------------------------------------
# Uniform formats and ternary


SHAPES = [(77, 576, 64), (100, 1536, 128), (45, 2048, 32), (33, 5632, 128)]


@pytest.mark.parametrize("m,k,group", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, "ternary"])
def test_bitserial_gemv(m, k, group, bits):
    ternary = bits == "ternary"
    bits = 2 if ternary else bits
    rng = np.random.default_rng(m * k + bits)
    q, s, z = uniform_case(rng, m, k, group, bits, ternary)
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = reference.matmul(reference.dequantize_uniform(q, s, z), x)
    packed, params = pack_bitserial(q, bits), pack_group_params(s, z)
    for exact, tol in ((True, EXACT_TOL), (False, INT8_TOL)):
        tables = lut.Tables(k, group, tokens=3, exact=exact)
        tables.build(x)
        for threads in (1, 2):
            out = np.full((3, m), np.nan, np.float32)
            lut.gemv_bitserial(packed, params, bits, tables, out, threads=threads)
            assert rel_err(out, ref) <= tol, (exact, threads)
    for isa in SIMD_ISAS:  # every SIMD width this CPU has, not only the widest the dispatcher picks
        out = np.full((3, m), np.nan, np.float32)
        lut._simd_tiles(simd.Isa(isa), packed, params, tables.tables, tables.tscales, tables.sums, bits, 0,
                        packed.shape[0], out)
        assert rel_err(out, ref) <= INT8_TOL, isa
    out = np.full((3, m), np.nan, np.float32)  # the portable path: int8 tables, plain loops
    lut._plain_tiles(packed, params, tables.tables, tables.tscales, tables.sums, bits, 0, packed.shape[0], out)
    assert rel_err(out, ref) <= INT8_TOL


@pytest.mark.parametrize("k, group", [(576, 64), (1536, 32), (64, 64)])
def test_int8_tables_are_the_rounded_float64_tables(k, group):
    """The vectorised f32 table build against float64 math: T[j] = sum_k (bit k of j ? x_k : -x_k), scaled so a
    group's largest possible entry (sum |x_k|) is 127, rounded. f32 may round a tie the other way: off by at most 1,
    rarely; the mirror T[15 - j] = -T[j] holds exactly; scales and sums to f32 precision."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, k)) * rng.uniform(1e-3, 1e3, (3, 1))).astype(np.float32)
    x[2, :group] = 0.0  # an all-zero group: zero tables, zero scale
    tables = lut.Tables(k, group, tokens=3)
    tables.build(x)
    quads = x.astype(np.float64).reshape(3, k // 4, 4)
    signs = np.array([[1.0 if (j >> b) & 1 else -1.0 for b in range(4)] for j in range(16)])
    exact = quads @ signs.T  # [3, K/4, 16]
    peak = np.abs(quads).sum(-1).reshape(3, k // group, group // 4).max(-1)  # [3, K/G]
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    want = np.rint(exact * np.repeat(scale, group // 4, axis=1)[..., None])
    diff = np.abs(tables.tables - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(tables.tables[..., ::-1], -tables.tables)
    np.testing.assert_allclose(tables.tscales, peak / 127.0, rtol=1e-6)
    np.testing.assert_allclose(tables.sums, x.astype(np.float64).reshape(3, k // group, group).sum(-1),
                               rtol=1e-5, atol=1e-5 * np.abs(x).max())
    assert not tables.tables[2, : group // 4].any() and tables.tscales[2, 0] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_bound_call_reruns_with_new_tables(threads):
    """bind=True returns the compiled kernel bound to the weights and table buffers: rebuilding the tables from a new
    input and calling it again gives what a fresh checked call gives (the decode step's fast path)."""
    rng = np.random.default_rng(11)
    m, k, group = 1000, 576, 64  # 576k weights: above PARALLEL_MIN_WEIGHTS, so 2 threads take the parallel kernel
    q, s, z = uniform_case(rng, m, k, group, 4)
    packed, params = pack_bitserial(q, 4), pack_group_params(s, z)
    tables = lut.Tables(k, group)
    tables.build(rng.standard_normal((1, k)).astype(np.float32))
    first = np.empty((1, m), np.float32)
    call = lut.gemv_bitserial(packed, params, 4, tables, first, threads=threads, bind=True)
    for _ in range(3):
        x = rng.standard_normal((1, k)).astype(np.float32)
        tables.build(x)
        want, got = np.empty((1, m), np.float32), np.full((1, m), np.nan, np.float32)
        lut.gemv_bitserial(packed, params, 4, tables, want, threads=threads)
        call(got)
        np.testing.assert_array_equal(got, want)
        assert rel_err(got, reference.matmul(reference.dequantize_uniform(q, s, z), x)) <= INT8_TOL


def test_unsupported_shapes_are_refused():
    with pytest.raises(LutqError, match="unsupported shape"):
        lut.Tables(100, 32)
    with pytest.raises(LutqError, match="unsupported shape"):
        lut.Tables(576, 96 * 4)
    tables = lut.Tables(64, 32)
    q = np.zeros((40, 64), np.uint8)
    ones = np.ones((40, 2), np.float32)
    packed, params = pack_bitserial(q, 2), pack_group_params(ones, 0 * ones)
    with pytest.raises(LutqError, match="output"):
        lut.gemv_bitserial(packed, params, 2, tables, np.zeros((1, 65), np.float32))
    with pytest.raises(LutqError, match="bitserial layout of 3 bits"):
        lut.gemv_bitserial(packed, params, 3, tables, np.zeros((1, 40), np.float32))
    with pytest.raises(LutqError, match="do not match tables"):
        lut.gemv_bitserial(packed, params, 2, lut.Tables(128, 32), np.zeros((1, 40), np.float32))
    with pytest.raises(LutqError, match="activations"):
        tables.build(np.zeros((1, 64), np.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Ternary on the int8 dot-product (VNNI) kernel


def test_crumbs_round_trip():
    q = np.random.default_rng(5).integers(0, 4, (45, 48)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_crumbs(pack_crumbs(q), 45, 48), q)


@pytest.mark.skipif(not vnni.available(), reason="no VNNI or dotprod on this CPU")
@pytest.mark.parametrize("m,k,group", SHAPES)
def test_vnni_gemv(m, k, group):
    rng = np.random.default_rng(m + k)
    q, s, z = uniform_case(rng, m, k, group, 2, ternary=True)
    x = rng.standard_normal((2, k)).astype(np.float32)
    ref = reference.matmul(reference.dequantize_uniform(q, s, z), x)
    packed, params = pack_crumbs(q), pack_group_params(s, z)
    acts = vnni.Int8Activations(k, group, tokens=2)
    acts.build(x)
    for threads in (1, 2):
        out = np.full((2, m), np.nan, np.float32)
        vnni.gemv_crumbs(packed, params, acts, out, threads=threads)
        assert rel_err(out, ref) <= INT8_TOL
    for isa in SIMD_ISAS:
        out = np.full((2, m), np.nan, np.float32)
        vnni._vnni_tiles(simd.Isa(isa, dot=True), packed, params, acts.xq, acts.xscales, acts.sums, 0, packed.shape[0],
                         out)
        assert rel_err(out, ref) <= INT8_TOL, isa


# ---------------------------------------------------------------------------------------------------------------------
# Codebook formats (nf2 on pair nibbles, nf3 on codebook3 codes, nf4 on nibble codes)

NF = {
    2: np.array([-1, 0, 0.3379, 1], np.float32),
    3: np.array([-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1], np.float32),
    4: np.array([-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
                 0.5626, 0.7230, 1], np.float32),
}


def test_codebook_round_trip():
    q = np.random.default_rng(6).integers(0, 16, (45, 48)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_codebook(pack_codebook(q), 45, 48), q)
    np.testing.assert_array_equal(unpack_codebook_pairs(pack_codebook_pairs(q & 3), 45, 48), q & 3)
    np.testing.assert_array_equal(unpack_codebook3(pack_codebook3(q & 7), 45, 48), q & 7)


def test_codebook3_layout_by_hand():
    """The documented places (layout.py): code 5 of row 3, column 16 + 13 (the fourth register's column 12 + 2h + j
    with h = 0, j = 1) lives in the spare bit 3 of the low nibbles of byte 2*3 + 1 of registers 0 and 2 (5 = 0b101);
    code 6 of column 16 + 6 (register 1, h = 1, j = 0) in the high nibble of byte 2*3 of register 1."""
    q = np.zeros((32, 32), np.uint8)
    q[3, 29], q[3, 22] = 5, 6
    packed = pack_codebook3(q)
    expected = np.zeros((1, 2, 3, 64), np.uint8)
    expected[0, 1, 0, 7] = expected[0, 1, 2, 7] = 0x08
    expected[0, 1, 1, 6] = 0x60
    np.testing.assert_array_equal(packed, expected)


@pytest.mark.parametrize("m,k,group", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_gemv(m, k, group, bits):
    rng = np.random.default_rng(m * k + 7 * bits + 1)
    cb = NF[bits]
    q = rng.integers(0, 1 << bits, (m, k)).astype(np.uint8)
    s = fp16_exact(rng.uniform(0.01, 0.1, (m, k // group)))
    x = rng.standard_normal((2, k)).astype(np.float32)
    ref = reference.matmul(reference.dequantize_codebook(q, s, cb), x)
    scales = pack_group_scales(s)
    packed = {2: pack_codebook_pairs, 3: pack_codebook3, 4: pack_codebook}[bits](q)
    for exact, tol in ((True, EXACT_TOL), (False, INT8_TOL)):
        for threads in (1, 2):
            out = np.full((2, m), np.nan, np.float32)
            if bits == 3:
                tables = codebook.PairTables(k, group, cb, tokens=2, exact=exact)
                tables.build(x)
                codebook.gemv_nf3(packed, scales, tables, out, threads=threads)
            else:
                tables = codebook.CodebookTables(k, group, cb, tokens=2, exact=exact)
                tables.build(x)
                codebook.gemv_nf4(packed, scales, tables, out, threads=threads)
            assert rel_err(out, ref) <= tol, (exact, threads)
    for isa in SIMD_ISAS:
        out = np.full((2, m), np.nan, np.float32)
        if bits == 3:
            codebook._nf3_tiles(simd.Isa(isa), packed, scales, tables.tables, tables.tscales, tables.block_steps, 0,
                               packed.shape[0], out)
        else:
            codebook._nf4_tiles(simd.Isa(isa), packed, scales, tables.tables, tables.tscales, 0, packed.shape[0], out)
        assert rel_err(out, ref) <= INT8_TOL, isa


def test_nf3_gemv_with_massive_channels():
    """Activations with one massive channel per group (as SmolLM2's hidden states have): the quiet blocks keep their
    own table steps, so the product stays within 2% rms of float64 (one int8 step per group gave 2.7% here)."""
    m, k, group = 256, 1536, 64
    rng = np.random.default_rng(1)
    q = rng.integers(0, 8, (m, k)).astype(np.uint8)
    s = fp16_exact(rng.uniform(0.01, 0.1, (m, k // group)))
    x = rng.standard_normal((2, k)).astype(np.float32)
    x[:, 5::group] *= 20.0
    ref = reference.matmul(reference.dequantize_codebook(q, s, NF[3]), x)
    tables = codebook.PairTables(k, group, NF[3], tokens=2)
    tables.build(x)
    out = np.zeros((2, m), np.float32)
    codebook.gemv_nf3(pack_codebook3(q), pack_group_scales(s), tables, out, threads=1)
    assert np.sqrt(((out - ref) ** 2).mean() / (ref**2).mean()) < 0.02


# ---------------------------------------------------------------------------------------------------------------------
# fineq: clusters of 3 weights in one byte; codes from the quantizer itself (it owns the byte -> value map)


@pytest.mark.parametrize("m,k,group", SHAPES + [(40, 160, 32)])  # K = 160: the last cluster is padded
def test_fineq_gemv(m, k, group):
    from lutq.quantize.fineq import FineQFormat

    rng = np.random.default_rng(m * k + 11)
    fmt = FineQFormat()
    p = fmt.quantize(rng.standard_normal((m, k)).astype(np.float32), group)
    x = rng.standard_normal((2, k)).astype(np.float32)
    ref = reference.matmul(fmt.dequantize(p).astype(np.float64), x)
    packed = np.asarray(p.arrays["codes"])
    scales = pack_group_scales(np.asarray(p.arrays["scales"], np.float32))
    for exact, tol in ((True, EXACT_TOL), (False, INT8_TOL)):
        tables = fineq.ClusterTables(k, group, tokens=2, exact=exact)
        tables.build(x)
        for threads in (1, 2):
            out = np.full((2, m), np.nan, np.float32)
            fineq.gemv_fineq(packed, scales, tables, out, threads=threads)
            assert rel_err(out, ref) <= tol, (exact, threads)
    for isa in SIMD_ISAS:  # AVX-512 without VBMI: int16 tables, word permutes (fineq.word_tables)
        tables = fineq.ClusterTables(k, group, tokens=2, isa=simd.Isa(isa))
        tables.build(x)
        assert tables.tables.dtype == (np.int16 if isa == "avx512" else np.int8)
        out = np.full((2, m), np.nan, np.float32)
        fineq._fineq_tiles(simd.Isa(isa), packed, scales, tables.tables, tables.tscales, group, 0, packed.shape[0], out)
        assert rel_err(out, ref) <= INT8_TOL, isa


def test_fineq_tables_decode_every_byte_as_the_quantizer_does():
    """The kernel's tables decode each stored byte to the values of the cluster byte it stores."""
    from lutq.quantize.fineq import CLUSTER_VALUES, stored_bytes

    every = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(fineq.byte_values()[stored_bytes(every)], CLUSTER_VALUES)


def float64_tables(kind, x, group, cb):
    """(entries f64[N, tables, 16] in the builder's storage order, table index -> scale block, blocks per group) of
    the nf and fineq tables, straight from their definitions."""
    n, k = x.shape
    x = x.astype(np.float64)
    cb = cb.astype(np.float64)
    e = np.arange(16)
    if kind == "nf4":  # virtual column 4j + c at slot (0, 2, 1, 3)[c]
        entries = (x[..., None] * cb).reshape(n, k // 4, 4, 16)[:, :, [0, 2, 1, 3]].reshape(n, k, 16)
        return entries, np.arange(k) // group, 1
    if kind == "nf2":
        pairs = x.reshape(n, k // 2, 2)
        entries = pairs[..., :1] * cb[e & 3] + pairs[..., 1:] * cb[e >> 2]
        entries = entries.reshape(n, k // 8, 4, 16)[:, :, [0, 2, 1, 3]].reshape(n, k // 2, 16)
        return entries, np.arange(k // 2) // (group // 2), 1
    if kind == "nf3":
        pairs = x.reshape(n, k // 2, 2)
        return pairs[..., e // 8] * cb[e & 7], np.arange(k // 2) // (group // 2), 1
    n_clusters = -(-k // 3)
    xs = np.zeros((n, 3 * n_clusters))
    xs[:, :k] = x
    x0, x1, x2 = (xs[:, i::3, None] for i in range(3))
    lo4, hi4, lo8, hi8, b = (a.astype(np.float64) for a in (fineq.LO4, fineq.HI4, fineq.LO8, fineq.HI8,
                                                              fineq.B_LEVELS))
    entries = np.stack([lo4 * x0 + hi4 * x1, lo8 * x1 + hi8 * x2, lo8 * x0 + hi8 * x2, lo8 * x0 + hi8 * x1,
                        b * np.where(e & 3 != 3, x2, x1)], axis=2).reshape(n, 5 * n_clusters, 16)
    blocks = fineq.ClusterTables(k, group).tscales.shape[2]
    c = np.arange(n_clusters)
    g = 3 * c // group  # cluster c belongs to the group of its first weight
    block = g * blocks + (c - -(-g * group // 3)) // fineq.BLOCK
    return entries, np.repeat(block, 5), blocks


@pytest.mark.parametrize("kind", ["nf4", "nf2", "fineq"])
@pytest.mark.parametrize("k, group", [(576, 64), (1536, 32), (160, 32)])
def test_nf_and_fineq_int8_tables_are_the_rounded_float64_tables(kind, k, group):
    """The vectorised f32 builds (closed-form peaks, 16 entries per expression) against float64 math: each scale
    block's largest |entry| at 127, rounded; f32 may round a tie the other way (off by at most one step, rarely);
    scales equal to the float64 peak / 127 to f32 precision. Codebooks shifted off symmetry, so the peak's closed
    form sees unequal ends."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((3, k)) * rng.uniform(1e-3, 1e3, (3, 1))).astype(np.float32)
    x[2, :group] = 0.0  # an all-zero group: zero tables, zero scale
    cb = {"nf4": NF[4], "nf2": NF[2]}.get(kind, np.zeros(1)) * np.float32(0.7) + np.float32(0.2)
    if kind == "fineq":
        tables = fineq.ClusterTables(k, group, tokens=3)
    else:
        tables = codebook.CodebookTables(k, group, cb, tokens=3)
    tables.build(x)
    entries, block, blocks = float64_tables(kind, x, group, cb)
    got = tables.tables.reshape(entries.shape)
    peak = np.zeros((3, (k // group) * blocks))
    np.maximum.at(peak, (slice(None), block), np.abs(entries).max(-1))
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    want = np.rint(entries * scale[:, block, None])
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(tables.tscales.reshape(peak.shape), peak / 127.0, rtol=1e-6)
    assert not got[2, block == 0].any() and tables.tscales.reshape(peak.shape)[2, 0] == 0


@pytest.mark.parametrize("k, group", [(576, 64), (1536, 32), (160, 32), (256, 128), (512, 256)])
def test_nf3_int8_tables_step_per_block_of_16(k, group):
    """nf3's pair tables against float64 math: each 16-column block's entries in steps of u m, u = P / (127 M) (P: the
    group's largest |entry|), m = ceil(M p / P) the least in [1, M] that keeps the block's largest |entry| p within
    127 steps, M per token and group the most with M (127 S / P + G / 2) <= 32000 (S: the sum of the group's
    columns' largest |entry|), at least 1; and whatever the codes, no row's int16 sum can overflow. Planted massive
    channels make groups with a large M and quiet blocks with small steps. f32 may round a tie the other way (off by
    one step, rarely)."""
    rng = np.random.default_rng(17)
    x = (rng.standard_normal((3, k)) * rng.uniform(1e-3, 1e3, (3, 1))).astype(np.float32)
    x[0, 5::group] *= 50.0  # a massive channel in every group of token 0, every other group of token 1
    x[1, 5::2 * group] *= 50.0
    x[2, :group] = 0.0  # an all-zero group: zero tables, zero scale
    cb = NF[3] * np.float32(0.7) + np.float32(0.2)
    tables = codebook.PairTables(k, group, cb, tokens=3)
    tables.build(x)
    a = np.abs(x.astype(np.float64)) * np.abs(cb.astype(np.float64)).max()  # each column's largest |entry|
    by_group = a.reshape(3, k // group, group)
    peak = by_group.max(-1)
    per_step = 127.0 * np.divide(by_group.sum(-1), peak, out=np.zeros_like(peak), where=peak > 0) + group // 2
    most = np.where(peak > 0, np.maximum(1, np.floor(32000.0 / per_step)), 1).astype(int)  # M [3, K/G]
    assert most[2, 0] == 1 and most.max() >= 30  # the zero group; a massive channel's
    group_peak = np.repeat(peak, group // 16, axis=1)  # [3, K/16]
    block_most = np.repeat(most, group // 16, axis=1)
    block_peak = a.reshape(3, k // 16, 16).max(-1)
    ratio = np.divide(block_peak * block_most, group_peak, out=np.zeros_like(block_peak), where=group_peak > 0)
    steps = np.clip(np.ceil(ratio), 1, block_most).astype(int)
    np.testing.assert_array_equal(tables.block_steps, steps)
    assert (block_most >= 16 * steps).any()  # quiet blocks beside a massive channel: steps 16x finer or more
    u = group_peak / (127.0 * block_most)
    np.testing.assert_allclose(tables.tscales, u[:, :: group // 16], rtol=1e-6)
    step = np.repeat(u * steps, 8, axis=1)  # per pair
    entries, _, _ = float64_tables("nf3", x, group, cb)  # [3, K/2, 16]
    want = np.rint(np.divide(entries, step[..., None], out=np.zeros_like(entries), where=step[..., None] > 0))
    got = tables.tables.astype(np.float64)
    assert np.abs(want).max() <= 127
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert not got[2, : group // 2].any() and tables.tscales[2, 0] == 0
    # the largest |sum| codes can make: each column's largest |entry| (a pair table holds both columns' 8) x its step
    column_max = np.abs(got).reshape(3, k // 2, 2, 8).max(-1).reshape(3, k // 16, 16).sum(-1) * tables.block_steps
    assert column_max.reshape(3, k // group, group // 16).sum(-1).max() <= 32767


# ---------------------------------------------------------------------------------------------------------------------
# Caching: a second process loads every kernel from numba's on-disk cache


def test_second_run_compiles_nothing():
    code = "from lutq.kernels import bench; bench.first_calls(); print(bench.compiled_signatures())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
            for _ in range(2)]
    assert runs[1].stdout.split()[-1] == "0", runs[1].stdout + runs[1].stderr


def test_bench_kernels_json():
    import json

    run = subprocess.run([sys.executable, "-m", "lutq", "bench", "kernels", "--shapes", "64x128", "--formats",
                          "int2,nf3,fineq", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = json.loads(run.stdout)
    assert [r["format"] for r in records] == ["int2", "nf3", "fineq"]
    for r in records:
        assert {"m", "k", "format", "bits", "threads", "us", "gbps", "speedup_vs_numpy", "speedup_vs_dequant"} <= set(r)
        assert (r["m"], r["k"], r["threads"]) == (64, 128, 1) and r["us"] > 0
