"""Checkpoint folders for tests that read them.

`save_model` writes a model's state dict as a (model-only) checkpoint through the real writer.

`to_legacy` rewrites a checkpoint in the format before DCP: what rank 0 wrote up to commit
5e0c52e (trainer/checkpoint.py `capture` and `save` there), built from a DCP checkpoint of the
same state so a test can resume from both and compare:

    model.pt      {name: fp32 tensor}: the module's state dict
    optimizer.pt  {name: {state key: full tensor}}
    trainer.pt    {state, data, strategy, metrics_offset, rng: [each rank's global RNG states],
                   sync: the sync mode's state (alike on every rank), per_rank: [each rank's
                   {hook, and under DiLoCo local, optimizer}]}
    meta.json     {"step", "sha256": {file: digest}}, written last
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer.checkpoint import folder as fs
from trainer.checkpoint.dcp_io import Chunk


def save_model(ckpt_root: Path, step: int, state_dict: dict, keep: int = 3) -> Path:
    """`state_dict` (a module's) as checkpoint `step` of `ckpt_root`, with no optimizer or
    trainer state: what eval, export and analyze read."""
    state = {"model": {k: Chunk.whole(v) for k, v in state_dict.items()}, "optimizer": {}, "trainer": {}, "sync": {},
             "own": {}}
    ckpt.Checkpointer(ckpt_root, keep, background=False, rank=0, world=1).save(state, step, final=True)
    return Path(ckpt_root) / fs.step_dir_name(step)


def to_legacy(folder: Path) -> None:
    """Rewrite checkpoint `folder` (DCP) in the old format, in place."""
    state = ckpt.read(folder)
    own, sync = state["own"], {}
    layout = state["trainer"].pop("sync_layout", None)
    if layout:  # DiLoCo's anchor and momentum, whole and by name as the old format kept them
        sync = {key: dict(zip(layout["names"], flat.split(layout["numels"]))) for key, flat in state["sync"].items()}
    trainer = {**state["trainer"], "rng": [o["rng"] for o in own], "sync": sync,
               "per_rank": [{k: v for k, v in o.items() if k != "rng"} for o in own]}
    files = {"model.pt": {k: v.float() for k, v in state["model"].items()}, "optimizer.pt": state["optimizer"],
             "trainer.pt": trainer}
    step = fs.step_of(folder)
    shutil.rmtree(folder)
    folder.mkdir()
    for name, obj in files.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        (folder / name).write_bytes(buf.getvalue())
    meta = {"step": step, "sha256": {name: fs.sha256(folder / name) for name in files}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def plant(folder: Path, name: str, payload: bytes) -> None:
    """Replace file `name` of a checkpoint and record its new digest, as someone who can write
    the run directory could: the checksums pass, so only the loader stands in the way."""
    (folder / name).write_bytes(payload)
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"][name] = fs.sha256(folder / name)
    if "meta_sha256" in meta:
        del meta["meta_sha256"]
        meta["meta_sha256"] = fs._digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
