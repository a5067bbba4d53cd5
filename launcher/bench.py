"""`lrpt bench`: tokens/s and MFU per strategy for one model, each in a fresh process.

MFU uses model FLOPs 6N + 12*L*d*T per token (REFERENCE.md's definition, so figures compare
with its throughput anchors) over the device's peak dense bf16 FLOP/s.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.rundir import RunDir

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops() -> float | None:
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def bench(a) -> int:
    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer

    rows = []
    with tempfile.TemporaryDirectory(prefix="lrpt-bench-") as tmp:
        for name in a.strategies:
            run = RunDir(Path(tmp) / name)
            overrides = [f"model.name={a.model}", f"strategy.name={name}", f"train.max_steps={a.steps}",
                         f"run.dir={run.path}", "logging.log_every=1", f"logging.eval_every={10 * a.steps}",
                         f"checkpoint.every={10 * a.steps}", "logging.progress=false", "logging.tensorboard=false",
                         "schedule.warmup_steps=0", *a.set]
            code = subprocess.call([sys.executable, "-m", "trainer", *overrides], stdout=subprocess.DEVNULL)
            if code != 0:
                print(f"{name}: failed (exit {code})", file=sys.stderr)
                continue
            recs = run.read_metrics()
            speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][len(recs) // 4:]  # skip warm-up
            cfg = load_config(run.config)
            import torch
            with torch.device("meta"):
                model = Transformer(ModelArgs(**json.loads(run.model_json.read_text())))
            tps = statistics.median(speeds)
            peak = peak_flops()
            rows.append((name, tps, tps * model.flops_per_token(cfg.data.seq_len) / peak if peak else None,
                         recs[-1]["trainable_params"] / recs[-1]["total_params"]))
    print(f"{'strategy':12s} {'tokens/s':>12s} {'MFU':>7s} {'trainable':>10s}")
    for name, tps, mfu, share in rows:
        print(f"{name:12s} {tps:12,.0f} {('%.1f%%' % (100 * mfu)) if mfu else 'n/a':>7s} {100 * share:9.1f}%")
    return 0 if len(rows) == len(a.strategies) else 1
