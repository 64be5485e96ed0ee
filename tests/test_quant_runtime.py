"""The quantized runtime: every format's LUT-kernel model against the same weights dequantized to fp32, and BitNet
ternary checkpoints through quantize, load and the LUT kernels."""

from __future__ import annotations

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.kernels.layout import LAYOUT_VERSION, pack_bitserial
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.packed import PackedTensor
from lutq.quantize.registry import dequantize, get_format
from lutq.quantize.rules import parse_rules
from lutq.runtime.linear import DenseLinear
from lutq.runtime.model import load_model
from lutq.runtime.quant_linear import FusedLinear, QuantLinear, TablePool

FORMATS = ["int2", "int3", "int4", "int4k", "nf2", "nf3", "nf4", "nf3k", "ternary", "ternary-group", "fineq"]


def quantized(src, out, rules: str, group: int = 32):
    with open_checkpoint(src) as ckpt:
        quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(rules), group))
    return open_checkpoint(out)


def parts_of(layer) -> list:
    """The kernel layers behind a fused projection (one QuantLinear when q/k/v stack into a single call)."""
    return layer.parts if isinstance(layer, FusedLinear) else [layer]


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_written_in_the_old_bitserial_layout_still_runs(bits):
    """nf2, nf3 and nf4 were stored bitserial before they got their own layouts: such a tensor still passes the
    loader's array check, dequantizes to the same weights and runs to the same output as the new layout."""
    fmt = get_format(f"nf{bits}")
    rng = np.random.default_rng(bits)
    new = fmt.quantize(rng.standard_normal((70, 192)).astype(np.float32), 64)
    old = PackedTensor({**new.arrays, "codes": pack_bitserial(fmt.codes(new), bits)},
                       {**new.meta, "layout": "bitserial", "layout_version": LAYOUT_VERSION})
    assert new.meta["layout"] == {2: "codebook2", 3: "codebook3", 4: "codebook"}[bits]
    assert {n: (a.dtype, a.shape) for n, a in old.arrays.items()} == fmt.stored_arrays(old.meta)
    np.testing.assert_array_equal(dequantize(old), dequantize(new))
    x = rng.standard_normal((3, 192)).astype(np.float32)
    pool = TablePool()
    np.testing.assert_array_equal(QuantLinear(old, None, pool)(x), QuantLinear(new, None, pool)(x))


def test_fineq_written_in_layout_1_still_runs():
    """fineq stored its cluster bytes unswapped before layout 2: such a tensor passes the loader's array check,
    dequantizes to the same weights and runs to the same output (its bytes re-ordered at load)."""
    from lutq.quantize import fineq

    fmt = get_format("fineq")
    rng = np.random.default_rng(3)
    new = fmt.quantize(rng.standard_normal((70, 192)).astype(np.float32), 64)
    old = PackedTensor({**new.arrays, "codes": np.ascontiguousarray(fineq.stored_bytes(new.arrays["codes"]))},
                       {**new.meta, "layout_version": 1})
    assert new.meta["layout_version"] == 2 and not np.array_equal(old.arrays["codes"], new.arrays["codes"])
    assert {n: (a.dtype, a.shape) for n, a in old.arrays.items()} == fmt.stored_arrays(old.meta)
    np.testing.assert_array_equal(dequantize(old), dequantize(new))
    x = rng.standard_normal((3, 192)).astype(np.float32)
    pool = TablePool()
    np.testing.assert_array_equal(QuantLinear(old, None, pool)(x), QuantLinear(new, None, pool)(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_lut_model_matches_dequantized_model(tiny_models, tmp_path, fmt):
    src, model = tiny_models("llama")
    ckpt = quantized(src, tmp_path / fmt, f"{fmt},lm_head=int4")
    lut_net, ref_net = load_model(ckpt, 64), load_model(ckpt, 64, kernels=False)
    assert isinstance(ref_net.layers[0].qkv_proj, DenseLinear)
    assert all(isinstance(p, QuantLinear) for p in parts_of(lut_net.layers[0].qkv_proj))
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, 40)
    ref = ref_net.forward(ids, all_logits=True)
    # prefill (GEMM) and decode (GEMV) both against the fp32 reference. Each kernel is within 2% (int8 tables,
    # tests/test_kernels.py); through 2 layers of 4 products and lm_head the logits stay within 6%. (nf4's decode
    # measured 0.042 to 0.051 as a single table entry of the prefill, a float64 tie at -84.5, rounded either way.)
    assert rel_err(lut_net.forward(ids[:30], all_logits=True), ref[:30]) <= 0.06
    steps = np.stack([lut_net.forward(ids[i : i + 1]) for i in range(30, 40)])
    assert rel_err(steps, ref[30:]) <= 0.06


def test_q_k_v_share_one_table_build(tiny_models, tmp_path, monkeypatch):
    src, _ = tiny_models("llama")
    net = load_model(quantized(src, tmp_path / "q", "int4"), 16)
    builds = []
    pool = parts_of(net.layers[0].qkv_proj)[0].pool
    real = type(pool.get(("pm", 64, 32), 1)).build
    monkeypatch.setattr(type(pool.get(("pm", 64, 32), 1)), "build",
                        lambda self, x: (builds.append(1), real(self, x)))
    net.layers[0].qkv_proj(np.ones((1, 64), np.float32))
    assert len(builds) == 1  # three layers, one table set


def test_bitnet_ternary_stays_exact_and_runs_on_the_kernels(tmp_path):
    torch = pytest.importorskip("torch")
    from tiny import make_bitnet_model

    model = make_bitnet_model(tmp_path / "bitnet")
    ckpt = quantized(tmp_path / "bitnet", tmp_path / "q", "ternary")
    src = open_checkpoint(tmp_path / "bitnet")
    for t in src.tensors():
        if t.name.endswith("proj.weight"):
            assert np.array_equal(ckpt.load(t.name), src.load(t.name)), t.name  # ternary kept bit for bit
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, 24)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].double().numpy()
    assert rel_err(load_model(ckpt, 32).forward(ids, all_logits=True), ref) <= 0.05


MIXED_RULES = {  # every kind of decode call: each table kind, stacked and split q/k/v, BLAS parts, epilogues
    "llama": "int4,*.k_proj=nf4,*.v_proj=ternary,*.o_proj=fineq,*.up_proj=int8,lm_head=int6k",
    "qwen2-bias": "int3,*.q_proj=nf3,*.gate_proj=int8,*.down_proj=int2k,lm_head=fp16",  # q/k/v biases
    "llama-tied": "int4k,lm_head=fp16",  # the tied head: the fp32 embedding through BLAS
}


@pytest.mark.parametrize("variant", sorted(MIXED_RULES))
def test_recorded_decode_step_is_the_forward_pass(tiny_models, tmp_path, variant):
    """A single-token forward runs the recorded step (lutq/runtime/decode_step.py); forward(..., all_logits=True) runs
    the same token through the plain forward pass. Both must agree, token after token, on fresh and reset caches."""
    src, model = tiny_models(variant)
    ckpt = quantized(src, tmp_path / "q", MIXED_RULES[variant])
    stepped, plain = load_model(ckpt, 64), load_model(ckpt, 64)
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, 30)
    for round_ in range(2):  # the second round after reset(): the recorded step is reused
        stepped.reset()
        plain.reset()
        stepped.forward(ids[:6])
        plain.forward(ids[:6])
        for tok in ids[6:]:
            got, ref = stepped.forward(np.array([tok])), plain.forward(np.array([tok]), all_logits=True)[0]
            assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
            assert stepped.pos == plain.pos
    assert stepped.step is not None and plain.step is None
    assert not np.shares_memory(stepped.forward(ids[:1]), stepped.step.logits)  # a copy: the buffer is reused


def test_recorded_bitnet_decode_step_is_the_forward_pass(tmp_path):
    pytest.importorskip("torch")
    from tiny import make_bitnet_model

    model = make_bitnet_model(tmp_path / "bitnet")
    ckpt = quantized(tmp_path / "bitnet", tmp_path / "q", "ternary,lm_head=int4")
    stepped, plain = load_model(ckpt, 32), load_model(ckpt, 32)
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, 20)
    stepped.forward(ids[:4])
    plain.forward(ids[:4])
    for tok in ids[4:]:
        got, ref = stepped.forward(np.array([tok])), plain.forward(np.array([tok]), all_logits=True)[0]
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert stepped.step is not None


def test_one_recorded_step_per_thread_count(tiny_models, tmp_path):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    src, _ = tiny_models("llama")
    net = load_model(quantized(src, tmp_path / "q", "int4"), 32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = net.forward(np.array([3]))
        first = net.step
        numba.set_num_threads(2)
        net.reset()
        assert np.array_equal(net.forward(np.array([3])), one)  # tiny layers stay serial: the same numbers
        assert net.step is not first and net.step.threads == 2
        numba.set_num_threads(1)
        net.forward(np.array([4]))
        assert net.step is first  # recorded once per thread count, reused
    finally:
        numba.set_num_threads(before)
