"""`lrpt compare`: several runs at one budget -> a Markdown table and plots; re-running skips
finished runs (an interrupted sweep resumes only what did not finish)."""
import json
import re
import shutil
import subprocess
import sys

SWEEP = """
sweep:
  common:
    model: {name: micro}
    data: {seq_len: 32, batch_size: 4, embedded_sentences: 2000, embedded_vocab: 300}
    train: {max_steps: 4}
    logging: {log_every: 1, eval_every: 2, eval_batches: 1, progress: false, tensorboard: false}
    schedule: {warmup_steps: 1}
  runs:
    full: {strategy: {name: full}}
    relora: {strategy: {name: relora, rank: 4, reset_every: 2, restart_warmup: 1}}
"""


def test_compare_writes_table_and_plots_and_skips_finished(tmp_path, lrpt_cache, monkeypatch):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "launcher.cli", "compare", str(sweep), "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| run | strategy | train loss | val loss")
    rows = {line.split("|")[1].strip(): line for line in table[2:] if line.startswith("|")}
    assert set(rows) == {"full", "relora"}
    assert "0.0%" in rows["full"] and "n/a" not in rows["relora"].split("|")[10]  # saving computed
    pngs = list((out / "plots").glob("*.png"))
    assert {"loss.png", "lr.png"} <= {p.name for p in pngs} and all(p.stat().st_size > 1000 for p in pngs)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.count("already finished") == 2

    # One definition of the trainable share: the console's start-up line and the table agree.
    console = re.search(r"trainable share ([\d.]+%) of the base model", first.stdout.split("[relora]")[1])
    assert console and f"| {console[1]} |" in rows["relora"], (console, rows["relora"])
    assert "of the base model" in table[-1]

    # Existing run directories are tabulated as they are, without training; a run whose data
    # has no minimal pairs shows n/a, not nan.
    shutil.copytree(out / "relora", tmp_path / "nopairs")
    records = [json.loads(line) for line in (tmp_path / "nopairs" / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "nopairs" / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("blimp")}) + "\n" for r in records))
    third = subprocess.run([sys.executable, "-m", "launcher.cli", "compare", str(out / "full"),
                            str(tmp_path / "nopairs"), "--out", str(tmp_path / "table")],
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "] training ->" not in third.stdout and not (tmp_path / "table" / "configs").exists()
    table = (tmp_path / "table" / "comparison.md").read_text()
    assert "nan" not in table
    nopairs = next(line for line in table.splitlines() if line.startswith("| nopairs "))
    assert nopairs.split("|")[6].strip() == "n/a" and nopairs.split("|")[7] == rows["relora"].split("|")[7]
    assert (tmp_path / "table" / "plots" / "lr.png").is_file()
    mixed = subprocess.run([sys.executable, "-m", "launcher.cli", "compare", str(out / "full"), str(sweep),
                            "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=600)
    assert mixed.returncode == 2 and "not both" in mixed.stderr
