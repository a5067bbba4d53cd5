"""Checkpoints: the small interface the loop, the resume logic and the tools use. The format,
integrity, background writes and the old format stay behind it.

    folder.py   complete-or-ignored folders: the marker, checksums, `latest`, retention, fallback
    dcp_io.py   torch.distributed.checkpoint I/O of each rank's share; loading that runs no code
    plain.py    non-tensor state as JSON plus tensors (no pickle)
    state.py    what a Trainer's checkpoint holds (its state_dict), captured and restored in place
    saver.py    writing (in the background if asked) and reading back, either format
    legacy.py   the format before DCP (model.pt, optimizer.pt, trainer.pt), read safely
    weights.py  a model's weights for eval, export, analyze and model.init_from
"""
from trainer.checkpoint.folder import (check_writable, complete_checkpoints, find_latest, list_checkpoints,
                                       resolve, step_dir_name, step_of, unusable, verify)
from trainer.checkpoint.saver import Checkpointer, fill, read
from trainer.checkpoint.state import capture, destination, restore
from trainer.checkpoint.weights import initial_weights, load_model, model_state, read_weights


def load(trainer, folder, group=None) -> None:
    """Continue `trainer` (built for the checkpoint's step) from checkpoint `folder`: each rank
    reads what it holds, at any world size and engine (a collective over `group`)."""
    dest = destination(trainer)
    fill(folder, dest, trainer.rank, trainer.world, group)
    trainer.load_state_dict(dest)


__all__ = ["Checkpointer", "capture", "check_writable", "complete_checkpoints", "destination", "fill",
           "find_latest", "initial_weights", "list_checkpoints", "load", "load_model", "model_state", "read",
           "read_weights", "resolve", "restore", "step_dir_name", "step_of", "unusable", "verify"]
