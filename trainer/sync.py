"""When and what crosses the network between ranks: a sync mode. Separate from the strategy,
which decides what trains; any strategy composes with any sync mode.

every_step  the data-parallel engine (DDP or DeepSpeed ZeRO) synchronises gradients at every
            optimizer step; ranks hold identical weights after every step.
diloco      DiLoCo (arXiv 2311.08105; OpenDiLoCo, arXiv 2407.07852). Each rank takes H inner
            optimizer steps on its own data with no gradient synchronisation; then one
            all-reduce averages the pseudo-gradient  delta = anchor - local  over the trainable
            parameters, an outer Nesterov SGD moves the anchor, and every rank sets
            local = anchor. Inner optimizer state stays per rank. With a low-rank strategy the
            trainable set is the adapters (+ embeddings, head, norms): they alone cross the
            network, once every H steps.

The loop asks `after_step(step, engine)` whether ranks are identical now (always for
every_step; at outer steps for diloco): strategy edits (merges, switches) and the rank checksum
guard run only then, so seeded edits made on every rank stay identical. After an edit or a
change of the trainable set the loop calls `reanchor(engine)`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer import comm


class EveryStep:
    name = "every_step"
    local_steps = False  # the engine all-reduces gradients every step

    def after_step(self, step: int, engine) -> bool:
        return True

    def reanchor(self, engine) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DiLoCo:
    name = "diloco"
    local_steps = True  # no gradient all-reduce: the model is not wrapped for data parallelism

    def __init__(self, inner_steps: int, outer_lr: float, outer_momentum: float, outer_dtype: str = "fp32"):
        self.inner_steps, self.lr, self.mu = inner_steps, outer_lr, outer_momentum
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[outer_dtype]
        self.anchor: dict[str, torch.Tensor] = {}  # the weights every rank agreed on at the last outer step
        self.momentum: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def reanchor(self, engine) -> None:
        """Take the current weights as the anchor where they differ from it (a strategy edit, a
        newly trainable parameter): the outer momentum of such a parameter restarts at zero,
        as its inner optimizer state did. Parameters no longer trainable leave the anchor."""
        trainable = dict(engine.trainable())
        for name in [n for n in self.anchor if n not in trainable]:
            del self.anchor[name], self.momentum[name]
        for name, p in trainable.items():
            value = engine.read_param(p)
            if name not in self.anchor or not torch.equal(self.anchor[name], value):
                self.anchor[name] = value
                self.momentum[name] = torch.zeros_like(value)

    @torch.no_grad()
    def after_step(self, step: int, engine) -> bool:
        if step % self.inner_steps:
            return False
        if not self.anchor:
            raise RuntimeError("DiLoCo.reanchor() was never called: the anchor is empty")
        named = engine.trainable()
        # The outer arithmetic runs in fp64, where anchor - (anchor - local) is exactly local:
        # at outer lr 1 and momentum 0 one rank reproduces plain training bit for bit.
        deltas = [self.anchor[n].double() - engine.read_param(p).double() for n, p in named]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:  # the one collective: the pseudo-gradient, in outer_dtype
            flat = torch.cat([d.reshape(-1) for d in deltas]).to(self.dtype)
            with comm.phase("sync"):
                dist.all_reduce(flat)
            flat = flat.double().div_(world)
            deltas = [f.view_as(d) for f, d in zip(flat.split([d.numel() for d in deltas]), deltas)]
        for (name, p), g in zip(named, deltas):
            m = self.momentum[name].mul_(self.mu).add_(g.float())
            # Nesterov, as torch.optim.SGD(nesterov=True): step along g + mu * m.
            anchor = self.anchor[name].double().sub_(g.add(m.double(), alpha=self.mu), alpha=self.lr)
            self.anchor[name] = anchor.float()
            engine.write_param(p, self.anchor[name])
        return True

    def state_dict(self) -> dict:
        return {"anchor": {k: v.cpu() for k, v in self.anchor.items()},
                "momentum": {k: v.cpu() for k, v in self.momentum.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = {k: v.clone() for k, v in state["anchor"].items()}
        self.momentum = {k: v.clone() for k, v in state["momentum"].items()}

    def to(self, device) -> "DiLoCo":
        self.anchor = {k: v.to(device) for k, v in self.anchor.items()}
        self.momentum = {k: v.to(device) for k, v in self.momentum.items()}
        return self


def build_sync(cfg):
    d = cfg.distributed
    if d.sync == "diloco":
        return DiLoCo(d.diloco_inner_steps, d.outer_lr, d.outer_momentum, d.outer_dtype)
    return EveryStep()
