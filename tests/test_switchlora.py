"""SwitchLoRA and VectorAdamW: function-preserving init and switches, counterpart freezes,
per-vector Adam restarts, candidate memory, seeded decisions and exact resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer.config import ModelConfig, StrategyConfig
from trainer.model import Transformer, model_args
from trainer.optim import VectorAdamW
from trainer.strategies import build_strategy
from trainer.strategies.base import StepContext
from trainer.strategies.switchlora import init_bounds, model_pool_memory

from test_strategies import Rig, adapters, assert_same_function, batch  # noqa: E402  (same folder)

# W = W0 - s B A is ~2.7x larger than W0 (s B A has nn.Linear's init size, W0 std 0.02), so
# the wrapped fp32 model's rounding is ~2.7x the plain model's own error against fp64
# (5.5e-7 on the micro model's logits): "unchanged" means within that, not within 1e-6.
FP32_TOL = 3e-6
MANY = dict(rank=8, switch_interval0=1.0, switch_ratio=10.0, freeze_steps=3)  # ~8 switches/layer/step


def test_init_keeps_the_function_and_b_is_not_zero():
    torch.manual_seed(0)
    model = Transformer(model_args(ModelConfig(name="micro"), seq_len=32, vocab_size=256))
    x = batch()
    with torch.no_grad():
        before = model(x[:, :-1])
    st = build_strategy(StrategyConfig(name="switchlora", rank=8), 1234)
    st.apply(model, 0.0)
    with torch.no_grad():
        after = model(x[:, :-1])
    assert_same_function(before, after, FP32_TOL)
    # The algebra itself is exact: in fp64 the wrapped model matches to rounding of 1e-16.
    torch.manual_seed(0)
    m64 = Transformer(model_args(ModelConfig(name="micro"), seq_len=32, vocab_size=256)).double()
    with torch.no_grad():
        before64 = m64(x[:, :-1])
    build_strategy(StrategyConfig(name="switchlora", rank=8), 1234).apply(m64, 0.0)
    with torch.no_grad():
        assert (m64(x[:, :-1]) - before64).abs().max() < 1e-12
    for m in adapters(model):
        assert float(m.lora_scale) == 1 / 8
        bound_a, bound_b = init_bounds(m.in_features, m.out_features, 8)
        assert 0.9 * bound_b < m.lora_B.abs().max() <= bound_b and 0.9 * bound_a < m.lora_A.abs().max() <= bound_a
        # s B A has nn.Linear's init variance 1 / (3 n).
        ba = (m.lora_B @ m.lora_A).detach() / 8
        assert ba.var().item() == pytest.approx(1 / (3 * m.in_features), rel=0.25)


def test_switches_keep_the_function_and_store_only_switched_out_vectors():
    rig = Rig("switchlora", **MANY)
    st, x = rig.strategy, batch()
    rig.train_step(x)
    ctx = StepContext(rig.engine, rig.max_steps)
    for step in range(2, 6):
        loss = rig.model(x[:, :-1], x[:, 1:])
        loss.backward()
        rig.optimizer.step()
        rig.optimizer.zero_grad(set_to_none=True)
        out = rig.logits(x)
        W = [m.weight.detach().clone() for m in adapters(rig.module)]
        assert st.after_step(step, ctx) == "switch"
        assert_same_function(out, rig.logits(x), FP32_TOL)
        assert any(not torch.equal(w, m.weight) for w, m in zip(W, adapters(rig.module)))
    assert st.switches > 4 * 28 * 4  # 28 layers, several vectors each per step
    mem = st.candidate_memory()
    # Exactly the switched-out vectors that are not back in use are stored, nothing else.
    expected = 0
    for (pa, pb), m in zip(st.pools, adapters(rig.module)):
        for pool, length in ((pa, m.in_features), (pb, m.out_features)):
            used = set(pool.slots)
            assert not used & set(pool.store)  # a vector in A/B is not also stored
            assert set(pool.store) <= set(pool.free)
            assert all(t.shape == (length,) and t.device.type == "cpu" for t in pool.store.values())
            expected += len(pool.store) * length * 2  # bf16
            # Never-used slots are not stored: they are redrawn identically on demand.
            fresh = [j for j in pool.free if j not in pool.store]
            if fresh:
                assert torch.equal(pool.fresh(fresh[0]), pool.fresh(fresh[0]))
    assert mem["stored_bytes"] == expected > 0
    assert mem["stored_bytes"] <= mem["bound_bytes"] < mem["reference_bytes"]
    assert "candidate store" in st.describe(rig.module)


def test_switched_counterpart_is_frozen_then_restarts_as_fresh_adam():
    rig = Rig("switchlora", rank=8, switch_interval0=1.0, switch_ratio=10.0, freeze_steps=3)
    st, x = rig.strategy, batch()
    rig.train_step(x)
    rig.train_step(x)  # step 2 switched rows of A: their B columns are frozen now
    m, (pa, pb) = adapters(rig.module)[0], st.pools[0]
    frozen_cols = [j for j, until in enumerate(pb.frozen_until) if until == 2 + 3]
    assert frozen_cols
    j = frozen_cols[0]
    state = rig.engine.torch_optimizer.state[m.lora_B]
    assert (state["step"][:, j] == -3).all() and not state["exp_avg"][:, j].any() and not state["exp_avg_sq"][:, j].any()
    col = m.lora_B[:, j].detach().clone()
    for k in range(3):  # frozen for exactly freeze_steps optimizer steps
        loss = rig.model(x[:, :-1], x[:, 1:])
        loss.backward()
        rig.optimizer.step()
        rig.optimizer.zero_grad(set_to_none=True)
        assert torch.equal(m.lora_B[:, j], col)
        assert (state["step"][:, j] == -2 + k).all()
    loss = rig.model(x[:, :-1], x[:, 1:])
    loss.backward()
    g = m.lora_B.grad[:, j].clone()
    rig.optimizer.step()
    # First active step: step count 1, so the update is a fresh Adam step, lr * g / (|g| + eps).
    assert (state["step"][:, j] == 1).all()
    torch.testing.assert_close(col - m.lora_B[:, j].detach(), rig.lr * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-9)


def test_switch_rate_follows_the_paper():
    st = build_strategy(StrategyConfig(name="switchlora", rank=256), 1234)
    T = 10_000
    assert st.switches_per_step(0, T, 256) == pytest.approx(256 / 40)  # ~6 per step at r = 256
    assert st.switches_per_step(1000, T, 256) == pytest.approx(0.3 * 256 / 40)  # 0.3x after ratio * T
    assert st.switches_per_step(3000, T, 256) == pytest.approx(0.027 * 256 / 40)  # ~0 after 30%
    assert st.switches_per_step(0, T, 64) == pytest.approx(64 / 40)  # per layer: its own rank (hybrid)


def _state(rig):
    return copy.deepcopy({"model": rig.module.state_dict(), "opt": rig.optimizer.state_dict(),
                          "strategy": rig.strategy.state_dict(), "step": rig.step})


def test_same_seed_same_switches_and_exact_resume():
    kw = dict(rank=8, switch_interval0=2.0, switch_ratio=10.0, freeze_steps=3)
    x = batch()
    full = Rig("switchlora", max_steps=8, **kw)
    losses = [full.train_step(x) for _ in range(8)]
    twin = Rig("switchlora", max_steps=8, **kw)
    assert [twin.train_step(x) for _ in range(8)] == losses  # same seed, same decisions
    # Interrupt at step 4 (some vectors frozen, some candidates stored); resume into new objects.
    first = Rig("switchlora", max_steps=8, **kw)
    head = [first.train_step(x) for _ in range(4)]
    saved = _state(first)
    assert any(p.store for pools in first.strategy.pools for p in pools)
    assert any(u > 4 for pools in first.strategy.pools for p in pools for u in p.frozen_until)
    resumed = Rig("switchlora", max_steps=8, **kw)
    resumed.module.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["opt"])
    resumed.strategy.load_state_dict(saved["strategy"])
    resumed.step = saved["step"]
    tail = [resumed.train_step(x) for _ in range(4)]
    assert head + tail == losses
    for a, b in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)
    sa, sb = full.strategy.state_dict(), resumed.strategy.state_dict()
    for (pa, pb), (qa, qb) in zip(sa["pools"], sb["pools"]):
        for p, q in ((pa, qa), (pb, qb)):
            assert p["slots"] == q["slots"] and p["free"] == q["free"] and p["frozen_until"] == q["frozen_until"]
            assert p["store"].keys() == q["store"].keys()
            assert all(torch.equal(p["store"][k], q["store"][k]) for k in p["store"])


def test_candidate_memory_figures():
    # The reference's dense pools are ~1.58x the wrapped weights; the bound here drops the r
    # vectors in use, and before any switch nothing is stored.
    mem = model_pool_memory(model_args(ModelConfig(name="llama-350m"), seq_len=256), 256)
    assert mem["reference_bytes"] / mem["weight_bytes"] == pytest.approx(1.58, abs=0.01)
    assert mem["bound_bytes"] / mem["weight_bytes"] == pytest.approx(1.19 / 2, abs=0.01)  # bf16 store


# ---------------------------------------------------------------------------------------------
# VectorAdamW

def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _groups(ps, wd):
    return [{"params": [ps[0]], "weight_decay": wd}, {"params": [ps[1]], "weight_decay": 0.0}]


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
def test_vector_adamw_equals_fused_adamw_while_counters_are_equal(betas):
    # Tensors whose counters are all equal take torch's fused step: bitwise AdamW(fused=True).
    a, b = _params(), _params()
    ref = torch.optim.AdamW(_groups(a, 0.1), lr=1e-2, betas=betas, eps=1e-8, fused=True)
    vec = VectorAdamW(_groups(b, 0.1), lr=1e-2, betas=betas, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        vec.step()
    for p, q in zip(a, b):
        assert torch.equal(q, p)
        assert torch.equal(vec.state[q]["exp_avg"], ref.state[p]["exp_avg"])
        assert torch.equal(vec.state[q]["exp_avg_sq"], ref.state[p]["exp_avg_sq"])
    assert vec.state[b[0]]["step"].shape == b[0].shape and (vec.state[b[0]]["step"] == 25).all()


def _per_element_adamw(p, grad, m, v, step, lr, beta1, beta2, eps, wd):
    """The reference: torch's single-tensor AdamW step with each scalar made per element
    (its step count) and every write kept where step > 0 after the increment."""
    step.add_(1)
    active = step > 0
    t = step.clamp(min=1.0)
    p.mul_(torch.where(active, 1 - lr * wd, 1.0))
    m.copy_(torch.where(active, m.lerp(grad, 1 - beta1), m))
    v.copy_(torch.where(active, torch.addcmul(v * beta2, grad, grad, value=1 - beta2), v))
    bias_correction1 = -torch.expm1(t * math.log(beta1))
    bias_correction2_sqrt = (-torch.expm1(t * math.log(beta2))).sqrt_()
    step_size = torch.where(active, lr / bias_correction1, 0.0)
    p.addcdiv_(m * step_size, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-1.0)


def test_vector_adamw_with_unequal_counters_is_bitwise_the_per_element_formula(monkeypatch):
    # Tiny batches, so that one tensor is cut into several flat views and several small ones
    # share one concatenated batch: both ways must land every write in the real tensors.
    monkeypatch.setattr("trainer.optim.BATCH_ELEMENTS", 64)
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (40, 3), (3, 50), (2, 2)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    groups = [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    opt = VectorAdamW(groups, lr=1e-2, betas=(0.9, 0.999))
    ref = {id(p): [p.detach().clone(), *(torch.zeros_like(p) for _ in range(3))] for p in ps}

    def edit(p, index, step):  # a SwitchLoRA reset (step 0) or freeze (step < 0), on both sides
        for st in (opt.state[p], dict(zip(("exp_avg", "exp_avg_sq", "step"), ref[id(p)][1:]))):
            st["exp_avg"][index], st["exp_avg_sq"][index], st["step"][index] = 0, 0, step

    for p in ps:
        opt._init_state(p)
        edit(p, 0, -3)  # every tensor's first element frozen 3 steps, then 3 steps behind the rest
    for it in range(30):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if it % 5 == 2:
            edit(ps[0], 1, -2)  # a row of A frozen
            edit(ps[2], (slice(None), 0), 0)  # a column of B restarted
        if it == 28:
            edit(ps[4], slice(None), -2)  # a whole tensor frozen: left alone for the last 2 steps
        lr = opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 1e-2 * 0.97 ** it
        opt.step()
        for group in groups:
            for p in group["params"]:
                _per_element_adamw(*[ref[id(p)][0], p.grad, *ref[id(p)][1:]], lr, 0.9, 0.999, 1e-8,
                                   group["weight_decay"])
    for p in ps:
        want, m, v, step = ref[id(p)]
        assert torch.equal(p.detach(), want)
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)
        assert torch.equal(opt.state[p]["step"], step)
    assert (opt.state[ps[4]]["step"] == 0).all()


def test_vector_adamw_reset_vector_takes_a_fresh_adam_sized_step():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = VectorAdamW([p], lr=1.0, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p.grad = torch.randn(4, 3, generator=g)
        opt.step()
    st = opt.state[p]
    st["exp_avg"][1].zero_()
    st["exp_avg_sq"][1].zero_()
    keep_global = {k: v.clone() for k, v in st.items()}
    keep_global["step"].fill_(10_000)  # a long run's shared counter: bias correction ~1
    st["step"][1] = 0  # per-vector restart
    grad = torch.randn(4, 3, generator=g)
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.step()
    fresh = (before - p.detach())[1]
    torch.testing.assert_close(fresh, grad[1] / (grad[1].abs() + 1e-8), rtol=1e-5, atol=1e-7)  # |update| = lr
    # The same reset with the shared step kept: bias correction ~1, the update is ~3x bigger.
    q = torch.nn.Parameter(before.clone())
    opt2 = VectorAdamW([q], lr=1.0, betas=(0.9, 0.999))
    opt2.state[q].update(keep_global)
    q.grad = grad.clone()
    opt2.step()
    stale = (before - q.detach())[1]
    ratio = (stale.abs() / fresh.abs()).mean().item()
    assert ratio == pytest.approx(0.1 / math.sqrt(0.001), rel=0.05)  # (1-b1)/sqrt(1-b2) = 3.16


def test_vector_adamw_frozen_elements_do_not_move():
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = VectorAdamW([{"params": [p], "weight_decay": 0.5}], lr=0.1)
    p.grad = torch.ones(3, 4)
    opt.step()
    opt.state[p]["step"][:, 2] = -2
    opt.state[p]["exp_avg"][:, 2] = 0
    opt.state[p]["exp_avg_sq"][:, 2] = 0
    col = p[:, 2].detach().clone()
    for k in range(2):
        p.grad = torch.ones(3, 4)
        opt.step()
        assert torch.equal(p[:, 2], col)  # no update, no decay
        assert not opt.state[p]["exp_avg"][:, 2].any()  # no moment update
    assert (opt.state[p]["step"][:, 2] == 0).all() and (opt.state[p]["step"][:, 0] == 3).all()
    p.grad = torch.ones(3, 4)
    opt.step()
    assert not torch.equal(p[:, 2], col) and (opt.state[p]["step"][:, 2] == 1).all()


def test_vector_adamw_state_dict_round_trip():
    a = _params()
    opt = VectorAdamW(_groups(a, 0.1), lr=1e-2)
    for p in a:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[a[0]]["step"][0] = -3
    sd = copy.deepcopy(opt.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = VectorAdamW(_groups(b, 0.1), lr=1e-2)
    opt2.load_state_dict(sd)
    for p, q in zip(a, b):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert opt2.state[b[0]]["step"].dtype == torch.float32
