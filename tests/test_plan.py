"""`lrpt plan` and the memory accounting it shares with a run's `mem/` record (trainer/memory.py).

- The activation terms are what autograd keeps: the bytes of every tensor saved for backward
  by a real forward on the CPU, in fp32 and under bf16 autocast, for each strategy and layer
  path (fused, plain, dropout, partial targets, GQA, a frozen head).
- One-process runs' records equal the plan's model-state bytes exactly, in each phase of
  ReLoRA's warm start, with bf16 frozen weights and with SwitchLoRA's optimizer. (2-process
  DDP and ZeRO-1/2 runs: tests/test_dist_strategies.py, test_plan_matches_recorded_memory.)
- `--json`'s schema; the change it proposes fits, and is the cheapest that does.
- llama-7b plans without allocating anything, and its counts follow from its parameters.
- Bad input is one line and exit code 2.
"""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from trainer import memory
from trainer.config import load_config
from trainer.model import Transformer
from trainer.shapes import model_args
from trainer.strategies import build_strategy
from trainer.strategies.lora import LoRALinear

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=micro", "model.num_layers=2", "data.seq_len=16"]


def lrpt_plan(*args, timeout=300):
    """The command in a process of its own, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "launcher.cli", "plan", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def plan_json(capsys, monkeypatch):
    """`lrpt plan ... --json` in this process (no interpreter start per call): its output."""
    from launcher.cli import main

    monkeypatch.chdir(ROOT)

    def run(*args):
        capsys.readouterr()
        assert main(["plan", *map(str, args), "--json"]) == 0
        return json.loads(capsys.readouterr().out)
    return run


# ---------------------------------------------------------------------------------------------
# Activations against autograd's saved tensors

def saved_bytes(model, x, y, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in a forward with loss: the model's
    parameters, buffers and fused [W; A] buffers, and the batch itself, left out."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x, y]}
    skip |= {m._wa.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, LoRALinear)}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


CASES = {
    "full": ["strategy.name=full"],
    "relora": ["strategy.name=relora", "strategy.rank=8"],
    "relora-warm-start": ["strategy.name=relora", "strategy.rank=8", "strategy.warm_start_steps=2"],
    "switchlora": ["strategy.name=switchlora", "strategy.rank=8"],
    "lora-bf16-frozen": ["strategy.name=lora", "strategy.rank=8", "strategy.frozen_dtype=bf16"],
    "lora-dropout": ["strategy.name=lora", "strategy.rank=8", "strategy.dropout=0.1"],
    "lora-qv-gqa-frozen-head": ["strategy.name=lora", "strategy.rank=8", "strategy.targets=[q,v]",
                                "model.num_kv_heads=2", "strategy.train_head=false"],
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_terms_are_what_autograd_saves(case, autocast):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ReLoRA: no merge within max_steps
        cfg = load_config(None, [*TINY, *CASES[case]])
    torch.manual_seed(0)
    model = Transformer(model_args(cfg.model, 16, 96))
    build_strategy(cfg.strategy, 0).apply(model, 0.0, 0)  # step 0: in the warm start where there is one
    batch, seq = 3, 16
    x, y = torch.randint(0, 96, (batch, seq)), torch.randint(0, 96, (batch, seq))
    b = memory.activation_bytes(model, memory.Layout("none", 1, "cpu", autocast), batch, seq)
    # Besides activations and weight casts, forward keeps the log-softmax output (fp32) for
    # backward, and the loss's 4-byte total weight.
    expected = b["activations"] + b["weight_casts"] + 4 * batch * seq * 96 + 4
    assert saved_bytes(model, x, y, autocast) == expected
    if autocast and case in ("full", "relora-warm-start"):
        assert b["weight_casts"] > 0  # the cached bf16 copies of trainable matrices


# ---------------------------------------------------------------------------------------------
# One-process runs: the record's measured bytes are the plan's

RUN = [*TINY, "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000", "data.embedded_vocab=300",
       "logging.log_every=1", "logging.eval_every=0", "logging.eval_batches=1", "logging.progress=false",
       "logging.trackers=[]", "checkpoint.every=100"]


@pytest.mark.parametrize("strategy", [
    ["strategy.name=relora", "strategy.rank=4", "strategy.warm_start_steps=2", "strategy.reset_every=2",
     "strategy.restart_warmup=1", "strategy.frozen_dtype=bf16", "train.max_steps=4"],
    ["strategy.name=switchlora", "strategy.rank=4", "train.max_steps=2"]], ids=["relora-bf16", "switchlora"])
def test_one_process_records_equal_the_plan(strategy, tmp_path, lrpt_cache, monkeypatch, capsys):
    from launcher.cli import main
    from trainer.loop import Trainer

    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(load_config(None, [*RUN, *strategy, f"run.dir={tmp_path / 'run'}"]))
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in recs if "mem/gradients_bytes" in r]
    starts = [0] + [r["step"] for r in recs if r.get("event") == "rewrap"]
    capsys.readouterr()  # the run's console
    assert main(["plan", str(tmp_path / "run"), "train.device=cpu", "--gpu-memory", "8GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    phases = {p["from_step"]: p["bytes"] for p in plan["phases"]}
    assert sorted(phases) == starts and len(measured) == len(starts)
    for rec, start in zip(measured, starts):
        got = {k: rec[f"mem/{k}_bytes"] for k in memory.MEASURED}
        assert got == {k: phases[start][k] for k in memory.MEASURED}, start
    if "strategy.frozen_dtype=bf16" in strategy:  # A lives beside a bf16 W: its rows are copied
        assert measured[1]["mem/fused_copies_bytes"] > 0 and measured[0]["mem/fused_copies_bytes"] == 0
    assert all(r["mem/master_weights_bytes"] == 0 for r in measured)  # no ZeRO: the module is the master


# ---------------------------------------------------------------------------------------------
# The command

KEYS = {"config", "model", "vocab_size", "strategy", "rank", "nodes", "gpus_per_node", "params", "engine",
        "world_size", "data_parallel", "device", "precision", "micro_batch", "seq_len", "activation_checkpointing",
        "from_step", "bytes", "host_bytes", "total_bytes", "phases", "gpu_memory_bytes", "reserve_bytes", "fits",
        "change", "change_total_bytes"}


def test_json_schema_and_a_change_that_fits(plan_json):
    p = plan_json("configs/experiments/relora-130m.yaml", "--gpus-per-node", "8", "--gpu-memory", "12GiB")
    assert set(p) == KEYS
    assert (p["engine"], p["world_size"], p["data_parallel"], p["device"]) == ("ddp", 8, 8, "cuda")
    assert list(p["bytes"]) == list(memory.CATEGORIES) and list(p["host_bytes"]) == list(memory.HOST)
    assert all(isinstance(v, int) and v >= 0 for v in p["bytes"].values())
    # The warm start (full rank, from step 0) and the low-rank phase (from step 5000).
    assert [q["from_step"] for q in p["phases"]] == [0, 5000]
    assert p["total_bytes"] == max(q["total_bytes"] for q in p["phases"])
    persistent = sum(p["bytes"][k] for k in ("frozen_weights", "trainable_weights", "optimizer_states"))
    assert persistent < p["total_bytes"] <= sum(p["bytes"].values())
    assert p["fits"] is False and p["total_bytes"] > p["gpu_memory_bytes"] - p["reserve_bytes"]
    assert p["change"] and p["change_total_bytes"] <= p["gpu_memory_bytes"] - p["reserve_bytes"]
    applied = plan_json("configs/experiments/relora-130m.yaml", *p["change"], "--gpus-per-node", "8",
                        "--gpu-memory", "12GiB")
    assert applied["fits"] is True and applied["change"] is None
    assert applied["total_bytes"] == p["change_total_bytes"]
    text = lrpt_plan("configs/experiments/relora-130m.yaml", "--gpus-per-node", "8", "--gpu-memory", "12GiB")
    assert "does NOT fit" in text.stdout and "smallest change that fits: " + " ".join(p["change"]) in text.stdout


def test_the_change_is_the_cheapest_lever(plan_json, capsys):
    """frozen_dtype=bf16 when it is enough; the largest micro-batch that fits when that is the
    only lever left (full rank, checkpointing on, ZeRO-3 already); none when nothing fits."""
    from launcher.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = ["model.name=llama-1b", "model.vocab_size=32000", "data.seq_len=256", "data.batch_size=8",
                "strategy.name=lora", "strategy.rank=128"]
        cfg = load_config(None, [*lora, "strategy.frozen_dtype=bf16"])
    args = model_args(cfg.model, 256, 32000)
    limit = memory.plan(cfg, args, 1, 1)["total_bytes"] + memory.CUDA_RESERVE
    r = plan_json(*lora, "--gpus-per-node", "1", "--gpu-memory", limit)
    assert r["fits"] is False and r["change"] == ["strategy.frozen_dtype=bf16"]

    batch = ["model.name=llama-130m", "model.vocab_size=32000", "data.seq_len=1024", "data.batch_size=32",
             "strategy.name=full", "train.activation_checkpointing=true", "distributed.deepspeed=zero3"]
    cfg = load_config(None, [*batch, "data.batch_size=16", "train.grad_accum=2"])
    limit = memory.plan(cfg, model_args(cfg.model, 1024, 32000), 1, 1)["total_bytes"] + memory.CUDA_RESERVE
    r = plan_json(*batch, "--gpus-per-node", "1", "--gpu-memory", limit)
    assert r["fits"] is False and r["change"] == ["data.batch_size=16", "train.grad_accum=2"], r["change"]
    capsys.readouterr()
    assert main(["plan", *batch, "--gpus-per-node", "1", "--gpu-memory", "1GiB"]) == 0
    assert "no change among" in capsys.readouterr().out


def test_llama_7b_plans_on_the_meta_device():
    """Nothing is allocated: the planning process stays far below the 27 GB of fp32 weights,
    and the counts are the ZeRO paper's, from the real tensors (fused AdamW: two fp32 moments
    per element and a 4-byte step per tensor; autocast caches a bf16 copy of each matrix)."""
    from trainer.model import count_params

    t0 = time.time()
    code = ("import json, resource, sys; from launcher.cli import main; main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, "plan", "model.name=llama-7b", "model.vocab_size=32000",
                          "data.seq_len=256", "data.batch_size=1", "--gpus-per-node", "8", "--gpu-memory", "80GiB",
                          "--json"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    print(f"llama-7b plan: {time.time() - t0:.1f} s wall")
    p, maxrss_kib = json.loads(out.stdout), int(out.stderr.split()[-1])
    assert maxrss_kib < 3 * 2**20  # under 3 GiB
    psi = count_params(model_args(load_config(None, ["model.name=llama-7b"]).model, 256, 32000))
    assert p["params"] == psi and 6.7e9 < psi < 6.8e9
    b = p["bytes"]
    tensors = 2 + 2 * 32 + 1 + 7 * 32  # embeddings, head, norms, matrices
    assert b["trainable_weights"] == b["gradients"] == b["comm_buffers"] == 4 * psi
    assert b["optimizer_states"] == 8 * psi + 4 * tensors
    assert b["weight_casts"] == 2 * (psi - 32000 * 4096 - 4096 * 65)  # every matrix but the embedding
    assert b["master_weights"] == b["frozen_weights"] == 0 and p["fits"] is False


def test_diloco_state_per_worker_kind(plan_json):
    """DiLoCo per node: DDP over the node's 4 ranks and the anchor and outer momentum (fp32,
    the trainable parameters) sharded over them; per process: no wrapper, both whole."""
    base = ["model.name=llama-130m", "strategy.name=relora", "strategy.rank=64", "distributed.sync=diloco"]
    flags = ["--nodes", "2", "--gpus-per-node", "4", "--gpu-memory", "80GiB"]
    node, process = (plan_json(*base, f"distributed.diloco_worker={w}", *flags) for w in ("node", "process"))
    trainable = node["bytes"]["trainable_weights"]
    assert (node["engine"], node["data_parallel"], process["engine"], process["data_parallel"]) == ("ddp", 4, "none", 1)
    assert process["bytes"]["diloco_state"] == 2 * trainable
    assert node["bytes"]["diloco_state"] == 2 * trainable // 4
    assert node["bytes"]["comm_buffers"] == trainable and process["bytes"]["comm_buffers"] == 0


@pytest.mark.parametrize("args, expected", [
    (["--gpu-memory", "80XB"], "--gpu-memory '80XB': expected a size such as 80GiB"),
    (["--gpu-memory", "0GiB"], "--gpu-memory '0GiB': expected a size"),
    (["--nodes", "0", "--gpu-memory", "80GiB"], "--nodes 0: expected at least 1"),
    (["--gpus-per-node", "0", "--gpu-memory", "80GiB"], "--gpus-per-node 0: expected at least 1"),
    (["no/such.yaml", "--gpu-memory", "80GiB"], "no/such.yaml"),
    (["strategy.rnak=4", "--gpu-memory", "80GiB"], "did you mean 'strategy.rank'"),
])
def test_bad_input_is_one_line(args, expected, capsys):
    from launcher.cli import main

    code = main(["plan", *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == "", err
    assert expected in lines[0]


def test_bad_size_from_the_shell():
    r = lrpt_plan("--gpu-memory", "eighty")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip() == "config error: --gpu-memory 'eighty': expected a size such as 80GiB, 40GB or 81920MiB"


def test_sizes():
    from launcher.plan import parse_size
    assert parse_size("80GiB") == parse_size("80G") == 80 * 2**30
    assert parse_size("40GB") == 40 * 10**9 and parse_size("81920MiB") == 80 * 2**30
    assert parse_size("1.5 TiB") == int(1.5 * 2**40) and parse_size("4096") == 4096


@pytest.mark.timeout(900)  # three interpreters and a training process on a shared 2-core machine
def test_gpu_check_plans_its_cases_and_runs_one_on_a_cpu(lrpt_cache):
    """benchmarks/plan_gpu.py (run by benchmarks/gpu.sh when a GPU is lent): the dry run plans
    its eight cases; one case goes through the whole measuring path on a CPU, where its
    model-state bytes must equal the plan's (the peak is the GPU's to measure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LRPT_CACHE": str(lrpt_cache)}
    script = [sys.executable, "benchmarks/plan_gpu.py"]
    dry = subprocess.run([*script, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    rows = [line.split() for line in dry.stdout.splitlines()[1:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (m, s, e) for m in ("llama-350m", "llama-1b") for s in ("full", "relora") for e in ("none", "zero2"))
    run = subprocess.run([*script, "--models", "micro", "--device", "cpu", "--steps", "2", "--strategies", "relora",
                          "--engines", "none"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].split()[:3] == ["micro", "relora", "none"]
    assert run.stdout.rstrip().endswith("= plan") and "n/a" in run.stdout
