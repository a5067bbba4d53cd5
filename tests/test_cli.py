"""The `lrpt` command line as a user meets it: real `python -m launcher.cli` subprocesses,
their exit codes, stdout and stderr. User errors must give exit code 2 and one line on
stderr (no traceback); a short training run on data prepared by `lrpt data prepare` must
leave a complete run directory."""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VERBS = ["train", "data", "launch", "slurm", "comm", "frontier", "eval", "analyze", "plot", "compare", "export",
         "bench"]
# The short run of the brief: micro model, 5 steps of 4 x 32 tokens.
TRAIN_ARGS = ["train.max_steps=5", "model.name=micro", "data.seq_len=32", "data.batch_size=4",
              "logging.progress=false"]


def _env(cache: Path) -> dict:
    """The subprocess environment: the session's corpus cache, the checkout importable even
    where the package is not installed, and one intra-op thread: for 4 x 32-token batches
    threads only add overhead, and on a busy 2-core machine two of them run 10x slower."""
    env = dict(os.environ, LRPT_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def lrpt(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # The environment is read at call time, so a test's monkeypatch.setenv reaches the child.
    return subprocess.run([sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=cwd, env=_env(
        Path(os.environ["LRPT_CACHE"])), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    """Exit code 2, nothing on stdout, exactly one line on stderr and no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert r.stdout.strip() == "", r.stdout
    return lines[0]


@pytest.fixture(autouse=True)
def _cache(lrpt_cache, monkeypatch):
    monkeypatch.setenv("LRPT_CACHE", str(lrpt_cache))


# ---------------------------------------------------------------------------------------------
# Help


def test_help_lists_every_verb_and_examples(tmp_path):
    r = lrpt("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"^    (\w+)\s", r.stdout, flags=re.M))
    assert set(VERBS) <= listed, f"missing verbs: {set(VERBS) - listed}"
    examples = r.stdout.split("examples:", 1)[1]
    for verb in VERBS + ["data prepare", "data describe", "slurm submit", "slurm status"]:
        assert f"lrpt {verb} " in examples, verb
    # No verb prints the same help.
    assert lrpt(cwd=tmp_path).stdout == r.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(tmp_path, verb):
    r = lrpt(verb, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: lrpt {verb}"), r.stdout


def test_help_config_lists_keys_with_defaults(tmp_path):
    r = lrpt("train", "--help-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    keys = {line.split()[0]: line for line in r.stdout.splitlines()}
    for key in ["run.dir", "model.name", "strategy.name", "strategy.rank", "strategy.reset_every",
                "train.max_steps", "train.seed", "data.source", "optimizer.lr"]:
        assert key in keys, key
    assert re.match(r"strategy\.reset_every\s+= 1000\s+\S", keys["strategy.reset_every"])  # default and comment
    assert re.match(r"model\.name\s+= 'micro'", keys["model.name"])
    assert re.match(r"train\.max_steps\s+= 300\b", keys["train.max_steps"])


# ---------------------------------------------------------------------------------------------
# User errors: exit code 2, one line


def test_misspelt_override_suggests_the_key(tmp_path):
    line = assert_one_line_error(lrpt("train", "strategy.rnak=4", cwd=tmp_path))
    assert "strategy.rnak" in line and "strategy.rank" in line, line
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("args, expected", [
    (["train", "missing.yaml"], r"missing\.yaml.*not found"),
    (["train", "strategy.rank=abc"], r"strategy\.rank.*integer"),
    (["data", "prepare", "missing.txt", "--out", "x"], r"missing\.txt.*not found"),
    (["data", "describe", "nowhere"], r"nowhere.*not a prepared dataset"),
    (["plot", "nowhere", "--out", "plots"], r"nowhere.*not a run directory"),
    (["analyze", "nowhere"], r"nowhere.*not a run directory"),
    (["eval", "nowhere"], r"nowhere"),
])
def test_user_errors_are_one_line(tmp_path, args, expected):
    line = assert_one_line_error(lrpt(*args, cwd=tmp_path))
    assert re.search(expected, line), line


def test_bad_key_in_config_file(tmp_path):
    (tmp_path / "exp.yaml").write_text("model: {name: micro}\ntrain: {max_stesp: 10}\n")
    line = assert_one_line_error(lrpt("train", "exp.yaml", cwd=tmp_path))
    assert "train.max_stesp" in line and "train.max_steps" in line, line


def test_usage_errors_exit_2(tmp_path):
    assert lrpt("trian", cwd=tmp_path).returncode == 2  # argparse: invalid choice
    assert lrpt("data", cwd=tmp_path).returncode == 2  # a sub-verb is required
    assert lrpt("data", "prepare", "a.txt", cwd=tmp_path).returncode == 2  # --out is required


# ---------------------------------------------------------------------------------------------
# Prepare -> describe -> train


def _write_sources(src: Path) -> None:
    rng = random.Random(0)
    nouns = "cat dog bird child teacher farmer river house garden letter song window".split()
    verbs = "sees finds likes carries draws opens follows hears".split()
    adjs = "small red old quiet bright tall green happy".split()

    def sentence():
        return (f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} "
                f"the {rng.choice(nouns)} near the {rng.choice(nouns)}.")

    src.mkdir()
    # .txt: one document per paragraph (paragraphs separated by blank lines).
    (src / "notes.txt").write_text("\n\n".join(
        "\n".join(" ".join(sentence() for _ in range(4)) for _ in range(2)) for _ in range(150)) + "\n")
    # .jsonl: one document per line, text in the "text" field.
    with open(src / "docs.jsonl", "w") as f:
        for _ in range(150):
            f.write(json.dumps({"text": " ".join(sentence() for _ in range(8)), "id": rng.random()}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lrpt_cache):
    """Prepare the test's own corpus, describe it and train 5 steps on it, each through the
    CLI. Module scope: the tests below read the results."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRPT_CACHE", str(lrpt_cache))
        work = tmp_path_factory.mktemp("cli")
        _write_sources(work / "src")
        prep = lrpt("data", "prepare", "src/notes.txt", "src/docs.jsonl", "--out", "prepared",
                    "--vocab-size", "320", "--val-fraction", "0.1", cwd=work)
        desc = lrpt("data", "describe", "prepared", cwd=work)
        run_dir = work / "run"
        train = lrpt("train", f"data.source={work / 'prepared'}", *TRAIN_ARGS, f"run.dir={run_dir}", cwd=work,
                     timeout=180)
    return {"work": work, "prepare": prep, "describe": desc, "train": train, "run_dir": run_dir}


def test_data_prepare_and_describe(trained):
    prep, desc, work = trained["prepare"], trained["describe"], trained["work"]
    assert prep.returncode == 0, prep.stderr
    assert "lrpt train data.source=" in prep.stdout
    assert prep.stdout.splitlines()[0].strip() == "prepared", prep.stdout  # no stray lines before the summary
    index = json.loads((work / "prepared" / "index.json").read_text())
    assert index["vocab_size"] == 320 and index["dtype"] == "uint16"
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 300
    assert index["splits"]["val"]["documents"] > 0
    assert desc.returncode == 0, desc.stderr
    assert "vocab 320" in desc.stdout
    for split in ("train", "val"):
        tokens = index["splits"][split]["tokens"]
        assert re.search(rf"{split}: {tokens:,} tokens, {index['splits'][split]['documents']:,} documents", desc.stdout)
    # Preparing into the same non-empty directory again is refused in one line ...
    line = assert_one_line_error(lrpt("data", "prepare", "src/notes.txt", "--out", "prepared", cwd=work))
    assert "--overwrite" in line, line
    # ... unless asked; a directory source takes every .txt/.jsonl file under it.
    again = lrpt("data", "prepare", "src", "--out", "prepared2", "--vocab-size", "320", cwd=work)
    assert again.returncode == 0, again.stderr
    index2 = json.loads((work / "prepared2" / "index.json").read_text())
    assert index2["splits"]["train"]["documents"] + index2["splits"]["val"]["documents"] == 300


def test_train_prints_params_and_run_dir(trained):
    r, run_dir = trained["train"], trained["run_dir"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    m = re.search(r"params ([\d.]+[KMB]?).*trainable ([\d.]+[KMB]?), frozen (\d+)", r.stdout)
    assert m, r.stdout
    assert m.group(1) == m.group(2) and m.group(3) == "0"  # strategy full: everything trains
    assert f"run directory: {run_dir}" in r.stdout
    assert re.search(r"^done: 5 steps, 640 tokens", r.stdout, flags=re.M), r.stdout  # 5 x 4 x 32


def test_train_writes_run_directory(trained):
    run_dir, work = trained["run_dir"], trained["work"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["source"] == str(work / "prepared")
    assert cfg["train"]["max_steps"] == 5 and cfg["model"]["name"] == "micro"
    assert cfg["data"]["seq_len"] == 32 and cfg["data"]["batch_size"] == 4
    assert Path(cfg["run"]["dir"]) == run_dir.resolve()

    shape = json.loads((run_dir / "model.json").read_text())
    assert shape["vocab_size"] >= 320 and shape["max_seq_len"] >= 32

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and math.isfinite(records[0]["val_loss"])
    # What the validation loss is over: eval_batches (8) x batch_size (4) sequences, or fewer
    # when the val split is shorter.
    val_tokens = json.loads((work / "prepared" / "index.json").read_text())["splits"]["val"]["tokens"]
    assert records[0]["val_sequences"] == min(8, (val_tokens - 1) // 32 // 4) * 4
    assert records[0]["val_tokens"] == 32 * records[0]["val_sequences"]
    steps = [r for r in records if "loss" in r]
    assert steps and steps[-1]["step"] == 5 and steps[-1]["tokens"] == 640
    for key in ("step", "tokens", "loss", "lr", "tokens_per_s", "comm_bytes", "comm_bytes_total",
                "trainable_params", "total_params"):
        assert key in steps[-1], key
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["trainable_params"] == steps[-1]["total_params"] > 0
    assert "val_loss" in steps[-1]  # the final evaluation

    ckpts = run_dir / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert latest.name == "step_0000005", latest
    assert {".metadata", "__0_0.distcp", "rank_00000.json", "meta.json"} == {p.name for p in latest.iterdir()}


def test_train_again_resumes(trained):
    """The same run.dir with a larger train.max_steps continues from the latest checkpoint."""
    work = trained["work"]
    assert trained["train"].returncode == 0
    run_dir = work / "resumed"  # a copy: the other tests read the original
    shutil.copytree(trained["run_dir"], run_dir)
    args = [a if not a.startswith("train.max_steps") else "train.max_steps=7" for a in TRAIN_ARGS]
    r = lrpt("train", f"data.source={work / 'prepared'}", *args, f"run.dir={run_dir}", cwd=work, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "step 5" in r.stdout, r.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 7
    assert [r["step"] for r in records if r["step"] == 0] == [0]  # no second step-0 evaluation


def test_train_on_missing_data_source_is_one_line(tmp_path):
    line = assert_one_line_error(lrpt("train", "data.source=nowhere", *TRAIN_ARGS, f"run.dir={tmp_path / 'r'}",
                                      cwd=tmp_path))
    assert "nowhere" in line and "lrpt data prepare" in line, line


@pytest.mark.parametrize("args", [["--help"], ["train", "--help-config"], ["data", "describe", "prepared"],
                                  ["comm", str(ROOT / "configs/experiments/relora-130m.yaml")],
                                  ["slurm", "submit", "--dry-run", "model.name=micro", "run.dir=r"]])
def test_closed_pipe_is_quiet(trained, args):
    """`lrpt ... | head -1` where head has already gone: no traceback; exit 141 (128 + SIGPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=trained["work"],
                           env=_env(Path(os.environ["LRPT_CACHE"])), stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode in (0, 141) and r.stderr == "", r.stderr  # argparse swallows its own EPIPE


def test_export_files_share_one_mode(trained, tmp_path):
    r = lrpt("export", trained["run_dir"], tmp_path / "hf", cwd=trained["work"])
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes
