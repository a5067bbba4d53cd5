"""The analytic communication model and the `lrpt comm` report: bytes per optimizer step from
a config alone, measured bytes per step from a run directory, and the saving against
full-rank training. Payload and wire bytes are defined in trainer/comm.py, which counts them.

DDP moves payload T = trainable bytes per optimizer step (one all-reduce at the last
micro-batch), wire 2(n-1)/n T. ZeRO-1 reduces each gradient slice to the rank that owns it
(payload T, together a reduce-scatter) and all-gathers the updated shards (T): payload 2T,
wire 2(n-1)/n T, the same as DDP. ZeRO-2 must reduce at every micro-batch (it keeps only
gradient partitions): (k+1) T with k accumulation steps. configs/deepspeed/zero{1,2}.json
set use_multi_rank_bucket_allreduce=false for this: DeepSpeed's default all-reduces whole
gradient buckets instead (wire 2(n-1)/n T for the gradients alone, 1.5x DDP in all).

By link, per node of G ranks (m = n / G nodes, node-contiguous ranks, trainer/topology.py):
a collective over the world sends one rank's wire bytes across per node (the ring's boundary
edge) and keeps G - 1 ranks' worth inside; DiLoCo with a worker per node syncs inside the node
every step (intra only) and sends the trainable bytes x 2(m-1)/m across at each outer step.
"""
from __future__ import annotations

from pathlib import Path

from trainer.comm import CATEGORIES, model_bytes, wire_bytes
from trainer.config import load_config
from trainer.shapes import SIZES, model_args
from trainer.rundir import RunDir


def analytic_bytes_per_step(trainable_bytes: int, world_size: int, engine: str = "ddp", *,
                            grad_accum: int = 1, total_bytes: int | None = None) -> int:
    """Payload bytes one rank puts into collectives per optimizer step (trainer/comm.py's terms),
    as measured on DDP and DeepSpeed 0.19 with configs/deepspeed/*.json:

    ddp    one all-reduce of the trainable gradients at the last micro-batch: T.
    zero1  gradients reduced to their owners once per step (T), updated trainable shards
           all-gathered (T): 2T. Wire bytes equal DDP's (reduce-scatter + all-gather).
    zero2  gradients are partitioned, so they are reduced at EVERY micro-batch: (k + 1) T
           with k = grad_accum. With accumulation ZeRO-1 moves fewer bytes.
    zero3  as zero2 for gradients, plus every parameter (frozen W included, total bytes P)
           all-gathered in each forward and backward of each micro-batch: k T + 2 k P.
    (ZeRO also all-reduces the gradient norm when clipping, 4 bytes per flat optimizer group; not counted here.)
    """
    if world_size <= 1:
        return 0
    t, k = int(trainable_bytes), max(1, int(grad_accum))
    if engine in ("ddp", "none"):
        return t
    if engine == "zero1":
        return 2 * t
    if engine == "zero2":
        return (k + 1) * t
    if engine == "zero3":
        return k * t + 2 * k * int(total_bytes if total_bytes is not None else t)
    raise ValueError(f"engine {engine!r}: expected ddp, zero1, zero2 or zero3")


def analytic_wire_bytes_per_step(trainable_bytes: int, world_size: int, engine: str = "ddp", *,
                                 grad_accum: int = 1, total_bytes: int | None = None) -> float:
    """Ring-model bytes one rank sends per optimizer step (see analytic_bytes_per_step)."""
    if engine in ("ddp", "none"):
        return wire_bytes(trainable_bytes, world_size, "all_reduce")
    # ZeRO: every collective is a reduce(-scatter) or an all-gather, (n-1)/n of its payload.
    payload = analytic_bytes_per_step(trainable_bytes, world_size, engine, grad_accum=grad_accum,
                                      total_bytes=total_bytes)
    return wire_bytes(payload, world_size, "all_gather")


def run_model_args(cfg, run_dir=None):
    """The shape a run built: its model.json (the tokenizer's vocabulary, an init_from
    checkpoint's shape). For a config alone, its best guess: model.vocab_size, else the
    named size's, else the embedded corpus's."""
    import json

    from trainer.shapes import ModelArgs

    if run_dir is not None and RunDir(run_dir).model_json.is_file():
        return ModelArgs(**json.loads(RunDir(run_dir).model_json.read_text()))
    vocab = cfg.model.vocab_size or SIZES[cfg.model.name].get("vocab_size") or cfg.data.embedded_vocab
    return model_args(cfg.model, cfg.data.seq_len, vocab_size=vocab)


def sync_per_step(cfg, b: dict, world: int, procs_per_node: int = 1) -> dict:
    """What one optimizer step's sync sends, DiLoCo's outer step amortised over its H steps:
    `payload` and `wire` bytes by rank 0 (trainer/comm.py's terms), and the wire bytes of its
    whole node (G = `procs_per_node` ranks) that cross to other nodes (`inter_node`) or stay
    inside (`intra_node`). `b` is model_bytes(cfg, ...). ZeRO's 4-byte clipping norm per
    optimizer group is not counted (see analytic_bytes_per_step)."""
    d, g = cfg.distributed, procs_per_node
    nodes = world // g
    engine = "ddp" if d.deepspeed == "none" else d.deepspeed
    kw = dict(grad_accum=cfg.train.grad_accum, total_bytes=b["total_bytes"])
    out = dict(payload=0.0, wire=0.0, inter_node=0.0, intra_node=0.0)

    def over_world(payload, wire):  # a ring over every rank: one boundary edge per node
        across = wire if nodes > 1 else 0.0
        out.update(payload=payload, wire=wire, inter_node=across, intra_node=g * wire - across)

    if world <= 1:
        return out
    if d.sync == "every_step":
        t = b["sync_bytes_per_step"]
        over_world(analytic_bytes_per_step(t, world, engine, **kw), analytic_wire_bytes_per_step(t, world, engine, **kw))
        return out
    h, n = d.diloco_inner_steps, b["trainable_params"]
    ob = 2 if d.outer_dtype == "bf16" else 4
    if d.diloco_worker == "process" or g == 1:  # the pseudo-gradient all-reduced over the world
        over_world(n * ob / h, wire_bytes(n * ob, world, "all_reduce") / h)
        return out
    # A worker per node: the engine over the node every step; at outer steps each rank's slice
    # of s elements all-reduced over the nodes, then the node's slices all-gathered (padded).
    s = -(-n // g)
    t = b["trainable_bytes"]
    engine_wire = analytic_wire_bytes_per_step(t, g, engine, **kw)
    gather_wire = wire_bytes(g * s * 4, g, "all_gather") / h
    out["payload"] = analytic_bytes_per_step(t, g, engine, **kw) + ((s * ob if nodes > 1 else 0) + g * s * 4) / h
    out["wire"] = engine_wire + wire_bytes(s * ob, nodes, "all_reduce") / h + gather_wire
    out["inter_node"] = wire_bytes(n * ob, nodes, "all_reduce") / h  # the node's slices together: all n elements
    out["intra_node"] = g * (engine_wire + gather_wire)
    return out


def analytic_from_config(cfg, world_size: int | None = None, run_dir=None, procs_per_node: int | None = None) -> dict:
    """Analytic bytes per step for a run (its model.json) or a config alone (e.g.
    llama-130m, relora, r=128), on `world_size` ranks, `procs_per_node` to a node (default:
    distributed.procs_per_node, else 1: every rank its own node, a flat network)."""
    n = world_size or 2
    g = procs_per_node or cfg.distributed.procs_per_node or 1
    if n % g:
        raise ValueError(f"world size {n} is not a multiple of {g} processes per node")
    b = model_bytes(cfg, run_model_args(cfg, run_dir))
    engine = "ddp" if cfg.distributed.deepspeed == "none" else cfg.distributed.deepspeed
    full_kw = dict(grad_accum=cfg.train.grad_accum, total_bytes=b["base_bytes"])
    sync = sync_per_step(cfg, b, n, g)
    return dict(model=cfg.model.name, strategy=cfg.strategy.name, rank=cfg.strategy.rank, world_size=n,
                procs_per_node=g, engine=engine, **b,
                # What one step's sync carries: the trainable gradients as the hook encodes them,
                # or DiLoCo's, amortised over its H steps (trainer/comm.py).
                analytic_bytes_per_step=sync["payload"], analytic_wire_bytes_per_step=sync["wire"],
                analytic_inter_node_bytes_per_step=sync["inter_node"],
                analytic_intra_node_bytes_per_step=sync["intra_node"],
                # Full rank: the same model without adapters, every weight trainable, plain DDP.
                full_rank_bytes_per_step=analytic_bytes_per_step(b["full_sync_bytes_per_step"], n, engine, **full_kw),
                full_rank_wire_bytes_per_step=analytic_wire_bytes_per_step(b["full_sync_bytes_per_step"], n, engine,
                                                                           **full_kw))


# ---------------------------------------------------------------------------------------------
# `lrpt comm`: one row per run.

def measure_run(metrics: list[dict]) -> dict:
    """Measured bytes and seconds per optimizer step from a run's training records.

    Uses the steady state: records after the last re-wrap (a ReLoRA warm start trains full
    rank first) and after the first record (its window includes start-up). Differences of
    `comm_bytes_total` and `elapsed_s` (both carried across resumes) over the step span;
    wire and per-purpose bytes are sums of the records' `comm/<purpose>_*` over it.
    `measured_startup_bytes` is every record's start-up bytes (the first, and re-wraps)."""
    recs = [r for r in metrics if "comm_bytes" in r and "step" in r]
    if not recs:
        return {}
    out = {k: recs[-1].get(k) for k in ("trainable_params", "total_params", "world_size", "procs_per_node")}
    if any("comm/sync_bytes" in r for r in recs):  # records from before per-purpose counting have none
        out["measured_startup_bytes"] = sum(r.get("comm/startup_bytes", 0) for r in recs)
    rewraps = [i for i, r in enumerate(metrics) if r.get("event") == "rewrap"]
    if rewraps:
        after = metrics[rewraps[-1]]["step"]
        later = [r for r in recs if r["step"] > after]
        recs = later or recs
    if len(recs) >= 2:
        a, b = recs[0], recs[-1]
        steps = b["step"] - a["step"]
        nbytes = b.get("comm_bytes_total", 0) - a.get("comm_bytes_total", 0)
        window = recs[1:]
        wall = (b.get("elapsed_s") or 0.0) - (a.get("elapsed_s") or 0.0)
    else:
        b = recs[0]
        steps, nbytes = b["step"], b.get("comm_bytes_total", b.get("comm_bytes", 0))
        window = recs
        wall = b.get("elapsed_s") or 0.0
    if steps <= 0:
        return out
    out["measured_bytes_per_step"] = nbytes / steps
    if all("comm/sync_wire_bytes" in r for r in window):
        out["measured_wire_bytes_per_step"] = sum(r["comm/sync_wire_bytes"] for r in window) / steps
        kinds = ["bytes", "wire_bytes"]
        if all("comm/sync_inter_node_bytes" in r for r in window):  # per node: the sums over its ranks
            kinds += ["inter_node_bytes", "intra_node_bytes"]
            for kind in kinds[2:]:
                out[f"measured_{kind}_per_step"] = sum(r[f"comm/sync_{kind}"] for r in window) / steps
        out["measured_by_purpose_per_step"] = {
            c: {k: sum(r.get(f"comm/{c}_{k}", 0) for r in window) / steps for k in kinds}
            for c in CATEGORIES if c != "startup"}
    out["comm_time_per_step_s"] = sum(r.get("comm_time_s") or 0.0 for r in window) / steps
    out["step_time_s"] = wall / steps if wall > 0 else None
    out["guard_time_per_step_s"] = sum(r.get("guard_time_s") or 0.0 for r in window) / steps
    out["measured_steps"] = steps
    return out


def comm_report(run_dirs, *, bandwidths_gbit=(25, 100, 400), world_size=None, full_rank_run=None,
                procs_per_node=None) -> list[dict]:
    """One dict per run directory (DESIGN.md's `lrpt comm` contract). A YAML config in
    place of a run directory gives the analytic figures only.

    The analytic side is computed from the model the run built (its model.json). Bytes are
    payload (trainer/comm.py); `*_wire_bytes_per_step` are the ring-algorithm bytes a rank
    sends. `saving_vs_full` is a payload ratio: against a full-rank run's measured sync bytes
    when `full_rank_run` is given (this run measured too), else the analytic figures for both
    sides: this run against the same model without the strategy, synced as plain DDP (fp32
    gradients every step) on the same engine and world size. Without a hook or DiLoCo that is
    exactly 1 - trainable bytes / full-rank bytes (the wire ratio is the same).
    Inter- and intra-node bytes are per node per step (the sums over its ranks), with
    `procs_per_node` ranks to a node: the run's (its records), else `procs_per_node`, else the
    config's distributed.procs_per_node, else 1 (a flat network). Projected times are the
    analytic inter-node bytes of a node divided by its link's bandwidth to the others, for the
    run's world size and for `world_size` if given."""
    full_measured = None
    if full_rank_run is not None:
        full_measured = measure_run(RunDir(full_rank_run).read_metrics()).get("measured_bytes_per_step")
    rows = []
    for rd in run_dirs:
        rd = Path(rd)
        is_run = rd.is_dir()
        cfg = load_config(RunDir(rd).config if is_run else rd)
        meas = measure_run(RunDir(rd).read_metrics()) if is_run else {}
        run_world = meas.get("world_size") or world_size or 2
        if run_world == 1:  # nothing crossed a network: no measured bytes; modelled at --world-size
            meas = {k: meas[k] for k in ("trainable_params", "total_params", "step_time_s") if k in meas}
        n_run = (world_size or 2) if run_world == 1 else run_world
        g = meas.get("procs_per_node") or procs_per_node or cfg.distributed.procs_per_node or 1
        ana = analytic_from_config(cfg, n_run, rd if is_run else None, g)
        measured = meas.get("measured_bytes_per_step")
        if full_measured:
            mine, full = (measured if measured is not None else ana["analytic_bytes_per_step"]), full_measured
        else:
            mine, full = ana["analytic_bytes_per_step"], ana["full_rank_bytes_per_step"]
        step_s, comm_s = meas.get("step_time_s"), meas.get("comm_time_per_step_s")
        row = dict(run=str(rd), strategy=cfg.strategy.name, model=cfg.model.name, rank=cfg.strategy.rank,
                   engine=ana["engine"], world_size=run_world, analytic_world_size=n_run,
                   grad_accum=cfg.train.grad_accum,
                   trainable_params=meas.get("trainable_params") or ana["trainable_params"],
                   total_params=meas.get("total_params") or ana["total_params"],
                   trainable_bytes=ana["trainable_bytes"], full_rank_bytes=ana["base_bytes"],
                   measured_bytes_per_step=measured, analytic_bytes_per_step=ana["analytic_bytes_per_step"],
                   measured_wire_bytes_per_step=meas.get("measured_wire_bytes_per_step"),
                   analytic_wire_bytes_per_step=ana["analytic_wire_bytes_per_step"],
                   procs_per_node=g, nodes=n_run // g,
                   measured_inter_node_bytes_per_step=meas.get("measured_inter_node_bytes_per_step"),
                   analytic_inter_node_bytes_per_step=ana["analytic_inter_node_bytes_per_step"],
                   measured_intra_node_bytes_per_step=meas.get("measured_intra_node_bytes_per_step"),
                   analytic_intra_node_bytes_per_step=ana["analytic_intra_node_bytes_per_step"],
                   full_rank_bytes_per_step=full_measured or ana["full_rank_bytes_per_step"],
                   full_rank_wire_bytes_per_step=ana["full_rank_wire_bytes_per_step"],
                   saving_vs_full=(1 - mine / full) if full else None,
                   saving_basis="measured full-rank run" if full_measured else "analytic full-rank",
                   measured_by_purpose_per_step=meas.get("measured_by_purpose_per_step"),
                   measured_startup_bytes=meas.get("measured_startup_bytes"), measured_steps=meas.get("measured_steps"),
                   comm_time_per_step_s=comm_s, step_time_s=step_s,
                   guard_time_per_step_s=meas.get("guard_time_per_step_s"),
                   comm_share_of_step=(comm_s / step_s) if comm_s is not None and step_s else None,
                   projected_comm_s={})
        for n in dict.fromkeys([n_run] + ([world_size] if world_size else [])):
            if n % g:
                raise ValueError(f"--world-size {n} is not a multiple of {g} processes per node ({rd})")
            across = sync_per_step(cfg, ana, n, g)["inter_node"]
            row["projected_comm_s"][f"n{n}"] = {f"{bw:g}gbit": across * 8 / (bw * 1e9) for bw in bandwidths_gbit}
        rows.append(row)
    return rows


def _human_bytes(v: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}B"


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of comm_report rows (bytes are per rank per optimizer step)."""
    cols = [("run", "run"), ("strategy", "strategy"), ("engine", "engine"), ("world_size", "n"),
            ("procs_per_node", "per node"),
            ("measured_bytes_per_step", "sync/step"), ("analytic_bytes_per_step", "analytic"),
            ("measured_wire_bytes_per_step", "sync wire"), ("analytic_wire_bytes_per_step", "analytic wire"),
            ("measured_inter_node_bytes_per_step", "inter/node"), ("analytic_inter_node_bytes_per_step", "analytic inter"),
            ("measured_intra_node_bytes_per_step", "intra/node"), ("analytic_intra_node_bytes_per_step", "analytic intra"),
            ("edit_bytes_per_step", "edit/step"), ("control_bytes_per_step", "control/step"),
            ("measured_startup_bytes", "startup"),
            ("full_rank_bytes_per_step", "full-rank/step"), ("saving_vs_full", "saving"),
            ("comm_share_of_step", "comm share")]
    rows = [dict(r, **{f"{c}_bytes_per_step": (r.get("measured_by_purpose_per_step") or {}).get(c, {}).get("bytes")
                       for c in ("edit", "control")}) for r in rows]
    proj = list(dict.fromkeys((n, bw) for r in rows for n, d in r["projected_comm_s"].items() for bw in d))
    header = [h for _, h in cols] + [f"{bw.replace('gbit', 'G')}@{n}" for n, bw in proj]

    def cell(r, key):
        v = r.get(key)
        if v is None or ("intra_node" in key and r.get("procs_per_node") == 1):  # no link inside a node
            return "-"
        if key in ("saving_vs_full", "comm_share_of_step"):
            return f"{100 * v + 0.0:.1f}%" if abs(v) >= 5e-4 else "0.0%"
        if key.endswith(("bytes_per_step", "_bytes")):
            return _human_bytes(v)
        if key == "run":
            return Path(str(v)).name or str(v)
        return str(v)

    table = [header] + [[cell(r, k) for k, _ in cols] +
                        [f"{1e3 * r['projected_comm_s'].get(n, {}).get(bw, float('nan')):.2f}ms" for n, bw in proj]
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if proj:
        lines.append("ms: projected time per optimizer step for a node's inter-node bytes on its link to the others, "
                     "at <link Gbit/s>@n<ranks>")
    for r in rows:
        if r["world_size"] != r["analytic_world_size"]:
            lines.append(f"{cell(r, 'run')}: one process, nothing measured; analytic figures at "
                         f"{r['analytic_world_size']} processes (--world-size)")
    lines.append("bytes per optimizer step: sync payload and wire (ring algorithm) per rank, inter- and intra-node "
                 "wire per node; saving: payload")
    return "\n".join(lines)


def plot_comm(rows: list[dict], path) -> None:
    """Left: bytes per step per run (measured, else analytic) beside the full-rank figure.
    Right: projected comm time per step at each bandwidth (the run's world size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["run"]).name or r["run"] for r in rows]
    mine = [r["measured_bytes_per_step"] if r["measured_bytes_per_step"] is not None
            else r["analytic_bytes_per_step"] for r in rows]
    full = [r["full_rank_bytes_per_step"] or 0 for r in rows]
    x = list(range(len(rows)))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.bar([i - 0.2 for i in x], [f / 1e6 for f in full], width=0.4, label="full-rank", color="0.7")
    ax0.bar([i + 0.2 for i in x], [m / 1e6 for m in mine], width=0.4, label="this run")
    ax0.set_ylabel("MB per optimizer step per rank (payload)")
    ax0.legend()
    bws = list(dict.fromkeys(bw for r in rows for bw in next(iter(r["projected_comm_s"].values()), {})))
    width = 0.8 / max(1, len(bws))
    for j, bw in enumerate(bws):
        ys = [1e3 * next(iter(r["projected_comm_s"].values()), {}).get(bw, 0.0) for r in rows]
        ax1.bar([i + (j - (len(bws) - 1) / 2) * width for i in x], ys, width=width, label=bw.replace("gbit", " Gbit/s"))
    ax1.set_ylabel("projected inter-node ms per step per node (run's n)")
    if bws:
        ax1.legend()
    for ax in (ax0, ax1):
        ax.set_xticks(x, names, rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
