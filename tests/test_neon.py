"""The aarch64 path, run under qemu by scripts/test-arm64 (skipped elsewhere): the ISA the CPU was given, what the
NEON kernels compile to, and greedy decoding of a tiny model matching the host's.

tests/test_kernels.py checks the NEON kernels' numbers (every format against float64) in the same run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lutq.kernels import codebook, fineq, lut, simd, vnni
from lutq.kernels.layout import (pack_bitserial, pack_codebook, pack_codebook3, pack_crumbs, pack_group_params,
                                 pack_group_scales)

on_neon = pytest.mark.skipif(lut.ISA.name != "neon", reason="the NEON kernels run on aarch64 only")


def isa_label(isa: simd.Isa) -> str:
    return isa.name + ("+dot" if isa.dot else "")


@pytest.mark.skipif(not os.environ.get("LUTQ_EXPECT_ISA"), reason="LUTQ_EXPECT_ISA names the ISA this run must get")
def test_the_cpu_gets_the_expected_isa():
    """scripts/test-arm64 says what each emulated CPU must select: neon on the A72, neon+dot on the A76."""
    assert isa_label(lut.ISA) == os.environ["LUTQ_EXPECT_ISA"], (lut.ISA, simd.target_features(), simd.cpu_hwcaps())


def fresh_kernels(isa: simd.Isa) -> dict[str, str]:
    """name -> assembly of each SIMD kernel compiled anew for `isa` (numba cannot show the assembly of cached code):
    one call each on small inputs."""
    from numba import njit

    rng = np.random.default_rng(0)
    m, k, group = 32, 64, 32
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = np.zeros((1, m), np.float32)
    ones = np.ones((m, k // group), np.float32)
    params, scales = pack_group_params(ones, ones), pack_group_scales(ones)
    codes = rng.integers(0, 4, (m, k)).astype(np.uint8)
    tables = lut.Tables(k, group)
    tables.build(x)
    t = (tables.tables, tables.tscales, tables.sums)
    cb = np.linspace(-1, 1, 16).astype(np.float32)
    cb_tables = codebook.CodebookTables(k, group, cb)
    cb_tables.build(x)
    fq_tables = fineq.ClusterTables(k, group)
    fq_tables.build(x)
    fq_codes = rng.integers(0, 256, (1, fq_tables.tables.shape[1], 32)).astype(np.uint8)
    pair_tables = codebook.PairTables(k, group, cb[:8])
    pair_tables.build(x)
    calls = {
        "int2/3/4 (lut._simd_tiles)": (lut._simd_tiles, (pack_bitserial(codes, 2), params, *t, 2, 0, 1, out)),
        "nf3 (codebook._nf3_tiles)": (codebook._nf3_tiles, (pack_codebook3(codes), scales, pair_tables.tables,
                                                            pair_tables.tscales, pair_tables.block_steps, 0, 1, out)),
        "nf4, nf2 (codebook._nf4_tiles)": (codebook._nf4_tiles,
                                      (pack_codebook(codes), scales, cb_tables.tables, cb_tables.tscales, 0, 1, out)),
        "fineq (fineq._fineq_tiles)": (fineq._fineq_tiles,
                                       (fq_codes, scales, fq_tables.tables, fq_tables.tscales, group, 0, 1, out)),
    }
    if isa.dot:
        acts = vnni.Int8Activations(k, group)
        acts.build(x)
        calls["ternary-dot (vnni._vnni_tiles)"] = (vnni._vnni_tiles, (pack_crumbs(codes), params, acts.xq, acts.xscales,
                                                                      acts.sums, 0, 1, out))
    asm = {}
    for name, (kernel, args) in calls.items():
        fresh = njit(kernel.py_func)
        fresh(isa, *args)
        asm[name] = fresh.inspect_asm(fresh.signatures[0])
    return asm


TBL4 = r"\btbl\s+v\d+\.16b,\s*\{\s*v\d+\.16b(?:,\s*v\d+\.16b){3}\s*\}"  # a 64-byte (four-register) table


def count(asm: str, mnemonic: str) -> int:
    return len(re.findall(rf"^\s*{mnemonic}\s", asm, re.MULTILINE))


@on_neon
def test_neon_kernels_compile_to_tbl_and_sdot_only_with_dotprod():
    """Every format's kernel looks its tables up with tbl (fineq's 64-entry table with the four-register tbl); the
    dot-product kernel uses sdot where the CPU has dotprod, and nothing anywhere does without it (an A72 build must
    hold no ARMv8.2 instruction: qemu would stop it with SIGILL anyway)."""
    asm = fresh_kernels(lut.ISA)
    counts = {name: {"tbl": count(a, "tbl"), "tbl4": len(re.findall(TBL4, a)),
                     "sdot": count(a, "sdot"), "udot": count(a, "udot")} for name, a in asm.items()}
    report = os.environ.get("LUTQ_DISASM_REPORT")
    if report:
        Path(report).write_text(json.dumps({"cpu": os.environ.get("NUMBA_CPU_NAME", "host"),
                                            "isa": isa_label(lut.ISA), "counts": counts}, indent=1))
    for name, c in counts.items():
        assert c["tbl"] > 0 or name.startswith("ternary-dot"), (name, c)
    assert counts["fineq (fineq._fineq_tiles)"]["tbl4"] > 0, counts
    if lut.ISA.dot:
        assert counts["ternary-dot (vnni._vnni_tiles)"]["sdot"] > 0, counts
    else:
        assert not any(c["sdot"] or c["udot"] for c in counts.values()), counts


needs_fixture = pytest.mark.skipif("LUTQ_ARM64_FIXTURE" not in os.environ,
                                   reason="scripts/test-arm64 builds the tiny model on the host")


@needs_fixture
def test_every_layer_equals_the_host_to_the_bit():
    """Each packed layer of the tiny model (every format) on the same activations: NEON == the host's x86 kernels."""
    from arm64_fixture import layer_outputs

    want = np.load(Path(os.environ["LUTQ_ARM64_FIXTURE"]) / "expected.npz")
    got = layer_outputs(Path(os.environ["LUTQ_ARM64_FIXTURE"]) / "q")
    assert sorted(got) == sorted(k for k in want.files if k.startswith("layer:"))
    for name, y in got.items():
        np.testing.assert_array_equal(y, want[name], err_msg=name)


@needs_fixture
def test_greedy_decoding_matches_the_host():
    """Greedy decoding of the tiny model (prefill GEMM, then GEMVs): the host's tokens, logits within 5% (int8
    tables amplify the ~1e-7 rounding differences of numpy between architectures; tests/arm64_fixture.py)."""
    from arm64_fixture import greedy

    fixture = Path(os.environ["LUTQ_ARM64_FIXTURE"])
    want = np.load(fixture / "expected.npz")
    tokens, logits = greedy(fixture / "q", [int(i) for i in want["prompt_ids"]], len(want["tokens"]))
    np.testing.assert_array_equal(tokens, want["tokens"])
    assert float(np.abs(logits - want["logits"]).max() / np.abs(want["logits"]).max()) <= 0.05
