"""`lrpt bench`: speed and memory per strategy for one model, each strategy in a fresh process.

Figures: median tokens/s and step time over the steps after warm-up (the first quarter is
dropped), peak memory (CUDA: `max_memory_allocated`; CPU: growth of the process's peak RSS
once the model is built, i.e. what training adds: gradients, optimizer state, activations),
the trainable share, and MFU: model FLOPs 6N + 12*L*d*T per token (REFERENCE.md's definition,
so figures compare with its throughput anchors) over the device's peak dense bf16 FLOP/s,
null on CPU.
"""
from __future__ import annotations

import json
import resource
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


def bench(a) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrpt-bench-") as tmp:
        for name in a.strategies:
            run = RunDir(Path(tmp) / name)
            overrides = [f"model.name={a.model}", f"strategy.name={name}", f"train.max_steps={a.steps}",
                         f"run.dir={run.path}", "logging.log_every=1", f"logging.eval_every={10 * a.steps}",
                         f"checkpoint.every={10 * a.steps}", "logging.progress=false", "logging.tensorboard=false",
                         "schedule.warmup_steps=0", *a.set]
            code = subprocess.call([sys.executable, "-m", "launcher.bench", *overrides], stdout=subprocess.DEVNULL)
            if code != 0:
                print(f"{name}: failed (exit {code})", file=sys.stderr)
                continue
            rows.append(_measure(name, run, a.model))
    if getattr(a, "json", False):
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'strategy':12s} {'tokens/s':>12s} {'step s':>9s} {'peak MiB':>9s} {'MFU':>7s} {'trainable':>10s}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"{r['strategy']:12s} {r['tokens_per_s']:12,.0f} {r['step_time_s']:9.4f} "
                  f"{r['peak_memory_bytes'] / 2**20:9.1f} {mfu:>7s} {100 * r['trainable_share']:9.1f}%")
    return 0 if len(rows) == len(a.strategies) else 1


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
