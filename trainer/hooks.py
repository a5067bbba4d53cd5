"""DDP communication hooks: HOW gradients are encoded on the wire (`distributed.comm_hook`).
Part of the engine set-up (trainer/distributed.py registers them on the DDP wrapper); the
byte counter (trainer/comm.py) sees what they really send."""
from __future__ import annotations

import torch

from trainer import comm


class CommHook:
    """The DDP communication hook `distributed.comm_hook` names (none | bf16 | fp16 | powersgd):
    HOW gradients are encoded on the wire. DDP takes one hook; its collectives are counted by
    trainer/comm.py's torch.distributed counters (as `sync`: backward runs in that phase), so the
    bytes are what the hook really sends. We register torch's hooks ourselves, the ones
    Accelerate's DDPCommunicationHookType names, because Accelerate's registration would leave
    no room for the counter. PowerSGD's state (error feedback, warm-start Q, its iteration) is
    per rank and goes into checkpoints through `state_dict`."""

    def __init__(self, name: str = "none", rank: int = 4, start_iter: int = 10, seed: int = 0):
        self.name, self.state = name, None
        if name == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
            self.state = PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter,
                                       use_error_feedback=True, warm_start=True, random_seed=seed)

    def register(self, ddp) -> None:
        """A hook's state is its process group (PowerSGD's carries one): DDP's own, or the
        hook would all-reduce over the world and divide by the world's size."""
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        if self.name == "none":
            ddp.register_comm_hook(state=ddp.process_group, hook=comm.ddp_comm_hook)
        elif self.name in ("bf16", "fp16"):
            ddp.register_comm_hook(state=ddp.process_group,
                                   hook=_compress_hook(torch.bfloat16 if self.name == "bf16" else torch.float16))
        else:  # the holder, not the state: a resume replaces the state after registration
            self.state.process_group = ddp.process_group
            ddp.register_comm_hook(state=self, hook=_synchronous(powerSGD_hook.powerSGD_hook))

    def state_dict(self) -> dict | None:
        if self.state is None:
            return None
        return {slot: getattr(self.state, slot) for slot in type(self.state).__slots__ if slot != "process_group"}

    def load_state_dict(self, state: dict | None) -> None:
        if self.state is not None and state is not None:
            for slot, value in state.items():
                setattr(self.state, slot, value)


def _synchronous(hook):
    """PowerSGD issues its P and Q all-reduces from future callbacks (gloo's threads), while
    DDP goes on from the autograd thread to the next bucket's hook and, with
    find_unused_parameters, its own all-reduce of the used-parameter map: two ranks can then
    enter different collectives (gloo aborts: "Received data size doesn't match"). Waiting for
    each bucket's whole exchange inside the hook keeps every rank's collectives in one order,
    at the price of PowerSGD's overlap with backward."""

    def run(holder, bucket):
        done = torch.futures.Future()
        done.set_result(hook(holder.state, bucket).wait())
        return done

    return run


def _compress_hook(dtype):
    """torch's fp16/bf16_compress_hook, which refuses bf16 without CUDA and NCCL: the bucket
    is divided by its group's size, cast, all-reduced in `dtype` and cast back. Gloo reduces
    bf16 and fp16 on CPU."""
    import torch.distributed as dist

    def hook(process_group, bucket):
        group = process_group if process_group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        compressed = buffer.div(group.size()).to(dtype)
        fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

        def decompress(f):
            buffer.copy_(f.value()[0])
            return buffer

        return fut.then(decompress)

    return hook
