"""End-to-end single-process training: learning, exact resume, checkpoint fallback, NaN stop."""
import json
import subprocess
import sys

import pytest

from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.loop import train

FAST = ["model.name=micro", "data.seq_len=64", "data.batch_size=8", "logging.log_every=1",
        "logging.eval_every=0", "logging.eval_batches=2", "logging.progress=false", "logging.tensorboard=false",
        "schedule.warmup_steps=2"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    out = {}
    for r in records(run_dir):
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a resumed run re-logs nothing before its checkpoint
    return out


def run(tmp_path, name, *overrides):
    return train(load_config(None, [*FAST, f"run.dir={tmp_path / name}", *overrides]))


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    full = run(tmp_path, "a", "train.max_steps=12", "checkpoint.every=100")
    part = run(tmp_path, "b", "train.max_steps=12", "checkpoint.every=4", "train.stop_at=6")
    assert max(losses(part)) == 6
    run(tmp_path, "b", "train.max_steps=12", "checkpoint.every=4")
    assert losses(part) == losses(full)  # bitwise: same data, same RNG, same optimizer state
    recs = records(full)
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "comm_bytes", "comm_bytes_total",
            "trainable_params", "total_params"} <= set(recs[1])
    assert (full / "config.yaml").is_file() and (full / "checkpoints" / "latest").is_file()


def test_resume_with_dropout_restores_the_global_rng(tmp_path):
    """Dropout draws from the global generator: a resume that did not restore it would
    draw other masks and the losses would part."""
    drop = ["strategy.name=relora", "strategy.rank=4", "strategy.dropout=0.1", "train.max_steps=10"]
    full = run(tmp_path, "da", *drop, "checkpoint.every=100")
    part = run(tmp_path, "db", *drop, "checkpoint.every=5", "train.stop_at=5")
    run(tmp_path, "db", *drop, "checkpoint.every=5")
    assert losses(part) == losses(full)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    run_dir = run(tmp_path, "c", "train.max_steps=8", "checkpoint.every=3", "train.stop_at=6")
    newest = ckpt.find_latest(run_dir / "checkpoints")
    assert newest.name == "step_0000006"
    data = (newest / "__0_0.distcp").read_bytes()
    (newest / "__0_0.distcp").write_bytes(data[:100])
    with pytest.warns(UserWarning, match="falling back"):
        run(tmp_path, "c", "train.max_steps=8", "checkpoint.every=3")
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]  # the second start resumed from step 3


def test_nonfinite_loss_stops_with_message(tmp_path):
    cfg = load_config(None, [*FAST, f"run.dir={tmp_path / 'nan'}", "train.max_steps=30", "optimizer.lr=1e30",
                             "optimizer.grad_clip=0", "schedule.warmup_steps=0", "checkpoint.every=1000"])
    from trainer.errors import NonFiniteLoss
    with pytest.raises(NonFiniteLoss, match="loss became (nan|inf) at step"):
        train(cfg)


def test_default_cli_run_learns(tmp_path):
    """`lrpt train` on the embedded default, shortened: validation loss falls well below step 0's."""
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "train", f"run.dir={tmp_path / 'd'}",
                          "train.max_steps=60", "logging.eval_every=60", "logging.progress=false"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"run directory: {tmp_path / 'd'}" in out.stdout.lower() or str(tmp_path / "d") in out.stdout
    vals = [r["val_loss"] for r in records(tmp_path / "d") if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0
