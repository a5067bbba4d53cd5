"""`lrpt plan`: whether a run fits its GPUs' memory, what takes the memory, and when it does
not fit, the smallest change that makes it fit. It takes `lrpt launch`'s topology flags and
computes with trainer/memory.py, the accounting a run's `mem/` record uses, from the model
built on the meta device: nothing is allocated, so llama-7b plans on any machine.

The change is searched among four levers, cheapest first: `strategy.frozen_dtype=bf16`
(halves a low-rank strategy's frozen W), a higher ZeRO stage (zero1, zero2: the same bytes on
the wire; zero3 last), `train.activation_checkpointing=true` (about one more forward pass) and
a smaller micro-batch (`data.batch_size`, with `train.grad_accum` raised to keep the tokens per
step). One lever before two, two before three; the micro-batch is the largest that fits.
"""
from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

from trainer.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,  # as SLURM's --mem: binary
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)


def parse_size(text: str) -> int:
    """'80GiB', '40GB', '81920MiB', '80G' (binary, as SLURM's --mem) -> bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 40GB or 81920MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def resolve(items: list[str]):
    """(config, model args, source) for `[CONFIG | RUN_DIR] [key=value ...]`. A run directory
    plans the model it built (model.json); a config the one it would build: vocabulary from
    model.vocab_size, a prepared data directory's tokenizer, model.init_from's config, the
    named size's (32000 for llama-*) or the embedded corpus's, in that order."""
    from trainer.config import load_config
    from trainer.rundir import RunDir
    from trainer.shapes import SIZES, ModelArgs, model_args

    path, overrides = (items[0], items[1:]) if items and "=" not in items[0] else (None, items)
    run = RunDir(path) if path and Path(path).is_dir() else None
    if run is not None and not run.config.is_file():
        raise FileNotFoundError(f"{path!r} is neither a config file nor a run directory (no config.yaml)")
    cfg = load_config(run.config if run else path, overrides)
    if run is not None and run.model_json.is_file():
        return cfg, ModelArgs(**json.loads(run.model_json.read_text())), overrides
    if cfg.model.init_from:
        from trainer.hf import model_args_from_hf
        return cfg, model_args_from_hf(cfg.model.init_from, max_seq_len=cfg.data.seq_len), overrides
    index = Path(cfg.data.source, "index.json")
    vocab = (cfg.model.vocab_size or (json.loads(index.read_text())["vocab_size"] if index.is_file() else 0)
             or SIZES[cfg.model.name].get("vocab_size") or cfg.data.embedded_vocab)
    return cfg, model_args(cfg.model, cfg.data.seq_len, vocab_size=vocab), overrides


def _levers(cfg, plan: dict) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each lever that applies to `cfg`, cheapest first."""
    out = []
    if cfg.strategy.frozen_dtype != "bf16" and plan["bytes"]["frozen_weights"] and cfg.strategy.name != "full":
        out.append(("frozen_dtype", ["strategy.frozen_dtype=bf16"]))
    # ZeRO-3 last: it gathers frozen W every step (no communication saved) and cannot re-wrap
    # (ReLoRA's warm start), and its figures here are approximate.
    stages = ["none", "zero1", "zero2"] + (["zero3"] if len(plan["phases"]) == 1 else [])
    if cfg.distributed.deepspeed in stages:
        out += [(s, [f"distributed.deepspeed={s}"]) for s in stages[stages.index(cfg.distributed.deepspeed) + 1:]]
    if not cfg.train.activation_checkpointing:
        out.append(("checkpointing", ["train.activation_checkpointing=true"]))
    return out


def _batches(cfg) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) below the current one with the same sequences per step."""
    b, k = cfg.data.batch_size, cfg.train.grad_accum
    return [(c, b * k // c) for c in range(b - 1, 0, -1) if (b * k) % c == 0]


def smallest_fit(path, overrides, args, nodes, gpus, limit, base_plan, cache) -> tuple[list[str], dict] | None:
    """The cheapest set of changes whose plan fits in `limit` bytes: (overrides, plan)."""
    from trainer import memory
    from trainer.config import load_config

    def attempt(changes):
        try:
            with warnings.catch_warnings():  # the config's warnings were shown once already
                warnings.simplefilter("ignore")
                cfg = load_config(path, [*overrides, *changes])
        except ConfigError:  # e.g. ZeRO with DiLoCo: not a change this run can make
            return None
        p = memory.plan(cfg, args, nodes, gpus, cache=cache)
        return p if p["total_bytes"] <= limit else None

    def combos(n):
        for combo in itertools.combinations(levers, n):
            if sum(name.startswith("zero") for name, _ in combo) <= 1:  # one ZeRO stage at a time
                yield [kv for _, kvs in combo for kv in kvs]

    cfg = load_config(path, overrides)
    levers = _levers(cfg, base_plan)
    for n in range(1, len(levers) + 2):  # n levers, the micro-batch counting as one
        for changes in combos(n):
            if p := attempt(changes):
                return changes, p
        for changes in combos(n - 1):
            for b, k in _batches(cfg):  # the largest micro-batch that fits
                tried = [*changes, f"data.batch_size={b}", f"train.grad_accum={k}"]
                if p := attempt(tried):
                    return tried, p
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


LABELS = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights",
          "fused_copies": "fused [W;A] copies", "master_weights": "fp32 master copies",
          "gradients": "gradients", "optimizer_states": "optimizer states",
          "comm_buffers": "DDP buckets / ZeRO buffers", "diloco_state": "DiLoCo anchor + momentum",
          "weight_casts": "weight casts (autocast)", "activations": "activations",
          "logits_and_loss": "logits and loss (peak)"}


def format_plan(r: dict) -> str:
    engine = {"none": "no data-parallel wrapper", "ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2",
              "zero3": "ZeRO-3 (approximate)"}[r["engine"]]
    where = "GPU" if r["device"] == "cuda" else "process"
    lines = [f"plan: {r['model']} ({r['params'] / 1e9:.2f}B parameters, vocab {r['vocab_size']}), {r['strategy']}"
             f"{' r=' + str(r['rank']) if r['strategy'] != 'full' else ''}, {engine} over {r['data_parallel']} "
             f"of {r['world_size']} {where}s ({r['nodes']} x {r['gpus_per_node']})",
             f"micro-batch {r['micro_batch']} x {r['seq_len']} tokens, {r['precision']}, activation checkpointing "
             f"{'on' if r['activation_checkpointing'] else 'off'}; bytes per {where}"
             + (f" from step {r['from_step']} (the phase that needs the most):" if len(r["phases"]) > 1 else ":")]
    lines += [f"  {LABELS[k]:28s}{gib(v)}" for k, v in r["bytes"].items() if v]
    reserve = f" less {gib(r['reserve_bytes']).strip()} for the CUDA context" if r["reserve_bytes"] else ""
    lines.append(f"  {'total (peak of a step)':28s}{gib(r['total_bytes'])} of {gib(r['gpu_memory_bytes']).strip()}"
                 f"{reserve}: {'fits' if r['fits'] else 'does NOT fit'}")
    if len(r["phases"]) > 1:  # ReLoRA's warm start trains full rank: its own total
        lines += [f"  from step {p['from_step']}: total {gib(p['total_bytes']).strip()}, trainable "
                  f"{gib(p['bytes']['trainable_weights']).strip()}" for p in r["phases"]]
    host = {"candidate_store": "SwitchLoRA's candidate store up to",
            "host_fused_copies": "[W; A] buffers left behind by the move to the GPU"}
    for k, v in r["host_bytes"].items():
        if v:
            lines.append(f"host memory per process: {host[k]} {gib(v).strip()}")
    if not r["fits"]:
        if r["change"]:
            lines.append(f"smallest change that fits: {' '.join(r['change'])} (total {gib(r['change_total_bytes']).strip()})")
        else:
            lines.append("no change among frozen_dtype, ZeRO stage, activation checkpointing and micro-batch fits: "
                         "more GPUs, more memory per GPU or a smaller model")
    return "\n".join(lines)


def main(a) -> int:
    from trainer import memory

    if a.nodes < 1:
        raise ConfigError(f"--nodes {a.nodes}: expected at least 1")
    gpus = a.gpus_per_node
    if gpus is None:
        import torch
        gpus = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    if gpus < 1:
        raise ConfigError(f"--gpus-per-node {gpus}: expected at least 1")
    items = list(a.config)
    if a.deepspeed:  # the flag wins over the config, as for `lrpt launch`
        items.append(f"distributed.deepspeed={a.deepspeed}")
    cfg, args, overrides = resolve(items)
    path = items[0] if items and "=" not in items[0] else None
    if path and Path(path).is_dir():
        path = str(Path(path) / "config.yaml")
    if a.gpu_memory:
        capacity = parse_size(a.gpu_memory)
    else:
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--gpu-memory: no GPU here to read it from; give the memory per GPU, e.g. 80GiB")
        capacity = torch.cuda.get_device_properties(0).total_memory
    cache: dict = {}
    r = memory.plan(cfg, args, a.nodes, gpus, cache=cache)
    reserve = memory.CUDA_RESERVE if r["device"] == "cuda" else 0
    limit = capacity - reserve
    r = dict(config=items[0] if path else None, model=cfg.model.name, vocab_size=args.vocab_size,
             strategy=cfg.strategy.name, rank=cfg.strategy.rank, nodes=a.nodes, gpus_per_node=gpus, **r,
             gpu_memory_bytes=capacity, reserve_bytes=reserve, fits=r["total_bytes"] <= limit,
             change=None, change_total_bytes=None)
    if not r["fits"]:
        found = smallest_fit(path, overrides, args, a.nodes, gpus, limit, r, cache)
        if found:
            r["change"], r["change_total_bytes"] = found[0], found[1]["total_bytes"]
    print(json.dumps(r, indent=1) if a.json else format_plan(r))
    return 0


def add_arguments(p) -> None:
    from launcher.launch import DEEPSPEED_CHOICES
    p.add_argument("config", nargs="*", metavar="[CONFIG|RUN_DIR] [key=value]",
                   help="a config and overrides as for `lrpt launch`, or a run directory (its model as built)")
    p.add_argument("--nodes", type=int, default=1, help="machines in the run")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per machine (processes with train.device=cpu). Default: visible GPUs, else 1")
    p.add_argument("--deepspeed", choices=["none", *DEEPSPEED_CHOICES], default=None,
                   help="ZeRO stage (default: distributed.deepspeed from the config)")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="memory per GPU: 80GiB, 40GB, 81920MiB (default: the visible GPU's)")
    p.add_argument("--json", action="store_true", help="one JSON object: bytes per category, total, fits, change")
