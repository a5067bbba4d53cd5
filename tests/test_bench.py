"""`lrpt bench --json`: one object per strategy with DESIGN.md's keys (figures, not timed asserts)."""
import json
import subprocess
import sys


def test_bench_json_has_every_key(tmp_path, monkeypatch, lrpt_cache):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "--model", "micro", "--steps", "4",
                          "--strategies", "full", "relora", "--json", "--set", "data.batch_size=4",
                          "data.seq_len=32", "model.num_layers=1", "logging.eval_batches=1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert [r["strategy"] for r in rows] == ["full", "relora"]
    for r in rows:
        assert {"strategy", "model", "tokens_per_s", "step_time_s", "peak_memory_bytes", "trainable_share",
                "mfu"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["mfu"] is None  # CPU
    assert rows[0]["trainable_share"] == 1.0 > rows[1]["trainable_share"]


def test_bench_on_a_shaped_link(tmp_path, monkeypatch, lrpt_cache):
    """A 2-process gloo job inside a private network namespace with a 200 Mbit/s loopback."""
    import os
    import shutil

    import pytest
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True) if shutil.which("unshare") else None
    if (probe is None or probe.returncode != 0 or not shutil.which("tc")) and not os.environ.get("CI"):
        pytest.skip("network namespaces need root or CAP_NET_ADMIN, and unshare and tc (iproute2)")
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "--model", "micro", "--steps", "6",
                          "--strategies", "relora", "--json", "--link", "200mbit", "--nproc", "2",
                          "--target-loss", "100", "--set", "data.batch_size=4", "data.seq_len=32",
                          "model.num_layers=1", "logging.eval_batches=1", "strategy.rank=4"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads(out.stdout)
    assert {"strategy", "link", "world_size", "step_time_s", "comm_time_s", "payload_bytes_per_step",
            "wire_bytes_per_step", "tokens_per_s", "final_val_loss", "time_to_target_s"} <= set(row)
    assert row["link"] == "200mbit" and row["world_size"] == 2
    # The adapters, embeddings, head and norms cross the link once per step: fp32 trainable bytes.
    assert row["payload_bytes_per_step"] > 0 and row["step_time_s"] > 0 and row["comm_time_s"] >= 0
    assert row["final_val_loss"] < 100 and row["time_to_target_s"] is not None  # any loss beats 100


def test_bench_link_rejects_a_bad_rate(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "--link", "fast", "--strategies", "full"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "expected a rate such as 100mbit" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
