"""GPTQ and calibration: the fast GPTQ against a plain float64 reference, its advantage over round-to-nearest in output
error, the stored layout, the self-generated calibration text, and --calibration end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lutq.quantize import gptq
from lutq.quantize.gptq import Hessian, block_gram, block_rhs, gptq_codes, gptq_quantize, grid_for, output_error
from lutq.quantize.registry import get_format

FORMATS = ("int2", "int3", "int4", "int2k", "int3k", "int4k", "nf2", "nf3", "nf4", "nf2k", "nf3k", "nf4k")


def correlated_inputs(n: int, k: int, seed: int = 0) -> np.ndarray:
    """X f64[n, k] whose columns are correlated and unequal in scale, as activations are."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(n, k)) @ mix
    x *= rng.uniform(0.3, 3.0, k)
    x[:, 3] *= 8  # an outlier channel
    return x


def weight(m: int, k: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, size=(m, k)) * 0.05).astype(np.float32)


def reference_gptq(w: np.ndarray, h: np.ndarray, grid, group_size: int, order=None, damp: float = 0.01):
    """GPTQ as the paper states it, in float64, with nothing of the fast version's: the explicit inverse Hessian,
    from which each quantized column is eliminated (Gaussian elimination), no Cholesky, no lazy blocks. With an
    order, the groups' grids are fitted first from the original weights."""
    k = w.shape[1]
    h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(k))
    work = w.astype(np.float64)
    if order is not None:
        for g in range(k // group_size):
            grid.fit(g, work[:, g * group_size : (g + 1) * group_size].copy())
    codes = np.empty(w.shape, np.uint8)
    values = np.empty(w.shape)
    for col in range(k) if order is None else order:
        if order is None and col % group_size == 0:
            grid.fit(col // group_size, work[:, col : col + group_size].copy())
        q, v = grid.round(col // group_size, work[:, col])
        codes[:, col], values[:, col] = q, v
        # the columns already quantized have zero rows in the eliminated inverse: only the others move
        work -= np.outer((work[:, col] - v) / h_inv[col, col], h_inv[col])
        h_inv -= np.outer(h_inv[:, col], h_inv[col]) / h_inv[col, col]
    return codes, values


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_gptq_matches_reference_and_beats_rounding(name, act_order):
    m, k, g = 40, 192, 32  # K not a multiple of the 128-column block: a partial last block
    w, x = weight(m, k), correlated_inputs(1024, k)
    h = x.T @ x
    fmt = get_format(name)
    hessian = Hessian.of(h, act_order)
    codes, values = gptq_codes(w, hessian.u, grid_for(fmt, w, g, True), g, order=hessian.order)
    ref_codes, ref_values = reference_gptq(w, h, grid_for(fmt, w, g, True), g, hessian.order)
    assert np.mean(codes == ref_codes) > 0.999
    assert output_error(w, values, h) == pytest.approx(output_error(w, ref_values, h), rel=1e-3)

    # The stored tensor is the format's own: its codes in range, its dequantization what GPTQ computed.
    p = gptq_quantize(fmt, w, hessian, g, True, refit_rounds=0)
    assert p.meta == fmt.quantize(w, g, True).meta
    assert set(p.arrays) == set(fmt.quantize(w, g, True).arrays)
    stored = fmt.codes(p)
    assert stored.max() < 2 ** fmt.bits and np.array_equal(stored, codes)
    np.testing.assert_allclose(fmt.dequantize(p), values, rtol=1e-6, atol=1e-7)

    # What GPTQ is for: the output error on the calibration inputs, strictly below round-to-nearest's.
    rtn = output_error(w, fmt.dequantize(fmt.quantize(w, g, True)), h)
    assert output_error(w, values, h) < 0.9 * rtn


def design(f_row: np.ndarray, group_size: int) -> np.ndarray:
    """The dense design matrix A f64[K, n] of one row's per-group unknowns for feature f_row (A[k, g(k)] = f[k])."""
    k = len(f_row)
    a = np.zeros((k, k // group_size))
    a[np.arange(k), np.arange(k) // group_size] = f_row
    return a


def test_block_gram_is_the_dense_normal_matrix():
    rng = np.random.default_rng(3)
    k, g = 96, 32
    x = correlated_inputs(300, k)
    h = x.T @ x
    f, e = rng.normal(size=(5, k)), rng.normal(size=(5, k))
    wh = rng.normal(size=(5, k)) @ h
    m, v = block_gram(f, e, h, g), block_rhs(f, wh, g)
    for r in range(5):
        np.testing.assert_allclose(m[r], design(f[r], g).T @ h @ design(e[r], g), rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(v[r], design(f[r], g).T @ wh[r], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", ["int3", "nf3"])
def test_refit_is_least_squares_in_output_error(name):
    """One refit of a row's grid for fixed codes is the weighted least-squares solution: checked against numpy's
    lstsq on sqrt(H) times the dense design (before the fp16 rounding of the stored parameters)."""
    m, k, g = 6, 128, 32
    w, x = weight(m, k), correlated_inputs(2048, k)
    h = x.T @ x
    fmt = get_format(name)
    hessian = Hessian.of(h)
    grid = grid_for(fmt, w, g, True)
    codes, _ = gptq_codes(w, hessian.u, grid, g, order=hessian.order)
    root = np.linalg.cholesky(h).T  # H = R^T R: ||R (w - A theta)||^2 = (w - A theta) H (w - A theta)^T
    grid.refit(codes, w, h, g)
    for r in range(m):
        if name == "nf3":
            a = design(grid.cb[codes[r]], g)
            got = grid.s[r]
        else:
            a = np.hstack([design(codes[r].astype(np.float64), g), design(np.ones(k), g)])
            got = np.concatenate([grid.s[r], grid.b[r]])
        want = np.linalg.lstsq(root @ a, root @ w[r].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("name", FORMATS)
def test_refit_rounds_lower_the_output_error_of_every_row(name):
    m, k, g = 48, 192, 32
    w, x = weight(m, k, seed=4), correlated_inputs(2048, k, seed=5)
    h = x.T @ x
    fmt = get_format(name)
    hessian = Hessian.of(h)
    plain = fmt.dequantize(gptq_quantize(fmt, w, hessian, g, True, refit_rounds=0)).astype(np.float64)
    p = gptq_quantize(fmt, w, hessian, g, True)
    refit = fmt.dequantize(p).astype(np.float64)
    assert p.meta == fmt.quantize(w, g, True).meta and fmt.codes(p).max() < 2 ** fmt.bits
    rows = lambda v: np.einsum("ij,ij->i", (w - v) @ h, w - v)  # noqa: E731
    assert np.all(rows(refit) <= rows(plain) * (1 + 1e-6))  # each row keeps its best pass
    assert output_error(w, refit, h) < 0.95 * output_error(w, plain, h)


def test_gptq_dead_inputs_and_fallback():
    w, x = weight(32, 64), correlated_inputs(256, 64)
    x[:, 10] = 0  # an input the calibration never excites
    h = x.T @ x
    hessian = Hessian.of(h)
    assert np.isfinite(hessian.u).all()
    fmt = get_format("int4")
    p = gptq_quantize(fmt, w, hessian, 32)
    # its column's error moves nothing: it is rounded to nearest on its group's grid
    assert np.isfinite(fmt.dequantize(p)).all()
    fineq = get_format("fineq")  # not covered by GPTQ: its plain quantize
    a, b = gptq_quantize(fineq, w, hessian, 64), fineq.quantize(w, 64)
    assert all(np.array_equal(a.arrays[n], b.arrays[n]) for n in a.arrays)


# --- calibration text ------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny(tiny_models):
    return tiny_models("llama")[0]


def test_self_text_is_reproducible_and_cached(tiny, tmp_path, monkeypatch):
    from lutq.checkpoint import open_checkpoint
    from lutq.quantize import calibration
    from lutq.runtime.llama import load_llama
    from lutq.runtime.tokenizer import Tokenizer

    ckpt = open_checkpoint(tiny)
    tok = Tokenizer(ckpt.tokenizer_dir(), ckpt.config.eos_token_ids)
    banned = calibration.banned_ids(tok, ckpt.config.vocab_size)
    model = load_llama(ckpt, 24)
    a = calibration.generate_self_text(model, banned, 3, 24, seed=5)
    b = calibration.generate_self_text(model, banned, 3, 24, seed=5)
    c = calibration.generate_self_text(model, banned, 3, 24, seed=6)
    assert a.shape == (3, 24) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not banned[a].any()  # no special token, so no sequence ends early

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = calibration.cached_self_text(ckpt, tok, 300, seed=0)
    assert first.shape == (2, 256)  # the tiny model's context is 256

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(calibration, "generate_self_text", no_generation)
    assert np.array_equal(calibration.cached_self_text(ckpt, tok, 300, seed=0), first)
    assert list((tmp_path / "cache" / "lutq" / "calibration").iterdir())


def test_parse_calibration(tmp_path):
    from lutq.errors import LutqError
    from lutq.quantize.calibration import DEFAULT_TOKENS, parse_calibration

    assert parse_calibration("self").is_self and parse_calibration("self").tokens == DEFAULT_TOKENS
    assert parse_calibration("self:1000").tokens == 1000
    text = tmp_path / "calib.txt"
    text.write_text("some text " * 50)
    src = parse_calibration(f"{text}:300")
    assert src.path == text and src.tokens == 300
    for bad, needle in ((tmp_path / "missing.txt", "missing.txt"), (text.with_suffix(".bin"), "calib.bin")):
        if bad.suffix == ".bin":
            bad.write_bytes(b"\xff\xfe\x00bad")
        with pytest.raises(LutqError, match=needle):
            parse_calibration(str(bad))


def test_calibration_seed(tiny, tmp_path):
    """--calibration-seed picks another self-generated text (recorded in config.json); it needs --calibration self."""
    from test_cli import assert_clean_error, lutq

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    seeds = {}
    for seed in (None, 3):
        out = tmp_path / f"seed{seed}"
        extra = [] if seed is None else ["--calibration-seed", str(seed)]
        res = lutq("quantize", tiny, out, "--format", "int3k", "-g", "32", "--calibration", "self:300", "--threads",
                   "1", "--json", *extra, env=env)
        assert res.returncode == 0, res.stderr
        seeds[seed] = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["seed"]
    assert seeds == {None: 0, 3: 3}
    texts = [np.load(d / "ids.npy") for d in (tmp_path / "cache" / "lutq" / "calibration").iterdir()]
    assert len(texts) == 2 and not np.array_equal(*texts)  # two texts, both kept in the cache

    text = tmp_path / "calib.txt"
    text.write_text("some text " * 50)
    for extra, needle in ((["--calibration-seed", "1"], "--calibration self"),
                          (["--calibration", str(text), "--calibration-seed", "1"], "--calibration self"),
                          (["--calibration", "self", "--calibration-seed", "-1"], "-1")):
        res = lutq("quantize", tiny, tmp_path / "never", "--format", "int4", *extra, env=env)
        assert_clean_error(res, "--calibration-seed", needle)
    assert not (tmp_path / "never").exists()


def test_quantize_with_calibration(tiny, tmp_path):
    """--calibration FILE end to end, with rules and with the bits budget: GPTQ lowers the output error."""
    from test_cli import assert_clean_error, lutq
    from tiny import TEXT

    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 3)
    out, cal = tmp_path / "plain", tmp_path / "gptq"
    for directory, extra in ((out, []), (cal, ["--calibration", str(text)])):
        res = lutq("quantize", tiny, directory, "--format", "int3k", "-g", "32", "--threads", "1", "--json", *extra)
        assert res.returncode == 0, res.stderr
    qc = json.loads((cal / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["source"] == str(text) and qc["calibration"]["tokens"] > 100
    assert "calibration" not in json.loads((out / "config.json").read_text())["quantization_config"]
    # The logits on the calibration text move less from the fp model's with GPTQ than with plain rounding (a random
    # model's perplexity is near its vocabulary's size either way: logits are what can be compared).
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.model import load_model
    from lutq.runtime.tokenizer import Tokenizer

    ids = np.asarray(Tokenizer(tiny).encode(text.read_text())[:128])
    logits = {d: load_model(open_checkpoint(d), 128, kernels=False).forward(ids, all_logits=True)
              for d in (tiny, out, cal)}
    assert np.linalg.norm(logits[cal] - logits[tiny]) < np.linalg.norm(logits[out] - logits[tiny])

    res = lutq("quantize", tiny, tmp_path / "budget", "--bits-budget", "3.6", "--calibration", str(text), "--threads",
               "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["bits_per_weight"] <= 3.6
    tensors = json.loads((tmp_path / "budget" / "config.json").read_text())["quantization_config"]["tensors"]
    assert "fineq" not in {t["format"] for t in tensors.values()}  # with calibration: only formats GPTQ covers

    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81")
    for source in (bad, tmp_path / "absent.txt"):
        res = lutq("quantize", tiny, tmp_path / "never", "--format", "int4", "--calibration", source)
        assert_clean_error(res, str(source))
    assert not (tmp_path / "never").exists()
