"""`--rotate`: an exactly equivalent Llama model whose weights have fewer outliers, made before anything is quantized.

QuaRot (Ashkboos et al. 2024) and SpinQuant (Liu et al. 2024), their offline, fusable part; QuIP's incoherence idea
(Chee et al. 2023). A few input channels of the residual stream carry most of the energy, and the columns of every
weight that reads them hold outliers that stretch each group's grid. Turning the residual stream by an orthogonal Q
[D, D] spreads every channel over all of them: the weights in the new basis have the same output but flatter groups.

Why the model is unchanged (HF layout, W [out, in], y = x W^T; x' = x Q is the residual stream in the new basis):
1. RMSNorm(x) = x / rms(x) * w. Fold each norm's weight w into the linears reading its output, W <- W diag(w), and
   set w = 1 (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, model.norm -> lm_head). Without a
   weight the norm commutes with Q: rms(x Q) = rms(x) for orthogonal Q, so norm(x') = norm(x) Q.
2. Readers of the residual stream: y = norm(x) W^T = norm(x') Q^T W^T, so W <- W Q (q, k, v, gate, up, lm_head);
   the embedding E <- E Q (its rows are the stream's first value).
3. Writers to it: x' += (a W^T + b) Q, so W <- Q^T W and b <- b Q (o_proj, down_proj).
4. Values and heads (per head, head_dim hd, Hv [hd, hd] orthogonal): each KV head's value rows W_v[g] <- Hv^T W_v[g]
   (its bias b <- b Hv), so v' = v Hv; attention mixes positions, not channels, so every query head's output turns
   alike, att_j' = att_j Hv, and o_proj's columns of head j take it back, W_o[:, j] <- W_o[:, j] Hv (GQA: query head
   j reads KV head j // (H / KV), whose value rotation is the same Hv). q and k are left alone: RoPE does not commute.

Q is a randomised Hadamard matrix (QuaRot): for D = 2^k m (m odd), diag(random signs) (H_{2^k} / sqrt(2^k)) x R_m
(Kronecker product, R_m a random orthogonal m x m; SmolLM2: 576 = 64 x 9); `random` is a random orthogonal matrix
(QR of a Gaussian, signs fixed so that it is Haar distributed). Hv is built the same way at hd. Both are seeded.

Massive channels (`keep`): Q may leave some channels alone (identity there), whose norm weights then stay unfolded;
the rest is folded and turned as above, and the model is still the same. SmolLM2 needs it: two channels hold a
fifth to a half of every norm input's energy and its MLP norms weigh them ~0, so unrotated their weight columns'
error is multiplied by ~0 and rotated it is not (massive_channels; models.md, "With rotation").

A tied lm_head cannot stay tied: after folding the final norm it is E diag(w) Q, the embedding E Q. The rotated
model therefore has its own lm_head.weight and says tie_word_embeddings false (convert.py decides how it is stored).

The runtime needs nothing: the result is an ordinary Llama checkpoint. `RotatedCheckpoint` computes each tensor
when it is loaded (one weight at a time, as every reader does), the rotated embedding once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from lutq.checkpoint.base import Checkpoint, TensorInfo
from lutq.errors import LutqError

KINDS = ("hadamard", "random")
LLAMA_LIKE = ("llama", "mistral", "qwen2")
REFUSED_FORMATS = ("ternary", "ternary-group")  # for checkpoints trained ternary: a rotation would undo that
EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|"
                          r"mlp\.(?:gate|up|down)_proj)\.(weight|bias)")
READS_NORM = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
              "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
              "mlp.up_proj": "post_attention_layernorm"}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
CHUNK_ROWS = 4096  # rows of the embedding / head turned at a time (float64 work buffer: CHUNK_ROWS x D)


@dataclass(frozen=True)
class RotationSpec:
    kind: str = "hadamard"
    seed: int = 0
    keep: int = 0  # residual channels left out of the rotation: the `keep` of largest energy (massive_channels)

    def to_json(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "keep": self.keep}


# --- orthogonal matrices ---------------------------------------------------------------------------------------------

def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix, f64[n, n] of +-1 with H H^T = n I; n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"no Sylvester Hadamard matrix of size {n}")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal f64[n, n]: Q of the QR of a Gaussian, each column's sign set by R's diagonal (without
    that fix Q is biased towards the identity's signs)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def orthogonal(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A seeded orthogonal f64[n, n] of the given kind (see the module docstring)."""
    if kind == "random":
        return random_orthogonal(n, rng)
    if kind != "hadamard":
        raise LutqError(f"--rotate-kind must be one of {', '.join(KINDS)}, got {kind!r}")
    p = n & -n  # the largest power of two dividing n
    h = hadamard(p) / np.sqrt(p)
    q = h if p == n else np.kron(h, random_orthogonal(n // p, rng))
    signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return signs[:, None] * q  # diag(signs) q: random signs so that the same Hadamard never meets the same outliers


def massive_channels(ckpt: Checkpoint, count: int, seed: int, tokens: int = 128) -> np.ndarray:
    """The `count` residual channels of largest energy, i64[count] sorted: mean over the norms' inputs (every layer's
    two, the final one) of x^2 / mean(x^2), for `tokens` seeded random token ids run through the fp model.

    Massive activations (Sun et al. 2024) sit in a few fixed channels whatever the input, and the norm weights that
    read them are often near 0 (SmolLM2: channels 247 and 507 hold 20-50% of every norm input's energy; the MLP norms'
    weights there are ~0.00). A rotation turns that direction into every weight column alike, where quantization
    error is no longer multiplied by ~0: leaving those channels out keeps it so."""
    from lutq.runtime.attention import KVCache
    from lutq.runtime.llama import LlamaLayer, TensorSource, llama_layer_parts, rms_norm, silu_mul

    cfg = ckpt.config
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, min(tokens, cfg.max_position_embeddings))
    src = TensorSource(ckpt, kernels=False)
    x = np.asarray(ckpt.rows(EMBED)[ids], np.float32)  # f32[T, D]
    cache = KVCache(cfg, len(ids))
    mask = cache.causal_mask(len(ids))
    energy = np.zeros(cfg.hidden_size)

    def add(v: np.ndarray) -> None:  # v f32[T, D], a norm's input: each token's share of its own energy per channel
        sq = v.astype(np.float64) ** 2
        np.add(energy, np.mean(sq / (sq.mean(axis=1, keepdims=True) + 1e-30), axis=0), out=energy)

    for i in range(cfg.num_hidden_layers):
        layer = LlamaLayer(**llama_layer_parts(src, i))
        add(x)
        x = x + layer.o_proj(cache.attend(i, layer.qkv_proj(rms_norm(x, layer.input_norm, cfg.rms_norm_eps)), mask))
        add(x)
        x = x + layer.down_proj(silu_mul(layer.gate_up_proj(rms_norm(x, layer.post_attention_norm, cfg.rms_norm_eps))))
    add(x)
    return np.sort(np.argsort(-energy, kind="stable")[:count])


# --- the rotated checkpoint ------------------------------------------------------------------------------------------

def check_rotatable(ckpt: Checkpoint) -> None:
    """A LutqError naming --rotate unless ckpt is a Llama-family model with exactly the tensors rotation handles."""
    cfg = ckpt.config
    if cfg.model_type not in LLAMA_LIKE or cfg.hidden_act not in ("silu", "swish"):
        raise LutqError(f"{ckpt.path}: --rotate supports Llama-family models ({', '.join(LLAMA_LIKE)}), not "
                        f"{cfg.model_type} (its norms and ternary weights do not survive a rotation)")
    names = {t.name for t in ckpt.tensors()}
    for name in sorted(names):
        if name not in (EMBED, LM_HEAD, FINAL_NORM) and not LAYER_TENSOR.fullmatch(name):
            raise LutqError(f"{ckpt.path}: --rotate cannot rotate tensor {name!r} (not part of a Llama block)")
    needed = [EMBED, FINAL_NORM] + [f"model.layers.{i}.{n}.weight" for i in range(cfg.num_hidden_layers)
                                     for n in ("input_layernorm", "post_attention_layernorm")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise LutqError(f"{ckpt.path}: --rotate needs tensor {missing[0]!r}, which is missing")


def check_formats(rules) -> None:
    used = [rules.default.format] + [c.format for _, c in rules.overrides]
    bad = [f for f in used if f in REFUSED_FORMATS]
    if bad:
        raise LutqError(f"--rotate cannot be combined with the {bad[0]} format (ternary weights are stored exactly "
                        f"as trained; a rotation would make them dense)")


class RotatedCheckpoint(Checkpoint):
    """`source` turned into the equivalent model of the module docstring, tensor by tensor as they are loaded."""

    format_name = "rotated"

    def __init__(self, source: Checkpoint, spec: RotationSpec):
        check_rotatable(source)
        cfg = source.config
        self.source, self.spec, self.path = source, spec, source.path
        self.config = dataclasses.replace(cfg, tie_word_embeddings=False)  # the head is always its own tensor
        infos = source.tensors()
        # True when the source had no lm_head: the rotated model's head is new (convert.py: outside a bits budget)
        self.head_untied = not any(t.name == LM_HEAD for t in infos)
        if self.head_untied and not cfg.tie_word_embeddings:
            raise LutqError(f"{source.path}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
        embed = next(t for t in infos if t.name == EMBED)
        # the derived head: no bytes on disk (bytes_before stays the source's)
        self.infos = infos + ([TensorInfo(LM_HEAD, embed.shape, "F32", 0)] if self.head_untied else [])
        rng = np.random.default_rng(spec.seed)
        d = cfg.hidden_size
        if not 0 <= spec.keep < d:
            raise LutqError(f"--rotate-keep must be below hidden_size {d}, got {spec.keep}")
        # S: channels the rotation leaves alone (Q is the identity there), their norm weights kept, not folded
        self.kept = massive_channels(source, spec.keep, spec.seed) if spec.keep else np.zeros(0, np.int64)
        rest = np.setdiff1d(np.arange(d), self.kept)
        self.q = np.zeros((d, d))  # f64[D, D], the residual stream's rotation
        self.q[self.kept, self.kept] = 1.0
        self.q[np.ix_(rest, rest)] = orthogonal(len(rest), spec.kind, rng)
        self.folded = np.ones(d, bool)  # channels whose norm weight is folded into the readers
        self.folded[self.kept] = False
        self.hv = orthogonal(cfg.head_dim, spec.kind, rng)  # f64[hd, hd], every head's value rotation
        self._embed: np.ndarray | None = None

    def tensors(self) -> list[TensorInfo]:
        return self.infos

    def tokenizer_dir(self):
        return self.source.tokenizer_dir()

    def file_bytes(self) -> int:
        return self.source.file_bytes()

    def close(self) -> None:
        self._embed = None
        self.source.close()

    def rows(self, name: str):
        return self.load(name) if name != EMBED else self.embedding()

    def embedding(self) -> np.ndarray:
        """E Q, f32[V, D], computed once (the runtime gathers rows from it; calibration and quantize load it)."""
        if self._embed is None:
            self._embed = self.turn_rows(self.source.load(EMBED), None)
        return self._embed

    def turn_rows(self, w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """w diag(scale) Q for w f32[M, D] (a reader of the residual stream), in float64, in row chunks; scale is a
        norm's weight, folded on the channels the rotation turns."""
        out = np.empty(w.shape, np.float32)
        s = np.ones(w.shape[1]) if scale is None else np.where(self.folded, scale.astype(np.float64), 1.0)
        q = s[:, None] * self.q  # diag(scale) Q: f64[D, D]
        for r0 in range(0, len(w), CHUNK_ROWS):
            out[r0 : r0 + CHUNK_ROWS] = w[r0 : r0 + CHUNK_ROWS].astype(np.float64) @ q
        return out

    def kept_norm(self, w: np.ndarray) -> np.ndarray:
        """A norm's weight after folding: 1 where folded into the readers, its own on the channels not rotated."""
        return np.where(self.folded, 1.0, w).astype(np.float32)

    def heads(self, w: np.ndarray, axis: int) -> np.ndarray:
        """Each head_dim block of w (f64) along `axis` turned by Hv: v's rows (Hv^T w[g]), o's columns (w[:, j] Hv)."""
        hd = self.config.head_dim
        if axis == 0:  # v_proj rows / bias: f64[KV * hd, ...] -> per KV head Hv^T block
            blocks = w.reshape(-1, hd, *w.shape[1:])
            return np.einsum("ji,gj...->gi...", self.hv, blocks).reshape(w.shape)
        blocks = w.reshape(w.shape[0], -1, hd)  # o_proj columns: f64[D, H, hd]
        return (blocks @ self.hv).reshape(w.shape)

    def load(self, name: str) -> np.ndarray:
        if name == EMBED:
            return self.embedding().copy()
        if name == LM_HEAD:  # (the source's head, or the tied embedding) diag(final norm) Q
            head = self.source.load(EMBED if self.head_untied else LM_HEAD)
            return self.turn_rows(head, self.source.load(FINAL_NORM))
        if name == FINAL_NORM:
            return self.kept_norm(self.source.load(name))
        m = LAYER_TENSOR.fullmatch(name)
        if m is None:
            return self.source.load(name)
        layer, module, kind = m.group(1), m.group(2), m.group(3)
        w = self.source.load(name)
        if module in ("input_layernorm", "post_attention_layernorm"):
            return self.kept_norm(w)  # folded into its readers
        if module in READS_NORM and kind == "weight":
            w = self.turn_rows(w, self.source.load(f"model.layers.{layer}.{READS_NORM[module]}.weight"))
        if module in WRITERS:  # Q^T W: f64[D, in]; a bias b Q
            w = self.q.T @ w.astype(np.float64) if kind == "weight" else w.astype(np.float64) @ self.q
        if module == "self_attn.v_proj":  # this also turns the value bias
            w = self.heads(w.astype(np.float64), 0)
        if module == "self_attn.o_proj" and kind == "weight":
            w = self.heads(w, 1)
        return np.ascontiguousarray(w, np.float32)
