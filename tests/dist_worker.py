"""One process of the distributed tests (tests/test_distributed.py starts it with
`lrpt launch`'s composed command): builds the micro model on random tokens, runs the
phases named in LRPT_TEST_PHASES and writes what it saw to LRPT_TEST_OUT/rank<r>.json.

Run as `python -m tests.dist_worker key=value ...` (the run config's overrides).
Phases:
  train    all parameters trainable, a few optimizer steps: losses, bytes per micro-batch
  edit     in-place edit vs engine.write_param, engine.write_state, consistency
  rewrap   freeze every linear weight but the head (as a low-rank strategy does), re-wrap,
           write optimizer state before the first step, train: bytes must follow
  perturb  rank 1 changes one frozen weight; check_consistency must name it
  kill     rank 1 dies at the 3rd step; the survivors must fail, not hang
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import comm
from trainer.config import load_config
from trainer.distributed import ConsistencyError, build_accelerator, check_consistency, prepare
from trainer.engine import Engine
from trainer.model import Transformer, configure_optimizer_groups, model_args

VOCAB, SEQ = 256, 32
EDIT_PARAM = "layers.0.mlp.up_proj.weight"
PERTURB_PARAM = "layers.1.self_attn.v_proj.weight"


def batch(cfg, rank: int, step: int, micro: int):
    g = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank * 104729 + step * 131 + micro)
    t = torch.randint(0, VOCAB, (cfg.data.batch_size, SEQ + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def make_optimizer(module, cfg):
    groups = configure_optimizer_groups(module.named_parameters(), cfg.optimizer.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                             eps=cfg.optimizer.eps, foreach=False)


def trainable_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


class Worker:
    def __init__(self, cfg):
        self.cfg = cfg
        self.acc = build_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        torch.manual_seed(cfg.train.seed)
        module = Transformer(model_args(cfg.model, SEQ, vocab_size=VOCAB))
        self.wrap(module)
        self.meter = comm.CommMeter(self.engine)
        self.step = 0
        self.out = {"rank": self.rank, "world": self.world, "startup_bytes": self.meter.startup_bytes,
                    "all_param_bytes": sum(p.numel() * p.element_size() for p in module.parameters())}

    def wrap(self, module):
        opt = make_optimizer(module, self.cfg)
        self.model, self.optimizer = prepare(self.acc, getattr(self, "model", module), opt)
        self.engine = Engine(self.acc, self.model, self.optimizer)

    @property
    def module(self):
        return self.engine.module

    def param(self, name):
        return dict(self.module.named_parameters())[name]

    def train_step(self) -> dict:
        """One optimizer step, as trainer/loop.py takes it."""
        acc, cfg = self.acc, self.cfg
        self.model.train()
        per_micro, losses = [], []
        ops_before = comm.CommMeter.by_op()
        for m in range(cfg.train.grad_accum):
            x, y = batch(cfg, self.rank, self.step, m)
            before = comm.LEDGER.totals("sync")[0]
            with acc.accumulate(self.model):
                loss = self.model(x.to(acc.device), y.to(acc.device))
                acc.backward(loss)
                if acc.sync_gradients and cfg.optimizer.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optimizer.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            per_micro.append(comm.LEDGER.totals("sync")[0] - before)
            losses.append(loss.detach().float().item())
        self.step += 1
        t = torch.tensor([sum(losses) / len(losses)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        ops_after = comm.CommMeter.by_op()
        by_op = {op: ops_after[op]["bytes"] - ops_before.get(op, {}).get("bytes", 0) for op in ops_after}
        sync = self.meter.pop()["sync"]
        return {"loss": t.item() / self.world, "micro_bytes": per_micro, "bytes": sync["bytes"],
                "calls": sync["calls"], "seconds": sync["seconds"], "by_op": {k: v for k, v in by_op.items() if v}}

    # -- phases ------------------------------------------------------------------------------
    def phase_train(self):
        self.out["train"] = {"trainable_bytes": trainable_bytes(self.module),
                             "steps": [self.train_step() for _ in range(3)]}

    def phase_edit(self):
        e, p = self.engine, self.param(EDIT_PARAM)
        r = {}
        base = e.read_param(p)
        with torch.no_grad():
            p.data.add_(1.0)  # the naive edit: the module copy only
        self.train_step()
        r["naive_shift"] = (e.read_param(p) - base).abs().mean().item()
        base = e.read_param(p)
        e.write_param(p, base + 1.0)
        r["write_readback_err"] = (e.read_param(p) - (base + 1.0)).abs().max().item()
        if e.zero_stage < 3:  # ZeRO-3 holds only a shard of the module copy
            r["module_copy_err"] = (p.detach().float() - (base + 1.0)).abs().max().item()
        self.train_step()
        r["engine_shift"] = (e.read_param(p) - base).abs().mean().item()
        e.write_state(p, "exp_avg", torch.full(p.shape, 0.25))
        r["state_readback_err"] = (e.read_state(p, "exp_avg") - 0.25).abs().max().item()
        self.train_step()
        r["exp_avg_after_step"] = e.read_state(p, "exp_avg").mean().item()
        r["state_keys"] = e.state_keys(p)
        r["step_state"] = float(e.read_state(p, "step").float().mean())
        check_consistency(e, self.step)
        r["consistent"] = True
        self.out["edit"] = r

    def phase_rewrap(self):
        module = self.module
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.requires_grad_(False)
        self.wrap(module)
        e = self.engine
        emb = self.param("embed_tokens.weight")
        e.write_state(emb, "exp_avg", torch.full(emb.shape, 0.5))  # before the new optimizer's 1st step
        frozen_before = self.param(PERTURB_PARAM).detach().clone()
        steps = [self.train_step() for _ in range(2)]
        self.out["rewrap"] = {
            "trainable_bytes": trainable_bytes(module), "steps": steps,
            "exp_avg_after": e.read_state(emb, "exp_avg").mean().item(),
            "step_state": float(e.read_state(emb, "step").float().mean()),
            "frozen_unchanged": bool(torch.equal(frozen_before, self.param(PERTURB_PARAM).detach())),
            "startup_bytes": self.meter.startup_bytes}
        check_consistency(e, self.step)

    def phase_perturb(self):
        check_consistency(self.engine, self.step)
        if self.rank == 1:
            with torch.no_grad():
                self.param(PERTURB_PARAM).view(-1)[5] += 1e-3
        try:
            check_consistency(self.engine, self.step)
            self.out["perturb"] = {"raised": False}
        except ConsistencyError as err:
            self.out["perturb"] = {"raised": True, "message": str(err)}

    def phase_kill(self):
        t0 = time.time()
        self.out["kill"] = {"started": t0}
        self.dump()
        for i in range(50):
            if i == 2 and self.rank == 1:
                os._exit(3)  # no clean-up, no goodbye: as a crashed node
            self.train_step()
        self.out["kill"]["finished"] = time.time()  # must not be reached on the survivors

    def dump(self):
        out = Path(os.environ["LRPT_TEST_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{self.rank}.json").write_text(json.dumps(self.out, indent=1))


def main(argv):
    import psutil
    born = psutil.Process().create_time()
    t_imported = time.time() - born
    cfg = load_config(None, argv)
    w = Worker(cfg)
    w.out["timings"] = {"imports": t_imported, "setup": time.time() - born - t_imported}
    try:
        for name in os.environ.get("LRPT_TEST_PHASES", "train").split(","):
            t0 = time.time()
            getattr(w, f"phase_{name}")()
            w.out.setdefault("timings", {})[name] = time.time() - t0
    except Exception:
        w.out["error"] = traceback.format_exc()
        w.dump()
        raise
    w.dump()
    w.acc.end_training()
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main(sys.argv[1:]))
