"""`lrpt plan` against torch.cuda.max_memory_allocated on one GPU (issue 20, item 8).

Each case is a fresh process that builds the real Trainer (bf16 autocast over fp32 master
weights, the embedded corpus, vocabulary 32000) and takes a few optimizer steps; it reports
the peak allocated bytes and the `mem/` record it measured from live tensors. The table
compares the plan's total with the peak (the target: the plan within 10%, and not below it
by more than the allocator's rounding) and checks that the measured model-state bytes are
the plan's exactly. Cases run side by side, as many at once as the plans say fit in
--budget-gib (a process's allocation statistics are its own).

    python benchmarks/plan_gpu.py              # llama-350m, llama-1b x full, relora x DDP, ZeRO-2
    python benchmarks/plan_gpu.py --dry-run    # the plans only, no GPU needed
    python benchmarks/plan_gpu.py --models micro --device cpu --steps 2   # the whole path on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = {"llama-350m": 32, "llama-1b": 16}  # sequences of 256 tokens per micro-batch


def overrides(model: str, strategy: str, engine: str, steps: int, device: str) -> list[str]:
    return [f"model.name={model}", "model.vocab_size=32000", "data.seq_len=256",
            f"data.batch_size={BATCH.get(model, 2)}", f"strategy.name={strategy}", "strategy.rank=128",
            "strategy.warm_start_steps=0", f"distributed.deepspeed={engine}", f"train.max_steps={steps}",
            f"train.device={device}", "data.embedded_sentences=20000", "logging.eval_batches=1",
            "logging.progress=false", "logging.trackers=[]"]


def case(over: list[str], run_dir: str, steps: int) -> dict:
    """In the child: build the Trainer, take `steps` optimizer steps, report the peak and the
    measured model-state bytes (the probe the loop uses for its first record)."""
    import torch

    from trainer.config import load_config
    from trainer.loop import Trainer

    trainer = Trainer(load_config(None, [*over, f"run.dir={run_dir}"]))
    cuda = torch.cuda.is_available() and trainer.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, steps + 1):  # the loop's step without its records and final checkpoint
        trainer._train_step(step)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    mem = trainer.mem.record()
    trainer.accelerator.end_training()
    return {"peak": peak, "mem": mem}


def planned(over: list[str], cache: dict) -> dict:
    from trainer import memory
    from trainer.config import load_config
    from trainer.shapes import model_args

    cfg = load_config(None, over)
    return memory.plan(cfg, model_args(cfg.model, cfg.data.seq_len, 32000), cache=cache)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-350m", "llama-1b"])
    ap.add_argument("--strategies", nargs="+", default=["full", "relora"])
    ap.add_argument("--engines", nargs="+", default=["none", "zero2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget-gib", type=float, default=100.0, help="planned GiB running at once")
    ap.add_argument("--dry-run", action="store_true", help="print the plans; train nothing")
    ap.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # a child: overrides JSON, run dir, steps
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(json.loads(a.case[0]), a.case[1], int(a.case[2]))))
        return 0
    import warnings
    warnings.filterwarnings("ignore")  # config notes (ReLoRA merging nothing in 3 steps) are expected here

    cases = [(m, s, e) for m in a.models for s in a.strategies for e in a.engines]
    cache: dict = {}  # a model built once serves both engines
    plans = {c: planned(overrides(*c, a.steps, a.device), cache) for c in cases}
    if a.dry_run:
        print(f"{'model':11s} {'strategy':8s} {'engine':6s} {'plan GiB':>9s}  largest categories")
        for c, p in plans.items():
            top = sorted(p["bytes"].items(), key=lambda kv: -kv[1])[:4]
            print(f"{c[0]:11s} {c[1]:8s} {c[2]:6s} {p['total_bytes'] / 2**30:9.2f}  "
                  + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in top))
        return 0

    from trainer.config import load_config
    from trainer.data import resolve_dataset
    resolve_dataset(load_config(None, overrides(*cases[0], a.steps, a.device)).data)  # built once, not by each child

    results, running, todo = {}, {}, list(cases)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="lrpt-plan-gpu-") as tmp:
        t0 = time.time()
        while todo or running:
            in_use = sum(plans[c]["total_bytes"] for c in running) / 2**30
            fits = [c for c in todo if not running or in_use + plans[c]["total_bytes"] / 2**30 <= a.budget_gib]
            if fits:
                c = fits[0]
                todo.remove(c)
                argv = [sys.executable, __file__, "--case", json.dumps(overrides(*c, a.steps, a.device)),
                        str(Path(tmp) / "-".join(c)), str(a.steps)]
                port = str(29600 + cases.index(c))  # DeepSpeed's process group of one, each its own
                running[c] = subprocess.Popen(argv, env={**env, "MASTER_PORT": port}, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
                continue
            time.sleep(1)
            for c, proc in list(running.items()):
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    del running[c]
                    results[c] = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {"error": err[-600:]}
        print(f"# {len(cases)} cases in {time.time() - t0:.0f} s; seq 256, {plans[cases[0]]['precision']}, "
              f"vocab 32000, {a.steps} steps each, on {a.device}")
    print(f"{'model':11s} {'strategy':8s} {'engine':6s} {'batch':>5s} {'plan GiB':>9s} {'peak GiB':>9s} "
          f"{'plan/peak':>9s}  model states")
    failed = 0
    for c in cases:
        p, r = plans[c], results[c]
        if "error" in r:
            failed += 1
            print(f"{c[0]:11s} {c[1]:8s} {c[2]:6s} failed: {r['error']}")
            continue
        measured = {k.removeprefix("mem/").removesuffix("_bytes"): v for k, v in r["mem"].items()}
        exact = all(measured[k] == p["bytes"][k] for k in measured)
        diff = "" if exact else " " + ", ".join(f"{k} {measured[k]} vs {p['bytes'][k]}" for k in measured
                                                 if measured[k] != p["bytes"][k])
        peak = f"{r['peak'] / 2**30:9.2f} {p['total_bytes'] / r['peak']:9.3f}" if r["peak"] else f"{'n/a':>9s} {'':9s}"
        print(f"{c[0]:11s} {c[1]:8s} {c[2]:6s} {BATCH.get(c[0], 2):5d} {p['total_bytes'] / 2**30:9.2f} {peak}  "
              f"{'= plan' if exact else 'DIFFER:' + diff}")
        failed += not exact
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
