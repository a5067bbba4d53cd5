"""Nothing lost, nothing mixed: kill -9 at seeded points (the harness is tests/faults.py),
damaged checkpoints, refusals with one line, signals, a rank killed mid-checkpoint, and the
invariants the other tests could not see (write order, frozen SwitchLoRA vectors, DDP bytes
over several buckets).

`pytest tests/test_faults.py --trials 200` soaks; LRPT_FAULT_SEED=<seed> replays a run of trials.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import faults
from trainer import checkpoint as ckpt
from trainer.rundir import RunDir


@pytest.fixture(scope="module", autouse=True)
def small_and_single_threaded(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LRPT_CACHE", str(tmp_path_factory.mktemp("faults-cache")))
    undo = faults.fast_and_single_threaded()
    yield
    undo()
    mp.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each strategy."""
    root = tmp_path_factory.mktemp("reference")
    return {s: faults.run(s, root / s) for s in faults.STRATEGIES}


def test_kill9_at_seeded_points_resumes_exactly(reference, tmp_path, request):
    seed = int(os.environ.get("LRPT_FAULT_SEED", "15"))
    trials = faults.draw_trials(request.config.getoption("--trials"), seed)
    t0 = time.time()
    for i, trial in enumerate(trials):
        faults.run_trial(trial, tmp_path / f"t{i}", reference[trial.strategy])
    rows = [f"{i:3d} {t.strategy:10s} {t.point:17s} {'async' if t.background else 'sync':5s} {t.outcome:8s} resumed@{t.resumed_from} "
            f"lost {t.lost_steps} {'exact' if t.exact else 'DIFFERENT'}" for i, t in enumerate(trials)]
    print(f"\nseed {seed}, {len(trials)} trials in {time.time() - t0:.1f}s\n" + "\n".join(rows))
    assert all(t.exact for t in trials), "\n".join(rows)
    assert all(t.outcome == "killed" for t in trials), "\n".join(rows)  # every point was reached


def test_each_damaged_checkpoint_file_falls_back_and_resumes_exactly(reference, tmp_path):
    """Checkpoints at 3 and 6; each file of step 6 truncated, flipped or deleted in turn: the
    resume falls back to step 3 and still rebuilds the uninterrupted curve."""
    base = tmp_path / "base"
    faults.run("full", base, "train.stop_at=6")
    names = sorted(p.name for p in (base / "checkpoints" / "step_0000006").iterdir())
    assert names == [".metadata", "__0_0.distcp", "meta.json", "rank_00000.json"]
    for name in names:
        for damage in ("truncate", "flip", "delete"):
            d = tmp_path / f"{name}-{damage}"
            shutil.copytree(base, d)
            path = d / "checkpoints" / "step_0000006" / name
            data = path.read_bytes()
            if damage == "truncate":
                path.write_bytes(data[: len(data) // 2])
            elif damage == "flip":
                path.write_bytes(data[:40] + bytes([data[40] ^ 0x10]) + data[41:])
            else:
                path.unlink()
            with pytest.warns(UserWarning, match="step_0000006 is unusable"):
                faults.run("full", d)
            resume = [r for r in RunDir(d).read_raw_metrics() if r.get("event") == "resume"]
            assert [r["from"] for r in resume] == ["step_0000003"], (name, damage)
            assert faults.curve(d) == faults.curve(reference["full"]), (name, damage)


# -- refusals, each one line on stderr before anything in the run directory changes ---------------

def cli(capsys, *args) -> tuple[int, list[str]]:
    """`python -m trainer ARGS` in this process: (exit code, the error lines on stderr)."""
    from trainer.__main__ import main

    capsys.readouterr()
    code = main(list(args))
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith(("error", "config error", "interrupted"))]
    return code, err


def snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_second_train_on_a_held_run_dir_refuses(tmp_path, capsys):
    from tests.test_rundir import hold_lock

    d = tmp_path / "r"
    holder = hold_lock(d)
    try:
        code, err = cli(capsys, *faults.overrides("full", d))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(err) == 1 and f"is in use by pid {holder.pid} on " in err[0], err
    assert not (d / "config.yaml").exists() and not (d / "metrics.jsonl").exists()


def test_resume_with_changed_settings(reference, tmp_path, capsys):
    d = tmp_path / "r"
    faults.run("relora", d, "train.stop_at=4")
    before = snapshot(d)
    for bad, shown in [("strategy.name=lora", "strategy.name 'relora' -> 'lora'"),
                       ("data.batch_size=8", "data.batch_size 4 -> 8"),
                       ("strategy.rank=8", "strategy.rank 4 -> 8"),
                       ("train.seed=7", "train.seed 1234 -> 7")]:
        code, err = cli(capsys, *faults.overrides("relora", d, bad))
        assert code == 2 and len(err) == 1 and shown in err[0] and "define the run" in err[0], (bad, err)
        assert snapshot(d) == before, bad  # config.yaml, model.json, metrics, checkpoints untouched
    # Settings that may change are recorded with the resume; the curve up to max_steps=8 is the same.
    code, err = cli(capsys, *faults.overrides("relora", d, "train.max_steps=8", "checkpoint.every=4"))
    assert code == 0, err
    resume = [r for r in RunDir(d).read_raw_metrics() if r.get("event") == "resume"]
    assert resume == [{"step": 4, "tokens": 512, "event": "resume", "from": "step_0000004",
                       "metrics_offset": resume[0]["metrics_offset"],
                       "changed": {"checkpoint.every": [3, 4], "train.stop_at": [4, 0]}}]
    assert "every: 4" in (d / "config.yaml").read_text()
    assert faults.curve(d) == faults.curve(reference["relora"])


def test_interval_containing_the_resume_logs_the_uninterrupted_mean(reference, tmp_path):
    """log_every=2, checkpoints every 3: the run stops at 3, inside the 3-4 window."""
    d = tmp_path / "r"
    faults.run("full", d, "train.stop_at=3")
    faults.run("full", d)
    assert faults.losses(d) == faults.losses(reference["full"])  # step 4 included: 3 before, 4 after
    raw = [r["step"] for r in RunDir(d).read_raw_metrics() if "event" in r]
    assert raw == [3, 3]  # stop, resume
    assert faults.curve(d) == faults.curve(reference["full"])


def test_no_usable_checkpoint_refuses_unless_starting_over(reference, tmp_path, capsys):
    d = tmp_path / "r"
    faults.run("full", d, "train.stop_at=4")
    for folder in ckpt.list_checkpoints(d / "checkpoints"):
        (folder / "__0_0.distcp").write_bytes(b"")
    before = snapshot(d)
    with pytest.warns(UserWarning, match="unusable"):
        code, err = cli(capsys, *faults.overrides("full", d))
    assert code == 2 and len(err) == 1 and "none is usable (step_0000003: __0_0.distcp checksum mismatch" in err[0], err
    assert "run.resume=false" in err[0] and snapshot(d) == before
    code, err = cli(capsys, *faults.overrides("full", d, "run.resume=false"))
    assert code == 0, err
    (old,) = d.glob("old-*")
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert RunDir(d).read_raw_metrics()[0]["step"] == 0  # a fresh metrics.jsonl
    assert faults.curve(d) == faults.curve(reference["full"])


def test_latest_with_random_bytes_resumes(reference, tmp_path, capsys):
    d = tmp_path / "r"
    faults.run("full", d, "train.stop_at=4")
    (d / "checkpoints" / "latest").write_bytes(os.urandom(64))
    with pytest.warns(UserWarning, match="does not name a checkpoint folder"):
        code, err = cli(capsys, *faults.overrides("full", d))
    assert code == 0, err
    assert faults.curve(d) == faults.curve(reference["full"])


@pytest.mark.parametrize("background", [False, True])
def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, background):
    """The disk fills up half-way through step 6's shard (inside DCP's writer), with the save
    in the foreground or in the background: one line, the temporary folder gone, `latest` kept."""
    import contextlib
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystem

    d = tmp_path / "r"
    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            if ".tmp-step_0000006" in str(path) and str(path).endswith(".distcp"):
                stream.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            yield stream
    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    code, err = cli(capsys, *faults.overrides("full", d, f"checkpoint.async={str(background).lower()}"))
    assert code == 1 and len(err) == 1, err
    assert "no space left on the device" in err[0] and "it needs about" in err[0] and "still step_0000003" in err[0]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step_0000003"]


def test_read_only_checkpoints_refuse_at_start(tmp_path, capsys):
    from tests.test_checkpoint import make_read_only

    d = tmp_path / "r"
    faults.run("full", d, "train.stop_at=2")
    undo = make_read_only(d / "checkpoints")
    try:
        code, err = cli(capsys, *faults.overrides("full", d))
    finally:
        undo()
    assert code == 1 and len(err) == 1 and "cannot write checkpoints into" in err[0], err


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: micro\ntrain:\n  max_steps: [8\n")
    code, err = cli(capsys, str(bad))
    assert code == 2 and len(err) == 1 and f"{bad}: malformed YAML at line 5, column 1" in err[0], err
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    code, err = cli(capsys, str(bad))
    assert code == 2 and len(err) == 1 and "not UTF-8 text (byte 0)" in err[0], err


def test_data_prepare_names_the_undecodable_byte(tmp_path, capsys):
    from launcher.cli import main

    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n\n".join(f"the cat number {i} sat on the mat." for i in range(400)))
    bad.write_bytes(b"plain text " * 10 + b"caf\xe9 au lait\n")
    capsys.readouterr()
    assert main(["data", "prepare", str(good), str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300",
                 "--min-val-tokens", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: byte 113: not utf-8 (invalid continuation byte); pass --encoding (e.g. "
                   f"latin-1) if it is text in another encoding, or --skip-undecodable to leave such files out"]
    assert main(["data", "prepare", str(good), str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300",
                 "--min-val-tokens", "16", "--skip-undecodable"]) == 0
    assert "skipped 1 undecodable file(s)" in capsys.readouterr().err
    assert main(["data", "prepare", str(good), str(bad), "--out", str(tmp_path / "l"), "--vocab-size", "300",
                 "--min-val-tokens", "16", "--encoding", "latin-1"]) == 0


# -- signals (real processes: a signal handler is per process) ----------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def spawn(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "trainer", *faults.overrides("full", run_dir, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not any("loss" in r for r in RunDir(run_dir).read_raw_metrics()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_ctrl_c_checkpoints_a_second_stops_at_once_and_early_sigterm_is_clean(tmp_path):
    long = ["train.max_steps=500", "logging.log_every=1", "checkpoint.every=1000"]
    # Slow steps for the second: its second Ctrl-C must land while the first step still runs.
    once, twice = spawn(tmp_path / "once", *long), spawn(tmp_path / "twice", *long, "data.batch_size=64")
    early = spawn(tmp_path / "early")
    time.sleep(1.0)  # importing torch and friends takes seconds: the loop's handlers are not in yet
    early.send_signal(signal.SIGTERM)
    for proc, d in ((once, tmp_path / "once"), (twice, tmp_path / "twice")):
        wait_for_step(d, proc)
    once.send_signal(signal.SIGINT)
    twice.send_signal(signal.SIGINT)
    # Signals that arrive together are one signal to Python: the second goes after the first
    # was handled (its message is on stderr).
    twice_err = []
    for line in twice.stderr:
        twice_err.append(line)
        if line.startswith("interrupted: finishing"):
            twice.send_signal(signal.SIGINT)
            break
    results = {name: (p.wait(timeout=180), p.stderr.read()) for name, p in
               (("once", once), ("twice", twice), ("early", early))}
    results["twice"] = (results["twice"][0], "".join(twice_err) + results["twice"][1])
    code, err = results["once"]
    assert code == 85 and "interrupted: finishing this step and writing a checkpoint" in err, err
    assert "Traceback" not in err
    stop = [r for r in RunDir(tmp_path / "once").read_raw_metrics() if r.get("event") == "preempt"]
    assert len(stop) == 1 and ckpt.step_of(ckpt.find_latest(tmp_path / "once" / "checkpoints")) == stop[0]["step"]
    code, err = results["twice"]
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped at once")
    code, err = results["early"]
    assert code == 85 and "Traceback" not in err, err
    assert [x for x in err.splitlines() if x.startswith("error")] == [
        "error: stopped by SIGTERM during start-up, before the first step: nothing to save; run the same "
        "command to start again"]


def test_a_background_save_runs_while_training_goes_on_and_a_stop_waits_for_it(tmp_path):
    """checkpoint.async, step 3's write held half-way: steps go on while it is in flight, and
    the folder is not complete (nor `latest`) until the write is; SIGTERM then finishes the
    step, waits for the write in flight, writes the final checkpoint and exits 85."""
    d = tmp_path / "r"
    proc = spawn(d, "train.max_steps=500", "logging.log_every=1", "checkpoint.async=true", "checkpoint.keep=5",
                 env={"LRPT_TEST_PAUSE": "mid_shard@3"})
    marker, root = d / "checkpoints" / ".paused", d / "checkpoints"
    deadline = time.time() + 180
    while not any(r.get("step", 0) >= 5 for r in RunDir(d).read_raw_metrics() if "loss" in r):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    assert marker.exists()  # the write is still held
    assert not (root / "step_0000003").exists() and not (root / "latest").exists()
    proc.send_signal(signal.SIGTERM)
    time.sleep(3)
    assert proc.poll() is None  # waiting for the write in flight, not exiting over it
    assert [p.name for p in ckpt.list_checkpoints(root)] == []
    marker.unlink()  # the write goes on and completes
    code = proc.wait(timeout=180)
    err = proc.stderr.read()
    assert code == 85 and "Traceback" not in err, err
    (stop,) = [r for r in RunDir(d).read_raw_metrics() if r.get("event") == "preempt"]
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names[0] == "step_0000003" and names[-1] == ckpt.step_dir_name(stop["step"]), names
    assert ckpt.find_latest(root).name == names[-1] and not ckpt.unusable(root)


# -- two processes: rank 0 killed while it writes a checkpoint -----------------------------------

def launch_pair(run_dir: Path, port: int, *extra: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Two ranks started as torchrun would (its environment, no launcher in between), so the
    test holds each rank's pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for rank in (0, 1):
        e = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "RANK": str(rank), "LOCAL_RANK": str(rank), **(env or {})}
        log = open(run_dir.parent / f"{run_dir.name}-rank{rank}.log", "a")
        out.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", *faults.overrides("full", run_dir, *extra)], cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **e}, stdout=log, stderr=subprocess.STDOUT))
    return out


# The timeout only bounds a hang: a killed peer's closed socket fails a collective at once. It
# must outlast rank 0's minimal-pair evaluation at the last step on a loaded machine.
PAIR = ["train.max_steps=6", "logging.log_every=2", "checkpoint.every=2", "distributed.timeout_s=30"]


@pytest.fixture(scope="module")
def pair_reference(tmp_path_factory):
    from launcher.launch import free_port

    ref = tmp_path_factory.mktemp("pair") / "ref"
    assert [p.wait(timeout=300) for p in launch_pair(ref, free_port(), *PAIR)] == [0, 0], \
        (ref.parent / "ref-rank0.log").read_text()[-3000:]
    return ref


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point,victim,kept,background", [
    ("before_rename@6", 0, 4, False),  # rank 0 killed in the last save: marker written, folder not renamed
    ("mid_shard@4:1", 0, 2, True),  # rank 0 killed while rank 1 writes its shard of 4 in the background
])
def test_rank_killed_mid_checkpoint_the_other_exits_in_time_and_restart_is_exact(
        pair_reference, tmp_path, point, victim, kept, background):
    """Two ranks, checkpoints at 2, 4 and 6. The survivor exits within the collective timeout
    (its write, held at the point until the kill, goes on and fails); `latest` stays the
    previous checkpoint; a restart rebuilds the uninterrupted pair's curve."""
    from launcher.launch import free_port

    extra = [f"checkpoint.async={str(background).lower()}"]
    run = tmp_path / "run"
    procs = launch_pair(run, free_port(), *PAIR, *extra, env={"LRPT_TEST_PAUSE": point})
    marker = run / "checkpoints" / ".paused"
    deadline = time.time() + 240
    while not marker.exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            (run.parent / "run-rank0.log").read_text()[-3000:]
        time.sleep(0.05)
    procs[victim].kill()
    killed = time.time()
    marker.unlink()  # a paused survivor's write goes on, as a real one would
    code = procs[1 - victim].wait(timeout=120)
    survivor_s = time.time() - killed
    assert code != 0 and survivor_s < 30 + 20, (code, survivor_s)
    assert ckpt.step_of(ckpt.find_latest(run / "checkpoints")) == kept
    codes = [p.wait(timeout=240) for p in launch_pair(run, free_port(), *PAIR, *extra)]
    assert codes == [0, 0], (run.parent / "run-rank0.log").read_text()[-3000:]
    assert faults.curve(run) == faults.curve(pair_reference)
    print(f"\n{point}: the survivor exited {survivor_s:.1f}s after rank {victim} was killed (timeout_s=30)")


def test_kill9_during_a_background_write_keeps_the_previous_checkpoint(reference, tmp_path):
    """checkpoint.async: killed while step 6's shard is half written (training went on
    meanwhile): `latest` is step 3, complete, and the resume is exact."""
    d = tmp_path / "r"
    assert faults.run_killed("relora", d, "mid_shard@6", "checkpoint.async=true") == "killed"
    assert not (d / "checkpoints" / "step_0000006").exists()
    assert ckpt.step_of(ckpt.find_latest(d / "checkpoints")) == 3
    faults.run("relora", d, "checkpoint.async=true")
    assert faults.curve(d) == faults.curve(reference["relora"])


# -- invariants ------------------------------------------------------------------------------------

def test_a_frozen_switchlora_vector_keeps_its_slot(tmp_path, monkeypatch):
    """A vector frozen at step t (its counterpart was just switched) holds the same slot until
    its freeze ends: it is neither switched nor handed a new candidate while frozen."""
    from trainer.strategies.switchlora import SwitchLoRA

    seen = []  # per step: [(slots, frozen_until) for every pool]
    real = SwitchLoRA.after_step

    def after_step(self, step, ctx):
        event = real(self, step, ctx)
        seen.append((step, [(list(p.slots), list(p.frozen_until)) for pair in self.pools for p in pair]))
        return event
    monkeypatch.setattr(SwitchLoRA, "after_step", after_step)
    faults.run("switchlora", tmp_path / "r", "strategy.freeze_steps=3", "train.max_steps=8")
    frozen_checks = 0
    for k, (step, pools) in enumerate(seen):
        for p, (slots, until) in enumerate(pools):
            for i, end in enumerate(until):
                if end != step + 3:
                    continue  # not frozen at this step
                for later_step, later in seen[k + 1:]:
                    if later_step < end:
                        assert later[p][0][i] == slots[i], (p, i, step, later_step)
                        frozen_checks += 1
    assert frozen_checks > 50  # the run switched (and froze) plenty


def _ddp_buckets_worker(rank: int, port: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from trainer import comm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    model[2].weight.requires_grad_(False)  # frozen, as a low-rank strategy's W
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    comm.instrument_torch()
    with comm.phase("startup"), comm.count_ddp_broadcasts():
        # ~16 KiB per 64x64 weight, buckets of ~20 KB: several buckets per backward.
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.02)
    ddp.register_comm_hook(None, comm.ddp_comm_hook)
    meter = comm.CommMeter()
    meter.pop()
    steps = []
    for _ in range(3):
        ddp(torch.randn(4, 64)).sum().backward()
        steps.append(meter.pop()["sync"])
    out.joinpath(f"rank{rank}.json").write_text(json.dumps({"trainable": trainable, "steps": steps}))
    dist.destroy_process_group()
    from trainer.errors import exit_process
    exit_process(0)  # as every worker does: see exit_process (without it: SIGABRT in 2 of 15 runs)


def test_ddp_byte_counter_over_several_buckets_is_exact(tmp_path):
    import multiprocessing

    from launcher.launch import free_port

    # Fresh interpreters, not forks: by now the pytest process has thread pools (compile
    # workers, tqdm's monitor), and a fork taken while one of them holds a lock can hang.
    port, spawn = free_port(), multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_ddp_buckets_worker, args=(rank, port, tmp_path)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(s["bytes"] == r["trainable"] for s in r["steps"]), r  # every bucket, each once
        # DDP rebuilds its buckets after the first backward (the first is capped at 1 MiB, not
        # bucket_cap_mb): from then on there are several.
        assert all(s["calls"] >= 3 for s in r["steps"][1:]), r
