"""`lrpt export`: a run's checkpoint, adapters merged, as a Hugging Face Llama directory."""
from __future__ import annotations

import logging
from pathlib import Path

from trainer.checkpoint import load_model, step_of
from trainer.hf import write_hf

log = logging.getLogger(__name__)


def _tokenizer_source(cfg, data_dir):
    """The run's prepared dataset (or `data_dir`), whose tokenizer ships with the export."""
    from trainer.data import PreparedData, resolve_dataset

    try:
        return PreparedData(Path(data_dir) if data_dir else resolve_dataset(cfg.data))
    except Exception as e:
        if data_dir:
            raise
        # The weights are still worth exporting when the run's dataset is gone.
        log.warning("export: no tokenizer (%s); writing weights and config only", e)
        return None


def export_hf(path: str | Path, out_dir: str | Path, *, data_dir: str | Path | None = None) -> Path:
    """Write a run's latest (or the given) checkpoint, either format, adapters merged, as a
    Hugging Face Llama directory loadable offline by AutoModelForCausalLM / AutoTokenizer."""
    model, cfg, ckpt = load_model(path)
    out = write_hf(model, out_dir, _tokenizer_source(cfg, data_dir) if cfg is not None or data_dir else None)
    log.info("exported %s (step %d) to %s", ckpt, step_of(ckpt), out)
    return out
