"""The run directory's one reader of metrics.jsonl, and the default run-directory name."""
from trainer.rundir import RunDir, default_run_dir


def test_read_metrics_skips_a_line_cut_by_a_crash(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_run() and run.read_metrics() == []
    run.append_metrics({"step": 1, "loss": 3.0})
    run.append_metrics({"step": 2, "loss": 2.5})
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert run.is_run()
    assert run.read_metrics() == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    # A resumed run appends after the cut: the glued line is dropped, the records after it are kept.
    run.append_metrics({"step": 3, "loss": 2.0})
    run.append_metrics({"step": 4, "loss": 1.5})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 4]


def test_default_run_dir_is_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = default_run_dir("relora-micro")
    assert d.is_absolute() and d.parent == tmp_path / "runs" and d.name.startswith("relora-micro-")
