"""`logging.trackers` (tensorboard, wandb, mlflow, ...) through Accelerate's tracker classes.
metrics.jsonl stays the source of truth; nothing is contacted unless the user names a tracker."""
from __future__ import annotations

from trainer.errors import ConfigError

PROJECT = "lowrank-pretrain"  # the trackers' project / experiment name


def build_trackers(cfg, run) -> list:
    """The trackers, built as Accelerator.init_trackers builds them. Not through
    Accelerator(log_with=...): that wants the logging directory before the run directory is
    known. Directory-based trackers write under RUN/<tracker>/ (TensorBoard: RUN/tensorboard/)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    out = []
    hparams = {f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
               for section, values in cfg.to_dict().items() for k, v in values.items()}
    for name in cfg.logging.trackers:
        if name not in {str(t) for t in get_available_trackers()}:
            raise ConfigError(f"logging.trackers: {name!r} is not installed (pip install {name}), or drop it")
        cls = LOGGER_TYPE_TO_CLASS[name]
        tracker = cls(PROJECT, str(run.path / name)) if cls.requires_logging_directory else cls(PROJECT)
        tracker.start()
        tracker.store_init_configuration(hparams)
        out.append(tracker)
    return out
