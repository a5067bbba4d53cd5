"""The `lrpt compare` table: one Markdown row per run directory (losses, minimal pairs,
trainable share, bytes per step and the saving against the full-rank run, speed)."""
from __future__ import annotations

import math
from pathlib import Path

from reports.comm import comm_report
from trainer.config import load_config
from trainer.rundir import RunDir


def comparison_table(run_dirs: list[Path]) -> str:
    full = next((d for d in run_dirs if load_config(RunDir(d).config).strategy.name == "full"), None)
    comm_rows = {Path(r["run"]).name: r for r in comm_report([str(d) for d in run_dirs],
                                                             full_rank_run=str(full) if full else None)}
    header = ("| run | strategy | train loss | val loss | val ppl | minimal pairs | trainable | DDP bytes/step "
              "| measured bytes/step | saving vs full | tokens/s | train time |")
    lines = [header, "|" + "|".join(["---"] * 12) + "|"]
    # Gradient payload of one data-parallel step: every trainable fp32 parameter once, whatever
    # the world size (a 1-process run measures no traffic, but the comparison still holds).
    full_bytes = None
    if full is not None:
        full_recs = [r for r in RunDir(full).read_metrics() if "total_params" in r]
        full_bytes = 4 * full_recs[-1]["total_params"] if full_recs else None
    for d in run_dirs:
        recs = RunDir(d).read_metrics()
        cfg = load_config(RunDir(d).config)
        train = [r for r in recs if "loss" in r]
        last = train[-1] if train else {}
        val = next((r for r in reversed(recs) if "val_loss" in r), {})
        blimp = next((r for r in reversed(recs) if "blimp_acc" in r), {})
        c = comm_rows.get(d.name, {})
        speed = [r["tokens_per_s"] for r in train[1:]] or [last.get("tokens_per_s", float("nan"))]
        share = last.get("trainable_params", 0) / max(1, last.get("total_params", 1))
        ddp_bytes = 4 * last.get("trainable_params", 0)
        measured = c.get("measured_bytes_per_step") if c.get("world_size", 1) > 1 else None
        lines.append("| " + " | ".join([
            d.name, cfg.strategy.name, f"{last.get('loss', float('nan')):.4f}",
            f"{val.get('val_loss', float('nan')):.4f}", f"{val.get('val_ppl', float('nan')):.2f}",
            f"{blimp.get('blimp_acc', float('nan')):.3f}", f"{100 * share:.1f}%",
            _mb(ddp_bytes), _mb(measured), _pct(1 - ddp_bytes / full_bytes if full_bytes else None),
            f"{sum(speed) / len(speed):,.0f}", f"{last.get('elapsed_s', float('nan')):.0f} s"]) + " |")
    return "\n".join(lines)


def _mb(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 1e6:.3f} MB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
