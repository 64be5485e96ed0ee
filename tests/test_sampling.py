"""Sampling filters against their definitions, and the text stream's handling of stop strings and split UTF-8."""

from __future__ import annotations

import numpy as np
import pytest

from lutq.errors import LutqError
from lutq.runtime.generate import TextStream
from lutq.runtime.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04], np.float32))


def support(params: SamplingParams, n: int = 3000, context=()) -> set[int]:
    sampler = Sampler(params)
    return {sampler(LOGITS, list(context)) for _ in range(n)}


def test_greedy_is_argmax():
    assert support(SamplingParams(temperature=0), 10) == {0}


def test_top_k():
    assert support(SamplingParams(temperature=1, top_k=2, seed=0)) == {0, 1}


def test_top_p_keeps_smallest_prefix_reaching_mass():
    assert support(SamplingParams(temperature=1, top_p=0.7, seed=0)) == {0, 1}  # 0.5 < 0.7 <= 0.75
    assert support(SamplingParams(temperature=1, top_p=0.5, seed=0)) == {0}


def test_min_p():
    assert support(SamplingParams(temperature=1, min_p=0.25, seed=0)) == {0, 1, 2}  # keep p >= 0.125


def test_temperature_one_follows_the_distribution():
    sampler = Sampler(SamplingParams(temperature=1, seed=0))
    counts = np.bincount([sampler(LOGITS, []) for _ in range(20000)], minlength=5) / 20000
    assert np.allclose(counts, np.exp(LOGITS), atol=0.015)


def test_repetition_penalty_demotes_seen_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=10.0)
    assert Sampler(params)(np.array([2.0, 1.0, -1.0], np.float32), [0]) == 1  # 2/10 < 1


def test_seed_reproduces():
    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1, seed=seed))
        return [sampler(LOGITS, []) for _ in range(50)]

    assert draws(5) == draws(5) != draws(6)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1)])
def test_invalid_params(kw):
    with pytest.raises(LutqError):
        SamplingParams(**kw).validate()


def test_stream_stops_and_holds_back_stop_prefix():
    pieces = ["Hello", " wor", "ld", " EN", "D and more"]
    stream, shown = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["END"]), []
    for i in range(len(pieces)):
        delta, stopped = stream.push(list(range(i + 1)))
        shown.append(delta)
        if stopped:
            break
    assert stopped and "".join(shown) == "Hello world " and stream.text == "Hello world "
    assert shown[3] == " "  # "EN" could start "END": held back, never shown then retracted


def test_stream_holds_back_incomplete_utf8():
    texts = ["caf", "caf\ufffd", "café"]
    stream = TextStream(lambda ids: texts[len(ids) - 1], [])
    assert [stream.push([0] * n)[0] for n in (1, 2, 3)] == ["caf", "", "é"]
