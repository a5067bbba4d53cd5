"""train.compile=true: the model compiles once (train and eval graphs), and ReLoRA merges and
SwitchLoRA switches, which edit weights in place, never recompile it."""
import pytest
import torch

from trainer.config import load_config
from trainer.loop import Trainer

TINY = ["model.name=micro", "model.num_layers=1", "data.seq_len=16", "data.batch_size=2", "logging.log_every=100",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
        "train.max_steps=8", "checkpoint.every=100", "strategy.rank=4"]


def losses(tmp_path, name, *overrides):
    trainer = Trainer(load_config(None, [*TINY, f"run.dir={tmp_path / name}", *overrides]))
    graphs, seen = [], []
    after_step = trainer.strategy.after_step

    def counted(step, ctx):
        event = after_step(step, ctx)
        seen.append(event)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return event
    trainer.strategy.after_step = counted
    step = trainer._train_step
    out = []
    trainer._train_step = lambda s: (lambda r: (out.append(float(r[0])), r)[1])(step(s))
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    return out, graphs, seen


@pytest.mark.parametrize("strategy", [["strategy.name=relora", "strategy.reset_every=2", "strategy.restart_warmup=1"],
                                      ["strategy.name=switchlora", "strategy.switch_interval0=1"]])
def test_merges_and_switches_do_not_recompile(tmp_path, strategy):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, _, _ = losses(tmp_path, "eager", *strategy)
    compiled, graphs, events = losses(tmp_path, "compiled", *strategy, "train.compile=true")
    assert sum(e in ("merge", "switch") for e in events) >= 2, events
    # Graphs compiled by the first step (forward and backward) are all there ever are.
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)
