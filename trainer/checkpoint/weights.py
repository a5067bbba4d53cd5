"""A model's weights from a checkpoint, for what reads one outside training: `lrpt eval`,
`lrpt export`, `lrpt analyze` and `model.init_from` (which also takes a Hugging Face Llama
directory). Either checkpoint format; adapters folded into their weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint import folder as fs
from trainer.checkpoint.saver import read


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The unwrapped model's fp32 state dict as saved (adapters, if any, unmerged)."""
    return {k: v.float() for k, v in read(folder, ("model",))["model"].items()}


def read_weights(path: str | Path):
    """(ModelArgs, merged fp32 state dict, the run's Config or None, checkpoint folder) for a
    run directory (its newest complete checkpoint), a checkpoint folder or a file in one."""
    from trainer.config import load_config
    from trainer.shapes import ModelArgs, model_args
    from trainer.strategies.lora import merged_state_dict

    path = Path(path)
    folder = fs.resolve(path.parent if path.is_file() else path)
    run_dir = folder.parent.parent
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    state = merged_state_dict(model_state(folder))
    shape = run_dir / "model.json"  # the shape the run built; older runs: config + embedding rows
    if shape.is_file():
        args = ModelArgs(**json.loads(shape.read_text()))
    elif cfg is not None:
        args = model_args(cfg.model, cfg.data.seq_len, vocab_size=state["embed_tokens.weight"].shape[0])
    else:
        raise FileNotFoundError(f"{run_dir} has neither model.json nor config.yaml: the model's shape is unknown")
    return args, state, cfg, folder


def load_model(path: str | Path, device="cpu"):
    """(model in eval mode with adapters merged, Config, checkpoint folder)."""
    from trainer.model import Transformer

    args, state, cfg, folder = read_weights(path)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, folder


def initial_weights(path: str | Path, seq_len: int):
    """(ModelArgs, state dict) to start a run from (`model.init_from`): a Hugging Face Llama
    directory, or a run directory or checkpoint of ours (adapters merged). The RoPE table
    is cut to `seq_len`."""
    from dataclasses import replace

    from trainer import hf

    if hf.is_hf_dir(path):
        return hf.model_args_from_hf(path, max_seq_len=seq_len), hf.read_hf_state_dict(path)
    args, state, _, _ = read_weights(path)
    return replace(args, max_seq_len=seq_len), state
