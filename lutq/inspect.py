"""`lutq inspect`: a checkpoint's architecture and tensors as rich tables."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

from rich.console import Group
from rich.table import Table

from lutq.checkpoint.base import Checkpoint


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def grouped_tensors(ckpt: Checkpoint) -> list[tuple[str, tuple, str, int, int]]:
    """(name pattern, shape, dtype, count, bytes): tensors that differ only in their layer number share one row."""
    rows: "OrderedDict[tuple, list]" = OrderedDict()
    for t in ckpt.tensors():
        m = re.match(r"(.*\.layers\.)(\d+)(\..*)", t.name)
        pattern, layer = ((m.group(1) + "{}" + m.group(3)), int(m.group(2))) if m else (t.name, None)
        key = (pattern, t.shape, t.dtype)
        entry = rows.setdefault(key, [[], 0])
        entry[0].append(layer)
        entry[1] += t.nbytes
    out = []
    for (pattern, shape, dtype), (layers, nbytes) in rows.items():
        if layers[0] is not None:
            span = f"{min(layers)}..{max(layers)}" if len(layers) > 1 else str(layers[0])
            pattern = pattern.replace("{}", span)
        out.append((pattern, shape, dtype, len(layers), nbytes))
    return out


def render(ckpt: Checkpoint) -> Group:
    cfg = ckpt.config
    tensors = ckpt.tensors()
    params = sum(math.prod(t.shape) for t in tensors)
    summary = Table(title=f"{ckpt.path}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in [
        ("format", ckpt.format_name),
        ("architecture", cfg.model_type),
        ("layers", cfg.num_hidden_layers),
        ("hidden size", cfg.hidden_size),
        ("intermediate size", cfg.intermediate_size),
        ("heads / kv heads / head dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}"),
        ("vocab", cfg.vocab_size),
        ("context", cfg.max_position_embeddings),
        ("rope", f"theta {cfg.rope_theta:g}, {cfg.rope_type}" + (f" {cfg.rope_scaling}" if cfg.rope_scaling else "")),
        ("tied embeddings", cfg.tie_word_embeddings),
        ("parameters", f"{human_count(params)} ({params:,})"),
        ("tensors", len(tensors)),
        ("file size", human_bytes(ckpt.file_bytes())),
    ]:
        summary.add_row(key, str(value))
    table = Table(title="tensors", title_justify="left")
    for col, justify in (("name", "left"), ("shape", "left"), ("dtype", "left"), ("count", "right"), ("size", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for pattern, shape, dtype, count, nbytes in grouped_tensors(ckpt):
        table.add_row(pattern, "x".join(map(str, shape)), dtype, str(count), human_bytes(nbytes))
    return Group(summary, table)
