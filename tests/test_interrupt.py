"""Interrupted and concurrent `lutq quantize`: kill -9 and Ctrl-C in the middle leave no OUT (a kill -9 leaves a
temporary directory that the next run deletes), an existing OUT is refused without --force and replaced only whole
with it, and of two runs writing the same OUT exactly one wins.

The killed runs are real `python -m lutq quantize` processes on a numpy-built model of 10M weights (nf4 with the
scale search takes several seconds on it); each is killed once it has written tensor data into its temporary
directory, and OUT is watched the whole time: it must never appear.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lutq.checkpoint import open_checkpoint
from lutq.checkpoint.lutq_dir import LutqCheckpoint
from lutq.checkpoint.out_dir import OutputClaim, signals_deferred
from lutq.errors import LutqError
from test_cli import assert_clean_error, lutq
from tiny import make_numpy_model

SLOW = ["--format", "nf4", "-g", "64"]  # seconds on the model below: time to kill it mid-way
FAST = ["--format", "int4", "-g", "64", "--no-refine"]  # about a second


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_models):
    return make_numpy_model(tmp_path_factory.mktemp("m") / "src", 512, 1024, 4, tokenizer_from=tiny_models("llama")[0])


def start(src, out, args) -> subprocess.Popen:
    # SIGINT back to its default in the child: a shell may have started this test run with SIGINT ignored, and
    # Python only turns SIGINT into KeyboardInterrupt when it is not ignored at start.
    return subprocess.Popen([sys.executable, "-m", "lutq", "quantize", str(src), str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def partial_dirs(parent, name="q"):
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.partial-"))


def kill_mid_way(proc, out, sig) -> None:
    """Send `sig` once the run has written tensor data into its temporary directory; OUT must not exist until then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert not out.exists(), "OUT appeared before the run was complete"
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()}"
        if any((d / ".data-0").exists() and (d / ".data-0").stat().st_size > 0 for d in partial_dirs(out.parent)):
            proc.send_signal(sig)
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no tensor data was written within 120 s")


def test_kill_9_leaves_no_out_and_the_next_run_cleans_up(model, tmp_path):
    out = tmp_path / "q"
    proc = start(model, out, SLOW)
    kill_mid_way(proc, out, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not out.exists()
    stale = partial_dirs(tmp_path)
    assert len(stale) == 1 and stale[0].name.startswith(f".q.partial-{proc.pid}-")  # the owner's pid in its name
    res = lutq("quantize", model, out, *FAST)
    assert res.returncode == 0, res.stderr
    assert isinstance(open_checkpoint(out), LutqCheckpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the dead run's directory and the lock are gone


def test_ctrl_c_leaves_nothing(model, tmp_path):
    out = tmp_path / "q"
    proc = start(model, out, SLOW)
    kill_mid_way(proc, out, signal.SIGINT)
    assert proc.wait(60) == 130
    assert proc.stderr.read().strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory, no lock


def test_sigterm_leaves_nothing(model, tmp_path):
    out = tmp_path / "q"
    proc = start(model, out, SLOW)
    kill_mid_way(proc, out, signal.SIGTERM)
    assert proc.wait(60) == 130
    assert list(tmp_path.iterdir()) == []


def test_kill_9_during_force_keeps_the_old_out(model, tmp_path):
    out = tmp_path / "q"
    assert lutq("quantize", model, out, *FAST).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start(model, out, [*SLOW, "--force"])
    deadline = time.monotonic() + 120
    while not any((d / ".data-0").exists() for d in partial_dirs(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait(60)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # replaced only when the new one is whole


def test_existing_out_is_refused_without_force(model, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_clean_error(lutq("quantize", model, out, *FAST), "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_two_concurrent_runs_one_wins(model, tmp_path):
    out = tmp_path / "q"
    procs = [start(model, out, FAST) for _ in range(2)]
    codes = [p.wait(120) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)].strip().splitlines()
    assert len(loser) == 1 and ("another lutq process" in loser[0] or "already exists" in loser[0]), loser
    assert isinstance(open_checkpoint(out), LutqCheckpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_run_holding_the_lock_keeps_others_out(model, tmp_path):
    out = tmp_path / "q"
    claim = OutputClaim(out)  # this process is "writing" q
    try:
        res = lutq("quantize", model, out, *FAST, "--force")
        assert_clean_error(res, "another lutq process", f"pid {os.getpid()}")
        assert not out.exists() and claim.tmp.is_dir()  # the holder's work is untouched
    finally:
        claim.release()
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_directories_of_dead_writers_only_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    for name in (f".q.partial-{dead}-x1", f".q.partial-{alive}-x2", ".q.partial-nopid", ".other.partial-1-x"):
        (tmp_path / name).mkdir()
    claim = OutputClaim(tmp_path / "q")
    claim.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".q.partial-{alive}-x2", ".q.partial-nopid", ".other.partial-1-x"])


def test_an_out_taken_aside_by_a_dead_force_swap_is_put_back(tmp_path):
    """kill -9 between the two renames of a --force swap: the old OUT is whole under .q.old-PID-*; it comes back."""
    aside = tmp_path / f".q.old-{dead_pid()}-x" / "q"
    aside.mkdir(parents=True)
    (aside / "config.json").write_text("{}")
    with pytest.raises(LutqError, match="already exists"):
        OutputClaim(tmp_path / "q")
    assert (tmp_path / "q" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_force_swaps_whole_directories(model, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")
    claim = OutputClaim(out, force=True)
    (claim.tmp / "new.txt").write_text("new")
    claim.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_signals_wait_for_the_renames(tmp_path):
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background jobs with SIGINT
    # ignored, and an ignored signal stays ignored after the deferral too.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the interrupt would land here without the deferral
                (tmp_path / "done").write_text("")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert (tmp_path / "done").exists()


def test_quantize_writes_nothing_outside_out(model, tmp_path):
    """Besides the lock and the temporary directory beside OUT (both gone at the end), nothing is written outside
    OUT: the parent holds exactly OUT afterwards, and OUT holds exactly the documented files."""
    out = tmp_path / "q"
    assert lutq("quantize", model, out, *FAST).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "quant_report.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checksums"]
