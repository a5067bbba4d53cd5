"""`lrpt frontier`: validation loss against communication, one point per run directory, and
the runs that no other run beats on both (the Pareto frontier).

y: the validation loss at the compared token count, which is the largest token count at
which every run recorded a validation loss (so runs of different lengths are compared where
they all were; without such a count, beyond the step-0 evaluation, they are refused).

x: sync bytes per optimizer step, per rank (payload, trainer/comm.py's terms), averaged over
the steps up to the compared token count, so that a ReLoRA warm start or PowerSGD's plain
first steps count as the run paid them (`lrpt comm` shows the steady state instead):
- a run of several processes: its own count, comm_bytes_total / steps;
- a one-process run sent nothing: it is placed by the analytic model (reports/comm.py) at
  `world_size` processes, phase by phase as above, and marked as such.
With a bandwidth, x is projected seconds per step instead: the run's measured compute time per
step (training time less its sync time; for a one-process run, divided by `world_size`, as if
that many processes split its batch) plus its sync wire bytes over the link, with no overlap
of the two (an upper bound: DDP overlaps the all-reduce with backward).

Pareto: a run is on the frontier unless another run is at least as good on both axes and
strictly better on one (x' <= x and loss' <= loss, not both equal). Runs at the same point
are both on it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reports.comm import analytic_bytes_per_step, analytic_wire_bytes_per_step, run_model_args
from trainer.comm import model_bytes, wire_bytes
from trainer.config import load_config
from trainer.errors import RunDirError
from trainer.rundir import RunDir


def label(cfg) -> str:
    """What distinguishes a run on the plot: strategy and rank, per-projection ranks, full-rank
    modules, the adaptive budget, the engine, the hook and the sync mode, as config.yaml says."""
    s, d = cfg.strategy, cfg.distributed
    parts = [s.name]
    if s.name != "full":
        parts[0] += f" r{s.rank}" if not s.ranks else " " + " ".join(f"{k}{v}" for k, v in s.ranks.items())
        if s.full_rank:
            parts.append("full " + " ".join(s.full_rank))
        if s.rank_budget:
            parts.append(f"budget r{s.rank_budget}")
    if d.deepspeed != "none":
        parts.append(d.deepspeed)
    if d.comm_hook != "none":
        parts.append(f"powersgd r{d.powersgd_rank}" if d.comm_hook == "powersgd" else d.comm_hook)
    if d.sync == "diloco":
        parts.append(f"diloco H{d.diloco_inner_steps}")
    return ", ".join(parts)


def common_tokens(metrics: dict[str, list[dict]]) -> int:
    """The largest token count at which every run has a validation loss (step 0 aside)."""
    seen = {run: {r["tokens"] for r in recs if "val_loss" in r and r.get("tokens", 0) > 0}
            for run, recs in metrics.items()}
    common = set.intersection(*seen.values())
    if not common:
        last = ", ".join(f"{Path(run).name} {max(t):,}" if t else f"{Path(run).name} none" for run, t in seen.items())
        raise RunDirError(f"no token count at which every run has a validation loss (each run's last: {last}); "
                          f"compare runs trained to a common count, with logging.eval_every dividing it")
    return max(common)


def _analytic_per_step(cfg, run_dir, world_size: int, steps: int) -> tuple[float, float]:
    """Payload and wire bytes per step a run would have sent at `world_size` processes,
    averaged over its first `steps` optimizer steps: the analytic model per phase (a ReLoRA
    warm start trains every weight; PowerSGD all-reduces plainly before powersgd_start_iter)."""
    args = run_model_args(cfg, run_dir)
    engine = "ddp" if cfg.distributed.deepspeed == "none" else cfg.distributed.deepspeed
    d = cfg.distributed
    warm = cfg.strategy.warm_start_steps if cfg.strategy.name == "relora" else 0
    plain = d.powersgd_start_iter if d.comm_hook == "powersgd" else 0
    cuts = sorted({0, steps, *(c for c in (warm, plain) if 0 < c < steps)})
    payload = wire = 0.0
    for a, b in zip(cuts, cuts[1:]):
        phase = replace(cfg, distributed=replace(d, comm_hook="none")) if a < plain else cfg
        mb = model_bytes(phase, args, a if a < warm else None)
        kw = dict(grad_accum=cfg.train.grad_accum, total_bytes=mb["total_bytes"])
        payload += (b - a) * analytic_bytes_per_step(mb["sync_bytes_per_step"], world_size, engine, **kw)
        wire += (b - a) * analytic_wire_bytes_per_step(mb["sync_bytes_per_step"], world_size, engine, **kw)
    return payload / steps, wire / steps


def run_point(run_dir, metrics: list[dict], tokens: int, world_size: int) -> dict:
    """One run at `tokens`: bytes and seconds per step up to there, its validation loss,
    minimal-pair accuracy and mean update PER where recorded."""
    cfg = load_config(RunDir(run_dir).config)
    val = next(r for r in metrics if r.get("tokens") == tokens and "val_loss" in r)
    train = [r for r in metrics if "loss" in r and "step" in r and r["step"] <= val["step"]]
    steps = val["step"]
    at = next((r for r in reversed(train) if r["step"] == steps), train[-1] if train else {})
    run_world = at.get("world_size") or 1
    analytic = run_world == 1
    if analytic:
        payload, wire = _analytic_per_step(cfg, run_dir, world_size, steps)
    else:
        payload = at.get("comm_bytes_total", 0) / steps
        wires = [r.get("comm/sync_wire_bytes") for r in train]  # absent in records older than the ledger
        wire = sum(wires) / steps if wires and None not in wires else wire_bytes(payload, run_world)
    sync_s = sum(r.get("comm_time_s") or 0.0 for r in train)
    compute_s = (at["elapsed_s"] - sync_s) / steps if at.get("elapsed_s") else None
    if analytic and compute_s is not None:
        compute_s /= world_size  # n processes split the step's batch: its compute, ideally scaled
    pers = [v for r in metrics if r.get("step", 0) <= steps for k, v in r.items()
            if k.startswith("dyn/") and k.endswith("/update_per")]
    blimp = next((r["blimp_acc"] for r in metrics if r.get("tokens") == tokens and "blimp_acc" in r), None)
    return dict(run=str(run_dir), label=label(cfg), bytes_per_step=payload, val_loss=val["val_loss"], tokens=tokens,
                pareto=False, steps=steps, trained_tokens=max(r.get("tokens", 0) for r in metrics),
                world_size=world_size if analytic else run_world, analytic=analytic, wire_bytes_per_step=wire,
                compute_s_per_step=compute_s, blimp_acc=blimp, update_per=sum(pers) / len(pers) if pers else None)


def mark_pareto(points: list[dict], x: str) -> None:
    for p in points:
        p["pareto"] = not any(q is not p and q[x] <= p[x] and q["val_loss"] <= p["val_loss"]
                              and (q[x], q["val_loss"]) != (p[x], p["val_loss"]) for q in points)


def frontier(run_dirs, *, world_size: int = 2, bandwidth_gbit: float | None = None) -> list[dict]:
    """One point per run directory, compared at their largest common token count, sorted by x
    (bytes per step, or projected seconds per step at `bandwidth_gbit`), Pareto marked."""
    metrics = {str(rd): RunDir(rd).read_metrics() for rd in run_dirs}
    tokens = common_tokens(metrics)
    points = [run_point(rd, recs, tokens, world_size) for rd, recs in metrics.items()]
    x = "bytes_per_step"
    if bandwidth_gbit:
        x = "seconds_per_step"
        for p in points:
            if p["compute_s_per_step"] is None:
                raise RunDirError(f"{p['run']}: no training time recorded (elapsed_s); cannot project seconds")
            p["link_gbit"] = bandwidth_gbit
            p["seconds_per_step"] = p["compute_s_per_step"] + p["wire_bytes_per_step"] * 8 / (bandwidth_gbit * 1e9)
    mark_pareto(points, x)
    return sorted(points, key=lambda p: (p[x], p["val_loss"]))


# ---------------------------------------------------------------------------------------------
# Table and plot

def _bytes(v: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= div:
            return f"{v / div:.3f} {unit}"
    return f"{v:.0f} B"


def _opt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(points: list[dict]) -> str:
    """A Markdown table of `frontier` points, with the notes that say how to read it."""
    seconds = "seconds_per_step" in points[0]
    head = ["run", "label", "n", "bytes/step"]
    if seconds:
        head += ["wire/step", "compute s", f"s/step @{points[0]['link_gbit']:g} Gbit/s"]
    head += ["val loss", "minimal pairs", "update PER", "pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = [Path(p["run"]).name, p["label"], str(p["world_size"]), _bytes(p["bytes_per_step"]) + "*" * p["analytic"]]
        if seconds:
            row += [_bytes(p["wire_bytes_per_step"]), f"{p['compute_s_per_step']:.3f}", f"{p['seconds_per_step']:.3f}"]
        row += [f"{p['val_loss']:.4f}", _opt(p["blimp_acc"], ".3f"), _opt(p["update_per"], ".3f"),
                "yes" if p["pareto"] else ""]
        lines.append("| " + " | ".join(row) + " |")
    tokens = points[0]["tokens"]
    notes = [f"Compared at {tokens:,} tokens, the largest token count with a validation loss in every run."]
    further = [f"{Path(p['run']).name} ({p['trained_tokens']:,})" for p in points if p["trained_tokens"] > tokens]
    if further:
        notes.append(f"Trained further, not shown beyond it: {', '.join(further)}.")
    if any(p["analytic"] for p in points):
        n = next(p["world_size"] for p in points if p["analytic"])
        notes.append(f"*: a one-process run sends nothing; placed by the analytic model at {n} processes "
                     f"(--world-size).")
    notes.append("bytes/step: sync payload per optimizer step per rank, averaged over the steps so far "
                 "(warm starts and PowerSGD's plain first steps included); n: processes the bytes are for.")
    if seconds:
        notes.append("s/step: measured compute per step (training time less sync time; one-process runs: "
                     "divided by n, the batch split n ways) + sync wire bytes over the link, no overlap assumed.")
    notes.append(f"pareto: no other run has lower-or-equal {'s/step' if seconds else 'bytes/step'} and "
                 "lower-or-equal loss with one of them strictly lower.")
    return "\n".join(lines + [""] + notes)


def plot_frontier(points: list[dict], path) -> None:
    """Validation loss against bytes (or seconds) per step, log x, each point labelled; the
    frontier joined by a line, analytic points hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = "seconds_per_step" in points[0]
    x = "seconds_per_step" if seconds else "bytes_per_step"
    fig, ax = plt.subplots(figsize=(9, 6))
    front = [p for p in points if p["pareto"]]
    ax.plot([p[x] for p in front], [p["val_loss"] for p in front], "-", color="C3", lw=1, alpha=0.6,
            label="Pareto frontier")
    for analytic, style in ((False, dict(color="C0")), (True, dict(facecolors="none", edgecolors="C0"))):
        pts = [p for p in points if p["analytic"] == analytic]
        if pts:
            n = pts[0]["world_size"]
            ax.scatter([p[x] for p in pts], [p["val_loss"] for p in pts], s=40, zorder=3, **style,
                       label=f"analytic: one process, placed at n={n}" if analytic else "measured")
    for p in points:
        ax.annotate(p["label"], (p[x], p["val_loss"]), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    color="C3" if p["pareto"] else "0.25")
    ax.set_xscale("log")
    ax.set_xlabel(f"projected seconds per step at {points[0]['link_gbit']:g} Gbit/s (compute + sync, no overlap)"
                  if seconds else "sync bytes per optimizer step per rank (payload)")
    ax.set_ylabel(f"validation loss at {points[0]['tokens']:,} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(points: list[dict], out) -> list[Path]:
    """frontier.md and frontier.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(format_table(points) + "\n")
    plot_frontier(points, out / "frontier.png")
    return [out / "frontier.md", out / "frontier.png"]
