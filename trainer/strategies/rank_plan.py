"""Which linears a low-rank strategy adapts, and at which rank (torch-free).

Hybrid rank (lora, relora, switchlora):
  strategy.full_rank  module patterns that train full rank instead of through adapters. A
                      pattern is matched (fnmatch, case-sensitive) against the module path
                      of each targeted linear, e.g. `layers.0.self_attn.q_proj`; `*` crosses
                      dots. A last component that is a projection's short name stands for
                      its module: `*.self_attn.o` = `*.self_attn.o_proj`, `*.down` matches
                      every `mlp.down_proj`. A pattern that matches none is refused.
  strategy.ranks      rank per projection (`{q: 16, v: 32}`); the others take strategy.rank.

Adaptive rank (relora, strategy.rank_budget = R): the first cycle runs every adapter at rank
R; at each merge `allocate_ranks` re-chooses them from the spectra of the merged updates,
with the adapters' bytes never above those of uniform rank R.
"""
from __future__ import annotations

import heapq
from fnmatch import fnmatchcase

from trainer.shapes import PROJECTIONS

TARGETS = {short: path.rsplit(".", 1)[-1] for short, path in PROJECTIONS.items()}  # "q" -> "q_proj"


def module_pattern(pattern: str) -> str:
    """A `strategy.full_rank` pattern as an fnmatch pattern on module paths."""
    head, _, last = pattern.rpartition(".")
    return (head + "." if head else "") + TARGETS.get(last, last)


def layer_modules(num_layers: int, targets) -> list[tuple[str, str]]:
    """(module path, projection) of the targeted linears of a decoder, in module order (the
    order trainer.model registers them, which is what seeds each adapter's draws)."""
    order = [t for t in PROJECTIONS if t in set(targets)]
    return [(f"layers.{i}.{PROJECTIONS[t]}", t) for i in range(num_layers) for t in order]


def adapter_ranks(modules: list[tuple[str, str]], cfg) -> dict[str, int]:
    """{module path: rank} of the adapted linears among `modules` ((path, projection) of the
    targeted ones) under `cfg` (a StrategyConfig): strategy.full_rank's matches left out,
    strategy.ranks[projection] else strategy.rank; uniform strategy.rank_budget when set.
    Raises ConfigError for a full_rank pattern that matches nothing."""
    from trainer.errors import ConfigError

    full = set()
    for pattern in cfg.full_rank:
        hits = [path for path, _ in modules if fnmatchcase(path, module_pattern(pattern))]
        if not hits:
            example = modules[0][0] if modules else "layers.0.self_attn.q_proj"
            raise ConfigError(f"strategy.full_rank: pattern {pattern!r} matches none of the adapted modules "
                              f"(paths like {example}; e.g. 'layers.0.*', '*.self_attn.o')")
        full.update(hits)
    if cfg.rank_budget:
        return {path: cfg.rank_budget for path, _ in modules if path not in full}
    return {path: cfg.ranks.get(short, cfg.rank) for path, short in modules if path not in full}


def allocate_ranks(demands: list[float], costs: list[int], ranks: list[int], caps: list[int],
                   budget: int) -> list[int]:
    """Next cycle's ranks, in proportion to each module's `demand` (the effective rank of the
    update it just merged: exp(-sum p ln p), p = s / sum(s) over its singular values, the
    dynamics' PER x min(m, n)), within `budget` = sum of cost x rank (a module's cost: the
    elements of one rank unit of its adapter, in + out).

    Greedy apportionment (D'Hondt): the next rank unit goes to the module with the largest
    demand / (rank + 1) among those it still fits, until none fits. A module whose update
    used its rank evenly keeps its share; one whose update lived in a few directions gives
    rank to the others. Each rank stays within [ceil(r/2), min(2r, cap)] per merge, so one
    noisy spectrum cannot swing it. Deterministic: ties go to the earlier module.
    """
    lo = [max(1, (r + 1) // 2) for r in ranks]
    hi = [max(low, min(2 * r, cap)) for low, r, cap in zip(lo, ranks, caps)]
    new, spent = list(lo), sum(c * r for c, r in zip(costs, lo))
    if spent > budget:
        raise ValueError(f"rank budget of {budget} elements below the halved ranks' {spent}")
    heap = [(-demands[i] / (new[i] + 1), i) for i in range(len(new)) if new[i] < hi[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue  # no unit of this module fits any more; a cheaper one may
        new[i] += 1
        spent += costs[i]
        if new[i] < hi[i]:
            heapq.heappush(heap, (-demands[i] / (new[i] + 1), i))
    return new
