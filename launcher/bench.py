"""`lrpt bench`: speed and memory per strategy for one model, each strategy in a fresh process;
with `--link RATE`, seconds on a real slow link.

Figures: median tokens/s and step time over the steps after warm-up (the first quarter is
dropped), peak memory (CUDA: `max_memory_allocated`; CPU: growth of the process's peak RSS
once the model is built, i.e. what training adds: gradients, optimizer state, activations;
with glibc's mmap threshold fixed so that freed tensors leave RSS, see LIVE_RSS),
the trainable share, and MFU: model FLOPs 6N + 12*L*d*T per token (REFERENCE.md's definition,
so figures compare with its throughput anchors) over the device's peak dense bf16 FLOP/s,
null on CPU.

`--link RATE --nproc-per-node G` runs each strategy as a G-process gloo job inside a private
network namespace whose loopback is rate-limited: real TCP traffic, DDP's overlap of
communication with backward included, and nothing leaves the namespace. With `--nodes 2` the
job is two nodes of G processes, each node in its own namespace and the two joined by a veth
pair shaped to RATE (launcher/netns.py): traffic inside a node stays on its unshaped loopback,
and the kernel's count on the veth says what crossed between the nodes, to set beside the
trainer's count. Exposed communication time is the job's step time minus the same
configuration's 1-process step time. A strategy may carry overrides:
`full:distributed.comm_hook=bf16`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.netns import TwoNodes, shaped_loopback
from trainer.rundir import RunDir

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
RESULT = "bench.json"  # what the worker leaves in its run directory


def peak_flops() -> float | None:
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(overrides: list[str]) -> int:
    """One strategy's run in this process, recording its peak memory beside its metrics."""
    import torch

    from trainer.config import load_config
    from trainer.loop import Trainer

    trainer = Trainer(load_config(None, overrides))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _rss_bytes()
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    peak = torch.cuda.max_memory_allocated() if cuda else \
        max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    if trainer.accelerator.is_main_process:
        (trainer.run.path / RESULT).write_text(json.dumps({"peak_memory_bytes": int(peak)}))
    return 0


def _measure(name: str, run: RunDir, model_name: str) -> dict:
    import torch

    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer

    recs = [r for r in run.read_metrics() if "tokens_per_s" in r]
    recs = recs[len(recs) // 4:]  # warm-up: allocator, caches, first-step compilation
    cfg = load_config(run.config)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * recs[-1]["world_size"]
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**json.loads(run.model_json.read_text())))
    peak = peak_flops()
    return {"strategy": name, "model": model_name, "tokens_per_s": tps,
            "step_time_s": statistics.median(tokens_per_step / r["tokens_per_s"] for r in recs),
            "peak_memory_bytes": json.loads((run.path / RESULT).read_text())["peak_memory_bytes"],
            "trainable_share": recs[-1]["trainable_params"] / recs[-1]["total_params"],
            "mfu": tps * model.flops_per_token(cfg.data.seq_len) / peak if peak else None}


def _spec(item: str) -> tuple[str, list[str]]:
    """`relora` or `full:distributed.comm_hook=bf16,train.seed=2` -> (strategy, overrides)."""
    name, _, extra = item.partition(":")
    return name, [f"strategy.name={name}", *(kv for kv in extra.split(",") if kv)]


def _run(item: str, tmp: Path, overrides: list[str], argv_prefix=(), nproc: int = 1, env=None) -> Path:
    """Train one bench item (a fresh process, or an N-process job) and return its run directory."""
    from launcher.launch import child_env, compose, free_port

    name, extra = _spec(item)
    run = Path(tmp) / re.sub(r"[^\w.=-]+", "_", item) / f"n{nproc}"
    args = [*overrides, *extra, f"run.dir={run}"]
    if nproc == 1:
        argv, env = [sys.executable, "-m", "launcher.bench", *args], {**os.environ, **(env or {})}
    else:
        argv, changes = compose(None, args, gpus_per_node=nproc, cpu=True, main_port=free_port(),
                                module="launcher.bench")
        env = child_env({**changes, **(env or {})})
    code = subprocess.call([*argv_prefix, *argv], stdout=subprocess.DEVNULL, env=env)
    if code != 0:
        raise RuntimeError(f"{item}: the {nproc}-process run failed (exit {code}); run it alone to see why: "
                           f"{' '.join(map(shlex.quote, [*argv_prefix, *argv]))}")
    return run


def _run_nodes(item: str, tmp: Path, overrides: list[str], net: TwoNodes, per_node: int,
               env: dict) -> tuple[Path, dict[int, list[int]]]:
    """Train one bench item as a two-node job on `net`, each node started as on a real cluster
    (`accelerate launch --num_machines 2 --machine_rank R`: torchrun with --nnodes 2 --node_rank R,
    LOCAL_WORLD_SIZE = per_node). Returns the run directory and, per step, each node's veth
    byte counter read when rank 0 wrote that step's record."""
    from launcher.launch import child_env, compose

    _, extra = _spec(item)
    run = Path(tmp) / re.sub(r"[^\w.=-]+", "_", item) / f"2x{per_node}"
    args = [*overrides, *extra, f"run.dir={run}"]
    commands = []
    for node in (0, 1):
        # A fresh namespace has every port free.
        argv, changes = compose(None, args, nodes=2, node_rank=node, main_ip=net.addr[0], main_port=29500,
                                gpus_per_node=per_node, cpu=True, module="launcher.bench")
        commands.append((argv, child_env({**changes, **env})))
    watch = _RecordWatch(RunDir(run).metrics, lambda: [net.tx_bytes(i) for i in (0, 1)])
    codes = net.run(commands, watch)
    if any(codes):
        raise RuntimeError(f"{item}: the 2-node run failed (exit codes of nodes 0 and 1: {codes}); its processes' "
                           f"errors are above")
    return run, watch.samples


class _RecordWatch:
    """Calls `sample()` (the counters) each time rank 0 appends a step's record to metrics.jsonl.
    The record is written right after the step's closing all-reduce, which every rank must
    reach, so the counters then hold that step's traffic and (at most) the first chunk of the
    next step's."""

    def __init__(self, path: Path, sample):
        self.path, self.sample, self.samples = path, sample, {}
        self.stale = path.stat().st_ino if path.exists() else None  # a kept --out's old file
        self.ino, self.offset, self.tail = None, 0, b""

    def __call__(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if st.st_ino == self.stale:
            return
        if st.st_ino != self.ino:
            self.ino, self.offset, self.tail = st.st_ino, 0, b""
        if st.st_size <= self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self.tail + f.read()
        self.offset = st.st_size
        *lines, self.tail = data.split(b"\n")
        steps = [r["step"] for r in map(json.loads, filter(None, lines)) if "tokens_per_s" in r]
        if steps:  # several records at once: only the newest is read at its own moment
            self.samples[steps[-1]] = self.sample()


# glibc raises its mmap threshold each time a large block is freed; after that, freed blocks of
# up to 32 MiB stay in the heap, and RSS grows step after step with fragmentation (ReLoRA at
# llama-1b widths, batch 16: +100 MiB a step, docs/LOG.md). A fixed threshold hands blocks back
# as they are freed, so the CPU peak RSS counts live tensors, as max_memory_allocated does on
# a GPU. 4 MiB and not lower: below it every small temporary would be a fresh mapping, whose
# page faults slowed an optimizer of many small passes (SwitchLoRA's VectorAdamW) at 128 KiB:
# SwitchLoRA/ReLoRA 1.02 -> 0.81 at llama-1b widths, batch 4.
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}

def inter_node_bytes(rec: dict, nodes: int) -> float:
    """Bytes that one record's collectives sent from rank 0's node to the others: the trainer's
    own count, `comm/<purpose>_inter_node_bytes` (per node), over every purpose."""
    return _by_link(rec, "inter") if nodes > 1 else 0.0


def _by_link(rec: dict, link: str) -> float:
    return float(sum(v for k, v in rec.items() if k.startswith("comm/") and k.endswith(f"_{link}_node_bytes")))


def _link_row(item: str, run: Path, compute_step_s: float, target: float | None, link: str, nodes: int,
              per_node: int, samples: dict[int, list[int]] | None = None) -> dict:
    recs = RunDir(run).read_metrics()
    steps = [r for r in recs if "tokens_per_s" in r]
    timed = steps[len(steps) // 4:] or steps
    first, last = timed[0], timed[-1]
    span = max(1, last["step"] - first["step"])

    def per_step(key: str) -> float | None:
        vals = [r.get(key) for r in timed[1:]]
        return sum(vals) / span if all(v is not None for v in vals) and vals else None

    tokens_per_step = steps[-1]["tokens"] / steps[-1]["step"]
    step_time = statistics.median(tokens_per_step / r["tokens_per_s"] for r in timed)
    vals = [r for r in recs if "val_loss" in r]
    reached = next((r for r in vals if target is not None and r["val_loss"] <= target and r["step"] > 0), None)
    row = {"strategy": item, "link": link, "world_size": nodes * per_node, "nodes": nodes,
           "procs_per_node": per_node, "step_time_s": step_time,
           "tokens_per_s": tokens_per_step / step_time, "comm_time_s": max(0.0, step_time - compute_step_s),
           "compute_step_time_s": compute_step_s,
           "payload_bytes_per_step": per_step("comm/sync_bytes") or per_step("comm_bytes"),
           "wire_bytes_per_step": per_step("comm/sync_wire_bytes"),
           "final_val_loss": vals[-1]["val_loss"] if vals else None,
           "time_to_target_s": reached.get("elapsed_s") if reached else None,
           "trainable_share": steps[-1]["trainable_params"] / steps[-1]["total_params"]}
    # Bytes by link, per node, over every purpose (the kernel sees them all), as the trainer
    # counted them (the ranks of a node may send unequal amounts: DiLoCo's slices), and the
    # kernel's count on the node's veth over the same steps: the slope of the counter against
    # the step, a least-squares fit over the records, so that a counter read late (the next
    # step's first bytes gone already) moves it little.
    row["inter_node_bytes_per_step"] = sum(inter_node_bytes(r, nodes) for r in timed[1:]) / span
    row["intra_node_bytes_per_step"] = sum(_by_link(r, "intra") for r in timed[1:]) / span
    at = sorted(s for s in samples or {} if first["step"] <= s <= last["step"])
    by_node = [statistics.linear_regression(at, [samples[s][i] for s in at]).slope
               for i in range(nodes)] if len(at) > 2 else None
    row["link_bytes_per_step"] = by_node[0] if by_node else None  # rank 0's node, as the counted figure
    row["link_bytes_per_step_by_node"] = by_node
    return row


def _compute_step_s(item: str, tmp: Path, base: list[str], steps: int, threads: dict) -> float:
    """The configuration's step time in one process: what the job's step would take with no link."""
    ref = _run(item, tmp, [*base, f"train.max_steps={min(steps, 12)}", f"logging.eval_every={10 * steps}"],
               env=threads)
    recs = [r for r in RunDir(ref).read_metrics() if "tokens_per_s" in r]
    return statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in recs[len(recs) // 4:])


def bench(a) -> int:
    link, nodes = a.link, a.nodes
    per_node = a.nproc_per_node if link else 1
    if nodes not in (1, 2):
        raise ValueError(f"--nodes {nodes}: 1 or 2 (two network namespaces on this machine)")
    if nodes > 1 and not link:
        raise ValueError("--nodes 2 needs --link RATE: the nodes are network namespaces joined by a link of that rate")
    rows = []
    with contextlib.ExitStack() as stack:
        tmp = Path(a.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="lrpt-bench-")))
        net = stack.enter_context(TwoNodes(link)) if nodes > 1 else None
        prefix = shaped_loopback(link) if link and nodes == 1 else []
        base = [f"model.name={a.model}", f"train.max_steps={a.steps}", "logging.log_every=1",
                f"logging.eval_every={max(1, a.steps // 10) if link else 10 * a.steps}",
                f"checkpoint.every={10 * a.steps}", "logging.progress=false", "logging.tensorboard=false",
                "schedule.warmup_steps=0", "run.resume=false", *a.set]  # a kept --out folder starts over
        for item in a.strategies:
            try:
                if not link:
                    run = _run(item, tmp, base, env={k: os.environ.get(k, v) for k, v in LIVE_RSS.items()})
                    rows.append(_measure(_spec(item)[0] if ":" not in item else item, RunDir(run), a.model))
                    continue
                # One thread per process in the job, and the same for its 1-process reference.
                threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // (nodes * per_node)))}
                compute = _compute_step_s(item, tmp, base, a.steps, threads)
                if net:
                    job, samples = _run_nodes(item, tmp, base, net, per_node, threads)
                else:
                    job, samples = _run(item, tmp, base, argv_prefix=prefix, nproc=per_node, env=threads), None
                rows.append(_link_row(item, job, compute, a.target_loss, link, nodes, per_node, samples))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=1))
    elif link:
        _print_link_table(rows, link, nodes, per_node)
    else:
        print(f"{'strategy':12s} {'tokens/s':>12s} {'step s':>9s} {'peak MiB':>9s} {'MFU':>7s} {'trainable':>10s}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"{r['strategy']:12s} {r['tokens_per_s']:12,.0f} {r['step_time_s']:9.4f} "
                  f"{r['peak_memory_bytes'] / 2**20:9.1f} {mfu:>7s} {100 * r['trainable_share']:9.1f}%")
    return 0 if len(rows) == len(a.strategies) else 1


def _print_link_table(rows: list[dict], link: str, nodes: int, per_node: int) -> None:
    def cell(v, fmt: str, width: int) -> str:
        return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}s}"

    by_link = ["inter_node_bytes_per_step", "link_bytes_per_step", "intra_node_bytes_per_step"] if nodes > 1 else []
    head = ["sync MB", "wire MB"] + (["inter MB", "link MB", "intra MB"] if by_link else [])
    print(f"{'run':34s} {'step s':>8s} {'comm s':>8s} " + " ".join(f"{h:>9s}" for h in head) +
          f" {'val loss':>9s} {'to target':>10s}  ({nodes} x {per_node} processes, {link}; MB per step"
          + (", per node)" if by_link else ")"))
    for r in rows:
        mb = [r[k] / 1e6 if r[k] is not None else None
              for k in ["payload_bytes_per_step", "wire_bytes_per_step", *by_link]]
        print(f"{r['strategy']:34s} {r['step_time_s']:8.3f} {r['comm_time_s']:8.3f} "
              + " ".join(cell(v, ".2f", 9) for v in mb)
              + f" {cell(r['final_val_loss'], '.4f', 9)} "
              + (f"{r['time_to_target_s']:9.1f}s" if r["time_to_target_s"] is not None else f"{'-':>10s}"))


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(worker(sys.argv[1:]))
