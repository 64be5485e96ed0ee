"""GGUF files (llama.cpp's format): metadata becomes a ModelConfig, tensors get HF names and layout, and the
tokenizer is rebuilt from the metadata into a cached tokenizer.json.

Layout facts this module relies on:
- A GGUF tensor lists its dims innermost first (ne0 is the row length), so the HF shape is the reverse.
- llama.cpp's converter permutes the rows of q_proj and k_proj: GGML's RoPE rotates adjacent pairs (x0, x1) of each
  head while HF's rotates the two halves (x_i, x_{i+d/2}), so each head's halves get interleaved. `load` undoes it.
- llama3-style RoPE is not metadata but a `rope_freqs.weight` tensor of per-frequency factors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

import gguf
import numpy as np

from lutq.checkpoint.base import Checkpoint, TensorInfo
from lutq.checkpoint.cache import cache_root, cached_dir
from lutq.checkpoint.gguf_header import check_gguf_header
from lutq.config import ModelConfig
from lutq.errors import CheckpointError

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
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
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

# GGUF key (after "llama.") -> HF config field; the first four have no sensible default.
REQUIRED_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
}
OPTIONAL_KEYS = {
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
}


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def open_reader(path: Path) -> gguf.GGUFReader:
    check_gguf_header(path)  # gguf's reader trusts counts and offsets; refuse a file whose header lies first
    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or first_line(e)}") from None
    except Exception as e:
        # The reader walks the file's bytes with numpy slicing and no bounds checks, so a cut or damaged file
        # surfaces as whichever IndexError, ValueError, KeyError or UnicodeDecodeError it hits first.
        raise CheckpointError(path, f"truncated or corrupt GGUF ({type(e).__name__}: {first_line(e)})") from None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.

    The forward map views each head's rows as (half, i) and stores them as (i, half); viewing the stored rows as
    (i, half) and swapping back restores (half, i).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.path = Path(path)
        self._reader = open_reader(self.path)
        arch = self._value("general.architecture")
        if arch != "llama":
            raise CheckpointError(self.path, f"unsupported GGUF architecture {arch!r} (supported: llama)")
        gguf_names = {t.name for t in self._reader.tensors}
        if "rope_freqs.weight" in gguf_names:
            raise CheckpointError(
                self.path, "llama3-style RoPE scaling (tensor rope_freqs.weight) is not supported for GGUF files"
            )
        self.config = ModelConfig.from_hf_dict(self._config_dict(gguf_names), source=str(self.path))
        self._tensors = {self._hf_name(t.name): t for t in self._reader.tensors}
        self._tokenizer_dir: Path | None = None

    @property
    def format_name(self) -> str:
        return "GGUF"

    # ---- metadata

    def _value(self, key: str, default=None):
        field = self._reader.get_field(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except (IndexError, ValueError) as e:  # ValueError covers UnicodeDecodeError
            raise CheckpointError(self.path, f"metadata {key!r} is corrupt ({type(e).__name__})") from None
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The converter stored a float32; its shortest repr gives back the decimal it was written from (1e-05,
            # not 9.999999747378752e-06).
            value = float(str(np.float32(value)))
        return value

    def _array_len(self, key: str) -> int | None:
        field = self._reader.get_field(key)
        return len(field.data) if field is not None and field.types[:1] == [gguf.GGUFValueType.ARRAY] else None

    def _config_dict(self, gguf_names: set[str]) -> dict:
        d: dict = {"model_type": "llama"}
        for key, hf in REQUIRED_KEYS.items():
            value = self._value(f"llama.{key}")
            if value is None:
                raise CheckpointError(self.path, f"metadata key 'llama.{key}' is missing")
            d[hf] = value
        found = {hf: self._value(f"llama.{key}") for key, hf in OPTIONAL_KEYS.items()}
        found["head_dim"] = self._value("llama.attention.key_length", self._value("llama.rope.dimension_count"))
        found["vocab_size"] = self._value("llama.vocab_size", self._array_len("tokenizer.ggml.tokens"))
        found["rope_scaling"] = self._rope_scaling()
        d |= {hf: value for hf, value in found.items() if value is not None}  # absent: ModelConfig's defaults
        d["tie_word_embeddings"] = "output.weight" not in gguf_names
        d["attention_bias"] = any(re.fullmatch(r"blk\.\d+\.attn_[qkvo]\w*\.bias", n) for n in gguf_names)
        d["mlp_bias"] = any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in gguf_names)
        d["bos_token_id"] = self._value("tokenizer.ggml.bos_token_id")
        d["eos_token_id"] = self._value("tokenizer.ggml.eos_token_id")
        return d

    def _rope_scaling(self) -> dict | None:
        kind = self._value("llama.rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind != "linear":
            raise CheckpointError(self.path, f"unsupported RoPE scaling {kind!r} (supported: linear)")
        factor = self._value("llama.rope.scaling.factor")
        if not isinstance(factor, float) or factor <= 0:
            problem = f"linear RoPE scaling needs a positive llama.rope.scaling.factor, got {factor!r}"
            raise CheckpointError(self.path, problem)
        return {"rope_type": "linear", "factor": factor}

    def _hf_name(self, name: str) -> str:
        m = BLOCK_RE.fullmatch(name)
        if m and m[2] in BLOCK_NAMES:
            if int(m[1]) >= self.config.num_hidden_layers:
                problem = f"tensor {name!r} is past the {self.config.num_hidden_layers} layers of llama.block_count"
                raise CheckpointError(self.path, problem)
            return f"model.layers.{int(m[1])}.{BLOCK_NAMES[m[2]]}.{m[3]}"
        m = GLOBAL_RE.fullmatch(name)
        if m and m[1] in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[m[1]]}.{m[2]}"
        raise CheckpointError(self.path, f"tensor {name!r} has no counterpart in an HF llama model")

    # ---- tensors

    def tensors(self) -> list[TensorInfo]:
        return [
            TensorInfo(name, tuple(reversed(t.shape.tolist())), t.tensor_type.name, int(t.n_bytes))
            for name, t in self._tensors.items()
        ]

    def load(self, name: str) -> np.ndarray:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(self.path, f"tensor {name!r} is missing")
        if t.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(q.name for q in SUPPORTED_TYPES)
            problem = f"tensor {t.name!r} has type {t.tensor_type.name}; lutq reads {supported}"
            raise CheckpointError(self.path, problem)
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.tensor_type == Q.F32:
            w = np.array(w)  # F32 comes back as a view of the memory map; every other type is already a fresh array
        w = w.reshape(tuple(reversed(t.shape.tolist())))
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = self._unpermute(name, w, self.config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = self._unpermute(name, w, self.config.num_key_value_heads)
        return np.ascontiguousarray(w, dtype=np.float32)

    def _unpermute(self, name: str, w: np.ndarray, n_head: int) -> np.ndarray:
        if w.shape[0] % (2 * n_head):
            problem = f"tensor {name!r} has {w.shape[0]} rows, not a multiple of 2 x {n_head} heads"
            raise CheckpointError(self.path, problem)
        return unpermute_rows(w, n_head)

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        # Handed-out arrays are copies, so dropping the reader (and with it every view of the map) unmaps the file.
        self._tensors = {}
        self._reader = None

    # ---- tokenizer

    def tokenizer_dir(self) -> Path:
        if self._tokenizer_dir is None:
            self._tokenizer_dir = self._cached_tokenizer_dir()
        return self._tokenizer_dir

    def _cache_key(self) -> str:
        st = self.path.stat()
        # transformers' version is in the key because the tokenizer it builds from the same metadata changes with it.
        ident = f"{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{importlib.metadata.version('transformers')}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def _cached_tokenizer_dir(self) -> Path:
        return cached_dir(cache_root("gguf-tokenizers") / self._cache_key(), self._write_tokenizer)

    def _write_tokenizer(self, out: Path) -> None:
        # Imported here: it costs a second, and a cached tokenizer never needs it. It must stay this module and not
        # get_gguf_tokenizer or transformers' gguf `reader`, which import torch.
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

        grouped = {
            group: {hf: v for key, hf in renames.items() if (v := self._value(f"tokenizer.{key}")) is not None}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
        tokens = tokenizer.get("tokens")
        if not tokens:
            raise CheckpointError(self.path, "no tokenizer in the metadata (tokenizer.ggml.tokens is missing)")
        if tokenizer.get("tokenizer_type") == "llama":
            # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
            config.setdefault("add_bos_token", True)
        for special in ("bos", "eos", "unk", "pad"):
            token_id = tokenizer.get(f"{special}_token_id")
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                config[f"{special}_token"] = tokens[token_id]
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        try:
            backend, _ = convert_gguf_tokenizer("llama", tokenizer)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot build a tokenizer from the metadata: {first_line(e)}") from None
        try:
            backend.save(str(out / "tokenizer.json"))
            with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
        except OSError as e:
            raise CheckpointError(out, f"cannot write the tokenizer: {e.strerror or first_line(e)}") from None
