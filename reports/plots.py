"""PNG figures from run directories, several runs overlaid: loss, validation perplexity,
learning rate, cumulative communication, throughput, and PER / condition number per layer.

A figure whose data no run has is skipped (and logged), never an error: a CPU run has no
dynamics, a crashed one may have no validation record, the last line may be half-written.
Uses matplotlib's object API (Figure + Agg canvas), so no global backend state is touched.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from trainer.rundir import RunDir

log = logging.getLogger(__name__)

# (file, title, x key, [(y key, line style)], y label, log y)
CURVES = [
    ("loss.png", "Loss (solid: train, dashed: validation)", "tokens", [("loss", "-"), ("val_loss", "--")],
     "cross-entropy", False),
    ("val_ppl.png", "Validation perplexity", "tokens", [("val_ppl", "-")], "perplexity", True),
    ("lr.png", "Learning rate (every step, as the config schedules it)", "step", [("lr", "-")], "learning rate", False),
    ("comm_bytes.png", "Cumulative communication (this rank)", "step", [("comm_bytes_total", "-")], "bytes", False),
    ("tokens_per_s.png", "Throughput", "step", [("tokens_per_s", "-")], "tokens/s", False),
    # Seconds are what a slow link costs: the same losses, reached later (evaluations excluded).
    ("val_loss_time.png", "Validation loss against training wall-clock", "elapsed_s", [("val_loss", "-")],
     "validation loss", False),
]
DYN_KEY = re.compile(r"^dyn/(\d+)/(\w+)/(weight|grad|update|ba)_(per|cond)$")
DYN_SOURCES = {"weight": "weights", "grad": "gradients", "update": "updates W_t - W_t-k",
               "ba": "B·A alone (rank <= r: capped by construction)"}


@dataclass
class Run:
    name: str
    label: str
    records: list[dict]
    dynamics: list[dict] = field(default_factory=list)
    lr: tuple[list, list] | None = None  # the schedule of every step, from the config


def lr_schedule(config_path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, lr) for every optimizer step 1..max_steps as the run's strategy sets it, from
    its config.yaml. Logged records sample the LR every log_every steps, which turns ReLoRA's
    drops to 0 after each merge into shallow dips at the wrong steps. Step s (1-based, as in
    metrics.jsonl) trains at lr_multiplier(s - 1)."""
    from trainer.config import load_config
    from trainer.strategies import build_strategy

    with warnings.catch_warnings():  # training already showed the config's warnings
        warnings.simplefilter("ignore")
        cfg = load_config(config_path)
    strategy = build_strategy(cfg.strategy, cfg.train.seed)
    steps = range(cfg.train.max_steps)
    return ([s + 1 for s in steps],
            [cfg.optimizer.lr * strategy.lr_multiplier(s, cfg.schedule, cfg.train.max_steps) for s in steps])


def merge_tokens(records: list[dict]) -> list:
    """Token counts at which the run merged its adapters into the weights (ReLoRA restarts)."""
    return sorted({r["tokens"] for r in records if r.get("event") == "merge" and _finite(r.get("tokens"))})


def describe_sync(cfg: dict) -> str:
    """'relora', 'full + powersgd', 'relora + DiLoCo H=50': what tells overlaid runs apart."""
    d = cfg.get("distributed") or {}
    parts = [cfg["strategy"]["name"]]
    if d.get("comm_hook", "none") != "none":
        parts.append(d["comm_hook"])
    if d.get("sync") == "diloco":
        parts.append(f"DiLoCo H={d.get('diloco_inner_steps')}")
    return " + ".join(parts)


def load_run(run_dir: str | Path) -> Run:
    rd = RunDir(run_dir)
    label = rd.path.name
    try:
        cfg = yaml.safe_load(rd.config.read_text()) or {}
        label += f" ({describe_sync(cfg)})" if cfg.get("strategy", {}).get("name") else ""
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    records = rd.read_metrics()
    # In-loop dynamics first (every interval); the offline analysis (checkpoints) otherwise.
    dynamics = [r for r in records if any(k.startswith("dyn/") for k in r)] or rd.read_dynamics()
    try:
        lr = lr_schedule(rd.config)
    except Exception as e:  # noqa: BLE001 - an old or foreign config: plot the logged LR instead
        log.info("plots: %s: LR from the logged records (%s)", rd.path.name, e)
        lr = None
    return Run(rd.path.name, label, records, dynamics, lr)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    """(xs, ys) of `y` against `x`, one point per step (the last record wins: a resumed run
    repeats the steps after its checkpoint), sorted by x."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "step" in r and "tokens" in r}
    points = {}
    for r in records:
        xv = r.get(x, tokens_at.get(r.get("step")) if x == "tokens" else None)
        if _finite(xv) and _finite(r.get(y)):
            points[r.get("step", xv)] = (xv, r[y])
    pts = sorted(points.values())
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _curve(runs: list[Run], spec, out_dir: Path) -> Path | None:
    name, title, x, ys, ylabel, logy = spec
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drawn = merged = False
    for i, run in enumerate(runs):
        labelled = False
        for y, style in ys:
            xs, vs = run.lr if y == "lr" and run.lr else series(run.records, x, y)
            if xs:
                ax.plot(xs, vs, style, color=f"C{i % 10}", label=None if labelled else run.label)
                labelled = drawn = True
        if name == "loss.png":
            for t in merge_tokens(run.records):
                ax.axvline(t, color=f"C{i % 10}", ls=":", lw=0.8, alpha=0.7)
                merged = True
    if not drawn:
        return None
    if merged:
        title += "; dotted verticals: merges"
    ax.set(title=title, xlabel=x, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir / name)


def _dyn_figures(runs: list[Run], out_dir: Path) -> tuple[list[Path], list[str]]:
    """One figure per (source, metric): a panel per (kind, layer), runs overlaid."""
    found: dict[tuple[str, str], set] = {}
    for run in runs:
        for r in run.dynamics:
            for k in r:
                m = DYN_KEY.match(k)
                if m:
                    found.setdefault((m[3], m[4]), set()).add((m[2], int(m[1])))
    written, skipped = [], []
    for src in DYN_SOURCES:
        for q in ("per", "cond"):
            cells = found.get((src, q))
            if not cells:
                skipped.append(f"dyn_{src}_{q}.png")
                continue
            kinds = sorted({c[0] for c in cells}, key=["q", "k", "v", "o", "gate", "up", "down"].index)
            layers = sorted({c[1] for c in cells})
            fig = Figure(figsize=(max(7.0, 2.4 * len(layers)), 1.9 * len(kinds) + 1.4), layout="constrained")
            axes = fig.subplots(len(kinds), len(layers), squeeze=False)
            labelled = set()
            for (r, kind), (c, layer) in ((rk, cl) for rk in enumerate(kinds) for cl in enumerate(layers)):
                ax = axes[r][c]
                if (kind, layer) not in cells:  # e.g. a kind recorded for some layers only
                    ax.set_visible(False)
                    continue
                for i, run in enumerate(runs):
                    xs, vs = series(run.dynamics, "step", f"dyn/{layer}/{kind}/{src}_{q}")
                    if not xs:
                        continue
                    ax.plot(xs, vs, ".-", ms=3, color=f"C{i % 10}", label=None if i in labelled else run.label)
                    labelled.add(i)
                    cap = series(run.dynamics, "step", f"dyn/{layer}/{kind}/ba_per_cap")[1]
                    if q == "per" and src == "ba" and cap:
                        ax.axhline(cap[-1], color=f"C{i % 10}", ls=":", lw=1)
                if q == "cond":
                    ax.set_yscale("log")
                ax.set_title(f"layer {layer} · {kind}", fontsize=8)
                ax.tick_params(labelsize=7)
            what = "Proportional effective rank" if q == "per" else "Condition number (s_min clipped at tolerance)"
            note = "\ndotted: the r / min(m, n) cap" if src == "ba" and q == "per" else ""
            fig.suptitle(f"{what} of {DYN_SOURCES[src]}{note}", fontsize=10)
            for ax in axes[-1]:
                ax.set_xlabel("step", fontsize=8)
            fig.legend(loc="outside lower center", ncols=min(4, len(labelled)), fontsize=8)
            written.append(_save(fig, out_dir / f"dyn_{src}_{q}.png"))
    return written, skipped


def plot_runs(run_dirs, out_dir: str | Path) -> list[Path]:
    """Write the figures for `run_dirs` (overlaid) into `out_dir`; return the written paths.
    Figures with no data in any run are skipped and logged."""
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for spec in CURVES:
        path = _curve(runs, spec, out_dir)
        (written.append(path) if path else skipped.append(spec[0]))
    dyn_written, dyn_skipped = _dyn_figures(runs, out_dir)
    written += dyn_written
    skipped += dyn_skipped
    if skipped:
        log.info("plots: no data for %s", ", ".join(skipped))
    return written
