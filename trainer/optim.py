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
"""
from __future__ import annotations

import math

import torch


class VectorAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with per-element step counters.

    State per parameter: `step` (float32, the parameter's shape), `exp_avg`, `exp_avg_sq`.
    With every counter equal it computes what torch.optim.AdamW computes (to float rounding).
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
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            # log(beta) in double once; the per-element bias correction 1 - beta**t is then
            # -expm1(t * log beta), accurate to float32 rounding even at t = 1 where
            # 1 - 0.999**t would cancel catastrophically.
            log_b1, log_b2 = math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("VectorAdamW does not support sparse gradients")
                state = self._init_state(p)
                _vector_adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                     lr, beta1, beta2, log_b1, log_b2, eps, wd)
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


def _vector_adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, log_b1, log_b2, eps, wd):
    step.add_(1)
    active = step > 0
    t = step.clamp(min=1.0)
    # Same order of operations as torch's single-tensor AdamW, with each scalar made a
    # per-element tensor and every write masked by `active`.
    if wd != 0:
        p.mul_(torch.where(active, 1 - lr * wd, 1.0))
    exp_avg.copy_(torch.where(active, exp_avg.lerp(grad, 1 - beta1), exp_avg))
    exp_avg_sq.copy_(torch.where(active, torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2), exp_avg_sq))
    bias_correction1 = -torch.expm1(t * log_b1)
    bias_correction2_sqrt = (-torch.expm1(t * log_b2)).sqrt_()
    step_size = torch.where(active, lr / bias_correction1, 0.0)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg * step_size, denom, value=-1.0)
