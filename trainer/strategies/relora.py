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
  adaptive with strategy.rank_budget = R: the first cycle runs every adapter at rank R. At
           each merge the effective rank of each merged update s B A (from its singular
           values) is its module's demand; the next cycle's ranks are apportioned in
           proportion to it (strategies/rank_plan.py allocate_ranks: greedy, sum of (in + out) r
           never above its value at uniform R, so the trainable bytes per step never exceed
           uniform R's). If any rank changed, the loop re-wraps before the next step: every
           adapter becomes a fresh ReLoRA init at its new rank (A Kaiming from the seeded
           generator, B = 0, s = alpha / r: the output is unchanged) with empty optimizer
           state, and the data-parallel wrapper is rebuilt. The ranks are in state_dict:
           a resume builds the checkpoint's shapes before the engine.

The merge schedule counts from the end of the warm start, so every cycle is a full q steps
of low-rank training. Random draws come from seeded_generator(seed, step, layer, purpose):
every rank draws the same without communicating, and a resumed run redraws them exactly.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from trainer import comm
from trainer.dynamics import effective_rank, low_rank_singular_values
from trainer.seeding import Purpose, seeded_generator
from trainer.strategies.base import StepContext, cosine_with_warmup
from trainer.strategies.lora import LoRA, kaiming_uniform, merge, set_trainable
from trainer.strategies.rank_plan import allocate_ranks


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
        if s.rank_budget:
            check(not s.ranks, "strategy.ranks", s.ranks,
                  "none with strategy.rank_budget (the budget chooses the ranks; the first cycle runs at rank_budget)")
            # A re-wrap changes PowerSGD's buckets under its error feedback; ZeRO-3 cannot re-wrap.
            check(cfg.distributed.comm_hook != "powersgd", "strategy.rank_budget", s.rank_budget,
                  "0 with distributed.comm_hook=powersgd (a reshape re-lays the buckets its error feedback follows)")
            check(cfg.distributed.deepspeed != "zero3", "strategy.rank_budget", s.rank_budget,
                  "0 with distributed.deepspeed=zero3 (a reshape re-wraps the engine, which ZeRO-3 cannot)")
        if s.warm_start_steps < max_steps <= s.warm_start_steps + s.reset_every:
            warnings.warn(f"strategy.reset_every={s.reset_every} >= train.max_steps={max_steps}"
                          f"{f' - warm_start_steps={s.warm_start_steps}' if s.warm_start_steps else ''}: "
                          f"ReLoRA merges nothing before the run ends, so this is plain LoRA", stacklevel=2)

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.merges = 0
        self._warm_applied: bool | None = None  # the trainable set last applied
        self.next_ranks: dict[str, int] | None = None  # adaptive: chosen at a merge, applied by rewrap
        self.last_merge: dict = {}  # what the last merge measured, for its metrics record

    def plan(self, model: nn.Module, state: dict | None) -> dict[str, int]:
        if state and "ranks" in state:  # adaptive: the shapes the checkpoint holds
            self.next_ranks = state.get("next_ranks")
            return dict(state["ranks"])
        return super().plan(model, state)

    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.adapters}

    # -- phases ----------------------------------------------------------------------------
    def warm(self, step: int) -> bool:
        """True while optimizer step `step` (0-based) is part of the full-rank warm start
        (not strategy.full_rank: those linears train full rank in every phase)."""
        return step < self.cfg.warm_start_steps

    def set_phase(self, model: nn.Module, weight_decay: float, step: int) -> list[dict]:
        full = self.warm(step)
        if full:
            # Warm start = plain full-rank training: everything but the (zero) adapters.
            for n, p in model.named_parameters():
                p.requires_grad_(n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"))
        else:
            set_trainable(model, self.cfg, adapters=True, wrapped_weights=False)
        self._warm_applied = full
        return self.param_groups(model, weight_decay)

    def needs_rewrap(self, step: int) -> bool:
        phase_changed = self._warm_applied is not None and self.warm(step) != self._warm_applied
        return phase_changed or self.next_ranks is not None

    def rewrap(self, model: nn.Module, step: int, weight_decay: float) -> list[dict]:
        if self.next_ranks is not None:
            self.reshape(step)
        return self.set_phase(model, weight_decay, step)

    @torch.no_grad()
    def reshape(self, step: int) -> None:
        """Every adapter a fresh ReLoRA init at its next rank, drawn as the merge at `step`
        draws (a module whose rank stayed gets the A that merge drew)."""
        for index, (name, m) in enumerate(self.adapters):
            r = self.next_ranks[name]
            A = kaiming_uniform((r, m.in_features), seeded_generator(self.seed, step, index, Purpose.A_INIT))
            m.resize(A, torch.zeros(m.out_features, r), self.scale(r))
        self.next_ranks = None

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
        spectra = self.merge_and_reinit(step, ctx)
        self.merges += 1
        ers = [effective_rank(sv) for sv in spectra]
        pers = [er / min(m.in_features, m.out_features) for er, (_, m) in zip(ers, self.adapters)]
        self.last_merge = {"merge_per": sum(pers) / len(pers)} if pers else {}
        if self.cfg.rank_budget:
            self.choose_ranks(ers)
        return "merge"

    def event_record(self) -> dict:
        return dict(self.last_merge)

    @torch.no_grad()
    def merge_and_reinit(self, step: int, ctx: StepContext) -> list[torch.Tensor]:
        """Merge, re-init and prune every adapter; returns the singular values of each merged
        update s B A."""
        # Reads and writes are local (trainer/engine.py: W frozen, A and B whole in the module
        # copy); only magnitude pruning communicates, a few counts per tensor.
        eng, spectra = ctx.engine, []
        with comm.phase("edit"):
            for index, (_, m) in enumerate(self.adapters):
                W, A, B = eng.read_param(m.weight), eng.read_param(m.lora_A), eng.read_param(m.lora_B)
                spectra.append(low_rank_singular_values(B, A, m.lora_scale))
                eng.write_param(m.weight, merge(W, A, B, m.lora_scale))
                fresh_A = kaiming_uniform(A.shape, seeded_generator(self.seed, step, index, Purpose.A_INIT))
                eng.write_param(m.lora_A, fresh_A.to(A.device))
                eng.write_param(m.lora_B, torch.zeros_like(B))
                self.reset_optimizer(step, index, m, ctx)
        return spectra

    def choose_ranks(self, effective_ranks: list[float]) -> None:
        """The next cycle's ranks (adaptive), within the bytes of uniform rank_budget. Rank 0
        chooses and broadcasts them (a few hundred bytes): an SVD's last bits may differ
        between machines, and ranks that disagreed on a shape would hang the re-wrap."""
        from trainer.ranks import broadcast_str

        mods = [m for _, m in self.adapters]
        costs = [m.in_features + m.out_features for m in mods]
        chosen = allocate_ranks(effective_ranks, costs, [m.rank for m in mods],
                                [min(m.in_features, m.out_features) for m in mods],
                                budget=sum(costs) * self.cfg.rank_budget)
        with comm.phase("edit"):
            chosen = json.loads(broadcast_str(json.dumps(chosen)))
        ranks = dict(zip((name for name, _ in self.adapters), chosen))
        self.next_ranks = ranks if ranks != self.ranks() else None
        self.last_merge["ranks"] = ranks

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
        # Adaptive ranks are not: the shapes now and those chosen for the next cycle.
        if not self.cfg.rank_budget:
            return {"merges": self.merges}
        return {"merges": self.merges, "ranks": self.ranks(), "next_ranks": self.next_ranks}

    def load_state_dict(self, state: dict) -> None:
        # apply(state=...) has built the checkpoint's shapes already.
        self.merges = int(state.get("merges", 0))
        if "ranks" in state and state["ranks"] != self.ranks():
            raise ValueError("ReLoRA state: its adapter ranks differ from the model's; "
                             "pass the state to apply() before the engine is built")
        self.next_ranks = state.get("next_ranks", self.next_ranks)


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
