"""Checkpoint folders that are either complete or ignored: names, the completion marker and its
checksums, `latest`, retention, and finding the newest usable one.

Every rank writes its files into `.tmp-step_N/`. Rank 0 then writes `meta.json`, the marker,
last: it records the sha256 of every other file. Then the folder is renamed to `step_N/` and
`latest` moved. Loading verifies every checksum; a folder that fails falls back to the previous
complete one with a warning, so a crash, a kill or a truncated file costs at most one
checkpoint interval. This holds for both formats (DCP shards, and the older model.pt /
optimizer.pt / trainer.pt): both have the same marker.

Test-only: LRPT_TEST_PAUSE=<point>[@step][:rank] makes a writer stop at a named point (see
`pause`) until the test removes the marker file or kills the process, so the fault tests can
act at an exact moment.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

from trainer.errors import CheckpointError

META = "meta.json"
LATEST = "latest"
PAUSED = ".paused"
_STEP_NAME = re.compile(r"step_\d+")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(folder: Path) -> int:
    return int(Path(folder).name.split("_")[1])


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-{step_dir_name(step)}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def pause(point: str, step: int, ckpt_root: Path, rank: int = 0) -> None:
    """Test-only: stop here while LRPT_TEST_PAUSE names this point (and step, and rank), until
    the test deletes the marker file (`.paused`) or kills the process."""
    want = os.environ.get("LRPT_TEST_PAUSE")
    if not want:
        return
    want, _, on_rank = want.partition(":")
    name, _, at = want.partition("@")
    if name != point or (at and int(at) != step) or (on_rank and int(on_rank) != rank):
        return
    marker = ckpt_root / PAUSED
    marker.write_text(f"{point}@{step}:{rank}\n")
    while marker.exists():
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Completing a folder (rank 0)

def complete(ckpt_root: Path, step: int, meta: dict, keep: int) -> Path:
    """Write `meta` (which holds "sha256": {file name: digest} of every other file) as the
    temporary folder's marker, rename the folder to step_N, move `latest`, keep the newest
    `keep` complete checkpoints. Raises CheckpointError (one line) when the disk is full or
    not writable, with `latest` unchanged."""
    final, tmp = ckpt_root / step_dir_name(step), tmp_dir(ckpt_root, step)
    try:
        pause("before_marker", step, ckpt_root)
        # Last: a folder with meta.json is complete, and only complete folders are renamed.
        # It holds state too (shapes, the shared state): its own digest covers that.
        fsync_write(tmp / META, json.dumps({**meta, "meta_sha256": _digest(meta)}, indent=1).encode())
        pause("before_rename", step, ckpt_root)
        if final.exists():  # a re-save of the same step (e.g. after a preemption at a save step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pause("before_latest", step, ckpt_root)
        fsync_write(ckpt_root / f".{LATEST}.tmp", final.name.encode())
        os.replace(ckpt_root / f".{LATEST}.tmp", ckpt_root / LATEST)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_failure(e, ckpt_root, step)) from None
    prune(ckpt_root, keep, before=step)
    return final


def write_failure(e: OSError, ckpt_root: Path, step: int, need: int | None = None) -> str:
    """One line: why checkpoint `step` could not be written, and what `latest` still names."""
    latest = find_latest(ckpt_root) if ckpt_root.is_dir() else None
    kept = f"the latest checkpoint is still {latest.name}" if latest else "no earlier checkpoint exists"
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(ckpt_root).free
        needs = f"it needs about {need / 2**20:,.1f} MiB, " if need else ""
        return (f"no space left on the device of {ckpt_root} for checkpoint step {step}: {needs}"
                f"{free / 2**20:,.1f} MiB are free; {kept}. Free space (or lower checkpoint.keep), then resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write checkpoint step {step} into {ckpt_root}: {e.strerror} (read-only?); {kept}. "
                f"Make it writable, then resume")
    return f"checkpoint step {step} could not be written to {ckpt_root}: {e.strerror or e}; {kept}"


def check_writable(ckpt_root: Path) -> None:
    """Refuse at start-up, not after the first checkpoint interval, when checkpoints cannot
    be written (root may write through a chmod, so try rather than ask os.access)."""
    probe = ckpt_root / f".probe-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints into {ckpt_root}: {e.strerror} (read-only?); make it "
                              f"writable or choose another run.dir") from None


def prune(ckpt_root: Path, keep: int, before: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints; drop temporary folders of saves that never
    finished: all of them, or those of steps before `before` (a later save may be starting)."""
    complete_ = [d for d in list_checkpoints(ckpt_root) if (d / META).exists()]
    for old in complete_[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):
        if before is None or step_of(Path(stale.name.removeprefix(".tmp-"))) < before:
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Finding

def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders by step, oldest first (complete or not)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(d for d in ckpt_root.iterdir() if d.is_dir() and d.name.startswith("step_"))


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_bytes())


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint whose files match their checksums, else why not."""
    meta_path = folder / META
    if not meta_path.is_file():
        return "no meta.json (the save never finished)"
    try:
        meta = read_meta(folder)
    except ValueError as e:  # not JSON, or not even text (a flipped byte)
        return f"meta.json unreadable: {e}"
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or not meta["sha256"]:
        return "meta.json has no checksums"
    own = meta.pop("meta_sha256", None)  # absent in the format before DCP, whose marker held checksums only
    if own is not None and own != _digest(meta):
        return "meta.json checksum mismatch (corrupt)"
    for name, digest in meta["sha256"].items():
        path = folder / name
        if "/" in name or not path.is_file():
            return f"{name} missing"
        if sha256(path) != digest:
            return f"{name} checksum mismatch (truncated or corrupt)"
    return None


def find_latest(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that verifies, warning about each newer one that does not."""
    candidates = list_checkpoints(ckpt_root)
    named = _pointer(ckpt_root)
    # The pointer is a hint; a newer complete folder (pointer write lost in a crash) wins.
    if named is not None and named.is_dir() and named not in candidates:
        candidates.append(named)
    for folder in sorted(candidates, reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is unusable ({problem}); falling back to the previous one")
    return None


def _pointer(ckpt_root: Path) -> Path | None:
    """The folder `latest` names; None, with a warning, if it holds anything but a folder name
    (random bytes must not block every retry: the folders are scanned anyway)."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes()[:64].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not _STEP_NAME.fullmatch(name):
        warnings.warn(f"{pointer} does not name a checkpoint folder; ignoring it and scanning the folders")
        return None
    return ckpt_root / name


def unusable(ckpt_root: Path) -> list[str]:
    """'step_N: why' for each checkpoint folder that does not verify."""
    return [f"{d.name}: {why}" for d in list_checkpoints(ckpt_root) if (why := verify(d)) is not None]


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete, checksum-verified checkpoints of a run, oldest first."""
    return [d for d in list_checkpoints(Path(run_dir, "checkpoints")) if verify(d) is None]


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run directory, a checkpoints folder or a checkpoint itself."""
    path = Path(path)
    if (path / META).exists():
        return path
    for root in (path / "checkpoints", path):
        found = find_latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint under {path}")
