"""The prefetching loader returns next_batch()'s batches, and its state counts the batches
returned (not the one prepared ahead): a resume continues exactly, across an epoch end."""
import json

import torch

from tests.test_data import docs, prepared  # noqa: F401  (fixtures)
from trainer import data


def test_prefetch_same_batches_and_exact_state(prepared):  # noqa: F811
    d = data.PreparedData(prepared)
    plain = data.BatchLoader(d, "train", 16, 4, seed=5)
    ahead = data.BatchLoader(d, "train", 16, 4, seed=5)
    n = plain.steps_per_epoch - 2
    for _ in range(n):
        assert all(torch.equal(p, q) for p, q in zip(plain.next_batch(), ahead.next_batch_to("cpu")))
    assert ahead.state_dict()["position"] == n
    resumed = data.BatchLoader(d, "train", 16, 4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
    for _ in range(5):
        want = plain.next_batch()
        assert all(torch.equal(p, q) for p, q in zip(want, ahead.next_batch_to("cpu")))
        assert all(torch.equal(p, q) for p, q in zip(want, resumed.next_batch_to("cpu")))
    assert ahead.epoch == resumed.epoch == 1
