"""Golden losses: the first 30 steps of each micro preset, stored in tests/assets. Any
numerical drift (a changed init, draw, merge, schedule or data order) fails here first.

A deliberate change regenerates the file with one command, and the diff goes in its commit:

    LRPT_UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_golden.py
"""
import json
import os
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.loop import train
from trainer.rundir import RunDir

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
PRESETS = {
    "full": [],
    "lora": ["strategy.name=lora", "strategy.rank=16"],
    # A warm start, its rewrap and two merges inside the 30 steps.
    "relora": ["strategy.warm_start_steps=10", "strategy.reset_every=10", "strategy.restart_warmup=3"],
    "switchlora": [],
}
COMMON = ["train.max_steps=30", "logging.log_every=1", "logging.eval_every=0", "logging.eval_batches=2",
          "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1000"]
# Bitwise on one machine; the tolerance only absorbs another CPU's matmul kernels, far below
# what any change to the algorithms moves (1e-3 and up within 30 steps).
RTOL = 1e-5


def _losses(name: str, run_dir: Path) -> list[float]:
    preset = Path("configs/experiments") / f"micro-{'full' if name == 'lora' else name}.yaml"
    train(load_config(preset, [*COMMON, *PRESETS[name], f"run.dir={run_dir}"]))
    return [r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r]


def test_golden_losses(tmp_path, monkeypatch, lrpt_cache):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    got = {name: _losses(name, tmp_path / name) for name in PRESETS}
    assert all(len(v) == 30 for v in got.values())
    if os.environ.get("LRPT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    for name in PRESETS:
        for step, (g, w) in enumerate(zip(got[name], want[name]), 1):
            assert g == pytest.approx(w, rel=RTOL), f"{name}: loss at step {step} is {g!r}, golden {w!r}"
