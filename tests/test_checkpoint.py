"""Checkpoints are complete or ignored: checksums, fallback, retention, the latest pointer,
the write order, and writes that fail part-way (disk full, read-only, I/O error)."""
import errno
import os
import shutil
import subprocess

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.errors import CheckpointError


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


# -- the write order and failures part-way -------------------------------------------------------


def test_write_order_meta_last_inside_tmp_then_rename(tmp_path, monkeypatch):
    """meta.json marks a folder complete: it is written after every payload file, inside the
    temporary folder, and only then is the folder renamed and `latest` moved."""
    events = []
    real_write, real_replace = ckpt._fsync_write, os.replace
    monkeypatch.setattr(ckpt, "_fsync_write",
                        lambda path, data: (events.append(("write", path)), real_write(path, data)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", a, b)), real_replace(a, b)))
    ckpt.save(tmp_path, 7, {"model.pt": {"w": torch.ones(2)}, "optimizer.pt": {}, "trainer.pt": {}}, keep=3)
    tmp, final = tmp_path / ".tmp-step_0000007", tmp_path / "step_0000007"
    assert events[:4] == [("write", tmp / "model.pt"), ("write", tmp / "optimizer.pt"),
                          ("write", tmp / "trainer.pt"), ("write", tmp / "meta.json")]
    assert events[4] == ("rename", tmp, final)
    assert events[5][0] == "write" and events[6] == ("rename", tmp_path / ".latest.tmp", tmp_path / "latest")


def _fail_on(monkeypatch, name, err):
    real = ckpt._fsync_write

    def write(path, data):
        if path.name == name:
            with open(path, "wb") as f:  # part of the file reaches the disk, then the write fails
                f.write(data[: len(data) // 2])
            raise OSError(err, os.strerror(err), str(path))
        real(path, data)
    monkeypatch.setattr(ckpt, "_fsync_write", write)


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_save_keeps_the_previous_latest_and_no_half_folder(tmp_path, monkeypatch, err):
    _save(tmp_path, 10)
    _fail_on(monkeypatch, "model.pt", err)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 20)
    assert "the latest checkpoint is still step_0000010" in str(e.value) and "\n" not in str(e.value)
    if err == errno.ENOSPC:
        assert "no space left" in str(e.value) and "MiB are free" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000010"]
    assert ckpt.find_latest(tmp_path).name == "step_0000010"


def test_latest_holding_random_bytes_is_ignored(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (tmp_path / "latest").write_bytes(os.urandom(300) + b"\x00/../")
    with pytest.warns(UserWarning, match="does not name a checkpoint folder"):
        assert ckpt.find_latest(tmp_path).name == "step_0000020"
    _save(tmp_path, 30)  # the next save repairs the pointer
    assert (tmp_path / "latest").read_text() == "step_0000030"


def make_read_only(path):
    """chmod for a normal user; root writes through modes, so the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip("running as root without chattr +i: cannot make a directory read-only")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_checkpoint_directory_is_one_line(tmp_path):
    _save(tmp_path, 10)
    undo = make_read_only(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint step 20 into .*still step_0000010"):
            _save(tmp_path, 20)
        with pytest.raises(CheckpointError, match="cannot write checkpoints into"):
            ckpt.check_writable(tmp_path)
    finally:
        undo()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "trainer.pt", "meta.json"])
def test_each_damaged_file_falls_back(tmp_path, name, damage):
    payload = {"model.pt": {"w": torch.ones(64)}, "optimizer.pt": {"m": torch.zeros(64)}, "trainer.pt": {"step": 1}}
    ckpt.save(tmp_path, 1, payload, keep=3)
    newest = ckpt.save(tmp_path, 2, payload, keep=3)
    path = newest / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])
    else:
        path.unlink()
    with pytest.warns(UserWarning, match="step_0000002 is unusable"):
        assert ckpt.find_latest(tmp_path).name == "step_0000001"
