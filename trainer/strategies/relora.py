"""ReLoRA (Lialin et al. 2023, arXiv 2307.05695): a sequence of low-rank updates whose sum is
high-rank.

Algorithm (q = reset_every, N = warm_start_steps):
  init     wrap q, k, v, o, gate, up, down as W x + s B (A x), s = alpha / r;
           A ~ Kaiming-uniform, B = 0 (not A = 0: the reference's zero A learns nothing
           until the first reset, its issue #18).
  warm     steps [0, N): full-rank training. W trains; the adapters exist but are frozen
           and contribute nothing (B = 0). At step N the loop rebuilds the DDP wrapper and
           the optimizer (`needs_rewrap`), W freezes and A, B start training.
  step     AdamW on A, B, embeddings, head and norms.
  merge    after step N + k q (k >= 1), for every wrapped layer, in fp32:
             W <- W + s B A      (the scale belongs in it; the small-model study's fork
                                  dropped it and so merged the wrong update)
             A <- Kaiming-uniform (fresh draw), B <- 0   (the output is unchanged)
             Adam state of A and B pruned in place (zero | random | magnitude, both
             moments of an element together); the step count is kept, and no other
             parameter's state is touched.
  schedule one global cosine from the end of warmup down to min_lr_ratio; at each restart
           (every merge, and the end of the warm start) the LR drops to 0 and ramps back
           linearly over restart_warmup steps: lr(t) = cosine(t) * min(1, (t - t_r) / w).
           The step at a restart has LR 0: it refills the pruned moments with one gradient
           before anything moves.

The merge schedule counts from the end of the warm start, so every cycle is a full q steps
of low-rank training. Random draws come from seeded_generator(seed, step, layer, purpose):
every rank draws the same without communicating, and a resumed run redraws them exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer import comm
from trainer.seeding import Purpose, seeded_generator
from trainer.strategies.base import StepContext, cosine_with_warmup
from trainer.strategies.lora import LoRA, kaiming_uniform, merge, set_trainable


class ReLoRA(LoRA):
    name = "relora"

    @classmethod
    def check_config(cls, cfg) -> None:
        import warnings

        from trainer.config import check, one_of
        super().check_config(cfg)
        s, max_steps = cfg.strategy, cfg.train.max_steps
        check(s.reset_every > 0, "strategy.reset_every", s.reset_every, "> 0")
        check(s.warm_start_steps >= 0, "strategy.warm_start_steps", s.warm_start_steps, ">= 0")
        one_of("strategy.optimizer_reset", s.optimizer_reset, ["zero", "random", "magnitude"])
        one_of("strategy.prune_moments", s.prune_moments, ["joint", "independent"])
        check(0 <= s.reset_ratio <= 1, "strategy.reset_ratio", s.reset_ratio, "in [0, 1]")
        check(s.restart_warmup >= 0, "strategy.restart_warmup", s.restart_warmup, ">= 0")
        # The default re-warmup would outlast a short cycle: shorten it unless the user chose it.
        if "strategy.restart_warmup" not in cfg.set_keys and s.restart_warmup >= s.reset_every:
            s.restart_warmup = s.reset_every // 2
        check(s.restart_warmup < s.reset_every, "strategy.restart_warmup", s.restart_warmup,
              f"< strategy.reset_every={s.reset_every}")
        if cfg.distributed.sync == "diloco":
            # Merges and the warm start's end must fall on outer syncs, when every rank holds
            # the same weights: a merge elsewhere would fold in one rank's local drift.
            h = cfg.distributed.diloco_inner_steps
            check(s.reset_every % h == 0, "strategy.reset_every", s.reset_every,
                  f"a multiple of distributed.diloco_inner_steps={h}")
            check(s.warm_start_steps % h == 0, "strategy.warm_start_steps", s.warm_start_steps,
                  f"a multiple of distributed.diloco_inner_steps={h}")
        if s.warm_start_steps < max_steps <= s.warm_start_steps + s.reset_every:
            warnings.warn(f"strategy.reset_every={s.reset_every} >= train.max_steps={max_steps}"
                          f"{f' - warm_start_steps={s.warm_start_steps}' if s.warm_start_steps else ''}: "
                          f"ReLoRA merges nothing before the run ends, so this is plain LoRA", stacklevel=2)

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.merges = 0
        self._full_rank_applied: bool | None = None  # the trainable set last applied

    # -- phases ----------------------------------------------------------------------------
    def full_rank(self, step: int) -> bool:
        """True while optimizer step `step` (0-based) is part of the full-rank warm start."""
        return step < self.cfg.warm_start_steps

    def set_phase(self, model: nn.Module, weight_decay: float, step: int) -> list[dict]:
        full = self.full_rank(step)
        if full:
            # Warm start = plain full-rank training: everything but the (zero) adapters.
            for n, p in model.named_parameters():
                p.requires_grad_(n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"))
        else:
            set_trainable(model, self.cfg, adapters=True, wrapped_weights=False)
        self._full_rank_applied = full
        return self.param_groups(model, weight_decay)

    def needs_rewrap(self, step: int) -> bool:
        return self._full_rank_applied is not None and self.full_rank(step) != self._full_rank_applied

    def rewrap(self, model: nn.Module, step: int, weight_decay: float) -> list[dict]:
        return self.set_phase(model, weight_decay, step)

    # -- schedule --------------------------------------------------------------------------
    def last_restart(self, step: int) -> int | None:
        """0-based index of the latest restart at or before optimizer step `step`."""
        n, q = self.cfg.warm_start_steps, self.cfg.reset_every
        if step < n:
            return None
        k = (step - n) // q
        if k == 0 and n == 0:
            return None  # the first cycle starts with the global warmup, not a restart
        return n + k * q

    def lr_multiplier(self, step: int, sched, max_steps: int) -> float:
        envelope = cosine_with_warmup(step, sched.warmup_steps, max_steps, sched.min_lr_ratio, sched.decay)
        restart, w = self.last_restart(step), self.cfg.restart_warmup
        if restart is None or w == 0:
            return envelope
        return envelope * min(1.0, (step - restart) / w)

    # -- merges ----------------------------------------------------------------------------
    def after_step(self, step: int, ctx: StepContext) -> str | None:
        n, q = self.cfg.warm_start_steps, self.cfg.reset_every
        if step <= n or (step - n) % q:
            return None
        self.merge_and_reinit(step, ctx)
        self.merges += 1
        return "merge"

    @torch.no_grad()
    def merge_and_reinit(self, step: int, ctx: StepContext) -> None:
        # Reads and writes are local (trainer/engine.py: W frozen, A and B whole in the module
        # copy); only magnitude pruning communicates, a few counts per tensor.
        eng = ctx.engine
        with comm.phase("edit"):
            for index, (_, m) in enumerate(self.adapters):
                W, A, B = eng.read_param(m.weight), eng.read_param(m.lora_A), eng.read_param(m.lora_B)
                eng.write_param(m.weight, merge(W, A, B, m.lora_scale))
                fresh_A = kaiming_uniform(A.shape, seeded_generator(self.seed, step, index, Purpose.A_INIT))
                eng.write_param(m.lora_A, fresh_A.to(A.device))
                eng.write_param(m.lora_B, torch.zeros_like(B))
                self.reset_optimizer(step, index, m, ctx)

    @torch.no_grad()
    def reset_optimizer(self, step: int, index: int, m, ctx: StepContext) -> None:
        """Prune the adapter's Adam state in place; keep its step count.

        `prune_moments=joint` (default): one mask per parameter prunes both moments of an
        element together (decided by |m| for `magnitude`). `independent` is the paper's
        reference: a mask each, which leaves elements with a surviving m over a zeroed v;
        their next update is m / sqrt((1 - beta2) g^2), many times a normal step, and only the
        re-warmup hides it (a micro run went NaN that way).
        """
        mode, ratio = self.cfg.optimizer_reset, self.cfg.reset_ratio
        joint = self.cfg.prune_moments == "joint"
        for p, purposes in ((m.lora_A, (Purpose.PRUNE_A, Purpose.PRUNE_A_SQ)),
                            (m.lora_B, (Purpose.PRUNE_B, Purpose.PRUNE_B_SQ))):
            def prune(part, state, purposes=purposes):
                if "exp_avg" not in state:
                    return
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                keep = prune_mask(exp_avg, mode, ratio, seeded_generator(self.seed, step, index, purposes[0]), part)
                keep_sq = keep if joint else prune_mask(
                    exp_avg_sq, mode, ratio, seeded_generator(self.seed, step, index, purposes[1]), part)
                exp_avg.mul_(keep)
                exp_avg_sq.mul_(keep_sq)

            ctx.engine.edit_state(p, prune)

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # Phase and merge points are functions of the step; the merge count is for logs.
        return {"merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        self.merges = int(state.get("merges", 0))


def prune_mask(t: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None = None,
               part=None) -> torch.Tensor:
    """A 0/1 mask (t's dtype and device) keeping a fraction 1 - `ratio` of a tensor's entries:
    none (`zero`), a random subset (`random`, drawn on the CPU from `generator`) or the
    largest by magnitude (`magnitude`; ties at the threshold are pruned). `t` is the whole
    tensor, or with `part` (trainer.engine.Part) the elements of it this rank holds: the
    random draw is made for the whole shape and the magnitude threshold is global."""
    if mode not in ("zero", "random", "magnitude"):
        raise ValueError(f"strategy.optimizer_reset={mode!r}: expected zero, random or magnitude")
    if mode == "zero" or ratio >= 1:
        return torch.zeros_like(t)
    if ratio <= 0:
        return torch.ones_like(t)
    shape = t.shape if part is None else part.shape
    if mode == "random":
        keep = torch.rand(shape, generator=generator) >= ratio
        return (keep if part is None else part.take(keep)).to(t.device, t.dtype)
    k = int(round(ratio * shape.numel()))
    if k == 0:
        return torch.ones_like(t)
    mag = t.abs()
    # kthvalue, not quantile: torch.quantile refuses tensors above 16M elements (one 7B MLP
    # moment has 45M).
    threshold = (mag.flatten().float().kthvalue(k).values if part is None else part.kth_smallest(mag, k))
    return (mag > threshold.to(t.dtype)).to(t.dtype)
