"""Issue 22's frontier experiment: which method gives the lowest loss for the bytes (or the
seconds) a step may send. Trains every run of the table on the embedded corpus at two sizes,
then tabulates and plots them with `lrpt frontier`.

    python benchmarks/frontier.py --out runs/frontier                       # everything
    python benchmarks/frontier.py --out runs/frontier --sizes micro --only full relora-r16
    python benchmarks/frontier.py --list                                    # the runs and their overrides

Sizes: micro (the micro-* presets, 300 steps x 2,048 tokens) and pico-tiny (the
pico-tiny-*-smoke presets, 200 steps x 512 tokens). Within a size every run sees the same
tokens: the same steps and global batch, two-process runs taking half the batch per process.
ReLoRA merges every 50 (micro, after a 50-step warm start) or 20 steps (pico-tiny): 5 and 10
merges. Dynamics records every merge interval, so the update each one measures is one merged
cycle's (`update PER`); minimal pairs are scored at the end.

Runs (hybrid and adaptive need strategy.full_rank / ranks / rank_budget, issue 22 items 1-2;
where this checkout ignores those keys they are skipped with a line saying so, never trained
as plain ReLoRA under a hybrid label):
  full, relora-r8, relora-r16, relora-r32, switchlora-r16   one process each
  hybrid-layer0     relora r16, layer 0 trained full rank
  hybrid-vod32      relora, ranks 32 on v, o and down (the study's rank-deficient projections), 8 elsewhere
  adaptive-b16      relora, ranks re-chosen at each merge within the bytes of r16
  full-powersgd     full rank, PowerSGD rank 4, 2 processes (`lrpt launch --gpus-per-node 2`)
  relora-diloco     relora r16, DiLoCo (H 25 / 10), 2 processes

A finished run is not trained again and a half-done one resumes (its run.dir), so the script
can be stopped and restarted, and a subset run now and the rest later. For each size it ends
with `lrpt frontier` twice: bytes per step (OUT/SIZE/frontier/) and projected seconds per
step at 100 Mbit/s between 2 processes (OUT/SIZE/frontier-100mbit/). One-process runs are
placed there by the analytic model at 2 processes. Every process runs one thread
(OMP_NUM_THREADS=1), so compute times compare across runs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HYBRID = {"hybrid-layer0": ["strategy.full_rank=[layers.0.*]"],
          "hybrid-vod32": ["strategy.ranks={q: 8, k: 8, v: 32, o: 32, gate: 8, up: 8, down: 32}"]}

# Per size: the preset of each strategy, what every run shares, ReLoRA's merge schedule, the
# batch and DiLoCo's H (a divisor of the merge interval and the warm start, as DiLoCo requires).
SIZES = {
    "micro": dict(presets=dict(full="micro-full", relora="micro-relora", switchlora="micro-switchlora"),
                  common=["train.max_steps=300", "logging.eval_every=50", "logging.dynamics_every=50"],
                  merges=["strategy.warm_start_steps=50", "strategy.reset_every=50", "strategy.restart_warmup=10"],
                  switch=[], batch=16, diloco_h=25),
    "pico-tiny": dict(presets=dict(full="pico-tiny-full-smoke", relora="pico-tiny-relora-smoke",
                                   switchlora="pico-tiny-full-smoke"),
                      common=["train.max_steps=200", "logging.eval_every=50", "logging.dynamics_every=20"],
                      merges=["strategy.reset_every=20"],
                      # No SwitchLoRA preset at this size: micro's knobs, LR 5x full rank's as there.
                      switch=["strategy.name=switchlora", "optimizer.lr=1.5e-3", "strategy.switch_interval0=10"],
                      batch=4, diloco_h=10),
}
COMMON = ["logging.log_every=10", "logging.blimp_every=0", "checkpoint.every=100000", "logging.progress=false",
          "logging.trackers=[]"]


def runs(size: str) -> dict[str, tuple[str, list[str], int]]:
    """name -> (preset, overrides, processes) for one size."""
    s = SIZES[size]
    full, relora, switch = (s["presets"][k] for k in ("full", "relora", "switchlora"))
    common, r16 = s["common"], [*s["common"], *s["merges"], "strategy.rank=16"]
    two = [f"data.batch_size={s['batch'] // 2}"]  # per process: the same global batch
    out = {"full": (full, common, 1)}
    for r in (8, 16, 32):
        out[f"relora-r{r}"] = (relora, [*common, *s["merges"], f"strategy.rank={r}"], 1)
    out["switchlora-r16"] = (switch, [*common, *s["switch"], "strategy.rank=16"], 1)
    for name, extra in HYBRID.items():
        out[name] = (relora, [*r16, *extra], 1)
    out["adaptive-b16"] = (relora, [*r16, "strategy.rank_budget=16"], 1)
    out["full-powersgd"] = (full, [*common, *two, "distributed.comm_hook=powersgd"], 2)
    out["relora-diloco"] = (relora, [*r16, *two, "distributed.sync=diloco",
                                     f"distributed.diloco_inner_steps={s['diloco_h']}",
                                     "distributed.diloco_worker=process"], 2)
    return out


def supported(name: str, preset: str, overrides: list[str]) -> bool:
    """Hybrid and adaptive runs only where this checkout implements their keys: putting layer 0
    at full rank must change the trainable set the analytic model counts (strategy.ranks and
    strategy.rank_budget land with the same change)."""
    if not name.startswith(("hybrid", "adaptive")):
        return True
    from trainer.comm import model_bytes
    from trainer.config import load_config
    from trainer.shapes import model_args

    path = ROOT / "configs/experiments" / f"{preset}.yaml"
    base = [o for o in overrides if not o.startswith(("strategy.full_rank", "strategy.ranks", "strategy.rank_budget"))]
    plain, probe = load_config(path, base), load_config(path, [*base, *HYBRID["hybrid-layer0"]])
    args = model_args(plain.model, plain.data.seq_len, plain.data.embedded_vocab)
    return model_bytes(probe, args)["trainable_bytes"] != model_bytes(plain, args)["trainable_bytes"]


def finished(run: Path, max_steps: int) -> bool:
    from trainer.rundir import RunDir
    recs = RunDir(run).read_metrics() if RunDir(run).is_run() else []
    return any(r.get("step") == max_steps and "val_loss" in r for r in recs)


def command(preset: str, overrides: list[str], nproc: int, run: Path) -> list[str]:
    config = str(ROOT / "configs/experiments" / f"{preset}.yaml")
    args = [config, *COMMON, *overrides, f"run.dir={run}"]
    if nproc == 1:
        return [sys.executable, "-m", "launcher.cli", "train", *args]
    from launcher.launch import free_port
    return [sys.executable, "-m", "launcher.cli", "launch", *args, "--gpus-per-node", str(nproc),
            "--main-port", str(free_port())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/frontier", help="run directories and tables go here, OUT/SIZE/NAME")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these runs only (see --list)")
    ap.add_argument("--list", action="store_true", help="print each run's command and exit")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    unknown = set(a.only or []) - set(runs("micro"))
    if unknown:
        ap.error(f"unknown run(s) {sorted(unknown)}; choose from {list(runs('micro'))}")
    out, failed = Path(a.out).resolve(), []
    for size in a.sizes:
        steps = int(SIZES[size]["common"][0].split("=")[1])  # train.max_steps
        done = []
        for name, (preset, overrides, nproc) in runs(size).items():
            if a.only and name not in a.only:
                continue
            run = out / size / name
            cmd = command(preset, overrides, nproc, run)
            if a.list:
                print(f"{size}/{name}: {shlex.join(cmd)}")
                continue
            if not supported(name, preset, overrides):
                print(f"{size}/{name}: skipped: strategy.full_rank / ranks / rank_budget have no effect in this "
                      f"checkout (issue 22 items 1-2)", flush=True)
                continue
            if not finished(run, steps):
                t0 = time.time()
                print(f"{size}/{name}: training ({nproc} process{'es' * (nproc > 1)})", flush=True)
                log = run.parent / f"{name}.log"
                run.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as f:
                    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                print(f"{size}/{name}: exit {code} after {time.time() - t0:.0f} s (log: {log})", flush=True)
                if code != 0:
                    failed.append(f"{size}/{name}")
                    continue
            done.append(str(run))
        if a.list or not done:
            continue
        for extra, folder in (([], "frontier"), (["--link", "100mbit"], "frontier-100mbit")):
            subprocess.call([sys.executable, "-m", "launcher.cli", "frontier", *done, *extra,
                             "--out", str(out / size / folder)], env=env, cwd=ROOT)
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
