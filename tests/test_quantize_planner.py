"""--bits-budget: the planner's hull and greedy choice, and the budget holding end to end."""

from __future__ import annotations

import json

import pytest

from lutq.checkpoint import open_checkpoint
from lutq.errors import LutqError
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.planner import hull
from lutq.quantize.rules import Choice, parse_rules


def test_hull_drops_dominated_and_concave_points():
    a, b, c, d, e = (Choice(n, 64) for n in "abcde")
    points = [(2.0, 0.30, a), (2.5, 0.35, b), (3.0, 0.10, c), (3.5, 0.09, d), (4.0, 0.02, e)]
    # b costs more than a and is worse; d lies above the segment c-e
    assert [p[2] for p in hull(points)] == [a, c, e]


@pytest.fixture
def tiny(tiny_models):
    return tiny_models("llama")[0]


def plan(tiny, tmp_path, budget, fmt="auto", name="q"):
    with open_checkpoint(tiny) as ckpt:
        return quantize_checkpoint(ckpt, tmp_path / name, QuantizeOptions(parse_rules(fmt), 32, bits_budget=budget))


def test_budget_is_respected_and_buys_accuracy(tiny, tmp_path):
    results = {b: plan(tiny, tmp_path, b, name=str(b)).summary() for b in (2.8, 3.6, 4.6)}
    for budget, s in results.items():
        assert s["bits_per_weight"] <= budget + 1e-9
        assert s["bits_per_weight"] > budget - 0.6  # the budget is used, not left idle
    errors = [results[b]["mean_rel_error"] for b in (2.8, 3.6, 4.6)]
    assert errors[0] > errors[1] > errors[2]
    assert len(results[3.6]["formats"]) > 3  # a mix (plus fp16 embedding and fp32 norms)
    cfg = json.loads((tmp_path / "3.6" / "config.json").read_text())["quantization_config"]
    assert cfg["bits_budget"] == 3.6 and len({t["format"] for t in cfg["tensors"].values()}) > 1


def test_pinned_tensors_keep_their_rule(tiny, tmp_path):
    report = plan(tiny, tmp_path, 3.5, "auto,*.down_proj=int4:32")
    for t in report.tensors:
        if t.name.endswith("down_proj.weight"):
            assert (t.format, t.group_size) == ("int4", 32)


def test_budget_errors(tiny, tmp_path):
    with pytest.raises(LutqError, match="below the cheapest plan"):
        plan(tiny, tmp_path, 1.0)
    with pytest.raises(LutqError, match="--format auto"):
        plan(tiny, tmp_path, 3.0, "nf3")
    with pytest.raises(LutqError, match="needs --bits-budget"):
        plan(tiny, tmp_path, None)
    assert list(tmp_path.iterdir()) == []
