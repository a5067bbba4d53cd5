"""Launchers. The `accelerate launch` command lines that `lrpt launch` composes, checked against
Accelerate's own parser and validation without starting any process; then real launches:
restarts across two "nodes" on this host, users' own `accelerate launch` and torchrun, one exit
path for a failed process, and what the console shows on a terminal and in a file."""
from __future__ import annotations

import re

import pytest

from launcher import launch


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_cpu_ddp_single_node():
    argv, env = launch.compose(None, ["train.max_steps=5"], nodes=1, gpus_per_node=2, deepspeed="none", cpu=True)
    assert _flag(argv, "--num_processes") == "2" and "--multi_gpu" in argv
    assert "--cpu" not in argv and "--use_deepspeed" not in argv  # --cpu would start ONE process
    assert env["ACCELERATE_USE_CPU"] == "1"
    assert argv[argv.index("--module") + 1:] == ["trainer", "train.max_steps=5", "distributed.deepspeed=none"]


def test_deepspeed_multinode_on_gpus():
    argv, env = launch.compose("cfg.yaml", ["a.b=1"], nodes=2, node_rank=1, main_ip="10.0.0.1", main_port=1234,
                               gpus_per_node=4, deepspeed="zero2", cpu=False)
    assert _flag(argv, "--num_processes") == "8"  # the total over machines
    assert _flag(argv, "--num_machines") == "2" and _flag(argv, "--machine_rank") == "1"
    assert _flag(argv, "--main_process_ip") == "10.0.0.1" and _flag(argv, "--main_process_port") == "1234"
    assert "--use_deepspeed" in argv and "--multi_gpu" not in argv
    assert _flag(argv, "--deepspeed_config_file").endswith("configs/deepspeed/zero2.json")
    assert _flag(argv, "--deepspeed_multinode_launcher") == "standard"
    assert env["ACCELERATE_USE_CPU"] is None  # unset: it would silently turn DeepSpeed off
    assert argv[-2:] == ["a.b=1", "distributed.deepspeed=zero2"] and argv[-3].endswith("cfg.yaml")


def test_deepspeed_stage_comes_from_the_config_when_not_given(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("distributed: {deepspeed: zero1}\n")
    argv, _ = launch.compose(cfg, [], gpus_per_node=2, cpu=True)
    assert _flag(argv, "--deepspeed_config_file").endswith("zero1.json")
    argv, _ = launch.compose(cfg, ["distributed.deepspeed=none"], gpus_per_node=2, cpu=True)
    assert "--use_deepspeed" not in argv


def test_rendezvous_restarts_and_bad_values(capsys):
    argv, env = launch.compose(None, [], nodes=2, node_rank=0, gpus_per_node=1, deepspeed="none", cpu=True)
    assert _flag(argv, "--rdzv_backend") == "static" and _flag(argv, "--max_restarts") == "0"
    assert "--rdzv_conf" not in argv and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env
    # Restarts run on c10d; the head node (rank 0) hosts the store, and each round's workers get a fresh one.
    for nodes, rank in ((2, 0), (2, 1), (1, 0)):
        argv, env = launch.compose(None, [], nodes=nodes, node_rank=rank, main_ip="10.0.0.1", main_port=1234,
                                   gpus_per_node=1, deepspeed="none", cpu=True, max_restarts=3)
        assert _flag(argv, "--rdzv_backend") == "c10d" and _flag(argv, "--max_restarts") == "3"
        assert _flag(argv, "--rdzv_conf") == f"is_host={'true' if rank == 0 else 'false'}"
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        # On one machine too the rendezvous is at --main-port, not torchrun's shared default 29400.
        assert env["PET_RDZV_ENDPOINT"] == "10.0.0.1:1234"
    with pytest.raises(ValueError, match="needs the c10d rendezvous"):
        launch.compose(None, [], nodes=2, gpus_per_node=1, deepspeed="none", cpu=True, rdzv="static", max_restarts=1)
    with pytest.raises(ValueError):
        launch.compose(None, [], nodes=2, node_rank=2, deepspeed="none", cpu=True)
    with pytest.raises(ValueError):
        launch.compose(None, [], deepspeed="zero4", cpu=True)
    from launcher.cli import main

    assert main(["launch", "--nodes", "2", "--node-rank", "2", "--deepspeed", "none", "--print"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nodes=2, node_rank=2") and len(err.splitlines()) == 1


@pytest.mark.parametrize("deepspeed,nodes,restarts", [("none", 1, 0), ("none", 2, 0), ("zero2", 2, 2), ("zero3", 1, 0)])
def test_accelerate_accepts_the_command(deepspeed, nodes, restarts):
    """Accelerate's parser and validation take our flags and our --config_file as they are."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv, env = launch.compose("c.yaml", ["x=1"], nodes=nodes, gpus_per_node=2, deepspeed=deepspeed, cpu=True,
                               max_restarts=restarts)
    args = launch_command_parser().parse_args(argv[3:])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == 2 * nodes and args.num_machines == nodes
    assert args.max_restarts == restarts and args.rdzv_backend == ("c10d" if restarts else "static")
    assert bool(args.use_deepspeed) == (deepspeed != "none")
    assert bool(args.multi_gpu) == (deepspeed == "none")
    assert args.module and args.training_script == "trainer"


def test_lrpt_launch_print(capsys):
    from launcher.cli import main

    assert main(["launch", "train.max_steps=3", "--nodes", "2", "--node-rank", "1", "--main-ip", "10.1.1.1",
                 "--gpus-per-node", "2", "--deepspeed", "zero1", "--print"]) == 0
    out = capsys.readouterr().out
    assert "launcher.agent" in out and "--machine_rank 1" in out and "zero1.json" in out
    assert "train.max_steps=3" in out


def test_agent_logs_the_exit_barrier_race_as_one_line():
    """torch elastic's own logger, its own record (api.py's `_exit_barrier`), through our filter:
    one warning line with the error's first line, no traceback; other records untouched."""
    import io
    import logging

    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.agent.server import api

    from launcher.agent import ExitBarrierOneLine

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(api.__name__)
    keep_filters, keep_propagate = list(log.filters), log.propagate
    log.addHandler(handler), log.addFilter(ExitBarrierOneLine())
    log.propagate = False
    try:
        try:
            raise DistNetworkError("failed to recv, got 0 bytes\nException raised from recvBytes at ...")
        except DistNetworkError:
            log.exception("Error waiting on exit barrier. Elapsed: %s seconds", 0.01)
        try:
            raise ValueError("something else")
        except ValueError:
            log.exception("Some other failure")
    finally:
        log.removeHandler(handler)
        log.filters[:] = keep_filters
        log.propagate = keep_propagate
    first, *rest = stream.getvalue().splitlines()
    assert first == ("WARNING exit barrier: DistNetworkError: failed to recv, got 0 bytes (local workers had "
                     "finished; the exit code is theirs)")
    assert rest[0] == "ERROR Some other failure" and "Traceback" in rest[1] and "ValueError" in rest[-1]


def test_the_cause_is_the_first_failure_not_the_processes_torch_stopped(tmp_path, monkeypatch):
    """torch elastic's own failure records (ProcessFailure), booked as its process context does:
    the process found dead first (killed by -9), then the node's other one that the agent stopped
    with SIGTERM, in the same second; a process whose error file the trainer wrote
    (trainer.errors.record_for_launcher)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launcher.agent import cause
    from trainer.errors import ConfigError, record_for_launcher

    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="<N/A>")
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file="<N/A>")
    stopped.timestamp = killed.timestamp
    assert cause({3: killed, 2: stopped}) == "rank 3 was killed by SIGKILL"

    def failed(error: Exception, rank: int) -> ProcessFailure:
        error_file = tmp_path / f"error{rank}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        try:
            raise error
        except type(error) as e:
            record_for_launcher(e)
        return ProcessFailure(local_rank=rank, pid=12, exitcode=2, error_file=str(error_file))
    assert cause({0: failed(ConfigError("unknown config key 'a.b'"), 0)}) == \
        "rank 0 exited with 2: ConfigError: unknown config key 'a.b'"
    # Found dead at the same poll, the process that lost its peer is not the cause, though booked first.
    lost = failed(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"), 0)
    assert cause({2: lost, 3: killed}) == "rank 3 was killed by SIGKILL"
    assert cause({0: ProcessFailure(local_rank=0, pid=13, exitcode=1, error_file="<N/A>")}) == "rank 0 exited with 1"


def test_exit_process_runs_atexit_and_keeps_the_code(tmp_path):
    """A worker leaves through exit_process with its gloo threads still up (the group
    referenced, as DDP's reducer references it): the code is its own, atexit handlers ran,
    buffered output reached the pipe."""
    import subprocess
    import sys

    from launcher.launch import free_port

    marker = tmp_path / "atexit-ran"
    script = f"""
import atexit, os, torch, torch.distributed as dist
from trainer.errors import exit_process
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
dist.init_process_group("gloo", rank=0, world_size=1)
keep = dist.group.WORLD
dist.all_reduce(torch.ones(4), async_op=True)
atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
print("buffered", end="")
exit_process(7)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=launch.ROOT)
    assert out.returncode == 7, out.stderr
    assert out.stdout == "buffered" and marker.read_text() == "yes"


# ---------------------------------------------------------------------------------------------
# Real launches

def _launch_nodes(tmp_path, overrides, *, nodes=2, procs=2, module="trainer", env=None, timeout=240, **kw):
    """Start `nodes` node launches of one job on this host, as `lrpt launch --node-rank R` would on
    each machine; returns ([exit code], [log text]) once all have exited."""
    import os
    import subprocess
    import time

    port, logs, running = launch.free_port(), [], []
    for rank in range(nodes):
        argv, extra = launch.compose(None, overrides, nodes=nodes, node_rank=rank, main_port=port,
                                     gpus_per_node=procs, deepspeed="none", cpu=True, module=module, **kw)
        logs.append(tmp_path / f"node{rank}.log")
        running.append(subprocess.Popen(argv, env=launch.child_env({**extra, "OMP_NUM_THREADS": "1", **(env or {})}),
                                        cwd=launch.ROOT, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in running]
    finally:
        for p in running:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    return codes, [log.read_text() for log in logs]


def test_restarts_reach_every_node_carry_the_topology_and_stop_after_n(tmp_path):
    """Two "nodes" x 2 processes, --max-restarts 1, and rank 3 SIGKILLs itself on every start
    (tests/launch_probe.py): both nodes restart together, each start's processes see the job's
    restart count and the topology (LOCAL_WORLD_SIZE, GROUP_RANK), and after one restart the job
    stops, naming the rank and the signal, with no node left waiting on the rendezvous."""
    import json
    import time

    t0 = time.monotonic()
    codes, logs = _launch_nodes(tmp_path, [], module="tests.launch_probe", max_restarts=1,
                                env={"LRPT_PROBE_OUT": str(tmp_path), "LRPT_PROBE_DIE": "3"})
    wall = time.monotonic() - t0
    starts = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("start-*.json")}
    assert sorted(starts) == [f"start-{s}-{r}.json" for s in (0, 1) for r in range(4)], (starts, logs)
    for s in starts.values():
        assert s["WORLD_SIZE"] == "4" and s["LOCAL_WORLD_SIZE"] == "2" and s["GROUP_WORLD_SIZE"] == "2"
        assert s["TORCHELASTIC_MAX_RESTARTS"] == "1"
        # Ranks are node-contiguous: a node holds ranks 2g and 2g+1.
        assert int(s["RANK"]) // 2 == int(s["GROUP_RANK"]) and int(s["RANK"]) % 2 == int(s["LOCAL_RANK"])
    # The restart count is the job's on both nodes, not only on the node that failed.
    assert {n: s["TORCHELASTIC_RESTART_COUNT"] for n, s in starts.items()} == \
        {n: n.split("-")[1] for n in starts}
    dead = next(i for i, log in enumerate(logs) if "rank 3 was killed by SIGKILL" in log)
    assert codes[dead] == 128 + 9 and codes[1 - dead] != 0, (codes, logs)
    lines = [line for line in logs[dead].splitlines() if line.startswith("[lrpt] ")]
    assert lines == [f"[lrpt] node {dead}: rank 3 was killed by SIGKILL; restart 1 of at most 1: every node's "
                     "processes start again from the newest complete checkpoint",
                     "[lrpt] failed after 1 restart(s), the most allowed: rank 3 was killed by SIGKILL"], logs[dead]
    for log in logs:
        assert "ChildFailedError" not in log, log
    print(f"two nodes x 2 processes, 2 starts, restart and give-up: {wall:.1f}s")


# Users' own launchers, the real trainer: micro model, a small embedded corpus, two steps.
TINY = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "data.embedded_sentences=2000",
        "data.embedded_vocab=300", "train.max_steps=2", "logging.log_every=1", "logging.eval_every=0",
        "logging.eval_batches=1", "logging.tensorboard=false"]


def _user_launch(tmp_path, cache, *argv, timeout=300):
    """A launcher command as a user types it (no ACCELERATE_USE_CPU, no lrpt), output to pipes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    env.update(LRPT_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(launch.ROOT))
    exe = str(Path(sys.executable).parent / argv[0])
    return subprocess.run([exe, *argv[1:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _train_records(run):
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_users_accelerate_launch_deepspeed_trains_zero2_and_logs_lines_not_bars(tmp_path, lrpt_cache):
    """`accelerate launch --use_deepspeed --zero_stage 2 -m trainer`: the config names no engine,
    so the launcher's ZeRO-2 is honoured and recorded. Inside, the byte counter on DeepSpeed's own
    collectives sees ZeRO-2's signature: with 2 micro-batches a step, a reduce-scatter of the
    gradients per micro-batch and one all-gather of the updated shards, 3x the trainable bytes
    (ZeRO-1 reduces once: 2x; DDP all-reduces once: 1x). Its output goes to pipes, not a
    terminal: the periodic lines and no progress-bar frames."""
    run = tmp_path / "run"
    r = _user_launch(tmp_path, lrpt_cache, "accelerate", "launch", "--use_deepspeed", "--zero_stage", "2",
                     "--num_processes", "2", "-m", "trainer", *TINY, "train.grad_accum=2", f"run.dir={run}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "  deepspeed: zero2\n" in (run / "config.yaml").read_text()
    records = _train_records(run)
    t = records[0]["trainable_params"] * 4
    assert [(x["step"], x["world_size"], x["comm_bytes"]) for x in records] == [(1, 2, 3 * t + 8), (2, 2, 3 * t + 8)]
    assert "\r" not in r.stdout + r.stderr and "step 2/2 | loss" in r.stdout
    assert "training with DDP" not in r.stderr


def test_users_accelerate_multi_gpu_trains_data_parallel(tmp_path, lrpt_cache):
    run = tmp_path / "run"
    r = _user_launch(tmp_path, lrpt_cache, "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                     "-m", "trainer", *TINY, f"run.dir={run}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    records = _train_records(run)
    t = records[0]["trainable_params"] * 4
    assert [(x["step"], x["world_size"], x["comm_bytes"]) for x in records] == [(1, 2, t), (2, 2, t)]


def test_a_launcher_and_the_config_that_disagree_on_deepspeed_stop_in_one_line(monkeypatch):
    from trainer.config import load_config
    from trainer.distributed import build_accelerator, launcher_deepspeed
    from trainer.errors import DistributedError

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert launcher_deepspeed() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launcher_deepspeed() == "zero2"  # Accelerate's default stage
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(launch.DEEPSPEED_CONFIGS / "zero1.json"))
    assert launcher_deepspeed() == "zero1"  # the stage in the launcher's DeepSpeed config (lrpt launch's way)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launcher_deepspeed() == "zero3"  # --zero_stage wins
    with pytest.raises(DistributedError) as e:
        build_accelerator(load_config(None, ["distributed.deepspeed=none"]))
    assert str(e.value) == ("launched with DeepSpeed zero3 (accelerate launch --use_deepspeed) but the config says "
                            "distributed.deepspeed=none: drop one of them")


def test_torchrun_and_lrpt_launch_leave_through_one_exit_path(tmp_path, lrpt_cache):
    """A worker's failure reaches the launcher the same way under torchrun and lrpt launch: its
    one line on stderr, its exit code, and the cause in torch elastic's error file, which each
    launcher then names (torchrun as the root cause in its ChildFailedError table, lrpt launch in
    one line and the worker's own exit code) instead of "To enable traceback see ..."."""
    cause = "ConfigError: unknown config key 'train.max_stpes'; did you mean 'train.max_steps'?"
    r = _user_launch(tmp_path, lrpt_cache, "torchrun", "--nproc-per-node", "2", "-m", "trainer",
                     "train.max_stpes=2")
    # Once one process has failed, the agent stops the other (which may not have got as far).
    assert r.returncode == 1 and "config error: unknown config key 'train.max_stpes'" in r.stderr, r.stderr
    assert "ChildFailedError" in r.stderr and cause in r.stderr.split("Root Cause")[1], r.stderr
    r = _user_launch(tmp_path, lrpt_cache, "lrpt", "launch", "train.max_stpes=2", "--gpus-per-node", "2",
                     "--deepspeed", "none")
    assert r.returncode == 2, r.stderr
    assert "[lrpt] failed: rank" in r.stderr and f"exited with 2: {cause}" in r.stderr, r.stderr
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_progress_bar_on_a_terminal_only(tmp_path, lrpt_cache):
    """One process with stderr on a terminal (a pty) draws the bar there; the periodic lines
    (with an ETA) go to stdout either way. (A file or pipe gets no bar: the launch tests above
    and the SLURM logs check that.)"""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # tqdm draws nothing 0 wide
    env = dict(os.environ, LRPT_CACHE=str(lrpt_cache), OMP_NUM_THREADS="1", PYTHONPATH=str(launch.ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *TINY, f"run.dir={tmp_path / 'run'}"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        terminal += chunk
    out = proc.communicate(timeout=120)[0]
    os.close(master)
    assert proc.returncode == 0, out + terminal.decode(errors="replace")
    assert b"\rtrain:" in terminal and b"2/2" in terminal, terminal
    assert re.search(r"^step 2/2 \| loss [\d.]+ \| lr \S+ \| [\d.]+k tok/s \| comm [\d.]+ MB \| eta \d+m\d\ds", out, re.M), out
