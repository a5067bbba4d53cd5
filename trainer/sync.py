"""When and what crosses the network between ranks: a sync mode. Separate from the strategy,
which decides what trains; any strategy composes with any sync mode.

every_step  the data-parallel engine (DDP or DeepSpeed ZeRO) synchronises gradients over the
            world at every optimizer step; ranks hold identical weights after every step.
diloco      DiLoCo (arXiv 2311.08105; OpenDiLoCo, arXiv 2407.07852). Each worker takes H inner
            optimizer steps on its own data; then the pseudo-gradient  delta = anchor - local
            over the trainable parameters is averaged over the workers, an outer Nesterov SGD
            moves the anchor, and every rank sets local = anchor. With a low-rank strategy the
            trainable set is the adapters (+ embeddings, head, norms): they alone cross the
            network, once every H steps.

A DiLoCo worker (`distributed.diloco_worker`) is a node or a process (trainer/topology.py):
  node     the node's G ranks are one data-parallel group every step (DDP or ZeRO-1/2 over the
           intra-node group: nothing crosses nodes between outer steps). At an outer step
           each rank owns 1/G of the flattened trainable set (a contiguous slice, the same
           slicing under DDP and ZeRO: with fp32 module weights ZeRO-1/2 keep the full fp32
           master in every rank's module tensor, so any slice reads locally). It all-reduces
           its slice of the pseudo-gradient over its inter-node group (the ranks with its
           local rank), applies the outer step to it, and the node all-gathers the slices. A
           node sends trainable bytes x 2(m-1)/m to the others over all its ranks' links (m
           nodes), and the anchor and outer momentum are sharded 1/G per rank.
  process  every rank is a worker (a node of one): no wrapper, the slice is everything, and
           the pseudo-gradient is all-reduced over the world.

The loop asks `after_step(step, engine)` whether ranks are identical now (always for
every_step; at outer steps for diloco): strategy edits (merges, switches) and the rank checksum
guard run only then, so seeded edits made on every rank stay identical. After an edit or a
change of the trainable set the loop calls `reanchor(engine)`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer import comm, topology
from trainer.errors import CheckpointError


class EveryStep:
    name = "every_step"
    local_steps = False  # ranks are identical after every step

    first_worker = True  # every rank holds the state a checkpoint keeps

    def __init__(self, top: topology.Topology | None = None):
        self.data_parallel = (top or topology.current()).world_group  # what the engine syncs over

    def describe(self) -> str:
        return "sync: gradients all-reduced over every rank at every step"

    def after_step(self, step: int, engine) -> bool:
        return True

    def reanchor(self, engine) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, slices: list) -> None:
        pass


class DiLoCo:
    name = "diloco"
    local_steps = True  # workers differ between outer syncs: checkpoints keep every rank's own state

    def __init__(self, inner_steps: int, outer_lr: float, outer_momentum: float, outer_dtype: str = "fp32",
                 worker: str = "node", top: topology.Topology | None = None):
        self.inner_steps, self.lr, self.mu = inner_steps, outer_lr, outer_momentum
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[outer_dtype]
        self.top = top = top or topology.current()
        self.worker = worker
        if worker == "node":
            self.data_parallel, self.outer = top.intra, top.inter
        else:
            self.data_parallel, self.outer = topology.Group((top.rank,)), top.world_group
        # This rank's part of the worker's flattened trainable set: part `part` of `parts`.
        self.part, self.parts = self.data_parallel.ranks.index(top.rank), self.data_parallel.size
        self.names: list[str] = []  # the trainable set, flattened in this order
        self.numels: list[int] = []
        self.start = self.stop = 0  # this rank's slice [start, stop) of the flat trainable set
        # Over this slice: the weights the workers agreed on at the last outer step, and the
        # outer momentum.
        self.anchor = torch.empty(0)
        self.momentum = torch.empty(0)

    def describe(self) -> str:
        workers = self.top.world // self.parts
        what = (f"a worker per node ({workers} x {self.parts} processes, data-parallel inside each)"
                if self.worker == "node" else f"a worker per process ({workers})")
        line = (f"sync: DiLoCo, {what}, H={self.inner_steps}; outer Nesterov lr {self.lr:g}, momentum "
                f"{self.mu:g}, pseudo-gradient in {str(self.dtype).split('.')[-1]}")
        if workers == 1 and self.top.world > 1:
            line += " (one worker: data-parallel every step, the outer step local; diloco_worker=process for more)"
        return line

    @property
    def first_worker(self) -> bool:
        """This rank is in the first worker (node 0, or rank 0): a checkpoint takes the state
        that workers hold differently (weights, inner optimizer, anchor slices) from it."""
        return self.outer.ranks[0] == self.top.rank

    # -- the flat layout ---------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def slice_size(self) -> int:
        """Elements per part (the last may hold fewer): parts are padded to it for the gather."""
        return -(-self.numel // self.parts)

    def _spans(self, named):
        """(param, offset in the flat set, numel) for the trainable parameters `named`."""
        offset = 0
        for (_, p), n in zip(named, self.numels):
            yield p, offset, n
            offset += n

    def _read(self, engine) -> torch.Tensor:
        """This rank's slice of the current weights (fp32)."""
        parts = []
        for p, offset, n in self._spans(engine.trainable()):
            a, b = max(offset, self.start), min(offset + n, self.stop)
            if a < b:
                parts.append(engine.read_param(p).reshape(-1)[a - offset:b - offset])
        return torch.cat(parts) if parts else self.anchor.new_empty(0)

    def _gather(self, *slices: torch.Tensor) -> list[torch.Tensor]:
        """The worker's whole flat tensors from every rank's slices: an all-gather within the
        node (slices padded to slice_size)."""
        if self.parts == 1:
            return list(slices)
        size = self.slice_size
        mine = torch.zeros(len(slices), size, dtype=torch.float32, device=slices[0].device)
        for row, s in zip(mine, slices):
            row[:s.numel()] = s
        out = mine.new_empty(self.parts * len(slices), size)
        dist.all_gather_single(out, mine, group=self.data_parallel.pg)
        out = out.view(self.parts, len(slices), size)
        return [out[:, i].reshape(-1)[:self.numel] for i in range(len(slices))]

    @torch.no_grad()
    def _relayout(self, engine) -> None:
        """The trainable set changed (first call, ReLoRA's warm start ending, adaptive ranks
        reshaping adapters): slice the new set; parameters that stay trainable with their shape
        keep their anchor and momentum, new or reshaped ones start from their current value
        with zero momentum."""
        named = engine.trainable()
        old = {}
        if self.names:
            with comm.phase("startup"):  # part of the re-wrap
                anchor, momentum = self._gather(self.anchor, self.momentum)
            old = dict(zip(self.names, zip(anchor.split(self.numels), momentum.split(self.numels))))
        self.names, self.numels = [n for n, _ in named], [p.numel() for _, p in named]
        self.start = min(self.part * self.slice_size, self.numel)
        self.stop = min(self.start + self.slice_size, self.numel)
        anchors, momenta = [], []
        for (name, p), (_, offset, n) in zip(named, self._spans(named)):
            a, b = max(offset, self.start), min(offset + n, self.stop)
            if a >= b:
                continue
            if name in old and old[name][0].numel() == n:  # a reshaped parameter starts afresh
                anchors.append(old[name][0][a - offset:b - offset])
                momenta.append(old[name][1][a - offset:b - offset])
            else:
                value = engine.read_param(p).reshape(-1)[a - offset:b - offset]
                anchors.append(value)
                momenta.append(torch.zeros_like(value))
        device = next(engine.module.parameters()).device
        self.anchor = torch.cat(anchors).to(device) if anchors else torch.empty(0, device=device)
        self.momentum = torch.cat(momenta).to(device) if momenta else torch.empty(0, device=device)

    # -- the loop's calls --------------------------------------------------------------------
    @torch.no_grad()
    def reanchor(self, engine) -> None:
        """Take the current weights as the anchor where they differ from it (a strategy edit,
        a newly trainable parameter): the outer momentum of exactly those elements restarts
        at zero, as the edited parameters' inner optimizer state did."""
        named = engine.trainable()
        if [n for n, _ in named] != self.names or [p.numel() for _, p in named] != self.numels:
            self._relayout(engine)  # another trainable set, or new shapes (adaptive rank)
        value = self._read(engine)
        changed = value != self.anchor
        self.anchor[changed] = value[changed]
        self.momentum[changed] = 0.0

    @torch.no_grad()
    def after_step(self, step: int, engine) -> bool:
        if step % self.inner_steps:
            return False
        if not self.names:
            raise RuntimeError("DiLoCo.reanchor() was never called: the anchor is empty")
        # The outer arithmetic runs in fp64, where anchor - (anchor - local) is exactly local:
        # at outer lr 1 and momentum 0 one rank reproduces plain training bit for bit.
        delta = self.anchor.double() - self._read(engine).double()
        m = self.outer.size
        if m > 1:  # the one inter-worker collective: this slice's pseudo-gradient, in outer_dtype
            wire = delta.to(self.dtype)
            with comm.phase("sync"):
                dist.all_reduce(wire, group=self.outer.pg)
            delta = wire.double().div_(m)
        self.momentum.mul_(self.mu).add_(delta.float())
        # Nesterov, as torch.optim.SGD(nesterov=True): step along g + mu * m.
        step_dir = delta.add(self.momentum.double(), alpha=self.mu)
        self.anchor = self.anchor.double().sub_(step_dir, alpha=self.lr).float()
        with comm.phase("sync"):
            (whole,) = self._gather(self.anchor)
        for p, offset, n in self._spans(engine.trainable()):
            engine.write_param(p, whole[offset:offset + n].view_as(p))
        return True

    # -- checkpoints: every rank's own slice -------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's own slice [start, start + len(anchor)) of the flat trainable set (the
        names and sizes say how it is flattened): different on every rank of a node. The
        tensors are the live ones, as a module's state_dict gives them: the checkpoint layer
        writes them in place or stages its own copy."""
        return {"names": list(self.names), "numels": list(self.numels), "start": self.start,
                "anchor": self.anchor, "momentum": self.momentum}

    def load_state_dict(self, slices: list[dict]) -> None:
        """This rank's slice from saved slices (`state_dict()` of the ranks that saved, any
        number of them, sliced any way: a world size may change). Call after reanchor has
        laid out the same trainable set."""
        anchor, momentum = torch.zeros_like(self.anchor), torch.zeros_like(self.momentum)
        covered = torch.zeros(self.stop - self.start, dtype=torch.bool)
        for s in slices:
            if s["names"] != self.names or s["numels"] != self.numels:
                raise CheckpointError("the checkpoint's DiLoCo state was laid out over another trainable set")
            a, b = max(self.start, s["start"]), min(self.stop, s["start"] + s["anchor"].numel())
            if a < b:
                src, dst = slice(a - s["start"], b - s["start"]), slice(a - self.start, b - self.start)
                anchor[dst], momentum[dst], covered[dst] = s["anchor"][src], s["momentum"][src], True
        if not covered.all():
            raise CheckpointError(f"the checkpoint holds no DiLoCo anchor for elements {self.start}..{self.stop} of "
                                  f"the trainable set (it predates sliced DiLoCo state, or ranks are missing)")
        self.anchor, self.momentum = anchor, momentum


def build_sync(cfg):
    d = cfg.distributed
    if d.sync == "diloco":
        return DiLoCo(d.diloco_inner_steps, d.outer_lr, d.outer_momentum, d.outer_dtype, d.diloco_worker)
    return EveryStep()
