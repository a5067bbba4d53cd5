"""Hybrid rank (strategy.full_rank, strategy.ranks) and adaptive rank (strategy.rank_budget):
which linears adapt at which rank and scale, merges and switches keeping the function at
per-module ranks, the analytic model building the same trainable set, the greedy rank
allocation, and, through the real loop in one process, the reshape at a merge (a re-wrap that
leaves the output unchanged) and exact resume across it, DiLoCo included.

The 2-process DDP and ZeRO-1 runs (counted bytes, identical ranks) are tests/test_dist_hybrid.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn as nn

from trainer.comm import model_bytes
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.dynamics import low_rank_singular_values
from trainer.loop import Trainer, train
from trainer.model import model_args
from trainer.rundir import RunDir
from trainer.seeding import Purpose, seeded_generator
from trainer.shapes import PROJECTIONS
from trainer.strategies.base import StepContext
from trainer.strategies.lora import LoRALinear, kaiming_uniform
from trainer.strategies.rank_plan import allocate_ranks

from test_strategies import Rig, adapters, assert_same_function, batch  # noqa: E402  (same folder)
from test_switchlora import FP32_TOL  # noqa: E402

HYBRID = dict(rank=4, full_rank=["layers.0.*", "*.self_attn.o"], ranks={"q": 2, "v": 6, "down": 8})
HYBRID_KEYS = ["strategy.rank=4", "strategy.full_rank=[layers.0.*, '*.self_attn.o']", "strategy.ranks={q: 2, v: 6, down: 8}"]


def expected_ranks() -> dict[str, int]:
    """HYBRID on the micro model (4 layers): layer 0 and every o_proj full rank."""
    return {f"layers.{i}.{path}": HYBRID["ranks"].get(t, HYBRID["rank"])
            for i in range(1, 4) for t, path in PROJECTIONS.items() if t != "o"}


@pytest.mark.parametrize("name", ["lora", "relora", "switchlora"])
def test_full_rank_patterns_and_per_projection_ranks(name):
    rig = Rig(name, **HYBRID)
    model, st = rig.module, rig.strategy
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert {n: m.rank for n, m in wrapped.items()} == expected_ranks()
    for n, m in wrapped.items():
        scale = 1 / m.rank if name == "switchlora" else 32.0 / m.rank  # 1/r (paper), alpha/r
        assert float(m.lora_scale) == m.scale == pytest.approx(scale, rel=1e-7), n  # the fp32 value, both
        assert m.lora_A.shape == (m.rank, m.in_features) and m.lora_B.shape == (m.out_features, m.rank)
        assert m.lora_A.requires_grad and not m.weight.requires_grad
    plain = [f"layers.0.{p}" for p in PROJECTIONS.values()] + [f"layers.{i}.self_attn.o_proj" for i in range(1, 4)]
    for n in plain:
        m = model.get_submodule(n)
        assert type(m) is nn.Linear and m.weight.requires_grad, n  # trains full rank
    if name == "switchlora":
        for (pa, pb), (_, m) in zip(st.pools, st.adapters):
            assert len(pa.slots) == len(pb.slots) == m.rank
            assert pa.size == pb.size == min(m.in_features, m.out_features)
    assert "10 of 28 targeted linears full rank" in st.describe(model) and "ranks 2..8" in st.describe(model)
    # The analytic model (lrpt comm, the trainer's records) builds the same trainable set from
    # the config keys as a user writes them.
    cfg = load_config(None, [f"strategy.name={name}", "model.name=micro", "model.vocab_size=256", "data.seq_len=32",
                             "strategy.reset_every=10", f"train.seed={rig.strategy.seed}", *HYBRID_KEYS])
    b = model_bytes(cfg, model_args(cfg.model, 32, 256))
    assert b["trainable_bytes"] == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert b["total_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_merge_and_switches_keep_the_function_at_per_module_ranks():
    rig = Rig("relora", reset_every=6, restart_warmup=2, **HYBRID)
    x = batch()
    for _ in range(5):
        rig.train_step(x)
    loss = rig.model(x[:, :-1], x[:, 1:])
    loss.backward()
    rig.optimizer.step()
    rig.optimizer.zero_grad(set_to_none=True)
    pre = [(m.weight.detach().clone(), m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.rank)
           for m in adapters(rig.module)]
    out = rig.logits(x)
    assert rig.strategy.after_step(6, StepContext(rig.engine, rig.max_steps)) == "merge"
    assert_same_function(out, rig.logits(x))
    for m, (W, A, B, r) in zip(adapters(rig.module), pre):
        torch.testing.assert_close(m.weight.detach(), W + 32.0 / r * B @ A, rtol=0, atol=1e-6)  # its own scale
        assert not m.lora_B.any() and m.lora_A.shape[0] == r
    assert 0 < rig.strategy.event_record()["merge_per"] < 1 and "ranks" not in rig.strategy.event_record()

    sw = Rig("switchlora", switch_interval0=1.0, switch_ratio=10.0, freeze_steps=3, **HYBRID)
    sw.train_step(x)
    ctx = StepContext(sw.engine, sw.max_steps)
    for step in (2, 3):
        loss = sw.model(x[:, :-1], x[:, 1:])
        loss.backward()
        sw.optimizer.step()
        sw.optimizer.zero_grad(set_to_none=True)
        out = sw.logits(x)
        assert sw.strategy.after_step(step, ctx) == "switch"
        assert_same_function(out, sw.logits(x), FP32_TOL)
    # Each layer switches r rate / interval0 vectors: its own r (2 .. 8 here).
    for (pa, _), (_, m) in zip(sw.strategy.pools, sw.strategy.adapters):
        assert len(pa.slots) == m.rank and len(pa.store) > 0


@pytest.mark.parametrize("overrides,message", [
    (["strategy.full_rank=[layers.9.*]"], r"strategy.full_rank: pattern 'layers.9.\*' matches none of the adapted"),
    (["strategy.full_rank=[o]"], r"pattern 'o' matches none .*'\*.self_attn.o'"),
    (["strategy.targets=[q, v]", "strategy.full_rank=['*.down']"], r"pattern '\*.down' matches none"),
    (["strategy.targets=[q, v]", "strategy.ranks={gate: 8}"], r"strategy.ranks.gate=8: expected a projection of"),
    (["strategy.name=lora", "strategy.rank_budget=8"], r"strategy.rank_budget=8: expected 0 unless strategy.name=relora"),
    (["strategy.name=switchlora", "strategy.rank_budget=8"], r"strategy.rank_budget=8: expected 0 unless"),
    (["strategy.rank_budget=8", "strategy.ranks={q: 4}"], r"strategy.ranks=\{'q': 4\}: expected none with strategy.rank_budget"),
    (["strategy.rank_budget=8", "distributed.comm_hook=powersgd"], r"strategy.rank_budget=8: expected 0 with distributed.comm_hook=powersgd"),
    (["strategy.rank_budget=8", "distributed.deepspeed=zero3"], r"strategy.rank_budget=8: expected 0 with distributed.deepspeed=zero3"),
])
def test_bad_hybrid_and_adaptive_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, ["strategy.name=relora", "train.max_steps=3000", *overrides])
    assert "\n" not in str(e.value)


def test_allocate_ranks_stays_within_budget_and_bounds():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        costs = [rng.choice([64, 96, 256, 480, 8192]) for _ in range(n)]
        ranks = [rng.randint(1, 40) for _ in range(n)]
        caps = [rng.choice([r, 2 * r, 64, 128]) for r in ranks]
        demands = [rng.uniform(0, r) * rng.choice([0, 1, 1, 1]) for r in ranks]
        budget = sum(c * r for c, r in zip(costs, ranks)) + rng.randint(0, 3000)
        new = allocate_ranks(demands, costs, ranks, caps, budget)
        spent = sum(c * r for c, r in zip(costs, new))
        assert spent <= budget
        for r, nr, cap, c in zip(ranks, new, caps, costs):
            lo, hi = max(1, (r + 1) // 2), max(max(1, (r + 1) // 2), min(2 * r, cap))
            assert lo <= nr <= hi
            assert nr == hi or spent + c > budget  # greedy: no unit that fits is left unspent
        assert new == allocate_ranks(demands, costs, ranks, caps, budget)  # deterministic
    # Equal demands keep a uniform allocation; demand moves rank between modules.
    assert allocate_ranks([7.5] * 4, [256, 256, 480, 480], [8] * 4, [128] * 4, 8 * 1472) == [8] * 4
    new = allocate_ranks([8.0, 7.9, 2.0, 0.0], [256] * 4, [8] * 4, [128] * 4, 8 * 4 * 256)
    assert new[0] >= new[1] > 8 > new[2] >= new[3] == 4  # a zero update halves its rank


def test_low_rank_singular_values_are_those_of_the_product():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(96, 6, generator=g), torch.randn(6, 40, generator=g)
    B[:, 5] = B[:, 0]  # rank 5
    s = low_rank_singular_values(B, A, -0.5)
    torch.testing.assert_close(s, torch.linalg.svdvals(0.5 * B.double() @ A.double())[:6], rtol=1e-9, atol=1e-9)
    assert s[-1] < 1e-9 * s[0]


# ---------------------------------------------------------------------------------------------
# Adaptive rank through the real loop (one process)

RUN = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000",
       "data.embedded_vocab=300", "logging.log_every=1", "logging.eval_every=0", "logging.eval_batches=1",
       "logging.blimp_every=0", "logging.progress=false", "logging.trackers=[]", "schedule.warmup_steps=2",
       "checkpoint.every=1000", "optimizer.lr=3e-3", "train.max_steps=12"]
# Merges after steps 4, 8 and 12; ranks re-chosen at each from the merged updates.
ADAPTIVE = ["strategy.name=relora", "strategy.rank_budget=8", "strategy.full_rank=[layers.0.*]",
            "strategy.reset_every=4", "strategy.restart_warmup=1"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, lrpt_cache):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))


def cfg_for(run_dir, *overrides):
    return load_config(None, [*RUN, *ADAPTIVE, f"run.dir={run_dir}", *overrides])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


def test_adaptive_ranks_change_within_budget_reshape_keeps_output_and_resume_is_exact(tmp_path):
    full = train(cfg_for(tmp_path / "full"))
    recs = RunDir(full).read_metrics()
    merges = [r for r in recs if r.get("event") == "merge"]
    rewraps = [r for r in recs if r.get("event") == "rewrap"]
    assert [r["step"] for r in merges] == [4, 8, 12]
    cfg = cfg_for(tmp_path / "x")
    args = model_args(cfg.model, 32, json.loads((full / "model.json").read_text())["vocab_size"])
    budget = model_bytes(load_config(None, [*RUN, *ADAPTIVE[:1], "strategy.rank=8", "strategy.full_rank=[layers.0.*]"]),
                         args)["trainable_bytes"]  # uniform rank 8, the same hybrid set
    assert model_bytes(cfg, args)["trainable_bytes"] == budget  # the first cycle runs at the budget
    uniform = previous = {n: 8 for n in merges[0]["ranks"]}
    assert len(previous) == 21  # layers 1-3 adapted, layer 0 full rank
    for m in merges:
        ranks = m["ranks"]  # recorded at every merge: the next cycle's
        analytic = model_bytes(cfg, args, strategy_state={"ranks": ranks})["trainable_bytes"]
        assert analytic <= budget
        after = [r for r in recs if "loss" in r and r["step"] > m["step"]][:1]
        if after:  # the records of the next cycle count exactly these trainable parameters
            assert after[0]["trainable_params"] * 4 == analytic
        if m["step"] < 12:  # a re-wrap before the next step exactly when a rank changed
            assert (m["step"] in {r["step"] for r in rewraps}) == (ranks != previous)
        previous = ranks
    assert len({json.dumps(m["ranks"], sort_keys=True) for m in merges}) > 1  # ranks did change
    assert rewraps and all(r["step"] in (4, 8) for r in rewraps)

    # Stopped at a merge (the new ranks chosen, the old shapes in the checkpoint), resumed:
    # the re-wrap happens on resume, leaves the output bitwise unchanged, gives fresh adapters
    # and keeps the other parameters' optimizer state; stopped again after it, resumed again.
    part = tmp_path / "part"
    train(cfg_for(part, "train.stop_at=4"))
    t = Trainer(cfg_for(part, "train.stop_at=6"))
    try:
        st, eng = t.strategy, t.engine
        assert st.needs_rewrap(4) and {n: m.rank for n, m in st.adapters} == uniform
        x, _ = t.val_batches[0]
        with torch.no_grad():
            before = eng.module(x)
        old = dict(eng.module.named_parameters())
        kept = eng.optimizer_state_dict()
        t._rewrap(4)
        eng = t.engine
        with torch.no_grad():
            assert torch.equal(before, eng.module(x))
        assert {n: m.rank for n, m in st.adapters} == merges[0]["ranks"]
        state = eng.optimizer_state_dict()
        for index, (n, m) in enumerate(st.adapters):
            assert m.lora_A is not old[f"{n}.lora_A"] and m.scale == pytest.approx(32.0 / m.rank, rel=1e-7)
            fresh = kaiming_uniform((m.rank, m.in_features), seeded_generator(cfg.train.seed, 4, index, Purpose.A_INIT))
            assert torch.equal(m.lora_A.detach(), fresh) and not m.lora_B.any()
            assert not any(v.any() for v in state.get(f"{n}.lora_A", {}).values() if v.dim())  # fresh: empty or zero
        for n in ("embed_tokens.weight", "layers.0.mlp.down_proj.weight", "norm.weight"):
            assert all(torch.equal(kept[n][k], state[n][k]) for k in kept[n])
        assert not st.needs_rewrap(4)
        t.fit()
    finally:
        t.accelerator.end_training()
    train(cfg_for(part))
    assert losses(part) == losses(full)  # bitwise
    assert [r["ranks"] for r in RunDir(part).read_metrics() if "ranks" in r] == [m["ranks"] for m in merges]


@pytest.mark.parametrize("extra,stop", [
    (["distributed.sync=diloco", "distributed.diloco_inner_steps=2", "train.max_steps=8"], 4),
    (["strategy.name=switchlora", "strategy.rank_budget=0", "strategy.switch_interval0=2", "strategy.switch_ratio=1",
      "strategy.ranks={q: 2, down: 8}", "train.max_steps=6"], 3),
], ids=["adaptive-diloco", "switchlora-hybrid"])
def test_hybrid_and_adaptive_resume_exactly(tmp_path, extra, stop):
    full = train(cfg_for(tmp_path / "full", *extra))
    part = tmp_path / "part"
    train(cfg_for(part, *extra, f"train.stop_at={stop}"))
    train(cfg_for(part, *extra))
    assert losses(part) == losses(full)
    if "distributed.sync=diloco" in extra:
        assert any(r.get("event") == "rewrap" for r in RunDir(full).read_metrics())
