"""Fault injection for tests/test_faults.py: train in a forked child, stop it at a named point,
kill it with SIGKILL there, and compare what a resume rebuilds with the uninterrupted run.

A point is `<where>@<step>`:
    step@k           at the start of optimizer step k (k-1 steps done, nothing of step k)
    log@k            half-way through writing step k's metrics record (the line is cut)
    mid_shard@k      checkpoint k: half-way through writing this rank's shard (DCP items)
    after_shard@k    checkpoint k: this rank's shard and record written, the marker not
    before_marker@k  checkpoint k: every rank's files written, meta.json not yet
    before_rename@k  checkpoint k: meta.json written, the folder not yet renamed
    before_latest@k  checkpoint k: renamed, `latest` not yet moved
    merge@k          ReLoRA's merge at step k, after the first adapter, before the second
    switch@k         SwitchLoRA's switches at step k, after the first layer, before the second
The checkpoint points are the writer's own test hook (LRPT_TEST_PAUSE, trainer/checkpoint/folder.py);
the others are patched in here, in the child only. A paused child writes a marker file and
sleeps until the parent kills it, so each kill lands exactly where it was aimed.

Forking (not a fresh interpreter) keeps a trial at a second or two instead of the five it takes
to import torch; torch runs single-threaded here so that the forked child cannot inherit a
thread pool in a locked state.
"""
from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.loop import train
from trainer.rundir import RunDir

# Small and fast: a few steps; checkpoints (3, 6, 8) inside log windows (2, 4, 6, 8), so that
# a resume continues a window, and a kill can leave whole records after the checkpoint.
BASE = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "logging.log_every=2", "logging.eval_every=0", "logging.eval_batches=1",
        "logging.progress=false", "logging.tensorboard=false", "schedule.warmup_steps=2", "checkpoint.every=3",
        "checkpoint.keep=2", "train.max_steps=8"]
STRATEGIES = {
    "full": ["strategy.name=full"],
    "relora": ["strategy.name=relora", "strategy.rank=4", "strategy.reset_every=3", "strategy.restart_warmup=1",
               "strategy.dropout=0.1"],
    "switchlora": ["strategy.name=switchlora", "strategy.rank=4", "strategy.switch_interval0=1",
                   "strategy.freeze_steps=2"],
}
CHECKPOINT_POINTS = ("mid_shard", "after_shard", "before_marker", "before_rename", "before_latest")
POINTS = ("step", "log", *CHECKPOINT_POINTS, "merge", "switch")
MARKER = ".fault-paused"


def overrides(strategy: str, run_dir: Path, *extra: str) -> list[str]:
    return [*BASE, *STRATEGIES[strategy], f"run.dir={run_dir}", *extra]


def run(strategy: str, run_dir: Path, *extra: str) -> Path:
    return train(load_config(None, overrides(strategy, run_dir, *extra)))


def curve(run_dir: Path) -> list[dict]:
    """The rebuilt view without what depends on the clock (durations, rates) or on the process
    (comm/*: a restart's start-up broadcasts and checkpoint-loading traffic land in the first
    interval after it; the training payload, comm_bytes, stays; mem/*: measured in the first
    record after each engine build, a restart's included)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s") and not k.startswith(("comm/", "mem/"))}
            for r in RunDir(run_dir).read_metrics()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


# -- pausing the child ------------------------------------------------------------------------------

def _pause(run_dir: Path, point: str) -> None:
    (run_dir / MARKER).write_text(point)
    while True:
        time.sleep(1)


def _install(where: str, step: int, run_dir: Path) -> None:
    """Patch the pause in (called in the child only)."""
    from trainer import loop
    from trainer.rundir import RunDir as RD
    from trainer.strategies.relora import ReLoRA
    from trainer.strategies.switchlora import SwitchLoRA

    if where in CHECKPOINT_POINTS:
        os.environ["LRPT_TEST_PAUSE"] = f"{where}@{step}"
    elif where == "step":
        real_step = loop.Trainer._train_step

        def train_step(self, k):
            if k == step:
                _pause(run_dir, f"step@{k}")
            return real_step(self, k)
        loop.Trainer._train_step = train_step
    elif where == "log":
        real_append = RD.append_metrics

        def append(self, record):
            if record.get("step") == step and "loss" in record:
                line = (__import__("json").dumps(record) + "\n").encode()
                with open(self.metrics, "ab") as f:
                    f.write(line[: len(line) // 2])
                _pause(run_dir, f"log@{step}")
            real_append(self, record)
        RD.append_metrics = append
    elif where in ("merge", "switch"):
        cls, name = (ReLoRA, "reset_optimizer") if where == "merge" else (SwitchLoRA, "switch_layer")
        real = getattr(cls, name)
        calls = []

        def hooked(self, k, *args, **kwargs):
            if k == step:
                calls.append(k)
                if len(calls) == 2:
                    _pause(run_dir, f"{where}@{k}")
            return real(self, k, *args, **kwargs)
        setattr(cls, name, hooked)
    else:
        raise ValueError(f"unknown fault point {where!r}")


def run_killed(strategy: str, run_dir: Path, point: str, *extra: str, timeout: float = 120) -> str:
    """Train in a forked child until `point`, kill -9 it there. 'killed', or 'finished' when
    the run never reached the point."""
    where, _, at = point.partition("@")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            _install(where, int(at), run_dir)
            run(strategy, run_dir, *extra)
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.time() + timeout
    markers = (run_dir / MARKER, run_dir / "checkpoints" / ".paused")
    while time.time() < deadline:
        if any(m.exists() for m in markers):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for m in markers:
                m.unlink(missing_ok=True)
            return "killed"
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, f"the child failed before {point}"
            return "finished"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"{point}: neither paused nor finished in {timeout}s")


# -- trials ---------------------------------------------------------------------------------------

@dataclass
class Trial:
    strategy: str
    point: str
    background: bool = False  # checkpoint.async: the kill may land while training went on past the save
    outcome: str = ""  # killed / finished
    resumed_from: int | None = None
    lost_steps: int = 0  # steps done before the kill that the resume had to redo
    exact: bool = False


def draw_trials(n: int, seed: int) -> list[Trial]:
    """`n` trials from `seed` (print it to replay one). Every kind of point comes up in the
    first few; merges only at ReLoRA's merge steps (3, 6), switches only under SwitchLoRA,
    logs only at the steps that log."""
    rng = random.Random(seed)
    out, saves = [], 0
    for i in range(n):
        where = POINTS[i] if i < len(POINTS) else rng.choice(POINTS)
        if where == "merge":
            strategy, step = "relora", rng.choice([3, 6])
        elif where == "switch":  # steps 1-2 switch in many layers; from 3 on (a decaying rate) in one only
            strategy, step = "switchlora", rng.randint(1, 2)
        elif where in CHECKPOINT_POINTS:
            strategy, step = rng.choice(list(STRATEGIES)), rng.choice([3, 6, 8])
            saves += 1  # every other one written in the background (8, the last, never is)
            out.append(Trial(strategy, f"{where}@{step}", background=saves % 2 == 0))
            continue
        elif where == "log":  # the steps that log
            strategy, step = rng.choice(list(STRATEGIES)), rng.choice([2, 4, 6, 8])
        else:
            strategy, step = rng.choice(list(STRATEGIES)), rng.randint(1, 8)
        out.append(Trial(strategy, f"{where}@{step}"))
    return out


def run_trial(trial: Trial, run_dir: Path, reference: Path) -> Trial:
    """Kill at the trial's point, resume in this process, compare with `reference`."""
    extra = ["checkpoint.async=true"] if trial.background else ["checkpoint.async=false"]
    trial.outcome = run_killed(trial.strategy, run_dir, trial.point, *extra)
    latest = ckpt.find_latest(run_dir / "checkpoints")
    trial.resumed_from = ckpt.step_of(latest) if latest else 0
    where, _, at = trial.point.partition("@")
    reached = int(at) - (1 if where == "step" else 0)  # steps finished when the kill came
    trial.lost_steps = max(0, reached - trial.resumed_from) if trial.outcome == "killed" else 0
    run(trial.strategy, run_dir, *extra)
    trial.exact = losses(run_dir) == losses(reference) and curve(run_dir) == curve(reference)
    return trial


def fast_and_single_threaded():
    """torch on one thread for the forks (see the module docstring), and no minimal-pair
    evaluation at the end of each run (most of a micro run's time; nothing here depends on
    it). Returns the undo."""
    from trainer.loop import Trainer

    n, pairs = torch.get_num_threads(), Trainer.minimal_pairs
    torch.set_num_threads(1)
    Trainer.minimal_pairs = lambda self: {}

    def undo():
        torch.set_num_threads(n)
        Trainer.minimal_pairs = pairs
    return undo
