"""Checkpoints in the format before DCP (model.pt, optimizer.pt, trainer.pt + meta.json, all
written by rank 0): read safely, as the same logical state the DCP reader gives.

torch.load(weights_only=True) admits tensors and plain containers; the few other types these
files hold are allow-listed: numpy arrays (the numpy RNG state) and numpy's RandomState
(PowerSGD's). A file whose pickle names anything else is refused with one line, unread.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from trainer.errors import refused_pickle

FILES = ("model.pt", "optimizer.pt", "trainer.pt")


def _numpy_globals() -> list:
    from numpy.random import _mt19937, _pickle

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, _mt19937.MT19937, np.random.RandomState,
            _pickle.__randomstate_ctor, _pickle.__bit_generator_ctor,
            *(type(np.dtype(t)) for t in ("u1", "u4", "i4", "i8", "f4", "f8", "?"))]


def load_file(path: Path):
    """One file of an old-format checkpoint, with no code run."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e) from None


def is_legacy(meta: dict) -> bool:
    return "model.pt" in meta.get("sha256", {})


def read(folder: Path, parts=("model", "optimizer", "trainer")) -> dict:
    """{"model": {name: tensor}, "optimizer": {name: {key: tensor}}, "trainer": {...},
    "own": [each rank's own state]} with the old files' full tensors."""
    out = {}
    if "model" in parts:
        out["model"] = load_file(folder / "model.pt")
    if "optimizer" in parts:
        out["optimizer"] = {k: v for k, v in load_file(folder / "optimizer.pt").items() if isinstance(v, dict)}
    if "trainer" in parts:
        t = load_file(folder / "trainer.pt")
        out["trainer"] = {k: t[k] for k in ("state", "data", "strategy", "metrics_offset") if k in t}
        rng = t.get("rng")
        rng = rng if isinstance(rng, list) else [rng]
        own = t.get("per_rank") or [{} for _ in rng]
        # The old sync state (DiLoCo's anchor and momentum) was whole and alike on every rank.
        out["own"] = [{**o, "rng": r, "sync": t.get("sync") or {}} for o, r in zip(own, rng)]
    if "sync" in parts:
        out["sync"] = {}  # by name in trainer.pt's "sync" (in "own" above): fill() lays it out
    return out
