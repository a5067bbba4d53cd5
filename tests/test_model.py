"""The model: named sizes match Hugging Face's parameter counts; causal; shapes."""
import pytest
import torch

from trainer.config import ModelConfig
from trainer.model import Transformer, count_params, model_args


@pytest.mark.parametrize("name, expected", [
    ("llama-60m", 58_073_600), ("llama-130m", 134_105_856), ("llama-350m", 367_969_280),
    ("llama-1b", 1_339_082_752), ("pico-tiny", 11_282_784), ("pico-small", 64_595_328)])
def test_named_sizes_match_published_counts(name, expected):
    # Equal to LlamaForCausalLM with vocab 32000 (pico: 50304) and an untied head.
    assert count_params(model_args(ModelConfig(name=name), seq_len=256)) == expected


def test_micro_is_under_two_million():
    assert count_params(model_args(ModelConfig(name="micro"), 128, vocab_size=1024)) < 2_000_000


def test_forward_is_causal_and_loss_is_finite():
    torch.manual_seed(0)
    model = Transformer(model_args(ModelConfig(name="micro"), seq_len=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 64)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 64  # changing the future must not change the past
    assert torch.allclose(model(x2)[:, :10], logits[:, :10], atol=1e-6)
    loss = model(x, x)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(model_args(ModelConfig(name="micro"), seq_len=8, vocab_size=32))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_grouped_query_attention_shapes():
    model = Transformer(model_args(ModelConfig(name="micro", num_kv_heads=2), seq_len=8, vocab_size=32))
    assert model.layers[0].self_attn.k_proj.weight.shape == (64, 128)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_autograds_bitwise_and_keeps_one_tensor_less(dtype):
    import torch.nn.functional as F

    from trainer.model import SwiGLU

    torch.manual_seed(0)
    gate, up = (torch.randn(32, 96, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(32, 96, dtype=dtype)
    saved = {}

    def run(fn):
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            y = fn(gate, up)
        saved[fn] = sum(n for n in count if n == gate.numel())
        return (y, *torch.autograd.grad(y, (gate, up), grad))

    def plain(g, u):
        return F.silu(g) * u

    ours, autograd = run(SwiGLU.apply), run(plain)
    assert all(torch.equal(a, b) for a, b in zip(ours, autograd))
    assert saved[SwiGLU.apply] == 2 * gate.numel() and saved[plain] == 3 * gate.numel()
