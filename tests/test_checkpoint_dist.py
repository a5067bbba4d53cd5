"""Sharded checkpoints across world sizes and engines, with real launches (gloo, DeepSpeed).

One chain of four launches: SwitchLoRA (adapters under ZeRO, frozen weights beside them,
per-element Adam steps, a candidate store in the strategy's state) trains 3 steps under
ZeRO-2 on 4 processes, with background saves; then the checkpoint passes through DDP on 2
processes, ZeRO-1 on 2 and one plain process, each loading it and writing it straight back
(tests/checkpoint_worker.py). Every weight and every optimizer state must come back bit for bit,
by name; the last one trains on from it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from launcher.launch import child_env, compose, free_port
from trainer import checkpoint as ckpt

# Four launches (the first of 4 DeepSpeed processes) in the first test's set-up.
pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parent.parent
BASE = ["model.name=micro", "data.seq_len=32", "data.batch_size=2", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "logging.log_every=1", "logging.eval_every=0", "logging.eval_batches=1",
        "logging.blimp_every=0", "logging.progress=false", "logging.tensorboard=false", "distributed.timeout_s=60",
        "strategy.name=switchlora", "strategy.rank=4", "strategy.switch_interval0=1", "checkpoint.every=2",
        "checkpoint.async=true", "train.max_steps=3"]


def launch(run: Path, cache: Path, nproc: int, deepspeed: str, module: str, *extra: str, timeout: int = 420) -> float:
    import os
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        argv, env = compose(None, [*BASE, *extra, f"run.dir={run}"], gpus_per_node=nproc, main_port=free_port(),
                            deepspeed=deepspeed, module=module)
    t0 = time.time()
    proc = subprocess.run(argv, env=child_env({**env, "OMP_NUM_THREADS": "1", "LRPT_CACHE": str(cache)}), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return time.time() - t0


def step3(run: Path) -> dict:
    return ckpt.read(run / "checkpoints" / "step_0000003", ("model", "optimizer", "trainer"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, lrpt_cache):
    root = tmp_path_factory.mktemp("chain")
    runs, times = {}, {}
    runs["zero2x4"] = root / "zero2x4"
    times["zero2x4"] = launch(runs["zero2x4"], lrpt_cache, 4, "zero2", "trainer")
    previous = runs["zero2x4"]
    for name, nproc, ds, extra in (("ddpx2", 2, "none", []), ("zero1x2", 2, "zero1", []),
                                   ("onex1", 1, "none", ["train.max_steps=5"])):
        runs[name] = root / name
        shutil.copytree(previous, runs[name])
        times[name] = launch(runs[name], lrpt_cache, nproc, ds, "tests.checkpoint_worker", *extra)
        previous = runs[name]
    print("launch seconds:", {k: round(v, 1) for k, v in times.items()})
    return runs


def test_checkpoint_folder_is_dcp_with_a_marker(chain):
    folder = chain["zero2x4"] / "checkpoints" / "step_0000003"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", *(f"__{r}_0.distcp" for r in range(4)), "meta.json",
                     *(f"rank_{r:05d}.json" for r in range(4))]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 4 and set(meta["sha256"]) == set(names) - {"meta.json"}
    assert ckpt.verify(folder) is None


def test_weights_and_moments_survive_every_world_size_and_engine_bitwise(chain):
    ref = step3(chain["zero2x4"])
    assert any("lora_A" in n for n in ref["optimizer"]) and ref["model"]
    steps = ref["optimizer"]["layers.0.self_attn.q_proj.lora_A"]["step"]
    assert steps.shape == ref["model"]["layers.0.self_attn.q_proj.lora_A"].shape  # per element (VectorAdamW)
    stored = [v for pair in ref["trainer"]["strategy"]["pools"] for pool in pair for v in pool["store"].values()]
    assert stored and all(torch.is_tensor(v) for v in stored)  # shared-state tensors, written whole by one rank
    for name in ("ddpx2", "zero1x2", "onex1"):
        got = step3(chain[name])
        assert got["model"].keys() == ref["model"].keys(), name
        for k, v in ref["model"].items():
            assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k], v), (name, k)
        assert got["optimizer"].keys() == ref["optimizer"].keys(), name
        for k, state in ref["optimizer"].items():
            assert got["optimizer"][k].keys() == state.keys(), (name, k)
            for key, v in state.items():
                assert torch.equal(got["optimizer"][k][key], v), (name, k, key)
        assert got["trainer"]["strategy"]["switches"] == ref["trainer"]["strategy"]["switches"]
        for (ga, gb), (ra, rb) in zip(got["trainer"]["strategy"]["pools"], ref["trainer"]["strategy"]["pools"]):
            for g, r in ((ga, ra), (gb, rb)):
                assert g["slots"] == r["slots"] and g["free"] == r["free"]
                assert g["store"].keys() == r["store"].keys()
                assert all(torch.equal(g["store"][i], r["store"][i]) for i in r["store"])


def test_background_saves_leave_the_sync_bytes_exact(chain):
    recs = [json.loads(x) for x in (chain["zero2x4"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    from reports.comm import analytic_bytes_per_step

    # ZeRO-2, no accumulation: the gradients reduced to their owners and the updated shards
    # gathered (2T), and one fp32 clipping-norm scalar per flat group (matrices, vectors,
    # adapters). The save of step 2 was written while step 3 ran: its collectives are control.
    want = analytic_bytes_per_step(4 * steps[0]["trainable_params"], 4, "zero2", grad_accum=1) + 4 * 3
    assert [r["comm/sync_bytes"] for r in steps] == [want] * 3


def test_training_goes_on_at_world_size_one(chain):
    recs = [json.loads(x) for x in (chain["onex1"] / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert steps[5]["world_size"] == 1 and all(torch.isfinite(torch.tensor(steps[s]["loss"])) for s in (4, 5))
    assert ckpt.step_of(ckpt.find_latest(chain["onex1"] / "checkpoints")) == 5
