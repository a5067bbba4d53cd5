"""Both checkpoint formats, read by everything that reads one, and loading that runs no code.

- A run whose checkpoints are in the format before DCP (tests/checkpoint_files.py) resumes and
  rebuilds the uninterrupted curve; `lrpt eval`, `lrpt export`, `lrpt analyze` and
  `model.init_from` give the same results from either format.
- A planted pickle that would create a file when unpickled, with its checksum updated (DCP's
  `.metadata`; the old model.pt and trainer.pt; a Hugging Face pytorch_model.bin): resume,
  init_from, eval, export and analyze each refuse it with one line, and the file never appears.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests import faults
from tests.checkpoint_files import plant, to_legacy
from trainer import checkpoint as ckpt
from trainer.rundir import RunDir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted ReLoRA run, the same run stopped at step 4 (checkpoints 3 and 4), and a
    copy of that one with its checkpoints rewritten in the old format."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LRPT_CACHE", str(tmp_path_factory.mktemp("formats-cache")))
    undo = faults.fast_and_single_threaded()
    root = tmp_path_factory.mktemp("formats")
    faults.run("relora", root / "ref")
    faults.run("relora", root / "new", "train.stop_at=4")
    shutil.copytree(root / "new", root / "old")
    for folder in ckpt.list_checkpoints(root / "old" / "checkpoints"):
        to_legacy(folder)
    yield {name: root / name for name in ("ref", "new", "old")}
    undo()
    mp.undo()


def test_an_old_format_run_resumes_exactly(runs, tmp_path):
    d = tmp_path / "old"
    shutil.copytree(runs["old"], d)
    assert (ckpt.find_latest(d / "checkpoints") / "trainer.pt").is_file()
    faults.run("relora", d)
    assert faults.curve(d) == faults.curve(runs["ref"])
    assert (ckpt.find_latest(d / "checkpoints") / ".metadata").is_file()  # new saves are DCP


def test_eval_export_analyze_and_init_from_read_both_formats(runs, tmp_path):
    from safetensors.torch import load_file

    from trainer.dynamics import analyze_run
    from trainer.evaluate import evaluate_checkpoint
    from trainer.export import export_hf

    got = {}
    for fmt in ("new", "old"):
        run = tmp_path / fmt
        shutil.copytree(runs[fmt], run)
        args, weights = ckpt.initial_weights(run, 32)
        init = faults.run("full", tmp_path / f"init-{fmt}", f"model.init_from={run}", "train.max_steps=2")
        got[fmt] = dict(eval=evaluate_checkpoint(run), weights=weights, args=args,
                        export=load_file(str(export_hf(run, tmp_path / f"hf-{fmt}") / "model.safetensors")),
                        analyze=analyze_run(run), init=RunDir(init).read_metrics())
    new, old = got["new"], got["old"]
    assert {k: v for k, v in new["eval"].items() if k != "checkpoint"} == \
           {k: v for k, v in old["eval"].items() if k != "checkpoint"}
    assert new["args"] == old["args"] and new["args"].max_seq_len == 32
    assert new["weights"].keys() == old["weights"].keys() and not any("lora" in k for k in new["weights"])
    assert all(torch.equal(new["weights"][k], old["weights"][k]) for k in new["weights"])
    assert new["export"].keys() == old["export"].keys()
    assert all(torch.equal(new["export"][k], old["export"][k]) for k in new["export"])
    assert new["analyze"] == old["analyze"] and len(new["analyze"]) == 2
    assert faults.curve(tmp_path / "init-new") == faults.curve(tmp_path / "init-old")
    # The run started from the checkpoint's weights: its step-0 evaluation is the checkpoint's.
    assert new["init"][0]["step"] == 0 and new["init"][0]["val_loss"] == new["eval"]["val_loss"]


# -- loading runs no code ------------------------------------------------------------------------

class _Plant:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _main(capsys, module: str, *args: str) -> tuple[int, list[str]]:
    if module == "trainer":
        from trainer.__main__ import main
    else:
        from launcher.cli import main
    capsys.readouterr()
    code = main(list(args))
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith(("error", "config error"))]
    return code, err


@pytest.mark.parametrize("fmt,name", [("new", ".metadata"), ("old", "model.pt"), ("old", "trainer.pt")])
def test_a_planted_pickle_is_refused_by_every_reader_and_never_runs(runs, tmp_path, capsys, fmt, name):
    marker = tmp_path / "PLANTED"
    run = tmp_path / "run"
    shutil.copytree(runs[fmt], run)
    for folder in ckpt.list_checkpoints(run / "checkpoints"):
        if name.endswith(".pt"):
            import io
            buf = io.BytesIO()
            torch.save({"x": _Plant(marker)}, buf)
            payload = buf.getvalue()
        else:
            payload = pickle.dumps(_Plant(marker))
        plant(folder, name, payload)
        assert ckpt.verify(folder) is None  # the checksums pass: only the loader stands in the way
    attempts = {"resume": ("trainer", *faults.overrides("relora", run))}
    if name != "trainer.pt":  # the readers of weights never open trainer.pt
        attempts.update({
            "init_from": ("trainer", *faults.overrides("full", tmp_path / "other", f"model.init_from={run}")),
            "eval": ("lrpt", "eval", str(run)), "export": ("lrpt", "export", str(run), str(tmp_path / "hf")),
            "analyze": ("lrpt", "analyze", str(run))})
    for what, (module, *args) in attempts.items():
        code, err = _main(capsys, module, *args)
        assert code == 1 and len(err) == 1 and "refusing to load" in err[0], (what, code, err)
        assert name in err[0] and ("posix.system" in err[0] or "is not part of" in err[0]), (what, err)
        assert not marker.exists(), what


def test_a_planted_hugging_face_bin_is_refused(runs, tmp_path, capsys):
    from trainer.export import export_hf

    marker = tmp_path / "PLANTED"
    hf = export_hf(runs["new"], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Plant(marker)}, hf / "pytorch_model.bin")
    code, err = _main(capsys, "trainer", *faults.overrides("full", tmp_path / "r", f"model.init_from={hf}"))
    assert code == 1 and len(err) == 1 and "refusing to load" in err[0] and "pytorch_model.bin" in err[0], err
    assert not marker.exists()
