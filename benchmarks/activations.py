"""The memory plan's activation estimate against what a CPU process really holds.

Each case trains a model of a named size's widths cut to 2 layers (vocabulary 32000) in a
fresh process, fp32 on the CPU, one step to create the optimizer state and then a measured
step, with glibc's mmap threshold fixed low (LIVE_RSS) so that RSS follows live tensors. Two
figures per case, both growth over the RSS before the measured step:
  retained  after forward, before backward: what forward keeps for backward, against the
            plan's `activations` (less the block that checkpointing recomputes in backward)
            plus the log-softmax output forward keeps (4 bytes x tokens x vocabulary)
  peak      the step's peak (VmHWM, reset before the step), against the plan's transient part
            of `total_bytes` (the larger of the start and the end of backward)

    python benchmarks/activations.py [--models llama-130m llama-1b] [--seqs 256 1024] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


# glibc hands blocks of 64 KiB and more straight back to the kernel when freed, and trims the
# heap: RSS then counts live tensors to within a few pages. `lrpt bench` uses 4 MiB for speed;
# here the heap's free chunks from the first step (gradients of 2-4 MiB matrices) would hide
# up to 30 MiB of the second step's growth (llama-130m widths, seq 256).
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def overrides(model: str, seq: int, batch: int, strategy: str, ckpt: bool) -> list[str]:
    return [f"model.name={model}", "model.num_layers=2", "model.vocab_size=32000", f"data.seq_len={seq}",
            f"data.batch_size={batch}", f"strategy.name={strategy}", "strategy.rank=128",
            "strategy.warm_start_steps=0", f"train.activation_checkpointing={str(ckpt).lower()}",
            "train.device=cpu"]


def case(over: list[str]) -> dict:
    """One measured step in this process; the plan's figures beside it."""
    from trainer import memory
    from trainer.config import load_config
    from trainer.model import build_model
    from trainer.strategies import build_strategy

    cfg = load_config(None, over)
    torch.manual_seed(0)
    args, model = build_model(cfg, 32000)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    strategy = build_strategy(cfg.strategy, cfg.train.seed)
    opt = strategy.make_optimizer(strategy.apply(model, 0.0, 0), cfg.optimizer)
    x, y = (torch.randint(0, args.vocab_size, (cfg.data.batch_size, cfg.data.seq_len)) for _ in range(2))

    def step():
        loss = model(x, y)
        yield
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in step():  # the optimizer state exists from here on
        pass
    base = rss()
    reset_peak()
    run = step()
    next(run)
    retained = rss() - base
    for _ in run:
        pass
    measured_peak = peak() - base
    p = memory.plan(cfg, args)
    b = p["bytes"]
    persistent = sum(b[k] for k in ("frozen_weights", "trainable_weights", "fused_copies", "master_weights",
                                    "optimizer_states", "diloco_state", "weight_casts", "comm_buffers"))
    # After forward the recomputed block (checkpointing) is not there yet; the log-softmax output is.
    act = memory.activation_bytes(model, memory.layout_of(cfg), cfg.data.batch_size, cfg.data.seq_len,
                                  cfg.train.activation_checkpointing)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return dict(plan_retained=act["activations"] - act["_recompute"] + 4 * tokens * args.vocab_size,
                retained=retained, plan_peak=p["total_bytes"] - persistent, peak=measured_peak,
                activations=b["activations"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-130m", "llama-1b"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--strategies", nargs="+", default=["full", "relora"])
    ap.add_argument("--checkpointing", action="store_true", help="also each case with activation checkpointing")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child: one case, JSON on stdout
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(json.loads(a.case))))
        return 0
    env = {**os.environ, **LIVE_RSS}
    print(f"{'widths':11s} {'seq':>5s} {'strategy':8s} {'ckpt':>4s} | {'retained MiB':>12s} {'plan':>8s} {'err':>6s} "
          f"| {'step peak MiB':>13s} {'plan':>8s} {'err':>6s}")
    for model in a.models:
        for seq in a.seqs:
            for strategy in a.strategies:
                for ckpt in ([False, True] if a.checkpointing else [False]):
                    over = overrides(model, seq, a.batch, strategy, ckpt)
                    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(over)], env=env,
                                         capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-2000:], file=sys.stderr)
                        return 1
                    r = json.loads(out.stdout.splitlines()[-1])
                    mib = lambda v: v / 2**20  # noqa: E731
                    print(f"{model:11s} {seq:5d} {strategy:8s} {'yes' if ckpt else 'no':>4s} | "
                          f"{mib(r['retained']):12.1f} {mib(r['plan_retained']):8.1f} "
                          f"{100 * (r['plan_retained'] / r['retained'] - 1):+5.1f}% | {mib(r['peak']):13.1f} "
                          f"{mib(r['plan_peak']):8.1f} {100 * (r['plan_peak'] / r['peak'] - 1):+5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
