"""Strategies through the real training loop (trainer/loop.py), one CPU process: same seed ->
same losses, and a run stopped mid-cycle resumes to exactly the uninterrupted losses, also
across a ReLoRA merge, the warm-start rewrap, and while SwitchLoRA vectors are frozen."""
import json
import subprocess
import sys

import pytest

loop = pytest.importorskip("trainer.loop")
from trainer.config import load_config  # noqa: E402

FAST = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "logging.log_every=1",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.blimp_every=0", "logging.progress=false",
        "logging.tensorboard=false", "schedule.warmup_steps=2", "train.max_steps=8", "checkpoint.every=2"]
RELORA = ["strategy.name=relora", "strategy.rank=4", "strategy.reset_every=3", "strategy.restart_warmup=1"]
SWITCH = ["strategy.name=switchlora", "strategy.rank=8", "strategy.switch_interval0=1", "strategy.switch_ratio=10",
          "strategy.freeze_steps=3", "optimizer.lr=3e-3"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def run(tmp_path, name, *overrides):
    return loop.train(load_config(None, [*FAST, f"run.dir={tmp_path / name}", *overrides]))


@pytest.mark.parametrize("strategy,stop_at,events", [
    (RELORA, 4, {3: "merge", 6: "merge"}),  # stopped between two merges
    (RELORA + ["strategy.warm_start_steps=2"], 4, {2: "rewrap", 5: "merge", 8: "merge"}),  # after the rewrap
    (SWITCH, 4, {4: "switch"}),  # vectors switched at step 4 are frozen for 3 more steps
], ids=["relora-mid-cycle", "relora-after-warm-start", "switchlora-frozen"])
def test_resume_matches_uninterrupted_run(tmp_path, strategy, stop_at, events):
    full = run(tmp_path, "full", *strategy)
    logged = {r["step"]: r["event"] for r in records(full) if "event" in r}
    assert events.items() <= logged.items()
    part = run(tmp_path, "part", *strategy, f"train.stop_at={stop_at}")
    assert max(losses(part)) == stop_at
    run(tmp_path, "part", *strategy)
    assert losses(part) == losses(full)  # bitwise, over the merge / switches after the resume


def test_same_seed_same_losses(tmp_path):
    a = run(tmp_path, "a", *SWITCH, "train.max_steps=4")
    b = run(tmp_path, "b", *SWITCH, "train.max_steps=4")
    assert losses(a) == losses(b) and len(losses(a)) == 4


def test_lrpt_train_relora_on_embedded_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "strategy.name=relora",
                          f"run.dir={tmp_path / 'r'}", "train.max_steps=24", "strategy.reset_every=8",
                          "strategy.restart_warmup=2", "schedule.warmup_steps=4", "logging.eval_every=24",
                          "logging.eval_batches=2", "logging.progress=false", "logging.tensorboard=false"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "strategy relora" in out.stdout and "trainable share" in out.stdout
    recs = records(tmp_path / "r")
    assert [r["step"] for r in recs if r.get("event") == "merge"] == [8, 16, 24]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5
