"""Writing a training state as a checkpoint folder, in the background if asked, and reading
one back (either format) into a state to load.

The folder (DCP plus our marker):
    __<rank>_0.distcp   each rank's share of the tensors (dcp_io.Chunk)
    .metadata           DCP's index of every piece (rank 0)
    rank_<rank>.json    each rank's own state (JSON; its tensors are in the shards) and the
                        sha256 of the files that rank wrote
    meta.json           the marker, written last by rank 0: step, world size, parameter
                        shapes, the state alike on every rank (JSON), the sha256 of every file

DCP keys: model/<param>, optim/<param>/<state key> (1-D, world-size independent),
trainer/<path> (tensors in the shared state, each written whole by one rank) and
rank<r>/<path> (a rank's own tensors).

A save in the background (checkpoint.async) copies this rank's share (a 1/world of the state)
and returns; a thread writes it through dcp.async_save on a gloo group of its own (whose
collectives trainer/comm.py counts as control). The loop's per-step all-reduce carries each
rank's "my write is done" (`flags`); once every rank's is, rank 0 writes the marker, renames
the folder and moves `latest` (`settle`). A second save, the end of training and a stop on a
signal wait for the one in flight (`wait`). A kill at any moment leaves the previous `latest`.
"""
from __future__ import annotations

import json
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import torch

from trainer.checkpoint import dcp_io, folder as fs, legacy, plain
from trainer.checkpoint.dcp_io import Chunk
from trainer.errors import CheckpointError

FORMAT = "dcp"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _flatten(state: dict, rank: int, world: int):
    """(DCP flat dict of this rank's pieces, shared skeleton, own skeleton, shapes, bytes the
    whole checkpoint takes, about)."""
    flat, shapes, need = {}, {}, 0
    for name, c in state["model"].items():
        flat[f"model/{name}"], shapes[name] = c, list(c.shape_of)
        need += c.numel() * c.element_size()
    for name, st in state["optimizer"].items():
        for key, v in st.items():
            flat[f"optim/{name}/{key}"] = v
            need += v.numel() * v.element_size()
    for key, c in state.get("sync", {}).items():
        flat[f"sync/{key}"] = c
        need += c.numel() * c.element_size()
    shared, tensors = plain.split(state["trainer"], "trainer")
    # Tensors of the shared state (a strategy's candidate pools, say): each written whole by one
    # rank, biggest first to the least loaded, as every rank computes alike.
    load = [0] * world
    for key, t in sorted(tensors.items(), key=lambda kv: (-kv[1].numel() * kv[1].element_size(), kv[0])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += t.numel() * t.element_size()
        if owner == rank:
            flat[key] = t
    need += sum(load)
    own, own_tensors = plain.split(state["own"], f"rank{rank}")
    flat.update(own_tensors)
    need += world * sum(t.numel() * t.element_size() for t in own_tensors.values())
    return flat, shared, own, shapes, need


class _Save:
    """One save in flight on this rank."""

    def __init__(self, step: int, tmp: Path, shared: dict, shapes: dict, need: int):
        self.step, self.tmp, self.shared, self.shapes, self.need = step, tmp, shared, shapes, need
        self.done, self.error = threading.Event(), None  # set by the writer (a thread, in the background)
        self.future = None


class Checkpointer:
    """Writes checkpoints into `ckpt_root` (every rank calls every method, at the same steps)."""

    def __init__(self, ckpt_root: Path, keep: int, background: bool, rank: int, world: int, timeout_s: float = 1800):
        import torch.distributed as dist

        from trainer import comm

        self.root, self.keep, self.background, self.rank, self.world = Path(ckpt_root), keep, background, rank, world
        self.pending: _Save | None = None
        # Background saves copy this rank's share into buffers kept from one save to the next:
        # a copy into memory already mapped is a memcpy; fresh memory costs a page fault per
        # page, several times the copy (benchmarks/checkpoint_state.py). The price: a second
        # copy of the share stays in host memory.
        self._staging: dict[str, torch.Tensor] = {}
        self.failure = ""  # rank 0: completing the last save failed; every rank hears it at the next settle
        self._completer: threading.Thread | None = None  # rank 0: marker, rename, `latest`
        self.group = None
        if world > 1 and dist.is_available() and dist.is_initialized():
            # Its own gloo group: a background write's collectives must never interleave with the
            # loop's on the default group (and gloo is what DCP's async save needs).
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            comm.count_as(self.group, "control")
        if rank == 0 and self.root.is_dir():
            fs.prune(self.root, keep)  # temporary folders of a crashed run (no save is under way yet)

    # -- saving -------------------------------------------------------------------------------
    def save(self, state: dict, step: int, final: bool = False) -> None:
        """Write `state` (state.capture's, this rank's share) as checkpoint `step`: in the
        background with checkpoint.async, unless `final` (then this returns once it is
        complete, as a synchronous save always does)."""
        self.wait()  # a second save waits for the first
        flat, shared, own, shapes, need = _flatten(state, self.rank, self.world)
        job = _Save(step, fs.tmp_dir(self.root, step), shared, shapes, need)
        self.pending = job
        if self.background and not final:
            flat = self._stage(flat)  # training goes on: write a copy of this rank's share
            try:
                job.future = dcp_io.save(job.tmp, flat, self.group, background=True, on_item=self._pause_mid(step))
                job.future.add_done_callback(lambda f: self._finish(job, own, f.exception()))
            except dcp_io.WRITE_ERRORS as e:  # reported to every rank by settle
                self._finish(job, own, e)
            return
        try:
            dcp_io.save(job.tmp, flat, self.group, on_item=self._pause_mid(step))
            error = None
        except dcp_io.WRITE_ERRORS as e:
            error = e
        self._finish(job, own, error)
        self.wait()

    def _stage(self, flat: dict) -> dict:
        out, kept = {}, {}
        for key, v in flat.items():
            src = v.local if isinstance(v, Chunk) else v.detach()
            buf = self._staging.get(key)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty_like(src, memory_format=torch.contiguous_format)
            kept[key] = buf.copy_(src)
            out[key] = Chunk(buf, v.offset, v.numel(), v.shape_of) if isinstance(v, Chunk) else buf
        self._staging = kept  # buffers of keys no longer saved (a re-wrap) are let go
        return out

    def _pause_mid(self, step: int):
        return lambda: fs.pause("mid_shard", step, self.root, self.rank)

    def _finish(self, job: _Save, own, error) -> None:
        """This rank's part is written: its checksums and own state into rank_<r>.json."""
        try:
            if error is not None:
                raise error
            files = sorted(job.tmp.glob(f"__{self.rank}_*.distcp"))
            if self.rank == 0:
                files.append(job.tmp / ".metadata")
            record = {"rank": self.rank, "own": own, "sha256": {p.name: fs.sha256(p) for p in files}}
            fs.fsync_write(job.tmp / rank_file(self.rank), json.dumps(record).encode())
            fs.pause("after_shard", job.step, self.root, self.rank)
        except dcp_io.WRITE_ERRORS as e:  # a disk full or read-only: one line for every rank
            job.error = self._message(e, job)
        job.done.set()

    def _message(self, e: BaseException, job: _Save) -> str:
        cause = dcp_io.first_failure(e)
        if isinstance(cause, OSError):
            return fs.write_failure(cause, self.root, job.step, job.need)
        return f"checkpoint step {job.step} could not be written to {self.root}: {type(cause).__name__}: {cause}"

    # -- completing, in step with the loop ----------------------------------------------------
    def flags(self) -> list[float]:
        """[this rank's write is done, something failed], for the loop's per-step all-reduce."""
        job = self.pending
        failed = bool(self.failure) or (job is not None and job.error is not None)
        return [float(job is not None and job.done.is_set() and job.error is None), float(failed)]

    def settle(self, n_done: float, n_failed: float) -> None:
        """After the all-reduce of `flags`: complete the save once every rank's write is done
        (rank 0 writes the marker and renames); on a failure anywhere, every rank raises the
        same one line. The sums are the same on every rank, so all decide alike."""
        job = self.pending
        if n_failed:
            from trainer.ranks import gather

            mine = self.failure or (job.error if job is not None and job.error else "")
            message = next((m for m in gather(mine) if m), "a checkpoint write failed on another rank")
            self.pending, self.failure = None, ""
            if job is not None and self.rank == 0:
                shutil.rmtree(job.tmp, ignore_errors=True)
            raise CheckpointError(message)
        if job is None or n_done < self.world:
            return
        self.pending = None
        if self.rank == 0:
            # Off the loop too: the marker's and the pointer's fsyncs wait for the disk, and
            # the other ranks would wait for rank 0 at the next step. The next save joins it.
            self._completer = threading.Thread(target=self._complete, args=(job,), name="checkpoint-complete")
            self._completer.start()

    def _complete(self, job: _Save) -> None:
        try:
            self._write_marker(job)
        except CheckpointError as e:
            self.failure = str(e)

    def _write_marker(self, job: _Save) -> None:
        sums = {}
        try:
            for r in range(self.world):
                sums.update(json.loads((job.tmp / rank_file(r)).read_bytes())["sha256"])
                sums[rank_file(r)] = fs.sha256(job.tmp / rank_file(r))
        except (OSError, ValueError) as e:
            shutil.rmtree(job.tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint step {job.step}: a rank's record is unreadable ({e})") from None
        meta = {"format": FORMAT, "step": job.step, "world_size": self.world, "shapes": job.shapes,
                "trainer": job.shared, "sha256": sums}
        fs.complete(self.root, job.step, meta, self.keep)

    def _join(self) -> None:
        if self._completer is not None:
            self._completer.join()
            self._completer = None

    def wait(self) -> None:
        """Block until the save in flight is complete on every rank (a collective, called at
        the same point by every rank); raise its failure, if any, on every rank."""
        from trainer.ranks import all_reduce_sum, broadcast_str

        if self.pending is None:  # alike on every rank; a completion still running is rank 0's alone
            self._join()
            return
        self.pending.done.wait()
        n_done, n_failed = all_reduce_sum(self.flags(), "cpu")
        self.settle(n_done, n_failed)
        self._join()
        problem = broadcast_str(self.failure)
        self.failure = ""
        if problem:
            raise CheckpointError(problem)


# ---------------------------------------------------------------------------------------------
# Reading

def fill(folder: Path, dest: dict, rank: int, world: int, group=None) -> None:
    """Read checkpoint `folder` (either format) into `dest` (state.destination's): its
    Chunks are filled in place; "trainer" and "own" are set (own is None when the checkpoint
    was written by another world size: a rank's own state then starts afresh)."""
    meta = fs.read_meta(folder)
    if legacy.is_legacy(meta):
        return _fill_legacy(folder, dest, rank, world)
    saved = dcp_io.tensors(folder)
    flat = {}
    for name, c in dest["model"].items():
        if f"model/{name}" not in saved:
            raise CheckpointError(f"{folder} holds no {name}: it was written for another model or strategy")
        flat[f"model/{name}"] = c
    for name, st in dest["optimizer"].items():
        for key in list(st):
            if f"optim/{name}/{key}" in saved:
                flat[f"optim/{name}/{key}"] = st[key]
            else:  # not in the checkpoint: it keeps fresh state
                del st[key]
    for key, c in dest.get("sync", {}).items():
        if f"sync/{key}" not in saved:
            raise CheckpointError(f"{folder} holds no DiLoCo {key}: it was written without distributed.sync=diloco")
        flat[f"sync/{key}"] = c
    shared = _allocate(meta["trainer"], flat)
    own = None
    if meta["world_size"] == world:
        skeleton = json.loads((folder / rank_file(rank)).read_bytes())["own"]
        own = (skeleton, _allocate(skeleton, flat))
    dcp_io.load(folder, flat, group)
    dest["trainer"] = plain.join(meta["trainer"], shared)
    dest["own"] = None if own is None else plain.join(*own)


def _allocate(skeleton, flat: dict) -> dict[str, torch.Tensor]:
    tensors = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in plain.tensor_specs(skeleton).items()}
    flat.update(tensors)
    return tensors


def _fill_legacy(folder: Path, dest: dict, rank: int, world: int) -> None:
    old = legacy.read(folder)
    for name, c in dest["model"].items():
        if name not in old["model"]:
            raise CheckpointError(f"{folder} holds no {name}: it was written for another model or strategy")
        c.local.copy_(old["model"][name].reshape(-1).narrow(0, c.offset, c.local.numel()))
    for name, st in dest["optimizer"].items():
        saved = old["optimizer"].get(name, {})
        for key in list(st):
            value = saved.get(key)
            if value is None:
                del st[key]
            elif isinstance(st[key], Chunk):
                st[key].local.copy_(value.reshape(-1).narrow(0, st[key].offset, st[key].local.numel()))
            else:
                st[key].copy_(value)
    dest["trainer"] = old["trainer"]
    own = old["own"]
    dest["own"] = own[rank] if len(own) == world else None
    # The old format's DiLoCo state was whole, by name, alike on every rank.
    whole = own[0].get("sync") or {}
    if dest.get("sync") and whole.get("anchor"):
        names = dest["sync_layout"]["names"]
        for key, c in dest["sync"].items():
            flat = torch.cat([whole[key][n].reshape(-1).float() for n in names])
            c.local.copy_(flat[c.offset:c.offset + c.local.numel()])
        dest["trainer"] = {**old["trainer"], "sync_layout": dest["sync_layout"]}


def read(folder: Path, parts=("model", "optimizer", "trainer", "sync", "own")) -> dict:
    """A whole checkpoint in this process, by name, either format (tools and tests; the
    trainer reads only its share): {"model": {name: tensor}, "optimizer": {name: {key:
    tensor}}, "trainer": {...}, "sync": {anchor, momentum: flat tensor} (DiLoCo's; empty
    otherwise), "own": [each rank's own state]}."""
    meta = fs.read_meta(folder)
    if legacy.is_legacy(meta):
        return legacy.read(folder, parts)
    saved, shapes = dcp_io.tensors(folder), meta["shapes"]
    wanted = tuple(prefix for part, prefix in (("model", "model/"), ("optimizer", "optim/"), ("sync", "sync/"))
                   if part in parts)
    flat = {k: torch.empty(size, dtype=dtype) for k, (size, dtype) in saved.items() if k.startswith(wanted)}
    specs = {}
    if "trainer" in parts:
        specs["trainer"] = _allocate(meta["trainer"], flat)
    owns = []
    if "own" in parts:
        for r in range(meta["world_size"]):
            skeleton = json.loads((folder / rank_file(r)).read_bytes())["own"]
            owns.append((skeleton, _allocate(skeleton, flat)))
    dcp_io.load(folder, flat, None)
    out = {}
    if "model" in parts:
        out["model"] = {k[len("model/"):]: v.view(shapes[k[len("model/"):]]) for k, v in flat.items()
                        if k.startswith("model/")}
    if "optimizer" in parts:
        out["optimizer"] = {}
        for k, v in flat.items():
            if k.startswith("optim/"):
                name, key = k[len("optim/"):].rsplit("/", 1)
                out["optimizer"].setdefault(name, {})[key] = v if v.dim() == 0 else v.view(shapes[name])
    if "trainer" in parts:
        out["trainer"] = plain.join(meta["trainer"], specs["trainer"])
    if "sync" in parts:
        out["sync"] = {k[len("sync/"):]: v for k, v in flat.items() if k.startswith("sync/")}
    if "own" in parts:
        out["own"] = [plain.join(s, t) for s, t in owns]
    return out
