"""plot_runs on synthetic run directories: every figure with data is a real PNG, figures
without data are skipped, and incomplete runs do not crash it."""
import json
import logging
import math

import yaml

from reports.plots import plot_runs, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, strategy, *, dynamics=True, comm=True):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy}}))
    lines = []
    for step in range(0, 101, 10):
        rec = {"step": step, "tokens": step * 2048, "loss": 5 * math.exp(-step / 50), "lr": 1e-3 * min(1, step / 20),
               "tokens_per_s": 9000.0}
        if comm:
            rec.update(comm_bytes=1e6, comm_bytes_total=1e6 * step)
        if step % 50 == 0:
            rec.update(val_loss=rec["loss"] + 0.1, val_ppl=math.exp(rec["loss"] + 0.1))
        if dynamics and step % 20 == 0:
            for layer, kind in ((0, "v"), (1, "v"), (1, "down")):  # a sparse grid: (0, down) stays empty
                rec[f"dyn/{layer}/{kind}/weight_per"] = 0.9 - step / 1000
                rec[f"dyn/{layer}/{kind}/weight_cond"] = 10 + step
                if strategy == "relora":
                    rec[f"dyn/{layer}/{kind}/ba_per"] = 0.1
                    rec[f"dyn/{layer}/{kind}/ba_cond"] = 1e6
                    rec[f"dyn/{layer}/{kind}/ba_per_cap"] = 0.125
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 110, "loss": 1.')  # cut-off last line
    return path


def test_two_runs_overlaid(tmp_path, caplog):
    a = write_run(tmp_path / "full-run", "full")
    b = write_run(tmp_path / "relora-run", "relora")
    with caplog.at_level(logging.INFO, logger="reports.plots"):
        paths = plot_runs([a, b], tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {"loss.png", "val_ppl.png", "lr.png", "comm_bytes.png", "tokens_per_s.png", "dyn_weight_per.png",
                     "dyn_weight_cond.png", "dyn_ba_per.png", "dyn_ba_cond.png"}
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    assert "dyn_grad_per.png" in caplog.text  # said what it skipped


def test_a_run_missing_keys_skips_figures_without_crashing(tmp_path):
    bare = write_run(tmp_path / "bare", "lora", dynamics=False, comm=False)
    (bare / "config.yaml").unlink()
    paths = plot_runs([bare, tmp_path / "does-not-exist"], tmp_path / "plots")
    names = {p.name for p in paths}
    assert "loss.png" in names and "comm_bytes.png" not in names
    assert not any(n.startswith("dyn_") for n in names)


def test_series_keeps_the_last_record_of_a_repeated_step():
    records = [{"step": 1, "tokens": 10, "loss": 3.0}, {"step": 2, "tokens": 20, "loss": 2.0},
               {"step": 2, "tokens": 20, "loss": 1.5}, {"step": 3, "val_ppl": 9.0}, {"step": 3, "tokens": 30}]
    assert series(records, "tokens", "loss") == ([10, 20], [3.0, 1.5])
    assert series(records, "tokens", "val_ppl") == ([30], [9.0])  # tokens found from another record


def test_lr_schedule_shows_relora_restarts_at_their_steps(tmp_path):
    """The LR of every step from the config: zero right after each merge (steps 51, 101, 151
    with reset_every=50), which records logged every 10 steps would miss."""
    from reports.plots import lr_schedule

    cfg = {"strategy": {"name": "relora", "reset_every": 50, "restart_warmup": 5},
           "train": {"max_steps": 200}, "schedule": {"warmup_steps": 10}, "optimizer": {"lr": 1e-3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    steps, lrs = lr_schedule(tmp_path / "config.yaml")
    assert steps == list(range(1, 201))
    assert [s for s, lr in zip(steps, lrs) if lr == 0] == [51, 101, 151]
    assert lrs[10 - 1] == 1e-3 and 0 < lrs[52 - 1] < lrs[56 - 1]  # peak after warmup; re-warmup after a restart
    cfg["strategy"] = {"name": "full"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert min(lr_schedule(tmp_path / "config.yaml")[1]) > 0


def test_merges_are_marked_on_the_loss_plot(tmp_path):
    from reports.plots import load_run, merge_tokens

    run = write_run(tmp_path / "relora-run", "relora")
    with open(run / "metrics.jsonl", "a") as f:  # after the cut-off line, as a resumed run appends
        f.write('\n{"step": 50, "tokens": 102400, "loss": 2.0, "event": "merge"}\n')
    assert merge_tokens(load_run(run).records) == [102400]
    assert load_run(run).lr[0][-1] == 300  # the default max_steps: the schedule, not the records
    assert (tmp_path / "plots" / "loss.png") in plot_runs([run], tmp_path / "plots")


def test_overlaid_runs_are_told_apart_by_strategy_hook_and_sync():
    from reports.plots import describe_sync
    assert describe_sync({"strategy": {"name": "relora"}}) == "relora"
    assert describe_sync({"strategy": {"name": "full"}, "distributed": {"comm_hook": "powersgd"}}) == "full + powersgd"
    assert describe_sync({"strategy": {"name": "relora"}, "distributed": {
        "comm_hook": "none", "sync": "diloco", "diloco_inner_steps": 50}}) == "relora + DiLoCo H=50"
