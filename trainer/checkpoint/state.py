"""What a training checkpoint holds, as a Trainer's state_dict: the same logical state for any
file format, world size and engine.

    {"model":     {name: Chunk},                       every parameter and persistent buffer
     "optimizer": {name: {key: Chunk or 0-dim tensor}},  per trainable parameter
     "trainer":   {state, data, strategy, metrics_offset},  alike on every rank
     "own":       {rng, hook, sync, [local, optimizer]}}    this rank's own

Tensors are this rank's pieces, in place (dcp_io.Chunk: nothing is gathered or copied):
- a parameter whose fp32 master ZeRO-1/2 partitions: the fragment this rank owns;
- a tensor every rank holds alike (DDP; frozen weights; buffers): a 1/world share;
- under DiLoCo trainable weights and their optimizer state differ between workers between
  outer syncs: the first worker gives them (rank 0 whole, or its ranks' ZeRO fragments: what
  `lrpt eval` sees), and every rank its own copy under "own" (`local`, `optimizer`); the
  anchor and outer momentum are one flat tensor each, the first worker's ranks giving their
  slices (any world size reads them back re-sliced);
- under ZeRO-3, which partitions parameters in place: gathered one at a time, then shared.
`destination()` is the same structure to load into: whole module tensors (every rank computes
with the whole weights), optimizer state where this rank holds it.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from trainer.checkpoint.dcp_io import Chunk
from trainer.errors import CheckpointError


def capture(trainer) -> dict:
    """This rank's share of the trainer's state (views of live tensors: copy before training
    on if they must outlive the step)."""
    from trainer import seeding

    engine, rank, world = trainer.engine, trainer.rank, trainer.world
    local_steps, first = trainer.sync.local_steps, trainer.sync.first_worker
    params = dict(engine.module.named_parameters())
    model = {}
    for name, t in engine.module.state_dict().items():
        p = params.get(name)
        if engine.zero_stage == 3 and p is not None:
            model[name] = Chunk.share(engine.read_param(p), rank, world)  # a gather, one parameter at a time
        elif local_steps and p is not None and p.requires_grad and not first:
            model[name] = _nothing(t)
        elif p is not None and engine.fragment(p) is not None:
            model[name] = Chunk(engine.master_part(p), engine.fragment(p), p.numel(), p.shape)
        elif local_steps and p is not None and p.requires_grad:
            model[name] = _rank0_whole(t, rank)
        else:
            model[name] = Chunk.share(t, rank, world)
    optimizer = {}
    if first:
        for name, p in engine.trainable():
            if engine.zero_stage == 3:
                optimizer[name] = {k: v if v.dim() == 0 else Chunk.share(v, rank, world)
                                   for k in engine.state_keys(p) if (v := engine.read_state(p, k)) is not None}
                continue
            start = engine.fragment(p)
            optimizer[name] = {k: v if v.dim() == 0 else
                               Chunk(v, start, p.numel(), p.shape) if start is not None else
                               _rank0_whole(v, rank) if local_steps else Chunk.share(v, rank, world)
                               for k, v in engine.state_parts(p).items()}
    own = {"rng": seeding.global_state(), "hook": trainer.hook.state_dict()}
    if local_steps:
        own["local"] = {n: p.detach() for n, p in engine.trainable()}
        own["optimizer"] = engine.optimizer_state_dict()
    shared = {"state": asdict(trainer.state), "data": trainer.loader.state_dict(),
              "strategy": trainer.strategy.state_dict(), "metrics_offset": trainer.run.metrics_size()}
    sync = {}
    if s := trainer.sync.state_dict():
        shared["sync_layout"] = {"names": s["names"], "numels": s["numels"]}
        sync = {k: Chunk(s[k] if first else s[k][:0], s["start"], sum(s["numels"])) for k in ("anchor", "momentum")}
    return {"model": model, "optimizer": optimizer, "trainer": shared, "sync": sync, "own": own}


def _nothing(t: torch.Tensor) -> Chunk:
    return Chunk(t.detach().reshape(-1)[:0], 0, t.numel(), t.shape)


def _rank0_whole(t: torch.Tensor, rank: int) -> Chunk:
    flat = t.detach().reshape(-1)
    return Chunk(flat if rank == 0 else flat[:0], 0, flat.numel(), t.shape)


def destination(trainer) -> dict:
    """Where this rank loads a checkpoint into: "model" and "optimizer" as in `capture`, as
    Chunks over the tensors to fill; "trainer" and "own" are filled in by the reader."""
    engine = trainer.engine
    params = dict(engine.module.named_parameters())
    model, optimizer = {}, {}
    for name, t in engine.module.state_dict().items():
        p = params.get(name)
        if engine.zero_stage == 3 and p is not None:
            model[name] = Chunk.whole(torch.empty(p.ds_shape))  # written back through the engine in restore
        else:
            model[name] = Chunk.whole(t)  # the module tensor; a ZeRO master is refreshed from it in restore
    for name, p in engine.trainable():
        if engine.zero_stage == 3:
            optimizer[name] = {k: torch.zeros(()) if v.dim() == 0 else Chunk.whole(torch.empty(p.ds_shape))
                               for k in engine.state_keys(p) if (v := engine.read_state(p, k)) is not None}
            continue
        start = engine.fragment(p)
        # Scalars into fresh tensors: under DeepSpeed one `step` serves a whole group (write_state sets it).
        optimizer[name] = {k: torch.zeros((), dtype=v.dtype) if v.dim() == 0 else Chunk(v, start or 0, p.numel(), p.shape)
                           for k, v in engine.state_parts(p, create=True).items()}
    sync, layout = {}, None
    if s := trainer.sync.state_dict():
        layout = {"names": s["names"], "numels": s["numels"]}
        sync = {k: Chunk(torch.empty_like(s[k]), s["start"], sum(s["numels"])) for k in ("anchor", "momentum")}
    return {"model": model, "optimizer": optimizer, "trainer": None, "sync": sync, "sync_layout": layout, "own": None}


@torch.no_grad()
def restore(trainer, state: dict) -> None:
    """Finish loading `destination()` once a reader filled it: masters, shared scalars, the
    strategy, data position, RNG and each rank's own state."""
    from trainer import seeding

    engine = trainer.engine
    params = dict(engine.module.named_parameters())
    for name, chunk in state["model"].items():
        p = params.get(name)
        if p is None:
            continue
        if engine.zero_stage == 3:
            engine.write_param(p, chunk.local.view(p.ds_shape))
        elif engine.fragment(p) is not None:  # the module tensor was filled: its fragment to the master
            engine.master_part(p).copy_(chunk.local.narrow(0, engine.fragment(p), engine.master_part(p).numel()))
    if engine.zero_stage == 3:
        engine.load_optimizer_state_dict({n: {k: v if v.dim() == 0 else v.local.view(params[n].ds_shape)
                                              for k, v in s.items()} for n, s in state["optimizer"].items()})
    else:
        engine.load_optimizer_state_dict({n: {k: v for k, v in s.items() if not isinstance(v, Chunk)}
                                          for n, s in state["optimizer"].items()})
    t = state["trainer"]
    trainer.strategy.load_state_dict(t["strategy"])
    trainer.loader.load_state_dict(t["data"])
    trainer.state = type(trainer.state)(**t["state"])
    trainer.resumed_metrics_offset = t.get("metrics_offset")  # None: an old checkpoint, cut by step
    own = state["own"]
    if own is not None:
        if "rng" in own:
            seeding.set_global_state(own["rng"])
        trainer.hook.load_state_dict(own.get("hook"))
        if "local" in own:
            for name, p in engine.trainable():
                engine.write_param(p, own["local"][name])
            engine.load_optimizer_state_dict(own["optimizer"])
    if state.get("sync"):
        layout = t.get("sync_layout")
        if layout is None:
            raise CheckpointError("the checkpoint holds no DiLoCo anchor: it was written without distributed.sync=diloco")
        trainer.sync.load_state_dict([{**layout, "start": state["sync"]["anchor"].offset,
                                       **{k: c.local for k, c in state["sync"].items()}}])
