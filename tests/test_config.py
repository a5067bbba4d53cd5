"""Config: YAML holds only differences, overrides win, bad input stops with one clear line."""
import pytest

from trainer.config import Config, ConfigError, describe, load_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.name == "micro" and cfg.strategy.name == "full"


def test_yaml_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optimizer:\n  lr: 0.002\nstrategy:\n  rank: 4\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("include: base.yaml\nstrategy:\n  name: relora\n")
    cfg = load_config(exp, ["strategy.rank=16", "train.max_steps=7", "strategy.targets=q,v", "run.dir=x"])
    assert cfg.optimizer.lr == 0.002  # from the included file
    assert cfg.strategy.name == "relora"
    assert cfg.strategy.rank == 16  # override beats both files
    assert cfg.train.max_steps == 7 and cfg.strategy.targets == ["q", "v"] and cfg.run.dir == "x"


@pytest.mark.parametrize("override, fragment", [
    (["strategy.rnak=4"], "unknown config key 'strategy.rnak'; did you mean 'strategy.rank'?"),
    (["optimzer.lr=1"], "unknown config key 'optimzer'; did you mean 'optimizer'?"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: expected > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast': expected a number"),
    (["train.max_steps=1.5"], "train.max_steps=1.5: expected an integer"),
    (["model.hidden_size=130"], "model.hidden_size=130: expected a multiple of model.num_heads=4"),
    (["strategy.name=galore"], "strategy.name='galore': expected one of full, lora, relora, switchlora"),
    (["model.name=llama-2b"], "model.name='llama-2b': expected one of"),
    (["strategy.targets=q,x"], "strategy.targets='x': expected one of q, k, v, o, gate, up, down"),
    (["logging.tensorboard=maybe"], "logging.tensorboard='maybe': expected true or false"),
    (["train.max_steps"], "expected section.key=value"),
])
def test_errors_name_key_value_and_expectation(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_describe_lists_every_key_with_comment():
    lines = describe()
    assert any(line.startswith("strategy.reset_every") and "merge interval" in line for line in lines)
    assert len(lines) > 50


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted(Path("configs").rglob("*.yaml")):
        if "accelerate" in path.parts or path.read_text().lstrip("# \n").startswith("sweep:") or "\nsweep:" in path.read_text():
            continue
        assert isinstance(load_config(path), Config), path


def test_import_config_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, trainer.config; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_strategy_keys_are_checked_only_for_the_chosen_strategy():
    cfg = load_config(None, ["strategy.name=full", "strategy.reset_every=20"])
    assert cfg.strategy.reset_every == 20 and cfg.set_keys == {"strategy.name", "strategy.reset_every"}
    load_config(None, ["strategy.name=lora", "strategy.switch_decay_base=2"])  # a SwitchLoRA key
    with pytest.raises(ConfigError, match="strategy.switch_decay_base=2.0: expected in"):
        load_config(None, ["strategy.name=switchlora", "strategy.switch_decay_base=2"])
    with pytest.raises(ConfigError, match="strategy.prune_moments='both': expected one of joint, independent"):
        load_config(None, ["strategy.name=relora", "strategy.prune_moments=both", "strategy.reset_every=50"])


def test_restart_warmup_adapts_unless_set():
    cfg = load_config(None, ["strategy.name=relora", "strategy.reset_every=50"])
    assert cfg.strategy.restart_warmup == 25
    assert load_config(None, ["strategy.name=relora", "strategy.reset_every=200"]).strategy.restart_warmup == 100
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.name=relora", "strategy.restart_warmup=100", "strategy.reset_every=50"])
    assert str(err.value) == "strategy.restart_warmup=100: expected < strategy.reset_every=50"


def test_relora_that_never_merges_warns_once():
    with pytest.warns(UserWarning, match=r"reset_every=300 >= train.max_steps=300.*plain LoRA") as record:
        load_config(None, ["strategy.name=relora", "strategy.reset_every=300", "train.max_steps=300"])
    assert len(record) == 1 and "\n" not in str(record[0].message)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["strategy.name=relora", "strategy.reset_every=100", "train.max_steps=300"])


def test_removed_keys_in_an_older_runs_config_are_ignored(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  compile: false\n  max_steps: 7\ndata:\n  num_workers: 0\n")
    with pytest.warns(UserWarning, match="'data.num_workers' was removed"):
        assert load_config(old).train.max_steps == 7
