"""The fused low-rank linear computes what the plain adapter layer computes, and stays fused
(no copy) through in-place edits; broken aliases are rebuilt or refreshed, never stale."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.strategies.lora import LoRALinear


def plain(m: LoRALinear, x):
    return F.linear(x, m.weight) + m.scale * F.linear(F.linear(x, m.lora_A), m.lora_B)


def make(out=24, inp=16, rank=4, seed=0):
    torch.manual_seed(seed)
    m = LoRALinear(nn.Linear(inp, out, bias=False), rank, 2.0)
    with torch.no_grad():
        m.lora_A.normal_()
        m.lora_B.normal_()
    m.weight.requires_grad_(False)
    return m


def grads(m, x, fn):
    x = x.clone().requires_grad_(True)
    m.lora_A.grad = m.lora_B.grad = None
    y = fn(m, x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()


@pytest.mark.parametrize("rank", [4, 16])  # below THIN_RANK (16) the CPU path forms the N x r products transposed
def test_forward_backward_equal_plain(rank):
    m = make(out=40, inp=32, rank=rank)
    x = torch.randn(3, 5, 32)
    fused, ref = grads(m, x, lambda m, x: m(x)), grads(m, x, plain)
    assert m._wa is not None and m.weight.data_ptr() == m._wa.data_ptr()
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert m.lora_B.grad.is_contiguous() and m.lora_A.grad.is_contiguous()


def test_rows_are_the_parameters_and_edits_in_place():
    m = make()
    wa = m._wa
    assert m.lora_A.data_ptr() == wa[m.out_features:].data_ptr()
    with torch.no_grad():  # what Engine.write_param does
        m.weight.copy_(torch.randn_like(m.weight))
        m.lora_A.copy_(torch.randn_like(m.lora_A))
    x = torch.randn(7, 16)
    assert m._wa is wa
    torch.testing.assert_close(m(x), plain(m, x), rtol=1e-5, atol=1e-5)
    assert m._wa is wa  # no re-fuse: the edit went into the buffer


def test_broken_alias_refused_or_refreshed():
    m = make()
    x = torch.randn(7, 16)
    # A device move / dtype round trip re-points W.data: rebuilt on the next forward.
    m.weight.data = m.weight.data.clone()
    torch.testing.assert_close(m(x), plain(m, x), rtol=1e-5, atol=1e-5)
    assert m.weight.data_ptr() == m._wa.data_ptr()
    # An engine flattens A into its own buffer: the rows are refreshed, A keeps its storage.
    flat = torch.zeros(1000)
    view = flat[100:100 + m.lora_A.numel()].view_as(m.lora_A)
    view.copy_(m.lora_A)
    m.lora_A.data = view
    with torch.no_grad():
        m.lora_A.add_(1.0)  # the engine's optimizer writes its flat buffer
    torch.testing.assert_close(m(x), plain(m, x), rtol=1e-5, atol=1e-5)
    assert m.lora_A.data_ptr() == view.data_ptr()
    _, _, dA, dB = grads(m, x, lambda m, x: m(x))
    _, _, rA, rB = grads(m, x, plain)
    torch.testing.assert_close(dA, rA, rtol=1e-5, atol=1e-5)


def test_deepcopy_and_state_dict_roundtrip():
    m = make()
    x = torch.randn(4, 16)
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(m2(x), m(x))
    m3 = make(seed=1)
    m3.load_state_dict(m.state_dict())
    torch.testing.assert_close(m3(x), m(x))
    assert m3.weight.data_ptr() == m3._wa.data_ptr()


def test_trainable_weight_takes_plain_path():
    m = make()
    m.weight.requires_grad_(True)
    x = torch.randn(4, 16)
    m(x).sum().backward()
    assert m.weight.grad is not None
