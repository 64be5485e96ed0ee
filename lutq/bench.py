"""`lutq bench MODEL`: prefill and decode speed, time to first token, memory and load time, per format and thread count.

Each format runs in its own worker process (`python -m lutq.bench WORKER-ARGS`), so its load time and peak RSS are its
own; inside a worker, the thread counts are interleaved repeat by repeat and medians are reported, so a noisy
neighbour slows every configuration alike instead of one. Formats that are not a lutq directory already are quantized
first (into a cache under ~/.cache/lutq/bench, reused by later runs with the same source and options).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lutq.errors import LutqError

FP = ("fp32",)  # the unquantized model, run as loaded


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lutq" / "bench"


def quantized_copy(model: str, fmt: str, group_size: int, on_status=None) -> str:
    """A lutq directory of `model` quantized with the rules `fmt`, cached. lm_head gets `lutq quantize`'s default
    (int6k, G = 32: llama.cpp also keeps its output matrix at 6 bits) unless `fmt` names it."""
    from lutq.checkpoint import open_checkpoint
    from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
    from lutq.quantize.rules import parse_rules

    src = Path(model)
    ident = f"head-int6k|{src.resolve() if src.exists() else model}|{src.stat().st_mtime_ns if src.exists() else ''}|{fmt}|{group_size}"
    out = cache_dir() / f"{Path(model).name}-{fmt.replace(',', '_').replace('=', '-').replace('*', 'x')}-g{group_size}-" \
                        f"{hashlib.sha256(ident.encode()).hexdigest()[:8]}"
    if (out / "config.json").exists():
        return str(out)
    if on_status:
        on_status(f"quantizing {model} to {fmt} (cached in {out})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_checkpoint(model) as ckpt:
        quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(fmt), group_size), force=True)
    return str(out)


def worker(model: str, threads: list[int], prompt_tokens: int, gen_tokens: int, repeats: int,
           kv_cache: str = "f32") -> list[dict]:
    """Runs in its own process: load `model`, measure each thread count `repeats` times, interleaved."""
    import numba
    import numpy as np

    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.model import load_model

    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    net = load_model(ckpt, prompt_tokens + gen_tokens + 1, kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(0, net.config.vocab_size, prompt_tokens)
    params = sum(int(np.prod(t.shape)) for t in ckpt.tensors())
    model_bytes = ckpt.file_bytes()

    def run_once():
        net.reset()
        t = time.perf_counter()
        logits = net.forward(prompt)
        tok = int(np.argmax(logits))
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(gen_tokens):
            tok = int(np.argmax(net.forward(np.asarray([tok]))))
        return prefill, time.perf_counter() - t

    numba.set_num_threads(max(threads))
    run_once()  # compile and warm caches
    runs = {n: [] for n in threads}
    for _ in range(repeats):
        for n in threads:
            numba.set_num_threads(n)
            runs[n].append(run_once())
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = []
    for n in threads:
        prefill = statistics.median(r[0] for r in runs[n])
        decode = statistics.median(r[1] for r in runs[n])
        records.append({"threads": n, "prefill_tps": prompt_tokens / prefill, "decode_tps": gen_tokens / decode,
                        "ttft_s": prefill, "peak_rss_mb": peak_rss_mb, "model_bytes": model_bytes,
                        "bits_per_weight": 8 * model_bytes / params, "load_s": load_s,
                        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats})
    return records


def run(model: str, formats: list[str], threads: list[int], prompt_tokens: int, gen_tokens: int, repeats: int,
        group_size: int = 64, on_status=None, kv_cache: str = "f32") -> list[dict]:
    """One record per (format, threads), in the order given."""
    records = []
    for fmt in formats:
        target = model if fmt in FP or fmt == "as-is" else quantized_copy(model, fmt, group_size, on_status)
        if on_status:
            on_status(f"measuring {fmt} on {', '.join(map(str, threads))} thread(s)")
        env = {"OPENBLAS_THREAD_TIMEOUT": "4", **os.environ, "NUMBA_NUM_THREADS": str(max(threads)),
               "OPENBLAS_NUM_THREADS": str(max(threads)), "OMP_NUM_THREADS": str(max(threads))}  # see cli.set_threads
        args = [sys.executable, "-m", "lutq.bench", target, ",".join(map(str, threads)), str(prompt_tokens),
                str(gen_tokens), str(repeats), kv_cache]
        res = subprocess.run(args, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise LutqError(f"bench worker for {fmt} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        for rec in json.loads(res.stdout):
            records.append({"model": model, "format": fmt, "rules": fmt, "kv_cache": kv_cache, **rec})
    return records


def table(records: list[dict]):
    from rich.table import Table

    best = max(r["decode_tps"] for r in records)
    t = Table(title="lutq bench (medians)", title_justify="left")
    for col in ("model", "format (rules)", "threads", "bits/weight", "size MiB", "load s", "peak RSS MiB", "prefill tok/s",
                "TTFT s", "decode tok/s", ""):
        t.add_column(col, justify="left" if col in ("model", "format (rules)", "") else "right")
    for r in records:
        bar = "█" * max(1, round(30 * r["decode_tps"] / best))
        t.add_row(Path(r["model"]).name, r["rules"], str(r["threads"]), f"{r['bits_per_weight']:.2f}",
                  f"{r['model_bytes'] / 2**20:.1f}", f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['prefill_tps']:.1f}", f"{r['ttft_s']:.3f}", f"{r['decode_tps']:.1f}", bar)
    return t


if __name__ == "__main__":
    model_arg, threads_arg, prompt_arg, gen_arg, repeats_arg, kv_arg = sys.argv[1:7]
    print(json.dumps(worker(model_arg, [int(v) for v in threads_arg.split(",")], int(prompt_arg), int(gen_arg),
                            int(repeats_arg), kv_arg)))
