"""What ranks exchange besides gradients: rank 0's choices (the run directory, how to start
in it, a failed write), the per-step sums that keep ranks stopping together, and each rank's
own state for a checkpoint. All are counted by trainer/comm.py as `control` traffic."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def say(accelerator, message: str) -> None:
    """Print once per job, on global rank 0 (`accelerator.print` prints on every node's local
    rank 0, so a multi-node SLURM log would hold each line once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def broadcast_str(value: str) -> str:
    """Rank 0's value on every rank (run directory names carry timestamps)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list, device) -> list[float]:
    """Sum over ranks of numbers or 0-dim device tensors, as one tensor and one collective;
    the final `tolist` is the one host read."""
    t = torch.stack([torch.as_tensor(v, device=device).to(torch.float64) for v in values])
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
