"""SwitchLoRA (Zhou et al. 2024, arXiv 2406.06564): LoRA whose rank-one directions are
swapped, a few vectors per step, for candidates from a pool, so that over training W
receives updates in many more directions than r.

Algorithm (s = 1 / r, T = max_steps; r, and so s, per layer under hybrid rank):
  init     wrap q, k, v, o, gate, up, down as W x + s B (A x). Each layer has two pools of
           min(m, n) candidate vectors, one for A's rows and one for B's columns, drawn
           U(-b, b) with b chosen so that s B A has nn.Linear's init variance 1/(3n) and
           B dA and dB A are the same size. A's rows and B's columns start as the first r
           candidates (B is not zero), and W <- W0 - s B A, so the function is W0's.
  step     VectorAdamW (per-element step counters) on A, B, embeddings, head and norms.
  switch   after step t, per layer, k = r * rate(t) / interval0 vectors of A and k of B,
           rate(t) = base ** (t / (ratio * T)), k rounded up or down at random:
             A row i -> candidate c:   W += s B[:, i] (A[i, :] - c)^T;  A[i, :] = c
                                        B[:, i]: Adam moments zeroed, step count reset,
                                        frozen for freeze_steps steps
             B col j -> candidate d:   W += s (B[:, j] - d) A[j, :]^T;  B[:, j] = d
                                        A[j, :]: the same reset and freeze
           Candidates are taken from each pool in FIFO order and the vector switched out
           goes to the back of its pool (the pool holds trained vectors). Vectors are chosen
           at random among those not frozen.

Memory. The reference keeps both pools as dense tensors in CPU memory from the start, about
1.5x all wrapped weights. Here a candidate that never trained is a pure function of (seed,
layer, slot) and is redrawn when taken; only vectors that were switched out are stored (CPU,
bf16: a vector that comes back is rounded, but W absorbs exactly the difference between the
vector leaving and the one placed, so the network's function is unchanged at every switch
either way). `candidate_memory()` reports the store. Its bound, reached once every slot of a
pool has been used, is (min(m, n) - r) (m + n) bf16 values per layer: the reference's pools
(fp32) less the r vectors in use; with the paper's decay the pools fill within the first few
thousand steps.

Every draw (initial vectors, candidates, rounding, which vectors switch) comes from
seeded_generator(seed, step or slot, layer, purpose): all ranks make identical switches with
no communication and a resumed run makes exactly the switches of an uninterrupted one.
Weights go through the engine; freezes are written into the optimizer's per-element step
counters (step = -freeze_steps), so they are checkpointed with the optimizer.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn as nn

from trainer import comm
from trainer.optim import VectorAdamW
from trainer.seeding import Purpose, seeded_generator
from trainer.strategies.base import StepContext
from trainer.strategies.lora import LoRA, LoRALinear
from trainer.strategies.rank_plan import TARGETS



def init_bounds(in_features: int, out_features: int, rank: int) -> tuple[float, float]:
    """Uniform bounds for A's and B's candidates (the reference's choice). With
    std_A^2 std_B^2 = gain * r / n the product s B A (s = 1/r) has variance gain / n = 1/(3n),
    nn.Linear's default init; the split between A and B makes B dA and dB A comparable."""
    n, m, r = in_features, out_features, rank
    gain = math.sqrt(2.0 / (1 + 5))  # nn.init.calculate_gain("leaky_relu", sqrt(5))
    std_a = (math.sqrt(m) * r / n ** 1.5) ** 0.25 * math.sqrt(gain)
    std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)
    return math.sqrt(3) * std_a, math.sqrt(3) * std_b


STORE_DTYPE = torch.bfloat16  # switched-out vectors: see "Memory" above


class VectorPool:
    """One layer's candidates for A's rows (or B's columns): `size` slots, `rank` of them in
    use. Slot j holds either its fresh candidate (never used: redrawn from the seed when
    needed) or a trained vector that was switched out (kept in `store`)."""

    def __init__(self, size: int, rank: int, length: int, bound: float, seed: int, layer: int, purpose: int):
        self.size, self.length, self.bound = size, length, bound
        self.seed, self.layer, self.purpose = seed, layer, purpose
        self.slots = list(range(rank))  # slot held by vector i
        self.free = deque(range(rank, size))  # next candidate first
        self.store: dict[int, torch.Tensor] = {}  # slot -> trained vector (CPU, STORE_DTYPE)
        self.frozen_until = [0] * rank  # vector i is frozen while step < frozen_until[i]

    def fresh(self, slot: int) -> torch.Tensor:
        g = seeded_generator(self.seed, slot, self.layer, self.purpose)
        return (torch.rand(self.length, generator=g) * 2 - 1) * self.bound

    def can_switch(self) -> bool:
        return len(self.free) > 0

    def eligible(self, step: int) -> list[int]:
        return [i for i, until in enumerate(self.frozen_until) if until <= step]

    def switch(self, i: int, current: torch.Tensor) -> torch.Tensor:
        """Vector i takes the next candidate; its current value goes to the back of the pool."""
        new_slot = self.free.popleft()
        new = self.store.pop(new_slot).float() if new_slot in self.store else self.fresh(new_slot)
        old_slot = self.slots[i]
        self.store[old_slot] = current.detach().to("cpu", STORE_DTYPE).clone(memory_format=torch.contiguous_format)
        self.free.append(old_slot)
        self.slots[i] = new_slot
        return new

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def state_dict(self) -> dict:
        return {"slots": list(self.slots), "free": list(self.free), "frozen_until": list(self.frozen_until),
                "store": {int(k): v.clone() for k, v in self.store.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.slots = [int(x) for x in state["slots"]]
        self.free = deque(int(x) for x in state["free"])
        self.frozen_until = [int(x) for x in state["frozen_until"]]
        self.store = {int(k): v.to("cpu", STORE_DTYPE) for k, v in state["store"].items()}


class SwitchLoRA(LoRA):
    name = "switchlora"

    @classmethod
    def check_config(cls, cfg) -> None:
        from trainer.config import check
        super().check_config(cfg)
        s = cfg.strategy
        check(s.switch_interval0 > 0, "strategy.switch_interval0", s.switch_interval0, "> 0")
        check(s.switch_ratio > 0, "strategy.switch_ratio", s.switch_ratio, "> 0")
        check(0 < s.switch_decay_base < 1, "strategy.switch_decay_base", s.switch_decay_base, "in (0, 1)")
        check(s.freeze_steps >= 0, "strategy.freeze_steps", s.freeze_steps, ">= 0")

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.pools: list[tuple[VectorPool, VectorPool]] = []
        self.switches = 0

    def scale(self, rank: int) -> float:
        return 1.0 / rank

    # -- init ------------------------------------------------------------------------------
    def init_adapters(self) -> None:
        self.pools = []
        for index, (_, m) in enumerate(self.adapters):
            r = m.rank
            bound_a, bound_b = init_bounds(m.in_features, m.out_features, r)
            size = min(m.in_features, m.out_features)
            pa = VectorPool(size, r, m.in_features, bound_a, self.seed, index, Purpose.POOL_A)
            pb = VectorPool(size, r, m.out_features, bound_b, self.seed, index, Purpose.POOL_B)
            self.pools.append((pa, pb))
            if not m.weight.is_meta:
                self._init_layer(m, pa, pb)

    @torch.no_grad()
    def _init_layer(self, m: LoRALinear, pa: VectorPool, pb: VectorPool) -> None:
        r, w = m.rank, m.weight
        dt = torch.promote_types(w.dtype, torch.float32)  # never below fp32 (a test runs fp64)
        A = torch.stack([pa.fresh(i) for i in range(r)]).to(w.device, dt)
        B = torch.stack([pb.fresh(i) for i in range(r)], dim=1).to(w.device, dt)
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        # W0 - s B A: the wrapped layer computes exactly what W0 did.
        w.copy_(torch.addmm(w.to(dt), B, A, alpha=-float(m.lora_scale)))

    def make_optimizer(self, groups: list[dict], opt_cfg) -> torch.optim.Optimizer:
        return VectorAdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps)

    # -- each step -------------------------------------------------------------------------
    def switches_per_step(self, step: int, max_steps: int, rank: int) -> float:
        """Expected switches of A rows (and of B columns) per layer of rank `rank` after step
        `step` (1-based count of finished steps, i.e. t + 1 for the 0-based step t just taken)."""
        c = self.cfg
        rate = c.switch_decay_base ** (step / (c.switch_ratio * max_steps))
        return rank * rate / c.switch_interval0

    def after_step(self, step: int, ctx: StepContext) -> str | None:
        switched = 0
        for index, (_, m) in enumerate(self.adapters):
            pa, pb = self.pools[index]
            if not (pa.can_switch() and pb.can_switch()):
                continue  # min(m, n) <= r: no candidates beyond the vectors in use
            expected = self.switches_per_step(step, ctx.max_steps, m.rank)
            g = seeded_generator(self.seed, step, index, Purpose.SWITCH)
            k = int(expected) + int(torch.rand(1, generator=g).item() < expected - int(expected))
            if k:
                switched += self.switch_layer(step, m, pa, pb, k, g, ctx)
        self.switches += switched
        return "switch" if switched else None

    @torch.no_grad()
    def switch_layer(self, step: int, m: LoRALinear, pa: VectorPool, pb: VectorPool, k: int,
                     g: torch.Generator, ctx: StepContext) -> int:
        # Every read and write is local (trainer/engine.py): W is frozen, A and B are whole in
        # the module copy, and the optimizer-state resets are element-wise.
        with comm.phase("edit"):
            return self._switch_layer(step, m, pa, pb, k, g, ctx.engine)

    def _switch_layer(self, step, m, pa, pb, k, g, eng) -> int:
        rows = _choose(pa.eligible(step), k, g)
        s, freeze = float(m.lora_scale), self.cfg.freeze_steps
        A, B = eng.read_param(m.lora_A), eng.read_param(m.lora_B)
        # W absorbs both kinds of switch in one rank-2k update (one pass over W): rows first,
        # with the old B; columns then, with the new A.
        left, right = [], []
        if rows:
            I = torch.tensor(rows, device=A.device)
            C = torch.stack([pa.switch(i, A[i]) for i in rows]).to(A.device)
            left.append(B[:, I])
            right.append(A[I] - C)
            A[I] = C
            for i in rows:
                pb.frozen_until[i] = step + freeze
        # Columns are chosen after the row switches so that a column frozen just now is skipped.
        cols = _choose(pb.eligible(step), k, g)
        if cols:
            J = torch.tensor(cols, device=B.device)
            D = torch.stack([pb.switch(j, B[:, j]) for j in cols], dim=1).to(B.device)
            left.append(B[:, J] - D)
            right.append(A[J])
            B[:, J] = D
            for j in cols:
                pa.frozen_until[j] = step + freeze
        if left:
            eng.add_low_rank(m.weight, torch.cat(left, dim=1), torch.cat(right, dim=0), s)
        eng.write_param(m.lora_A, A)
        eng.write_param(m.lora_B, B)
        # The counterpart's moments were accumulated against the vector that is gone.
        self._restart_vectors(eng, m.lora_B, 1, rows)
        self._restart_vectors(eng, m.lora_A, 0, cols)
        return len(rows) + len(cols)

    def _restart_vectors(self, eng, p: nn.Parameter, dim: int, index: list[int]) -> None:
        """Zero the Adam moments of the rows (dim 0) or columns (dim 1) `index` of `p` and set
        their step counters to -freeze_steps: VectorAdamW leaves them still for freeze_steps
        steps, then restarts them as fresh Adam elements."""
        if not index:
            return
        freeze = -float(self.cfg.freeze_steps)

        def restart(part, state):
            if "step" not in state:
                raise RuntimeError("SwitchLoRA needs per-element step counters (trainer.optim.VectorAdamW); "
                                   "the optimizer keeps one 'step' per parameter or group")
            hit = part.mask(dim, index).to(state["step"].device)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].masked_fill_(hit, 0.0)
            state["step"].masked_fill_(hit, freeze)

        eng.edit_state(p, restart)

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"switches": self.switches, "pools": [[pa.state_dict(), pb.state_dict()] for pa, pb in self.pools]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["pools"]) != len(self.pools):
            raise ValueError(f"SwitchLoRA state has {len(state['pools'])} layers, the model {len(self.pools)}")
        self.switches = int(state.get("switches", 0))
        for (pa, pb), (sa, sb) in zip(self.pools, state["pools"]):
            pa.load_state_dict(sa)
            pb.load_state_dict(sb)

    # -- accounting ------------------------------------------------------------------------
    def candidate_memory(self) -> dict:
        """Bytes held for candidates now, their bound, and what the reference would hold."""
        stored_vectors = sum(len(pa.store) + len(pb.store) for pa, pb in self.pools)
        stored = sum(pa.stored_bytes() + pb.stored_bytes() for pa, pb in self.pools)
        shapes = [(m.in_features, m.out_features, m.rank) for _, m in self.adapters]
        return dict(stored_vectors=stored_vectors, stored_bytes=stored, **pool_memory(shapes))

    def describe(self, model: nn.Module) -> str:
        mem = self.candidate_memory()
        return (super().describe(model) + f"; candidate store {mem['stored_bytes'] / 2**20:.1f} MiB now, "
                f"<= {mem['bound_bytes'] / 2**20:.1f} MiB (reference pools {mem['reference_bytes'] / 2**20:.1f} MiB)")


def _choose(eligible: list[int], k: int, g: torch.Generator) -> list[int]:
    if not eligible:
        return []
    pick = torch.randperm(len(eligible), generator=g)[:k].tolist()
    return sorted(eligible[j] for j in pick)


def pool_memory(shapes, bytes_per: int = 4, store_bytes: int = 2) -> dict:
    """Candidate memory for wrapped layers of (in, out, rank), without building anything:
    `bound_bytes`, the most this implementation stores (every slot trained and switched out);
    `reference_bytes`, the reference's dense pools (min(m, n) vectors per side, from step 0);
    `weight_bytes`, the wrapped weights themselves, for scale."""
    bound = reference = weights = 0
    for n, m, rank in shapes:
        size = min(n, m)
        weights += n * m * bytes_per
        reference += size * (n + m) * bytes_per
        bound += max(0, size - rank) * (n + m) * store_bytes
    return dict(bound_bytes=bound, reference_bytes=reference, weight_bytes=weights)


def model_pool_memory(args, rank: int, targets=tuple(TARGETS)) -> dict:
    """pool_memory for a named model size (trainer.model.ModelArgs), e.g. for the docs."""
    h, f, kv = args.hidden_size, args.intermediate_size, args.num_kv_heads * args.head_dim
    per_layer = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, f), "up": (h, f), "down": (f, h)}
    return pool_memory([(*per_layer[t], rank) for t in targets] * args.num_layers)
