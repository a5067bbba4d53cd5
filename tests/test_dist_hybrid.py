"""Hybrid and adaptive rank through the real loop, 1 node x 2 processes over gloo.

Three launches (tests/test_dist_strategies.py's `launch` and probe: every collective of every
optimizer step recorded below trainer/comm.py's meter):

    DDP     relora adaptive (rank_budget 8, layers.0 full rank)   merges after 4 and 8, reshapes
    ZeRO-1  the same
    DDP     switchlora hybrid (*.self_attn.o full rank, q 2, v 6, down 8, others 4)

Checks: every step sends exactly the trainable bytes of the shapes trained then, which the
analytic model computes from the ranks recorded at the merge (DDP: T; ZeRO-1: 2T and the
clipping norms), never more than uniform rank 8's; ranks change at merges and a re-wrap
follows (start-up bytes in the next record); the loop compared every parameter of both ranks
after every step (guard_every 1), reshapes included; ZeRO-1 reproduces DDP's losses, weights
and optimizer state (fresh adapter state after each reshape, one step count per DeepSpeed
group); `lrpt comm` on the hybrid run: measured = analytic bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_dist_strategies import (ROOT, Run, assert_counted_by_purpose, assert_ddp_steps, assert_same_training,  # noqa: E402
                                  assert_zero_steps, launch)

ADAPTIVE = ["strategy.name=relora", "strategy.rank_budget=8", "strategy.full_rank=[layers.0.*]",
            "strategy.reset_every=4", "strategy.restart_warmup=1", "train.max_steps=10", "train.grad_accum=2",
            "optimizer.lr=3e-3", "distributed.guard_every=1"]
MERGES = [4, 8]
HYBRID_SWITCH = ["strategy.name=switchlora", "strategy.rank=4", "strategy.full_rank=['*.self_attn.o']",
                 "strategy.ranks={q: 2, v: 6, down: 8}", "strategy.switch_interval0=1", "strategy.switch_ratio=1",
                 "strategy.freeze_steps=2", "train.max_steps=6", "optimizer.lr=3e-3", "distributed.guard_every=2"]


@pytest.fixture(scope="module")
def ddp_adaptive(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "ddp-adaptive", "none", ADAPTIVE, lrpt_cache)


@pytest.fixture(scope="module")
def zero1_adaptive(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "zero1-adaptive", "zero1", ADAPTIVE, lrpt_cache)


@pytest.fixture(scope="module")
def ddp_hybrid_switch(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "ddp-hybrid-switchlora", "none", HYBRID_SWITCH, lrpt_cache)


def shapes(run: Run, ranks: dict | None = None) -> dict:
    """Trainable bytes and optimizer groups of `run`'s model (its model.json) with its strategy
    applied at the given adapter ranks (None: as the config builds it), on the meta device."""
    import torch

    from trainer.comm import model_bytes
    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer
    from trainer.strategies import build_strategy

    cfg = load_config(run.dir / "config.yaml")
    args = ModelArgs(**json.loads((run.dir / "model.json").read_text()))
    state = None if ranks is None else {"ranks": ranks}
    with torch.device("meta"):
        groups = build_strategy(cfg.strategy, cfg.train.seed).apply(Transformer(args), 0.0, 10**6, state)
    return dict(model_bytes(cfg, args, strategy_state=state), groups=len(groups), cfg=cfg, args=args)


def cycles(run: Run) -> list[tuple[range, dict]]:
    """(steps, ranks) of each cycle: the first at the budget's uniform rank, each next one at
    the ranks its merge recorded."""
    merges = [r for r in run.records() if r.get("event") == "merge"]
    first = {n: 8 for n in merges[0]["ranks"]}
    bounds = [0] + [m["step"] for m in merges] + [10]
    ranks = [first] + [m["ranks"] for m in merges]
    return [(range(a + 1, b + 1), r) for a, b, r in zip(bounds, bounds[1:], ranks)]


def test_ddp_adaptive_ranks_change_within_budget_and_every_step_sends_its_shapes_bytes(ddp_adaptive):
    run = ddp_adaptive
    events = run.events()
    assert [s for s, e in events if e == "merge"] == MERGES
    budget = shapes(run, {n: 8 for n in cycles(run)[0][1]})["trainable_bytes"]
    assert shapes(run)["trainable_bytes"] == budget  # the first cycle: uniform rank 8
    changed = 0
    previous = None
    for steps, ranks in cycles(run):
        b = shapes(run, ranks)
        assert b["trainable_bytes"] <= budget and b["sync_bytes_per_step"] == b["trainable_bytes"]
        assert_ddp_steps(run, steps, b["trainable_bytes"], accum=2)  # counted = analytic, per step
        recs = run.steps()
        assert all(recs[s]["trainable_params"] * 4 == b["trainable_bytes"] for s in steps)
        if previous is not None and ranks != previous:
            changed += 1
            assert (steps.start - 1, "rewrap") in events  # re-wrapped before the cycle's first step
        previous = ranks
    assert changed >= 1, "no merge changed a rank"
    assert_counted_by_purpose(run)  # start-up bytes in the record after each re-wrap, nowhere else
    for rank in (0, 1):
        assert run.probes[rank]["checks"] == list(range(1, 11))  # identical weights and shapes, every step


def test_zero1_adaptive_matches_ddp_through_reshapes(zero1_adaptive, ddp_adaptive):
    zo, _ = assert_same_training(zero1_adaptive, ddp_adaptive)
    zm = [r["ranks"] for r in zero1_adaptive.records() if r.get("event") == "merge"]
    assert zm == [r["ranks"] for r in ddp_adaptive.records() if r.get("event") == "merge"]
    # Adapters born at the last reshape (after step 8) have stepped twice; the rest all ten times.
    last = max(s for s, e in ddp_adaptive.events() if e == "rewrap")
    assert float(zo["layers.1.self_attn.q_proj.lora_A"]["step"]) == 10 - last
    assert float(zo["embed_tokens.weight"]["step"]) == float(zo["layers.0.self_attn.q_proj.weight"]["step"]) == 10
    for steps, ranks in cycles(zero1_adaptive):
        b = shapes(zero1_adaptive, ranks)
        assert_zero_steps(zero1_adaptive, steps, b["trainable_bytes"], b["groups"], "zero1", 2)
    for rank in (0, 1):
        assert zero1_adaptive.probes[rank]["checks"] == list(range(1, 11))


def test_ddp_hybrid_switchlora_counted_bytes_equal_analytic(ddp_hybrid_switch):
    run = ddp_hybrid_switch
    b = shapes(run)
    assert_ddp_steps(run, range(1, 7), b["trainable_bytes"], accum=1)
    assert [s for s, e in run.events() if e == "switch"] == list(range(1, 7))
    for rank in (0, 1):
        assert run.probes[rank]["checks"] == [2, 4, 6]
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "comm", str(run.dir), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads(out.stdout)
    assert row["measured_bytes_per_step"] == row["analytic_bytes_per_step"] == b["trainable_bytes"]
    assert row["trainable_bytes"] == b["trainable_bytes"] and row["full_rank_bytes"] == b["base_bytes"]
