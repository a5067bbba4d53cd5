"""torch.distributed.checkpoint (DCP) I/O: each rank writes and reads only its share, and loading
runs no code.

A `Chunk` is this rank's contiguous piece of a 1-D tensor (a parameter or one of its optimizer
states, flattened): a ZeRO-1/2 fragment at its offset, or a 1/world share of a tensor every
rank holds. DCP records each piece at its offset, so a checkpoint written by any world size
and engine is one tensor per name on disk, and a reader asks for whatever piece it holds now
(a ZeRO rank its fragment, a DDP rank the whole tensor): DCP reads the overlapping parts.

Two places where stock DCP would unpickle: `.metadata` (read here by an unpickler that admits
only DCP's metadata classes) and non-tensor items (refused: our non-tensor state is JSON,
trainer/checkpoint/plain.py). Tensor items are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import io
import math
import pickle
import queue
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, StorageMeta,
                                                    TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from trainer.errors import CheckpointError, refused_pickle

# A run of one process has no process group; DCP then works alone, as we mean it to.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# What a failed write raises: DCP gathers each rank's exception into a CheckpointException (a
# BaseException), raised on every rank.
WRITE_ERRORS = (Exception, CheckpointException)


def first_failure(e: BaseException) -> BaseException:
    """The exception behind one of DCP's CheckpointExceptions (rank -> (exception, traceback))."""
    for failure in getattr(e, "failures", {}).values():
        return failure[0] if isinstance(failure, tuple) else failure
    return e


class Chunk(torch.Tensor):
    """Elements [offset, offset + len(local)) of a 1-D tensor of `numel` elements, `local`
    holding them (a view to write from or read into). To DCP it is a tensor of the global size
    that implements its checkpointing protocol (as DTensor does); it has no storage of its own.
    `shape_of` is the shape the 1-D tensor is a flattening of (a parameter's)."""

    @staticmethod
    def __new__(cls, local: torch.Tensor, offset: int, numel: int, shape_of=None):
        t = torch.Tensor._make_wrapper_subclass(cls, (numel,), dtype=local.dtype, device=local.device)
        t.local, t.offset, t.shape_of = local, int(offset), torch.Size(shape_of if shape_of is not None else (numel,))
        return t

    @classmethod
    def whole(cls, t: torch.Tensor) -> "Chunk":
        return cls(t.detach().reshape(-1), 0, t.numel(), t.shape)

    @classmethod
    def share(cls, t: torch.Tensor, rank: int, world: int) -> "Chunk":
        """This rank's 1/world of a tensor every rank holds alike: DCP then writes it once."""
        n = t.numel()
        lo, hi = n * rank // world, n * (rank + 1) // world
        return cls(t.detach().reshape(-1)[lo:hi], lo, n, t.shape)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"Chunk is a checkpoint placeholder; {func} is not defined on it")

    # -- the DCP protocol (torch/distributed/checkpoint/planner_helpers.py) ----------------
    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=torch.Size([self.local.numel()]))

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        if not self.local.numel():
            return []
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([self.offset])), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(),
                                                      properties=TensorProperties.create_from_tensor(self.local),
                                                      size=self.size()))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()] if self.local.numel() else []

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.local


# ---------------------------------------------------------------------------------------------
# Reading without running code

_DCP = "torch.distributed.checkpoint."
_METADATA_GLOBALS = {
    *((_DCP + "metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                       "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                       "StorageMeta", "_MEM_FORMAT_ENCODING")),
    (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit only the classes DCP's metadata is made of (and
    torch dtypes), so a planted file cannot name a function to run."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def read_metadata(folder: Path):
    try:
        with open(folder / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"refusing to load {folder / '.metadata'}: not plain checkpoint metadata ({e})") from None


class _Reader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        meta = read_metadata(Path(self.path))
        meta.storage_meta = StorageMeta(load_id=self.load_id)  # as FileSystemReader does
        return meta


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # Our checkpoints hold no pickled objects; a folder that claims one was not written by us.
        raise CheckpointError(f"refusing to load {read_item.dest_index.fqn}: a pickled object where a tensor "
                              f"belongs (checkpoints hold tensors and JSON only)")


# ---------------------------------------------------------------------------------------------
# Writing and reading

MAX_FILE_BYTES = 64 << 20


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer (fsynced: a rank's files are complete once its write returns), with a
    rank's share split into files of at most MAX_FILE_BYTES. DCP copies each view it writes (a
    fragment of a flat ZeRO buffer, a 1/world share of a weight) and keeps the copies until
    their file is written (torch 2.13, filesystem.py `_write_files_from_queue`): one file per
    rank would hold a copy of the rank's whole share; bounded files bound that copy."""

    def write_data(self, plan, planner):
        files, size = [[]], 0
        for item in plan.items:
            n = math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
            if files[-1] and size + n > MAX_FILE_BYTES:
                files.append([])
                size = 0
            files[-1].append(item)
            size += n
        todo: queue.Queue = queue.Queue()
        for i, items in enumerate(files):
            name = f"{plan.storage_data.prefix}{i}.distcp"
            todo.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, todo)


def _writer(folder: Path):
    return _Writer(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1)


class _NoStaging:
    """dcp.async_save's stager, for a state dict that is already a private copy (Checkpointer._stage):
    DCP's own stager would copy every tensor, and a Chunk not as the piece it is."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner (tensors alike on several ranks are written by one), with a call before
    each item is written after the first: the fault tests' mid-shard pause point."""

    def __init__(self, on_item=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.on_item, self.items = on_item, 0

    def resolve_data(self, write_item):
        self.items += 1
        if self.on_item is not None and self.items == 2:
            self.on_item()
        return super().resolve_data(write_item)


def save(folder: Path, flat: dict, group, background: bool = False, on_item=None):
    """Write `flat` ({key: Chunk or tensor}; keys every rank holds alike are written once) into
    `folder`, this rank's share as `__<rank>_0.distcp`, rank 0 also `.metadata`. Every rank of
    `group` calls it. With `background` the write runs on a thread and a Future is returned
    (`flat` must then be a private copy); else it returns when every rank's share is on disk."""
    planner = _SavePlanner(on_item)
    kwargs = dict(storage_writer=_writer(folder), planner=planner, process_group=group, no_dist=group is None)
    if background:
        return dcp.async_save(flat, async_stager=_NoStaging(), **kwargs)
    dcp.save(flat, **kwargs)
    return None


def load(folder: Path, flat: dict, group) -> None:
    """Fill `flat` ({key: Chunk or tensor to read into}) from the checkpoint in `folder`; every
    rank of `group` calls it (None: this process alone)."""
    try:
        dcp.load(flat, storage_reader=_Reader(str(folder)), planner=_LoadPlanner(), process_group=group,
                 no_dist=group is None)
    except CheckpointException as e:
        cause = first_failure(e)
        if isinstance(cause, CheckpointError):
            raise cause from None
        if isinstance(cause, pickle.UnpicklingError):  # a shard's tensor record names a global
            raise refused_pickle(folder, cause) from None
        raise CheckpointError(f"cannot read checkpoint {folder}: {type(cause).__name__}: {cause}") from None


def tensors(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{key: (global size, dtype)} of every tensor in a checkpoint."""
    return {k: (v.size, v.properties.dtype) for k, v in read_metadata(folder).state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}
