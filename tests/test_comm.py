"""Communication accounting without launching jobs: the ring model, the analytic bytes per
engine, the DDP hook on a one-process gloo group, the meter (trainer/comm.py), and the
`lrpt comm` report (reports/comm.py)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from reports import comm as report
from trainer import comm
from trainer.config import load_config, save_config


def test_wire_bytes_ring_model():
    assert comm.wire_bytes(1000, 4, "all_reduce") == 1500  # 2 (n-1)/n
    assert comm.wire_bytes(1000, 4, "reduce_scatter_tensor") == 750  # (n-1)/n
    assert comm.wire_bytes(1000, 4, "all_gather_into_tensor") == 750
    assert comm.wire_bytes(1000, 1, "all_reduce") == 0


def test_analytic_bytes_per_engine():
    t, p = 1000, 5000
    assert report.analytic_bytes_per_step(t, 8, "ddp") == t
    assert report.analytic_bytes_per_step(t, 8, "zero1", grad_accum=4) == 2 * t
    assert report.analytic_bytes_per_step(t, 8, "zero2", grad_accum=4) == 5 * t  # reduced every micro-batch
    assert report.analytic_bytes_per_step(t, 8, "zero3", grad_accum=1, total_bytes=p) == t + 2 * p
    assert report.analytic_bytes_per_step(t, 1, "ddp") == 0
    # ZeRO-1 moves twice DDP's payload but the same wire bytes (reduce-scatter + all-gather).
    assert report.analytic_wire_bytes_per_step(t, 8, "zero1") == report.analytic_wire_bytes_per_step(t, 8, "ddp")
    with pytest.raises(ValueError):
        report.analytic_bytes_per_step(t, 8, "fsdp")


def test_llama_130m_relora_r128_analytic_without_a_run():
    cfg = load_config(None, ["model.name=llama-130m", "strategy.name=relora", "strategy.rank=128"])
    a = report.analytic_from_config(cfg, world_size=8)
    assert a["base_bytes"] == 4 * 134_105_856  # the full-rank model, counted on the meta device
    assert a["full_rank_bytes_per_step"] == a["base_bytes"]
    assert a["trainable_params"] / 134_105_856 == pytest.approx(0.53, abs=0.01)  # REFERENCE.md: 53%
    assert 1 - a["analytic_bytes_per_step"] / a["full_rank_bytes_per_step"] == pytest.approx(0.466, abs=0.002)


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_hook_counts_exactly_the_trainable_bytes(one_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0].weight.requires_grad_(False)  # frozen, as a low-rank strategy's W
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    comm.instrument_torch()  # the hook's own dist.all_reduce must not be counted twice
    with comm.phase("startup"), comm.count_ddp_broadcasts():
        ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, comm.ddp_comm_hook)
    meter = comm.CommMeter()
    assert meter.pop()["startup"]["bytes"] >= sum(p.numel() * 4 for p in model.parameters())
    x = torch.randn(4, 16)
    with ddp.no_sync():  # an accumulation micro-batch: nothing crosses the network
        ddp(x).sum().backward()
    assert meter.pop()["sync"]["bytes"] == 0
    ddp(x).sum().backward()
    sync = meter.pop()["sync"]
    assert sync["bytes"] == trainable and sync["calls"] >= 1 and sync["seconds"] >= 0
    ddp(x).sum().backward()
    popped = meter.pop()
    assert popped["sync"]["bytes"] == trainable
    assert popped["control"]["bytes"] == popped["edit"]["bytes"] == 0


def test_plain_collectives_are_counted_by_purpose(one_process_group):
    """The loop's own torch.distributed calls (object gathers and broadcasts included, as
    the tensor collectives they issue) land in the current purpose, `control` by default."""
    comm.instrument_torch()
    meter = comm.CommMeter()
    meter.pop()
    dist.all_reduce(torch.zeros(3, dtype=torch.float64))
    out = [None]
    dist.all_gather_object(out, {"rng": 1})
    box = ["run-dir"]
    dist.broadcast_object_list(box, src=0)
    with comm.phase("edit"):
        dist.all_reduce(torch.zeros(1, dtype=torch.int64))
    popped = meter.pop()
    control = comm.CommMeter.by_op("control")
    assert control["all_reduce"]["bytes"] >= 24 and control["all_gather"]["calls"] >= 2
    assert control["broadcast"]["calls"] >= 2 and popped["control"]["bytes"] > 24 + 16
    assert popped["edit"]["bytes"] == 8 and popped["sync"]["bytes"] == 0
    assert comm.record_fields(popped)["comm/edit_bytes"] == 8
    assert "comm/startup_bytes" not in comm.record_fields(popped)


def test_kth_smallest_of_a_partitioned_tensor_is_torch_kthvalue(one_process_group):
    from trainer.engine import Part

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(40, 8, generator=g) * torch.logspace(-8, 2, 8)).abs()
    t[3, 3] = 0.0
    for k in (1, 7, 100, 320):
        whole = Part(t.shape, 0, t.numel()).kth_smallest(t, k)
        split = Part(t.shape, 0, t.numel(), partitioned=True).kth_smallest(t.flatten(), k)
        assert whole.item() == split.item() == t.flatten().kthvalue(k).values.item()


def test_meter_pop_is_per_process():
    m1 = comm.CommMeter()
    m1.pop()
    comm.LEDGER.add("sync", "all_reduce", 100, seconds=0.5, ranks=(0, 1))
    comm.LEDGER.add("edit", "all_reduce", 7, ranks=(0, 1))
    m2 = comm.CommMeter()  # e.g. built after a re-wrap: continues where m1 stopped
    popped = m2.pop()
    assert popped["sync"] == dict(bytes=100, wire_bytes=100.0, seconds=0.5, calls=1, inter_node_bytes=0.0,
                                  intra_node_bytes=100.0)  # one node
    assert popped["edit"]["bytes"] == 7 and popped["edit"]["wire_bytes"] == 7.0
    assert all(row["bytes"] == 0 for row in m1.pop().values())


def test_wire_bytes_split_by_link_under_the_ring_model(monkeypatch):
    """2 nodes x 2 ranks, seen from rank 1 (node 0): in a ring over a group each rank sends to
    the next in group order, so the world ring sends rank 1's share across (its successor,
    rank 2, is on node 1), its intra-node group nothing, its inter-node group everything; and
    the wire bytes are the group's ring, not the world's."""
    from trainer import topology

    top = topology.Topology(rank=1, world=4, procs_per_node=2)
    assert (top.nodes, top.node, top.local_rank) == (2, 0, 1)
    assert top.crosses((0, 1, 2, 3)) and top.crosses((1, 3)) and not top.crosses((0, 1))
    assert not topology.Topology(rank=0, world=4, procs_per_node=2).crosses((0, 1, 2, 3))  # 0 sends to 1
    monkeypatch.setattr(topology, "_CURRENT", top)
    before = {c: comm.LEDGER.links(c) for c in ("sync", "edit", "control")}
    comm.LEDGER.add("sync", "all_reduce", 1000, ranks=(0, 1, 2, 3))  # wire 1500, across
    comm.LEDGER.add("edit", "all_reduce", 1000, ranks=(0, 1))  # wire 1000, inside
    comm.LEDGER.add("control", "all_gather", 1000, ranks=(1, 3))  # wire 500, across
    after = {c: comm.LEDGER.links(c) for c in before}
    delta = {c: tuple(a - b for a, b in zip(after[c], before[c])) for c in before}
    assert delta == {"sync": (1500.0, 0.0), "edit": (0.0, 1000.0), "control": (500.0, 0.0)}


def test_topology_from_the_launcher_or_the_override():
    from trainer import topology
    from trainer.errors import DistributedError

    assert topology.procs_per_node(0, 8, env={"LOCAL_WORLD_SIZE": "4"}) == 4
    assert topology.procs_per_node(2, 8, env={"LOCAL_WORLD_SIZE": "4"}) == 2  # simulated nodes
    assert topology.procs_per_node(0, 3, env={}) == 3  # no launcher: one node
    with pytest.raises(DistributedError, match="distributed.procs_per_node=3 does not divide the world size 8"):
        topology.procs_per_node(3, 8, env={})
    line = topology.Topology(rank=0, world=4, procs_per_node=2).describe()
    assert line == ("world size 4: 2 nodes x 2 processes; intra-node groups [0,1] [2,3], "
                    "inter-node groups [0,2] [1,3]")


def test_count_as_attributes_a_group_whatever_the_phase(one_process_group):
    """A dedicated group's collectives are one purpose (a background checkpoint writer's
    gloo group: control), whatever phase the loop is in."""
    comm.instrument_torch()
    group = dist.new_group([0])
    comm.count_as(group, "control")
    meter = comm.CommMeter()
    meter.pop()
    with comm.phase("sync"):
        dist.all_reduce(torch.ones(4), group=group)
        dist.all_reduce(torch.ones(2))
    popped = meter.pop()
    assert popped["control"]["bytes"] == 16 and popped["sync"]["bytes"] == 8


def test_lrpt_comm_models_the_shape_the_run_built(tmp_path):
    """A named size on a corpus with another vocabulary: the analytic side comes from the
    run's model.json, and without --full the saving is 1 - trainable / full-rank bytes of
    that model exactly."""
    from dataclasses import asdict

    from trainer.model import Transformer, model_args
    from trainer.strategies import build_strategy

    over = ["model.name=pico-tiny", "strategy.name=relora", "strategy.rank=16"]
    run = _fake_run(tmp_path, "relora", over, _records(1000, 0.0, 0.1))
    cfg = load_config(None, over)
    args = model_args(cfg.model, cfg.data.seq_len, vocab_size=929)
    (run / "model.json").write_text(json.dumps(asdict(args)))
    model = Transformer(args)
    full = sum(p.numel() * 4 for p in model.parameters())
    build_strategy(cfg.strategy, 0).apply(model, 0.0, cfg.strategy.warm_start_steps)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    (row,) = report.comm_report([run])
    assert row["trainable_bytes"] == trainable and row["full_rank_bytes"] == full
    assert row["analytic_bytes_per_step"] == trainable and row["full_rank_bytes_per_step"] == full
    assert abs(row["saving_vs_full"] - (1 - trainable / full)) < 1e-9
    assert row["world_size"] == 4 and row["analytic_wire_bytes_per_step"] == 1.5 * trainable  # 2 (n-1)/n T


def _fake_run(root, name, overrides, records):
    run = root / name
    run.mkdir()
    save_config(load_config(None, overrides), run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _records(bytes_per_step, comm_s, step_s, steps=(10, 20, 30), extra=()):
    out = [{"step": 0, "tokens": 0, "val_loss": 5.0, "world_size": 4}]
    for s in steps:
        out.append({"step": s, "tokens": s * 100, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 100 / step_s,
                    "comm_bytes": bytes_per_step * 10, "comm_bytes_total": bytes_per_step * s,
                    "comm_time_s": comm_s * 10, "trainable_params": 1, "total_params": 2, "world_size": 4,
                    "elapsed_s": step_s * s})
    return out + list(extra)


def test_comm_report_measured_against_a_full_rank_run(tmp_path):
    full = _fake_run(tmp_path, "full", ["strategy.name=full"], _records(4000, 0.01, 0.1))
    lora = _fake_run(tmp_path, "lora", ["strategy.name=lora", "strategy.rank=4"], _records(1000, 0.004, 0.08))
    rows = report.comm_report([full, lora], full_rank_run=full, world_size=64, bandwidths_gbit=(25, 100))
    by = {r["strategy"]: r for r in rows}
    for key in ("run", "strategy", "world_size", "measured_bytes_per_step", "analytic_bytes_per_step",
                "full_rank_bytes_per_step", "saving_vs_full"):
        assert key in by["lora"]
    assert by["lora"]["measured_bytes_per_step"] == 1000
    assert by["lora"]["full_rank_bytes_per_step"] == 4000
    assert by["lora"]["saving_vs_full"] == pytest.approx(0.75)
    assert by["lora"]["saving_basis"] == "measured full-rank run"
    assert by["lora"]["comm_share_of_step"] == pytest.approx(0.05)
    assert set(by["lora"]["projected_comm_s"]) == {"n4", "n64"}
    assert by["lora"]["projected_comm_s"]["n64"]["100gbit"] * 4 == pytest.approx(
        by["lora"]["projected_comm_s"]["n64"]["25gbit"])
    table = report.format_table(rows)
    assert "lora" in table and "75.0%" in table
    report.plot_comm(rows, tmp_path / "comm.png")
    assert (tmp_path / "comm.png").stat().st_size > 1000
    json.dumps(rows)  # the --json output


def test_comm_report_uses_the_steady_state_after_a_rewrap(tmp_path):
    recs = _records(4000, 0.01, 0.1, steps=(10, 20))
    recs.append({"step": 20, "tokens": 2000, "event": "rewrap", "trainable_params": 1})
    for s in (30, 40):
        recs.append({"step": s, "comm_bytes": 10_000, "comm_bytes_total": 80_000 + 1000 * (s - 20),
                     "comm_time_s": 0.0, "world_size": 4, "elapsed_s": s})
    run = _fake_run(tmp_path, "relora", ["strategy.name=relora"], recs)
    (row,) = report.comm_report([run])
    assert row["measured_bytes_per_step"] == 1000
    assert row["saving_basis"] == "analytic full-rank"


def test_comm_report_from_a_config_alone(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: llama-130m}\nstrategy: {name: relora, rank: 128}\n")
    (row,) = report.comm_report([cfg], world_size=8)
    assert row["measured_bytes_per_step"] is None
    assert row["saving_vs_full"] == pytest.approx(0.466, abs=0.002)
    assert os.fspath(cfg) == row["run"]



@pytest.mark.parametrize("distributed, ratio", [
    ("{comm_hook: bf16}", 0.5),
    ("{sync: diloco, diloco_inner_steps: 50}", 1 / 50),
    ("{sync: diloco, diloco_inner_steps: 10, outer_dtype: bf16}", 1 / 20)])
def test_saving_is_against_plain_full_rank_ddp(tmp_path, distributed, ratio):
    """A hook or DiLoCo on full rank saves against what plain DDP sends (fp32 gradients every
    step), the baseline a user knows; not 0% against itself."""
    plain, cfg = tmp_path / "plain.yaml", tmp_path / "c.yaml"
    plain.write_text("model: {name: llama-60m}\n")
    cfg.write_text(f"model: {{name: llama-60m}}\ndistributed: {distributed}\n")
    (ddp,), (row,) = report.comm_report([plain], world_size=2), report.comm_report([cfg], world_size=2)
    assert row["full_rank_bytes_per_step"] == ddp["full_rank_bytes_per_step"] == ddp["analytic_bytes_per_step"]
    assert row["saving_vs_full"] == pytest.approx(1 - ratio, abs=1e-9)
