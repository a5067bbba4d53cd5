"""SLURM: the rendered batch script, and real jobs on a local two-node cluster.

The cluster (tests/slurm_cluster.py) is real slurmctld + two slurmd on this host; jobs run
`lrpt launch` per node exactly as on a real cluster, with one process per "node" on CPU.
Multi-process starts cost 10-15 s each here, so each job checks several things.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher import slurm
from trainer import rundir

try:  # the session fixture (tests/ on sys.path, pytest's default "prepend" import mode)
    from slurm_cluster import slurm_cluster  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.slurm_cluster import slurm_cluster  # noqa: F401



@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request):
    """A failed test may leave a job running; cancel it so the next test gets the nodes."""
    yield
    if "slurm_cluster" in request.fixturenames:
        cluster = request.getfixturevalue("slurm_cluster")
        cluster.run(["scancel", "--partition=debug"], check=False, timeout=20)


# ---------------------------------------------------------------------------------------------
# The rendered script (no cluster needed)

def test_render_deepspeed_4x8(tmp_path):
    run_dir = tmp_path / "run"
    text = slurm.render("configs/experiments/relora-130m.yaml", ["strategy.rank=128", "train.seed=7"],
                        nodes=4, gpus_per_node=8, deepspeed="zero2", partition="gpu", time="24:00:00",
                        account="proj", extra_sbatch=["--qos=high"], setup_lines=["module load cuda/12.4"],
                        signal_seconds=240, max_requeues=5, run_dir=run_dir, job_name="relora-130m")
    sbatch = re.findall(r"^#SBATCH (.*)$", text, flags=re.M)
    for line in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                 "--time=24:00:00", "--account=proj", "--qos=high", "--requeue", "--open-mode=append",
                 "--signal=B:USR1@240", "--job-name=relora-130m", f"--output={run_dir}/slurm-%j.out"):
        assert line in sbatch, f"missing #SBATCH {line}:\n{text}"
    # sbatch reads #SBATCH lines only before the first command.
    first_command = min(i for i, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    assert all(i < first_command for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))
    assert "module load cuda/12.4" in text
    # One srun task per node; each node's own shell expands its rank.
    srun = text[text.index("\nsrun "):text.index("srun_pid=")]
    assert "--nodes=4 --ntasks=4 --ntasks-per-node=1" in srun
    assert """'trap "" USR1; exec "$@" --node-rank "$SLURM_NODEID"'""" in srun
    launch = srun[srun.index(" launch "):]
    config = str((Path.cwd() / "configs/experiments/relora-130m.yaml").resolve())
    assert f"launch {config} strategy.rank=128 train.seed=7 run.dir={run_dir} " in launch
    assert "--nodes 4 --gpus-per-node 8 --deepspeed zero2 --max-restarts 3" in launch  # restarts in place by default
    assert '--main-ip "$MAIN_IP" --main-port "$MAIN_PORT"' in launch
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "NodeAddr=" in text
    # Preemption: forward USR1 to the steps, requeue on 85 (or after the signal) below the cap.
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in text
    assert "EXIT_PREEMPTED=85" in text and "MAX_REQUEUES=5" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_render_cpu_quoting_and_cli_dry_run(tmp_path, monkeypatch, capsys):
    text = slurm.render(None, ["data.source=/data/my corpus", "run.dir=/ignored"], nodes=2, gpus_per_node=3,
                        gpus=False, cpus_per_task=4, max_restarts=0, run_dir=tmp_path / "r")
    assert "--max-restarts" not in text[text.index("\nsrun "):]  # the launch line
    assert "--gpus-per-node=" not in text.split("\nset -uo")[0]  # no GPU request on a CPU partition
    assert "#SBATCH --cpus-per-task=4" in text and "--exclusive" not in text
    assert "'data.source=/data/my corpus'" in text and "/ignored" not in text
    assert "--deepspeed" not in text
    with pytest.raises(ValueError):
        slurm.render(None, [], nodes=1, gpus_per_node=1, deepspeed="zero9", run_dir=tmp_path)

    # The CLI: run.dir from the override wins, made absolute; --dry-run writes nothing.
    from launcher import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm, "partition_has_gpus", lambda partition, env=None: None)
    rc = cli.main(["slurm", "submit", "--dry-run", "model.name=micro", "run.dir=runs/x", "--nodes", "4",
                   "--gpus-per-node", "8", "--deepspeed", "zero2", "--max-restarts", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert f"run.dir={tmp_path}/runs/x " in out and "--deepspeed zero2 --max-restarts 5" in out
    assert not (tmp_path / "runs").exists()


def test_default_run_dir_is_absolute_and_timestamped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = slurm.default_run_dir("configs/micro-relora.yaml", None)
    assert d.is_absolute() and d.parent == tmp_path / "runs" and d.name.startswith("micro-relora-")


# ---------------------------------------------------------------------------------------------
# The local cluster

def test_cluster_runs_a_two_node_job(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.submit(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --output={out}
        head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        echo "head $head $(scontrol show node "$head" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')"
        srun bash -c 'echo "task node=$SLURMD_NODENAME rank=$SLURM_NODEID"'
        """))
    info = slurm_cluster.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", out.read_text() if out.exists() else info
    text = out.read_text()
    assert "head n1 127.0.0.1" in text
    assert "task node=n1 rank=0" in text and "task node=n2 rank=1" in text


# A stand-in for `lrpt launch` + the trainer: the same flags and the same process tree
# (accelerate launch -> torch elastic agent -> python workers in their own sessions), so that
# the template's signal path and requeue logic are tested apart from the real trainer.
STANDIN_LRPT = """\
#!{python}
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("verb"); p.add_argument("items", nargs="*")
for f in ("--nodes", "--gpus-per-node", "--node-rank", "--main-port"):
    p.add_argument(f, type=int)
p.add_argument("--main-ip"); p.add_argument("--deepspeed"); p.add_argument("--max-restarts", type=int)
a = p.parse_args()
kv = dict(i.split("=", 1) for i in a.items if "=" in i)
os.environ["ACCELERATE_USE_CPU"] = "1"
# launcher.agent is `accelerate launch` as `lrpt launch` runs it (exit-barrier log made one line)
os.execv(sys.executable, [sys.executable, "-m", "launcher.agent", "--multi_gpu", "--num_machines", str(a.nodes),
         "--machine_rank", str(a.node_rank), "--main_process_ip", a.main_ip,
         "--main_process_port", str(a.main_port), "--num_processes", str(a.nodes * a.gpus_per_node),
         "--mixed_precision", "no", "--dynamo_backend", "no",
         os.path.join(os.path.dirname(__file__), "worker.py"), kv["run.dir"], kv["steps"]])
"""
STANDIN_WORKER = """\
import os, signal, sys, time
import torch, torch.distributed as dist
run_dir, steps = sys.argv[1], int(sys.argv[2])
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
state = os.path.join(run_dir, "step")
start = int(open(state).read()) if os.path.exists(state) else 0
log = open(os.path.join(run_dir, f"rank{rank}.log"), "a")
print(f"start rank={rank} world={world} step={start} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}",
      file=log, flush=True)
open(os.path.join(run_dir, f"running{rank}"), "w").close()
for step in range(start, steps):
    time.sleep(0.25)
    flag = torch.tensor([float(bool(got))])
    dist.all_reduce(flag)  # all ranks stop at the same step
    if flag.item():
        if rank == 0:
            open(state, "w").write(str(step + 1))
        print(f"preempted by {','.join(sorted(set(got))) or 'peer'} at step {step + 1}", file=log, flush=True)
        dist.barrier()
        if rank == 0:
            open(os.path.join(run_dir, "preempted"), "w").write("85")
        sys.exit(int(os.environ.get("LRPT_PREEMPT_EXIT", 85)))
if rank == 0:
    open(state, "w").write(str(steps))
print("done", file=log, flush=True)
dist.destroy_process_group()
"""


def test_template_preemption_signal_path_and_requeue(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what SLURM sends at --signal=B:USR1@T) reaches the python
    workers on both nodes through srun and accelerate launch; they exit 85; the script
    requeues; the requeued job resumes in the same run directory and completes."""
    bin_dir = tmp_path / "standin"
    bin_dir.mkdir()
    (bin_dir / "worker.py").write_text(STANDIN_WORKER)
    fake = bin_dir / "lrpt"
    fake.write_text(STANDIN_LRPT.format(python=sys.executable))
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job, script, log = slurm.submit(None, ["steps=30"], nodes=2, gpus_per_node=1, run_dir=run_dir,
                                    lrpt=str(fake), env=slurm_cluster.env, max_requeues=1)
    assert script == run_dir / "slurm.sbatch" and (run_dir / "slurm.jobs").read_text().split() == [str(job)]
    deadline = time.monotonic() + 90
    while not ((run_dir / "running0").exists() and (run_dir / "running1").exists()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else slurm_cluster.logs()
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    started = time.monotonic() - t0
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    for rank in (0, 1):
        lines = (run_dir / f"rank{rank}.log").read_text().splitlines()
        assert lines[0] == f"start rank={rank} world=2 step=0 restart=0", lines
        assert re.fullmatch(r"preempted by SIGUSR1 at step \d+", lines[1]), lines  # the signal itself
        stopped = int(lines[1].rsplit(" ", 1)[1])
        assert 0 < stopped < 30
        assert lines[2] == f"start rank={rank} world=2 step={stopped} restart=1", lines
        assert lines[3] == "done", lines
    assert "USR1: asking the training processes" in text and "requeue 1 of at most 1" in text
    assert text.count("run finished") == 1
    assert "Traceback" not in text and "srun: error" not in text, text
    print(f"workers up {started:.1f}s after submit; whole preempt+requeue job {time.monotonic() - t0:.1f}s")

    # The status report sees the finished job.
    report = slurm.status(run_dir, env=slurm_cluster.env)
    assert f"job {job}: COMPLETED" in report and "restarts 1" in report


# ---------------------------------------------------------------------------------------------
# End to end with the real trainer: `lrpt slurm submit` -> srun -> `lrpt launch` -> accelerate

def _need_launcher():
    try:
        import launcher.launch  # noqa: F401
    except ImportError as e:
        pytest.skip(f"launcher.launch not available yet: {e}")


# Small and quick: ~1M parameters; a ReLoRA merge every 10 steps, so a resume crosses merges.
# No logging.progress=false: a job's log is a file, which gets the periodic lines and no bar.
TRAIN = ["model.name=micro", "strategy.name=relora", "strategy.rank=4", "strategy.reset_every=10",
         "strategy.restart_warmup=2", "train.max_steps=40", "data.batch_size=4", "data.seq_len=64",
         "logging.log_every=1", "logging.eval_every=0", "logging.eval_batches=2", "logging.tensorboard=false",
         "checkpoint.every=10"]
# How the 2 nodes x 2 processes jobs (the reference and the fault job) synchronise: DiLoCo with
# a worker per node (DDP inside each node, the outer step across them). H divides
# strategy.reset_every=10, so ReLoRA merges at outer syncs and a preemption lands mid-cycle.
SYNC_2X2 = ["distributed.sync=diloco", "distributed.diloco_inner_steps=5", "distributed.diloco_worker=node"]


def _lrpt_submit(cluster, cache: Path, cwd: Path, run_dir: Path, *args: str, procs: int = 1,
                 train: list[str] = TRAIN) -> int:
    """`lrpt slurm submit` as a user types it (sbatch exports this environment to the job)."""
    cmd = [sys.executable, "-m", "launcher.cli", "slurm", "submit", *train, f"run.dir={run_dir}",
           "--nodes", "2", "--gpus-per-node", str(procs), *args]
    r = cluster.run(cmd, cwd=cwd, check=False, env=dict(cluster.env, LRPT_CACHE=str(cache)))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    assert (run_dir / "slurm.sbatch").exists()
    return int(m.group(1))


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    """The uninterrupted run's curve (records a restart redid are dropped)."""
    return {r["step"]: r["loss"] for r in rundir.RunDir(run_dir).read_metrics() if "loss" in r}


def _finish(cluster, job: int, run_dir: Path, timeout: float) -> dict:
    info = cluster.wait(job, timeout=timeout)
    log = run_dir / f"slurm-{job}.out"
    assert info["JobState"] == "COMPLETED", (log.read_text() if log.exists() else "") + cluster.logs()
    return info


def _check_distributed(run_dir: Path, world: int) -> None:
    train = [r for r in rundir.RunDir(run_dir).read_metrics() if "loss" in r]
    assert train and train[-1]["step"] == 40
    assert all(r["world_size"] == world for r in train)  # both nodes' ranks in one job
    # Gradients crossed between the "nodes": every step, or every outer step of DiLoCo (H <= 5).
    assert all(any(r["comm_bytes"] > 0 for r in train[i:i + 5]) for i in range(0, len(train), 5)), train
    assert train[-1]["comm_bytes_total"] >= sum(r["comm_bytes"] for r in train)


def _wait_for(what: str, ok, cluster, job: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), \
            f"waiting for {what}\n" + (log.read_text() if log.exists() else "") + cluster.logs()
        time.sleep(0.1)


def _workers(run_dir: Path) -> dict[int, tuple[int, dict]]:
    """The run's training processes on this host (every "node" is this host), as torch elastic
    started them (`python -u -m trainer ... run.dir=RUN`): {rank: (pid, environment)}."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd[1:4] != [b"-u", b"-m", b"trainer"] or f"run.dir={run_dir}".encode() not in cmd:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue  # not a process, or gone meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = (int(proc.name), env)
    return found


@pytest.fixture(scope="module")
def ddp_run(slurm_cluster, lrpt_cache, tmp_path_factory):
    """One uninterrupted run, 2 nodes x 2 processes: the reference for the fault job below."""
    _need_launcher()
    base = tmp_path_factory.mktemp("slurm-ddp")
    run_dir = base / "run"
    t0 = time.monotonic()
    job = _lrpt_submit(slurm_cluster, lrpt_cache, base, run_dir, procs=2, train=TRAIN + SYNC_2X2)
    _finish(slurm_cluster, job, run_dir, timeout=500)
    print(f"2x2 uninterrupted job: {time.monotonic() - t0:.1f}s")
    return run_dir, job


@pytest.mark.timeout(900)
def test_submit_two_nodes_two_processes(ddp_run, slurm_cluster):
    run_dir, job = ddp_run
    _check_distributed(run_dir, world=4)
    text = (run_dir / f"slurm-{job}.out").read_text()
    assert "\r" not in text and text.count("step 40/40 | loss") == 1, text[-3000:]  # lines, no bar frames
    r = slurm_cluster.run([sys.executable, "-m", "launcher.cli", "slurm", "status", str(run_dir)])
    assert f"job {job}: COMPLETED" in r.stdout and '"step": 40' in r.stdout


@pytest.mark.timeout(600)
def test_submit_two_nodes_deepspeed_zero2(slurm_cluster, lrpt_cache, tmp_path):
    _need_launcher()
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = _lrpt_submit(slurm_cluster, lrpt_cache, tmp_path, run_dir, "--deepspeed", "zero2")
    _finish(slurm_cluster, job, run_dir, timeout=560)
    print(f"2-node DeepSpeed ZeRO-2 job: {time.monotonic() - t0:.1f}s")
    _check_distributed(run_dir, world=2)
    assert "--deepspeed zero2" in (run_dir / "slurm.sbatch").read_text()


@pytest.mark.timeout(1200)
def test_killed_rank_restarts_in_place_then_preempted_requeued_matches_uninterrupted(
        ddp_run, slurm_cluster, lrpt_cache, tmp_path):
    """One 2 nodes x 2 processes job, two faults. Rank 3 (second node) is killed with -9 after
    step 12: every node's processes restart in place (lrpt launch --max-restarts, the job's
    default) from checkpoint 10. Mid-run after that, the USR1 warning: checkpoint, requeue,
    resume. The losses equal the uninterrupted run's step for step."""
    reference, _ = ddp_run
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = _lrpt_submit(slurm_cluster, lrpt_cache, tmp_path, run_dir, procs=2, train=TRAIN + SYNC_2X2)
    log = run_dir / f"slurm-{job}.out"
    _wait_for("step 12", lambda: any(r.get("step", 0) >= 12 for r in _records(run_dir)), slurm_cluster, job, log)
    # Every process got its node's topology from the launcher (LOCAL_WORLD_SIZE, GROUP_RANK).
    workers = _workers(run_dir)
    assert sorted(workers) == [0, 1, 2, 3], workers
    for rank, (_, env) in workers.items():
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["GROUP_WORLD_SIZE"]) == ("4", "2", "2")
        assert (int(env["GROUP_RANK"]), int(env["LOCAL_RANK"])) == divmod(rank, 2)
    os.kill(workers[3][0], signal.SIGKILL)
    killed = time.monotonic()

    def restarted_and_on(step):
        raw = _records(run_dir)
        i = next((i for i, r in enumerate(raw) if r.get("event") == "restart"), None)
        return i is not None and any(r.get("step", 0) >= step for r in raw[i:] if "loss" in r)
    _wait_for("the restart, then step 22", lambda: restarted_and_on(22), slurm_cluster, job, log)
    restart_s = time.monotonic() - killed
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    info = _finish(slurm_cluster, job, run_dir, timeout=500)
    print(f"2x2 job, kill -9 + restart in place + preempt + requeue: {time.monotonic() - t0:.1f}s "
          f"(kill to step 22 after the restart: {restart_s:.1f}s)")
    text = log.read_text()
    assert info["Restarts"] == "1", text  # one requeue: the kill was handled inside the job
    # The restart: a line from the node that lost a rank, naming it and the signal (the other node
    # has one too if its own processes failed before it saw the new round), and one from the trainer.
    lrpt = [line for line in text.splitlines() if line.startswith("[lrpt] ")]
    assert all(re.fullmatch(r"\[lrpt\] node [01]: rank \d (.*); restart 1 of at most 3: every node's processes "
                            r"start again from the newest complete checkpoint", line) for line in lrpt), lrpt
    assert len(lrpt) <= 2 and sum("rank 3 was killed by SIGKILL" in line for line in lrpt) == 1, lrpt
    assert text.count("restart 1 of at most 3: resumed from") == 1, text
    events = [(r["event"], r["step"]) for r in _records(run_dir) if r.get("event") in ("restart", "resume", "preempt")]
    assert [e for e, _ in events] == ["restart", "resume", "preempt", "resume"], events
    assert events[0][1] == events[1][1] in (10, 20) and 22 <= events[2][1] == events[3][1] < 40, events
    # From the restart on, a requested stop looks like one: no tracebacks, no failed step.
    after = text[text.index("restart 1 of at most 3: resumed from"):]
    for crash in ("Traceback", "ChildFailedError", "srun: error", "exit code 1", "FutureWarning"):
        assert crash not in after, after
    assert "launch exited with 0 (preempt signal: 1, preempted file: 1)" in text, text
    assert "preempted: requeue 1 of at most" in text and text.count("run finished") == 1, text
    assert not (run_dir / "preempted").exists()  # removed when the requeued job started
    # Console lines come from global rank 0 only, not once per node; lines, not bar frames.
    assert text.count("done: 40 steps") == 1 and text.count("resumed from") == 2 and "\r" not in text, text
    status = slurm.status(run_dir, env=slurm_cluster.env)
    assert '"event": "resume"' in status.splitlines()[-1] and "(4 in all)" in status, status
    _check_distributed(run_dir, world=4)
    got, want = _losses(run_dir), _losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
