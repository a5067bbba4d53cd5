"""LoRA for pretraining (Hu et al. 2021, applied from scratch as in the ReLoRA paper's
baseline): every targeted linear becomes W x + s B (A x) with W frozen.

Algorithm:
  init    wrap q, k, v, o, gate, up, down; A ~ Kaiming-uniform (a = sqrt(5), as nn.Linear
          and PEFT), B = 0, so the model starts as the plain network; s = alpha / r.
          Embeddings, head and norms stay fully trainable (as the papers).
  step    AdamW on A, B and the full-rank parameters; W never changes (no merges).

`LoRALinear` and the helpers below are shared by ReLoRA and SwitchLoRA.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.seeding import Purpose, seeded_generator
from trainer.shapes import PROJECTIONS
from trainer.strategies.base import Strategy

TARGETS = {short: path.rsplit(".", 1)[-1] for short, path in PROJECTIONS.items()}  # "q" -> "q_proj"

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_scale")


def merge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """W + s B A in fp32: the one merge formula (training merges go through the engine with
    the same arithmetic; export, evaluation and analysis call this)."""
    return torch.addmm(W.float(), B.float(), A.float(), alpha=float(scale))


def merged_state_dict(state_dict: dict) -> dict:
    """A checkpoint's state dict with each adapter folded into its weight and the adapter
    keys dropped: the plain model the adapters compute (dropout aside)."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ADAPTER_KEYS:
            continue
        if leaf == "weight" and f"{prefix}.lora_A" in state_dict:
            value = merge(value, state_dict[f"{prefix}.lora_A"], state_dict[f"{prefix}.lora_B"],
                          state_dict[f"{prefix}.lora_scale"])
        out[key] = value
    return out


class LoRALinear(nn.Module):
    """y = x W^T + s (dropout(x) A^T) B^T. Replaces an nn.Linear in place (same name, and the
    same `weight` Parameter object, so no copy and no device change).

    `lora_scale` is a persistent buffer so that a checkpoint describes itself: anything that
    reads one (export, analysis) merges as W + lora_scale * B @ A without the run's config.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.register_buffer("lora_scale", torch.tensor(float(scale), dtype=torch.float32, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 0-dim scale does not promote a bf16 activation under autocast.
        return F.linear(x, self.weight, self.bias) + self.lora_scale * F.linear(
            F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain linear this layer computes (dropout aside), in fp32."""
        return merge(self.weight, self.lora_A, self.lora_B, self.lora_scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={float(self.lora_scale):g}"


def wrap_linears(model: nn.Module, targets, rank: int, scale: float, dropout: float) -> list[tuple[str, LoRALinear]]:
    """Replace each targeted nn.Linear by a LoRALinear; return all LoRALinears in module order.
    Idempotent: already wrapped layers are kept (their position is each layer's module index,
    which seeds its random draws, so the order must not depend on when wrapping happened)."""
    suffixes = {TARGETS[t] for t in targets}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in suffixes and type(module) is nn.Linear:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, LoRALinear(module, rank, scale, dropout))
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def kaiming_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn on the CPU from `generator` so every rank and every resume draws the same."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


def set_trainable(model: nn.Module, cfg, *, adapters: bool, wrapped_weights: bool) -> None:
    """requires_grad for every parameter: adapters and the wrapped (frozen) W as asked;
    embeddings, head and norms per the config; any untargeted linear trains full-rank (a
    randomly initialised layer that never trains would be dead weight)."""
    wrapped = {id(m.weight) for m in model.modules() if isinstance(m, LoRALinear)}
    wrapped |= {id(m.bias) for m in model.modules() if isinstance(m, LoRALinear) and m.bias is not None}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B"):
            flag = adapters
        elif id(p) in wrapped:
            flag = wrapped_weights
        elif name.startswith("embed_tokens"):
            flag = cfg.train_embeddings
        elif name.startswith("lm_head"):
            flag = cfg.train_head
        elif "norm" in name:
            flag = cfg.train_norms
        else:
            flag = True
        p.requires_grad_(flag)


class LoRA(Strategy):
    name = "lora"

    @classmethod
    def check_config(cls, cfg) -> None:
        from trainer.config import check
        s = cfg.strategy
        check(s.rank > 0, "strategy.rank", s.rank, "> 0")
        check(s.alpha > 0, "strategy.alpha", s.alpha, "> 0")
        check(0 <= s.dropout < 1, "strategy.dropout", s.dropout, "in [0, 1)")
        check(len(s.targets) > 0, "strategy.targets", s.targets, "at least one of " + ", ".join(TARGETS))

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.adapters: list[tuple[str, LoRALinear]] = []

    def scale(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    def apply(self, model: nn.Module, weight_decay: float, step: int = 0) -> list[dict]:
        self.adapters = wrap_linears(model, self.cfg.targets, self.cfg.rank, self.scale(), self.cfg.dropout)
        self.init_adapters()
        return self.set_phase(model, weight_decay, step)

    @torch.no_grad()
    def init_adapters(self) -> None:
        for index, (_, m) in enumerate(self.adapters):
            if m.lora_A.is_meta:  # parameter counting without allocation
                continue
            m.lora_A.copy_(kaiming_uniform(m.lora_A.shape, seeded_generator(self.seed, 0, index, Purpose.A_INIT)))
            m.lora_B.zero_()

    def set_phase(self, model: nn.Module, weight_decay: float, step: int) -> list[dict]:
        set_trainable(model, self.cfg, adapters=True, wrapped_weights=False)
        return self.param_groups(model, weight_decay)
