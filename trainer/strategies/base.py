"""The strategy plugin interface. The loop calls these at fixed points and knows no strategy
by name; a strategy edits weights and optimizer state only through `ctx.engine`, so that the
same code is right under DDP (tensors are the masters) and DeepSpeed (fp32 master copies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from trainer.model import configure_optimizer_groups, humanize


@dataclass
class StepContext:
    """What `after_step` may use. `engine` is a trainer.engine.Engine: weights and optimizer
    state are read and written only through it."""
    engine: Any
    max_steps: int


class Strategy:
    """Full-rank training: every parameter trains, nothing happens between steps."""

    name = "full"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Check the `strategy.*` keys this strategy reads (a trainer.config.Config, called
        only when this strategy is chosen) and resolve defaults that depend on other keys;
        raise ConfigError naming the key."""

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.seed = seed

    # -- set-up ----------------------------------------------------------------------------
    def apply(self, model: nn.Module, weight_decay: float, step: int = 0, state: dict | None = None) -> list[dict]:
        """Prepare `model` in place (wrap linears, set requires_grad) and return the
        optimizer's parameter groups. `step` is the optimizer step the run starts at (0, or
        the resumed step): a strategy whose trainable set changes over time (ReLoRA's warm
        start) sets the one for that step, so a resumed run wraps and builds its optimizer
        right the first time. `state` is the resumed checkpoint's `state_dict()` of this
        strategy (None on a fresh start): a strategy whose shapes change over time (ReLoRA's
        adaptive ranks) builds the checkpoint's shapes from it; `load_state_dict` still
        follows once the engine is built."""
        for p in model.parameters():
            p.requires_grad_(True)
        return self.param_groups(model, weight_decay)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Groups over the currently trainable parameters (called again after a rewrap).
        Adapters get groups of their own: DeepSpeed keeps one Adam step count per flat group,
        and adapters born at a rewrap must not inherit the embeddings' count."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adapters = [(n, p) for n, p in named if "lora_" in n]
        others = [(n, p) for n, p in named if "lora_" not in n]
        return (configure_optimizer_groups(others, weight_decay)
                + configure_optimizer_groups(adapters, weight_decay))

    def rewrap(self, model: nn.Module, step: int, weight_decay: float) -> list[dict]:
        """Called by the loop when `needs_rewrap(step)`: set requires_grad for step `step` on
        the unwrapped model and return the new parameter groups; the loop then builds a new
        optimizer (`make_optimizer`) and a new data-parallel wrapper. Only a strategy whose
        trainable set changes over time overrides this; for the others `apply` would wrap and
        initialise again, destroying what was trained."""
        raise RuntimeError(f"strategy {self.name!r} never changes its trainable set; rewrap at step {step} "
                           "would re-initialise it")

    def describe(self, model: nn.Module) -> str:
        """One start-up line: total / trainable / frozen parameters and the trainable share."""
        c = param_counts(model)
        share = c["trainable"] / max(1, c["base"])
        extra = f" (base {humanize(c['base'])} + adapters {humanize(c['adapter'])})" if c["adapter"] else ""
        return (f"strategy {self.name}: params {humanize(c['total'])}{extra}, trainable {humanize(c['trainable'])}, "
                f"frozen {humanize(c['frozen'])}; trainable share {100 * share:.1f}% of the base model")

    def make_optimizer(self, groups: list[dict], opt_cfg) -> torch.optim.Optimizer:
        # fused: one pass over each tensor's weight, gradient and moments. On a CPU that is
        # 8x the single-tensor step (100M parameters: 0.05 s against 0.44 s, docs/LOG.md);
        # on a GPU one kernel instead of about ten per tensor.
        return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
                                 fused=True)

    # -- each step -------------------------------------------------------------------------
    def lr_multiplier(self, step: int, sched, max_steps: int) -> float:
        """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup then
        cosine down to the floor."""
        return cosine_with_warmup(step, sched.warmup_steps, max_steps, sched.min_lr_ratio, sched.decay)

    def after_step(self, step: int, ctx: StepContext) -> str | None:
        """Called after optimizer step `step` (1-based count of finished steps). Returns a
        short event name ("merge", "switch") when weights changed, else None."""
        return None

    def event_record(self) -> dict:
        """Fields for the metrics record of the step whose `after_step` returned an event
        (ReLoRA: the merged updates' mean PER and, adaptive, the next cycle's ranks)."""
        return {}

    def needs_rewrap(self, step: int) -> bool:
        """True when the trainable set (or a trainable shape) for optimizer step `step`
        differs from the one last applied: the loop must call `rewrap` and rebuild the
        data-parallel wrapper and optimizer (DDP only syncs what was trainable at wrap time).
        Optimizer state carries over for the parameters that `rewrap` keeps (the same
        Parameter objects); new ones start with none."""
        return False

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- accounting ------------------------------------------------------------------------
    def trainable_bytes(self, model: nn.Module) -> int:
        """Bytes of gradient a data-parallel step must synchronise."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts by kind. `base` excludes adapters (`lora_A`/`lora_B`): the papers'
    trainable shares (ReLoRA: 74% at 60M, 53% at 130M, 19% at 1B) are relative to it."""
    total = trainable = adapter = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        adapter += n if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") else 0
    return dict(total=total, trainable=trainable, frozen=total - trainable, adapter=adapter, base=total - adapter)


def cosine_with_warmup(step: int, warmup: int, total: int, floor: float, decay: str = "cosine") -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
