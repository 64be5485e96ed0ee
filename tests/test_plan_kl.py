"""`--plan kl`: the KL probe against transformers in float64, the planner following measured KL, and the command end
to end (lutq/quantize/sensitivity.py, planner.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.quantize.calibration import calibration_windows, parse_calibration
from lutq.quantize.sensitivity import KL_WINDOWS, POSITIONS, KLProbe


@pytest.fixture
def calib_text(tmp_path):
    from tiny import TEXT

    path = tmp_path / "calib.txt"
    path.write_text(TEXT * 3)
    return path


def torch_kl(model, windows, edit) -> float:
    """Mean KL(p_fp || p_edited) over the probe's positions, from transformers in float64; edit(model64) changes the
    float64 copy's weights and returns a function of the final hidden states giving the logits."""
    import copy

    import torch

    ref64 = copy.deepcopy(model).double().eval()
    new64 = copy.deepcopy(ref64)
    head_of = edit(new64)
    ids = torch.tensor(np.asarray(windows[:KL_WINDOWS]))
    with torch.no_grad():
        lp_ref = torch.log_softmax(ref64(ids).logits[:, POSITIONS], -1)
        hidden = new64(ids, output_hidden_states=True).hidden_states[-1][:, POSITIONS]  # after the final norm
        lp_new = torch.log_softmax(head_of(hidden), -1)
    return float((lp_ref.exp() * (lp_ref - lp_new)).sum(-1).mean())


@pytest.mark.parametrize("variant", ["llama", "llama-tied"])
def test_kl_probe_matches_transformers(tiny_models, calib_text, variant):
    import torch

    path, model = tiny_models(variant)
    ckpt = open_checkpoint(path)
    windows = calibration_windows(ckpt, parse_calibration(str(calib_text)))
    assert len(windows) >= KL_WINDOWS
    probe = KLProbe(ckpt, windows)
    rng = np.random.default_rng(0)

    name = "model.layers.0.mlp.down_proj.weight"
    w = ckpt.load(name)
    assert abs(probe.kl(name, w)) < 1e-6  # the fp weight: no change
    w_hat = (w + rng.normal(0, 0.5 * w.std(), w.shape)).astype(np.float32)

    def edit_down(m):
        with torch.no_grad():
            m.model.layers[0].mlp.down_proj.weight.copy_(torch.tensor(w_hat, dtype=torch.float64))
        return m.lm_head

    want = torch_kl(model, windows, edit_down)
    got = probe.kl(name, w_hat)
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-3)

    head = ckpt.load("lm_head.weight" if ckpt.has("lm_head.weight") else "model.embed_tokens.weight")
    head_hat = (head + rng.normal(0, 0.5 * head.std(), head.shape)).astype(np.float32)
    h64 = torch.tensor(head_hat, dtype=torch.float64)
    want = torch_kl(model, windows, lambda m: (lambda hidden: hidden @ h64.T))
    got = probe.kl("lm_head.weight", head_hat)
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-3)


def test_plan_follows_measured_kl(tiny_models, tmp_path, calib_text, monkeypatch):
    """The planner spends bits where the measured KL falls most per bit: a weight whose KL only int4k removes gets
    int4k, the rest stay cheap."""
    from lutq.quantize import sensitivity
    from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
    from lutq.quantize.planner import KL_CANDIDATES
    from lutq.quantize.rules import parse_rules

    path, _ = tiny_models("llama")
    sensitive = "model.layers.1.self_attn.v_proj.weight"

    def fake_measure(ckpt, windows, candidates, refine, on_progress=None):  # KL_CANDIDATES: fewest bits first
        return {n: {c: (1.0 if n == sensitive and c.format != "int4k" else 0.0) + 0.01 / (1 + KL_CANDIDATES.index(c))
                    for c in cs} for n, cs in candidates.items()}

    monkeypatch.setattr(sensitivity, "measure_kl", fake_measure)
    options = QuantizeOptions(parse_rules("auto"), bits_budget=2.8, calibration=parse_calibration(str(calib_text)),
                              plan="kl")
    with open_checkpoint(path) as ckpt:
        report = quantize_checkpoint(ckpt, tmp_path / "q", options)
    chosen = {t.name: (t.format, t.group_size) for t in report.tensors if t.format not in ("fp32", "fp16")}
    assert chosen[sensitive] == ("int4k", 32)
    assert {f for f, _ in chosen.values()} <= {c.format for c in KL_CANDIDATES}
    assert report.summary()["bits_per_weight"] <= 2.8
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["plan"] == "kl"


def test_plan_kl_end_to_end_and_its_errors(tiny_models, tmp_path, calib_text):
    from test_cli import assert_clean_error, lutq

    path, _ = tiny_models("llama")
    res = lutq("quantize", path, tmp_path / "kl", "--bits-budget", "3.6", "--calibration", str(calib_text), "--plan",
               "kl", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["bits_per_weight"] <= 3.6
    for args, says in ((["--bits-budget", "3.6", "--plan", "kl"], "--plan kl needs"),
                       (["--format", "int4", "--calibration", str(calib_text), "--plan", "kl"], "--plan kl needs"),
                       (["--bits-budget", "3.6", "--plan", "loss"], "--plan must be one of")):
        res = lutq("quantize", path, tmp_path / "never", *args)
        assert_clean_error(res, says)
    assert not (tmp_path / "never").exists()
