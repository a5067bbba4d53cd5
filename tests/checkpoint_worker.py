"""One process of tests/test_checkpoint_dist.py: build the real Trainer in a run directory (it
resumes from the newest checkpoint, on whatever world size and engine it was started with),
write that state straight back as the same step's checkpoint (nothing trained in between),
then train on to train.max_steps.

Run as `python -m tests.checkpoint_worker key=value ...` under `lrpt launch`'s command. So a
checkpoint passes through this world size and engine, loaded and saved, and the test compares
it with the one it started from, bit for bit, by name.
"""
from __future__ import annotations

import sys

from trainer.config import load_config
from trainer.errors import exit_process
from trainer.loop import Trainer


def main(argv: list[str]) -> None:
    trainer = Trainer(load_config(None, argv))
    trainer.saver.save(trainer.state_dict(), trainer.state.step, final=True)
    trainer.fit()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)
