"""Numerically bad input: NaN/Inf weights are refused by name; all-zero groups, constant groups, tiny and huge values
and huge outliers quantize in every format without NaN or Inf, with the error each format can promise.

What each format can represent (docs/FORMAT.md, "Edge cases"):
- int2/3/4, nf2/3/4, ternary-group, int8: a constant group c comes back as c to fp16 precision (the rounding of c,
  or of c/127 for int8, to fp16; values below fp16's smallest subnormal flush to zero), both with and without the
  scale search, and groups are independent: an outlier changes nothing outside its own group.
- int2k/3k/4k/6k put every group's scale on one 8-bit grid per tensor (step = the largest scale / 255): a constant
  group comes back within max|W| / 255 (plus fp16 rounding), all-zero groups exactly. nf2k/3k/4k alike, their
  signed codes on a step of the largest |scale| / 127: within max|W| / 254.
- ternary has one scale per tensor: constant groups of one magnitude (±c and 0) come back exactly (the scale is fp32),
  several magnitudes cannot; the error is never above ||W|| (all-zero is always a candidate).
- fineq has no zero level in its normal mode (mid-rise grids) and groups of whole clusters of 3, which straddle the
  G-column blocks: a constant *row* comes back to fp16 precision with the search, a constant G-block only within
  its cluster group's largest |w|, and a group holding a 1e4 outlier among N(0, 1) weights loses either the outlier
  or the rest.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.errors import LutqError
from lutq.quantize import FORMATS, dequantize, get_format
from lutq.quantize import fineq
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.rules import parse_rules
from test_cli import assert_clean_error, lutq

GROUPWISE = ["int2", "int3", "int4", "int6", "nf2", "nf3", "nf4", "ternary-group", "int8"]
QUANTIZED_PARAMS = ["int2k", "int3k", "int4k", "int6k", "nf2k", "nf3k", "nf4k"]
CONSTANTS = [0.0, 0.5, -3.0, 6e4, -6e4, 65504.0, 1e-8, -1e-8, 1e-5, 7.0, 1e-3]
FP16_REL, FP16_TINY = 2.0**-11, 2.0**-25  # half an fp16 ulp, relative; half the smallest subnormal, absolute


def test_every_format_is_covered():
    assert sorted(GROUPWISE + QUANTIZED_PARAMS + ["ternary", "fineq"]) == sorted(FORMATS)


def fp16_tolerance(c, largest_level=1.0):
    """The error of storing c through an fp16 scale whose largest level is `largest_level` times the scale."""
    return FP16_REL * np.abs(c) + largest_level * FP16_TINY


def constant_blocks(g, rows=64):
    """Every G-column block of every row constant, the constants cycling through CONSTANTS over rows and blocks."""
    n = len(CONSTANTS)
    c = np.array(CONSTANTS, np.float32)[(np.arange(rows)[:, None] + np.arange(n)[None]) % n]  # [rows, n blocks]
    return np.repeat(c, g, axis=1)


def finite(p, w_hat):
    return all(np.isfinite(a).all() for a in p.arrays.values() if a.dtype.kind == "f") and np.isfinite(w_hat).all()


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_all_zero_matrix_is_exactly_zero(name, refine):
    p = get_format(name).quantize(np.zeros((40, 128), np.float32), 64, refine)
    w_hat = dequantize(p)
    assert finite(p, w_hat) and not w_hat.any()


@pytest.mark.parametrize("g", [32, 64])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("name", GROUPWISE + QUANTIZED_PARAMS)
def test_constant_groups_come_back_to_fp16_precision(name, refine, g):
    """Within fp16 rounding; the k formats within half a step of their per-tensor 8-bit grid too."""
    w = constant_blocks(g)
    p = get_format(name).quantize(w, g, refine)
    w_hat = dequantize(p)
    assert finite(p, w_hat)
    grid = np.abs(w).max() / (254 if name.startswith("nf") else 255) if name in QUANTIZED_PARAMS else 0.0
    assert np.all(np.abs(w_hat - w) <= grid + fp16_tolerance(w, 127 if name == "int8" else 1)), name
    assert not w_hat[w == 0].any()


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("name", QUANTIZED_PARAMS)
def test_quantized_parameters_keep_groups_of_one_magnitude(name, refine):
    w = np.sign(constant_blocks(32)) * np.float32(0.37)  # every group +-0.37 or 0: one scale for all
    w_hat = dequantize(get_format(name).quantize(w, 32, refine))
    assert np.all(np.abs(w_hat - w) <= fp16_tolerance(w) * 4), name


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("c", [0.5, -3.0, 6e4, 65504.0, 1e-8])
def test_ternary_constant_groups_of_one_magnitude_are_exact(c, refine):
    signs = np.random.default_rng(1).integers(-1, 2, (64, 4))
    w = np.repeat(signs * np.float32(c), 64, axis=1).astype(np.float32)
    p = get_format("ternary").quantize(w, 64, refine)
    assert finite(p, dequantize(p)) and np.array_equal(dequantize(p), w)


@pytest.mark.parametrize("refine", [True, False])
def test_ternary_mixed_constants_stay_finite_and_bounded(refine):
    w = constant_blocks(64)
    p = get_format("ternary").quantize(w, 64, refine)
    w_hat = dequantize(p)
    assert finite(p, w_hat)
    assert np.all(np.abs(w_hat - w) <= np.abs(w))  # never worse than zero, weight by weight
    assert np.linalg.norm(w_hat - w) <= np.linalg.norm(w)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("refine", [True, False])
def test_fineq_constant_blocks_stay_within_their_cluster_group(refine, g):
    w = constant_blocks(g)
    p = get_format("fineq").quantize(w, g, refine)
    w_hat = dequantize(p)
    assert finite(p, w_hat)
    k = w.shape[1]
    group_of_column = np.repeat(fineq.cluster_groups(-(-k // 3), g), 3)[:k]
    largest = np.zeros((w.shape[0], group_of_column.max() + 1))
    np.maximum.at(largest.T, group_of_column, np.abs(w).T)
    assert np.all(np.abs(w_hat - w) <= largest[:, group_of_column] * (1 + FP16_REL))


@pytest.mark.parametrize("c", CONSTANTS)
def test_fineq_constant_rows_come_back_to_fp16_precision_with_the_search(c):
    w = np.full((32, 192), c, np.float32)
    w_hat = dequantize(get_format("fineq").quantize(w, 64))
    assert np.isfinite(w_hat).all() and np.all(np.abs(w_hat - w) <= fp16_tolerance(c, 3.5))


def with_outliers(seed=0):
    """N(0, 1) with 0.2% of the weights replaced by +-1e4; also the same matrix without them, and where they are."""
    rng = np.random.default_rng(seed)
    clean = rng.standard_normal((64, 512)).astype(np.float32)
    where = rng.random(clean.shape) < 0.002
    w = clean.copy()
    w[where] = 1e4 * np.sign(rng.standard_normal(where.sum()))
    return w, clean, where


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_huge_outliers(name):
    w, clean, where = with_outliers()
    fmt = get_format(name)
    errors = {}
    for refine in (True, False):
        p = fmt.quantize(w, 64, refine)
        w_hat = dequantize(p)
        assert finite(p, w_hat)
        errors[refine] = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
        assert errors[refine] <= 1.0
        if name == "ternary" or name in QUANTIZED_PARAMS:
            continue  # one scale (grid) per tensor: the outliers set it for everyone
        # No leak: a group without an outlier comes out exactly as it does from the matrix without outliers.
        clean_hat = dequantize(fmt.quantize(clean, 64, refine))
        if name == "fineq":
            group_of_column = np.repeat(fineq.cluster_groups(-(-512 // 3), 64), 3)[:512]
        else:
            group_of_column = np.arange(512) // 64
        touched = np.zeros((64, group_of_column.max() + 1), bool)
        np.logical_or.at(touched.T, group_of_column, where.T)
        untouched = ~touched[:, group_of_column]
        assert untouched.mean() > 0.5 and np.array_equal(w_hat[untouched], clean_hat[untouched])
    assert errors[True] <= errors[False] * (1 + 1e-6)  # the search never loses to plain rounding here


# --- NaN / Inf / beyond fp16, through `lutq quantize` ------------------------------------------------------------

@pytest.fixture
def broken(tiny_models, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_models("llama")[0], dst)
    return dst


def poke(model, name, values: dict) -> None:
    """Set some elements (flat index -> value) of one tensor of the model's safetensors file."""
    from safetensors.numpy import load_file, save_file

    tensors = dict(load_file(model / "model.safetensors"))
    t = tensors[name].copy()
    for i, v in values.items():
        t.flat[i] = v
    tensors[name] = t
    save_file(tensors, str(model / "model.safetensors"))


def test_nan_and_inf_weights_are_reported_by_name(broken, tmp_path):
    poke(broken, "model.layers.0.mlp.up_proj.weight", {3: np.nan, 50: np.nan, 51: np.nan, 700: -np.inf})
    res = lutq("quantize", broken, tmp_path / "q", "--format", "int4", "-g", "32")
    assert_clean_error(res, "model.layers.0.mlp.up_proj.weight: 3 NaN and 1 Inf values")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no OUT, nothing left beside it


@pytest.mark.parametrize("name", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"])
def test_non_finite_values_anywhere_are_refused(broken, tmp_path, name):
    poke(broken, name, {0: np.inf})
    with open_checkpoint(broken) as ckpt, pytest.raises(LutqError, match=f"{name}: 0 NaN and 1 Inf values"):
        quantize_checkpoint(ckpt, tmp_path / "q", QuantizeOptions(parse_rules("nf4"), 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("fmt, name", [("nf4", "model.layers.1.self_attn.q_proj.weight"),
                                       ("int8", "model.layers.1.self_attn.q_proj.weight"),
                                       ("int4", "model.embed_tokens.weight")])  # the embedding is kept as fp16
def test_weights_beyond_fp16_are_refused_not_stored_as_inf(broken, tmp_path, fmt, name):
    poke(broken, name, {5: -1e5})
    with open_checkpoint(broken) as ckpt, pytest.raises(LutqError, match=f"{name}: .* 1e\\+05 is beyond fp16"):
        quantize_checkpoint(ckpt, tmp_path / "q", QuantizeOptions(parse_rules(fmt), 32))
