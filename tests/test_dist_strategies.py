"""Low-rank strategies through the real training loop, 1 node x 2 processes over gloo.

Five launches of `python -m trainer` (composed by `lrpt launch`'s `compose`), each run
through this file's own entry point (`python -m tests.test_dist_strategies`), which adds an
independent probe and then calls `trainer.__main__.main`. The probe wraps torch.distributed's
collectives and DDP's bucket all-reduce hook *below* trainer/comm.py's meter and records,
for every optimizer step, which collective ran at which micro-batch with how many bytes,
plus the steps at which the loop checked cross-rank consistency.

    DDP      relora      warm start 2, merges after steps 5 and 8, grad_accum 4
    ZeRO-2   relora      the same; a checkpoint after every step
    DDP      switchlora  switches at every step, freeze_steps 2, grad_accum 2
    ZeRO-1   switchlora  the same
    DDP      full        the full-rank baseline for `lrpt comm`

Checks: bytes per optimizer step are the trainable bytes (DDP) or follow the ZeRO
algorithm, counted once per step under accumulation; `lrpt comm --json` agrees with the
parameter bytes computed here; ZeRO runs reproduce the DDP runs' losses (and final
weights) through merges, re-inits, optimizer pruning, switches and freezes, which only
happens if every edit went through DeepSpeed's fp32 masters; merged checkpoints hold the
seeded fresh adapters; ranks were checked identical after every merge/switch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent

BASE = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "schedule.warmup_steps=2", "logging.log_every=1", "logging.eval_every=0",
        "logging.eval_batches=1", "logging.blimp_every=0", "logging.tensorboard=false",
        "logging.progress=false", "distributed.timeout_s=60", "distributed.guard_every=100"]
# Full-rank warm start for 2 steps (rewrap before step 3), then merges after steps 5 and 8;
# the LR is 0 at the restarts (steps 3, 6, 9) and back at full one step later.
RELORA = ["strategy.name=relora", "strategy.rank=4", "strategy.reset_every=3", "strategy.restart_warmup=1",
          "strategy.warm_start_steps=2", "train.max_steps=9", "train.grad_accum=4", "optimizer.lr=2e-3"]
RELORA_MERGES, RELORA_REWRAP = [5, 8], 2
# ~3.4 switches per layer per side after step 1, ~1.2 after step 8 (rank 4, ratio 1).
SWITCH = ["strategy.name=switchlora", "strategy.rank=4", "strategy.switch_interval0=1",
          "strategy.switch_ratio=1", "strategy.freeze_steps=2", "train.max_steps=8", "train.grad_accum=2",
          "optimizer.lr=3e-3", "distributed.guard_every=4"]
SWITCH_CHECKS = [4, 8]  # guard_every, not after each switch
FULL = ["strategy.name=full", "train.max_steps=3"]


# ---------------------------------------------------------------------------------------------
# The probe (runs inside each launched process)

PURPOSES = ("sync", "edit", "control", "startup")


def _probe_main(argv: list[str]) -> int:
    """`python -m tests.test_dist_strategies CONFIG? key=value ...`: trainer.__main__.main with
    collectives recorded into $LRPT_PROBE_DIR/rank<R>.json: per optimizer step, which ran at
    which micro-batch with how many bytes; per purpose, payload and ring wire bytes between
    successive CommMeter.pop() calls, beside what the meter itself returned.

    The probe attributes by its own rules, from where the loop is: inside build_accelerator
    or prepare: startup; inside Trainer._train_step: sync; inside a strategy's after_step:
    edit; anywhere else: control."""
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from trainer import comm, loop
    from trainer.data import BatchLoader
    from trainer.strategies import STRATEGIES

    lock, local = threading.Lock(), threading.local()
    cur = {"rec": None, "micro": -1, "purpose": ["control"]}
    out = {"steps": [], "checks": [], "pops": []}
    totals = {p: [0, 0.0] for p in PURPOSES}  # payload, wire
    popped_at = {p: [0, 0.0] for p in PURPOSES}

    def nbytes(x) -> int:
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(t) for t in x)
        return 0

    def wire(op: str, n: int) -> float:
        world = dist.get_world_size()
        return n * 2 * (world - 1) / world if op in ("all_reduce", "ddp_bucket") else n * (world - 1) / world

    def note(op: str, n: int) -> None:
        if getattr(local, "in_hook", False):
            return  # the DDP bucket's own all-reduce: noted as the bucket
        with lock:
            purpose = cur["purpose"][-1]
            totals[purpose][0] += int(n)
            totals[purpose][1] += wire(op, n)
            if cur["rec"] is not None:
                cur["rec"]["ops"].append([cur["micro"], op, int(n)])

    # op -> (argument name, position) of the payload tensor(s), as trainer/comm.py defines it.
    payload = {"all_reduce": ("tensor", 0), "reduce": ("tensor", 0), "broadcast": ("tensor", 0),
               "all_gather_into_tensor": ("output_tensor", 0), "reduce_scatter_tensor": ("input", 1),
               "all_gather": ("tensor_list", 0), "reduce_scatter": ("input_list", 1),
               "all_reduce_coalesced": ("tensors", 0), "_broadcast_coalesced": (None, 1)}

    def wrap(op, fn, name, pos):
        def wrapper(*args, **kwargs):
            note(op, nbytes(kwargs.get(name, args[pos] if len(args) > pos else None)))
            return fn(*args, **kwargs)
        return wrapper

    for op, (name, pos) in payload.items():
        # Before DeepSpeed's backend captures function objects; c10d's module globals too,
        # which its object collectives (all_gather_object, broadcast_object_list) call.
        if hasattr(dist, op):
            fn = getattr(dist, op)
            wrapped = wrap(op, fn, name, pos)
            setattr(dist, op, wrapped)
            if getattr(c10d, op, None) is fn:
                setattr(c10d, op, wrapped)
    hook = default_hooks.allreduce_hook

    def counted_hook(state, bucket):
        buf = bucket.buffer()
        note("ddp_bucket", buf.numel() * buf.element_size())
        local.in_hook = True
        try:
            return hook(state, bucket)
        finally:
            local.in_hook = False

    default_hooks.allreduce_hook = counted_hook  # trainer/comm.py looks it up at each call

    def within(purpose, fn):
        def wrapper(*args, **kwargs):
            with lock:
                cur["purpose"].append(purpose)
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    cur["purpose"].pop()
        return wrapper

    train_step, next_batch, check = loop.Trainer._train_step, BatchLoader.next_batch_to, loop.check_consistency

    def probed_train_step(self, step):
        with lock:
            cur["rec"], cur["micro"] = {"step": step, "ops": []}, -1
        try:
            return train_step(self, step)
        finally:
            with lock:
                out["steps"].append(cur["rec"])
                cur["rec"] = None

    def probed_next_batch(self, device):  # the loop's call per micro-batch (the loader prefetches)
        with lock:
            cur["micro"] += 1
        return next_batch(self, device)

    def probed_check(engine, step):
        check(engine, step)  # raises ConsistencyError on any difference
        out["checks"].append(step)

    pop = comm.CommMeter.pop

    def probed_pop(self):
        popped = pop(self)
        with lock:
            mine = {p: {"bytes": totals[p][0] - popped_at[p][0], "wire_bytes": totals[p][1] - popped_at[p][1]}
                    for p in PURPOSES}
            for p in PURPOSES:
                popped_at[p] = list(totals[p])
        out["pops"].append({"probe": mine, "meter": popped})
        return popped

    loop.Trainer._train_step, BatchLoader.next_batch_to, loop.check_consistency = (
        within("sync", probed_train_step), probed_next_batch, probed_check)
    loop.build_accelerator, loop.prepare = within("startup", loop.build_accelerator), within("startup", loop.prepare)
    comm.CommMeter.pop = probed_pop
    for spec in STRATEGIES.values():
        module, cls = spec.split(":")
        klass = getattr(__import__(module, fromlist=[cls]), cls)
        if "after_step" in vars(klass):
            klass.after_step = within("edit", klass.after_step)
    try:
        from trainer.__main__ import main
        return main(argv)
    finally:
        rank = os.environ.get("RANK", "0")
        d = Path(os.environ["LRPT_PROBE_DIR"])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Launching

@dataclass
class Run:
    dir: Path
    wall: float
    log: str
    probes: list[dict]  # per rank

    def records(self) -> list[dict]:
        return [json.loads(x) for x in (self.dir / "metrics.jsonl").read_text().splitlines()]

    def steps(self) -> dict[int, dict]:
        return {r["step"]: r for r in self.records() if "loss" in r}

    def losses(self) -> list[float]:
        s = self.steps()
        return [s[k]["loss"] for k in sorted(s)]

    def events(self) -> list[tuple[int, str]]:
        return [(r["step"], r["event"]) for r in self.records() if "event" in r]

    def checkpoint(self, step: int, part: str = "model") -> dict:
        """One part of checkpoint `step`, whole, by name: model, optimizer or trainer."""
        from trainer.checkpoint import read
        return read(self.dir / "checkpoints" / f"step_{step:07d}", (part,))[part]


def launch(tmp: Path, name: str, deepspeed: str, overrides: list[str], cache: Path, timeout: int = 300) -> Run:
    from launcher.launch import child_env, compose
    from launcher.launch import free_port

    run_dir, probe_dir = tmp / name, tmp / f"{name}-probe"
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):  # two processes share the cores
        argv, env = compose(None, BASE + overrides + [f"run.dir={run_dir}"], nodes=1, gpus_per_node=2,
                            main_port=free_port(), deepspeed=deepspeed, module="tests.test_dist_strategies")
    env = child_env({**env, "OMP_NUM_THREADS": "1", "LRPT_CACHE": str(cache), "LRPT_PROBE_DIR": str(probe_dir)})
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    log = (proc.stdout + proc.stderr)[-6000:]
    print(f"{name}: {wall:.1f}s")
    assert proc.returncode == 0, log
    probes = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return Run(run_dir, wall, log, probes)


@pytest.fixture(scope="module")
def ddp_relora(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "ddp-relora", "none", RELORA, lrpt_cache)


@pytest.fixture(scope="module")
def zero2_relora(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "zero2-relora", "zero2",
                  RELORA + ["checkpoint.every=1", "checkpoint.keep=20"], lrpt_cache)


@pytest.fixture(scope="module")
def ddp_switch(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "ddp-switchlora", "none", SWITCH, lrpt_cache)


@pytest.fixture(scope="module")
def zero1_switch(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "zero1-switchlora", "zero1", SWITCH, lrpt_cache)


@pytest.fixture(scope="module")
def ddp_full(tmp_path_factory, lrpt_cache):
    return launch(tmp_path_factory.mktemp("dist"), "ddp-full", "none", FULL, lrpt_cache)


# ---------------------------------------------------------------------------------------------
# What the runs should send, computed here from the model shape

WRAPPED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def param_bytes(run: Run, step: int) -> dict:
    """Parameter bytes of `run`'s model with its strategy applied for optimizer step `step`.
    `trainable` is counted by name (everything but the wrapped W; adapters only after the
    warm start) and checked against requires_grad; `base` is the model without adapters,
    what full-rank training syncs; `groups` the optimizer's flat parameter groups."""
    import torch

    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer
    from trainer.strategies import build_strategy

    cfg = load_config(run.dir / "config.yaml")
    model = Transformer(ModelArgs(**json.loads((run.dir / "model.json").read_text())))
    base = sum(p.numel() * 4 for p in model.parameters())
    strategy = build_strategy(cfg.strategy, cfg.train.seed)
    groups = strategy.apply(model, cfg.optimizer.weight_decay, step)
    named = dict(model.named_parameters())
    warm = cfg.strategy.name == "relora" and step < cfg.strategy.warm_start_steps
    if cfg.strategy.name == "full" or warm:
        by_name = [n for n in named if not n.endswith(("lora_A", "lora_B"))]
    else:
        by_name = [n for n in named if not n.endswith(tuple(f"{w}.weight" for w in WRAPPED))]
    trainable = sum(named[n].numel() * 4 for n in by_name)
    assert trainable == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # 4 bytes each
    return dict(trainable=trainable, base=base, total=sum(p.numel() * 4 for p in model.parameters()),
                groups=len(groups), strategy=strategy, model=model, seed=cfg.train.seed)


def step_ops(run: Run, rank: int, step: int) -> list[list]:
    """[micro-batch, op, bytes] of the collectives issued during optimizer step `step` (a DDP
    bucket is noted once, as `ddp_bucket`)."""
    (rec,) = [s for s in run.probes[rank]["steps"] if s["step"] == step]
    return [list(op) for op in rec["ops"]]


def by_op(ops) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, op, n in ops:
        out[op] = out.get(op, 0) + n
    return out


def assert_ddp_steps(run: Run, steps, trainable: int, accum: int):
    """Every rank: one all-reduce round of exactly the trainable bytes, all of it at the last
    micro-batch (no gradient traffic during accumulation), and nothing else (no buffer
    broadcasts); the metrics' comm_bytes says the same."""
    recs = run.steps()
    for step in steps:
        assert recs[step]["comm_bytes"] == trainable, (step, recs[step])
        for rank in (0, 1):
            ops = step_ops(run, rank, step)
            assert {op for _, op, _ in ops} == {"ddp_bucket"}, (step, rank, ops)
            assert {m for m, _, _ in ops} == {accum - 1}, (step, rank, ops)
            assert sum(n for _, _, n in ops) == trainable


def assert_zero_steps(run: Run, steps, trainable: int, groups: int, stage: str, accum: int):
    """ZeRO-1: gradients reduced to their owners once, at the last micro-batch (payload T);
    ZeRO-2: at every micro-batch (k T). Then the updated shards all-gathered (T), and one
    fp32 scalar per flat group all-reduced for the clipping norm."""
    from reports.comm import analytic_bytes_per_step

    recs = run.steps()
    expected = analytic_bytes_per_step(trainable, 2, stage, grad_accum=accum) + 4 * groups
    for step in steps:
        assert recs[step]["comm_bytes"] == expected, (step, recs[step]["comm_bytes"], expected)
        for rank in (0, 1):
            ops = step_ops(run, rank, step)
            reduce_micros = [m for m in range(accum) if stage == "zero2" or m == accum - 1]
            for m in range(accum):
                got = by_op(o for o in ops if o[0] == m)
                want = {"reduce": trainable} if m in reduce_micros else {}
                if m == accum - 1:
                    want.update(all_gather_into_tensor=trainable, all_reduce=4 * groups)
                assert got == want, (step, rank, m, got, want)
            assert sum(1 for _, op, n in ops if op == "all_reduce") == groups
            assert sum(n for _, _, n in ops) == expected


# ---------------------------------------------------------------------------------------------
# DDP: bytes, accumulation, `lrpt comm`

def test_ddp_relora_sends_the_trainable_bytes_once_per_step(ddp_relora):
    warm, low = param_bytes(ddp_relora, 0), param_bytes(ddp_relora, RELORA_REWRAP)
    assert warm["trainable"] == warm["base"]  # full-rank warm start: every base weight
    assert low["trainable"] < warm["base"] / 5 and low["total"] > low["base"]
    assert ddp_relora.events() == [(RELORA_REWRAP, "rewrap")] + [(k, "merge") for k in RELORA_MERGES]
    # grad_accum 4: one round at the 4th micro-batch, the same bytes as grad_accum 1 sends
    # (test_ddp_full_sends_every_parameter_byte: the same base bytes at grad_accum 1).
    assert_ddp_steps(ddp_relora, range(1, RELORA_REWRAP + 1), warm["base"], accum=4)
    # Between and after merges: the adapters, embeddings, head and norms only. The merge
    # steps' own edits and consistency checks are not training traffic.
    assert_ddp_steps(ddp_relora, range(RELORA_REWRAP + 1, 10), low["trainable"], accum=4)
    for rank in (0, 1):
        assert ddp_relora.probes[rank]["checks"] == RELORA_MERGES  # ranks compared after each merge


def test_ddp_full_sends_every_parameter_byte(ddp_full):
    b = param_bytes(ddp_full, 0)
    assert b["trainable"] == b["base"] == b["total"]
    assert_ddp_steps(ddp_full, [1, 2, 3], b["base"], accum=1)


def test_lrpt_comm_json_matches_parameter_bytes(ddp_relora, ddp_full, tmp_path):
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "comm", str(ddp_relora.dir), str(ddp_full.dir),
                          "--full", str(ddp_full.dir), "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    relora, full = json.loads(out.stdout)
    t, p = param_bytes(ddp_relora, RELORA_REWRAP)["trainable"], param_bytes(ddp_full, 0)["base"]
    assert relora["strategy"] == "relora" and full["strategy"] == "full"
    assert relora["engine"] == full["engine"] == "ddp" and relora["world_size"] == full["world_size"] == 2
    # Measured over the records after the warm start's rewrap; analytic from the config alone.
    assert relora["measured_bytes_per_step"] == relora["analytic_bytes_per_step"] == t
    assert full["measured_bytes_per_step"] == full["analytic_bytes_per_step"] == p
    assert relora["full_rank_bytes_per_step"] == full["full_rank_bytes_per_step"] == p
    assert relora["saving_basis"] == "measured full-rank run"
    assert abs(relora["saving_vs_full"] - (1 - t / p)) < 1e-9 and abs(full["saving_vs_full"]) < 1e-12
    assert relora["trainable_params"] * 4 == t and full["trainable_params"] * 4 == full["total_params"] * 4 == p


def test_ddp_switchlora_sends_the_trainable_bytes_once_per_step(ddp_switch):
    b = param_bytes(ddp_switch, 0)
    assert_ddp_steps(ddp_switch, range(1, 9), b["trainable"], accum=2)
    switches = [s for s, e in ddp_switch.events() if e == "switch"]
    assert switches == list(range(1, 9))  # vectors switched after every step
    for rank in (0, 1):
        assert ddp_switch.probes[rank]["checks"] == SWITCH_CHECKS


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO: same training as DDP through every edit, bytes per the algorithm

def assert_same_training(zero: Run, ddp: Run, rel: float = 1e-4):
    """Losses of every step (several after merges / switches), events and the final weights
    and optimizer state agree with DDP: an edit lost to DeepSpeed's fp32 masters (they would
    overwrite it at the next step) would make them diverge."""
    import torch

    assert zero.events() == ddp.events()
    z, d = zero.losses(), ddp.losses()
    assert len(z) == len(d) and z == pytest.approx(d, rel=rel), (z, d)
    last = max(ddp.steps())
    zm, dm = zero.checkpoint(last), ddp.checkpoint(last)
    assert zm.keys() == dm.keys()
    for name in dm:
        torch.testing.assert_close(zm[name], dm[name], rtol=1e-4, atol=1e-6, msg=name)
    zo, do = zero.checkpoint(last, "optimizer"), ddp.checkpoint(last, "optimizer")
    assert {k for k in zo if k != "__groups__"} == {k for k in do if k != "__groups__"}
    for name, state in do.items():
        if name == "__groups__":
            continue
        assert set(zo[name]) == set(state), name
        # Step counters exactly (per group under DeepSpeed, per element for VectorAdamW).
        assert torch.equal(zo[name]["step"].float(), state["step"].float()), name
    return zo, do


def test_zero2_relora_matches_ddp_through_rewrap_and_merges(zero2_relora, ddp_relora):
    zo, _ = assert_same_training(zero2_relora, ddp_relora)
    # Adapters have their own flat groups: their Adam step counts from the rewrap, while the
    # embeddings' carries on (one shared count per DeepSpeed group would give them 9).
    assert float(zo["embed_tokens.weight"]["step"]) == 9
    assert float(zo["layers.0.self_attn.q_proj.lora_A"]["step"]) == 9 - RELORA_REWRAP
    for rank in (0, 1):
        assert zero2_relora.probes[rank]["checks"] == RELORA_MERGES


def test_zero2_relora_merges_reach_the_fp32_masters(zero2_relora):
    """Checkpoints hold DeepSpeed's fp32 masters. At a merge k: A is the seeded fresh draw
    and B zero; after step k+1 (LR 0 at the restart) they are still exactly that, so no
    stale master overwrote them; W moved by a rank <= r update at k only; the adapters'
    Adam moments were pruned (90%, both moments of an element together)."""
    import torch

    from trainer.seeding import Purpose, seeded_generator
    from trainer.strategies.lora import kaiming_uniform

    info = param_bytes(zero2_relora, RELORA_REWRAP)
    names = [n for n, _ in info["strategy"].adapters]
    rank = info["strategy"].cfg.rank
    assert [zero2_relora.steps()[s]["lr"] for s in (6, 9)] == [0.0, 0.0]
    for k in RELORA_MERGES:
        before, at, after = (zero2_relora.checkpoint(s) for s in (k - 1, k, k + 1))
        opt = zero2_relora.checkpoint(k, "optimizer")
        for index, name in enumerate(names):
            A, B, W = (f"{name}.lora_A", f"{name}.lora_B", f"{name}.weight")
            fresh = kaiming_uniform(at[A].shape, seeded_generator(info["seed"], k, index, Purpose.A_INIT))
            assert torch.equal(at[A], fresh) and not at[B].any(), (k, name)
            assert torch.equal(after[A], at[A]) and torch.equal(after[B], at[B]), (k, name)
            assert torch.equal(after[W], at[W]) and torch.equal(zero2_relora.checkpoint(k - 2)[W], before[W])
            delta = at[W] - before[W]
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta).item() <= rank, (k, name)
            for p in (A, B):
                m, v = opt[p]["exp_avg"], opt[p]["exp_avg_sq"]
                pruned = round(0.9 * m.numel())  # strategy.reset_ratio (default 0.9), by magnitude
                assert (m == 0).sum() >= pruned and torch.equal(m == 0, v == 0), (k, p)


def test_zero2_bytes_follow_the_algorithm(zero2_relora):
    warm, low = param_bytes(zero2_relora, 0), param_bytes(zero2_relora, RELORA_REWRAP)
    assert low["groups"] == warm["groups"] + 1  # the adapters' own group
    assert_zero_steps(zero2_relora, range(1, RELORA_REWRAP + 1), warm["base"], warm["groups"], "zero2", 4)
    assert_zero_steps(zero2_relora, range(RELORA_REWRAP + 1, 10), low["trainable"], low["groups"], "zero2", 4)


def test_zero1_switchlora_matches_ddp_through_switches_and_freezes(zero1_switch, ddp_switch):
    import torch

    zo, _ = assert_same_training(zero1_switch, ddp_switch)
    # Per-element step counters carried the freezes and restarts into the flat partitions:
    # some elements frozen by the last switch (-freeze_steps), some restarted, most at 8.
    steps = torch.cat([zo[n]["step"].flatten() for n in zo if n.endswith(("lora_A", "lora_B"))])
    assert (steps == -2).any() and ((steps > 0) & (steps < 8)).any() and (steps == 8).any()
    zs, ds = (r.checkpoint(8, "trainer")["strategy"] for r in (zero1_switch, ddp_switch))
    assert zs["switches"] == ds["switches"] > 8 * 28
    for (za, zb), (da, db) in zip(zs["pools"], ds["pools"]):
        for z, d in ((za, da), (zb, db)):
            assert z["slots"] == d["slots"] and z["free"] == d["free"] and z["frozen_until"] == d["frozen_until"]
    for rank in (0, 1):
        assert zero1_switch.probes[rank]["checks"] == SWITCH_CHECKS


def test_zero1_bytes_follow_the_algorithm(zero1_switch):
    b = param_bytes(zero1_switch, 0)
    # grad_accum 2: ZeRO-1 still reduces once per step (2T in all), ZeRO-2 would send 3T.
    assert_zero_steps(zero1_switch, range(1, 9), b["trainable"], b["groups"], "zero1", 2)



# ---------------------------------------------------------------------------------------------
# The communication matrix: engine x strategy x data. The five runs above (embedded corpus)
# and four more cover every engine x strategy cell once; these four train on a prepared
# corpus with another vocabulary or start from a Hugging Face checkpoint whose vocabulary
# is not the tokenizer's, so the analytic side must come from the shape the run built.
#
#    engine  full               relora              switchlora
#    DDP     ddp-full (emb)     ddp-relora (emb)    ddp-switchlora (emb)
#    ZeRO-1  zero1-full (prep)  zero1-relora (hf)   zero1-switchlora (emb)
#    ZeRO-2  zero2-full (hf)    zero2-relora (emb)  zero2-switchlora (prep)

RELORA_SHORT = ["strategy.name=relora", "strategy.rank=4", "strategy.reset_every=2", "strategy.restart_warmup=1",
                "strategy.warm_start_steps=0", "train.max_steps=4", "train.grad_accum=2", "optimizer.lr=2e-3"]
SWITCH_SHORT = SWITCH[:5] + ["train.max_steps=4", "train.grad_accum=2", "optimizer.lr=3e-3",
                             "distributed.guard_every=2"]
EVAL = ["logging.eval_batches=3"]  # rank 0 evaluates 2 batches, rank 1 one: token-weighted sums


@pytest.fixture(scope="module")
def prepared_corpus(tmp_path_factory):
    """A corpus of made-up words: its BPE vocabulary is neither the embedded corpus's nor 1024."""
    import random

    from trainer.data import prepare

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["".join(rng.choice("aeioubdgklmnprstvz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(1500))
    (root / "made-up.txt").write_text(text)
    return prepare([str(root / "made-up.txt")], root / "prepared", vocab_size=420, val_fraction=0.1, progress=False)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A small Llama in Hugging Face format with 320 tokens (the embedded tokenizer has 300)."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zero1_full(tmp_path_factory, lrpt_cache, prepared_corpus):
    return launch(tmp_path_factory.mktemp("dist"), "zero1-full", "zero1",
                  FULL + EVAL + [f"data.source={prepared_corpus}"], lrpt_cache)


@pytest.fixture(scope="module")
def zero2_full(tmp_path_factory, lrpt_cache, hf_checkpoint):
    return launch(tmp_path_factory.mktemp("dist"), "zero2-full", "zero2",
                  FULL + EVAL + ["train.grad_accum=2", f"model.init_from={hf_checkpoint}"], lrpt_cache)


@pytest.fixture(scope="module")
def zero1_relora(tmp_path_factory, lrpt_cache, hf_checkpoint):
    return launch(tmp_path_factory.mktemp("dist"), "zero1-relora", "zero1",
                  RELORA_SHORT + EVAL + [f"model.init_from={hf_checkpoint}"], lrpt_cache)


@pytest.fixture(scope="module")
def zero2_switch(tmp_path_factory, lrpt_cache, prepared_corpus):
    return launch(tmp_path_factory.mktemp("dist"), "zero2-switchlora", "zero2",
                  SWITCH_SHORT + EVAL + [f"data.source={prepared_corpus}"], lrpt_cache)


def assert_counted_by_purpose(run: Run):
    """The probe (torch.distributed and DDP's hook, attributed by where the loop is) and the
    run's own meter agree on every pop, in every purpose, on both ranks; rank 0's records
    carry exactly what its meter popped; start-up appears in the first record only (and
    after a re-wrap)."""
    for rank in (0, 1):
        pops = run.probes[rank]["pops"]
        assert pops, rank
        for i, pop in enumerate(pops):
            for purpose in PURPOSES:
                probe, meter = pop["probe"][purpose], pop["meter"][purpose]
                assert probe["bytes"] == meter["bytes"], (run.dir.name, rank, i, purpose, probe, meter)
                assert probe["wire_bytes"] == pytest.approx(meter["wire_bytes"], rel=1e-9, abs=1e-9)
    recs = [r for r in run.records() if "comm_bytes" in r]
    pops = run.probes[0]["pops"]
    assert len(recs) == len(pops)
    rewraps = {r["step"] for r in run.records() if r.get("event") == "rewrap"}
    for i, (rec, pop) in enumerate(zip(recs, pops)):
        m = pop["meter"]
        assert rec["comm_bytes"] == m["sync"]["bytes"]
        for purpose in ("sync", "edit", "control"):
            assert rec[f"comm/{purpose}_bytes"] == m[purpose]["bytes"]
            assert rec[f"comm/{purpose}_wire_bytes"] == pytest.approx(m[purpose]["wire_bytes"])
        assert rec["comm/control_bytes"] >= 24  # the loss / stop-flag all-reduce, every step
        startup = i == 0 or rec["step"] - 1 in rewraps
        assert ("comm/startup_bytes" in rec) == startup, (i, rec)
        assert "guard_time_s" in rec


def assert_edit_bytes(run: Run, engine: str, strategy: str):
    """Switches move nothing under any engine; ReLoRA's merges move only the counts of the
    magnitude-pruning bisection under ZeRO (31 all-reduces of 8 bytes per adapter tensor at
    most), and nothing under DDP."""
    recs = [r for r in run.records() if "comm_bytes" in r]
    n_tensors = 2 * len(param_bytes(run, 10**6)["strategy"].adapters) if strategy != "full" else 0
    for r in recs:
        merged = r.get("event") == "merge"
        if engine != "ddp" and strategy == "relora" and merged:
            assert 0 < r["comm/edit_bytes"] <= 31 * 8 * n_tensors, r
        else:
            assert r["comm/edit_bytes"] == 0, r


def test_communication_matrix(ddp_full, ddp_relora, ddp_switch, zero1_full, zero1_relora, zero1_switch,
                              zero2_full, zero2_relora, zero2_switch, tmp_path):
    """Every engine x strategy cell, every data variant: measured payload and wire bytes per
    step are the analytic figures (0.5%: ZeRO adds a 4-byte clipping norm per flat group);
    the independent probe agrees with the run's figures in every purpose; without --full the
    saving is 1 - trainable / full-rank bytes of the model the run built (its model.json)."""
    cells = {("ddp", "full"): ddp_full, ("ddp", "relora"): ddp_relora, ("ddp", "switchlora"): ddp_switch,
             ("zero1", "full"): zero1_full, ("zero1", "relora"): zero1_relora, ("zero1", "switchlora"): zero1_switch,
             ("zero2", "full"): zero2_full, ("zero2", "relora"): zero2_relora, ("zero2", "switchlora"): zero2_switch}
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "comm", *(str(r.dir) for r in cells.values()),
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(zip(cells, json.loads(out.stdout)))
    vocabs = set()
    for (engine, strategy), run in cells.items():
        row = rows[engine, strategy]
        assert (row["engine"], row["strategy"], row["world_size"]) == (engine, strategy, 2)
        for kind in ("", "wire_"):
            measured, analytic = row[f"measured_{kind}bytes_per_step"], row[f"analytic_{kind}bytes_per_step"]
            assert measured == pytest.approx(analytic, rel=5e-3), (engine, strategy, kind, measured, analytic)
        b = param_bytes(run, 10**6)  # after any warm start, from the run's model.json
        assert row["trainable_bytes"] == b["trainable"] and row["full_rank_bytes"] == b["base"]
        assert row["trainable_params"] * 4 == row["trainable_bytes"]  # the records' count, the same model
        assert abs(row["saving_vs_full"] - (1 - b["trainable"] / b["base"])) < 1e-9, (engine, strategy, row)
        assert set(row["measured_by_purpose_per_step"]) == {"sync", "edit", "control"}
        assert row["measured_startup_bytes"] > 0
        assert_counted_by_purpose(run)
        assert_edit_bytes(run, engine, strategy)
        vocabs.add(json.loads((run.dir / "model.json").read_text())["vocab_size"])
    assert len(vocabs) == 3, vocabs  # embedded (300), prepared, the HF checkpoint's (320)
    table = subprocess.run([sys.executable, "-m", "launcher.cli", "comm", *(str(r.dir) for r in cells.values())],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(table.stdout)
    assert "sync wire" in table.stdout and "edit/step" in table.stdout


def test_plan_matches_recorded_memory(ddp_full, ddp_relora, ddp_switch, zero1_full, zero1_relora, zero1_switch,
                                      zero2_full, zero2_relora, zero2_switch, capsys):
    """`lrpt plan RUN` (the model the run built, on 2 CPU processes) predicts to the byte what
    each run measured from its live tensors: weights, fused-buffer copies, ZeRO's fp32
    partitions, the gradients the optimizer steps on and its state. For ReLoRA's warm start
    twice: the first record (full rank) and the first after the rewrap (adapters)."""
    from launcher.cli import main
    from trainer.memory import MEASURED

    for run in (ddp_full, ddp_relora, ddp_switch, zero1_full, zero1_relora, zero1_switch, zero2_full,
                zero2_relora, zero2_switch):
        capsys.readouterr()
        assert main(["plan", str(run.dir), "train.device=cpu", "--gpus-per-node", "2", "--gpu-memory", "8GiB",
                     "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        phases = {p["from_step"]: p["bytes"] for p in plan["phases"]}
        starts = [0] + [step for step, event in run.events() if event == "rewrap"]
        measured = [r for r in run.records() if "mem/gradients_bytes" in r]
        assert sorted(phases) == starts and len(measured) == len(starts), (run.dir.name, starts)
        for rec, start in zip(measured, starts):
            got = {k: rec[f"mem/{k}_bytes"] for k in MEASURED}
            assert got == {k: phases[start][k] for k in MEASURED}, (run.dir.name, start)
        if plan["engine"] != "ddp":  # ZeRO: fp32 partitions of every trainable group, half each
            assert 0 < measured[-1]["mem/master_weights_bytes"] < measured[-1]["mem/trainable_weights_bytes"]


@pytest.mark.parametrize("which", ["zero1_full", "zero2_full"])
def test_validation_loss_is_the_same_at_any_world_size_and_in_lrpt_eval(which, request):
    """The final record's validation loss (2 ranks, each its share of the fixed sequences) is
    what `lrpt eval` computes in one process on the same weights (the final checkpoint)."""
    run = request.getfixturevalue(which)
    last = run.steps()[max(run.steps())]
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(run.dir), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["step"] == last["step"]
    assert abs(result["val_loss"] - last["val_loss"]) < 1e-6, (result["val_loss"], last["val_loss"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainer.errors import exit_process
    exit_process(_probe_main(sys.argv[1:]))
