"""`lrpt bench`: speed and memory per strategy for one model, each strategy in a fresh process;
with `--link RATE`, seconds on a real slow link.

Figures: median tokens/s and step time over the steps after warm-up (the first quarter is
dropped), peak memory (CUDA: `max_memory_allocated`; CPU: growth of the process's peak RSS
once the model is built, i.e. what training adds: gradients, optimizer state, activations;
with glibc's mmap threshold fixed so that freed tensors leave RSS, see LIVE_RSS),
the trainable share, and MFU: model FLOPs 6N + 12*L*d*T per token (REFERENCE.md's definition,
so figures compare with its throughput anchors) over the device's peak dense bf16 FLOP/s,
null on CPU.

`--link RATE --nproc N` runs each strategy as an N-process gloo job inside a private network
namespace whose loopback is rate-limited (`unshare -n`, then `tc qdisc ... tbf`): real TCP
traffic, DDP's overlap of communication with backward included, and nothing leaves the
namespace. Exposed communication time is the job's step time minus the same configuration's
1-process step time. A strategy may carry overrides: `full:distributed.comm_hook=bf16`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


# glibc raises its mmap threshold each time a large block is freed; after that, freed blocks of
# up to 32 MiB stay in the heap, and RSS grows step after step with fragmentation (ReLoRA at
# llama-1b widths, batch 16: +100 MiB a step, docs/LOG.md). A fixed threshold hands blocks back
# as they are freed, so the CPU peak RSS counts live tensors, as max_memory_allocated does on
# a GPU. 4 MiB and not lower: below it every small temporary would be a fresh mapping, whose
# page faults slowed an optimizer of many small passes (SwitchLoRA's VectorAdamW) at 128 KiB:
# SwitchLoRA/ReLoRA 1.02 -> 0.81 at llama-1b widths, batch 4.
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}

TC_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")


def shaped_link(rate: str) -> list[str]:
    """The command prefix that runs a command in a new network namespace whose loopback
    carries `rate` (tc syntax: 100mbit, 1gbit). Checked here, with one line on failure."""
    m = TC_RATE.match(rate.lower())
    if not m:
        raise ValueError(f"--link {rate!r}: expected a rate such as 100mbit, 1gbit or 500kbit")
    for tool in ("unshare", "tc", "ip"):
        if not shutil.which(tool):
            raise RuntimeError(f"--link needs `{tool}` (Debian: apt-get install util-linux iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise PermissionError(f"--link needs root or CAP_NET_ADMIN to make a network namespace "
                              f"(unshare -n: {probe.stderr.strip() or 'refused'})")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    burst = max(256 * 1024, int(bits / 8 / 250))  # tbf needs at least rate / HZ bytes per tick
    setup = (f"ip link set lo up && tc qdisc add dev lo root tbf rate {rate.lower()} burst {burst} "
             f"latency 50ms && exec \"$@\"")
    return ["unshare", "-n", "bash", "-c", setup, "lrpt-link"]


def _link_row(item: str, run: Path, compute_step_s: float, target: float | None, link: str, nproc: int) -> dict:
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
    return {"strategy": item, "link": link, "world_size": nproc, "step_time_s": step_time,
            "tokens_per_s": tokens_per_step / step_time, "comm_time_s": max(0.0, step_time - compute_step_s),
            "compute_step_time_s": compute_step_s,
            "payload_bytes_per_step": per_step("comm/sync_bytes") or per_step("comm_bytes"),
            "wire_bytes_per_step": per_step("comm/sync_wire_bytes"),
            "final_val_loss": vals[-1]["val_loss"] if vals else None,
            "time_to_target_s": reached.get("elapsed_s") if reached else None,
            "trainable_share": steps[-1]["trainable_params"] / steps[-1]["total_params"]}


def bench(a) -> int:
    rows = []
    link = getattr(a, "link", None)
    prefix = shaped_link(link) if link else []
    nproc = getattr(a, "nproc", 2) if link else 1
    keep = getattr(a, "out", None)
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="lrpt-bench-")) as tmp:
        base = [f"model.name={a.model}", f"train.max_steps={a.steps}", "logging.log_every=1",
                f"logging.eval_every={max(1, a.steps // 10) if link else 10 * a.steps}",
                f"checkpoint.every={10 * a.steps}", "logging.progress=false", "logging.tensorboard=false",
                "schedule.warmup_steps=0", "run.resume=false"]  # a kept --out folder starts over
        for item in a.strategies:
            try:
                if not link:
                    run = _run(item, Path(tmp), [*base, *a.set],
                               env={k: os.environ.get(k, v) for k, v in LIVE_RSS.items()})
                    rows.append(_measure(_spec(item)[0] if ":" not in item else item, RunDir(run), a.model))
                    continue
                # One thread per process in the job, and the same for its 1-process reference.
                threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc))}
                ref = _run(item, Path(tmp), [*base, *a.set, f"train.max_steps={min(a.steps, 12)}",
                                             f"logging.eval_every={10 * a.steps}"], env=threads)
                ref_recs = [r for r in RunDir(ref).read_metrics() if "tokens_per_s" in r]
                ref_recs = ref_recs[len(ref_recs) // 4:]
                compute = statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in ref_recs)
                job = _run(item, Path(tmp), [*base, *a.set], argv_prefix=prefix, nproc=nproc, env=threads)
                rows.append(_link_row(item, job, compute, getattr(a, "target_loss", None), link, nproc))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
    if getattr(a, "json", False):
        print(json.dumps(rows, indent=1))
    elif link:
        print(f"{'run':34s} {'step s':>8s} {'comm s':>8s} {'MB/step':>9s} {'wire MB':>8s} {'val loss':>9s} "
              f"{'to target':>10s}  ({nproc} processes, {link})")
        for r in rows:
            mb = lambda v: f"{v / 1e6:9.2f}" if v is not None else f"{'-':>9s}"  # noqa: E731
            tt = f"{r['time_to_target_s']:9.1f}s" if r["time_to_target_s"] is not None else f"{'-':>10s}"
            vl = f"{r['final_val_loss']:9.4f}" if r["final_val_loss"] is not None else f"{'-':>9s}"
            print(f"{r['strategy']:34s} {r['step_time_s']:8.3f} {r['comm_time_s']:8.3f} {mb(r['payload_bytes_per_step'])}"
                  f"{mb(r['wire_bytes_per_step'])[1:]} {vl} {tt}")
    else:
        print(f"{'strategy':12s} {'tokens/s':>12s} {'step s':>9s} {'peak MiB':>9s} {'MFU':>7s} {'trainable':>10s}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"{r['strategy']:12s} {r['tokens_per_s']:12,.0f} {r['step_time_s']:9.4f} "
                  f"{r['peak_memory_bytes'] / 2**20:9.1f} {mfu:>7s} {100 * r['trainable_share']:9.1f}%")
    return 0 if len(rows) == len(a.strategies) else 1


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(worker(sys.argv[1:]))
