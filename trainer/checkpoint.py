"""Checkpoint folders that are either complete or ignored, and finding and loading them.

A checkpoint is written into `.tmp-step_N/`, each file's sha256 recorded in `meta.json` (written
last), then renamed to `step_N/`; `latest` is updated after the rename. Loading verifies every
checksum; a folder that fails falls back to the previous complete one with a warning, so a
crash or a truncated file costs at most one checkpoint interval. A write that fails (disk
full, read-only) removes its temporary folder and raises CheckpointError: `latest` still
names the previous checkpoint.

Test-only: LRPT_TEST_PAUSE=<point>[@step] makes the writer stop at a named point (see
`_pause`) and wait there to be killed, so the fault tests can kill -9 at an exact moment.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from trainer.errors import CheckpointError

META = "meta.json"
LATEST = "latest"
_STEP_NAME = re.compile(r"step_\d+")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _pause(point: str, step: int, ckpt_root: Path) -> None:
    """Test-only: stop here and wait to be killed when LRPT_TEST_PAUSE names this point."""
    want = os.environ.get("LRPT_TEST_PAUSE")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or int(at) == step):
        (ckpt_root / ".paused").write_text(f"{point}@{step}\n")
        while True:
            time.sleep(1)


class _Counter:
    """A file that only counts what torch.save writes to it."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def _size(obj) -> int:
    counter = _Counter()
    torch.save(obj, counter)
    return counter.n


def save(ckpt_root: Path, step: int, payload: dict[str, object], keep: int) -> Path:
    """Write `payload` ({file name: object for torch.save}) as checkpoint `step`; keep the
    newest `keep` complete checkpoints. Call on one rank only. Raises CheckpointError (one
    line) when the disk is full or not writable, with `latest` left as it was."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        checksums = {}
        for i, (name, obj) in enumerate(payload.items()):
            buf = io.BytesIO()
            torch.save(obj, buf)
            _fsync_write(tmp / name, buf.getvalue())
            checksums[name] = _sha256(tmp / name)
            if i == 0:
                _pause("mid_write", step, ckpt_root)
        # Last: a folder with meta.json is complete, and only complete folders are renamed.
        _fsync_write(tmp / META, json.dumps({"step": step, "sha256": checksums}, indent=1).encode())
        _pause("before_rename", step, ckpt_root)
        if final.exists():  # a re-save of the same step (e.g. after a preemption at a save step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _pause("before_latest", step, ckpt_root)
        _fsync_write(ckpt_root / f".{LATEST}.tmp", final.name.encode())
        os.replace(ckpt_root / f".{LATEST}.tmp", ckpt_root / LATEST)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(e, ckpt_root, step, payload)) from None
    _prune(ckpt_root, keep)
    return final


def _write_failure(e: OSError, ckpt_root: Path, step: int, payload: dict) -> str:
    latest = find_latest(ckpt_root) if ckpt_root.is_dir() else None
    kept = f"the latest checkpoint is still {latest.name}" if latest else "no earlier checkpoint exists"
    if e.errno == errno.ENOSPC:
        need = sum(_size(obj) for obj in payload.values())
        free = shutil.disk_usage(ckpt_root).free
        return (f"no space left on the device of {ckpt_root} for checkpoint step {step}: it needs "
                f"{need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free; {kept}. Free space (or "
                f"lower checkpoint.keep), then resume")
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


def _prune(ckpt_root: Path, keep: int) -> None:
    complete = [d for d in list_checkpoints(ckpt_root) if (d / META).exists()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint folders by step, oldest first (complete or not)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(d for d in ckpt_root.iterdir() if d.is_dir() and d.name.startswith("step_"))


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint whose files match their checksums, else why not."""
    meta_path = folder / META
    if not meta_path.is_file():
        return "no meta.json (the save never finished)"
    try:
        meta = json.loads(meta_path.read_bytes())
    except ValueError as e:  # not JSON, or not even text (a flipped byte)
        return f"meta.json unreadable: {e}"
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        return "meta.json has no checksums"
    for name, digest in meta["sha256"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if _sha256(path) != digest:
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


def load(folder: Path, name: str, map_location="cpu"):
    return torch.load(folder / name, map_location=map_location, weights_only=False)


def step_of(folder: Path) -> int:
    return int(Path(folder).name.split("_")[1])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete, checksum-verified checkpoints of a run, oldest first."""
    return [d for d in list_checkpoints(Path(run_dir, "checkpoints")) if verify(d) is None]


def read(folder: Path) -> dict:
    """Every file of a checkpoint, by file name (what `save` was given)."""
    meta = json.loads((folder / META).read_text())
    return {name: load(folder, name) for name in meta["sha256"]}


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


def load_model(path: str | Path, device="cpu"):
    """(model in eval mode with adapters merged, Config, checkpoint folder) for a run
    directory (its newest complete checkpoint), a checkpoint folder or a file in one."""
    from trainer.config import load_config
    from trainer.model import ModelArgs, Transformer, model_args
    from trainer.strategies.lora import merged_state_dict

    path = Path(path)
    folder = resolve(path.parent if path.is_file() else path)
    run_dir = folder.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    state = merged_state_dict(load(folder, "model.pt"))
    shape = run_dir / "model.json"  # the shape the run built; older runs: config + embedding rows
    args = (ModelArgs(**json.loads(shape.read_text())) if shape.is_file() else
            model_args(cfg.model, cfg.data.seq_len, vocab_size=state["embed_tokens.weight"].shape[0]))
    model = Transformer(args)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, folder


# ---------------------------------------------------------------------------------------------
# What a training checkpoint holds: a Trainer's state, by file (loop.Trainer.state_dict)

def capture(trainer) -> dict:
    """{"model.pt", "optimizer.pt", "trainer.pt"} of a running trainer. Every rank calls it:
    under DeepSpeed the fp32 masters and the optimizer state are gathered, and every rank's own
    state (RNG; PowerSGD's error feedback; DiLoCo's slice of the anchor and outer momentum, and
    its local weights and inner optimizer between outer syncs) is collected for rank 0 to write."""
    from dataclasses import asdict

    from trainer import seeding
    from trainer.ranks import gather

    engine = trainer.engine
    model_state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    for name, p in engine.module.named_parameters():
        model_state[name] = engine.read_param(p).cpu()
    own = {"hook": trainer.hook.state_dict(), "sync": trainer.sync.state_dict()}  # DiLoCo: the rank's slice
    if trainer.sync.local_steps:
        own["local"] = {n: engine.read_param(p).cpu() for n, p in engine.trainable()}
        own["optimizer"] = engine.optimizer_state_dict()
    trainer_state = {"state": asdict(trainer.state), "data": trainer.loader.state_dict(),
                     "strategy": trainer.strategy.state_dict(), "rng": gather(seeding.global_state()),
                     "per_rank": gather(own),
                     "metrics_offset": trainer.run.metrics_size()}  # rank 0's, the one saved
    return {"model.pt": model_state, "optimizer.pt": engine.optimizer_state_dict(), "trainer.pt": trainer_state}


@torch.no_grad()
def restore(trainer, state: dict) -> None:
    """Put `capture`'s output back into a trainer built for the checkpoint's step."""
    from trainer import seeding

    engine, model_state, t = trainer.engine, state["model.pt"], state["trainer.pt"]
    for name, buf in engine.module.named_buffers():
        if name in model_state:
            buf.copy_(model_state[name])
    for name, p in engine.module.named_parameters():
        engine.write_param(p, model_state[name])
    trainer.strategy.load_state_dict(t["strategy"])
    engine.load_optimizer_state_dict(state["optimizer.pt"])
    trainer.loader.load_state_dict(t["data"])
    rng = t["rng"] if isinstance(t["rng"], list) else [t["rng"]]
    if len(rng) == trainer.world:
        seeding.set_global_state(rng[trainer.rank])
    own = (t.get("per_rank") or [])
    trainer.sync.load_state_dict([o["sync"] for o in own if o.get("sync")])  # any world size
    if len(own) == trainer.world:
        mine = own[trainer.rank]
        trainer.hook.load_state_dict(mine.get("hook"))
        if "local" in mine:
            for name, p in engine.trainable():
                engine.write_param(p, mine["local"][name])
            engine.load_optimizer_state_dict(mine["optimizer"])
    trainer.state = type(trainer.state)(**t["state"])
    trainer.resumed_metrics_offset = t.get("metrics_offset")  # None: an older checkpoint, cut by step
