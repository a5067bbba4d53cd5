"""How a process starts in a run directory: lock it, then resume, refuse or start over, before
anything in it changes. Rank 0 decides (`open_run_dir`); the loop tells every rank.

A resume compares the new config with the run's own `config.yaml`: keys that define the run
refuse with one line listing the differences; keys in RESUMABLE may change and are recorded
in the resume event.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from trainer import checkpoint as ckpt
from trainer.config import Config, load_config, save_config
from trainer.errors import RunDirError
from trainer.rundir import RunDir

# Keys a resume may change: when and how long to train, what to log and keep, how ranks talk,
# and stateless step-size knobs. Every other key defines the run (model, strategy, data,
# batch geometry, seed, Adam's betas and eps, sync mode): changing it mixes two runs.
RESUMABLE = ("run.", "train.max_steps", "train.stop_at", "train.device", "train.precision", "train.compile",
             "train.activation_checkpointing", "logging.",
             "checkpoint.", "distributed.timeout_s", "distributed.guard_every", "distributed.deepspeed",
             "distributed.procs_per_node",
             "optimizer.lr", "optimizer.grad_clip", "optimizer.weight_decay", "schedule.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(old: Config, new: Config) -> tuple[dict, dict]:
    """({key: (old, new)} that define the run and may not change on resume, {key: (old, new)}
    that may), run.* left out."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    refused, allowed = {}, {}
    for key in sorted(a.keys() | b.keys()):
        if key.startswith("run.") or a.get(key) == b.get(key):
            continue
        change = (a.get(key), b.get(key))
        (allowed if key.startswith(RESUMABLE) else refused)[key] = change
    return refused, allowed


def open_run_dir(run: RunDir, cfg: Config, args) -> dict:
    """Rank 0: lock the run directory and decide how to start in it before touching it; then
    write config.yaml and model.json (`args`, the resolved shape). Refuses (RunDirError) a
    resume whose settings define another run, or whose checkpoints are all unusable;
    run.resume=false starts over with the old material moved aside. Returns what every rank
    needs: {"resume_from": folder or None, "had_records": bool, "changed": {key: [old, new]}}."""
    run.lock()
    root = run.checkpoints
    had = bool(ckpt.list_checkpoints(root)) or run.metrics_size() > 0
    resume_from, changed = None, {}
    if not cfg.run.resume:
        if had:
            print(f"run.resume=false: starting over; the old checkpoints and metrics are in {run.move_aside()}",
                  flush=True)
    else:
        resume_from = ckpt.find_latest(root)
        if resume_from is None and ckpt.list_checkpoints(root):
            raise RunDirError(f"{root} holds checkpoints but none is usable ({'; '.join(ckpt.unusable(root))}); "
                              f"pass run.resume=false to start over (the old material is moved to "
                              f"{run.path}/old-<timestamp>/)")
        if had and run.config.is_file():
            refused, changed = resume_differences(load_config(run.config), cfg)
            if refused:
                diffs = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
                raise RunDirError(f"cannot resume {run.path}: these settings define the run and differ from its "
                                  f"config.yaml: {diffs}; use another run.dir, or run.resume=false to start over")
    ckpt.check_writable(root)
    save_config(cfg, run.config)
    # The resolved shape, for export, bench, comm and analysis tools.
    tmp = run.model_json.with_name(".model.json.tmp")
    tmp.write_text(json.dumps(asdict(args), indent=1))
    tmp.replace(run.model_json)
    return {"resume_from": str(resume_from) if resume_from else None, "had_records": run.metrics_size() > 0,
            "changed": {k: list(v) for k, v in changed.items()}}


def elastic_restart() -> tuple[int, int] | None:
    """(restart, at most) when torch elastic restarted this job (lrpt launch --max-restarts:
    launcher/agent.py makes the count the job's on every node), else None."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    return (restart, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", restart))) if restart else None


def mark_start(run: RunDir, opened: dict, state, resume_from, metrics_offset: int,
               restart: tuple[int, int] | None) -> None:
    """Rank 0, once the state is loaded: a `restart` event for a restart, and a `resume` event
    marking what a reader must drop (the records written after the checkpoint; the view is
    RunDir.read_metrics)."""
    if not (opened["had_records"] or restart):
        return
    run.end_cut_line()
    at = {"step": state.step, "tokens": state.tokens}
    if restart:
        run.append_metrics({**at, "event": "restart", "restart": restart[0], "max_restarts": restart[1]})
    if opened["had_records"]:
        run.append_metrics({**at, "event": "resume", "from": resume_from.name if resume_from else None,
                            "metrics_offset": metrics_offset, "changed": opened["changed"]})
