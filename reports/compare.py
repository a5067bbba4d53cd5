"""The `lrpt compare` table: one Markdown row per run directory (losses, minimal pairs,
trainable share, bytes per step and the saving against the full-rank run, speed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from reports.comm import comm_report
from trainer.config import load_config
from trainer.rundir import RunDir

# The console's start-up line (trainer/strategies/base.py `describe`) uses the same denominator.
FOOTNOTE = ("trainable: trainable parameters as a share of the base model (all its weights, adapters "
            "not counted), as the training console prints it. n/a: not measured (minimal pairs: the "
            "data has none; measured bytes: a single-process run).")


def _base_params(run_dir: Path) -> int | None:
    """Parameters of the run's model without adapters, counted on the meta device."""
    import torch

    from trainer.model import ModelArgs, Transformer

    shape = RunDir(run_dir).model_json
    if not shape.is_file():
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(ModelArgs(**json.loads(shape.read_text()))).parameters())


def comparison_table(run_dirs: list[Path]) -> str:
    run_dirs = [Path(d) for d in run_dirs]
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
        base = _base_params(d) or last.get("total_params")
        share = last["trainable_params"] / base if base and "trainable_params" in last else None
        ddp_bytes = 4 * last.get("trainable_params", 0)
        measured = c.get("measured_bytes_per_step") if c.get("world_size", 1) > 1 else None
        lines.append("| " + " | ".join([
            d.name, cfg.strategy.name, _num(last.get("loss"), ".4f"), _num(val.get("val_loss"), ".4f"),
            _num(val.get("val_ppl"), ".2f"), _num(blimp.get("blimp_acc"), ".3f"), _pct(share),
            _mb(ddp_bytes), _mb(measured), _pct(1 - ddp_bytes / full_bytes if full_bytes else None),
            _num(sum(speed) / len(speed), ",.0f"), _num(last.get("elapsed_s"), ".0f", " s")]) + " |")
    return "\n".join(lines + ["", FOOTNOTE])


def _num(x, fmt: str, unit: str = "") -> str:
    ok = isinstance(x, (int, float)) and math.isfinite(x)
    return f"{x:{fmt}}{unit}" if ok else "n/a"


def _mb(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 1e6:.3f} MB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
