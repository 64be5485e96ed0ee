"""Prefill and decode speed of the fp32 reference runtime (the baseline later speedups are measured against).

Usage: OPENBLAS_NUM_THREADS=N python scripts/bench_fp32.py [MODEL] [--prompt-tokens 128] [--decode-tokens 64] [--repeats 5]
Prints medians over repeats. Thread count comes from the environment, set before numpy loads.
"""

import argparse
import statistics
import time

import numpy as np

from lutq.checkpoint import open_checkpoint
from lutq.runtime.model import load_model

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="smollm2-135m")
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--decode-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=5)
a = ap.parse_args()
net = load_model(open_checkpoint(a.model), a.prompt_tokens + a.decode_tokens + 1)
prompt = np.random.default_rng(0).integers(0, net.config.vocab_size, a.prompt_tokens)
prefill, decode = [], []
for _ in range(a.repeats):
    net.reset()
    t0 = time.perf_counter()
    logits = net.forward(prompt)
    prefill.append(a.prompt_tokens / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(a.decode_tokens):
        logits = net.forward(np.asarray([int(np.argmax(logits))]))
    decode.append(a.decode_tokens / (time.perf_counter() - t0))
print(f"prefill {statistics.median(prefill):.1f} tok/s  decode {statistics.median(decode):.1f} tok/s  "
      f"(prompt {a.prompt_tokens}, decode {a.decode_tokens}, median of {a.repeats})")
