"""`lutq quantize` end to end, the --format rules, and running what it wrote."""

from __future__ import annotations

import json

import pytest

from lutq.errors import LutqError
from lutq.quantize.rules import Choice, parse_rules
from test_cli import assert_clean_error, lutq


@pytest.fixture
def tiny(tiny_models):
    return tiny_models("llama")[0]


def test_rules():
    rules = parse_rules("nf3, lm_head=int4, *.down_proj=int4, model.layers.1.*=fp16, *.layers.1.mlp.down_proj.weight=nf4")
    assert rules.format_for("model.layers.0.self_attn.q_proj.weight") == Choice("nf3")
    assert rules.format_for("lm_head.weight") == Choice("int4")
    assert rules.format_for("model.layers.0.mlp.down_proj.weight") == Choice("int4")
    assert rules.format_for("model.layers.1.self_attn.o_proj.weight") == Choice("fp16")
    # the last match wins; a glob may end in ".weight"
    assert rules.format_for("model.layers.1.mlp.down_proj.weight") == Choice("nf4")
    assert rules.matching("model.layers.0.self_attn.q_proj.weight") is None
    assert parse_rules("auto,*.v_proj=int4:32").format_for("model.layers.0.self_attn.v_proj.weight") == Choice("int4", 32)
    assert str(parse_rules("int4,lm_head=nf4:128")) == "int4,lm_head=nf4:128"
    for bad, msg in (("int5", "unknown format"), ("lm_head=int4", "first item"), ("int4,lm_head", "GLOB=FORMAT"),
                     ("int4,*.q_proj=nf9", "unknown format"), ("", "first item"), ("int4:48", "group size '48'"),
                     ("int4,a=nf4:x", "group size 'x'")):
        with pytest.raises(LutqError, match=msg):
            parse_rules(bad)


def test_rules_from_a_file(tiny, tmp_path):
    """`--format @FILE`: the same rules, one per line or comma-separated, with comments; the weights come out in
    the file's formats; a missing or empty file is a clean error."""
    path = tmp_path / "plan.rules"
    path.write_text("# a plan\nnf3  # the default\n*.down_proj=int4:32, *.v_proj=int3k\n\nmodel.layers.0.*=fp16\n")
    rules = parse_rules(f"@{path}")
    assert str(rules) == str(parse_rules("nf3,*.down_proj=int4:32,*.v_proj=int3k,model.layers.0.*=fp16"))
    out = tmp_path / "q"
    res = lutq("quantize", tiny, out, "--format", f"@{path}", "-g", "32")
    assert res.returncode == 0, res.stderr
    report = {t["name"]: t for t in json.loads((out / "quant_report.json").read_text())["tensors"]}
    assert report["model.layers.1.mlp.down_proj.weight"]["format"] == "int4"
    assert report["model.layers.1.mlp.down_proj.weight"]["group_size"] == 32
    assert report["model.layers.1.self_attn.v_proj.weight"]["format"] == "int3k"
    assert report["model.layers.1.self_attn.q_proj.weight"]["format"] == "nf3"
    assert report["model.layers.0.self_attn.q_proj.weight"]["format"] == "fp16"
    empty = tmp_path / "empty.rules"
    empty.write_text("# nothing\n")
    bad = tmp_path / "bad.rules"
    bad.write_text("nf3\n*.down_proj=int9\n")
    for spec, msg in ((f"@{tmp_path / 'none.rules'}", "none.rules"), (f"@{empty}", "no rules"),
                      (f"@{bad}", "bad.rules")):
        assert_clean_error(lutq("quantize", tiny, tmp_path / "q2", "--format", spec), msg)
    assert not (tmp_path / "q2").exists()


def test_quantize_then_generate_and_inspect(tiny, tmp_path):
    out = tmp_path / "q"
    res = lutq("quantize", tiny, out, "--format", "nf4,*.down_proj=int4", "-g", "32")
    assert res.returncode == 0, res.stderr
    assert "nf4" in res.stdout and "int4" in res.stdout and "bits/weight" in res.stdout
    gen = lutq("generate", out, "-p", "The capital of", "-n", "6", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The capital of")
    info = lutq("inspect", out)
    assert info.returncode == 0, info.stderr
    assert "NF4" in info.stdout and "lutq" in info.stdout


def test_quantize_json(tiny, tmp_path):
    res = lutq("quantize", tiny, tmp_path / "q", "--format", "fineq,lm_head=fineq", "-g", "32", "--json", "--no-refine")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert {"bits_per_weight", "bytes", "mean_rel_error", "seconds", "formats"} <= set(summary)
    assert summary["refine"] is False
    # 8 bits per 3 weights + one fp16 scale per 32, plus what padding costs a tiny model (rows to tiles of 32: the
    # 300-row lm_head; K = 160 to whole clusters)
    assert 8 / 3 + 0.5 < summary["bits_per_weight"] < 8 / 3 + 0.5 + 0.15
    assert summary["formats"]["fineq"]["tensors"] == 2 * 7 + 1


def test_quantize_refuses_existing_out_and_bad_arguments(tiny, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    assert_clean_error(lutq("quantize", tiny, out, "--format", "int4", "-g", "32"), "already exists", "--force")
    assert lutq("quantize", tiny, out, "--format", "int4", "-g", "32", "--force").returncode == 0
    new = tmp_path / "new"
    assert_clean_error(lutq("quantize", tiny, new, "--format", "int9"), "unknown format 'int9'")
    assert_clean_error(lutq("quantize", tiny, new), "--format is required")
    assert_clean_error(lutq("quantize", tiny, new, "--format", "int4", "-g", "48"), "--group-size must be one of 32, 64, 128")
    assert_clean_error(lutq("quantize", tiny, new, "--format", "int4", "-g", "64"), "not a multiple of the group size 64")
    assert_clean_error(lutq("quantize", tiny, new, "--format", "int4", "-g", "32", "--embed", "int4"), "--embed")
    assert_clean_error(lutq("quantize", tmp_path / "missing", new, "--format", "int4"), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
