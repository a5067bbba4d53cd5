"""The engine adapter: the one place that knows whether DDP or DeepSpeed holds the weights.

Strategies and checkpoints read and write parameters and optimizer state through it. Under
DDP the module's fp32 tensors are the masters and are edited in place. Under DeepSpeed ZeRO
the optimizer keeps flat fp32 master partitions that overwrite in-place edits at the next
step, so edits go through `deepspeed.utils.safe_set_full_*` (every rank must call them, in
the same order) and the module's working copy is refreshed by hand.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Engine:
    def __init__(self, accelerator, model: nn.Module, optimizer):
        self.accelerator = accelerator
        self.model = model  # as prepared (DDP wrapper or DeepSpeed engine)
        self.optimizer = optimizer  # as prepared (AcceleratedOptimizer)
        self.deepspeed = accelerator.distributed_type.name == "DEEPSPEED"

    @property
    def module(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The innermost torch optimizer (under DeepSpeed it holds flat partitions)."""
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def _managed(self, p: nn.Parameter) -> bool:
        return self.deepspeed and getattr(p, "_hp_mapping", None) is not None

    # -- parameters ------------------------------------------------------------------------
    @torch.no_grad()
    def read_param(self, p: nn.Parameter) -> torch.Tensor:
        """The full fp32 master value of `p` (a copy)."""
        if self._managed(p):
            from deepspeed.utils import safe_get_full_fp32_param
            return safe_get_full_fp32_param(p).detach().clone()
        return p.detach().float().clone()

    @torch.no_grad()
    def write_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Set the master value of `p` and the module's working copy."""
        if self._managed(p):
            from deepspeed.utils import safe_set_full_fp32_param
            safe_set_full_fp32_param(p, value.to(torch.float32))
        p.copy_(value.to(p.dtype))

    # -- optimizer state -------------------------------------------------------------------
    @torch.no_grad()
    def read_state(self, p: nn.Parameter, key: str) -> torch.Tensor | None:
        if self._managed(p):
            from deepspeed.utils import safe_get_full_optimizer_state
            return safe_get_full_optimizer_state(p, key)
        state = self.torch_optimizer.state.get(p, {})
        value = state.get(key)
        return None if value is None else value.detach().clone()

    @torch.no_grad()
    def write_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self._managed(p):
            from deepspeed.utils import safe_set_full_optimizer_state
            safe_set_full_optimizer_state(p, value, key)
            return
        state = self.torch_optimizer.state[p]
        if key in state and torch.is_tensor(state[key]):
            state[key].copy_(value)
        else:
            state[key] = value.clone()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    # -- whole-optimizer state, world-size independent (checkpoints) -----------------------
    def optimizer_state_dict(self) -> dict:
        """{param_name: {key: full tensor}}: the same on every rank and for any world size.
        Under DeepSpeed every rank must call this (the gathers are collectives)."""
        out = {}
        for name, p in self.trainable():
            keys = self._state_keys(p)
            out[name] = {k: self.read_state(p, k) for k in keys}
        return out

    def load_optimizer_state_dict(self, state: dict) -> None:
        for name, p in self.trainable():
            for key, value in state.get(name, {}).items():
                if value is not None:
                    self.write_state(p, key, value)

    def _state_keys(self, p) -> list[str]:
        if self._managed(p):
            # Flat partitions: every tensor state of Adam-style optimizers.
            return ["exp_avg", "exp_avg_sq"]
        return [k for k, v in self.torch_optimizer.state.get(p, {}).items() if torch.is_tensor(v)]
