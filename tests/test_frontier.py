"""`lrpt frontier` (reports/frontier.py) on synthetic run directories: the Pareto marking, the
equal-token rule, one-process runs placed by the analytic model (and `lrpt comm`'s table for
them), the projected seconds and the --json schema. No training: each run directory is a
config.yaml, a model.json and a hand-written metrics.jsonl."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from launcher.cli import main
from reports import comm as comm_report
from reports import frontier
from trainer.comm import model_bytes
from trainer.config import load_config, save_config
from trainer.errors import RunDirError
from trainer.shapes import model_args

VOCAB = 929  # the embedded corpus's, as a real micro run builds it
RELORA = ["strategy.name=relora", "strategy.reset_every=10", "strategy.restart_warmup=3"]


def fake_run(root, name, overrides, *, losses, bytes_per_step=0, world=2, tokens_per_step=100, step_s=0.1,
             sync_s=0.0, every=10):
    """A run directory whose validation losses are `losses` at steps every, 2 every, ... and
    which sent `bytes_per_step` sync payload per step (the ring wire is the same at n=2)."""
    run = root / name
    run.mkdir()
    cfg = load_config(None, ["model.name=micro", *overrides])
    save_config(cfg, run / "config.yaml")
    (run / "model.json").write_text(json.dumps(asdict(model_args(cfg.model, cfg.data.seq_len, VOCAB))))
    recs = [{"step": 0, "tokens": 0, "val_loss": 7.0, "world_size": world}]
    for i, loss in enumerate(losses, 1):
        s = i * every
        recs.append({"step": s, "tokens": s * tokens_per_step, "loss": loss + 0.1, "lr": 1e-3,
                     "tokens_per_s": tokens_per_step / step_s, "comm_bytes": bytes_per_step * every,
                     "comm_bytes_total": bytes_per_step * s, "comm/sync_bytes": bytes_per_step * every,
                     "comm/sync_wire_bytes": float(bytes_per_step * every), "comm_time_s": sync_s * every,
                     "trainable_params": 1, "total_params": 2, "world_size": world, "elapsed_s": step_s * s,
                     "val_loss": loss, "val_ppl": 2.718 ** loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_pareto_marks_the_runs_no_other_run_beats(tmp_path):
    # (bytes/step, final loss): a cheap bad run, two expensive good ones, dominated runs, a tie.
    runs = {"cheap": (100, 4.0), "mid": (1000, 3.5), "mid_twin": (1000, 3.5), "mid_worse": (1000, 3.6),
            "mid_costlier": (2000, 3.5), "best": (5000, 3.0), "worst": (6000, 4.1)}
    dirs = [fake_run(tmp_path, name, RELORA, losses=[5.0, loss], bytes_per_step=b)
            for name, (b, loss) in runs.items()]
    points = frontier.frontier(dirs)
    on = {p["run"].rsplit("/", 1)[1] for p in points if p["pareto"]}
    # Equal points are both on the frontier; the same bytes with a higher loss, or the same
    # loss for more bytes, is off it.
    assert on == {"cheap", "mid", "mid_twin", "best"}
    assert [p["bytes_per_step"] for p in points] == sorted(b for b, _ in runs.values())
    assert all(not p["analytic"] and p["world_size"] == 2 and p["tokens"] == 2000 for p in points)
    table = frontier.format_table(points)
    assert table.count("| yes |") == 4 and "1.000 KB" in table and "*" not in table


def test_runs_of_different_lengths_are_compared_at_their_largest_common_token_count(tmp_path):
    a = fake_run(tmp_path, "a", [], losses=[5.0, 4.0, 3.0], bytes_per_step=4000)  # 1000, 2000, 3000 tokens
    b = fake_run(tmp_path, "b", [], losses=[5.5, 4.5, 3.5, 2.5, 1.5], bytes_per_step=4000, every=5,
                 tokens_per_step=200)  # 1000, 2000, 3000, 4000, 5000 tokens
    c = fake_run(tmp_path, "c", [], losses=[5.2, 4.2], bytes_per_step=1000, every=20)  # 2000, 4000 tokens
    points = {p["run"].rsplit("/", 1)[1]: p for p in frontier.frontier([a, b, c])}
    assert {p["tokens"] for p in points.values()} == {2000}  # 3000 and 4000 are not in every run
    assert (points["a"]["val_loss"], points["b"]["val_loss"], points["c"]["val_loss"]) == (4.0, 4.5, 5.2)
    assert (points["a"]["steps"], points["b"]["steps"], points["c"]["steps"]) == (20, 10, 20)
    assert "Trained further, not shown beyond it: " in frontier.format_table(list(points.values()))


def test_runs_without_a_common_token_count_are_refused_in_one_line(tmp_path, capsys):
    a = fake_run(tmp_path, "a", [], losses=[5.0, 4.0], bytes_per_step=10)  # 1000, 2000 tokens
    b = fake_run(tmp_path, "b", [], losses=[4.5], bytes_per_step=10, every=15)  # 1500 tokens
    with pytest.raises(RunDirError, match="no token count at which every run has a validation loss"):
        frontier.frontier([a, b])
    assert main(["frontier", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no token count") and err.count("\n") == 1 and "a 2,000, b 1,500" in err


@pytest.mark.parametrize("overrides, warm_share", [
    ([*RELORA, "strategy.rank=16"], 0.0),
    # A warm start trains full rank for its steps: 10 of the 20 compared here.
    ([*RELORA, "strategy.rank=16", "strategy.warm_start_steps=10"], 0.5)])
def test_one_process_runs_are_placed_by_the_analytic_model(tmp_path, capsys, overrides, warm_share):
    run = fake_run(tmp_path, "solo", overrides, losses=[5.0, 4.0], world=1)
    cfg = load_config(run / "config.yaml")
    args = model_args(cfg.model, cfg.data.seq_len, VOCAB)
    low, full = model_bytes(cfg, args)["sync_bytes_per_step"], model_bytes(cfg, args)["full_sync_bytes_per_step"]
    assert low < full  # adapters instead of full matrices, after any warm start
    if warm_share:
        assert model_bytes(cfg, args, 0)["sync_bytes_per_step"] == full
    for n in (2, 8):
        (p,) = frontier.frontier([run], world_size=n)
        assert p["analytic"] and p["world_size"] == n
        assert p["bytes_per_step"] == pytest.approx(warm_share * full + (1 - warm_share) * low)
        assert p["wire_bytes_per_step"] == pytest.approx(2 * (n - 1) / n * p["bytes_per_step"])  # ring all-reduce
        assert p["compute_s_per_step"] == pytest.approx(0.1 / n)  # its batch split n ways
    table = frontier.format_table([p])
    assert "MB*" in table and "placed by the analytic model at 8 processes" in table

    # `lrpt comm` on the same run: nothing measured (not zeros), the analytic side at 2 processes.
    (row,) = comm_report.comm_report([run])
    assert row["world_size"] == 1 and row["analytic_world_size"] == 2
    assert row["measured_bytes_per_step"] is None and row["measured_wire_bytes_per_step"] is None
    assert row["analytic_bytes_per_step"] == low and row["full_rank_bytes_per_step"] > low
    assert main(["comm", str(run)]) == 0
    out = capsys.readouterr().out
    assert " 0B " not in out and "0.00ms" not in out and "analytic figures at 2 processes" in out


def test_seconds_per_step_on_a_link_and_the_files(tmp_path, capsys):
    fast = fake_run(tmp_path, "fast_compute", [], losses=[5.0, 3.0], bytes_per_step=10_000_000, step_s=0.5,
                    sync_s=0.2)
    lean = fake_run(tmp_path, "lean_bytes", RELORA, losses=[5.0, 3.2], bytes_per_step=100_000,
                    step_s=1.0)
    points = {p["run"].rsplit("/", 1)[1]: p for p in frontier.frontier([fast, lean], bandwidth_gbit=0.1)}
    # compute = training time less sync time; the wire over 100 Mbit/s comes on top.
    assert points["fast_compute"]["compute_s_per_step"] == pytest.approx(0.3)
    assert points["fast_compute"]["seconds_per_step"] == pytest.approx(0.3 + 10_000_000 * 8 / 1e8)
    assert points["lean_bytes"]["seconds_per_step"] == pytest.approx(1.0 + 100_000 * 8 / 1e8)
    assert points["lean_bytes"]["pareto"] and points["fast_compute"]["pareto"]  # faster but worse loss
    assert main(["frontier", str(fast), str(lean), "--link", "1gbit", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "s/step @1 Gbit/s" in out and "no overlap assumed" in out
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "frontier.md").read_text().startswith("| run | label |")
    assert main(["frontier", str(fast), "--link", "fast"]) == 2


def test_json_gives_one_object_per_run(tmp_path, capsys):
    runs = [fake_run(tmp_path, "full", [], losses=[5.0, 3.0], bytes_per_step=4_000_000),
            fake_run(tmp_path, "hybrid", [*RELORA, "strategy.rank=8", "strategy.ranks={q: 4, v: 16}",
                                          "strategy.full_rank=[layers.0.*]", "distributed.comm_hook=powersgd"],
                     losses=[5.0, 3.1], bytes_per_step=300_000),
            fake_run(tmp_path, "solo", [*RELORA, "distributed.sync=diloco",
                                        "distributed.diloco_inner_steps=10"], losses=[5.0, 3.3], world=1)]
    assert main(["frontier", *map(str, runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    types = {"run": str, "label": str, "bytes_per_step": float, "val_loss": float, "tokens": int, "pareto": bool}
    for row in rows:
        assert all(isinstance(row[k], t) for k, t in types.items()), row
    by = {r["run"].rsplit("/", 1)[1]: r for r in rows}
    assert by["full"]["label"] == "full"
    assert by["hybrid"]["label"] == "relora q4 v16, full layers.0.*, powersgd r4"
    assert by["solo"]["label"] == "relora r8, diloco H10" and by["solo"]["analytic"]
    assert [r["pareto"] for r in rows] == [True, True, True]  # each cheaper and worse than the next
