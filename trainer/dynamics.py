"""Learning-dynamics metrics of the small-model ReLoRA study (REFERENCE.md): proportional
effective rank (PER) and condition number of weight matrices, their gradients, their updates
over an interval and, for low-rank layers, of B @ A alone.

From singular values s: p = s / sum(s), ER = exp(-sum p ln p), PER = ER / min(rows, cols);
condition = s_max / s_min with s_min clipped at a tolerance, because a rank-deficient matrix
has s_min = 0 up to rounding and its raw ratio measures only the rounding.

Two caveats the numbers carry with them:
- B @ A has rank <= r, so its PER is capped at r / min(rows, cols) (emitted as `ba_per_cap`)
  and its condition number is clipped by construction. That is a property of the
  parametrisation, not a finding.
- Above `randomized_above` (the smaller dimension) only the top-k singular values are computed
  (torch.svd_lowrank). Dropping the tail lowers the entropy (each dropped value is <= every
  kept one), so PER and condition number from a truncated spectrum are lower bounds; records
  say so with `dyn/svd_topk`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from trainer.shapes import PROJECTIONS as KINDS  # short name -> module path inside a layer

DEFAULT_KINDS = ("v", "o", "down")  # the study's value, output and MLP down projections
RANDOMIZED_ABOVE = 2048  # exact SVD up to llama-1b's hidden size; top-k beyond
RANDOMIZED_RANK = 256
# Weights are fp32: singular values below s_max * max(m, n) * eps32 are rounding, not signal
# (the tolerance numpy.linalg.matrix_rank uses).
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# Spectra

def singular_values(matrix: torch.Tensor, method: str = "exact", rank: int | None = None) -> torch.Tensor:
    """Singular values, descending, in fp64. "exact": all of them; "randomized": the top
    `rank` (default RANDOMIZED_RANK) by torch.svd_lowrank."""
    m = matrix.detach()
    if method == "exact":
        return torch.linalg.svdvals(m.double())
    if method != "randomized":
        raise ValueError(f"method={method!r}: expected exact or randomized")
    k = min(rank or RANDOMIZED_RANK, *m.shape)
    # svd_lowrank draws from the global RNG: fork it so that analysis never shifts training's
    # random stream, and seed it so that the analysis itself is repeatable.
    devices = [m.device.index or 0] if m.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        _, s, _ = torch.svd_lowrank(m.float(), q=min(k + 10, *m.shape), niter=4)
    return s[:k].double()


def low_rank_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale * B @ A ([m, r] @ [r, n]), descending, fp64, without forming
    the m x n product: with B = Q_B R_B and A^T = Q_A R_A, s B A = Q_B (s R_B R_A^T) Q_A^T, so
    they are the r x r core's. O((m + n) r^2), cheap enough for every ReLoRA merge at 7B."""
    rb = torch.linalg.qr(B.detach().double(), mode="r").R
    ra = torch.linalg.qr(A.detach().double().t(), mode="r").R
    return torch.linalg.svdvals(rb @ ra.t()).mul_(abs(float(scale)))


def effective_rank(s: torch.Tensor) -> float:
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0 ln 0 = 0
    return math.exp(float(-(p * p.log()).sum()))


def condition_number(s: torch.Tensor, shape, abs_tol: float | None = None) -> tuple[float, bool]:
    """(s_max / max(s_min, tol), whether s_min was below tol). tol is `abs_tol`, or relative:
    s_max * max(shape) * eps(float32)."""
    s_max, s_min = float(s[0]), float(s[-1])
    if s_max == 0:
        return math.nan, True
    tol = abs_tol if abs_tol is not None else s_max * max(shape) * EPS32
    return s_max / max(s_min, tol), s_min < tol


def resolve_method(shape, method: str = "auto", randomized_above: int = RANDOMIZED_ABOVE) -> str:
    if method == "auto":
        return "randomized" if min(shape) > randomized_above else "exact"
    return method


def spectrum_metrics(matrix: torch.Tensor, *, method: str = "auto", rank: int | None = None,
                     randomized_above: int = RANDOMIZED_ABOVE, abs_tol: float | None = None) -> dict:
    """{per, condition, clipped, method, k}: k singular values were computed by `method`."""
    method = resolve_method(matrix.shape, method, randomized_above)
    s = singular_values(matrix, method, rank)
    cond, clipped = condition_number(s, matrix.shape, abs_tol)
    return dict(per=effective_rank(s) / min(matrix.shape), condition=cond, clipped=clipped,
                method=method, k=len(s))


# ---------------------------------------------------------------------------------------------
# Which matrices

def _unwrap(model: nn.Module) -> nn.Module:
    # DDP and DeepSpeed engines keep the model in .module, torch.compile in ._orig_mod.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


class _Layer(NamedTuple):
    weight: torch.Tensor  # effective weight, adapters merged, fp32
    grad: torch.Tensor | None  # dL/dW when W trains
    ba: torch.Tensor | None  # B @ A of a low-rank layer
    rank: int = 0  # r of that B @ A


def _layer_parts(source, kinds, layers) -> dict[tuple[int, str], _Layer]:
    """The matrices of each (layer, kind) from a model or a raw (unmerged) state dict."""
    from trainer.strategies.lora import merged_state_dict

    parts = {}
    if isinstance(source, nn.Module):
        model = _unwrap(source)
        for i in layers if layers is not None else range(len(model.layers)):
            for kind in kinds:
                mod = model.get_submodule(f"layers.{i}.{KINDS[kind]}")
                # A frozen W has no gradient, and the gradient of W + sBA is not recoverable
                # from the adapters' gradients: LoRA layers report no `grad`.
                g = None if mod.weight.grad is None else mod.weight.grad.detach().float()
                if hasattr(mod, "lora_A"):
                    parts[(i, kind)] = _Layer(mod.merged_weight(), g, (mod.lora_B @ mod.lora_A).detach().float(),
                                              mod.lora_A.shape[0])
                else:
                    parts[(i, kind)] = _Layer(mod.weight.detach().float(), g, None)
        return parts
    merged = merged_state_dict(source)
    n = 1 + max(int(k.split(".")[1]) for k in source if k.startswith("layers."))
    for i in layers if layers is not None else range(n):
        for kind in kinds:
            p = f"layers.{i}.{KINDS[kind]}"
            A, B = source.get(f"{p}.lora_A"), source.get(f"{p}.lora_B")
            parts[(i, kind)] = _Layer(merged[f"{p}.weight"].float(), None,
                                      None if A is None else B.float() @ A.float(), 0 if A is None else A.shape[0])
    return parts


def layer_matrices(source, kinds=DEFAULT_KINDS, layers=None) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, kind): effective weight (adapters merged, fp32)} of a model or a state dict."""
    with torch.no_grad():
        return {key: part.weight for key, part in _layer_parts(source, kinds, layers).items()}


# ---------------------------------------------------------------------------------------------
# Records

def _metrics(parts: dict, previous: dict | None, svd: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for (i, kind), part in parts.items():
        mats = {"weight": part.weight, "grad": part.grad, "ba": part.ba}
        if previous is not None and (i, kind) in previous:
            mats["update"] = part.weight - previous[(i, kind)].to(part.weight.device)
        for name, mat in mats.items():
            if mat is None:
                continue
            m = spectrum_metrics(mat, **svd)
            if m["per"] == 0:  # all zeros (B right after a merge, no update yet): no spectrum
                continue
            key = f"dyn/{i}/{kind}/{name}"
            out[f"{key}_per"], out[f"{key}_cond"] = m["per"], m["condition"]
            if m["clipped"]:
                out[f"{key}_cond_clipped"] = 1.0
            if m["method"] == "randomized":
                out["dyn/svd_topk"] = float(m["k"])
        if part.ba is not None:
            out[f"dyn/{i}/{kind}/ba_per_cap"] = min(1.0, part.rank / min(part.ba.shape))
    return out


def dynamics_record(model, previous_weights: dict | None = None, grads: dict | None = None, *,
                    kinds=DEFAULT_KINDS, layers=None, **svd) -> dict[str, float]:
    """Flat `dyn/<layer>/<kind>/{weight,grad,update,ba}_{per,cond}` for a model (or a raw state
    dict). `previous_weights` ({(layer, kind): W} from `layer_matrices` k steps earlier) gives
    the update W_t - W_{t-k}; `grads` ({(layer, kind): dL/dW}) replaces the weights' .grad.
    `svd`: method, rank, randomized_above, abs_tol of `spectrum_metrics`."""
    with torch.no_grad():
        parts = _layer_parts(model, kinds, layers)
        if grads is not None:
            parts = {k: p._replace(grad=grads.get(k)) for k, p in parts.items()}
        return _metrics(parts, previous_weights, svd)


class DynamicsTracker:
    """Records every `every` optimizer steps, keeping the previous merged weights itself (on
    `store_device`, so that a GPU run does not hold a second copy of its matrices).

    The update at step t is W_t - W_{t-every}; it is reported only when the previous record is
    exactly `every` steps old (after a resume at a step that is not a multiple of `every`,
    the first record has none)."""

    def __init__(self, kinds=DEFAULT_KINDS, layers=None, every: int = 100, *, store_device="cpu", **svd):
        self.kinds, self.layers, self.every = tuple(kinds), layers, every
        self.store_device, self.svd = store_device, svd
        self._previous: dict | None = None
        self._previous_step = -1

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def start(self, model, step: int) -> None:
        """Remember the weights at the first step (0, or the step resumed from)."""
        if self.due(step):
            with torch.no_grad():
                self._keep(_layer_parts(model, self.kinds, self.layers), step)

    def record(self, model, step: int, force: bool = False) -> dict[str, float]:
        """The dyn/ metrics at `step` (finished optimizer steps), or {} when not due. `force`
        records at any step (the last one, say): weights, gradients and B·A, but no update
        unless the interval is exactly `every`, and the stored weights stay on the grid."""
        if not (self.due(step) or force):
            return {}
        with torch.no_grad():
            parts = _layer_parts(model, self.kinds, self.layers)
            fresh = self._previous_step == step - self.every
            out = _metrics(parts, self._previous if fresh else None, self.svd)
            if self.due(step):
                self._keep(parts, step)
        return out

    def _keep(self, parts: dict, step: int) -> None:
        self._previous = {k: p.weight.to(self.store_device, copy=True) for k, p in parts.items()}
        self._previous_step = step


def analyze_run(run_dir: str | Path, *, kinds=DEFAULT_KINDS, layers=None, **svd) -> list[dict]:
    """Dynamics of every complete checkpoint of a run, oldest first, written to
    `run_dir/dynamics.jsonl`. Updates span consecutive checkpoints (`update_from` says from
    which step); checkpoints hold no gradients. Retention (`checkpoint.keep`) bounds what is
    left to analyse: the in-loop tracker sees every interval."""
    from trainer.checkpoint import complete_checkpoints, model_state, step_of
    from trainer.rundir import RunDir

    records, previous, previous_step = [], None, None
    for ckpt in complete_checkpoints(run_dir):
        sd = model_state(ckpt)  # either format; no code runs
        with torch.no_grad():
            parts = _layer_parts(sd, kinds, layers)
            rec = {"step": step_of(ckpt), **({"update_from": previous_step} if previous is not None else {}),
                   **_metrics(parts, previous, svd)}
        records.append(rec)
        previous, previous_step = {k: p.weight for k, p in parts.items()}, rec["step"]
    with open(RunDir(run_dir).dynamics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records
