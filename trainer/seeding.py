"""Every random stream of a run, in one place.

Strategy draws (adapter inits, optimizer pruning, SwitchLoRA candidates and switches) come
from generators keyed by (seed, step, module, purpose): every rank draws the same numbers
with no communication, and a resumed run redraws exactly what the uninterrupted one drew.
The key is hashed (numpy's SeedSequence), so distinct keys never share a stream; a linear
mix of the four numbers would (seed 1236, pool A, layer 0, slot 1822 once drew exactly what
seed 1234, pool B, layer 9, slot 0 drew).

The global generators (Python, numpy, torch) serve what must differ between ranks, such as
dropout masks: they are seeded per rank after the model is built, and checkpointed per rank.
"""
from __future__ import annotations

import enum
import random

import numpy as np
import torch


class Purpose(enum.IntEnum):
    """Distinct decisions draw from distinct streams."""
    A_INIT = 1  # LoRA/ReLoRA: A ~ Kaiming-uniform at init and after each merge
    PRUNE_A = 2  # ReLoRA: optimizer-state pruning masks (first moment, or both when joint)
    PRUNE_B = 3
    PRUNE_A_SQ = 4  # ReLoRA, prune_moments=independent: the second moment's own mask
    PRUNE_B_SQ = 5
    POOL_A = 11  # SwitchLoRA: candidate vectors of A's rows / B's columns
    POOL_B = 12
    SWITCH = 13  # SwitchLoRA: how many and which vectors switch
    RANK_GLOBAL = 21  # the per-rank global generators (dropout)


def stream_seed(*key: int) -> int:
    """A 63-bit seed hashed from non-negative integers."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1


def seeded_generator(seed: int, step: int, module_index: int, purpose: int) -> torch.Generator:
    """A CPU generator for one (seed, step, module, purpose) decision."""
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, step, module_index, int(purpose)))
    return g


def seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Give this rank its own global streams (dropout masks must differ between ranks),
    apart from every strategy stream."""
    seed_globals(stream_seed(seed, rank, 0, Purpose.RANK_GLOBAL))


def global_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
