"""`lrpt launch`: the `accelerate launch` command line for one node of a run.

One call per node (SLURM runs one per node with --node-rank $SLURM_NODEID). The command
runs `python -m trainer CONFIG overrides` in every process; the run config is the one
truth about DDP vs DeepSpeed (`distributed.deepspeed`), and this module only chooses the
matching launcher. Conventions that are easy to get wrong (REFERENCE.md):
- `--num_processes` is the total over all machines; Accelerate divides it by --num_machines.
- CPU DDP: `--multi_gpu` with ACCELERATE_USE_CPU=1 (gloo). `--cpu` would start ONE process.
- DeepSpeed: `--use_deepspeed` and never ACCELERATE_USE_CPU (it turns DeepSpeed off; the
  trainer passes gloo itself on CPU); several machines need
  `--deepspeed_multinode_launcher standard` (the default, pdsh, starts one process).
- Rendezvous: static by default (every node knows the head's address and its own rank);
  `--rdzv c10d` for torch's dynamic rendezvous.
- Restarts (`--max-restarts N`): torch elastic restarts a node's workers when one fails. Only
  the c10d rendezvous makes that a restart of the job: a failed node opens a new round, and
  every other node's agent sees it waiting and restarts its own workers into it. A static
  rendezvous restarts only the local node's workers, into the same store, where the dead
  round's keys (rank 0's gloo address) still sit: they connect to a dead address and fail
  again, or hang. So restarts run on c10d, with the head node hosting the store (two "nodes"
  on one host would both claim it) and a fresh store for the workers of every round
  (TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torch's shared one keeps the dead round's keys too).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from trainer.errors import EXIT_USAGE, message
from trainer.resources import resource

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = resource("configs", "accelerate")
DEEPSPEED_CONFIGS = resource("configs", "deepspeed")
DEEPSPEED_CHOICES = ("zero1", "zero2", "zero3")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def free_port() -> int:
    """A port nothing listens on now, for a job's rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_deepspeed(config_path, overrides) -> str:
    from trainer.config import load_config
    return load_config(config_path, overrides).distributed.deepspeed


def compose(config_path, overrides=(), *, nodes: int = 1, node_rank: int = 0, main_ip: str = "127.0.0.1",
            main_port: int = 29500, gpus_per_node: int | None = None, deepspeed: str | None = None,
            cpu: bool | None = None, rdzv: str | None = None, module: str = "trainer",
            max_restarts: int = 0) -> tuple[list[str], dict]:
    """(argv, env): the command for node `node_rank` and the environment changes it needs
    (a value of None means: unset). `deepspeed=None` takes distributed.deepspeed from the
    config; `gpus_per_node=None` is the visible GPU count (1 on CPU); `cpu=None` detects.
    `module` is what every process runs (`python -m MODULE CONFIG overrides`). `rdzv=None` is
    static, or c10d when `max_restarts` > 0 (the module docstring says why)."""
    overrides = list(overrides)
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"nodes={nodes}, node_rank={node_rank}: need nodes >= 1 and 0 <= node_rank < nodes")
    if max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts}: need >= 0")
    rdzv = rdzv or ("c10d" if max_restarts else "static")
    if rdzv == "static" and max_restarts:
        raise ValueError(f"--max-restarts {max_restarts} needs the c10d rendezvous: a static one restarts only "
                         f"this node's workers, into a store that still holds the failed round's addresses")
    if deepspeed in ("none", ""):
        deepspeed = "none"
    if deepspeed is None:
        deepspeed = _config_deepspeed(config_path, overrides)
    elif deepspeed != "none" and deepspeed not in DEEPSPEED_CHOICES:
        raise ValueError(f"deepspeed={deepspeed!r}: expected one of {', '.join(DEEPSPEED_CHOICES)}")
    # The flag wins over the config file; the trainer reads it from the config.
    overrides.append(f"distributed.deepspeed={deepspeed}")
    if cpu is None:
        cpu = not _has_cuda()
    if gpus_per_node is None:
        if cpu:
            gpus_per_node = 1
        else:
            import torch
            gpus_per_node = max(1, torch.cuda.device_count())
    if rdzv not in ("static", "c10d"):
        raise ValueError(f"rdzv={rdzv!r}: expected static or c10d")
    total = nodes * gpus_per_node
    use_ds = deepspeed != "none"

    argv = [sys.executable, "-m", "launcher.agent",  # `accelerate launch`, see agent.py
            "--config_file", str(ACCELERATE_CONFIGS / ("deepspeed.yaml" if use_ds else "ddp.yaml")),
            "--num_machines", str(nodes), "--machine_rank", str(node_rank),
            "--main_process_ip", main_ip, "--main_process_port", str(main_port),
            "--num_processes", str(total), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--rdzv_backend", rdzv, "--max_restarts", str(max_restarts)]
    env: dict[str, str | None] = {}
    if rdzv == "c10d":
        argv += ["--rdzv_conf", f"is_host={'true' if node_rank == 0 else 'false'}"]
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        # Accelerate passes the endpoint to torchrun for several machines only; on one, torchrun
        # would take its default (localhost:29400, shared by every job on the machine). torchrun
        # reads its flags' defaults from PET_* variables.
        env["PET_RDZV_ENDPOINT"] = f"{main_ip}:{main_port}"
    if use_ds:
        argv += ["--use_deepspeed", "--deepspeed_config_file", str(DEEPSPEED_CONFIGS / f"{deepspeed}.json"),
                 "--deepspeed_multinode_launcher", "standard"]
        env["ACCELERATE_USE_CPU"] = None
    else:
        if total > 1:
            argv.append("--multi_gpu")
        if cpu:
            env["ACCELERATE_USE_CPU"] = "1"
    if cpu:
        # Oversubscribed cores make gloo crawl (seconds per step): honour OMP_NUM_THREADS, then
        # the CPUs SLURM gave this task, then the CPUs this process may run on.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, cpus // gpus_per_node))
        argv += ["--num_cpu_threads_per_process", str(threads)]
    argv += ["--module", module]
    if config_path:
        argv.append(str(Path(config_path).resolve()))
    argv += overrides
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or
                   str(ROOT / ".venv" / "torch_extensions"))
    return argv, env


def child_env(env: dict) -> dict:
    out = dict(os.environ)
    for k, v in env.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    # Make `python -m trainer` importable from any working directory.
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    return out


def run(argv: list[str], env: dict) -> int:
    """Run the composed command; SIGTERM/SIGINT are passed on to it. Returns its exit code."""
    proc = subprocess.Popen(argv, env=child_env(env))

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def shell_line(argv: list[str], env: dict) -> str:
    sets = [f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None]
    unsets = [f"-u {k}" for k, v in env.items() if v is None]
    prefix = ["env", *unsets, *sets] if (sets or unsets) else []
    return " ".join(prefix + [shlex.quote(a) for a in argv])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="*", help="[CONFIG.yaml] [key=value ...] as for `lrpt train`")
    p.add_argument("--nodes", type=int, default=1, help="machines in the run")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's rank (0 = head)")
    p.add_argument("--main-ip", default="127.0.0.1", help="the head machine's address")
    p.add_argument("--main-port", type=int, default=29500, help="the head machine's rendezvous port")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="processes per machine (GPUs; on a CPU-only machine: processes). Default: visible GPUs, else 1")
    p.add_argument("--deepspeed", choices=["none", *DEEPSPEED_CHOICES], default=None,
                   help="ZeRO stage (default: distributed.deepspeed from the config)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart every node's processes from the newest complete checkpoint when one fails, "
                   "up to N times (torch elastic, c10d rendezvous)")
    p.add_argument("--rdzv", choices=["static", "c10d"], default=None,
                   help="torch rendezvous backend (default: static, c10d with --max-restarts)")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")


def main(a: argparse.Namespace) -> int:
    items = list(a.config)
    config_path, overrides = (items[0], items[1:]) if items and "=" not in items[0] else (None, items)
    try:
        argv, env = compose(config_path, overrides, nodes=a.nodes, node_rank=a.node_rank, main_ip=a.main_ip,
                            main_port=a.main_port, gpus_per_node=a.gpus_per_node, deepspeed=a.deepspeed,
                            rdzv=a.rdzv, max_restarts=a.max_restarts)
    except ValueError as e:  # a config error is a ValueError too, and keeps its own prefix
        print(message(e), file=sys.stderr)
        return EXIT_USAGE
    if a.print:
        print(shell_line(argv, env))
        return 0
    print(f"[lrpt launch] node {a.node_rank}/{a.nodes}: {shell_line(argv, env)}", file=sys.stderr, flush=True)
    return run(argv, env)
