"""The `lutq` command line: argument parsing, rich output and error messages; the work happens in the library.

Heavy modules (numpy, numba, transformers) are imported inside the commands, so `--help` answers at once and
`--threads` can set the thread pools' sizes before they start.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from lutq.errors import LutqError

app = typer.Typer(
    name="lutq",
    help="Low-bit LLM quantization and lookup-table inference for CPUs.\n\nExample: lutq generate smollm2-135m -p \"The capital of France is\"",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)
# typer has vendored click since 0.20; reach click's exception classes through typer's own so either works.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
out = Console(highlight=False)

MODEL_HELP = ("An HF directory, a .gguf file, a lutq directory, a built-in name (smollm2-135m), or random:SHAPE "
              "(a random-weight model: random:tinyllama-1.1b, random:llama3.2-1b, random:bitnet-2b).")


def set_threads(threads: int) -> None:
    """Size every thread pool before numpy/numba load their libraries (they read these once, at start)."""
    if threads < 1:
        raise LutqError(f"--threads must be >= 1, got {threads}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    # OpenBLAS's idle workers spin after each call and steal the cores numba's kernel threads need: measured on
    # SmolLM2 int2, 2 threads, decode 106 -> 173 tok/s and prefill 167 -> 626 tok/s with a short spin.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed):
    from lutq.runtime.sampling import SamplingParams

    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    params.validate()
    return params


def load(model: str, max_seq: int | None, kv_cache: str = "f32"):
    """(checkpoint, runnable model, tokenizer) for MODEL."""
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.model import load_model
    from lutq.runtime.tokenizer import Tokenizer

    ckpt = open_checkpoint(model)
    tokenizer = Tokenizer(ckpt.tokenizer_dir(), ckpt.config.eos_token_ids)
    return ckpt, load_model(ckpt, max_seq, kv_cache=kv_cache), tokenizer


KV_HELP = "KV cache type: f32, or f16 (half the memory, and faster decode at long contexts)."


def check_kv_cache(kv_cache: str) -> None:
    from lutq.runtime.attention import KV_DTYPES

    if kv_cache not in KV_DTYPES:
        raise LutqError(f"--kv-cache must be one of {', '.join(KV_DTYPES)}, got {kv_cache!r}")


VERIFY_HELP = "First check the lutq directory's file hashes and tensor shapes in full (what `lutq verify` does)."


def verify_first(model: str) -> None:
    """--verify: the full integrity check before anything is loaded."""
    from lutq.checkpoint.integrity import verify_before_loading

    if verify_before_loading(model)["sha256"] == "absent":
        err.print(f"{model}: no hashes recorded (written by an older lutq); sizes and shapes checked", style="dim",
                  markup=False, soft_wrap=True)


def print_stats(res) -> None:
    sys.stdout.flush()  # the generated text first, then the figures, also when both go to one pipe
    err.print(
        f"[dim]prompt: {res.prompt_tokens} tokens, {res.prefill_tps:.1f} tokens/s | "
        f"decode: {len(res.tokens)} tokens, {res.decode_tps:.1f} tokens/s | stop: {res.stop_reason}[/dim]",
        soft_wrap=True,
    )


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Keep the most likely tokens up to this probability mass (1: off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x the top probability (0: off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalise tokens already present (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    stop: List[str] = typer.Option([], "--stop", help="Stop when this string appears (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template as a user turn."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="CPU threads."),
    kv_cache: str = typer.Option("f32", "--kv-cache", help=KV_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
):
    """Generate text from a prompt and print prompt and decode speed.

    Example: lutq generate smollm2-135m -p "The capital of France is" -n 20 --temperature 0
    """
    set_threads(threads)
    check_kv_cache(kv_cache)
    if max_tokens < 1:
        raise LutqError(f"--max-tokens must be >= 1, got {max_tokens}")
    params = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    if verify:
        verify_first(model)
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.generate import check_prompt_fits, generate as run
    from lutq.runtime.model import load_model
    from lutq.runtime.tokenizer import Tokenizer

    ckpt = open_checkpoint(model)
    tokenizer = Tokenizer(ckpt.tokenizer_dir(), ckpt.config.eos_token_ids)
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    net = load_model(ckpt, len(ids) + max_tokens, kv_cache=kv_cache)  # a KV cache just large enough
    check_prompt_fits(net, len(ids))
    if not chat:
        out.print(prompt, end="", markup=False)
    res = run(net, tokenizer, ids, max_tokens, params, stop, on_text=lambda s: out.print(s, end="", markup=False))
    out.print()
    print_stats(res)


@app.command()
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="A system prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top probability (0: off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalise tokens already present (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    ctx: int = typer.Option(4096, "--ctx", help="Context window for the conversation, in tokens."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="CPU threads."),
    kv_cache: str = typer.Option("f32", "--kv-cache", help=KV_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
):
    """Chat with a model interactively, using its chat template. Empty line or Ctrl-D ends; /reset starts over.

    Example: lutq chat smollm2-135m --temperature 0.5
    """
    set_threads(threads)
    check_kv_cache(kv_cache)
    params = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    if verify:
        verify_first(model)
    from lutq.runtime.generate import generate as run

    ckpt, net, tokenizer = load(model, ctx, kv_cache)
    if not tokenizer.has_chat_template:
        raise LutqError(f"{model}: the tokenizer has no chat template; use `lutq generate`")
    start = [{"role": "system", "content": system}] if system else []
    messages, cached = list(start), []  # cached: the token ids whose keys/values are in the model's cache
    err.print(f"[dim]{model} loaded; empty line or Ctrl-D to quit, /reset to start over[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages, cached = list(start), []
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode_chat(messages)
        # Reuse the cache for the part of the conversation it already holds; run only what is new.
        same = next((i for i, (a, b) in enumerate(zip(ids, cached)) if a != b), min(len(ids), len(cached)))
        same = min(same, len(ids) - 1)
        net.pos = same
        try:
            res = run(net, tokenizer, ids[same:], max_tokens, params, on_text=lambda s: out.print(s, end="", markup=False),
                      keep_cache=True)
        except LutqError as e:
            err.print(f"[red]{e}[/red] (use /reset)")
            messages.pop()
            continue
        out.print()
        print_stats(res)
        cached = (ids + res.tokens)[: net.pos]
        messages.append({"role": "assistant", "content": res.text})


@app.command()
def inspect(model: str = typer.Argument(..., help=MODEL_HELP)):
    """Show a model's architecture, tensor shapes and types, parameter count and size on disk.

    Example: lutq inspect smollm2-135m
    """
    from lutq.checkpoint import open_checkpoint
    from lutq.inspect import render

    with open_checkpoint(model) as ckpt:
        out.print(render(ckpt))


@app.command()
def verify(
    directory: Path = typer.Argument(..., metavar="DIR", help="A lutq directory (written by `lutq quantize`)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Check a lutq directory in full: format version, each file's size and sha256 against the ones recorded when
    it was written, every quantized tensor's stored arrays against its metadata, every tensor against the config.

    Prints one OK line, or the first problem as one error line (exit code 2).

    Example: lutq verify smollm2-nf4
    """
    from lutq.checkpoint.integrity import verify_dir
    from lutq.inspect import human_bytes

    res = verify_dir(directory)
    if as_json:
        import json

        out.print(json.dumps(res), markup=False, soft_wrap=True)
        return
    hashes = ("sha256 verified" if res["sha256"] == "ok"
              else "no sha256 recorded (written by an older lutq): hashes not checked")
    out.print(f"OK {directory}: lutq format version {res['format_version']}, {res['files']} file(s), "
              f"{human_bytes(res['bytes'])}, {hashes}; {res['tensors']} tensors ({res['quantized']} quantized) "
              f"match their metadata and the config", markup=False, soft_wrap=True)


def progress_bar():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True)


@app.command()
def quantize(
    src: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="The lutq directory to write (must not exist)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="Format rules: DEFAULT[,GLOB=FORMAT...], e.g. "
                                         "nf3,lm_head=int4,*.down_proj=int4. Formats: int2 int3 int4 int6, int2k int3k "
                                         "int4k int6k, nf2 nf3 nf4, ternary ternary-group, fineq, int8, fp16; "
                                         "DEFAULT 'auto' with --bits-budget. lm_head: int6k:32 unless named."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Weights per scale group along K: 32, 64 or 128."),
    bits_budget: Optional[float] = typer.Option(None, "--bits-budget", help="Choose a format per tensor to fit this "
                                                "many bits/weight on average over the linear layers."),
    plan: str = typer.Option("error", "--plan", help="With --bits-budget: what the plan minimises. 'error': each "
                             "weight's relative error (fast); 'kl' (needs --calibration): the KL divergence each "
                             "weight's format alone causes in the model's next-token distribution, measured through "
                             "the model (slow: ~23 min for SmolLM2-135M on 2 cores; better plans)."),
    no_refine: bool = typer.Option(False, "--no-refine", help="Plain min/max (absmax) rounding, no scale search."),
    embed: str = typer.Option("fp16", "--embed", help="Token embedding: fp16 or int8."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Round with GPTQ for these inputs: 'self' "
                                              "(text the model writes itself, 8192 tokens, cached; 'self:TOKENS' for "
                                              "another count) or a UTF-8 text file ('PATH[:TOKENS]')."),
    calibration_seed: Optional[int] = typer.Option(None, "--calibration-seed", help="With --calibration self: the "
                                                   "seed of the text the model writes (default 0). Another seed gives "
                                                   "another text: whether a result holds beyond one text."),
    rotate: bool = typer.Option(False, "--rotate", help="First turn the residual stream (and each head's values) by "
                                "a seeded orthogonal matrix, with the norms folded in: an exactly equivalent model "
                                "with fewer outlier weights (QuaRot). Llama-family models; a tied lm_head becomes its "
                                "own tensor."),
    rotate_kind: Optional[str] = typer.Option(None, "--rotate-kind", help="With --rotate: 'hadamard' (randomised "
                                              "Hadamard, the default) or 'random' (random orthogonal)."),
    rotate_seed: Optional[int] = typer.Option(None, "--rotate-seed", help="With --rotate: the rotation's seed "
                                              "(default 0)."),
    rotate_keep: Optional[int] = typer.Option(None, "--rotate-keep", help="With --rotate: leave the N residual "
                                              "channels of largest activation energy (massive activations, found by a "
                                              "short fp run on random tokens) out of the rotation (default 0; SmolLM2 "
                                              "needs 2)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="CPU threads."),
):
    """Quantize a model into a packed lutq directory.

    Example: lutq quantize smollm2-135m smollm2-nf4 --format nf4,*.down_proj=int4

    Example: lutq quantize smollm2-135m smollm2-b35 --bits-budget 3.5 --calibration self
    """
    set_threads(threads)
    from lutq.checkpoint import open_checkpoint
    from lutq.quantize.convert import QuantizeOptions, quantize_checkpoint
    from lutq.quantize.rules import parse_rules

    if format is None and bits_budget is None:
        raise LutqError("--format is required (or --bits-budget), e.g. --format nf4")
    rules = parse_rules(format or "auto")
    options = QuantizeOptions(rules, group_size, not no_refine, embed, bits_budget, plan=plan)
    if calibration is not None:
        from lutq.quantize.calibration import parse_calibration

        options.calibration = parse_calibration(calibration)
    if calibration_seed is not None:
        if options.calibration is None or not options.calibration.is_self:
            raise LutqError("--calibration-seed needs --calibration self (it seeds the text the model writes itself)")
        if calibration_seed < 0:
            raise LutqError(f"--calibration-seed must be >= 0, got {calibration_seed}")
        options.calibration = dataclasses.replace(options.calibration, seed=calibration_seed)
    if rotate:
        from lutq.quantize.rotate import KINDS, RotationSpec

        kind = rotate_kind or KINDS[0]
        if kind not in KINDS:
            raise LutqError(f"--rotate-kind must be one of {', '.join(KINDS)}, got {kind!r}")
        keep = rotate_keep or 0
        if keep < 0:
            raise LutqError(f"--rotate-keep must be >= 0, got {keep}")
        options.rotate = RotationSpec(kind, 0 if rotate_seed is None else rotate_seed, keep)
    elif rotate_kind is not None or rotate_seed is not None or rotate_keep is not None:
        raise LutqError("--rotate-kind, --rotate-seed and --rotate-keep need --rotate")
    import signal

    def interrupted(signum, frame):  # `kill` as well as Ctrl-C: unwind, so the partial directory is removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    with open_checkpoint(src) as ckpt, progress_bar() as bar:
        task = bar.add_task("quantize", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        report = quantize_checkpoint(ckpt, out_dir, options, force, on_progress)
    summary = report.summary()
    if as_json:
        import json

        out.print(json.dumps(summary), markup=False, soft_wrap=True)
        return
    from lutq.inspect import human_bytes
    from rich.table import Table

    table = Table(title=f"{src} -> {out_dir}", title_justify="left")
    for col in ("format", "tensors", "params", "bits/weight", "mean rel. error", "size"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for name, f in summary["formats"].items():
        table.add_row(name, str(f["tensors"]), f"{f['params']:,}", f"{f['bits_per_weight']:.3f}",
                      f"{f['mean_rel_error']:.4f}", human_bytes(f["bytes"]))
    out.print(table)
    out.print(f"size {human_bytes(summary['bytes_before'])} -> {human_bytes(summary['bytes'])} | "
              f"linear layers {summary['bits_per_weight']:.3f} bits/weight (decoder layers "
              f"{summary['bits_per_weight_layers']:.3f}), all tensors "
              f"{summary['bits_per_weight_all']:.3f} | mean rel. error {summary['mean_rel_error']:.4f} | "
              f"{summary['seconds']:.1f} s", markup=False, soft_wrap=True)


@app.command()
def eval(
    model: str = typer.Argument(..., help=MODEL_HELP + " Or a lutq directory."),
    text: Path = typer.Option(..., "--text", help="A UTF-8 text file to score, e.g. botchan.txt."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window; windows do not overlap."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Score at most this many windows."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads", help="CPU threads."),
    kv_cache: str = typer.Option("f32", "--kv-cache", help=KV_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    dense: bool = typer.Option(False, "--dense", help="Run a quantized model's weights dequantized to fp32 (BLAS) "
                               "instead of on the LUT kernels: the format's own error, without the kernels' int8 "
                               "tables. Slower, more memory."),
):
    """Perplexity over non-overlapping windows of --ctx tokens, each scored on every position but its first.

    Example: lutq eval smollm2-135m --text botchan.txt --ctx 512 --max-windows 8
    """
    set_threads(threads)
    check_kv_cache(kv_cache)
    from lutq.eval import count_windows, perplexity

    try:
        body = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LutqError(f"{text}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or type(e).__name__})")
    if ctx < 2:
        raise LutqError(f"--ctx must be >= 2, got {ctx}")
    if max_windows is not None and max_windows < 1:
        raise LutqError(f"--max-windows must be >= 1, got {max_windows}")
    if verify:
        verify_first(model)
    from lutq.checkpoint import open_checkpoint
    from lutq.runtime.model import load_model
    from lutq.runtime.tokenizer import Tokenizer

    with open_checkpoint(model) as ckpt:
        tokenizer = Tokenizer(ckpt.tokenizer_dir(), ckpt.config.eos_token_ids)
        ids = tokenizer.encode(body)
        if ctx > ckpt.config.max_position_embeddings:
            raise LutqError(f"--ctx {ctx} exceeds the model's context window of {ckpt.config.max_position_embeddings}")
        if count_windows(len(ids), ctx, max_windows) == 0:
            raise LutqError(f"{text}: {len(ids)} tokens, fewer than one window of --ctx {ctx}")
        net = load_model(ckpt, ctx, kernels=not dense, kv_cache=kv_cache)
        with progress_bar() as bar:
            task = bar.add_task("eval", total=count_windows(len(ids), ctx, max_windows))
            res = perplexity(net, ids, ctx, max_windows, on_window=lambda done, n: bar.update(task, completed=done))
    result = {"model": model, "text": str(text), **res.to_dict(), "dense": dense}
    if as_json:
        import json

        out.print(json.dumps(result), markup=False, soft_wrap=True)
    else:
        out.print(f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.windows} windows of {ctx}) "
                  f"in {res.seconds:.1f} s", markup=False, soft_wrap=True)


class BenchGroup(TyperGroup):
    """`lutq bench MODEL ...` runs the model benchmark; `lutq bench kernels ...` the kernel one."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(cls=BenchGroup, help="Measure speed: `lutq bench MODEL` (a model) or `lutq bench kernels`.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("model")
def bench_model(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " A lutq directory is measured as it is."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Measure a random-weight model of a real architecture "
                                        "instead: tinyllama-1.1b, llama3.2-1b or bitnet-2b."),
    formats: str = typer.Option("int4", "--formats", help="Comma-separated formats to quantize to and measure; 'fp32' "
                                "runs the model unquantized, 'as-is' runs a lutq directory as stored. A format may "
                                "carry rules with + for commas: nf3+*.down_proj=int4."),
    threads: str = typer.Option("1,2", "--threads", help="Comma-separated thread counts."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length for prefill."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Tokens to decode."),
    repeats: int = typer.Option(3, "--repeats", help="Repeats per configuration; medians are reported."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size."),
    kv_cache: str = typer.Option("f32", "--kv-cache", help=KV_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of records instead of the table."),
):
    """Prefill and decode tokens/s, time to first token, peak RSS, model bytes and load time, per format and threads.

    Records: model, format, threads, bits_per_weight, prefill_tps, decode_tps, ttft_s, peak_rss_mb, model_bytes, load_s.

    Example: lutq bench smollm2-135m --formats int2,int4,nf3,ternary --threads 1,2
    """
    import json

    from lutq import bench

    if (model is None) == (shape is None):
        raise LutqError("give MODEL or --shape (one of them)")
    try:
        thread_list = [int(v) for v in threads.split(",")]
    except ValueError:
        raise LutqError(f"--threads: {threads!r} is not a comma-separated list of numbers") from None
    if min(thread_list) < 1 or min(prompt_tokens, gen_tokens, repeats) < 1:
        raise LutqError("--threads, --prompt-tokens, --gen-tokens and --repeats must be >= 1")
    check_kv_cache(kv_cache)
    fmts = [f.replace("+", ",") for f in formats.split(",")]
    records = bench.run(model or f"random:{shape}", fmts, thread_list, prompt_tokens, gen_tokens, repeats, group_size,
                        on_status=None if json_out else lambda s: err.print(f"[dim]{s}[/dim]"), kv_cache=kv_cache)
    if json_out:
        out.print(json.dumps(records, indent=1), markup=False, soft_wrap=True)
    else:
        wide_table(bench.table(records))


def wide_table(table) -> None:
    """Print a wide table whole: in a terminal at its width, into a pipe or file without folding (not at 80 columns)."""
    (out if out.is_terminal else Console(highlight=False, width=200)).print(table)


@bench_app.command("kernels")
def bench_kernels(
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Comma-separated MxK, e.g. 576x576,4096x4096 "
                                         "(default: 576x576 1536x576 576x1536 2048x2048 5632x2048 4096x4096)."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated formats (default: all)."),
    threads: str = typer.Option("1,2", "--threads", help="Comma-separated thread counts."),
    group: int = typer.Option(64, "--group", help="Quantization group size G."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of records instead of the table."),
):
    """GEMV speed of every format's LUT kernel vs numpy fp32 and a numba dequantize-then-dot kernel, cold weights.

    Records: m, k, format, bits, group, threads, us, gbps (codes + scales streamed per second), gbps_codes,
    speedup_vs_numpy, speedup_vs_dequant, numpy_us, numpy_gbps.

    Example: lutq bench kernels --shapes 2048x2048 --formats int2,int4 --threads 1
    """
    import json

    try:
        thread_list = [int(v) for v in threads.split(",")]
    except ValueError:
        raise LutqError(f"--threads: {threads!r} is not a comma-separated list of numbers") from None
    set_threads(max(thread_list))  # before numba loads: it sizes its pool once
    from lutq.kernels import bench

    records = bench.run(bench.parse_shapes(shapes, group), bench.parse_formats(formats), thread_list, group,
                        progress=None if json_out else lambda r: err.print(
                            f"[dim]{r['m']}x{r['k']} {r['format']} {r['threads']}t: {r['us']:.1f} us[/dim]"))
    if json_out:
        out.print(json.dumps(records, indent=1), markup=False, soft_wrap=True)
    else:
        wide_table(bench.table(records))


def one_line(text: str) -> str:
    """A message as one printable line: names from a hostile file may hold newlines or unencodable surrogates."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except LutqError as e:
        err.print(f"error: {one_line(str(e))}", markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted", markup=False)
        sys.exit(130)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `lutq` alone: the help text, not an error
            out.print(e.format_message(), markup=False)
            sys.exit(0)
        command = f"lutq {e.ctx.info_name} " if e.ctx is not None and e.ctx.parent is not None else "lutq "
        err.print(f"error: {e.format_message()} (see: {command}--help)", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    # Not standalone, typer returns an exit code instead of exiting: 130 is its KeyboardInterrupt (Ctrl-C, or SIGTERM
    # in `lutq quantize`), which older typer versions raise instead (handled above).
    if code == 130:
        err.print("interrupted", markup=False)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
