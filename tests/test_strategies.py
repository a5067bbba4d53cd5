"""Strategy unit tests on the micro model: LoRA, ReLoRA (merges, optimizer resets, jagged
schedule, warm start) and what all strategies share (loss goes down, parameter counts).

A tiny in-test loop drives each strategy through the real engine adapter on a
single-process `Accelerator(cpu=True)`; everything is fp32 on CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig, OptimizerConfig, ScheduleConfig, StrategyConfig
from trainer.engine import Engine
from trainer.model import Transformer, model_args
from trainer.strategies import build_strategy
from trainer.strategies.base import StepContext, param_counts
from trainer.strategies.lora import LoRALinear
from trainer.strategies.relora import prune_mask

SEED = 1234


class Rig:
    """A micro model, a strategy, its optimizer and the engine, on one CPU process."""

    def __init__(self, name: str, lr: float = 3e-3, weight_decay: float = 0.0, max_steps: int = 30,
                 sched: ScheduleConfig | None = None, **strategy_kw):
        from accelerate import Accelerator

        torch.manual_seed(0)
        self.model = Transformer(model_args(ModelConfig(name="micro"), seq_len=32, vocab_size=256))
        self.strategy = build_strategy(StrategyConfig(name=name, **strategy_kw), SEED)
        groups = self.strategy.apply(self.model, weight_decay)
        self.lr, self.max_steps = lr, max_steps
        self.sched = sched or ScheduleConfig(warmup_steps=0, min_lr_ratio=1.0, decay="constant")
        self.accelerator = Accelerator(cpu=True)
        self.build_optimizer(groups)
        self.step = 0
        self.events: list[tuple[int, str]] = []

    def build_optimizer(self, groups):
        opt = self.strategy.make_optimizer(groups, OptimizerConfig(lr=self.lr))
        self.model, self.optimizer = self.accelerator.prepare(self.model, opt)
        self.engine = Engine(self.accelerator, self.model, self.optimizer)

    @property
    def module(self):
        return self.engine.module

    def train_step(self, x: torch.Tensor) -> float:
        if self.strategy.needs_rewrap(self.step):
            self.build_optimizer(self.strategy.rewrap(self.module, self.step, 0.0))
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * self.strategy.lr_multiplier(self.step, self.sched, self.max_steps)
        loss = self.model(x[:, :-1], x[:, 1:])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        event = self.strategy.after_step(self.step, StepContext(self.engine, self.max_steps))
        if event:
            self.events.append((self.step, event))
        return loss.item()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :-1])


def batch(seed: int = 0, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 33), generator=torch.Generator().manual_seed(seed))


def adapters(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def assert_same_function(before: torch.Tensor, after: torch.Tensor, tol: float = 1e-6):
    # fp32: a merge or switch reassociates sums, so equal up to rounding at the logits' scale.
    scale = max(1.0, before.abs().max().item())
    diff = (after - before).abs().max().item()
    assert diff <= tol * scale, f"outputs moved by {diff:.3g} (logits up to {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# All strategies

@pytest.mark.parametrize("name,kw", [
    ("full", {}),
    ("lora", {}),
    ("relora", dict(reset_every=10, restart_warmup=2)),
    ("switchlora", dict(switch_interval0=4.0, freeze_steps=2)),
])
def test_each_strategy_reduces_loss(name, kw):
    rig = Rig(name, **kw)
    x = batch()
    losses = [rig.train_step(x) for _ in range(30)]
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.5 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"
    if name == "relora":
        assert [s for s, e in rig.events] == [10, 20, 30]
    if name == "switchlora":
        assert rig.events and all(e == "switch" for _, e in rig.events)


@pytest.mark.parametrize("size,share", [("llama-60m", 74), ("llama-130m", 53), ("llama-1b", 19)])
def test_trainable_share_matches_relora_paper(size, share):
    args = model_args(ModelConfig(name=size), seq_len=256)
    assert args.vocab_size == 32000
    with torch.device("meta"):  # 1B parameters without allocating them
        model = Transformer(args)
        strategy = build_strategy(StrategyConfig(name="relora", rank=128), SEED)
        strategy.apply(model, 0.0)
    c = param_counts(model)
    assert round(100 * c["trainable"] / c["base"]) == share
    assert c["frozen"] == c["total"] - c["trainable"]
    assert f"{share}." in strategy.describe(model) or f"{share - 1}." in strategy.describe(model)


# ---------------------------------------------------------------------------------------------
# LoRA

def test_lora_layer_wraps_in_place_and_merges():
    rig = Rig("lora", rank=4, alpha=8.0, targets=["q", "v", "down"])
    m = rig.module
    wrapped = {n for n, mod in m.named_modules() if isinstance(mod, LoRALinear)}
    assert wrapped == {f"layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    sd = m.state_dict()
    assert sd["layers.0.self_attn.q_proj.lora_scale"].item() == 2.0  # alpha / r, persistent
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.lora_A",
            "layers.0.self_attn.q_proj.lora_B"} <= set(sd)
    # W frozen, adapters and untargeted linears train, embeddings/head/norms train.
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    assert not grads["layers.0.self_attn.q_proj.weight"] and grads["layers.0.self_attn.q_proj.lora_A"]
    assert grads["layers.0.self_attn.k_proj.weight"] and grads["embed_tokens.weight"] and grads["norm.weight"]
    x = batch()
    for _ in range(3):
        rig.train_step(x)
    layer = m.layers[0].self_attn.q_proj
    h = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), h @ layer.merged_weight().T, rtol=1e-5, atol=1e-6)
    assert layer.lora_B.abs().sum() > 0 and not rig.events  # it trains and never merges


# ---------------------------------------------------------------------------------------------
# ReLoRA merges

def _train_until_merge(**kw):
    rig = Rig("relora", reset_every=6, restart_warmup=2, **kw)
    x = batch()
    for _ in range(5):
        rig.train_step(x)
    return rig, x


def test_merge_keeps_outputs_and_reinitialises_adapters():
    rig, x = _train_until_merge(optimizer_reset="magnitude", reset_ratio=0.9)
    assert all(m.lora_B.abs().sum() > 0 for m in adapters(rig.module))  # the adapters did learn
    # Step 6 ends a cycle: the update, then the merge. Compare the function around the merge only.
    loss = rig.model(x[:, :-1], x[:, 1:])
    loss.backward()
    rig.optimizer.step()
    rig.optimizer.zero_grad(set_to_none=True)
    pre = [(m.weight.detach().clone(), m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in adapters(rig.module)]
    out_before = rig.logits(x)
    assert rig.strategy.after_step(6, StepContext(rig.engine, rig.max_steps)) == "merge"
    assert_same_function(out_before, rig.logits(x))
    for m, (W, A, B) in zip(adapters(rig.module), pre):
        s = float(m.lora_scale)
        assert s == 32.0 / 8  # alpha / r, in the merge too
        torch.testing.assert_close(m.weight.detach(), W + s * B @ A, rtol=0, atol=1e-6)
        assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))  # exactly zero
        bound = 1 / math.sqrt(m.in_features)  # Kaiming-uniform, a = sqrt(5)
        A2 = m.lora_A.detach()
        assert A2.abs().max() <= bound and A2.abs().max() > 0.9 * bound
        assert abs(A2.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        assert abs(A2.mean().item()) < 0.05 * bound
        assert not torch.equal(A2, A)  # re-drawn
    # Different layers draw different A.
    a0, a1 = adapters(rig.module)[0].lora_A, adapters(rig.module)[4].lora_A
    assert not torch.equal(a0, a1)


@pytest.mark.parametrize("mode,ratio", [("zero", 0.9), ("magnitude", 0.9), ("random", 0.9), ("random", 0.5)])
def test_merge_prunes_adapter_optimizer_state(mode, ratio):
    rig, x = _train_until_merge(optimizer_reset=mode, reset_ratio=ratio)
    rig.train_step(x)  # step 6: update, then merge
    assert rig.events == [(6, "merge")]
    # Rebuild what the state was just before the merge by replaying on a twin.
    twin, _ = _train_until_merge(optimizer_reset=mode, reset_ratio=ratio)
    loss = twin.model(x[:, :-1], x[:, 1:])
    loss.backward()
    twin.optimizer.step()
    opt_a, opt_b = rig.engine.torch_optimizer, twin.engine.torch_optimizer
    pa = dict(rig.module.named_parameters())
    pb = dict(twin.module.named_parameters())
    for name, p in pa.items():
        if not p.requires_grad:
            continue
        after, before = opt_a.state[p], opt_b.state[pb[name]]
        assert torch.equal(after["step"], before["step"]), "the step count is kept"
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            assert torch.equal(after["exp_avg"], before["exp_avg"]), f"{name}: non-adapter state touched"
            assert torch.equal(after["exp_avg_sq"], before["exp_avg_sq"])
            continue
        m_after, m_before = after["exp_avg"], before["exp_avg"]
        zeros = (m_after == 0).float().mean().item()
        # Both moments of an element are pruned together.
        assert torch.equal(m_after == 0, after["exp_avg_sq"] == 0) or mode == "zero"
        if mode == "zero":
            assert not m_after.any() and not after["exp_avg_sq"].any()
        elif mode == "magnitude":
            assert abs(zeros - ratio) < 1.0 / m_after.numel() + 1e-9
            kept = m_after != 0
            assert torch.equal(m_after[kept], m_before[kept])  # survivors unchanged
            assert m_before[kept].abs().min() > m_before[~kept].abs().max()  # and the largest
        else:
            assert abs(zeros - ratio) < 4 * math.sqrt(ratio * (1 - ratio) / m_after.numel()) + 1e-3
            kept = m_after != 0
            assert torch.equal(m_after[kept], m_before[kept])


def test_prune_mask_magnitude_on_large_tensor():
    # torch.quantile refuses > 16M elements; the mask must not.
    t = torch.randn(17_000_000)
    keep = prune_mask(t, "magnitude", 0.9)
    assert abs(keep.mean().item() - 0.1) < 1e-6


# ---------------------------------------------------------------------------------------------
# Jagged schedule and warm start

def test_jagged_cosine_schedule_shape():
    sched = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1, decay="cosine")
    st = build_strategy(StrategyConfig(name="relora", reset_every=20, restart_warmup=5), SEED)
    total = 100
    lr = [st.lr_multiplier(t, sched, total) for t in range(total)]

    def envelope(t):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))

    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # global warmup
    for r in (20, 40, 60, 80):
        assert lr[r] == 0.0  # LR drops to zero at each restart
        for k in range(1, 5):
            assert lr[r + k] == pytest.approx(envelope(r + k) * k / 5)  # linear re-warm under the envelope
        for t in range(r + 5, r + 20):
            assert lr[t] == pytest.approx(envelope(t))  # back on the global cosine
    assert min(lr[85:]) >= 0.1 - 1e-12 and lr[99] == pytest.approx(envelope(99))  # floor
    assert 0 < lr[19] and lr[10:20] == pytest.approx([envelope(t) for t in range(10, 20)])
    # Merges happen exactly where the LR restarts: after step r, before step index r.
    ctx = StepContext(engine=None, max_steps=total)
    merge_points = [t for t in range(1, total) if t % 20 == 0]
    assert all(lr[t] == 0 for t in merge_points)
    assert all((st.after_step(t, ctx) is None) for t in range(1, total) if t % 20)


def test_warm_start_then_relora():
    rig = Rig("relora", warm_start_steps=4, reset_every=5, restart_warmup=2, max_steps=20,
              sched=ScheduleConfig(warmup_steps=2, min_lr_ratio=0.1, decay="cosine"))
    st = rig.strategy
    m = rig.module
    q = m.layers[0].self_attn.q_proj
    assert q.weight.requires_grad and not q.lora_A.requires_grad and not q.lora_B.requires_grad
    assert [st.needs_rewrap(t) for t in range(4)] == [False] * 4 and st.needs_rewrap(4)
    x = batch()
    w0 = q.weight.detach().clone()
    for _ in range(4):
        rig.train_step(x)
    assert not torch.equal(q.weight, w0)  # full-rank phase trained W
    assert not q.lora_B.any()  # the adapters contributed nothing
    rig.train_step(x)  # step index 4: the loop-style rewrap happens first
    q = rig.module.layers[0].self_attn.q_proj
    assert not q.weight.requires_grad and q.lora_A.requires_grad and q.lora_B.requires_grad
    assert not st.needs_rewrap(5)
    assert st.lr_multiplier(4, rig.sched, 20) == 0.0  # the switch is a restart too
    for _ in range(12):
        rig.train_step(x)
    # Merges count from the end of the warm start: after steps 4 + 5k.
    assert rig.events == [(9, "merge"), (14, "merge")]
    assert st.state_dict() == {"merges": 2}
    # A run resumed after the warm start applies the low-rank phase directly.
    fresh = build_strategy(StrategyConfig(name="relora", warm_start_steps=4, reset_every=5), SEED)
    model = Transformer(model_args(ModelConfig(name="micro"), seq_len=32, vocab_size=256))
    fresh.apply(model, 0.0, step=10)
    assert not model.layers[0].self_attn.q_proj.weight.requires_grad and not fresh.needs_rewrap(10)
    fresh.load_state_dict(st.state_dict())
    assert fresh.merges == 2


def test_relora_draws_depend_only_on_seed():
    r1, r2 = Rig("relora", reset_every=3, optimizer_reset="random"), Rig("relora", reset_every=3, optimizer_reset="random")
    x = batch()
    for _ in range(3):
        r1.train_step(x)
        r2.train_step(x)
    for a, b in zip(r1.module.parameters(), r2.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(r1.engine.torch_optimizer.state.values(), r2.engine.torch_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_independent_pruning_masks_each_moment_by_itself():
    """prune_moments=independent (the paper's reference): exp_avg and exp_avg_sq each lose
    their own smallest 90%, so their zero patterns differ; joint is tested above."""
    rig, x = _train_until_merge(optimizer_reset="magnitude", reset_ratio=0.9, prune_moments="independent")
    twin, _ = _train_until_merge(optimizer_reset="magnitude", reset_ratio=0.9, prune_moments="independent")
    rig.train_step(x)
    loss = twin.model(x[:, :-1], x[:, 1:])
    loss.backward()
    twin.optimizer.step()
    pb = dict(twin.module.named_parameters())
    differ = 0
    for name, p in rig.module.named_parameters():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            continue
        after, before = rig.engine.torch_optimizer.state[p], twin.engine.torch_optimizer.state[pb[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            kept = after[key] != 0
            assert torch.equal(after[key][kept], before[key][kept])
            assert before[key][kept].abs().min() >= before[key][~kept].abs().max()  # its own largest
        differ += int(not torch.equal(after["exp_avg"] == 0, after["exp_avg_sq"] == 0))
    assert differ > 0


@pytest.mark.parametrize("name", ["lora", "switchlora"])
def test_rewrap_refuses_rather_than_reinitialise(name):
    rig = Rig(name)
    before = {n: p.detach().clone() for n, p in rig.module.named_parameters()}
    with pytest.raises(RuntimeError, match="never changes its trainable set"):
        rig.strategy.rewrap(rig.module, 5, 0.0)
    assert all(torch.equal(p, before[n]) for n, p in rig.module.named_parameters())
