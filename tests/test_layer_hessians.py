"""LayerHessians (lutq/quantize/calibration.py) against transformers in float64, with the inputs of each linear layer
captured by forward hooks: with `sequential`, a layer's Hessians come from the inputs it meets behind the layers
before it as quantized; without, from the fp model's."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lutq.checkpoint import open_checkpoint
from lutq.quantize.calibration import LayerHessians, calibration_windows, parse_calibration, stage_of

LAYER_NAMES = [f"model.layers.{i}.{part}.weight" for i in range(2) for part in (
    "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
    "self_attn.v_proj")]


@pytest.fixture
def setup(tiny_models, tmp_path):
    from tiny import TEXT

    path, model = tiny_models("llama")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 12)
    ckpt = open_checkpoint(path)
    windows = calibration_windows(ckpt, parse_calibration(str(text)))
    assert windows.shape[0] >= 2
    return ckpt, model, windows


def hf_inputs(model, windows, replaced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The input of every linear layer in LAYER_NAMES on every calibration token, f64[tokens, K] by weight name, from
    a float64 copy of the transformers model with the weights in `replaced` swapped in."""
    import torch

    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for n, w in replaced.items():
            m64.get_submodule(n.removesuffix(".weight")).weight.copy_(torch.from_numpy(w.astype(np.float64)))
    seen = {name: [] for name in LAYER_NAMES}
    hooks = [m64.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
        lambda mod, args, got=got: got.append(args[0].reshape(-1, args[0].shape[-1]).numpy().copy()))
        for name, got in seen.items()]
    with torch.no_grad():
        m64(torch.tensor(np.asarray(windows)))
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(got) for name, got in seen.items()}


def perturbed(w: np.ndarray, seed: int) -> np.ndarray:
    """A stand-in for a quantized weight: w plus noise of a third of its spread."""
    rng = np.random.default_rng(seed)
    return (w + rng.normal(0, w.std() / 3, w.shape)).astype(np.float32)


def test_sequential_hessians_see_the_quantized_layers_before(setup):
    """Every weight's Hessian is X X^T of the inputs it meets in the model whose earlier layers are the quantized
    ones (its own layer fp: one pass gives all four of a layer's inputs), as transformers computes them; without
    `sequential`, the fp model's inputs whatever was quantized."""
    ckpt, model, windows = setup
    sequential, fp = LayerHessians(ckpt, windows, sequential=True), LayerHessians(ckpt, windows)
    fp_inputs = hf_inputs(model, windows, {})
    replaced = {}
    for stage in range(2):
        names = [n for n in LAYER_NAMES if stage_of(n, 2) == stage]
        inputs = hf_inputs(model, windows, replaced)  # the layers before this one quantized
        for seed, name in enumerate(names):
            for hessians, x in ((sequential, inputs[name]), (fp, fp_inputs[name])):
                want = x.T @ x
                assert np.abs(hessians.get(name) - want).max() <= 1e-4 * np.abs(want).max(), name
            replaced[name] = perturbed(ckpt.load(name), seed)
            for hessians in (sequential, fp):
                hessians.quantized(name, replaced[name])
    # The perturbation is large enough to tell the two apart.
    name = LAYER_NAMES[-1]
    assert np.abs(sequential.get(name) - fp.get(name)).max() > 1e-2 * np.abs(fp.get(name)).max()
