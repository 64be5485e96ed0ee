"""lutq: low-bit LLM quantization and lookup-table inference for CPUs."""

import os

__version__ = "0.1.0"

# lutq uses transformers for tokenizers and chat templates only: never reach the hub, and keep its advice about a
# missing PyTorch (which lutq does not want) off the user's terminal. Defaults only; the user's environment wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
