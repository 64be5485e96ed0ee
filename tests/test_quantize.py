"""The formats: round trips with error bounds, scale search against plain rounding, exactness where promised, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lutq.kernels.layout import unpack_bitserial
from lutq.quantize import FORMATS, dequantize, get_format
from lutq.quantize import fineq
from lutq.quantize.nf import normal_float_codebook

LINEAR_FORMATS = ["int2", "int3", "int4", "int6", "int2k", "int3k", "int4k", "int6k", "nf2", "nf3", "nf4", "nf2k", "nf3k", "nf4k", "ternary", "ternary-group", "fineq", "int8"]

# Upper bounds on the relative squared error ||W - W_hat||^2 / ||W||^2 with the scale search on, G = 64
# (measured values are 10-15% below these).
BOUNDS = {
    "gauss": {"int2": 0.12, "int3": 0.032, "int4": 0.008, "int2k": 0.12, "int3k": 0.032, "int4k": 0.008,
              "int6": 6e-4, "int6k": 6e-4, "nf2": 0.165, "nf3": 0.036, "nf4": 0.008, "nf2k": 0.165, "nf3k": 0.036, "nf4k": 0.008, "ternary": 0.22,
              "ternary-group": 0.21, "fineq": 0.066, "int8": 4e-5},
    "heavy": {"int2": 0.18, "int3": 0.064, "int4": 0.0185, "int2k": 0.18, "int3k": 0.064, "int4k": 0.0185,
              "int6": 1.5e-3, "int6k": 1.5e-3, "nf2": 0.215, "nf3": 0.066, "nf4": 0.019, "nf2k": 0.215, "nf3k": 0.066, "nf4k": 0.019, "ternary": 0.6,
              "ternary-group": 0.28, "fineq": 0.16, "int8": 2e-4},
}


def gaussian(m=256, k=384, seed=0):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32) * 0.02


def heavy_tailed(m=256, k=384, seed=0):
    """Student-t (3 degrees of freedom) with 0.5% of weights planted as 10x outliers, like LLM weight rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (m, k))
    planted = rng.random((m, k)) < 0.005
    w[planted] *= 10
    return (w * 0.02).astype(np.float32)


DATA = {"gauss": gaussian(), "heavy": heavy_tailed()}


def rel_mse(name, w, group_size=64, refine=True):
    p = get_format(name).quantize(w, group_size, refine)
    w_hat = dequantize(p)
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    return float(np.sum((w_hat.astype(np.float64) - w) ** 2) / np.sum(w.astype(np.float64) ** 2))


def test_registry_holds_every_format():
    assert sorted(FORMATS) == sorted(LINEAR_FORMATS)


@pytest.mark.parametrize("data", ["gauss", "heavy"])
@pytest.mark.parametrize("name", LINEAR_FORMATS)
def test_round_trip_error_bound_and_refine_beats_plain(name, data):
    w = DATA[data]
    refined, plain = rel_mse(name, w), rel_mse(name, w, refine=False)
    assert refined < BOUNDS[data][name]
    assert refined < plain


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("name", LINEAR_FORMATS)
def test_group_sizes_and_metadata(name, group_size):
    w = gaussian(64, 576)  # SmolLM2's K: 576 = 4.5 x 128 is refused only for G = 128
    if 576 % group_size:
        with pytest.raises(ValueError, match="multiple of the group size"):
            get_format(name).quantize(w, group_size)
        return
    p = get_format(name).quantize(w, group_size)
    assert p.format == name and p.shape == (64, 576) and p.group_size == group_size
    params = "scale_codes" if name.endswith("k") else "scales"
    assert p.arrays[params].shape == (64, 576 // group_size)
    code_type = np.int8 if name.startswith("nf") else np.uint8  # nf scales can be negative
    assert p.arrays[params].dtype == (code_type if name.endswith("k") else np.float16)
    assert abs(p.bits_per_weight - get_format(name).nominal_bits(group_size)) < 0.02
    assert p.nbytes == get_format(name).stored_bytes(64, 576, group_size)


def test_smaller_groups_are_more_accurate():
    for name in ("int3", "nf3", "fineq"):
        errs = [rel_mse(name, DATA["heavy"][:, :256], g) for g in (32, 64, 128)]
        assert errs[0] < errs[1] < errs[2], name


@pytest.mark.parametrize("bits", [3, 4])
def test_nf_beats_int_at_equal_bits_per_weight_on_gaussian(bits):
    # nf spends 16 bits per group (a scale), int 32 (scale and bias): nf with G = 32 costs what int with G = 64 does.
    w = DATA["gauss"]
    assert get_format(f"nf{bits}").nominal_bits(32) == get_format(f"int{bits}").nominal_bits(64)
    assert rel_mse(f"nf{bits}", w, 32) < rel_mse(f"int{bits}", w, 64)


def test_nf2_beats_int2_on_heavy_tails_at_equal_bits():
    # On Gaussian data int2's free offset wins at 2 bits (see docs/FORMAT.md); on heavy tails the NF levels do.
    assert rel_mse("nf2", DATA["heavy"], 32) < rel_mse("int2", DATA["heavy"], 64)


def test_fineq_beats_int2_on_outlier_heavy_data():
    assert rel_mse("fineq", DATA["heavy"]) < 0.9 * rel_mse("int2", DATA["heavy"])


def test_normal_float_codebooks():
    nf4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
    np.testing.assert_allclose(normal_float_codebook(4), nf4, atol=1e-6)  # bitsandbytes' table
    np.testing.assert_allclose(normal_float_codebook(3), [-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1], atol=1e-4)
    np.testing.assert_allclose(normal_float_codebook(2), [-1, 0, 0.3379, 1], atol=1e-4)


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("scale", [0.037, 1.0, 3e-5])
def test_ternary_checkpoint_round_trips_exactly(scale, refine):
    rng = np.random.default_rng(3)
    w = (rng.integers(-1, 2, (96, 256)) * np.float32(scale)).astype(np.float32)
    p = get_format("ternary").quantize(w, 64, refine)
    assert np.array_equal(dequantize(p), w)
    assert p.arrays["tensor_scale"].dtype == np.float32 and p.arrays["tensor_scale"][0] == np.float32(scale)
    codes = unpack_bitserial(p.arrays["codes"], 2, 96, 256)
    assert np.array_equal(codes.astype(np.int8) - 1, np.rint(w / np.float32(scale)).astype(np.int8))


def test_ternary_stores_int2_compatible_scales():
    w = DATA["gauss"]
    p = get_format("ternary").quantize(w)
    s = p.arrays["tensor_scale"][0]
    int2_view = p.arrays["scales"].astype(np.float32)[..., None] * unpack_bitserial(p.arrays["codes"], 2, *w.shape) \
        .reshape(256, 6, 64) + p.arrays["biases"].astype(np.float32)[..., None]
    np.testing.assert_allclose(int2_view.reshape(w.shape), dequantize(p), rtol=1e-3, atol=1e-3 * s)


def test_uniform_plain_rounding_is_q4_1():
    """int4 G = 32 without the search is llama.cpp's Q4_1: d = (max - min) / 15, m = min, q = round((w - m) / d)."""
    w = DATA["gauss"]
    p = get_format("int4").quantize(w, 32, refine=False)
    g = w.reshape(-1, 32).astype(np.float32)
    d = ((g.max(1) - g.min(1)) / 15).astype(np.float16)
    np.testing.assert_array_equal(p.arrays["scales"].ravel(), d)
    np.testing.assert_array_equal(p.arrays["biases"].ravel(), g.min(1).astype(np.float16))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("data", ["gauss", "heavy"])
def test_quantized_params_cost_little_and_halve_parameter_bits(bits, data):
    """int<B>k at G = 32 stores as many bits as int<B> at G = 64 and keeps nearly the G = 32 accuracy."""
    w = DATA[data]
    k, plain = get_format(f"int{bits}k"), get_format(f"int{bits}")
    assert k.nominal_bits(32) == plain.nominal_bits(64)
    err_k, err_32, err_64 = rel_mse(f"int{bits}k", w, 32), rel_mse(f"int{bits}", w, 32), rel_mse(f"int{bits}", w, 64)
    # 8-bit parameter codes cost more at 6 bits: the zero point's grid step is a quarter of a code step there
    assert err_k < (1.05 if bits < 6 else 1.2) * err_32 and err_k < err_64


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("data", ["gauss", "heavy"])
def test_nf_quantized_scales_cost_little_and_halve_scale_bits(bits, data):
    """nf<B>k at G = 32 stores as many bits as nf<B> at G = 64 and keeps nearly the G = 32 accuracy (the planted
    outliers stretch the per-tensor scale grid most: nf4k then loses 7% of nf4's G = 32 accuracy)."""
    w = DATA[data]
    k, plain = get_format(f"nf{bits}k"), get_format(f"nf{bits}")
    assert k.nominal_bits(32) == plain.nominal_bits(64)
    assert k.stored_bytes(256, 384, 32) == plain.stored_bytes(256, 384, 64) + 4  # + the f32 scale step
    err_k, err_32, err_64 = rel_mse(f"nf{bits}k", w, 32), rel_mse(f"nf{bits}", w, 32), rel_mse(f"nf{bits}", w, 64)
    assert err_k < 1.1 * err_32 and err_k < err_64


def test_nf_quantized_scales_expand_to_what_dequantize_uses():
    """nf3k: the stored signed scale codes, expanded by the documented formula, rebuild dequantize() exactly, and
    the search uses negative scales (the lopsided codebook mirrored)."""
    w = DATA["heavy"]
    p = get_format("nf3k").quantize(w, 32)
    a = p.arrays
    assert a["scale_codes"].dtype == np.int8 and (a["scale_codes"] < 0).any()
    assert np.abs(a["scale_codes"]).max() == 127  # the largest scale sets the step
    scales = (a["scale_step"][0] * a["scale_codes"].astype(np.float32)).astype(np.float16).astype(np.float32)
    q = get_format("nf3k").codes(p).reshape(256, -1, 32)
    want = normal_float_codebook(3)[q] * scales[..., None]
    np.testing.assert_array_equal(dequantize(p), want.reshape(w.shape))


def test_quantized_params_expand_to_what_dequantize_uses():
    """The stored codes, expanded by the documented formula, rebuild dequantize() exactly."""
    w = DATA["heavy"]
    p = get_format("int3k").quantize(w, 32)
    a = p.arrays
    scales = (a["scale_step"][0] * a["scale_codes"].astype(np.float32)).astype(np.float16).astype(np.float32)
    biases = (-scales * (a["zero_codes"].astype(np.float32) * np.float32(7 / 255))).astype(np.float16)
    q = unpack_bitserial(a["codes"], 3, *w.shape).reshape(256, -1, 32).astype(np.float32)
    want = q * scales[..., None] + biases.astype(np.float32)[..., None]
    np.testing.assert_array_equal(dequantize(p), want.reshape(w.shape))


def test_constant_and_zero_groups():
    w = np.zeros((32, 128), np.float32)
    w[1] = 0.5
    for name in LINEAR_FORMATS:
        for refine in (True, False):
            w_hat = dequantize(get_format(name).quantize(w, 32, refine))
            assert np.all(np.isfinite(w_hat)), name
            assert np.abs(w_hat[0]).max() == 0, name  # an all-zero row stays zero
            if name == "fineq" and not refine:
                continue  # plain rounding puts 0.5 on the 3-bit edge (3.5 s), which the 2-bit levels miss
            np.testing.assert_allclose(w_hat[1], 0.5, rtol=5e-3, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), kc=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_fineq_pack_round_trips(m, kc, seed):
    clusters = np.random.default_rng(seed).integers(0, 256, (m, kc), dtype=np.uint8)
    packed = fineq.pack(clusters)
    assert packed.shape == (-(-m // 32), kc, 32)
    assert np.array_equal(packed[0, :, 0], fineq.stored_bytes(clusters[0]))  # rows innermost
    assert np.array_equal(fineq.unpack(packed, m), clusters)
    assert np.array_equal(fineq.unpack(np.ascontiguousarray(fineq.stored_bytes(packed)), m, version=1), clusters)


def test_fineq_stored_bytes_put_the_mode_in_bits_5_4():
    """Layout 2 stores (payload >> 4) << 6 | mode << 4 | (payload & 15); the swap is its own inverse."""
    every = np.arange(256, dtype=np.uint8)
    stored = fineq.stored_bytes(every)
    assert np.array_equal((stored >> 4) & 3, every >> 6)
    assert np.array_equal(stored & 15, every & 15)
    assert np.array_equal(stored >> 6, (every >> 4) & 3)
    assert np.array_equal(fineq.stored_bytes(stored), every)


def test_fineq_byte_map():
    """The byte -> values map docs/FORMAT.md states, checked on every byte."""
    for b in range(256):
        mode, payload = b >> 6, b & 63
        if mode == 0:
            want = [(payload & 3) - 1.5, ((payload >> 2) & 3) - 1.5, ((payload >> 4) & 3) - 1.5]
        else:
            kept = [(payload & 7) - 3.5, (payload >> 3) - 3.5]
            want = [0.0, 0.0, 0.0]
            others = [i for i in range(3) if i != mode - 1]
            want[others[0]], want[others[1]] = kept
        assert fineq.CLUSTER_VALUES[b].tolist() == want, b


def test_fineq_modes_are_optimal_per_cluster():
    """Every cluster's byte is the one with the least squared error among all 256 at the stored scale."""
    w = heavy_tailed(32, 192, seed=5)
    p = get_format("fineq").quantize(w, 64)
    clusters = fineq.unpack(p.arrays["codes"], 32)
    s = p.arrays["scales"].astype(np.float32)[:, fineq.cluster_groups(64, 64)]  # [32, 64 clusters]
    x = w.reshape(32, 64, 3)
    all_err = ((fineq.CLUSTER_VALUES[None, None] * s[..., None, None] - x[:, :, None]) ** 2).sum(-1)  # [32, 64, 256]
    chosen = np.take_along_axis(all_err, clusters[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(chosen <= all_err.min(-1) * (1 + 1e-5) + 1e-12)
    assert (clusters >> 6).astype(bool).mean() > 0.05  # outlier clusters are used on heavy tails


def test_fineq_clusters_never_straddle_scale_groups():
    gidx = fineq.cluster_groups(192, 64)  # K = 576
    assert gidx.max() == 576 // 64 - 1
    assert np.all(np.diff(gidx) >= 0)
    assert np.bincount(gidx).tolist() == [22, 21, 21] * 3


@pytest.mark.parametrize("k", [64 * 5 + 0, 32 * 7])  # 320 and 224: not multiples of 3
def test_fineq_pads_k_to_whole_clusters(k):
    w = heavy_tailed(40, k, seed=2)
    p = get_format("fineq").quantize(w, 32)
    assert p.meta["k_padded"] == -(-k // 3) * 3
    assert p.arrays["codes"].shape == (2, p.meta["k_padded"] // 3, 32)
    assert dequantize(p).shape == (40, k)
    assert p.nbytes == get_format("fineq").stored_bytes(40, k, 32)
    assert rel_mse("fineq", w, 32) < 0.14


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="group size"):
        get_format("int4").quantize(gaussian(8, 96), 48)
    with pytest.raises(ValueError, match="matrix"):
        get_format("nf4").quantize(np.zeros(64, np.float32), 64)
    with pytest.raises(Exception, match="unknown format"):
        get_format("int5")


@pytest.mark.slow
def test_int4_g32_reproduces_smollm2_q4_1(smollm2_gguf):
    """SmolLM2's linear weights are Q4_1 (int4, G = 32, fp16 d and m): quantizing them again gives them back exactly,
    with or without the search (min/max is the zero-error point, and the search keeps the better of the two)."""
    from lutq.checkpoint import open_checkpoint

    with open_checkpoint(smollm2_gguf) as ckpt:
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight"):
            w = ckpt.load(name)
            for refine in (True, False):
                p = get_format("int4").quantize(w, 32, refine)
                w_hat = dequantize(p)
                # within fp16 rounding of the scales: one fp16 ulp of d times the largest code
                tol = np.abs(p.arrays["scales"].astype(np.float32)).max() * 2.0**-10 * 15
                assert np.abs(w_hat - w).max() <= tol
                assert np.array_equal(w_hat, w)  # and in fact bit for bit
