"""Files lutq derives once and keeps under the user's cache home: tokenizers rebuilt from GGUF metadata, the byte
tokenizer of the random-shape models.

Each entry is a directory built beside its final place and renamed in whole, so a concurrent run sees either nothing
or all of it, and an interrupted one leaves only a hidden staging directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lutq.errors import CheckpointError


def cache_root(kind: str) -> Path:
    """${XDG_CACHE_HOME:-~/.cache}/lutq/<kind>."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative value
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lutq" / kind


def is_tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def cached_dir(final: Path, write: Callable[[Path], None], complete: Callable[[Path], bool] = is_tokenizer_dir) -> Path:
    """`final`, written by write(dir) unless already complete. An unwritable cache (read-only home, sandbox) costs a
    rebuild per run in a temporary directory, not a failure."""
    if complete(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix=f"lutq-{final.name}-"))
        write(fallback)
        return fallback
    try:
        write(staging)
        os.rename(staging, final)
    except OSError as e:
        if not complete(final):
            raise CheckpointError(final, f"cannot write the cache: {e.strerror or str(e).splitlines()[0]}") from None
        # else a concurrent run renamed its identical copy into place first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
