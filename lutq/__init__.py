"""lutq: low-bit LLM quantization and lookup-table inference for CPUs."""

__version__ = "0.1.0"
