"""`lutq quantize`: read a checkpoint one tensor at a time, quantize its linear weights, write a lutq directory.

What is quantized, and how:
- linear weights (every 2-D weight but the token embedding): the format the rules (or the bits-budget planner) give;
- the token embedding: fp16, or int8 with `--embed int8`;
- norms, biases and anything 1-D: fp32, unchanged;
- lm_head: what a rule matching `lm_head` says, else int6k with G = 32 (DEFAULT_HEAD), whatever the other weights
  get. It is the largest single product of a small model (SmolLM2: 49152 x 576, a fifth of the weights) and decode
  reads all of it every token: in fp16 (fp32 at run time) it alone took 7.6 ms a token on SmolLM2, int6k 1.4 ms,
  int4k 1.1 ms. Its error reaches every logit: with the other weights int4k G = 32, SmolLM2's perplexity was 33.13
  with the fp16 head, 33.40 with int6k, 34.97 with int4k (models.md). A tied lm_head (no lm_head.weight in the
  source, tie_word_embeddings true) is then the embedding quantized a second time, written as lm_head.weight, and
  the config says tie_word_embeddings false; `lm_head=fp16` keeps it tied, reading the fp16 embedding. With
  --bits-budget and no rule naming it, an untied lm_head is the planner's like any weight and a tied one stays tied.
- with --rotate (lutq/quantize/rotate.py) everything above applies to the rotated model, whose lm_head is always its
  own tensor: a tied source's head, which rotation unties, gets its rule's format or DEFAULT_HEAD, and with
  --bits-budget and no rule fp16 outside the budget (what the tied head was). The summary's bits_per_weight counts
  every stored lm_head; bits_per_weight_layers the decoder layers alone, comparable between tied and rotated runs.

Peak memory is about two fp32 copies of the largest tensor (the weight and its dequantized copy, for the error
report) plus a constant, plus the source's memory map: each tensor is loaded, quantized, written and dropped before
the next, and everything inside works on chunks (docs/FORMAT.md, "Memory"; tests/test_memory.py).

Bad values are refused by tensor name before anything is written for them: NaN or Inf anywhere, and weights beyond
fp16's range in a tensor stored quantized or as fp16 (docs/FORMAT.md, "Edge cases").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lutq.checkpoint.base import Checkpoint
from lutq.checkpoint.lutq_dir import LutqDirWriter, module_name
from lutq.errors import LutqError
from lutq.quantize.calibration import CalibrationSource, LayerHessians, calibration_windows, stage_of
from lutq.quantize.gptq import Hessian, gptq_quantize
from lutq.quantize.packed import relative_error
from lutq.quantize.registry import KEEP, get_format
from lutq.quantize.rotate import RotatedCheckpoint, RotationSpec, check_formats
from lutq.quantize.rules import AUTO, GROUP_SIZES, Choice, Rules

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
EMBED_FORMATS = ("fp16", "int8")
DEFAULT_HEAD = Choice("int6k", 32)
FP16_MAX = 65504.0
PLANS = ("error", "kl")


@dataclass
class QuantizeOptions:
    rules: Rules
    group_size: int = 64
    refine: bool = True
    embed: str = "fp16"
    bits_budget: float | None = None
    calibration: CalibrationSource | None = None  # --calibration: GPTQ for its inputs (lutq/quantize/gptq.py)
    sequential: bool = True  # with calibration: each layer's inputs through the layers before it as quantized
    rotate: RotationSpec | None = None  # --rotate: quantize the rotated, equivalent model (lutq/quantize/rotate.py)
    plan: str = "error"  # --plan: what the bits-budget planner minimises: "error" (weight error) or "kl" (measured)


@dataclass
class TensorReport:
    name: str
    format: str  # a format name, "fp16" or "fp32"
    params: int
    bytes: int
    bits_per_weight: float
    rel_error: float
    seconds: float
    group_size: int | None = None


@dataclass
class QuantizeReport:
    source: str
    out: str
    options: dict
    bytes_before: int
    tensors: list[TensorReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        """Bytes of tensor data written (the safetensors files less their headers)."""
        return sum(t.bytes for t in self.tensors)

    def linear(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.name != EMBED and t.format != "fp32"]

    def summary(self) -> dict:
        lin = self.linear()
        layers = [t for t in lin if t.name != LM_HEAD]  # the decoder layers' weights: the same set in every model
        quantized = [t for t in lin if t.format != KEEP]
        params_all = sum(t.params for t in self.tensors)
        formats: dict[str, dict] = {}
        for t in self.tensors:
            f = formats.setdefault(t.format, {"tensors": 0, "params": 0, "bytes": 0, "rel_errors": []})
            f["tensors"] += 1
            f["params"] += t.params
            f["bytes"] += t.bytes
            f["rel_errors"].append(t.rel_error)
        for f in formats.values():
            f["bits_per_weight"] = 8 * f["bytes"] / f["params"]
            f["mean_rel_error"] = float(np.mean(f.pop("rel_errors")))
        return {
            "source": self.source, "out": self.out, **self.options,
            "bits_per_weight": 8 * sum(t.bytes for t in lin) / max(1, sum(t.params for t in lin)),
            "bits_per_weight_layers": 8 * sum(t.bytes for t in layers) / max(1, sum(t.params for t in layers)),
            "bits_per_weight_all": 8 * self.bytes / max(1, params_all),
            "bytes": self.bytes, "bytes_before": self.bytes_before,
            "mean_rel_error": float(np.mean([t.rel_error for t in quantized])) if quantized else 0.0,
            "seconds": self.seconds, "params": params_all, "formats": formats,
        }

    def to_json(self) -> dict:
        return {"summary": self.summary(), "tensors": [vars(t) for t in self.tensors]}


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and name != EMBED


def head_choice(options: QuantizeOptions) -> Choice | None:
    """lm_head's format: its rule's, else DEFAULT_HEAD; with a bits budget and no rule, None: the planner's."""
    rule = options.rules.matching(LM_HEAD)
    return rule if rule is not None or options.bits_budget is not None else DEFAULT_HEAD


def tied_head_requested(ckpt: Checkpoint, options: QuantizeOptions) -> bool:
    """Whether a tied lm_head gets its own quantized tensor: unless its rule keeps it (fp16, tied), or a bits budget
    plans the model and no rule names the head (it then stays tied, outside the budget, as the embedding is)."""
    tied = ckpt.config.tie_word_embeddings and not ckpt.has(LM_HEAD) and ckpt.has(EMBED)
    choice = head_choice(options)
    return tied and choice is not None and choice.format != KEEP


def linear_shapes(ckpt: Checkpoint, options: QuantizeOptions) -> dict[str, tuple[int, int]]:
    shapes = {t.name: tuple(t.shape) for t in ckpt.tensors() if is_linear(t.name, tuple(t.shape))}
    if tied_head_requested(ckpt, options):
        shapes[LM_HEAD] = tuple(next(t.shape for t in ckpt.tensors() if t.name == EMBED))
    return shapes


def choose_formats(ckpt: Checkpoint, options: QuantizeOptions, on_progress=None) -> dict[str, Choice]:
    """Linear weight name -> (format or "fp16", group size), from the rules or, with a bits budget, the planner."""
    shapes = linear_shapes(ckpt, options)
    g = options.group_size

    def resolved(choice: Choice) -> Choice:
        return Choice(choice.format, choice.group_size or g)

    if options.bits_budget is None:
        if options.rules.default.format == AUTO:
            raise LutqError("--format auto needs --bits-budget (the budget is what chooses the formats)")
        plan = {name: resolved(head_choice(options) if name == LM_HEAD else options.rules.format_for(name))
                for name in shapes}
    else:
        from lutq.quantize.planner import plan_budget

        # A head that rotation untied (the source's was tied) stays outside the budget in fp16 as the tied head was
        # (it read the fp16 embedding), so the budget plans the same weights with or without --rotate.
        outside = {LM_HEAD: Choice(KEEP, g)} if rotated_head(ckpt) and not options.rules.matching(LM_HEAD) else {}
        pinned = {name: resolved(c) for name in shapes if (c := options.rules.matching(name)) is not None}
        planned = {name: shape for name, shape in shapes.items() if name not in outside}
        # A rotated model is planned from its source's weights: rotated, every weight is about as Gaussian as the
        # next and its error per format the same, so the plan would follow sizes alone (SmolLM2 --bits-budget 3.5
        # --calibration self --rotate --rotate-keep 2: nf3:64 on every down_proj, 48.32; planned on the source, see
        # models.md). The source's weights say which weights are hard to quantize.
        # (--plan kl measures the model being quantized, rotated or not: its KL is through that model's outputs.)
        measured = ckpt.source if isinstance(ckpt, RotatedCheckpoint) and options.plan != "kl" else ckpt
        plan = {**plan_budget(measured, planned, pinned, options, on_progress), **outside}
    for name, (fmt, group_size) in plan.items():
        if fmt != KEEP and shapes[name][1] % group_size:
            raise LutqError(f"{name}: K = {shapes[name][1]} is not a multiple of the group size {group_size}")
    return plan


def rotated_head(ckpt: Checkpoint) -> bool:
    """Whether ckpt is a rotated model whose lm_head is new (the source's was tied to the embedding)."""
    return isinstance(ckpt, RotatedCheckpoint) and ckpt.head_untied


def load_checked(ckpt: Checkpoint, name: str) -> np.ndarray:
    """The tensor, refused with a count of its NaN and infinite values if it has any: no format can store them,
    and one NaN in a group would make that group's scale, and so the whole group, NaN."""
    w = ckpt.load(name)
    if not np.isfinite(w).all():
        nan = int(np.count_nonzero(np.isnan(w)))
        inf = int(w.size - nan - np.count_nonzero(np.isfinite(w)))
        raise LutqError(f"{name}: {nan} NaN and {inf} Inf values; refusing to quantize it (the source checkpoint "
                        f"is broken)")
    return w


def check_fp16_range(name: str, w: np.ndarray) -> None:
    """Scales, offsets and kept weights are stored as fp16: a weight beyond its range would store an infinity."""
    largest = max(float(w.max(initial=0)), -float(w.min(initial=0)))  # no |w| copy of a large tensor
    if largest > FP16_MAX:
        raise LutqError(f"{name}: a weight of magnitude {largest:.4g} is beyond fp16's range ({FP16_MAX:g}), "
                        f"which lutq stores scales and kept weights in; refusing to store infinities")


def quantize_tensor(w: np.ndarray, choice: Choice, refine: bool, name: str, hessian: Hessian | None = None):
    """(PackedTensor, relative error); a shape the format cannot take becomes a LutqError naming the tensor.
    Given its inputs' Hessian (calibration), GPTQ rounds it."""
    fmt = choice.format
    check_fp16_range(name, w)
    try:
        if hessian is not None:
            p = gptq_quantize(get_format(fmt), w, hessian, choice.group_size, refine)
        else:
            p = get_format(fmt).quantize(w, choice.group_size, refine)
    except ValueError as e:
        raise LutqError(f"{name}: cannot quantize to {fmt}: {e}") from None
    err = relative_error(w, get_format(fmt).dequantize(p))
    # A safety net: every format keeps its scales finite for finite weights in fp16's range (tests/test_numeric_edge.py)
    if not np.isfinite(err) or not all(np.isfinite(a).all() for a in p.arrays.values() if a.dtype.kind == "f"):
        raise LutqError(f"{name}: quantizing to {fmt} gave non-finite values (a bug in lutq; please report it)")
    return p, err


def quantize_checkpoint(ckpt: Checkpoint, out: Path, options: QuantizeOptions, force: bool = False,
                        on_progress: Callable[[str, int, int], None] | None = None) -> QuantizeReport:
    """Write the lutq directory `out`; on_progress(stage, done, total) reports weights processed."""
    start = time.perf_counter()
    if options.group_size not in GROUP_SIZES:
        raise LutqError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {options.group_size}")
    if options.embed not in EMBED_FORMATS:
        raise LutqError(f"--embed must be one of {', '.join(EMBED_FORMATS)}, got {options.embed!r}")
    if options.plan not in PLANS:
        raise LutqError(f"--plan must be one of {', '.join(PLANS)}, got {options.plan!r}")
    if options.plan == "kl" and (options.bits_budget is None or options.calibration is None):
        raise LutqError("--plan kl needs --bits-budget (it plans the budget) and --calibration (the text it measures "
                        "the model's outputs on)")
    opts = {"format": str(options.rules), "group_size": options.group_size, "refine": options.refine,
            "embed": options.embed, "bits_budget": options.bits_budget}
    if options.bits_budget is not None:
        opts["plan"] = options.plan
    if options.rotate is not None:  # everything below (planner, calibration, quantize) sees the rotated fp model
        check_formats(options.rules)
        ckpt = RotatedCheckpoint(ckpt, options.rotate)
        opts["rotate"] = options.rotate.to_json()
    infos = ckpt.tensors()
    report = QuantizeReport(str(ckpt.path), str(out), opts, ckpt.file_bytes())
    with LutqDirWriter(out, force) as writer:
        plan = choose_formats(ckpt, options, on_progress)
        hessians = None
        if options.calibration is not None:
            if on_progress is not None:
                on_progress("calibration text", 0, 1)
            windows = calibration_windows(ckpt, options.calibration)
            opts["calibration"] = {"source": options.calibration.spec, "tokens": int(windows.size),
                                   "sequential": options.sequential}
            if options.calibration.is_self:
                opts["calibration"]["seed"] = options.calibration.seed
            hessians = LayerHessians(ckpt, windows, options.sequential)
        extra_head = LM_HEAD in plan and not ckpt.has(LM_HEAD)
        jobs = [(t.name, t.name, t.shape) for t in infos]  # (name written, name read, shape)
        if extra_head:
            jobs.append((LM_HEAD, EMBED, next(t.shape for t in infos if t.name == EMBED)))
        if hessians is not None:  # Hessians are computed a layer at a time, so quantize in layer order
            n_layers = ckpt.config.num_hidden_layers
            jobs.sort(key=lambda job: -1 if (s := stage_of(job[0], n_layers)) is None else s)
        total, done = sum(int(np.prod(shape)) for _, _, shape in jobs), 0
        for name, source, _ in jobs:
            t0 = time.perf_counter()
            w = load_checked(ckpt, source)
            choice = plan.get(name) or (Choice(options.embed, options.group_size) if name == EMBED else None)
            fmt = choice.format if choice else None
            if fmt == KEEP:
                check_fp16_range(name, w)
                stored = w.astype(np.float16)
                writer.add_plain(name, stored)
                if hessians is not None:
                    hessians.quantized(name, stored.astype(np.float32))
                rep = TensorReport(name, KEEP, w.size, stored.nbytes, 16.0, relative_error(w, stored), 0.0)
            elif fmt is None:
                writer.add_plain(name, w)
                rep = TensorReport(name, "fp32", w.size, w.nbytes, 32.0, 0.0, 0.0)
            else:
                hessian = None if hessians is None else hessians.hessian(name)
                p, err = quantize_tensor(w, choice, options.refine, name, hessian)
                writer.add_packed(module_name(name), p)
                if hessians is not None:
                    hessians.quantized(name, get_format(fmt).dequantize(p))
                rep = TensorReport(name, fmt, w.size, p.nbytes, p.bits_per_weight, err, 0.0, choice.group_size)
            rep.seconds = time.perf_counter() - t0
            report.tensors.append(rep)
            done += w.size
            del w
            if on_progress is not None:
                on_progress("quantize", done, total)
        config = dataclasses.replace(ckpt.config, tie_word_embeddings=False) if extra_head else ckpt.config
        report.seconds = time.perf_counter() - start
        writer.write_json("quant_report.json", report.to_json())
        writer.commit(config, opts, ckpt.tokenizer_dir())
    return report
