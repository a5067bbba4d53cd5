"""The `accelerate launch` command lines that `lrpt launch` composes: flags checked against
Accelerate's own parser and validation, without starting any process."""
from __future__ import annotations

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


def test_rendezvous_and_bad_values():
    argv, _ = launch.compose(None, [], nodes=2, node_rank=0, gpus_per_node=1, deepspeed="none", cpu=True,
                             rdzv="c10d")
    assert _flag(argv, "--rdzv_backend") == "c10d"
    with pytest.raises(ValueError):
        launch.compose(None, [], nodes=2, node_rank=2, deepspeed="none", cpu=True)
    with pytest.raises(ValueError):
        launch.compose(None, [], deepspeed="zero4", cpu=True)


@pytest.mark.parametrize("deepspeed,nodes", [("none", 1), ("none", 2), ("zero2", 2), ("zero3", 1)])
def test_accelerate_accepts_the_command(deepspeed, nodes):
    """Accelerate's parser and validation take our flags and our --config_file as they are."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv, env = launch.compose("c.yaml", ["x=1"], nodes=nodes, gpus_per_node=2, deepspeed=deepspeed, cpu=True)
    args = launch_command_parser().parse_args(argv[3:])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == 2 * nodes and args.num_machines == nodes
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
