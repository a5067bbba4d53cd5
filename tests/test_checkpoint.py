"""Checkpoints are complete or ignored: checksums, fallback, retention, the latest pointer, the
write order, writes that fail part-way (disk full, read-only, I/O error), background writes that
complete only once written, and the JSON form of non-tensor state. One process, the real DCP
writer and reader (tests/test_checkpoint_dist.py has the multi-process ones)."""
import errno
import os
import random
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.checkpoint import folder as fs
from trainer.checkpoint import plain
from trainer.checkpoint.dcp_io import Chunk
from trainer.errors import CheckpointError

FILES = [".metadata", "__0_0.distcp", "meta.json", "rank_00000.json"]


def tiny_state(step: int) -> dict:
    """A state as checkpoint.capture gives it, for one process."""
    w = torch.full((2, 3), float(step))
    return {"model": {"w": Chunk.whole(w), "norm": Chunk.whole(torch.ones(3))},
            "optimizer": {"w": {"exp_avg": Chunk.whole(w * 2), "step": torch.tensor(float(step))}},
            "trainer": {"state": {"step": step}, "pair": (1, "a"), "store": {7: torch.arange(3.0)}},
            "own": {"rng": np.random.RandomState(step).get_state()}}


def _save(root, step, keep=3, background=False):
    saver = ckpt.Checkpointer(root, keep, background, rank=0, world=1)
    saver.save(tiny_state(step), step, final=True)
    return root / fs.step_dir_name(step)


def test_save_read_and_latest(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == "step_0000020" and (tmp_path / "latest").read_text() == "step_0000020"
    assert sorted(p.name for p in latest.iterdir()) == FILES
    got = ckpt.read(latest)
    assert torch.equal(got["model"]["w"], torch.full((2, 3), 20.0)) and got["model"]["w"].shape == (2, 3)
    assert torch.equal(got["optimizer"]["w"]["exp_avg"], torch.full((2, 3), 40.0))
    assert got["optimizer"]["w"]["step"].dim() == 0 and got["optimizer"]["w"]["step"].item() == 20
    assert got["trainer"]["pair"] == (1, "a") and torch.equal(got["trainer"]["store"][7], torch.arange(3.0))
    rng = got["own"][0]["rng"]
    want = np.random.RandomState(20).get_state()
    assert rng[0] == want[0] and np.array_equal(rng[1], want[1]) and rng[1].dtype == want[1].dtype


def test_a_background_save_is_a_copy_and_completes_only_once_settled(tmp_path):
    saver = ckpt.Checkpointer(tmp_path, 3, background=True, rank=0, world=1)
    state = tiny_state(5)
    saver.save(state, 5)
    state["model"]["w"].local.fill_(-1)  # training goes on and changes the weights
    while saver.flags()[0] == 0:  # the write runs in the background
        time.sleep(0.01)
    assert ckpt.find_latest(tmp_path) is None and not (tmp_path / "step_0000005").exists()
    saver.settle(*saver.flags())  # what the loop does after its per-step all-reduce: rank 0 completes it
    saver.wait()  # (in the background as well: the next save, or the end, waits for that)
    assert ckpt.find_latest(tmp_path).name == "step_0000005"
    assert torch.equal(ckpt.read(tmp_path / "step_0000005")["model"]["w"], torch.full((2, 3), 5.0))


def test_truncated_latest_falls_back_with_warning(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    data = (newest / "__0_0.distcp").read_bytes()
    (newest / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert ckpt.find_latest(tmp_path).name == "step_0000010"


def test_half_written_folder_is_ignored(tmp_path):
    _save(tmp_path, 10)
    (tmp_path / "step_0000020").mkdir()  # a crash before meta.json was written
    (tmp_path / "step_0000020" / "__0_0.distcp").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="no meta.json"):
        assert ckpt.find_latest(tmp_path).name == "step_0000010"


def test_retention_keeps_last_k_and_drops_stale_temporary_folders(tmp_path):
    (tmp_path / ".tmp-step_0000003").mkdir(parents=True)  # a save a crash left behind
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004", "step_0000005"]


def test_resolve_accepts_run_dir_or_folder(tmp_path):
    folder = _save(tmp_path / "checkpoints", 3)
    assert ckpt.resolve(tmp_path) == folder
    assert ckpt.resolve(folder) == folder
    with pytest.raises(FileNotFoundError):
        ckpt.resolve(tmp_path / "nothing")


# -- the write order and failures part-way -------------------------------------------------------


def test_write_order_marker_last_inside_tmp_then_rename(tmp_path, monkeypatch):
    """meta.json marks a folder complete: it is written after every other file (the shard and
    .metadata by DCP, then the rank's record), inside the temporary folder, and only then is
    the folder renamed and `latest` moved."""
    events = []
    real_write, real_replace = fs.fsync_write, os.replace

    def write(path, data):
        events.append(("write", path.name, sorted(p.name for p in path.parent.iterdir())))
        real_write(path, data)
    monkeypatch.setattr(fs, "fsync_write", write)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", a.name, b.name)), real_replace(a, b)))
    _save(tmp_path, 7)
    assert events[0] == ("write", "rank_00000.json", [".metadata", "__0_0.distcp"])
    assert events[1] == ("write", "meta.json", [".metadata", "__0_0.distcp", "rank_00000.json"])
    assert events[2] == ("rename", ".tmp-step_0000007", "step_0000007")
    assert events[3][:2] == ("write", ".latest.tmp") and events[4] == ("rename", ".latest.tmp", "latest")


def _fail_on(monkeypatch, name, err):
    real = fs.fsync_write

    def write(path, data):
        if path.name == name:
            with open(path, "wb") as f:  # part of the file reaches the disk, then the write fails
                f.write(data[: len(data) // 2])
            raise OSError(err, os.strerror(err), str(path))
        real(path, data)
    monkeypatch.setattr(fs, "fsync_write", write)


@pytest.mark.parametrize("name", ["rank_00000.json", "meta.json"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_save_keeps_the_previous_latest_and_no_half_folder(tmp_path, monkeypatch, err, name):
    _save(tmp_path, 10)
    _fail_on(monkeypatch, name, err)
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
@pytest.mark.parametrize("name", FILES)
def test_each_damaged_file_falls_back(tmp_path, name, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    path = newest / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # anywhere in the file, JSON included: every byte is covered by a digest
        i = random.Random(name).randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    else:
        path.unlink()
    with pytest.warns(UserWarning, match="step_0000002 is unusable"):
        assert ckpt.find_latest(tmp_path).name == "step_0000001"


# -- non-tensor state without pickle -------------------------------------------------------------


def test_plain_state_round_trips_through_json_and_refuses_other_types():
    import json

    rs = np.random.RandomState(3)
    rs.rand(5)
    state = {"a": (1, 2.5, None, True), 3: {"x": torch.ones(2)}, "rs": rs, "arr": np.arange(4, dtype=np.uint32)}
    skeleton, tensors = plain.split(state, "p")
    back = plain.join(json.loads(json.dumps(skeleton)), tensors)
    assert back["a"] == (1, 2.5, None, True) and torch.equal(back[3]["x"], torch.ones(2))
    assert back["rs"].rand() == rs.rand() and back["arr"].dtype == np.uint32
    with pytest.raises(TypeError, match="'p/f' is a function"):
        plain.split({"f": lambda: 0}, "p")
