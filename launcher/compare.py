"""`lrpt compare`: train several configs at one token budget, one after another, then write a
Markdown table and plots (or only tabulate run directories that exist already). Each run lives in OUT/<name>/ and resumes from its own checkpoints,
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
import subprocess
import sys
from pathlib import Path

import yaml

from reports.compare import comparison_table
from reports.plots import plot_runs
from trainer.config import ConfigError, load_config, save_config
from trainer.config_io import deep_merge, read_yaml
from trainer.rundir import RunDir


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
                    deep_merge(merged, read_yaml(Path(configs[0]).parent / spec))
                    spec = {}
                deep_merge(merged, json.loads(json.dumps(common)))
                deep_merge(merged, spec or {})
                out[name] = merged
            return out
    return {Path(c).stem: read_yaml(Path(c)) for c in configs}


def _finished(run_dir: Path, max_steps: int) -> bool:
    return any(r.get("step") == max_steps and "loss" in r for r in RunDir(run_dir).read_metrics())


def compare(configs: list[str], out: str, overrides: list[str] = ()) -> Path:
    """Train `configs` (or a sweep file) into OUT, then tabulate; or, when every argument is
    an existing run directory, only tabulate those."""
    out_dir = Path(out).resolve()
    runs_given = [RunDir(c).is_run() for c in configs]
    if all(runs_given):
        if overrides:
            raise ConfigError("--set applies to runs that compare trains; these run directories are trained already")
        return tabulate([Path(c).resolve() for c in configs], out_dir)
    if any(runs_given):
        raise ConfigError(f"give run directories or configs, not both (run directories: "
                         f"{', '.join(c for c, r in zip(configs, runs_given) if r)})")
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
        code = subprocess.call([sys.executable, "-m", "trainer", str(out_dir / "configs" / f"{name}.yaml")])
        if code != 0:
            raise SystemExit(f"[{name}] training failed with exit code {code}; run `lrpt compare` again to resume")

    return tabulate([out_dir / name for name in runs], out_dir)


def tabulate(run_dirs: list[Path], out_dir: Path) -> Path:
    """OUT/comparison.md and OUT/plots/ from finished (or partly finished) run directories."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(run_dirs)
    (out_dir / "comparison.md").write_text(table + "\n")
    print(table)
    plots = plot_runs(run_dirs, out_dir / "plots")
    print(f"table: {out_dir / 'comparison.md'}; {len(plots)} plots in {out_dir / 'plots'}")
    return out_dir
