"""Every published preset has a `*-smoke.yaml` sibling: the same recipe shrunk to minutes on a
CPU, honest in its header about what it is. One of them trains here (shortened further)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "configs" / "experiments"
PUBLISHED = ["relora-130m", "switchlora-350m", "pico-tiny-full", "pico-tiny-relora", "pico-small-full",
             "pico-small-relora"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_smoke_sibling_keeps_the_recipe(name):
    smoke_path = EXPERIMENTS / f"{name}-smoke.yaml"
    assert smoke_path.read_text().startswith(f"# SMOKE RUN of {name}.yaml: the same recipe, shrunk")
    paper, smoke = load_config(EXPERIMENTS / f"{name}.yaml"), load_config(smoke_path)
    assert smoke.data.source == "embedded" and smoke.data.seq_len == 128 and smoke.train.max_steps <= 200
    for section, keys in (("strategy", ("name", "alpha", "optimizer_reset", "reset_ratio", "switch_ratio",
                                        "switch_decay_base", "freeze_steps")),
                          ("optimizer", ("lr", "beta1", "beta2", "weight_decay", "grad_clip")),
                          ("schedule", ("min_lr_ratio", "decay"))):
        for key in keys:
            assert getattr(getattr(smoke, section), key) == getattr(getattr(paper, section), key), (section, key)
    # The schedule's shape: every interval the same share of the run.
    intervals = ["warmup_steps"] + (["warm_start_steps", "reset_every"] if paper.strategy.name == "relora" else [])
    for key in intervals:
        section = "schedule" if key == "warmup_steps" else "strategy"
        share = lambda c: getattr(getattr(c, section), key) / c.train.max_steps  # noqa: E731
        assert share(smoke) == pytest.approx(share(paper), abs=0.01), key
    if paper.strategy.name != "full":  # the rank as the same share of the width
        from trainer.shapes import model_args
        width = lambda c: model_args(c.model, c.data.seq_len, 1024).hidden_size  # noqa: E731
        assert smoke.strategy.rank / width(smoke) == pytest.approx(paper.strategy.rank / width(paper), rel=0.05)


@pytest.mark.timeout(600)
def test_a_smoke_preset_trains(tmp_path, lrpt_cache):
    """pico-tiny-relora-smoke, cut to 22 steps: it trains, merges after step 20 and says so."""
    run = tmp_path / "run"
    env = dict(os.environ, LRPT_CACHE=str(lrpt_cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "trainer", str(EXPERIMENTS / "pico-tiny-relora-smoke.yaml"),
                        "train.max_steps=22", "data.embedded_sentences=2000", "data.embedded_vocab=300",
                        "logging.eval_batches=2", "logging.progress=false", f"run.dir={run}"],
                       capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "model pico-tiny: 12 layers, hidden 96, heads 12/4" in r.stdout
    assert "step 20: merge" in r.stdout.splitlines()  # merges are visible on the console
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "merge"] == [20]
    assert records[-1]["step"] == 22 and math.isfinite(records[-1]["loss"]) and "val_loss" in records[-1]
