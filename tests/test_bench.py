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
