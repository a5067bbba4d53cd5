"""Random streams: distinct keys never share a stream; ranks get their own global streams."""
import torch

from trainer import seeding
from trainer.seeding import Purpose, seeded_generator


def draw(*key):
    return torch.rand(8, generator=seeded_generator(*key))


def test_streams_are_hashed_not_mixed():
    # Under the old linear mix (seed*1_000_003 + step*7_919 + module*104_729 + purpose*15_485_863)
    # these two keys drew the same numbers.
    assert not torch.equal(draw(1236, 1822, 0, Purpose.POOL_A), draw(1234, 0, 9, Purpose.POOL_B))
    assert torch.equal(draw(1234, 5, 3, Purpose.SWITCH), draw(1234, 5, 3, Purpose.SWITCH))
    keys = [(s, t, m, p) for s in (0, 1) for t in (0, 1, 2) for m in (0, 1) for p in Purpose]
    firsts = {float(draw(*k)[0]) for k in keys}
    assert len(firsts) == len(keys)


def test_ranks_get_their_own_dropout_streams_and_strategy_draws_stay_shared():
    seeding.seed_rank(1234, 0)
    rank0 = torch.rand(8)
    shared0 = draw(1234, 0, 0, Purpose.A_INIT)
    seeding.seed_rank(1234, 1)
    rank1 = torch.rand(8)
    shared1 = draw(1234, 0, 0, Purpose.A_INIT)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(shared0, shared1)
    seeding.seed_rank(1234, 1)
    assert torch.equal(torch.rand(8), rank1)


def test_global_state_round_trips():
    seeding.seed_globals(7)
    state = seeding.global_state()
    a = torch.rand(4)
    seeding.set_global_state(state)
    assert torch.equal(torch.rand(4), a)
