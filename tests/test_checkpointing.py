"""train.activation_checkpointing recomputes each block in backward: the same loss and
gradients as without it (fused adapters and dropout included)."""
import pytest
import torch

from trainer.config import ModelConfig, StrategyConfig
from trainer.model import Transformer, model_args
from trainer.strategies import build_strategy


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # the fused path; the plain path with dropout
def test_checkpointing_gives_the_same_gradients(dropout):
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    out = []
    for on in (False, True):
        torch.manual_seed(0)
        model = Transformer(model_args(ModelConfig(name="micro"), seq_len=16, vocab_size=256))
        build_strategy(StrategyConfig(name="relora", rank=4, dropout=dropout), 1234).apply(model, 0.0)
        model.activation_checkpointing = on
        torch.manual_seed(1)  # dropout masks: replayed in the recomputation
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)
