"""The run directory: its one reader of metrics.jsonl (raw, and the rebuilt view of the
uninterrupted run), its lock, moving old material aside, and the default run-directory name."""
import json
import os
import socket
import subprocess
import sys

import pytest

from trainer.errors import RunDirError
from trainer.rundir import RunDir, default_run_dir


def test_read_metrics_skips_a_line_cut_by_a_crash(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_run() and run.read_metrics() == []
    run.append_metrics({"step": 1, "loss": 3.0})
    run.append_metrics({"step": 2, "loss": 2.5})
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert run.is_run()
    assert run.read_metrics() == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    # A resumed run appends after the cut: the glued line is dropped, the records after it are kept.
    run.append_metrics({"step": 3, "loss": 2.0})
    run.append_metrics({"step": 4, "loss": 1.5})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 4]


def test_default_run_dir_is_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = default_run_dir("relora-micro")
    assert d.is_absolute() and d.parent == tmp_path / "runs" and d.name.startswith("relora-micro-")


# -- the lock ------------------------------------------------------------------------------------

HOLD = """
import os, sys, time
from trainer.rundir import RunDir
RunDir(sys.argv[1]).lock()
child = os.fork() if len(sys.argv) > 2 else 0
if child:  # the holder dies; its forked child keeps the flock alive
    print("locked", child, flush=True)
    os._exit(0)
if len(sys.argv) == 2:
    print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(path, *extra, env=None):
    """A process holding the lock on `path` (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), *extra], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    line = p.stdout.readline().split()
    assert line[0] == "locked"
    p.child = int(line[1]) if len(line) > 1 else None
    return p


def test_second_holder_is_refused_with_the_holder_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    p = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirError) as e:
            RunDir(tmp_path).lock()
        msg = str(e.value)
        assert f"pid {p.pid} on {socket.gethostname()} since 20" in msg and "\n" not in msg
    finally:
        p.kill()
        p.wait()
    RunDir(tmp_path).lock()  # the flock died with its holder: a restart gets in
    assert json.loads(RunDir(tmp_path).holder_file.read_text())["pid"] == os.getpid()


def test_stale_holder_on_this_host_does_not_block(tmp_path, monkeypatch):
    """The holder died but a child it forked still holds the flock: the record names a dead
    pid on this host, so the lock is taken over."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    p = hold_lock(tmp_path, "fork")
    p.wait()
    try:
        RunDir(tmp_path).lock()
        assert json.loads(RunDir(tmp_path).holder_file.read_text())["pid"] == os.getpid()
    finally:
        os.kill(p.child, 9)


def test_slurm_requeue_of_the_same_job_gets_in(tmp_path, monkeypatch):
    p = hold_lock(tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4243")
        with pytest.raises(RunDirError):
            RunDir(tmp_path).lock()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        RunDir(tmp_path).lock()
    finally:
        p.kill()
        p.wait()


# -- the rebuilt view ----------------------------------------------------------------------------

def test_view_drops_what_a_resume_redid_and_the_lifecycle_events(tmp_path):
    run = RunDir(tmp_path)
    for step in (0, 1, 2):
        run.append_metrics({"step": step, "loss": 10.0 - step})
    offset = run.metrics_size()  # checkpoint at step 2
    run.append_metrics({"step": 3, "loss": 99.0})  # redone after the kill
    with open(run.metrics, "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-record
    run.end_cut_line()
    run.append_metrics({"step": 2, "event": "resume", "metrics_offset": offset})
    run.append_metrics({"step": 3, "loss": 7.0})
    run.append_metrics({"step": 3, "event": "stop"})
    assert run.read_metrics() == [{"step": s, "loss": 10.0 - s} for s in range(4)]
    assert [r["step"] for r in run.read_raw_metrics()] == [0, 1, 2, 3, 2, 3, 3]
    # A checkpoint older than metrics_offset: the resume event's step is the cut.
    run.append_metrics({"step": 1, "event": "resume", "metrics_offset": None})
    assert run.read_metrics() == [{"step": 0, "loss": 10.0}, {"step": 1, "loss": 9.0}]


def test_move_aside_keeps_the_old_material(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 0})
    (run.checkpoints / "step_0000001").mkdir(parents=True)
    old = run.move_aside()
    assert old.parent == tmp_path and old.name.startswith("old-")
    assert (old / "metrics.jsonl").is_file() and (old / "checkpoints" / "step_0000001").is_dir()
    assert not run.metrics.exists() and not run.checkpoints.exists()
    assert RunDir(tmp_path / "empty").move_aside() is None
