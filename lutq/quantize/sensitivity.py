"""`--plan kl`: what quantizing one weight in one format does to the model's next-token distribution.

For the bits-budget planner (lutq/quantize/planner.py), instead of each candidate's weight error: the weight alone is
quantized in the candidate format (GPTQ, with the Hessian of the fp model's inputs over all calibration windows),
every other weight left fp, and the model run from that weight's layer to the logits over the first KL_WINDOWS
calibration windows. The measure is the mean over the scored positions of KL(p_fp || p_quantized), in nats: to second
order the loss the model gives up, and, summed over weights, an estimate of the whole plan's. It sees what weight
error cannot: how much the loss depends on each weight's output (SmolLM2's early down_proj weights, which write the
massive residual channels, cost several times what a late one does at the same weight error).

Cost: one partial forward pass (from the weight's layer on) per weight and candidate, plus lm_head on the scored
positions: SmolLM2-135M with 2 windows, 4 candidates and 32768 calibration tokens quantized in 23 minutes on 2
cores, the text's generation and GPTQ included (peak RSS 1.9 GB). The fp hidden
states entering every layer are kept (f32[KL_WINDOWS, T, D] each) with the fp log-probabilities of the scored
positions (f32[positions, vocab]).

Measured sums are not additive in full: on SmolLM2 at 3.5 bits the plan's summed KL was 0.111 nats, its perplexity
said 0.242 (interactions between weights add up). The planner only needs the ranking.
"""

from __future__ import annotations

import numpy as np

from lutq.quantize.calibration import LM_HEAD, LayerHessians, WithWeights, layer_forward, stage_of

KL_WINDOWS = 2  # calibration windows the KL is measured on (the first ones)
POSITIONS = slice(1, None, 2)  # every other position of a window is scored: half of lm_head's cost


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise, in place on f32[N, V]."""
    z -= z.max(-1, keepdims=True)
    z -= np.log(np.exp(z).sum(-1, keepdims=True))
    return z


class KLProbe:
    """The fp model's hidden states entering each layer and its log-probabilities on the probe windows; kl(name,
    w_hat) runs the model with one weight replaced."""

    def __init__(self, ckpt, windows: np.ndarray):
        from lutq.runtime.llama import TensorSource

        self.ckpt, self.cfg = ckpt, ckpt.config
        self.n_layers = self.cfg.num_hidden_layers
        probe = LayerHessians(ckpt, windows[:KL_WINDOWS])  # its embedding lookup and layer builder, fp throughout
        self.inputs = []  # f32[KL_WINDOWS, T, D] entering layer i; the last: the final norm's input
        self.layers = []  # the fp layers, built once
        for i in range(self.n_layers):
            self.inputs.append(probe.x)
            self.layers.append(probe.build_layer(i, False))
            probe.x = layer_forward(self.cfg, self.layers[i], i, probe.x)
        self.inputs.append(probe.x)
        src = TensorSource(ckpt, kernels=False)
        self.norm = src.get("model.norm.weight", (self.cfg.hidden_size,))
        head = LM_HEAD if ckpt.has(LM_HEAD) else "model.embed_tokens.weight"  # tied: the embedding
        self.head = np.ascontiguousarray(ckpt.load(head), np.float32)  # f32[V, D]
        self.ref = self.log_probs(self.inputs[-1], self.head)
        self.p_ref = np.exp(self.ref)

    def log_probs(self, h: np.ndarray, head: np.ndarray) -> np.ndarray:
        """f32[positions, V] from the final hidden states f32[W, T, D]."""
        from lutq.runtime.llama import rms_norm

        x = np.concatenate([rms_norm(np.ascontiguousarray(w[POSITIONS]), self.norm, self.cfg.rms_norm_eps)
                            for w in h])
        return log_softmax(x @ head.T)

    def kl(self, name: str, w_hat: np.ndarray) -> float:
        """Mean KL(p_fp || p) in nats over the scored positions, p the model with weight `name` = w_hat (f32)."""
        stage = stage_of(name, self.n_layers)
        if stage is None:
            raise ValueError(f"{name}: not a decoder layer's or lm_head's weight")
        if stage == self.n_layers:
            h, head = self.inputs[-1], np.ascontiguousarray(w_hat, np.float32)
        else:
            from lutq.runtime.llama import LlamaLayer, TensorSource, llama_layer_parts

            src = TensorSource(WithWeights(self.ckpt, {name: w_hat}), kernels=False)
            h = layer_forward(self.cfg, LlamaLayer(**llama_layer_parts(src, stage)), stage, self.inputs[stage])
            for j in range(stage + 1, self.n_layers):
                h = layer_forward(self.cfg, self.layers[j], j, h)
            head = self.head
        lp = self.log_probs(h, head)
        return float(np.mean(np.sum(self.p_ref * (self.ref - lp), axis=-1)))


def measure_kl(ckpt, windows: np.ndarray, candidates: dict, refine: bool, on_progress=None) -> dict[str, dict]:
    """name -> {choice: KL} for each weight in `candidates` (name -> its candidate Choices), in layer order (the
    Hessians are computed a layer at a time)."""
    from lutq.quantize.convert import EMBED, quantize_tensor
    from lutq.quantize.registry import get_format

    probe = KLProbe(ckpt, windows)
    hessians = LayerHessians(ckpt, windows)  # the fp model's inputs, as the probe quantizes one weight at a time
    names = sorted(candidates, key=lambda n: stage_of(n, probe.n_layers))
    out: dict[str, dict] = {}
    for done, name in enumerate(names):
        w = ckpt.load(name if ckpt.has(name) else EMBED)  # a tied lm_head reads the embedding
        hessian = hessians.hessian(name)
        out[name] = {}
        for c in candidates[name]:
            p, _ = quantize_tensor(w, c, refine, name, hessian)
            out[name][c] = probe.kl(name, get_format(c.format).dequantize(p))
        if on_progress is not None:
            on_progress("plan (KL)", done + 1, len(names))
    return out
