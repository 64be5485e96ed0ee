"""`--calibration SOURCE`: the inputs GPTQ (lutq/quantize/gptq.py) rounds for, and their Hessians.

SOURCE is
- `self` or `self:TOKENS` (default 8192 tokens): text the fp model writes itself, data-free as in LLM-QAT (Liu et al.
  2023): each sequence starts from a random ordinary token, continues greedily for GREEDY_START tokens (a random
  token alone is no context), then samples at temperature 1 from the full distribution, special tokens masked so
  no sequence ends early. Seeded (`--calibration-seed`, default 0), so the same model and seed give the same ids;
  they are kept under the cache home (`${XDG_CACHE_HOME:-~/.cache}/lutq/calibration/<key>`), keyed by the source
  files' identity (path, size, mtime) and the generation's settings, so a second quantize of the same model does
  not generate again.
- `PATH` or `PATH:TOKENS`: the first TOKENS (default 8192) tokens of a UTF-8 text file.

Either way the tokens are cut into windows of WINDOW tokens (the model's context if shorter), each run from an empty
KV cache (self-generated text comes in whole windows: TOKENS rounded up; a file's tail short of a window is dropped).

Hessians: H = sum over calibration tokens of x x^T (float64) for each linear layer's input. q/k/v read one input
(the attention norm's output), gate/up another, o_proj and down_proj their own; lm_head reads the final norm's.
`LayerHessians` runs the fp32 runtime's operators (lutq/runtime) one decoder layer at a time over every window,
keeping only the hidden states entering the current layer (f32[windows, WINDOW, D]) and that layer's Hessians, so
memory is bounded by one layer whatever the model's depth. With `sequential`, the hidden states enter each layer
through the layers before it as quantized (GPTQ's own protocol: layer i is rounded for the inputs it will really
see); without, through the fp weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lutq.errors import LutqError

SELF = "self"
DEFAULT_TOKENS = 8192
WINDOW = 512
GREEDY_START = 3
GENERATION_BATCH = 16  # sequences generated side by side: one GEMM per layer instead of 16 GEMVs
GENERATOR_VERSION = 1  # part of the cache key: bump when the generated ids would change


@dataclass(frozen=True)
class CalibrationSource:
    spec: str  # as the user gave it, recorded in quantization_config
    tokens: int
    path: Path | None = None  # None: self-generated
    seed: int = 0

    @property
    def is_self(self) -> bool:
        return self.path is None


def parse_calibration(spec: str) -> CalibrationSource:
    """`self[:TOKENS]` or `PATH[:TOKENS]`, the file checked readable as UTF-8 text (LutqError naming it if not)."""
    name, colon, count = spec.rpartition(":")
    if not colon or not count.isdigit() or (name != SELF and not Path(name).is_file() and Path(spec).exists()):
        name, count = spec, ""
    tokens = int(count) if count else DEFAULT_TOKENS
    if tokens < 2:
        raise LutqError(f"--calibration {spec!r}: at least 2 tokens are needed, got {tokens}")
    if name == SELF:
        return CalibrationSource(spec, tokens)
    path = Path(name)
    read_text(path)
    return CalibrationSource(spec, tokens, path)


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise LutqError(f"{path}: cannot read as calibration text, a UTF-8 text file ({why}); --calibration is "
                        f"'self', 'self:TOKENS', or a text file, 'PATH[:TOKENS]'") from None
    if not text.strip():
        raise LutqError(f"{path}: the calibration text is empty")
    return text


def window_length(cfg) -> int:
    return min(WINDOW, cfg.max_position_embeddings)


def calibration_windows(ckpt, source: CalibrationSource) -> np.ndarray:
    """The calibration token ids, i64[windows, T]."""
    from lutq.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(ckpt.tokenizer_dir(), ckpt.config.eos_token_ids)
    if source.is_self:
        return cached_self_text(ckpt, tokenizer, source.tokens, source.seed)
    ids = np.asarray(tokenizer.encode(read_text(source.path))[: source.tokens], np.int64)
    if len(ids) < 2:
        raise LutqError(f"{source.path}: {len(ids)} token(s) of calibration text; at least 2 are needed")
    t = min(window_length(ckpt.config), len(ids))
    return ids[: len(ids) // t * t].reshape(-1, t)


# --- self-generated text ---------------------------------------------------------------------------------------------

def banned_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """Ids never generated: special tokens (an EOS would end a sequence early) and any rows of the embedding beyond the
    tokenizer's vocabulary (padding)."""
    banned = np.zeros(vocab_size, bool)
    special = [i for i in (*tokenizer.hf.all_special_ids, *tokenizer.eos_token_ids) if 0 <= i < vocab_size]
    banned[special] = True
    banned[len(tokenizer.hf):] = True
    return banned


def generate_self_text(model, banned: np.ndarray, n_seq: int, length: int, seed: int) -> np.ndarray:
    """n_seq sequences of `length` tokens from `model` (a runtime LlamaModel), i64[n_seq, length], seeded.

    Sequences run side by side through the model's layers, each with its own KV cache (the runtime's compiled
    single-token attention), so a step is a few GEMMs rather than a GEMV per sequence.
    """
    from lutq.runtime.attention import KVCache
    from lutq.runtime.llama import rms_norm, silu_mul

    cfg, eps = model.config, model.config.rms_norm_eps
    rng = np.random.default_rng(seed)
    allowed = np.flatnonzero(~banned)
    out = np.empty((n_seq, length), np.int64)
    for s0 in range(0, n_seq, GENERATION_BATCH):
        b = min(GENERATION_BATCH, n_seq - s0)
        caches = [KVCache(cfg, length) for _ in range(b)]
        tokens = allowed[rng.integers(0, len(allowed), b)]
        for pos in range(length):
            out[s0 : s0 + b, pos] = tokens
            if pos + 1 == length:
                break
            x = model.embed[tokens].astype(np.float32)  # f32[b, D]
            for i, layer in enumerate(model.layers):
                qkv = layer.qkv_proj(rms_norm(x, layer.input_norm, eps))
                att = np.concatenate([c.attend(i, qkv[j : j + 1], None) for j, c in enumerate(caches)])
                x = x + layer.o_proj(att)
                x = x + layer.down_proj(silu_mul(layer.gate_up_proj(rms_norm(x, layer.post_attention_norm, eps))))
            for c in caches:
                c.pos += 1
            logits = model.lm_head(rms_norm(x, model.norm, eps)).astype(np.float64)  # f64[b, V]
            logits[:, banned] = -np.inf
            if pos < GREEDY_START:
                tokens = logits.argmax(axis=1)
                continue
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            cdf = np.cumsum(p, axis=1)
            u = rng.random(b)[:, None] * cdf[:, -1:]
            tokens = np.minimum((cdf < u).sum(axis=1), len(banned) - 1)
    return out


def source_identity(ckpt) -> list:
    """What identifies the source model's files: resolved path, size and mtime of the file or of each file in the
    directory (a changed checkpoint gets new calibration text)."""
    path = Path(ckpt.path)
    if not path.exists():
        return [str(ckpt.path)]  # random:SHAPE models: the name is the identity
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(ckpt, n_seq: int, length: int, seed: int) -> str:
    ident = json.dumps({"source": source_identity(ckpt), "sequences": n_seq, "length": length, "seed": seed,
                        "greedy_start": GREEDY_START, "version": GENERATOR_VERSION})
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def cached_self_text(ckpt, tokenizer, tokens: int, seed: int) -> np.ndarray:
    """Self-generated calibration ids, i64[windows, T], generated once per model and settings, then read from the
    cache."""
    from lutq.checkpoint.cache import cache_root, cached_dir
    from lutq.runtime.llama import load_llama

    length = window_length(ckpt.config)
    n_seq = -(-tokens // length)
    key = cache_key(ckpt, n_seq, length, seed)

    def write(directory: Path) -> None:
        model = load_llama(ckpt, length)
        ids = generate_self_text(model, banned_ids(tokenizer, ckpt.config.vocab_size), n_seq, length, seed)
        np.save(directory / "ids.npy", ids)
        (directory / "source.json").write_text(json.dumps({"model": str(ckpt.path), "seed": seed}) + "\n")

    directory = cached_dir(cache_root("calibration") / key, write, lambda d: (d / "ids.npy").is_file())
    ids = np.load(directory / "ids.npy", allow_pickle=False)
    if ids.shape != (n_seq, length) or ids.dtype != np.int64:
        raise LutqError(f"{directory}: the cached calibration text is damaged; delete the directory")
    return ids


# --- Hessians, one layer at a time -----------------------------------------------------------------------------------

LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")
INPUT_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
LM_HEAD = "lm_head.weight"


def stage_of(name: str, n_layers: int) -> int | None:
    """The layer whose input a weight reads (n_layers: lm_head, after the last), or None: no Hessian for it."""
    if name == LM_HEAD:
        return n_layers
    m = LAYER_WEIGHT.fullmatch(name)
    return int(m.group(1)) if m else None


def input_of(name: str) -> str:
    m = LAYER_WEIGHT.fullmatch(name)
    return INPUT_OF[m.group(2)] if m else "head"


class WithWeights:
    """A checkpoint with some tensors replaced (the quantized layers, for `sequential`); only what TensorSource reads."""

    def __init__(self, ckpt, replaced: dict[str, np.ndarray]):
        self.ckpt, self.replaced = ckpt, replaced
        self.path, self.config = ckpt.path, ckpt.config

    def tensors(self):
        return self.ckpt.tensors()

    def load(self, name: str) -> np.ndarray:
        return self.replaced[name] if name in self.replaced else self.ckpt.load(name)


def gram(x: np.ndarray) -> np.ndarray:
    """x^T x in float64 for x f32[T, K]."""
    x = x.astype(np.float64)
    return x.T @ x


def layer_forward(cfg, layer, i: int, x: np.ndarray, record: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Decoder layer i (a LlamaLayer) over hidden states x f32[windows, T, D], each window from an empty KV cache:
    the hidden states after it. Adds each linear input's x^T x to `record` ("qkv", "o", "gate_up", "down") when
    given."""
    from lutq.runtime.attention import KVCache
    from lutq.runtime.llama import rms_norm, silu_mul

    eps, t = cfg.rms_norm_eps, x.shape[1]
    cache = KVCache(cfg, t)
    mask = cache.causal_mask(t)
    out = np.empty_like(x)
    for w, xw in enumerate(x):  # xw: f32[T, D], one window
        h = rms_norm(xw, layer.input_norm, eps)
        att = cache.attend(i, layer.qkv_proj(h), mask)  # f32[T, H*hd]
        xw = xw + layer.o_proj(att)
        h2 = rms_norm(xw, layer.post_attention_norm, eps)
        act = silu_mul(layer.gate_up_proj(h2))  # f32[T, F]
        out[w] = xw + layer.down_proj(act)
        if record is not None:
            for key, inp in (("qkv", h), ("o", att), ("gate_up", h2), ("down", act)):
                record[key] += gram(inp)
    return out


class LayerHessians:
    """The Hessian of each linear weight's input, computed a layer at a time as weights are asked for in layer order.

    get(name) for a layer ahead of the current one moves the hidden states forward through the layers between (with
    `sequential`, through the weights given to quantized(name, w_hat) where there are some); asking for an earlier
    layer than the current one is a bug in the caller (weights must be quantized in layer order).
    """

    def __init__(self, ckpt, windows: np.ndarray, sequential: bool = False):
        cfg = ckpt.config
        if cfg.model_type == "bitnet":
            raise LutqError(f"{ckpt.path}: --calibration supports Llama-family models (llama, mistral, qwen2), "
                            f"not bitnet")
        self.ckpt, self.cfg, self.sequential = ckpt, cfg, sequential
        self.windows = windows
        embed = ckpt.rows("model.embed_tokens.weight")
        # f32[windows, T, D]: the hidden states entering `layer`
        self.x = np.asarray(embed[windows.ravel()], np.float32).reshape(*windows.shape, cfg.hidden_size)
        self.layer = 0
        self.h: dict[str, np.ndarray] | None = None  # the current layer's Hessians, once collected
        self.x_next: np.ndarray | None = None  # the fp pass's output of the current layer, computed with its Hessians
        self.replaced: dict[str, np.ndarray] = {}
        self.prepared: dict[str, object] = {}  # the current layer's gptq.Hessian per input

    def hessian(self, name: str):
        """get(name) as a gptq.Hessian (with its sweep order and factor), computed once per input: q, k and v share
        one. None for a weight without a Hessian."""
        h = self.get(name)
        if h is None:
            return None
        key = input_of(name)
        if key not in self.prepared:
            from lutq.quantize.gptq import Hessian

            self.prepared[key] = Hessian.of(h)
        return self.prepared[key]

    @property
    def tokens(self) -> int:
        return self.windows.size

    def get(self, name: str) -> np.ndarray | None:
        """H f64[K, K] for weight `name`'s input, or None for a weight that has none (not a decoder or head linear)."""
        stage = stage_of(name, self.cfg.num_hidden_layers)
        if stage is None:
            return None
        if stage < self.layer:
            raise RuntimeError(f"{name}: Hessians are computed in layer order; layer {self.layer} is past it")
        while self.layer < stage:
            self.advance()
        if self.h is None:
            self.h = self.collect()
        return self.h[input_of(name)]

    def quantized(self, name: str, w_hat: np.ndarray) -> None:
        """The weight `name` as quantized (f32, dequantized): with `sequential`, what later layers' inputs go through."""
        if self.sequential and stage_of(name, self.cfg.num_hidden_layers) is not None:
            self.replaced[name] = w_hat

    def build_layer(self, i: int, quantized: bool):
        from lutq.runtime.llama import LlamaLayer, TensorSource, llama_layer_parts

        src = TensorSource(WithWeights(self.ckpt, self.replaced) if quantized else self.ckpt, kernels=False)
        return LlamaLayer(**llama_layer_parts(src, i))

    def run_layer(self, layer, i: int, record: dict[str, np.ndarray] | None) -> np.ndarray:
        """The hidden states after layer i, f32[windows, T, D]; adds each input's x^T x to `record` when given."""
        return layer_forward(self.cfg, layer, i, self.x, record)

    def collect(self) -> dict[str, np.ndarray]:
        cfg, i = self.cfg, self.layer
        if i == cfg.num_hidden_layers:  # lm_head reads the final norm's output
            from lutq.runtime.llama import TensorSource, rms_norm

            norm = TensorSource(self.ckpt, kernels=False).get("model.norm.weight", (cfg.hidden_size,))
            h = np.zeros((cfg.hidden_size, cfg.hidden_size))
            for x in self.x:
                h += gram(rms_norm(x, norm, cfg.rms_norm_eps))
            return {"head": h}
        d, f, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
        record = {key: np.zeros((k, k)) for key, k in (("qkv", d), ("o", a), ("gate_up", d), ("down", f))}
        out = self.run_layer(self.build_layer(i, False), i, record)
        if not self.sequential:
            self.x_next = out  # the fp layer's output is the next layer's input: no second pass
        return record

    def advance(self) -> None:
        """Move the hidden states through the current layer."""
        i = self.layer
        if self.x_next is not None:
            self.x = self.x_next
        else:
            self.x = self.run_layer(self.build_layer(i, self.sequential), i, None)
        self.layer, self.h, self.x_next, self.prepared = i + 1, None, None, {}
        prefix = f"model.layers.{i}."
        self.replaced = {n: w for n, w in self.replaced.items() if not n.startswith(prefix)}
