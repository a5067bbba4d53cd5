"""`logging.trackers`: Accelerate's trackers get the same records as metrics.jsonl; TensorBoard
by default (as before), nothing else unless named; the retired `logging.tensorboard` still works."""
import json
import os
import subprocess
import sys

import pytest

from trainer.config import ConfigError, load_config

TINY = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "train.max_steps=3", "logging.log_every=1", "logging.eval_batches=1",
        "logging.progress=false"]


def test_trackers_config_and_the_retired_tensorboard_key(tmp_path):
    assert load_config().logging.trackers == ["tensorboard"]
    assert load_config(None, ["logging.trackers=[]"]).logging.trackers == []
    assert load_config(None, ["logging.trackers=tensorboard,mlflow"]).logging.trackers == ["tensorboard", "mlflow"]
    assert load_config(None, ["logging.tensorboard=false"]).logging.trackers == []
    old = tmp_path / "old.yaml"  # a config.yaml written before trackers existed
    old.write_text("logging:\n  tensorboard: false\n")
    assert load_config(old).logging.trackers == []
    with pytest.raises(ConfigError, match="logging.trackers='tensorbord': expected one of tensorboard, wandb"):
        load_config(None, ["logging.trackers=tensorbord"])


@pytest.mark.parametrize("trackers", [None, "[]"])
def test_tensorboard_gets_the_records_and_nothing_runs_unless_named(tmp_path, lrpt_cache, trackers):
    run = tmp_path / "run"
    env = dict(os.environ, LRPT_CACHE=str(lrpt_cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    extra = [f"logging.trackers={trackers}"] if trackers else []
    r = subprocess.run([sys.executable, "-m", "trainer", *TINY, *extra, f"run.dir={run}"], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == (["checkpoints", "tensorboard"] if not trackers
                                                                    else ["checkpoints"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # the source of truth either way
    if trackers:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "tensorboard").rglob("events.out.tfevents.*"))
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["loss"][-1][1] == pytest.approx(records[-1]["loss"], rel=1e-6)
    assert scalars["val_loss"][0][0] == 0
