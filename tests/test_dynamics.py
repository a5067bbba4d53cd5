"""PER and condition number against values computed by hand, and the tracker / offline
analysis on a tiny model with hand-made adapters."""
import json
import math

import pytest
import torch
import torch.nn as nn

from tests.checkpoint_files import save_model
from trainer.config import load_config, save_config
from trainer.dynamics import (DynamicsTracker, analyze_run, condition_number, dynamics_record, layer_matrices,
                              singular_values, spectrum_metrics)
from trainer.model import ModelArgs, Transformer, model_args


def random_orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_singular_values(s, m, n, seed=0):
    """An m x n matrix with exactly the singular values `s` (padded with zeros)."""
    d = torch.zeros(m, n, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return random_orthogonal(m, seed) @ d @ random_orthogonal(n, seed + 1)


def test_identity():
    m = spectrum_metrics(torch.eye(8))
    assert m["per"] == pytest.approx(1.0, abs=1e-12)
    assert m["condition"] == pytest.approx(1.0, abs=1e-12)
    assert not m["clipped"] and m["method"] == "exact"


def test_rank_k_equal_values_gives_k_over_n_and_a_clipped_condition():
    n, k = 16, 4
    m = spectrum_metrics(with_singular_values([3.0] * k, n, n))
    assert m["per"] == pytest.approx(k / n, abs=1e-9)
    assert m["clipped"]
    # s_min is rounding-level, so the condition is s_max / tol with tol = s_max * n * eps32.
    assert m["condition"] == pytest.approx(1 / (n * torch.finfo(torch.float32).eps), rel=1e-9)


def test_diagonal_by_hand():
    # s = (4, 2, 1, 1): p = (1/2, 1/4, 1/8, 1/8), entropy = 1.75 ln 2, ER = 2**1.75.
    m = spectrum_metrics(torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0])))
    assert m["per"] == pytest.approx(2 ** 1.75 / 4, rel=1e-12)
    assert m["condition"] == pytest.approx(4.0) and not m["clipped"]
    # Rectangular 3 x 5 with s = (3, 2, 1): normalised by min(3, 5) = 3, condition 3.
    r = spectrum_metrics(with_singular_values([3.0, 2.0, 1.0], 3, 5))
    p = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6
    assert r["per"] == pytest.approx(math.exp(-float((p * p.log()).sum())) / 3, rel=1e-12)
    assert r["condition"] == pytest.approx(3.0, rel=1e-12)


def test_absolute_tolerance_and_zero_matrix():
    cond, clipped = condition_number(torch.tensor([2.0, 1e-3], dtype=torch.float64), (2, 2), abs_tol=0.1)
    assert (cond, clipped) == (pytest.approx(20.0), True)
    z = spectrum_metrics(torch.zeros(4, 6))
    assert z["per"] == 0.0 and math.isnan(z["condition"])


def test_randomized_agrees_with_exact_on_a_low_rank_matrix():
    s = [5.0, 4.0, 3.0, 2.0, 1.0]
    a = with_singular_values(s, 300, 200, seed=3).float()
    exact = singular_values(a, "exact")[:5]
    approx = singular_values(a, "randomized", rank=5)
    torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-4)
    rng_before = torch.random.get_rng_state()
    m = spectrum_metrics(a, randomized_above=100, rank=5)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # training's RNG untouched
    assert m["method"] == "randomized" and m["k"] == 5
    p = torch.tensor(s) / sum(s)
    assert m["per"] == pytest.approx(math.exp(-float((p * p.log()).sum())) / 200, rel=1e-4)


# ---------------------------------------------------------------------------------------------

ARGS = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=16)


class HandLoRA(nn.Module):
    """The LoRALinear parameter layout, made by hand: W + scale * B @ A."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)
        self.register_buffer("lora_scale", torch.tensor(scale))

    def forward(self, x):
        return x @ self.weight.T + self.lora_scale * (x @ self.lora_A.T) @ self.lora_B.T

    def merged_weight(self):
        return self.weight.float() + self.lora_scale * self.lora_B @ self.lora_A


def lora_model(r=2, scale=0.5):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    for layer in model.layers:
        layer.self_attn.v_proj = HandLoRA(layer.self_attn.v_proj, r, scale)
    return model


def test_layer_matrices_merge_adapters_from_model_and_state_dict():
    model = lora_model()
    v = model.layers[1].self_attn.v_proj
    expected = v.weight + 0.5 * v.lora_B @ v.lora_A
    from_model = layer_matrices(model, kinds=("v",), layers=[1])
    from_sd = layer_matrices(model.state_dict(), kinds=("v",), layers=[1])
    torch.testing.assert_close(from_model[(1, "v")], expected.detach())
    torch.testing.assert_close(from_sd[(1, "v")], expected.detach())


def test_record_keys_for_full_rank_and_lora_layers():
    model = lora_model(r=2)
    x = torch.randint(0, 64, (2, 8))
    model(x, x).backward()
    rec = dynamics_record(model)
    assert "dyn/0/o/grad_per" in rec and "dyn/0/down/weight_cond" in rec
    assert "dyn/0/v/grad_per" not in rec  # frozen W: no effective gradient to report
    assert rec["dyn/0/v/ba_per"] <= rec["dyn/0/v/ba_per_cap"] + 1e-9
    assert rec["dyn/0/v/ba_per_cap"] == pytest.approx(2 / 16)  # r / min(out=16, in=32)
    assert rec["dyn/0/v/ba_cond_clipped"] == 1.0  # rank 2 of 16: clipped by construction


def test_tracker_reports_updates_every_interval():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = DynamicsTracker(every=2)
    tracker.start(model, 0)
    records = {}
    for step in range(1, 5):
        x = torch.randint(0, 64, (2, 8))
        model(x, x).backward()
        opt.step()
        records[step] = tracker.record(model, step)
        opt.zero_grad(set_to_none=True)
    assert records[1] == {} and records[3] == {}
    assert {"dyn/1/v/update_per", "dyn/1/v/grad_cond", "dyn/0/down/weight_per"} <= set(records[4])
    assert 0 < records[4]["dyn/1/v/update_per"] <= 1
    forced = tracker.record(model, 5, force=True)  # e.g. the last step, off the grid
    assert "dyn/0/v/weight_per" in forced and not any("update" in k for k in forced)
    assert "dyn/0/v/update_per" not in tracker.record(model, 6)  # nothing moved since step 4
    with torch.no_grad():
        model.layers[0].self_attn.v_proj.weight[0] += 1.0  # a rank-1 step
    assert tracker.record(model, 8)["dyn/0/v/update_per"] == pytest.approx(1 / 16)


def test_analyze_run_over_checkpoints(tmp_path):
    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2",
                             "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=16"])
    save_config(cfg, tmp_path / "config.yaml")
    model = lora_model()
    assert model_args(cfg.model, 16, 64) == ARGS
    for step in (10, 20):
        with torch.no_grad():
            model.layers[0].self_attn.v_proj.lora_B.add_(0.05)
        save_model(tmp_path / "checkpoints", step, model.state_dict(), keep=5)
    records = analyze_run(tmp_path)
    assert [r["step"] for r in records] == [10, 20]
    assert "dyn/0/v/update_per" not in records[0]
    assert records[1]["update_from"] == 10
    # Only layer 0's adapter moved: its update is the rank-1 step 0.05 * 0.5 * ones @ A.
    assert records[1]["dyn/0/v/update_per"] == pytest.approx(1 / 16, rel=1e-3)
    assert "dyn/1/v/update_per" not in records[1]  # zero update: no spectrum
    lines = (tmp_path / "dynamics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [10, 20]
