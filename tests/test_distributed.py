"""Real multi-process jobs over gloo, started with the command `lrpt launch` composes.

Each launch costs 10-30 s on a 2-core machine (mostly imports), so one launch of
tests/dist_worker.py checks many things and module-scoped fixtures share it:
- DDP: exact gradient bytes, one collective round per optimizer step under accumulation,
  engine edits, re-wrap after freezing, a perturbed rank caught by check_consistency.
- DeepSpeed ZeRO-1 and ZeRO-2 on CPU: same losses as DDP, in-place edits overwritten by
  the fp32 master but engine.write_param/write_state kept, bytes per collective, re-wrap.
- A rank killed mid-run: the survivors fail within the collective timeout.
- Two "machines" on loopback (the real training loop, DeepSpeed ZeRO-2), then a resume.
"""
from __future__ import annotations

import json
import os
from unittest import mock
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launcher.launch import child_env, compose, free_port

ROOT = Path(__file__).resolve().parent.parent

PERTURB_PARAM = "layers.1.self_attn.v_proj.weight"
GRAD_ACCUM = 4
WORKER = ["train.grad_accum=4", "data.batch_size=4", "optimizer.lr=1e-3", "distributed.timeout_s=20"]


def launch_worker(out: Path, phases: str, overrides: list[str], procs: int = 2, timeout: int = 240):
    argv, env = compose(None, WORKER + overrides, nodes=1, gpus_per_node=procs, main_port=free_port(),
                        module="tests.dist_worker")
    env = child_env({**env, "LRPT_TEST_OUT": str(out), "LRPT_TEST_PHASES": phases})
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return proc, results, wall


def _results(proc, results, procs=2):
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    assert len(results) == procs, log
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    proc, results, wall = launch_worker(tmp_path_factory.mktemp("ddp"), "train,edit,rewrap,perturb", [])
    print(f"DDP launch: {wall:.1f}s")
    return _results(proc, results)


@pytest.fixture(scope="module", params=["zero1", "zero2"])
def zero(request, tmp_path_factory):
    stage = request.param
    proc, results, wall = launch_worker(tmp_path_factory.mktemp(stage), "train,edit,rewrap,perturb",
                                        [f"distributed.deepspeed={stage}"])
    print(f"{stage} launch: {wall:.1f}s")
    return stage, _results(proc, results)


# -- DDP ----------------------------------------------------------------------------------------

def test_ddp_counts_exactly_the_trainable_bytes_once_per_step(ddp):
    for r in ddp:
        t = r["train"]["trainable_bytes"]
        assert t == r["all_param_bytes"]  # everything trainable in this phase
        for s in r["train"]["steps"]:
            # Accumulation: no gradient traffic until the last micro-batch, then exactly T.
            assert s["micro_bytes"] == [0] * (GRAD_ACCUM - 1) + [t]
            assert s["by_op"] == {"all_reduce": t}
        # With every linear weight but the head frozen, only the trainable bytes move.
        tr = r["rewrap"]["trainable_bytes"]
        assert tr < t / 5
        for s in r["rewrap"]["steps"]:
            assert s["micro_bytes"] == [0] * (GRAD_ACCUM - 1) + [tr]
            assert s["bytes"] == tr
        # DDP's start-up broadcast: every parameter (frozen too) and buffer, reported apart.
        assert r["startup_bytes"] >= r["all_param_bytes"]
        assert r["rewrap"]["startup_bytes"] >= 2 * r["all_param_bytes"]


def test_ddp_edits_state_and_rewrap(ddp):
    for r in ddp:
        e = r["edit"]
        # Under DDP the module tensors are the masters: both kinds of edit persist.
        assert abs(e["naive_shift"] - 1.0) < 0.01 and abs(e["engine_shift"] - 1.0) < 0.01
        assert e["write_readback_err"] == 0.0 and e["state_readback_err"] == 0.0
        assert abs(e["exp_avg_after_step"] - 0.9 * 0.25) < 0.005  # beta1 * written value + tiny grad
        assert e["consistent"]
        w = r["rewrap"]
        # exp_avg written before the new optimizer's first step, then two steps of decay.
        assert abs(w["exp_avg_after"] - 0.81 * 0.5) < 0.005 and w["step_state"] == 2.0
        assert w["frozen_unchanged"]


def test_check_consistency_names_the_perturbed_parameter(ddp):
    for r in ddp:
        p = r["perturb"]
        assert p["raised"], p
        assert PERTURB_PARAM in p["message"] and "rank(s) [1]" in p["message"]


# -- DeepSpeed ----------------------------------------------------------------------------------

def test_deepspeed_matches_ddp_losses(zero, ddp):
    stage, results = zero
    ref = [s["loss"] for s in ddp[0]["train"]["steps"]]
    for r in results:
        got = [s["loss"] for s in r["train"]["steps"]]
        assert got == pytest.approx(ref, rel=1e-5), (stage, got, ref)


def test_deepspeed_edits_go_through_the_fp32_master(zero):
    stage, results = zero
    for r in results:
        e = r["edit"]
        # A naive in-place edit of the module copy is overwritten by the master at the step...
        assert e["naive_shift"] < 0.01, (stage, e)
        # ...while engine.write_param edits the master and the copy, and survives.
        assert abs(e["engine_shift"] - 1.0) < 0.01 and e["write_readback_err"] == 0.0
        assert e["module_copy_err"] == 0.0
        assert e["state_readback_err"] == 0.0 and abs(e["exp_avg_after_step"] - 0.225) < 0.005
        assert e["consistent"]  # ranks bitwise identical after the edits
        w = r["rewrap"]
        assert abs(w["exp_avg_after"] - 0.405) < 0.005 and w["step_state"] == 2.0 and w["frozen_unchanged"]
        assert PERTURB_PARAM in r["perturb"]["message"]


def test_deepspeed_bytes_follow_the_collective_algorithm(zero):
    """ZeRO-1: gradients reduced to their owner ranks once per step (payload T) and updated
    shards all-gathered (T). ZeRO-2 keeps only gradient partitions, so it reduces at every
    micro-batch: k*T + T. Plus the 8-byte gradient-norm all-reduce of clipping."""
    stage, results = zero
    for r in results:
        for phase in ("train", "rewrap"):
            t = r[phase]["trainable_bytes"]
            for s in r[phase]["steps"]:
                grads = t * (GRAD_ACCUM if stage == "zero2" else 1)
                assert s["by_op"] == {"reduce": grads, "all_gather_into_tensor": t, "all_reduce": 8}, (stage, s)
                if stage == "zero1":
                    assert s["micro_bytes"][:-1] == [0] * (GRAD_ACCUM - 1)
                else:
                    assert s["micro_bytes"][:-1] == [t] * (GRAD_ACCUM - 1)


# -- failure ----------------------------------------------------------------------------------

def test_killed_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    proc, results, wall = launch_worker(tmp_path, "kill", [], timeout=180)
    assert proc.returncode != 0
    survivor = next(r for r in results if r["rank"] == 0)
    assert "finished" not in survivor["kill"]  # it did not train on alone
    # From the survivor's start of training to the launcher's exit: well under timeout_s + slack.
    assert time.time() - survivor["kill"]["started"] < 20 + 30, (proc.stdout + proc.stderr)[-3000:]


# -- two machines on loopback, the real loop ------------------------------------------------------

LOOP = ["model.name=micro", "data.seq_len=64", "data.batch_size=4", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "train.max_steps=4", "train.grad_accum=2", "logging.log_every=1",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.tensorboard=false",
        "logging.progress=false", "checkpoint.every=2", "distributed.timeout_s=60",
        "distributed.guard_every=2"]


def run_two_machines(run_dir: Path, deepspeed: str, cache: Path, timeout: int = 300) -> list[int]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        # Both "machines" share this host's cores: one thread each, or gloo crawls.
        with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
            argv, env = compose(None, LOOP + [f"run.dir={run_dir}"], nodes=2, node_rank=rank, main_ip="127.0.0.1",
                                main_port=port, gpus_per_node=1, deepspeed=deepspeed)
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        log = open(run_dir.parent / f"{run_dir.name}-machine{rank}.log", "w")
        env = child_env({**env, "LRPT_CACHE": str(cache)})
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _records(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def test_two_machines_on_loopback_train_and_resume(tmp_path, lrpt_cache):
    run = tmp_path / "run"
    codes = run_two_machines(run, "zero2", lrpt_cache)
    logs = "\n".join((tmp_path / f"run-machine{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    full = _records(run)
    assert sorted(full) == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in full.values())
    t = full[1]["trainable_params"] * 4
    # ZeRO-2, grad_accum 2: gradients reduced at each micro-batch, shards gathered once.
    assert all(r["comm_bytes"] == 3 * t + 8 for r in full.values()), full

    # Lose the last checkpoint and the records after it: the relaunch resumes from step 2
    # and must reproduce steps 3-4 of the uninterrupted run.
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 2))
    codes = run_two_machines(run, "zero2", lrpt_cache)
    logs = "\n".join((tmp_path / f"run-machine{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    assert "resumed from" in (tmp_path / "run-machine0.log").read_text()
    resumed = _records(run)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-6), (step, resumed, full)
        assert resumed[step]["comm_bytes_total"] == full[step]["comm_bytes_total"]
