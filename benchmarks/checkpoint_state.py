"""What a checkpoint costs rank 0's memory and the training loop, under ZeRO-2 on several gloo
processes: the state at scale (issue 20).

    python benchmarks/checkpoint_state.py [--layers 4] [--nproc 4] [--blocks 3] [--steps 4] [--json OUT]

Builds llama-130m widths (hidden 768, ffn 2048, vocab 32000; `--layers` of its 12 decoder
layers), full rank, AdamW, under `lrpt launch --deepspeed zero2`, trains a few steps, then per
rank:
- memory: peak RSS growth during one save over the RSS just before it (the kernel's peak,
  VmHWM, reset with /proc/self/clear_refs before the save), for a synchronous save and for a
  background one (from the call until its write is complete, training paused, so only the
  save's own memory counts: this rank's staged copy plus the writer's);
- stall: blocks of `--steps` optimizer steps with no save, with a synchronous save at their
  start, and with a background save at their start (its completion inside the block, and a
  wait at the end if it is not done), interleaved `--blocks` times; the stall per checkpoint
  is a block's median time minus the no-save block's median: ratios from one run.
The state is fp32 weights plus Adam's two moments: 12 bytes per parameter.

In a checkout of the commit before DCP (5e0c52e; copy this file into its benchmarks/) the
same script measures that format (rank 0 gathers and writes everything; no background saves).
glibc's mmap threshold is fixed (as `lrpt bench` does) so that freed tensors leave RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def worker(argv: list[str]) -> None:
    import gc

    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.ranks import all_reduce_sum

    a = json.loads(os.environ["LRPT_BENCH_ARGS"])
    trainer = Trainer(load_config(None, argv))
    saver = getattr(trainer, "saver", None)  # None: the format before DCP
    rank = trainer.rank
    blocked, depth = [0.0], [0]  # seconds the loop spent inside the checkpoint layer (save, settle, wait)
    by_call = {"save": [0.0], "settle": [0.0], "wait": [0.0]}
    if saver is not None:
        for name in ("save", "settle", "wait"):
            def timed(*args, _fn=getattr(saver, name), _name=name, **kwargs):
                depth[0] += 1
                t = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
                    if not depth[0]:  # save calls wait: count the outermost call only
                        blocked[0] += time.perf_counter() - t
                        by_call[_name][0] += time.perf_counter() - t
            setattr(saver, name, timed)

    def step():
        k = trainer.state.step + 1
        loss, _ = trainer._train_step(k)
        trainer.state.step = k
        if saver is None:
            all_reduce_sum([loss], "cpu")
        else:
            _, done, failed = all_reduce_sum([loss, *saver.flags()], "cpu")
            saver.settle(done, failed)

    def save(background: bool, wait: bool):
        if saver is None:
            return trainer.save_checkpoint()
        saver.background = background
        saver.save(trainer.state_dict(), trainer.state.step)
        if wait:
            saver.wait()

    def barrier():
        if dist.is_initialized():
            all_reduce_sum([0.0], "cpu")

    for _ in range(2):  # warm-up: optimizer state exists, buffers allocated
        step()
    kinds = ["sync"] if saver is None else ["sync", "async"]
    memory = {}
    for kind in kinds:
        gc.collect()
        barrier()
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        save(background=kind == "async", wait=True)
        memory[kind] = {"growth_bytes": _status("VmHWM") - base, "seconds": time.perf_counter() - t0,
                        "after_bytes": _status("VmRSS") - base}  # background saves keep their staging copy
        step()
    blocks = {k: [] for k in ["none", *kinds]}
    calls = {k: [] for k in kinds}
    parts = {k: [] for k in kinds}
    for _ in range(a["blocks"]):
        for kind in blocks:
            barrier()
            blocked[0] = 0.0
            for v in by_call.values():
                v[0] = 0.0
            t0 = time.perf_counter()
            if kind != "none":
                save(background=kind == "async", wait=False)
            for _ in range(a["steps"]):
                step()
            if saver is not None:
                saver.wait()  # a write still in flight at the end of the block: part of the stall
            blocks[kind].append(time.perf_counter() - t0)
            if kind != "none":
                calls[kind].append(blocked[0] if saver is not None else blocks[kind][-1] - blocks["none"][-1])
                parts[kind].append({k: v[0] for k, v in by_call.items()})
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    out = {"rank": rank, "world": trainer.world, "params": params, "state_bytes": 12 * params,
           "memory": memory, "blocks_s": blocks, "save_call_s": calls, "blocked_parts_s": parts}
    Path(a["out"], f"rank{rank}.json").write_text(json.dumps(out))
    trainer.accelerator.end_training()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default="")
    ap.add_argument("--run-dir", default="/tmp/lrpt-bench-checkpoint")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from launcher.launch import child_env, compose, free_port

    import shutil
    shutil.rmtree(a.run_dir, ignore_errors=True)
    out = Path(a.run_dir + "-out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = ["model.name=llama-130m", "model.vocab_size=32000", f"model.num_layers={a.layers}", "data.seq_len=64", "data.batch_size=1",
                 "data.embedded_sentences=2000", "data.embedded_vocab=300", "logging.progress=false",
                 "logging.tensorboard=false", "logging.eval_every=0", "logging.eval_batches=1",
                 "checkpoint.keep=2", "checkpoint.every=1000000", "distributed.timeout_s=1800",
                 f"run.dir={a.run_dir}"]
    argv, env = compose(None, overrides, gpus_per_node=a.nproc, main_port=free_port(), deepspeed="zero2",
                        module="benchmarks.checkpoint_state")
    env = child_env({**env, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
                     "LRPT_BENCH_WORKER": "1", "LRPT_BENCH_ARGS": json.dumps({**vars(a), "out": str(out)})})
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit((proc.stdout + proc.stderr)[-4000:])
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    r0 = ranks[0]
    share = r0["state_bytes"] / r0["world"]
    med = {k: statistics.median(v) for k, v in r0["blocks_s"].items()}
    row = {"params": r0["params"], "world": r0["world"], "state_bytes": r0["state_bytes"], "state_per_rank": share,
           "rank0_growth": {k: v["growth_bytes"] for k, v in r0["memory"].items()},
           "rank0_growth_over_share": {k: v["growth_bytes"] / share for k, v in r0["memory"].items()},
           "max_rank_growth": {k: max(r["memory"][k]["growth_bytes"] for r in ranks) for k in r0["memory"]},
           "rank0_kept_after": {k: v["after_bytes"] for k, v in r0["memory"].items()},
           "save_alone_s": {k: v["seconds"] for k, v in r0["memory"].items()},
           "block_median_s": med, "stall_s": {k: med[k] - med["none"] for k in med if k != "none"},
           "blocked_s": {k: statistics.median(v) for k, v in r0["save_call_s"].items()},
           "blocked_parts_s": {k: {c: statistics.median(p[c] for p in v) for c in v[0]} if v and v[0] else {}
                               for k, v in r0["blocked_parts_s"].items()}}
    if "async" in row["stall_s"]:
        row["async_over_sync"] = {"blocked": row["blocked_s"]["async"] / row["blocked_s"]["sync"],
                                  "block_time": row["stall_s"]["async"] / row["stall_s"]["sync"]}
    text = json.dumps(row, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    if os.environ.get("LRPT_BENCH_WORKER"):
        from trainer.errors import exit_process
        worker(sys.argv[1:])
        exit_process(0)
    main()
