"""Checkpoints are complete or ignored: checksums, fallback, retention, the latest pointer."""
import pytest
import torch

from trainer import checkpoint as ckpt


def _save(root, step, keep=3):
    return ckpt.save(root, step, {"model.pt": {"w": torch.full((4,), float(step))}}, keep=keep)


def test_save_load_and_latest(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == "step_0000020"
    assert (tmp_path / "latest").read_text() == "step_0000020"
    assert ckpt.load(latest, "model.pt")["w"][0] == 20


def test_truncated_latest_falls_back_with_warning(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert ckpt.find_latest(tmp_path).name == "step_0000010"


def test_half_written_folder_is_ignored(tmp_path):
    _save(tmp_path, 10)
    (tmp_path / "step_0000020").mkdir()  # a crash before meta.json was written
    (tmp_path / "step_0000020" / "model.pt").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="no meta.json"):
        assert ckpt.find_latest(tmp_path).name == "step_0000010"


def test_retention_keeps_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [d.name for d in ckpt.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]


def test_resolve_accepts_run_dir_or_folder(tmp_path):
    folder = _save(tmp_path / "checkpoints", 3)
    assert ckpt.resolve(tmp_path) == folder
    assert ckpt.resolve(folder) == folder
    with pytest.raises(FileNotFoundError):
        ckpt.resolve(tmp_path / "nothing")
