"""Nodes are the unit: DiLoCo with a worker per node, and bytes by link, on 2 simulated nodes x
2 processes (gloo, distributed.procs_per_node=2), through the real Accelerate, DDP and
DeepSpeed engines.

Two launches of 4 processes, each through this file's entry point (`python -m tests.test_nodes`),
which runs several jobs one after another in the same processes and records a digest of every
rank's weights after every step's sync:

  ddp launch
    outer  no loop: DiLoCo's outer step by value, a worker per process (4 workers) and per node
           (2 workers of 2, each rank its slice): against torch.optim.SGD(nesterov=True) over 3
           outer steps at lr 0.7 and momentum 0.9; at lr 1 and momentum 0 the mean of the
           workers' local weights; the outer momentum of edited elements reset by reanchor;
           the pseudo-gradient's bytes at outer_dtype=bf16, by link
    ddp    DiLoCo per node (H=2, 4 steps, grad_accum 2) for full, relora (a warm start ending at
           an outer sync, a merge at the next, LoRA dropout), switchlora; relora stopped between
           outer syncs and resumed; full every-step DDP over the world (the ring's boundary)
  zero launch
    zero1  full, relora, switchlora with ZeRO-1 inside each node
    zero2  the same with ZeRO-2, and relora stopped and resumed

Checks: ranks bitwise identical within a node after every step and across nodes after every
outer step (and different across nodes between them); every record's sync bytes, inter-node
and intra-node bytes equal the figures computed here from the parameter counts; `lrpt comm`
agrees; a resume between outer syncs reproduces the losses; the checkpoint between syncs
resumes at world size 1 with the DiLoCo state re-sliced exactly; every rank's RNG differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)  # a launch runs several trainings
H, STEPS, ACCUM, G = 2, 4, 2, 2

BASE = ["model.name=micro", "model.num_layers=2", "data.seq_len=32", "data.batch_size=4",
        "data.embedded_sentences=2000", "data.embedded_vocab=300", "schedule.warmup_steps=2", "logging.log_every=1",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.trackers=[]", "logging.progress=false",
        "distributed.timeout_s=90", f"distributed.procs_per_node={G}", f"train.grad_accum={ACCUM}",
        f"train.max_steps={STEPS}"]
NODES = ["distributed.sync=diloco", f"distributed.diloco_inner_steps={H}", "distributed.diloco_worker=node",
         f"distributed.guard_every={H}"]
STRATEGIES = {
    "full": ["strategy.name=full"],
    # The warm start ends at the first outer sync (rewrap before step 5), a merge at the second.
    "relora": ["strategy.name=relora", "strategy.rank=4", f"strategy.warm_start_steps={H}", f"strategy.reset_every={H}",
               "strategy.restart_warmup=1", "strategy.dropout=0.1", "checkpoint.every=1", "checkpoint.keep=10"],
    "switchlora": ["strategy.name=switchlora", "strategy.rank=4", "strategy.switch_interval0=2",
                   "strategy.switch_ratio=1"],
}


# ---------------------------------------------------------------------------------------------
# Inside each launched process

def _digest(module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _train_main(common: list[str], plan: list, out: dict) -> None:
    """Each [name, overrides] of the plan trained in turn ("outer": the outer-step checks);
    after every step's sync, a digest of this rank's weights."""
    from accelerate.state import AcceleratorState

    from trainer import sync
    from trainer.config import load_config
    from trainer.loop import Trainer

    current = []
    for cls in (sync.DiLoCo, sync.EveryStep):
        def probed(self, step, engine, _after=cls.after_step):
            synced = _after(self, step, engine)
            if current:
                out[current[-1]].append([step, _digest(engine.module)])
            return synced
        cls.after_step = probed
    for name, overrides in plan:
        if name == "outer":
            _outer_main(common, out.setdefault("outer", {}))
        else:
            current.append(name)
            out[name] = []
            cfg = load_config(None, [*common, *overrides])
            # The launcher's stage would contradict the next run's engine: this process stands for
            # one launch per run.
            if cfg.distributed.deepspeed.startswith("zero"):
                os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = cfg.distributed.deepspeed[-1:]
            # Not train(): its Accelerator.end_training destroys the process group the next run uses.
            Trainer(cfg).fit()
        # Accelerate's state (the DeepSpeed plugin) is one per process: the next run sets its own.
        AcceleratorState._reset_state()


def _outer_main(common: list[str], out: dict) -> None:
    """DiLoCo's outer step on a small module (53 trainable elements: slices split tensors and
    are unequal), through the real Accelerator, DDP over the node and the Engine adapter."""
    import torch

    from trainer import comm, topology
    from trainer.config import load_config
    from trainer.distributed import build_accelerator, prepare
    from trainer.engine import Engine
    from trainer.ranks import gather
    from trainer.sync import DiLoCo

    acc = build_accelerator(load_config(None, common))
    top = topology.current()
    meter = comm.CommMeter()

    def build(worker, lr, mu, dtype="fp32"):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1, bias=False))
        module.register_parameter("v", torch.nn.Parameter(torch.randn(4)))
        sync = DiLoCo(1, lr, mu, dtype, worker, top)
        model, opt = prepare(acc, module, torch.optim.SGD(module.parameters(), lr=0.0), group=sync.data_parallel)
        engine = Engine(acc, model, opt)
        sync.reanchor(engine)
        return sync, engine

    def inner(engine, worker, k):
        """Every rank of a worker moves the weights alike: local = anchor - d(worker, k)."""
        who = top.node if worker == "node" else top.rank
        for i, (_, p) in enumerate(engine.trainable()):
            engine.write_param(p, engine.read_param(p) - shift(who, k, i, p))

    def shift(who, k, i, p):
        return torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * who + 10 * k + i)) * 0.1

    def whole(sync, key):
        """The worker's whole flat `key` (anchor, momentum) from its ranks' slices."""
        flat = torch.zeros(sync.numel)
        for s in gather(sync.state_dict()):  # the other nodes' ranks hold the same slices
            flat[s["start"]:s["start"] + s[key].numel()] = s[key]
        return flat

    for worker in ("process", "node"):
        workers = top.nodes if worker == "node" else top.world
        res = out[worker] = {}
        # Nesterov against torch's SGD, 3 outer steps, then an edit and a 4th.
        sync, engine = build(worker, 0.7, 0.9)
        res["slice"] = [sync.start, sync.stop, sync.numel]
        named = engine.trainable()
        ref = [p.detach().double().clone().requires_grad_() for _, p in named]
        ref_opt = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
        for k in (1, 2, 3):
            inner(engine, worker, k)
            sync.after_step(k, engine)
            for i, r in enumerate(ref):
                r.grad = torch.stack([shift(w, k, i, r) for w in range(workers)]).double().mean(0)
            ref_opt.step()
        res["nesterov_err"] = max((p.detach().double() - r).abs().max().item() for (_, p), r in zip(named, ref))
        res["nesterov_scale"] = max(r.grad.abs().max().item() for r in ref)
        ref_mom = torch.cat([ref_opt.state[r]["momentum_buffer"].reshape(-1) for r in ref]).float()
        # An edit of two rows of the first weight: their outer momentum restarts at zero.
        i0 = [name for name, _ in named].index("0.weight")
        p0, at = named[i0][1], sum(p.numel() for _, p in named[:i0])
        edited = engine.read_param(p0)
        edited[2:4] += 1.0
        engine.write_param(p0, edited)
        sync.reanchor(engine)
        mask = torch.zeros(sync.numel, dtype=torch.bool)
        mask[at + 2 * p0.shape[1]:at + 4 * p0.shape[1]] = True
        momentum, anchor = whole(sync, "momentum"), whole(sync, "anchor")
        res["edited_momentum_max"] = momentum[mask].abs().max().item()
        res["kept_momentum_err"] = (momentum[~mask] - ref_mom[~mask]).abs().max().item()
        res["kept_momentum_scale"] = ref_mom[~mask].abs().max().item()
        res["edited_anchor_err"] = (anchor[mask] - edited[2:4].reshape(-1)).abs().max().item()
        with torch.no_grad():
            ref[i0][2:4] += 1.0
            ref_opt.state[ref[i0]]["momentum_buffer"][2:4] = 0.0
        inner(engine, worker, 4)
        sync.after_step(4, engine)
        for i, r in enumerate(ref):
            r.grad = torch.stack([shift(w, 4, i, r) for w in range(workers)]).double().mean(0)
        ref_opt.step()
        res["after_edit_err"] = max((p.detach().double() - r).abs().max().item() for (_, p), r in zip(named, ref))
        # lr 1, momentum 0: the weights become the mean of the workers' local weights.
        sync, engine = build(worker, 1.0, 0.0)
        named = engine.trainable()
        start = [engine.read_param(p) for _, p in named]
        inner(engine, worker, 5)
        sync.after_step(5, engine)
        res["mean_err"] = max((engine.read_param(p) - torch.stack([s - shift(w, 5, i, p) for w in range(workers)]).mean(0))
                              .abs().max().item() for i, ((_, p), s) in enumerate(zip(named, start)))
        # bf16 pseudo-gradients: the bytes by link of one outer step.
        sync, engine = build(worker, 0.7, 0.9, "bf16")
        inner(engine, worker, 6)
        meter.pop()
        sync.after_step(6, engine)
        popped = meter.pop()["sync"]
        res["bf16"] = {k: popped[k] for k in ("bytes", "wire_bytes", "inter_node_bytes", "intra_node_bytes")}


def _probe_main(argv: list[str]) -> int:
    out: dict = {}
    _train_main(argv, json.loads(os.environ["LRPT_NODES_PLAN"]), out)
    d = Path(os.environ["LRPT_PROBE_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# Launching

def launch(tmp: Path, deepspeed: str, plan: list, cache: Path, timeout: int = 900) -> list[dict]:
    from launcher.launch import child_env, compose, free_port

    probe_dir = tmp / "probe"
    argv, env = compose(None, BASE, nodes=1, gpus_per_node=2 * G, main_port=free_port(), deepspeed=deepspeed,
                        module="tests.test_nodes")
    env = child_env({**env, "OMP_NUM_THREADS": "1", "LRPT_CACHE": str(cache), "LRPT_PROBE_DIR": str(probe_dir),
                     "LRPT_NODES_PLAN": json.dumps(plan)})
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(f"{tmp.name}: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    return [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in range(2 * G)]


def plan(root: Path, engine: str, resume: bool = False, flat: bool = False) -> list:
    """Trainings under `engine` into root/engine/NAME, named engine/NAME in the probe."""
    ds = [f"distributed.deepspeed={'none' if engine == 'ddp' else engine}"]
    runs = {name: [*NODES, *over] for name, over in STRATEGIES.items()}
    if resume:
        runs["relora-stopped"] = [*runs["relora"], f"train.stop_at={H + 1}"]
        runs["relora-resumed"] = runs["relora"]
    if flat:
        runs["flat"] = ["strategy.name=full", "train.max_steps=2"]
    run_dir = {name: root / engine / ("relora-resumed" if name == "relora-stopped" else name) for name in runs}
    return [[f"{engine}/{name}", [*over, *ds, f"run.dir={run_dir[name]}"]] for name, over in runs.items()]


@pytest.fixture(scope="module")
def ddp_launch(tmp_path_factory, lrpt_cache):
    """The outer-step checks, then the DDP trainings: one launch."""
    root = tmp_path_factory.mktemp("ddp")
    return root, launch(root, "none", [["outer", None], *plan(root, "ddp", resume=True, flat=True)], lrpt_cache)


@pytest.fixture(scope="module")
def zero_launch(tmp_path_factory, lrpt_cache):
    root = tmp_path_factory.mktemp("zero")
    return root, launch(root, "zero1", [*plan(root, "zero1"), *plan(root, "zero2", resume=True)], lrpt_cache)


def _view(launched, engine):
    """(the engine's run directories' parent, per rank {run name: digests})."""
    root, probes = launched
    return root / engine, [{k.split("/", 1)[1]: v for k, v in p.items() if k.startswith(engine + "/")}
                           for p in probes]


@pytest.fixture(scope="module")
def outer(ddp_launch):
    return [p["outer"] for p in ddp_launch[1]]


@pytest.fixture(scope="module")
def ddp(ddp_launch):
    return _view(ddp_launch, "ddp")


@pytest.fixture(scope="module")
def zero1(zero_launch):
    return _view(zero_launch, "zero1")


@pytest.fixture(scope="module")
def zero2(zero_launch):
    return _view(zero_launch, "zero2")


def records(run: Path) -> list[dict]:
    from trainer.rundir import RunDir
    return [r for r in RunDir(run).read_metrics() if "loss" in r]


def losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(run)}


# ---------------------------------------------------------------------------------------------
# The outer step by value

@pytest.mark.parametrize("worker", ["process", "node"])
def test_outer_step_by_value(outer, worker):
    for rank, probe in enumerate(outer):
        r = probe[worker]
        start, stop, n = r["slice"]
        # A worker per node: each rank its half of the 53 elements; per process: everything.
        assert (start, stop) == ((0, 27) if rank % 2 == 0 else (27, 53)) if worker == "node" else (0, n), (rank, r)
        assert r["nesterov_err"] < 1e-5 and r["nesterov_scale"] > 0.05, r  # 3 steps at lr 0.7, momentum 0.9
        assert r["edited_momentum_max"] == 0.0 and r["edited_anchor_err"] == 0.0, r
        assert r["kept_momentum_err"] < 1e-5 < r["kept_momentum_scale"], r
        assert r["after_edit_err"] < 1e-5, r
        assert r["mean_err"] < 1e-6, r  # lr 1, momentum 0: the mean of the workers' weights


@pytest.mark.parametrize("worker", ["process", "node"])
def test_outer_step_bytes_at_bf16(outer, worker):
    """One outer step at outer_dtype=bf16: 2 bytes per element of the pseudo-gradient. A worker
    per process all-reduces all 53 over the world (one boundary edge per node); a worker per
    node all-reduces each rank's slice over its inter-node group (everything crosses) and
    all-gathers the node's fp32 slices inside it (padded to 27 each)."""
    n, s = 53, 27
    for rank, probe in enumerate(outer):
        got = probe[worker]["bf16"]
        if worker == "process":
            wire = 2 * n * 2 * 3 / 4  # 2(W-1)/W, W = 4
            want = dict(bytes=2 * n, wire_bytes=wire, inter_node_bytes=wire, intra_node_bytes=wire)
        else:
            mine = s if rank % 2 == 0 else n - s
            gather = G * s * 4  # the all-gather's output
            want = dict(bytes=2 * mine + gather, wire_bytes=2 * mine * 2 * 1 / 2 + gather / 2,
                        inter_node_bytes=2 * n * 2 * 1 / 2, intra_node_bytes=G * gather / 2)
        assert got == pytest.approx(want, abs=1e-9), (rank, worker, got, want)


# ---------------------------------------------------------------------------------------------
# Training runs: identical ranks, bytes by link

def assert_ranks(probes, name: str, run: Path, h: int | None) -> None:
    """Within a node bitwise identical after every step; across nodes after every outer step
    (every step without DiLoCo), and apart after each inner step that moved the weights (a
    restart's LR-0 step does not)."""
    per_rank = [dict((s, d) for s, d in p[name]) for p in probes]
    lrs = {r["step"]: r["lr"] for r in records(run)}
    assert sorted(per_rank[0]) == sorted(lrs), (name, sorted(per_rank[0]))
    for step, lr in lrs.items():
        d = [r[step] for r in per_rank]
        assert d[0] == d[1] and d[2] == d[3], (name, step, d)
        if h is None or step % h == 0:
            assert d[0] == d[2], (name, step, d)
        elif lr > 0:
            assert d[0] != d[2], (name, step, d)  # the nodes trained on different data


def optimizer_groups(run: Path, step: int) -> int:
    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer
    from trainer.strategies import build_strategy

    cfg = load_config(run / "config.yaml")
    model = Transformer(ModelArgs(**json.loads((run / "model.json").read_text())))
    return len(build_strategy(cfg.strategy, cfg.train.seed).apply(model, cfg.optimizer.weight_decay, step))


def expected_sync(run: Path, rec: dict, engine: str) -> dict:
    """Rank 0's sync payload and its node's inter- and intra-node wire bytes in step `rec`,
    from first principles: G = 2 ranks per node, m = 2 nodes, N trainable fp32 elements."""
    n, step = rec["trainable_params"], rec["step"]
    t = 4 * n
    if engine == "flat":  # DDP over the world's 4 ranks: one boundary edge per node
        wire = t * 2 * 3 / 4
        return dict(bytes=t, inter=wire, intra=(G - 1) * wire)
    if engine == "ddp":  # an all-reduce over the node
        payload, wire = t, t * 2 * (G - 1) / G
    else:  # ZeRO: gradients reduced to their owners (ZeRO-2: at every micro-batch), shards
        # all-gathered, the clipping norm all-reduced, one fp32 per flat optimizer group
        groups = optimizer_groups(run, step - 1)  # the engine was built after step - 1 steps
        reduces = ACCUM if engine == "zero2" else 1
        payload = reduces * t + t + 4 * groups
        wire = (reduces * t + t) * (G - 1) / G + 4 * groups * 2 * (G - 1) / G
    out = dict(bytes=payload, inter=0.0, intra=G * wire)
    if step % H == 0:  # each rank's slice over the nodes, then the node's slices gathered
        s = -(-n // G)
        out["bytes"] += 4 * s + G * s * 4
        out["inter"] += t * 2 * (2 - 1) / 2
        out["intra"] += G * (G * s * 4) * (G - 1) / G
    return out


def assert_bytes(run: Path, engine: str) -> None:
    for rec in records(run):
        want = expected_sync(run, rec, engine)
        got = dict(bytes=rec["comm/sync_bytes"], inter=rec["comm/sync_inter_node_bytes"],
                   intra=rec["comm/sync_intra_node_bytes"])
        assert got == pytest.approx(want, rel=1e-12), (run.name, rec["step"], got, want)
        assert rec["procs_per_node"] == G


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero2"])
def test_a_worker_per_node(engine, name, request):
    root, probes = request.getfixturevalue(engine)
    assert_ranks(probes, name, root / name, H)
    assert_bytes(root / name, engine)
    events = [(r["step"], r.get("event")) for r in records(root / name) if r.get("event")]
    if name == "relora":
        from trainer.rundir import RunDir
        assert [(r["step"], r["event"]) for r in RunDir(root / name).read_metrics() if r.get("event") == "rewrap"] \
            == [(H, "rewrap")]
        assert events == [(2 * H, "merge")]
    if name == "switchlora":
        assert {s for s, e in events} == {H, 2 * H} and {e for s, e in events} == {"switch"}


@pytest.mark.parametrize("name", ["relora", "switchlora"])
@pytest.mark.parametrize("engine", ["zero1", "zero2"])
def test_zero_inside_nodes_trains_as_ddp_does(engine, name, ddp, request):
    """ZeRO over each node's ranks takes the steps DDP over them takes, through outer steps, a
    merge with magnitude pruning (its threshold counted over the node's partitions, not the
    world's) and switches: losses, and node 0's final weights and optimizer state, agree."""
    import torch

    root, _ = request.getfixturevalue(engine)
    z, d = root / name, ddp[0] / name
    assert list(losses(z)) == list(losses(d)) and list(losses(z).values()) == pytest.approx(
        list(losses(d).values()), rel=1e-4)
    last = Path("checkpoints") / f"step_{STEPS:07d}"
    from trainer import checkpoint as ckpt

    (zm, zo), (dm, do) = ((s["model"], s["optimizer"]) for s in (ckpt.read(r / last) for r in (z, d)))
    for key in dm:
        torch.testing.assert_close(zm[key], dm[key], rtol=1e-4, atol=1e-6, msg=key)
    assert zo.keys() == do.keys()
    for key, state in do.items():
        for k, v in state.items():
            torch.testing.assert_close(zo[key][k].float(), v.float(), rtol=1e-4, atol=1e-6, msg=f"{key} {k}")


def test_flat_ddp_crosses_once_per_node(ddp):
    root, probes = ddp
    assert_ranks(probes, "flat", root / "flat", None)
    assert_bytes(root / "flat", "flat")


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_resume_between_outer_syncs_is_exact(engine, request):
    root, probes = request.getfixturevalue(engine)
    assert losses(root / "relora-resumed") == losses(root / "relora")
    assert [s for s, _ in probes[0]["relora-stopped"]] == list(range(1, H + 2))


def test_every_rank_draws_its_own_dropout(ddp):
    from trainer import checkpoint as ckpt
    root, _ = ddp
    own = ckpt.read(root / "relora" / "checkpoints" / f"step_{STEPS:07d}", parts=("own",))["own"]
    states = [bytes(o["rng"]["torch"].numpy()) for o in own]
    assert len(states) == 2 * G and len(set(states)) == 2 * G


def test_lrpt_comm_inter_node_bytes(ddp, zero2):
    """Per node per step: flat DDP measured = analytic exactly; DiLoCo per node: analytic = the
    trainable bytes x 2(m-1)/m / H, measured = what its outer steps in the window sent."""
    runs = [ddp[0] / "flat", ddp[0] / "relora", zero2[0] / "switchlora"]
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "comm", *map(str, runs), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    flat, relora, switch = json.loads(out.stdout)
    for row in (flat, relora, switch):
        assert (row["nodes"], row["procs_per_node"]) == (2, G)
    for kind in ("inter", "intra"):
        assert flat[f"measured_{kind}_node_bytes_per_step"] == flat[f"analytic_{kind}_node_bytes_per_step"] > 0
    assert flat["projected_comm_s"]["n4"]["100gbit"] == pytest.approx(
        flat["analytic_inter_node_bytes_per_step"] * 8 / 100e9)
    for row, run, outer_steps in ((relora, runs[1], 1), (switch, runs[2], 2)):
        n = records(run)[-1]["trainable_params"]
        assert row["analytic_inter_node_bytes_per_step"] == 4 * n / H, row["run"]
        # relora: measured after the warm start's rewrap (steps H+2..); switchlora: steps 2..
        assert row["measured_inter_node_bytes_per_step"] * row["measured_steps"] == outer_steps * 4 * n, row["run"]


def test_resume_on_another_world_size_reslices_the_diloco_state(ddp, tmp_path, lrpt_cache, monkeypatch):
    """The 2 x 2 checkpoint between outer syncs (step H + 1), resumed by one process: its anchor
    and outer momentum are the ones saved (node 0's ranks wrote a slice each); it trains on to the end."""
    import torch

    from trainer import checkpoint as ckpt
    from trainer.config import load_config
    from trainer.loop import Trainer

    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    run = tmp_path / "relora"
    shutil.copytree(ddp[0] / "relora", run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:07d}")
    (run / "checkpoints" / "latest").unlink()
    saved = ckpt.read(run / "checkpoints" / f"step_{H + 1:07d}", parts=("sync",))["sync"]
    trainer = Trainer(load_config(None, [*BASE, *NODES, *STRATEGIES["relora"], f"run.dir={run}",
                                         "distributed.procs_per_node=0"]))
    assert trainer.world == 1 and trainer.state.step == H + 1
    for key in ("anchor", "momentum"):
        assert torch.equal(getattr(trainer.sync, key), saved[key]), key
    assert trainer.sync.momentum.abs().max() > 0
    trainer.fit()
    assert max(losses(run)) < 10


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainer.errors import exit_process
    exit_process(_probe_main(sys.argv[1:]))
