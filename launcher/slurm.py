"""`lrpt slurm submit|status`: render slurm/train.sbatch, submit it, report on the job.

One template covers one node or many, DDP or DeepSpeed: one srun task per node runs
`lrpt launch ... --node-rank $SLURM_NODEID` (expanded on each node), the head node's address
comes from the allocation, and preemption is a USR1 warning that the script turns into a
checkpoint and a requeue (the template's comments say how the signal travels).

The run directory is fixed at submit time and passed as `run.dir=...`, so a requeued job
resumes where it stopped. It holds the rendered script (`slurm.sbatch`), the job's log
(`slurm-<jobid>.out`, appended across requeues) and `slurm.jobs` (one job id per submit).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from trainer import rundir
from trainer.errors import EXIT_PREEMPTED
from trainer.resources import resource

TEMPLATE = resource("slurm", "train.sbatch")
DEEPSPEED_CHOICES = ("zero1", "zero2", "zero3")
SIGNAL_SECONDS = 300  # warning before the time limit: one optimizer step plus a checkpoint
MAX_REQUEUES = 20  # requeues after preemption; a crash never requeues
# Restarts in place after a failure (a dead rank, a node's process killed): torch elastic's, in
# `lrpt launch`, inside the allocation; an unattended job takes a few by default.
MAX_RESTARTS = 3


def lrpt_command() -> str:
    """The `lrpt` of this environment by absolute path: the job needs no activated venv."""
    exe = Path(sys.executable).parent / "lrpt"
    return str(exe) if exe.exists() else (shutil.which("lrpt") or "lrpt")


def default_run_dir(config_path: str | None, job_name: str | None) -> Path:
    return rundir.default_run_dir(job_name or (Path(config_path).stem if config_path else "lrpt"))


def split_run_dir(overrides: list[str]) -> tuple[str | None, list[str]]:
    """The `run.dir=` override (if any) and the other overrides."""
    run_dir, rest = None, []
    for o in overrides:
        if o.split("=", 1)[0].strip() == "run.dir":
            run_dir = o.split("=", 1)[1]
        else:
            rest.append(o)
    return run_dir, rest


def partition_has_gpus(partition: str | None, env: dict | None = None) -> bool | None:
    """Whether the partition's nodes declare GPU GRES (None if sinfo cannot tell)."""
    if not shutil.which("sinfo"):
        return None
    argv = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return "gpu" in r.stdout


def render(config_path: str | None, overrides: list[str] | tuple[str, ...] = (), *, nodes: int = 1,
           gpus_per_node: int = 1, deepspeed: str | None = None, partition: str | None = None,
           time: str | None = None, account: str | None = None, cpus_per_task: int | None = None,
           extra_sbatch: list[str] | tuple[str, ...] = (), setup_lines: list[str] | tuple[str, ...] = (),
           signal_seconds: int = SIGNAL_SECONDS, max_requeues: int = MAX_REQUEUES,
           max_restarts: int = MAX_RESTARTS, run_dir: str | Path, job_name: str | None = None,
           gpus: bool = True, lrpt: str | None = None) -> str:
    """The batch script for one run. `gpus_per_node` is processes per node; `gpus=False`
    requests no GPUs (a CPU partition). `cpus_per_task=None` takes whole nodes (--exclusive).
    `max_restarts` is `lrpt launch --max-restarts`: failures restarted in place, per job start.
    `extra_sbatch` are extra `#SBATCH` options (e.g. "--qos=high"); `setup_lines` run first on
    the batch node (module loads, `source venv/bin/activate`, ...). `lrpt` is the command that
    runs `lrpt launch` (default: this environment's `lrpt`)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes={nodes}, gpus_per_node={gpus_per_node}: both must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts}: need >= 0")
    if deepspeed in ("none", ""):
        deepspeed = None
    if deepspeed is not None and deepspeed not in DEEPSPEED_CHOICES:
        raise ValueError(f"deepspeed={deepspeed!r}: expected one of {', '.join(DEEPSPEED_CHOICES)}")
    run_dir = Path(run_dir).resolve()
    job_name = job_name or run_dir.name
    _, overrides = split_run_dir(list(overrides))

    resources = []
    if gpus:
        resources.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        resources.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
        srun_cpus = f"--cpus-per-task={cpus_per_task}"
    else:
        # Whole nodes, all their memory; the one task per node gets every CPU of its node.
        resources += ["#SBATCH --exclusive", "#SBATCH --mem=0"]
        srun_cpus = '--cpus-per-task="$SLURM_CPUS_ON_NODE"'
    for flag, value in (("partition", partition), ("time", time), ("account", account)):
        if value:
            resources.append(f"#SBATCH --{flag}={value}")
    extra = [o if o.startswith("#SBATCH") else f"#SBATCH {o}" for o in extra_sbatch]

    launch = [lrpt or lrpt_command(), "launch"]
    if config_path:
        launch.append(str(Path(config_path).resolve()))
    launch += [*overrides, f"run.dir={run_dir}", "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
    if deepspeed:
        launch += ["--deepspeed", deepspeed]
    if max_restarts:
        launch += ["--max-restarts", str(max_restarts)]
    what = (f"{nodes} node(s) x {gpus_per_node} {'GPU(s)' if gpus else 'process(es)'}"
            + (f", DeepSpeed {deepspeed}" if deepspeed else ", engine as distributed.deepspeed in the config"))
    values = {
        "description": what,
        "job_name": job_name,
        "nodes": str(nodes),
        "sbatch_resources": "\n".join(resources),
        "sbatch_extra": "\n".join(extra),
        "log_path": str(run_dir / "slurm-%j.out"),
        "signal_seconds": str(int(signal_seconds)),
        "setup": "\n".join(setup_lines),
        "run_dir": shlex.quote(str(run_dir)),
        "exit_preempted": str(EXIT_PREEMPTED),
        "max_requeues": str(int(max_requeues)),
        "srun_cpus": srun_cpus,
        "launch_command": " ".join(shlex.quote(a) for a in launch),
    }
    text = TEMPLATE.read_text()
    missing = set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values)
    if missing:
        raise KeyError(f"{TEMPLATE}: no value for {sorted(missing)}")
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)
    return re.sub(r"\n{3,}", "\n\n", text)  # empty optional blocks leave no holes


def prepare(config_path: str | None, overrides: list[str] | tuple[str, ...] = (), *,
            run_dir: str | Path | None = None, gpus: bool | None = None, env: dict | None = None,
            **kw) -> tuple[Path, str]:
    """The run directory (the `run.dir=` override, else `run_dir`, else runs/<name>-<time>,
    made absolute) and the rendered script. `gpus=None` asks sinfo whether the partition has
    GPUs. Other keyword arguments go to render()."""
    given, overrides = split_run_dir(list(overrides))
    run_dir = Path(given or run_dir or default_run_dir(config_path, kw.get("job_name"))).resolve()
    if gpus is None:
        gpus = partition_has_gpus(kw.get("partition"), env) is not False
    return run_dir, render(config_path, overrides, run_dir=run_dir, gpus=gpus, **kw)


def submit(config_path: str | None, overrides: list[str] | tuple[str, ...] = (), *,
           sbatch_args: list[str] | tuple[str, ...] = (), env: dict | None = None,
           **kw) -> tuple[int, Path, Path]:
    """Render the script into the run directory and `sbatch --parsable` it; returns
    (job_id, script_path, log_path). Keyword arguments as prepare() and render(); `env` is
    the environment for sbatch (and so for the job: sbatch exports it)."""
    run_dir, text = prepare(config_path, overrides, env=env, **kw)
    if not shutil.which("sbatch", path=(env or {}).get("PATH")):
        raise FileNotFoundError("sbatch not found: submit from a SLURM login node (or use --dry-run)")
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "slurm.sbatch"
    script.write_text(text)
    # Submitted from the current directory: the job starts there, so relative paths in the
    # config and overrides mean what they mean to `lrpt train`.
    r = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    job_id = int(r.stdout.strip().split(";")[0])
    with open(run_dir / "slurm.jobs", "a") as f:
        f.write(f"{job_id}\n")
    return job_id, script, run_dir / f"slurm-{job_id}.out"


def job_info(job_id: int | str, env: dict | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once slurmctld has forgotten the job)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           env=env, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


def status(run_dir: str | Path, env: dict | None = None) -> str:
    """The run's latest job (state, restarts, nodes, run time) and its last metrics record."""
    run_dir = Path(run_dir)
    jobs = run_dir / "slurm.jobs"
    lines = [f"run dir: {run_dir.resolve()}"]
    if jobs.exists() and jobs.read_text().split():
        job_id = jobs.read_text().split()[-1]
        info = job_info(job_id, env)
        if info:
            state = info.get("JobState", "?")
            reason = info.get("Reason", "None")
            lines.append(f"job {job_id}: {state}" + (f" ({reason})" if reason not in ("None", "") else "")
                         + f", restarts {info.get('Restarts', '0')}, nodes {info.get('NodeList') or '-'}, "
                         f"run time {info.get('RunTime', '?')}, exit code {info.get('ExitCode', '?')}")
        else:
            lines.append(f"job {job_id}: not known to slurmctld (finished a while ago, or another cluster)")
        lines.append(f"log: {run_dir.resolve() / f'slurm-{job_id}.out'}")
    else:
        lines.append("no job submitted from this run directory (no slurm.jobs)")
    run = rundir.RunDir(run_dir)
    records = run.read_metrics()
    lines.append(f"last metrics: {json.dumps(records[-1])}" if records else "last metrics: none yet")
    # The rebuilt view above drops lifecycle events; the last preempt or resume is what an operator asks about.
    events = [r for r in run.read_raw_metrics() if r.get("event") in rundir.LIFECYCLE]
    if events:
        lines.append(f"last event: {json.dumps(events[-1])} ({len(events)} in all)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI: `lrpt slurm submit ...` and `lrpt slurm status RUN_DIR`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_cmd", required=True)
    s = sub.add_parser("submit", help="render slurm/train.sbatch into the run directory and sbatch it",
                       description="Submit a run: one srun task per node runs `lrpt launch` for its node. "
                       "The run directory is fixed now (run.dir=... or runs/<name>-<time>) so that a "
                       "preempted, requeued job resumes there.")
    s.add_argument("config", nargs="*", metavar="[CONFIG] [key=value]")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (on a CPU partition: processes) per node")
    s.add_argument("--deepspeed", choices=DEEPSPEED_CHOICES, default=None)
    s.add_argument("--partition")
    s.add_argument("--time", help="time limit, e.g. 24:00:00")
    s.add_argument("--account")
    s.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task (default: whole nodes)")
    s.add_argument("--job-name")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run first in the job, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--signal-seconds", type=int, default=SIGNAL_SECONDS,
                   help="warn (USR1) this long before the time limit: checkpoint and requeue")
    s.add_argument("--max-requeues", type=int, default=MAX_REQUEUES, help="requeues after preemption")
    s.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help="restarts in place after a failure (lrpt launch --max-restarts), per job start")
    s.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    st = sub.add_parser("status", help="job state (scontrol) and the last metrics record of a run")
    st.add_argument("run_dir")


def main(a: argparse.Namespace) -> int:
    if a.slurm_cmd == "status":
        print(status(a.run_dir))
        return 0
    items = list(a.config)
    config_path, overrides = (items[0], items[1:]) if items and "=" not in items[0] else (None, items)
    kw = dict(nodes=a.nodes, gpus_per_node=a.gpus_per_node, deepspeed=a.deepspeed, partition=a.partition,
              time=a.time, account=a.account, cpus_per_task=a.cpus_per_task, extra_sbatch=a.sbatch,
              setup_lines=a.setup, signal_seconds=a.signal_seconds, max_requeues=a.max_requeues,
              max_restarts=a.max_restarts, job_name=a.job_name)
    if a.dry_run:
        print(prepare(config_path, overrides, **kw)[1], end="")
        return 0
    job_id, script, log = submit(config_path, overrides, **kw)
    print(f"submitted job {job_id}\nscript: {script}\nlog: {log}\nrun dir: {script.parent}\n"
          f"status: lrpt slurm status {script.parent}")
    return 0
