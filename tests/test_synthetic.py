"""`random:SHAPE` models: the real architectures' shapes, reproducible weights, a byte tokenizer kept in the cache."""

from __future__ import annotations

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.errors import CheckpointError
from lutq.runtime.tokenizer import Tokenizer


@pytest.mark.parametrize("shape,layers,hidden,tied", [("tinyllama-1.1b", 22, 2048, False),
                                                       ("llama3.2-1b", 16, 2048, True), ("bitnet-2b", 30, 2560, True)])
def test_shapes_follow_the_real_configs(shape, layers, hidden, tied):
    ckpt = open_checkpoint(f"random:{shape}")
    cfg = ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (layers, hidden, tied)
    shapes = {t.name: t.shape for t in ckpt.tensors()}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (cfg.num_key_value_heads * cfg.head_dim, hidden)
    assert ("lm_head.weight" in shapes) is not tied
    w = ckpt.load("model.layers.3.mlp.down_proj.weight")
    assert w.shape == (hidden, cfg.intermediate_size) and w.dtype == np.float32
    assert np.array_equal(w, open_checkpoint(f"random:{shape}").load("model.layers.3.mlp.down_proj.weight"))
    if cfg.model_type == "bitnet":  # ternary times one scale, as a BitNet checkpoint holds them
        assert len(np.unique(w)) == 3


def test_byte_tokenizer_is_written_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = open_checkpoint("random:tinyllama-1.1b").tokenizer_dir()
    assert first == open_checkpoint("random:tinyllama-1.1b").tokenizer_dir()
    assert first.parent == tmp_path / "lutq" / "random-tokenizers"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging directories left behind
    tok = Tokenizer(first)
    ids = tok.encode("héllo")
    assert tok.decode(ids) == "héllo" and max(ids) < 256


def test_unknown_shape():
    with pytest.raises(CheckpointError, match="unknown shape"):
        open_checkpoint("random:gpt-5")
