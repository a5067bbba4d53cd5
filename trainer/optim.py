"""Optimizers that strategies need beyond torch's.

`VectorAdamW` is AdamW whose step counter is per element instead of per tensor. SwitchLoRA
swaps single rows of A and columns of B for fresh vectors; their Adam moments then describe
a vector that is gone, so they are zeroed. Zeroing the moments but keeping a large shared
step count leaves the bias correction at ~1, and the first update of the new vector is then
~3x a normal one (REFERENCE.md). A per-element step restarts the bias correction for exactly
the elements that were reset.

Why per element and not per row: under DeepSpeed ZeRO the optimizer sees flat fp32
partitions that cut across rows and columns. An element-wise state tensor with the
parameter's shape is mapped onto those partitions by DeepSpeed like `exp_avg`, so
`safe_set_full_optimizer_state(p, value, "step")` works on it unchanged.

Freezing comes free: an element whose step (after this step's increment) is <= 0 is left
alone (no moment update, no weight decay, no move) while its counter climbs toward 1. Writing
`step = -k` (with zeroed moments) therefore freezes an element for exactly k optimizer steps
and then restarts it as a fresh Adam element; the freeze lives in optimizer state and is
checkpointed with it.

Speed. A tensor whose counters are all equal (every tensor SwitchLoRA never switched:
embeddings, head, norms; A and B before their first switch) is an ordinary AdamW tensor and
takes torch's fused AdamW step, one pass over its elements. The others take the per-element
formula, with the small ones concatenated into flat batches (an element-wise op costs ~5 us
per tensor on a CPU whatever its size) and masked writes done by lerp rather than
torch.where (a scalar where is not vectorised). One host read per group and step finds out
which tensors are which. Figures before and after: docs/LOG.md (2026-12-03, frontier).
"""
from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")  # the order _vector_adamw_update takes them in


class VectorAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with per-element step counters.

    State per parameter: `step` (float32, the parameter's shape), `exp_avg`, `exp_avg_sq`.
    A tensor whose counters are all equal gets exactly torch.optim.AdamW(fused=True)'s step;
    the others get torch's single-tensor AdamW formula per element (the two differ in float
    rounding only).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"VectorAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict:
        # Key by key: an engine may already have written "step" (a freeze) before the first
        # step of this parameter; that value must survive. State tensors are created once and
        # then only edited in place, because DeepSpeed keeps views into them.
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel()]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("VectorAdamW does not support sparse gradients")
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1.0)
            # Each tensor's lowest and highest counter, in one host read for the group.
            bounds = torch.stack([torch.stack(torch.aminmax(s)) for s in steps]).tolist()
            hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                         weight_decay=group["weight_decay"])
            uniform = [i for i, (lo, hi) in enumerate(bounds) if lo == hi > 0]  # lo == hi <= 0: all frozen
            if uniform:
                _fused_step([params[i] for i in uniform], [states[i] for i in uniform],
                            [bounds[i][0] for i in uniform], hyper)
            mixed = [i for i, (lo, hi) in enumerate(bounds) if lo != hi]
            lists = [[params[i] for i in mixed], [params[i].grad for i in mixed],
                     *([states[i][k] for i in mixed] for k in STATE_KEYS)]
            for batch in _batches(lists):
                _step_batch(batch, **hyper)
        return loss

    def load_state_dict(self, state_dict) -> None:
        # torch leaves "step" where the checkpoint had it (it assumes a CPU scalar); ours is a
        # full tensor that must sit beside its parameter.
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def _fused_step(params, states, counts, hyper) -> None:
    """torch's fused AdamW over tensors whose elements all have step count `counts[i]`
    (already incremented): exactly what torch.optim.AdamW(fused=True) computes for them."""
    # Scalar step tensors as torch keeps them, one each (the functional increments them).
    steps = torch.tensor([c - 1 for c in counts], dtype=torch.float32, device=params[0].device).unbind()
    adamw(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                            [st["exp_avg_sq"] for st in states], [], list(steps), fused=True, amsgrad=False,
                            maximize=False, **hyper)


# Elements per flat batch. Small tensors are updated together as one flat copy: an element-wise
# op costs ~5 us of overhead per tensor on a CPU whatever its size, and micro's step has 67
# small tensors, so per-tensor ops were most of the step. The batch bounds the temporaries
# the update holds at once (llama-1b's embedding alone is 65M elements); a tensor above it
# is updated in place through flat views of this size.
BATCH_ELEMENTS = 1 << 22


def _batches(lists):
    """The parallel lists (param, grad, exp_avg, exp_avg_sq, step) as batches of flat views,
    each batch at most BATCH_ELEMENTS elements of one device and dtype."""
    pieces: dict[tuple, list[tuple]] = {}
    for tensors in zip(*lists):
        flat = tuple(t.view(-1) for t in tensors)
        n = flat[0].numel()
        cuts = [flat] if n <= BATCH_ELEMENTS else \
            [tuple(f[i:i + BATCH_ELEMENTS] for f in flat) for i in range(0, n, BATCH_ELEMENTS)]
        pieces.setdefault((flat[0].device, flat[0].dtype), []).extend(cuts)
    for cuts in pieces.values():
        batch, size = [], 0
        for cut in cuts:
            if batch and size + cut[0].numel() > BATCH_ELEMENTS:
                yield [list(x) for x in zip(*batch)]
                batch, size = [], 0
            batch.append(cut)
            size += cut[0].numel()
        if batch:
            yield [list(x) for x in zip(*batch)]


@torch.no_grad()
def _step_batch(batch, lr, beta1, beta2, eps, weight_decay) -> None:
    """Update one batch: a lone view in place; several tensors through one flat copy of each
    list (torch.cat), whose results are copied back into the parameters and the moments."""
    if len(batch[0]) == 1:
        _vector_adamw_update(*(xs[0] for xs in batch), lr, beta1, beta2, eps, weight_decay)
        return
    flat = [torch.cat(xs) for xs in batch]
    _vector_adamw_update(*flat, lr, beta1, beta2, eps, weight_decay)
    sizes = [x.numel() for x in batch[0]]
    for i in (0, 2, 3):  # the parameter and its moments; the gradient and the steps are only read
        torch._foreach_copy_(batch[i], list(flat[i].split(sizes)))


def _vector_adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One step of AdamW on flat tensors, with the step count per element (already
    incremented for this step; only read here).

    Bitwise what torch's single-tensor AdamW computes for each element given its own step,
    with every write masked by `active` (step > 0 after the increment): each scalar of that
    formula becomes a per-element tensor, and a masked write is a lerp with weight 0 or 1,
    which is exact (0 keeps the old value, 1 takes the new one) and, unlike torch.where with
    a scalar operand, a vectorised kernel.
    """
    # log(beta) in double once; the per-element bias correction 1 - beta**t is then
    # -expm1(t * log beta), accurate to float32 rounding even at t = 1 where 1 - 0.999**t
    # would cancel catastrophically.
    log_b1 = math.log(beta1) if beta1 > 0 else -math.inf
    log_b2 = math.log(beta2) if beta2 > 0 else -math.inf
    # Steps are whole numbers, so clamping them to [0, 1] gives the mask step > 0 as 0.0 / 1.0.
    active = step.clamp(0.0, 1.0)
    t = step.clamp(min=1.0)
    if wd != 0:
        p.lerp_(p * (1 - lr * wd), active)
    # Temporaries are few and reused in place (each fresh one costs page faults on a CPU).
    exp_avg.lerp_(grad, active * (1 - beta1))  # weight 0 where frozen: unchanged
    exp_avg_sq.lerp_((exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2), active)
    # lr / (1 - beta1**t) where active, else 0 (torch's `lr / x` is x.reciprocal() * lr).
    step_size = (t * log_b1).expm1_().neg_().reciprocal_().mul_(lr).mul_(active)
    bias_correction2_sqrt = t.mul_(log_b2).expm1_().neg_().sqrt_()
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    p.addcdiv_(step_size.mul_(exp_avg), denom, value=-1.0)
