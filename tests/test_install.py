"""A non-editable `pip install .` into a fresh venv: run from another directory, `lrpt train`,
`lrpt launch --print` and `lrpt slurm submit --dry-run` find the configs and the sbatch
template that the install shipped, not the checkout's.

Fast and offline: the new venv sees this venv's dependencies through a .pth file pointing at a
directory of links to them (leaving out this checkout's own editable install), and pip
installs only the package itself (--no-deps --no-build-isolation)."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("lowrank_pretrain", "__editable__", "__pycache__")  # this checkout's own install


def _run(argv, cwd, env, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r


def test_installed_package_finds_its_configs_and_templates(tmp_path, lrpt_cache):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__",
                                                             "tests", "benchmarks"))
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(SKIP) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ)
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path, os.environ).stdout.strip())
    (purelib / "_lrpt_deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(LRPT_CACHE=str(lrpt_cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-build-isolation", src],
         tmp_path, env)
    shutil.rmtree(src)  # nothing may be read from the source tree from here on

    work = tmp_path / "elsewhere"
    work.mkdir()
    lrpt = venv / "bin" / "lrpt"
    found = _run([py, "-c", "from launcher import launch, slurm; from trainer import distributed, resources; "
                  "print(resources.CHECKOUT); print(launch.ACCELERATE_CONFIGS); print(launch.DEEPSPEED_CONFIGS); "
                  "print(slurm.TEMPLATE); print(distributed.DEEPSPEED_CONFIG_DIR)"], work, env).stdout.split()
    assert Path(found[0]).is_relative_to(purelib), found  # the installed package, not the checkout
    for path in found[1:]:
        assert Path(path).is_relative_to(venv / "share" / "lowrank-pretrain") and Path(path).exists(), found

    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "micro", "num_layers": 1},
                                      "data": {"seq_len": 32, "batch_size": 4},
                                      "logging": {"eval_every": 0, "eval_batches": 1, "progress": False,
                                                  "tensorboard": False},
                                      "train": {"max_steps": 2}}))
    r = _run([lrpt, "train", config, f"run.dir={work / 'run'}"], work, env)
    assert (work / "run" / "metrics.jsonl").is_file(), r.stdout + r.stderr

    line = _run([lrpt, "launch", config, "--print", "--deepspeed", "zero2"], work, env).stdout
    share = str(venv / "share" / "lowrank-pretrain" / "configs")
    assert f"{share}/accelerate/deepspeed.yaml" in line and f"{share}/deepspeed/zero2.json" in line, line
    assert str(ROOT / "configs") not in line, line

    script = _run([lrpt, "slurm", "submit", "--dry-run", config, f"run.dir={work / 'job'}"], work, env).stdout
    assert script.startswith("#!") and str(lrpt) in script, script
