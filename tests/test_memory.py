"""Bounded memory: `lutq quantize` streams tensor by tensor, and its peak is about two copies of the largest tensor
(the fp32 weight and its dequantized copy for the error report) plus a constant, not a multiple of the model.

Measured with tracemalloc (numpy reports its buffers to it) on models small enough for a test; the figure for
TinyLlama-1.1B's shape, measured with /usr/bin/time, is in docs/FORMAT.md ("Memory").
"""

from __future__ import annotations

import tracemalloc
import weakref

import pytest

from lutq.checkpoint import lutq_dir, open_checkpoint
from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
from lutq.quantize.rules import parse_rules
from tiny import make_numpy_model

MiB = 1 << 20
CONSTANT = 48 * MiB  # row-chunk and tile-chunk temporaries of the search and the packing, on every worker thread


class Watched:
    """A checkpoint whose loaded tensors are watched: how many are still alive whenever the next one is loaded."""

    def __init__(self, ckpt):
        self._ckpt, self.alive, self.most_alive = ckpt, 0, 0

    def load(self, name):
        self.most_alive = max(self.most_alive, self.alive)
        w = self._ckpt.load(name)
        self.alive += 1
        weakref.finalize(w, self._dropped)
        return w

    def _dropped(self):
        self.alive -= 1

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_models):
    """One layer whose MLP weights (8M weights, 32 MiB in fp32 each) dwarf everything else."""
    tok = tiny_models("llama")[0]
    return make_numpy_model(tmp_path_factory.mktemp("wide") / "m", 1024, 8192, 1, tokenizer_from=tok)


@pytest.mark.parametrize("fmt", ["int4", "nf4,*.up_proj=fineq,*.down_proj=ternary"])
def test_one_tensor_at_a_time(tiny_models, tmp_path, fmt):
    with open_checkpoint(tiny_models("llama")[0]) as ckpt:
        watched = Watched(ckpt)
        quantize_checkpoint(watched, tmp_path / "q", QuantizeOptions(parse_rules(fmt), 32))
    assert watched.most_alive == 0  # each tensor was dropped before the next was read
    assert watched.alive == 0  # and nothing kept the last one


def peak_while_quantizing(src, out, fmt, refine=False) -> int:
    with open_checkpoint(src) as ckpt:
        tracemalloc.start()
        try:
            quantize_checkpoint(ckpt, out, QuantizeOptions(parse_rules(fmt), 64, refine=refine))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["int4", "ternary"])  # the bitserial packing; the one scale over a whole tensor
def test_peak_is_two_largest_tensors_plus_a_constant(wide, tmp_path, fmt):
    largest = 1024 * 8192 * 4
    peak = peak_while_quantizing(wide, tmp_path / "q", fmt)
    print(f"\n{fmt}: peak {peak / MiB:.0f} MiB, largest tensor {largest / MiB:.0f} MiB")
    assert peak < 2 * largest + CONSTANT


def test_peak_does_not_grow_with_the_number_of_layers(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(lutq_dir, "COPY_CHUNK", 64 << 10)  # the final copy's buffer is a constant of its own
    tok = tiny_models("llama")[0]
    peaks = [peak_while_quantizing(make_numpy_model(tmp_path / f"m{n}", 256, 1024, n, tokenizer_from=tok),
                                   tmp_path / f"q{n}", "int4") for n in (1, 6)]
    assert peaks[1] < peaks[0] * 1.1 + MiB, [p / MiB for p in peaks]
