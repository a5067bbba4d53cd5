"""The run directory: the names of its files, its metrics log and the default name of a new
one. The loop, the launcher and the reports all go through here, so the layout has one owner.
Torch-free: the launcher and the reports import it without the trainer's weight.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from trainer.errors import RunDirError

# Events of a run's life, not of its training: the rebuilt view leaves them out.
LIFECYCLE = ("resume", "restart", "stop", "preempt")

# Lock files held by this process: flock belongs to an open file, so a second open of the same
# file in this process would conflict with the first. Kept open for the process's life.
_HELD: dict[Path, int] = {}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def model_json(self) -> Path:
        return self.path / "model.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def dynamics(self) -> Path:
        """The offline analysis of the checkpoints (`lrpt analyze`)."""
        return self.path / "dynamics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def holder_file(self) -> Path:
        """Who holds the lock (for the refusal message; the flock itself is the lock)."""
        return self.path / "lock.json"

    def is_run(self) -> bool:
        return self.metrics.is_file()

    def read_metrics(self) -> list[dict]:
        """The uninterrupted run's records: what a resume redid is dropped (the records after
        the checkpoint it resumed from), and so are the lifecycle events (LIFECYCLE)."""
        kept: list[tuple[int, dict]] = []
        for offset, record in _read_jsonl_offsets(self.metrics):
            if record.get("event") == "resume":
                cut = record.get("metrics_offset")
                if cut is None:  # resumed from a checkpoint that predates metrics_offset
                    kept = [(o, r) for o, r in kept if r.get("step", 0) <= record.get("step", 0)]
                else:
                    kept = [(o, r) for o, r in kept if o < cut]
            kept.append((offset, record))
        return [r for _, r in kept if r.get("event") not in LIFECYCLE]

    def read_raw_metrics(self) -> list[dict]:
        """Every record as written, redone steps and lifecycle events included."""
        return [r for _, r in _read_jsonl_offsets(self.metrics)]

    def read_dynamics(self) -> list[dict]:
        return _read_jsonl(self.dynamics)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics_size(self) -> int:
        """Bytes in metrics.jsonl: a checkpoint keeps it, so a resume knows which records it redoes."""
        return self.metrics.stat().st_size if self.metrics.is_file() else 0

    def end_cut_line(self) -> None:
        """A kill mid-record leaves a line without its newline; end it, so that the next record
        (a resume event) is not glued to it and lost."""
        if self.metrics_size():
            with open(self.metrics, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def lock(self) -> None:
        """Hold the run directory for this process's life, or raise RunDirError naming the
        holder. The flock dies with its process, so a killed run never blocks a restart; the
        holder record lets a SLURM requeue of the same job in (its old node may still hold the
        lock on a network file system) and names the holder in the refusal."""
        key = self.lock_file.resolve()
        if key in _HELD:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not self._may_take_over(holder):
                os.close(fd)
                raise RunDirError(f"run directory {self.path} is in use by pid {holder.get('pid', '?')} on "
                                  f"{holder.get('host', '?')} since {holder.get('since', '?')}; wait for it to "
                                  f"finish or stop it, or choose another run.dir") from None
        except OSError as e:  # a file system without flock (some NFS mounts): train unguarded, say so
            warnings.warn(f"cannot lock {self.lock_file} ({e.strerror}); nothing stops a second run in "
                          f"{self.path}")
        _HELD[key] = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        tmp = self.holder_file.with_name(f".lock.json.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.holder_file)

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.holder_file.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _may_take_over(holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return True  # a requeue of this very job: the holder is its killed predecessor
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # dead, its lock kept alive by a forked child
            except PermissionError:
                pass
        return False

    def move_aside(self) -> Path | None:
        """Start over: move checkpoints, metrics and tensorboard into old-<timestamp>/ (kept, not
        deleted: they may be all that is left of a long run). None if there was nothing."""
        old = self.path / f"old-{time.strftime('%Y%m%d-%H%M%S')}"
        moved = None
        for item in (self.checkpoints, self.metrics, self.tensorboard, self.dynamics):
            if item.exists():
                old.mkdir(exist_ok=True)
                os.replace(item, old / item.name)
                moved = old
        return moved


def _read_jsonl_offsets(path: Path) -> list[tuple[int, dict]]:
    """(byte offset, record) of each record of a JSON-lines file, [] if there is none. A line
    cut by a kill is skipped: it is the last line, or glued to the next record when an older
    writer did not end it before appending."""
    if not path.is_file():
        return []
    out, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((start, record))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [r for _, r in _read_jsonl_offsets(path)]


def default_run_dir(name: str) -> Path:
    """runs/<name>-<local time>, absolute: fixed before any process starts writing into it."""
    return (Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
