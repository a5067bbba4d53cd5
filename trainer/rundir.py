"""The run directory: the names of its files, its metrics log and the default name of a new
one. The loop, the launcher and the reports all go through here, so the layout has one owner.
Torch-free: the launcher and the reports import it without the trainer's weight.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def model_json(self) -> Path:
        return self.path / "model.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def dynamics(self) -> Path:
        """The offline analysis of the checkpoints (`lrpt analyze`)."""
        return self.path / "dynamics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def is_run(self) -> bool:
        return self.metrics.is_file()

    def read_metrics(self) -> list[dict]:
        return _read_jsonl(self.metrics)

    def read_dynamics(self) -> list[dict]:
        return _read_jsonl(self.dynamics)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, [] if there is none. A line cut by a kill is skipped:
    it is the last line, or, once a resumed run has appended to it, glued to the next record."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def default_run_dir(name: str) -> Path:
    """runs/<name>-<local time>, absolute: fixed before any process starts writing into it."""
    return (Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
