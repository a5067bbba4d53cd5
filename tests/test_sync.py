"""Sync modes and compression hooks through the real loop.

DiLoCo: at world size 1 with outer lr 1 and momentum 0 it is plain training, bit for bit;
over 2 processes the ranks are bitwise identical after every outer sync (the loop's rank
checksum runs at each one and fails the run on a mismatch), one outer all-reduce carries
exactly the trainable bytes, a merge or switch happens inside the run, and a resume between
outer syncs reproduces the uninterrupted losses.

DDP hooks: measured sync bytes equal the analytic figure exactly (bf16: half; PowerSGD: P and
Q per matrix, vectors whole); PowerSGD's state is checkpointed (resume exact); a bf16 run
tracks the fp32 one.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher.launch import child_env, compose
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=micro", "model.num_layers=2", "data.seq_len=32", "data.batch_size=4", "logging.log_every=1",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
        "schedule.warmup_steps=2", "checkpoint.every=1000", "distributed.timeout_s=60"]
STRATEGIES = {
    "full": ["strategy.name=full"],
    "relora": ["strategy.name=relora", "strategy.rank=4", "strategy.warm_start_steps=4", "strategy.reset_every=4",
               "strategy.restart_warmup=1"],
    "switchlora": ["strategy.name=switchlora", "strategy.rank=4", "strategy.switch_interval0=2", "strategy.switch_ratio=1"],
}
# A worker per process: two workers on one host (a worker per node would make it one).
DILOCO = ["distributed.sync=diloco", "distributed.diloco_inner_steps=4", "distributed.diloco_worker=process"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run).read_metrics() if "loss" in r}


def records(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_metrics() if "loss" in r]


def launch(run: Path, overrides: list[str], timeout: int = 300) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv, env = compose(None, [*TINY, *overrides, f"run.dir={run}"], gpus_per_node=2, main_port=port)
    proc = subprocess.run(argv, env=child_env(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, lrpt_cache):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))


# -- DiLoCo -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_diloco_at_world_size_one_is_plain_training(tmp_path, name):
    common = [*TINY, *STRATEGIES[name], "train.max_steps=12"]
    plain = train(load_config(None, [*common, f"run.dir={tmp_path / 'plain'}"]))
    # SwitchLoRA switches at outer syncs only (a switch folds A and B into the frozen W, which
    # must happen where every rank holds the same A and B): H = 1 switches as plain training does.
    h = ["distributed.diloco_inner_steps=1"] if name == "switchlora" else []
    diloco = train(load_config(None, [*common, *DILOCO, *h, "distributed.outer_lr=1", "distributed.outer_momentum=0",
                                      f"run.dir={tmp_path / 'diloco'}"]))
    assert losses(diloco) == losses(plain)


def test_misaligned_reset_every_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*STRATEGIES["relora"], "strategy.reset_every=6", *DILOCO])
    assert "strategy.reset_every=6: expected a multiple of distributed.diloco_inner_steps=4" in str(err.value)
    with pytest.raises(ConfigError, match="distributed.deepspeed='zero1': expected none with "
                                          "distributed.diloco_worker=process"):
        load_config(None, [*DILOCO, "distributed.deepspeed=zero1"])
    with pytest.raises(ConfigError, match="distributed.deepspeed='zero3': expected zero1 or zero2"):
        load_config(None, [*DILOCO, "distributed.diloco_worker=node", "distributed.deepspeed=zero3"])
    load_config(None, [*DILOCO, "distributed.diloco_worker=node", "distributed.deepspeed=zero2"])  # ZeRO inside a node


@pytest.fixture(scope="module")
def diloco_runs(tmp_path_factory):
    """2-process DiLoCo runs, H = 4, a rank check at every outer sync: each strategy
    uninterrupted, and ReLoRA stopped mid-cycle (step 6) and resumed."""
    root = tmp_path_factory.mktemp("diloco")
    runs = {}
    dropout = {"relora": ["strategy.dropout=0.1"]}  # LoRA dropout: each rank draws its own masks
    for name, overrides in STRATEGIES.items():
        runs[name] = root / name
        launch(runs[name], [*overrides, *dropout.get(name, []), *DILOCO, "train.max_steps=12",
                            "distributed.guard_every=4"])
    part = root / "relora-resumed"
    resumable = [*STRATEGIES["relora"], *dropout["relora"], *DILOCO, "train.max_steps=12", "distributed.guard_every=4",
                 "checkpoint.every=3"]
    launch(part, [*resumable, "train.stop_at=6"])
    launch(part, resumable)
    return runs, part


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_diloco_sends_the_trainable_bytes_once_per_outer_step(diloco_runs, name):
    runs, _ = diloco_runs
    recs = records(runs[name])
    assert [r["step"] for r in recs] == list(range(1, 13))
    for r in recs:
        trainable_bytes = 4 * r["trainable_params"]
        want = trainable_bytes if r["step"] % 4 == 0 else 0  # nothing at all between outer syncs
        assert r["comm/sync_bytes"] == want, (r["step"], r["comm/sync_bytes"], want)
        assert r["comm_bytes"] == want
    events = [r.get("event") for r in recs]
    if name == "relora":
        assert events.count("merge") == 2 and any(r.get("event") == "rewrap" for r in RunDir(runs[name]).read_metrics())
    if name == "switchlora":
        assert "switch" in events  # switches happen, at outer syncs only
        assert all(r["step"] % 4 == 0 for r in recs if r.get("event") == "switch")


def test_diloco_resume_between_outer_syncs_is_exact(diloco_runs):
    runs, part = diloco_runs
    assert losses(part) == losses(runs["relora"])


def test_every_rank_draws_its_own_dropout(diloco_runs):
    """The global streams (LoRA dropout) are seeded per rank: two workers with the same masks
    would see less noise than the run claims."""
    import torch

    from trainer import checkpoint as ckpt
    _, part = diloco_runs
    rng = [o["rng"] for o in ckpt.read(part / "checkpoints" / "step_0000006", parts=("own",))["own"]]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_analytic_diloco_bytes_are_trainable_bytes_over_h(diloco_runs):
    from reports.comm import comm_report
    (row,) = comm_report([str(diloco_runs[0]["full"])])
    recs = records(diloco_runs[0]["full"])
    assert row["analytic_bytes_per_step"] == pytest.approx(4 * recs[-1]["trainable_params"] / 4, abs=1)


# -- DDP communication hooks --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hook_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    common = [*STRATEGIES["relora"], "strategy.warm_start_steps=0", "strategy.reset_every=6", "train.max_steps=10"]
    runs = {}
    for hook in ("none", "bf16", "powersgd"):
        runs[hook] = root / hook
        launch(runs[hook], [*common, f"distributed.comm_hook={hook}", "distributed.powersgd_start_iter=3"])
    part = root / "powersgd-resumed"
    ps = [*common, "distributed.comm_hook=powersgd", "distributed.powersgd_start_iter=3", "checkpoint.every=4"]
    launch(part, [*ps, "train.stop_at=5"])
    launch(part, ps)
    return runs, part


def test_hook_bytes_equal_the_analytic_figure(hook_runs):
    import json

    from trainer.comm import model_bytes
    from trainer.shapes import ModelArgs

    runs, _ = hook_runs
    for hook, run in runs.items():
        cfg = load_config(RunDir(run).config)
        args = ModelArgs(**json.loads(RunDir(run).model_json.read_text()))
        b = model_bytes(cfg, args)
        recs = records(run)
        for r in recs:
            # PowerSGD sends the whole bucket before its start step (error feedback warms up).
            plain = hook == "powersgd" and r["step"] <= cfg.distributed.powersgd_start_iter
            want = 4 * r["trainable_params"] if plain else b["sync_bytes_per_step"]
            assert r["comm/sync_bytes"] == want, (hook, r["step"], r["comm/sync_bytes"], want)
        if hook == "bf16":
            assert b["sync_bytes_per_step"] == 2 * r["trainable_params"]
        if hook == "powersgd":
            assert b["sync_bytes_per_step"] < 0.5 * 4 * r["trainable_params"]


def test_powersgd_resume_is_exact(hook_runs):
    runs, part = hook_runs
    assert losses(part) == losses(runs["powersgd"])


def test_bf16_hook_tracks_fp32(hook_runs):
    runs, _ = hook_runs
    fp32, bf16 = losses(runs["none"]), losses(runs["bf16"])
    assert fp32.keys() == bf16.keys()
    # bf16 gradients carry 8 mantissa bits: over 10 steps the loss moves by well under 1%.
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=1e-2), step
