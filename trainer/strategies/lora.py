"""LoRA for pretraining (Hu et al. 2021, applied from scratch as in the ReLoRA paper's
baseline): every targeted linear becomes W x + s B (A x) with W frozen.

Algorithm:
  init    wrap q, k, v, o, gate, up, down; A ~ Kaiming-uniform (a = sqrt(5), as nn.Linear
          and PEFT), B = 0, so the model starts as the plain network; s = alpha / r.
          Embeddings, head and norms stay fully trainable (as the papers). Hybrid rank
          (strategies/rank_plan.py): linears matching strategy.full_rank stay plain and train
          full rank; strategy.ranks gives each projection its own r (and s = alpha / r).
  step    AdamW on A, B and the full-rank parameters; W never changes (no merges).

`LoRALinear` and the helpers below are shared by ReLoRA and SwitchLoRA.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.seeding import Purpose, seeded_generator
from trainer.strategies.base import Strategy
from trainer.strategies.rank_plan import TARGETS, adapter_ranks, layer_modules

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


def _fp32(x: float) -> float:
    """x rounded to fp32: forward (a Python float) and merges (the fp32 buffer) use one scale."""
    return float(torch.tensor(x, dtype=torch.float32, device="cpu"))


THIN_RANK = 16  # below it, a CPU forms the adapter's N x r products transposed (_FusedLowRank)


class _FusedLowRank(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T from one buffer `wa` whose rows are [W; A].

    Forward on a GPU: one GEMM x [W; A]^T reads x once for both products (the adapter's
    skinny GEMM is bandwidth-bound there). On a CPU two GEMMs and an in-place add are 7-10%
    faster than that (docs/LOG.md: MKL, 1B widths). Backward: W's weight gradient is never
    formed (W is frozen); dX = dY W + (s dY B) A accumulates in place, which measured faster
    than one GEMM over [dY, s dY B] (that needs a copy of dY); dA reads x once more. Only x,
    h = x A^T (N x r, its own storage) and the buffer are saved.

    Below rank 16 on a CPU, the N x r and out x r products are formed as their transposes
    (r rows) and used as views: MKL runs a product with fewer than 16 output columns 2-4x
    slower than the same product transposed (docs/LOG.md; from rank 16 the plain form wins)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, wa, A, B, scale: float, n_out: int):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.thin = not x2.is_cuda and wa.shape[0] - n_out < THIN_RANK
        if x2.is_cuda:
            both = x2 @ wa.t()
            # h copied out: a view would keep all of `both` (N x (out + r)) alive until backward.
            y, h = both[:, :n_out], both[:, n_out:].contiguous()
            out = torch.addmm(y, h, B.t(), alpha=scale)
        else:
            A = wa[n_out:]
            h = (A @ x2.t()).t() if ctx.thin else x2 @ A.t()
            out = (x2 @ wa[:n_out].t()).addmm_(h, B.t().to(h.dtype), alpha=scale)
        ctx.save_for_backward(x2, wa, B, h)
        ctx.scale, ctx.n_out, ctx.x_shape = scale, n_out, x.shape
        return out.view(*x.shape[:-1], n_out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, wa, B, h = ctx.saved_tensors
        s, n_out = ctx.scale, ctx.n_out
        g = dy.reshape(-1, n_out)
        thin, B = ctx.thin, B.to(g.dtype)
        gb = ((B.t() @ g.t()).t() if thin else g @ B).mul_(s)  # s dY B, N x r
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            W, A = wa[:n_out].to(g.dtype), wa[n_out:].to(g.dtype)
            dx = (g @ W).addmm_(gb, A).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            dA = gb.t() @ x2.to(gb.dtype)
        if ctx.needs_input_grad[3]:
            h = h.to(g.dtype)
            dB = ((h.t() @ g).t() if thin else g.t() @ h).mul_(s)
        return dx, None, dA, dB, None, None


class LoRALinear(nn.Module):
    """y = x W^T + s (dropout(x) A^T) B^T. Replaces an nn.Linear in place (same name, and the
    same `weight` Parameter object, so no copy and no device change).

    W and A are row blocks of one buffer `_wa` ([W; A]) so that the fused path reads x once
    for both; the Parameters stay the same objects and their `.data` are views into it, so
    in-place edits (merges, switches, checkpoint loads: `p.copy_`) reach the buffer with no
    copy per step. Something that re-points `.data` breaks that alias: a device move
    re-points W (the buffer is rebuilt on the next forward), and DeepSpeed flattens the
    trainable A into its own buffer (then A's rows are copied in before each forward, r rows,
    so a stale copy is never trained). Dropout, a trainable W (ReLoRA's warm start) and W
    managed by ZeRO-3 take the plain path.

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
        self.scale = _fp32(scale)  # a Python float (no host read per forward) of the value lora_scale holds
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._wa: torch.Tensor | None = None  # not a registered buffer: no state_dict entry, no DDP broadcast
        self._a_aliased = False
        if not w.is_meta:
            self.fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """(Re)build [W; A] from the current values and point W (and A, where it is a tensor
        of its own, not a view into an engine's flat buffer) at its rows."""
        W, A = self.weight, self.lora_A
        wa = torch.empty(self.out_features + self.rank, self.in_features, device=W.device, dtype=W.dtype)
        wa[:self.out_features].copy_(W)
        wa[self.out_features:].copy_(A)
        W.data = wa[:self.out_features]
        if A.dtype == W.dtype and A.device == W.device and A.untyped_storage().nbytes() == A.numel() * A.element_size():
            A.data = wa[self.out_features:]
        self._wa = wa
        self._a_aliased = A.data_ptr() == wa[self.out_features:].data_ptr()

    def _fused_buffer(self) -> torch.Tensor | None:
        """[W; A] with current values, or None where the plain path must run."""
        W, A = self.weight, self.lora_A
        if W.requires_grad or isinstance(self.dropout, nn.Dropout) or hasattr(W, "ds_id") or W.is_meta:
            return None
        if torch.compiler.is_compiling():
            # Aliases are checked in eager mode (refresh_fused after the engine is built:
            # only a wrapper re-points .data); a data_ptr in the graph would break it at
            # every layer. A not aliased (ZeRO) would need a copy in the graph: plain path.
            return self._wa if self._a_aliased else None
        wa = self._wa
        if wa is None or W.data_ptr() != wa.data_ptr() or W.device != wa.device or W.dtype != wa.dtype:
            self.fuse()
            wa = self._wa
        rows = wa[self.out_features:]
        self._a_aliased = A.data_ptr() == rows.data_ptr() and A.dtype == rows.dtype
        if not self._a_aliased:
            with torch.no_grad():
                rows.copy_(A)
        return wa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wa = self._fused_buffer()
        if wa is not None and (x.dtype == wa.dtype or torch.is_autocast_enabled(x.device.type)):
            out = _FusedLowRank.apply(x, wa, self.lora_A, self.lora_B, self.scale, self.out_features)
            return out if self.bias is None else out + self.bias
        W = self.weight if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type) \
            else self.weight.to(x.dtype)  # a bf16 frozen W under fp32 compute
        # A 0-dim scale does not promote a bf16 activation under autocast.
        return F.linear(x, W, self.bias) + self.lora_scale * F.linear(
            F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def resize(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """New adapters A [r, in], B [out, r] of any rank r, scale s. They are new Parameters:
        an optimizer and a data-parallel wrapper must be built for them (ReLoRA's adaptive
        rank does this at a merge, through the loop's rewrap), and their state starts empty."""
        like = self.lora_A
        self.rank = A.shape[0]
        self.lora_A = nn.Parameter(A.to(like.device, like.dtype), requires_grad=like.requires_grad)
        self.lora_B = nn.Parameter(B.to(like.device, like.dtype), requires_grad=like.requires_grad)
        self.lora_scale.fill_(scale)
        self.scale = _fp32(scale)
        if not self.weight.is_meta:
            self.fuse()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain linear this layer computes (dropout aside), in fp32."""
        return merge(self.weight, self.lora_A, self.lora_B, self.lora_scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def refresh_fused(model: nn.Module) -> None:
    """Check (and rebuild) every fused buffer once in eager mode, after an engine may have
    moved or re-pointed parameters: a compiled graph trusts them afterwards."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m._fused_buffer()


def targeted_linears(model: nn.Module, targets) -> list[tuple[str, str]]:
    """(module path, projection) of the linears `targets` names (wrapped or not), in module order."""
    short = {leaf: t for t, leaf in TARGETS.items() if t in set(targets)}
    return [(name, short[name.rsplit(".", 1)[-1]]) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in short and isinstance(m, (nn.Linear, LoRALinear))]


def wrap_linears(model: nn.Module, ranks: dict[str, int], scale, dropout: float) -> list[tuple[str, LoRALinear]]:
    """Replace each nn.Linear that `ranks` ({module path: r}) names by a LoRALinear of rank r
    and scale `scale(r)`; return all LoRALinears in module order. Idempotent: already wrapped
    layers are kept (their position is each layer's module index, which seeds its random
    draws, so the order must not depend on when wrapping happened)."""
    for name, module in list(model.named_modules()):
        if name in ranks and type(module) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            r = ranks[name]
            setattr(model.get_submodule(parent) if parent else model, leaf, LoRALinear(module, r, scale(r), dropout))
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
    if getattr(cfg, "frozen_dtype", "fp32") != "bf16":  # fp32: W keeps the model's dtype
        return
    for m in model.modules():
        if isinstance(m, LoRALinear) and not m.weight.requires_grad and m.weight.dtype != torch.bfloat16 \
                and not m.weight.is_meta:
            # A frozen W changes only by merges and switches, which add in fp32 (read_param)
            # and round once when stored back (write_param): bf16 halves its memory.
            m.weight.data = m.weight.data.to(torch.bfloat16)
            m.fuse()


class LoRA(Strategy):
    name = "lora"

    @classmethod
    def check_config(cls, cfg) -> None:
        from trainer.config import check
        from trainer.shapes import model_args
        s = cfg.strategy
        check(s.rank > 0, "strategy.rank", s.rank, "> 0")
        check(s.alpha > 0, "strategy.alpha", s.alpha, "> 0")
        check(0 <= s.dropout < 1, "strategy.dropout", s.dropout, "in [0, 1)")
        check(len(s.targets) > 0, "strategy.targets", s.targets, "at least one of " + ", ".join(TARGETS))
        for t, r in s.ranks.items():
            check(t in s.targets, f"strategy.ranks.{t}", r, f"a projection of strategy.targets={s.targets}")
        if cls.name != "relora":
            check(s.rank_budget == 0, "strategy.rank_budget", s.rank_budget,
                  "0 unless strategy.name=relora (adaptive ranks are re-chosen at merges)")
        if not cfg.model.init_from:  # else the layer count is the checkpoint's: apply checks then
            layers = model_args(cfg.model, cfg.data.seq_len, vocab_size=1).num_layers
            adapter_ranks(layer_modules(layers, s.targets), s)

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.adapters: list[tuple[str, LoRALinear]] = []

    def scale(self, rank: int) -> float:
        return self.cfg.alpha / rank

    def plan(self, model: nn.Module, state: dict | None) -> dict[str, int]:
        """{module path: rank} of the linears to adapt (hybrid rank: strategies/rank_plan.py)."""
        return adapter_ranks(targeted_linears(model, self.cfg.targets), self.cfg)

    def apply(self, model: nn.Module, weight_decay: float, step: int = 0, state: dict | None = None) -> list[dict]:
        self.adapters = wrap_linears(model, self.plan(model, state), self.scale, self.cfg.dropout)
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

    def describe(self, model: nn.Module) -> str:
        ranks = sorted({m.rank for _, m in self.adapters})
        wrapped = len(targeted_linears(model, self.cfg.targets))
        note = f"; ranks {ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else ""
        if len(self.adapters) < wrapped:
            note += f"; {wrapped - len(self.adapters)} of {wrapped} targeted linears full rank"
        return super().describe(model) + note
