"""No host sync per micro-batch: the loss stays on the device and is read once per optimizer
step, in fit()'s all-reduce, whatever grad_accum. Counted by instrumenting the host reads."""
import sys

import pytest
import torch

from trainer import loop
from trainer.config import load_config
from trainer.loop import Trainer

FAST = ["model.name=micro", "data.seq_len=32", "data.batch_size=4", "logging.log_every=100",
        "logging.eval_every=0", "logging.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
        "train.max_steps=3", "checkpoint.every=100"]
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.mark.parametrize("accum,strategy", [(1, "relora"), (4, "full")])
def test_one_host_read_per_step(tmp_path, monkeypatch, accum, strategy):
    trainer = Trainer(load_config(None, [*FAST, f"run.dir={tmp_path / 'r'}", f"train.grad_accum={accum}",
                                         f"strategy.name={strategy}", "strategy.rank=4"]))
    counts = {"reads": 0, "inside": 0, "steps": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            # torch.optim reads its step counts, which it keeps on the host on every device
            # (unless capturable): no device sync, so not counted.
            host_state = "torch/optim/" in sys._getframe(1).f_code.co_filename
            counts["reads"] += counts["inside"] > 0 and not host_state
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def inside(fn, step=False):
        def wrapped(*a, **k):
            counts["inside"] += 1
            counts["steps"] += step
            try:
                return fn(*a, **k)
            finally:
                counts["inside"] -= 1
        return wrapped
    monkeypatch.setattr(trainer, "_train_step", inside(trainer._train_step, step=True))
    monkeypatch.setattr(loop, "all_reduce_sum", inside(loop.all_reduce_sum))
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    # Step 0 sums the validation sequence count once (before training): one read more.
    assert counts["steps"] == 3
    assert counts["reads"] <= counts["steps"] + 1
