"""`lrpt compare`: train several configs at one token budget, one after another, then write a
Markdown table and plots. Each run lives in OUT/<name>/ and resumes from its own checkpoints,
so an interrupted comparison picked up again only trains what did not finish.

A sweep file (configs/experiments/compare-*.yaml) names the runs:

    sweep:
      common: {model: {name: micro}, train: {max_steps: 300}}   # every run
      runs:
        full: micro-full.yaml                                   # a config file, or
        relora: {strategy: {name: relora, reset_every: 100}}    # overrides of the defaults
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from trainer.config import _deep_merge, _read_yaml, load_config, save_config


def _runs_from(configs: list[str]) -> dict[str, dict]:
    """{name: nested config dict} from config files or one sweep file."""
    if len(configs) == 1:
        raw = yaml.safe_load(Path(configs[0]).read_text()) or {}
        if "sweep" in raw:
            common, runs = raw["sweep"].get("common", {}), raw["sweep"]["runs"]
            out = {}
            for name, spec in runs.items():
                merged: dict = {}
                if isinstance(spec, str):  # a config file, relative to the sweep file
                    _deep_merge(merged, _read_yaml(Path(configs[0]).parent / spec))
                    spec = {}
                _deep_merge(merged, json.loads(json.dumps(common)))
                _deep_merge(merged, spec or {})
                out[name] = merged
            return out
    return {Path(c).stem: _read_yaml(Path(c)) for c in configs}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run_dir: Path, max_steps: int) -> bool:
    return any(r.get("step") == max_steps and "loss" in r for r in _records(run_dir))


def compare(configs: list[str], out: str, overrides: list[str] = ()) -> Path:
    out_dir = Path(out).resolve()
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    runs = _runs_from(configs)
    budgets = {}
    for name, spec in runs.items():
        cfg_path = out_dir / "configs" / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        cfg = load_config(cfg_path, [*overrides, f"run.dir={out_dir / name}"])  # validates before any training
        save_config(cfg, cfg_path)
        budgets[name] = cfg.train.max_steps * cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    if len(set(budgets.values())) > 1:
        print(f"warning: token budgets differ between runs: {budgets}", file=sys.stderr)

    for name in runs:
        cfg = load_config(out_dir / "configs" / f"{name}.yaml")
        if _finished(Path(cfg.run.dir), cfg.train.max_steps):
            print(f"[{name}] already finished, skipping")
            continue
        print(f"[{name}] training -> {cfg.run.dir}", flush=True)
        code = subprocess.call([sys.executable, "-m", "trainer.loop", str(out_dir / "configs" / f"{name}.yaml")])
        if code != 0:
            raise SystemExit(f"[{name}] training failed with exit code {code}; run `lrpt compare` again to resume")

    table = comparison_table([out_dir / name for name in runs])
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    from trainer.plots import plot_runs
    plots = plot_runs([out_dir / name for name in runs], out_dir / "plots")
    print(f"table: {out_dir / 'comparison.md'}; {len(plots)} plots in {out_dir / 'plots'}")
    return out_dir


def comparison_table(run_dirs: list[Path]) -> str:
    from trainer.comm import comm_report

    full = next((d for d in run_dirs if load_config(d / "config.yaml").strategy.name == "full"), None)
    comm_rows = {Path(r["run"]).name: r for r in comm_report([str(d) for d in run_dirs],
                                                             full_rank_run=str(full) if full else None)}
    header = ("| run | strategy | train loss | val loss | val ppl | minimal pairs | trainable | DDP bytes/step "
              "| measured bytes/step | saving vs full | tokens/s | train time |")
    lines = [header, "|" + "|".join(["---"] * 12) + "|"]
    # Gradient payload of one data-parallel step: every trainable fp32 parameter once, whatever
    # the world size (a 1-process run measures no traffic, but the comparison still holds).
    full_bytes = None
    if full is not None:
        full_recs = [r for r in _records(full) if "total_params" in r]
        full_bytes = 4 * full_recs[-1]["total_params"] if full_recs else None
    for d in run_dirs:
        recs = _records(d)
        cfg = load_config(d / "config.yaml")
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
