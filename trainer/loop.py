"""The training loop: one process of a (possibly distributed) run, top to bottom.

    build (data, model, strategy, engine) -> resume -> for each optimizer step:
    micro-batches, step, strategy hook, log / evaluate / guard / checkpoint -> done

The loop knows no strategy by name and no engine by name: the strategy plugin decides what
trains and edits weights between steps; Accelerate (DDP or DeepSpeed) moves the gradients;
the engine adapter hides where the master weights live. The Trainer is itself checkpointable
(`state_dict` / `load_state_dict`); trainer/checkpoint does the file I/O.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import checkpoint as ckpt
from trainer import seeding, topology
from trainer.comm import CommMeter, record_fields as comm_record_fields
from trainer.config import Config
from trainer.data import PreparedData, BatchLoader, resolve_dataset
from trainer.distributed import CommHook, build_accelerator, check_consistency, prepare
from trainer.engine import Engine
from trainer.errors import EXIT_PREEMPTED, NonFiniteLoss, Preempted, RunDirError
from trainer.evaluate import minimal_pairs_record, validation_batches, validation_loss
from trainer.memory import MemoryProbe
from trainer.model import build_model
from trainer.ranks import all_reduce_sum, broadcast_str, say
from trainer.resume import elastic_restart, mark_start, open_run_dir
from trainer.rundir import RunDir, default_run_dir
from trainer.strategies import build_strategy
from trainer.strategies.base import StepContext
from trainer.strategies.lora import refresh_fused
from trainer.sync import build_sync
from trainer.trackers import build_trackers


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # tokens consumed by all ranks
    comm_bytes_total: int = 0
    elapsed_s: float = 0.0
    # The logging window open at a checkpoint: a resume continues it, so the interval that
    # contains the resume logs the same mean loss and bytes (its own ledger never saw them).
    window_loss: float = 0.0
    window_steps: int = 0
    window_sync_bytes: int = 0


class _StopFlag:
    """SLURM sends SIGUSR1 (or SIGTERM) before killing a job, and a user presses Ctrl-C: note
    it and finish the step; the loop then checkpoints and exits. A Ctrl-C after that stops at
    once (the last checkpoint stays the one to resume from)."""

    def __init__(self):
        self.raised = False
        self.name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.raised:
            raise KeyboardInterrupt
        self.raised = True
        self.name = self.name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("interrupted: finishing this step and writing a checkpoint (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)


class Trainer:
    """Holds everything one process needs; `fit()` runs the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator = acc = build_accelerator(cfg)
        self.rank, self.world = acc.process_index, acc.num_processes
        # Data and model first: a bad data.source or vocabulary must not leave a stray run directory.
        with acc.main_process_first():  # rank 0 builds the embedded corpus, the others reuse it
            self.data = PreparedData(resolve_dataset(cfg.data))
        seeding.seed_globals(cfg.train.seed)  # the initial weights: the same on every rank
        init = ckpt.initial_weights(cfg.model.init_from, cfg.data.seq_len) if cfg.model.init_from else None
        self.args, module = build_model(cfg, self.data.vocab_size, init)
        self.strategy = build_strategy(cfg.strategy, cfg.train.seed)

        name = f"{cfg.strategy.name}-{cfg.model.name}"
        self.run = RunDir(Path(broadcast_str(cfg.run.dir or str(default_run_dir(name)))).resolve())
        cfg.run.dir = str(self.run.path)
        # Rank 0 locks and checks the directory before anything in it changes; every rank
        # learns the outcome, so that a refusal stops them all and not rank 0 alone.
        opened, failure = {}, None
        if acc.is_main_process:
            try:
                opened = open_run_dir(self.run, cfg, self.args)
            except Exception as e:  # noqa: BLE001 - a bug still raises below, after the others are told
                failure, opened = e, {"error": str(e)}
        opened = json.loads(broadcast_str(json.dumps(opened)))
        if failure is not None:
            raise failure
        if "error" in opened:
            raise RunDirError(opened["error"])
        resume_from = Path(opened["resume_from"]) if opened["resume_from"] else None
        start_step = ckpt.step_of(resume_from) if resume_from else 0
        # The trainable set and shapes of the step we start at, so the engine is built right the first time.
        resumed = ckpt.read(resume_from, parts=("trainer",))["trainer"]["strategy"] if resume_from else None
        groups = self.strategy.apply(module, cfg.optimizer.weight_decay, start_step, resumed)
        d = cfg.distributed
        self.hook = CommHook(d.comm_hook, d.powersgd_rank, d.powersgd_start_iter, cfg.train.seed)
        self.sync = build_sync(cfg)
        self._build_engine(module, groups)
        self.loader = BatchLoader(self.data, "train", cfg.data.seq_len, cfg.data.batch_size, self.rank,
                                  self.world, cfg.train.seed)
        self.val_batches = validation_batches(self.data, cfg, self.rank, self.world)
        seeding.seed_rank(cfg.train.seed, self.rank)
        self.state = TrainState()
        self.resumed_metrics_offset = 0  # a start over redoes every record already there
        self.saver = ckpt.Checkpointer(self.run.checkpoints, cfg.checkpoint.keep, cfg.checkpoint.async_, self.rank,
                                       self.world, cfg.distributed.timeout_s)
        restart = elastic_restart()
        if resume_from is not None:
            ckpt.load(self, resume_from, self.saver.group)
        if restart or resume_from is not None:
            say(acc, (f"restart {restart[0]} of at most {restart[1]}: " if restart else "") +
                (f"resumed from {resume_from} at step {self.state.step}" if resume_from else "no checkpoint yet"))
        if opened["changed"]:
            say(acc, "resuming with changed settings: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in opened["changed"].items()))
        if acc.is_main_process:
            mark_start(self.run, opened, self.state, resume_from, self.resumed_metrics_offset, restart)

        if acc.is_main_process:  # accelerator.log and end_training then reach them
            acc.trackers += build_trackers(cfg, self.run)
        self.dynamics = None
        if cfg.logging.dynamics_every and acc.is_main_process:
            from trainer.dynamics import DynamicsTracker
            self.dynamics = DynamicsTracker(every=cfg.logging.dynamics_every)
            self.dynamics.start(self.engine.module, self.state.step)
        self._describe()

    def _build_engine(self, module, groups) -> None:
        module.activation_checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.train.compile and not getattr(module, "_lrpt_compiled", False):
            # In place (Module.compile): the same module, names and parameters for the
            # engine, checkpoints and strategies; compiled after the strategy wrapped it.
            module.compile()
            module._lrpt_compiled = True
        optimizer = self.strategy.make_optimizer(groups, self.cfg.optimizer)
        self.base_lrs = [g.get("lr", self.cfg.optimizer.lr) for g in optimizer.param_groups]
        self.model, self.optimizer = prepare(self.accelerator, module, optimizer, hook=self.hook,
                                             group=self.sync.data_parallel)
        self.engine = Engine(self.accelerator, self.model, self.optimizer)
        refresh_fused(self.engine.module)  # prepare may have moved or re-pointed weights
        self.sync.reanchor(self.engine)  # DiLoCo: the weights every rank starts from
        self.comm = CommMeter(self.engine)
        self.mem = MemoryProbe(self.engine)  # the mem/ fields of the next record (trainer/memory.py)

    def _rewrap(self, step: int) -> None:
        """The trainable set or shapes change (warm start over, adaptive ranks): DDP syncs only what was
        trainable when it wrapped, so wrapper and optimizer are rebuilt; optimizer state stays with the
        parameters that stay (embeddings, head, norms), new ones start fresh."""
        kept, module = self.engine.optimizer_state_dict(), self.engine.module
        before = dict(module.named_parameters())
        for p in before.values():  # masters -> module copy before re-wrapping
            p.data.copy_(self.engine.read_param(p).to(p.dtype))
        groups = self.strategy.rewrap(module, step, self.cfg.optimizer.weight_decay)
        self._build_engine(module, groups)
        stay = {n for n, p in self.engine.trainable() if before.get(n) is p}
        self.engine.load_optimizer_state_dict({n: s for n, s in kept.items() if n in stay})
        self._describe()

    def _describe(self) -> None:
        module = self.engine.module
        self.total_params = sum(p.numel() for p in module.parameters())
        self.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        a, c = self.args, self.cfg
        # What the val split holds caps eval_batches (trainer/data/loader.py eval_batches).
        held = (self.data.num_tokens("val") - 1) // c.data.seq_len // c.data.batch_size
        val_sequences = min(c.logging.eval_batches, held) * c.data.batch_size
        say(self.accelerator,
            f"model {c.model.name}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}"
            f"/{a.num_kv_heads}, vocab {a.vocab_size}\n{self.strategy.describe(module)}\n"
            f"{topology.current().describe()}\n{self.sync.describe()}\n"
            f"{c.data.batch_size} seq x {c.data.seq_len} tokens x "
            f"{c.train.grad_accum} accum per rank = {self.tokens_per_step:,} tokens/step\n"
            f"validation: {val_sequences} sequences ({val_sequences * c.data.seq_len:,} tokens) at every evaluation\n"
            f"run directory: {self.run.path}")

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.data.batch_size * c.data.seq_len * c.train.grad_accum * self.world

    # -- checkpointable (trainer/checkpoint assembles, writes and restores the state) -------------
    def state_dict(self) -> dict:
        """This rank's share of the state ({"model", "optimizer", "trainer", "own"}, in place:
        see trainer/checkpoint/state.py). Every rank calls it; nothing is gathered."""
        return ckpt.capture(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint read into `ckpt.destination(self)`, on any world size
        (the dropout streams and a rank's own state continue exactly only on the same one)."""
        ckpt.restore(self, state)

    # -- one optimizer step ------------------------------------------------------------------
    def _set_lr(self, step: int) -> float:
        mult = self.strategy.lr_multiplier(step, self.cfg.schedule, self.cfg.train.max_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult
        return self.base_lrs[0] * mult

    def _train_step(self, step: int) -> tuple[torch.Tensor, dict]:
        """Accumulate `grad_accum` micro-batches and step once. Accelerate's `accumulate`
        skips the gradient all-reduce on all but the last micro-batch (DDP no_sync; DeepSpeed
        counts micro-batches itself), so gradients cross the network once per step."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        # The mean loss stays on the device: a host read per micro-batch would wait for the
        # device each time; fit() reads it once per step, in its all-reduce.
        loss_sum, dyn = torch.zeros((), device=acc.device), {}
        for _ in range(cfg.train.grad_accum):
            x, y = self.loader.next_batch_to(acc.device)
            with acc.accumulate(self.model), acc.autocast():
                loss = self.model(x, y)
                acc.backward(loss)
                if acc.sync_gradients and cfg.optimizer.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optimizer.grad_clip)
                self.optimizer.step()
                if acc.sync_gradients and self.dynamics is not None:
                    # Gradients still present, strategy edits (merges) not yet applied.
                    dyn = self.dynamics.record(self.engine.module, step, force=step == cfg.train.max_steps)
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
        return loss_sum / cfg.train.grad_accum, dyn

    # -- evaluation and records --------------------------------------------------------------
    def evaluate(self) -> dict:
        return validation_loss(self.model, self.val_batches, self.accelerator.device,
                               autocast=self.accelerator.autocast, all_reduce=self.world > 1)

    def minimal_pairs(self) -> dict:
        """Minimal-pair accuracy on rank 0 (identical weights everywhere); others wait."""
        out = {}
        if self.accelerator.is_main_process:
            out = minimal_pairs_record(self.engine.module, self.data, self.accelerator.device)
        self.accelerator.wait_for_everyone()
        return out

    def log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.run.append_metrics(record)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        stop = _StopFlag()
        ctx = StepContext(engine=self.engine, max_steps=cfg.train.max_steps)
        bar = None
        # A bar only for a terminal: in a file (a SLURM log) each redraw is one more line.
        if acc.is_main_process and cfg.logging.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.train.max_steps, initial=st.step, desc="train", unit="step", dynamic_ncols=True)
        console = bar.write if bar is not None else (lambda line: say(acc, line))
        window_loss, window_steps, window_t0 = st.window_loss, st.window_steps, time.perf_counter()
        window_guard_s = 0.0  # rank checks in this window: timed apart, not training
        if st.step == 0:
            val_sequences = int(all_reduce_sum([sum(len(x) for x, _ in self.val_batches)], acc.device)[0])
            self.log({"step": 0, "tokens": 0, **self.evaluate(), "world_size": self.world,
                      "val_sequences": val_sequences, "val_tokens": val_sequences * cfg.data.seq_len})

        while st.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            if self.strategy.needs_rewrap(st.step):
                self._rewrap(st.step)
                ctx = StepContext(engine=self.engine, max_steps=cfg.train.max_steps)
                self.log({"step": st.step, "tokens": st.tokens, "event": "rewrap",
                          "trainable_params": self.trainable_params})
            lr = self._set_lr(st.step)
            loss, dyn = self._train_step(st.step + 1)
            st.step += 1
            st.tokens += self.tokens_per_step
            # One tiny all-reduce per step: the global mean loss, and whether any rank saw a
            # preemption signal or a non-finite loss, so that all ranks stop together.
            # It also carries each rank's "my checkpoint write is done" (checkpoint.async), so a
            # save in flight completes on every rank at the same step with no collective of its own.
            bad = ~torch.isfinite(loss)
            loss_sum, n_stop, n_bad, n_saved, n_save_failed = all_reduce_sum(
                [torch.where(bad, 0.0, loss), float(stop.raised), bad, *self.saver.flags()], acc.device)
            self.saver.settle(n_saved, n_save_failed)
            if n_bad:
                self.saver.wait()  # a save in flight is of a good step: let it complete
                last = ckpt.find_latest(self.run.checkpoints)
                raise NonFiniteLoss(f"loss became {loss.item()} at step {st.step} (lr {lr:.3g}); stopped without saving. "
                                    f"Last good checkpoint: {last or 'none'}. Lower optimizer.lr or raise "
                                    f"schedule.warmup_steps, then resume.")
            window_loss += loss_sum / self.world
            window_steps += 1
            if dyn:
                self.log({"step": st.step, "tokens": st.tokens, **dyn})

            # Strategy edits and the rank check only where every rank holds the same weights:
            # every step, or DiLoCo's outer syncs.
            synced = self.sync.after_step(st.step, self.engine)
            event = self.strategy.after_step(st.step, ctx) if synced else None
            if event:
                self.sync.reanchor(self.engine)
            if event in ("merge", "rewrap"):  # rare and worth seeing; switches happen most steps
                console(f"step {st.step}: {event}")
            # Ranks are compared after merges and every guard_every steps, not after each
            # switch (most steps early on); the check's time is kept out of the step's.
            guard_every = cfg.distributed.guard_every
            if self.world > 1 and synced and ((event and event != "switch") or
                                              (guard_every and st.step % guard_every == 0)):
                tg = time.perf_counter()
                check_consistency(self.engine, st.step)
                tg = time.perf_counter() - tg
                t0, window_t0, window_guard_s = t0 + tg, window_t0 + tg, window_guard_s + tg
            st.elapsed_s += time.perf_counter() - t0

            last = st.step == cfg.train.max_steps
            # Merges get a record of their own; switches happen most steps early on and don't.
            if st.step % cfg.logging.log_every == 0 or last or (event and event != "switch"):
                dt = time.perf_counter() - window_t0
                record = {"step": st.step, "tokens": st.tokens, "loss": window_loss / window_steps, "lr": lr,
                          "tokens_per_s": window_steps * self.tokens_per_step / dt,
                          "trainable_params": self.trainable_params, "total_params": self.total_params,
                          "world_size": self.world, "elapsed_s": st.elapsed_s, "guard_time_s": window_guard_s}
                if event:
                    record.update(event=event, **self.strategy.event_record())
                if (cfg.logging.eval_every and st.step % cfg.logging.eval_every == 0) or last:
                    record.update(self.evaluate())
                if (cfg.logging.blimp_every and st.step % cfg.logging.blimp_every == 0) or last:
                    record.update(self.minimal_pairs())
                # After the evaluation, so that its validation sums are in this record's control bytes.
                popped = self.comm.pop()
                comm_bytes, st.window_sync_bytes = popped["sync"]["bytes"] + st.window_sync_bytes, 0
                st.comm_bytes_total += comm_bytes
                record.update(comm_bytes=comm_bytes, comm_bytes_total=st.comm_bytes_total,
                              comm_time_s=popped["sync"]["seconds"], **comm_record_fields(popped),
                              **self.mem.record())
                self.log(record)
                eta = round(st.elapsed_s / st.step * (cfg.train.max_steps - st.step))  # the progress in a log file
                msg = (f"step {st.step}/{cfg.train.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                       f"{record['tokens_per_s'] / 1e3:.1f}k tok/s | comm {comm_bytes / 1e6:.2f} MB | "
                       f"eta {eta // 60}m{eta % 60:02d}s")
                if "val_loss" in record:
                    msg += f" | val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f})"
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                console(msg)
                window_loss, window_steps, window_t0, window_guard_s = 0.0, 0, time.perf_counter(), 0.0
            if bar is not None:
                bar.update(1)

            preempted = n_stop > 0
            stopping = preempted or st.step == cfg.train.stop_at
            if st.step % cfg.checkpoint.every == 0 or last or stopping:
                st.window_loss, st.window_steps, st.window_sync_bytes = window_loss, window_steps, self.comm.pending("sync")
                # The last one (the end, a stop) is complete before the run says it is done.
                self.saver.save(self.state_dict(), st.step, final=last or stopping)
                st.window_sync_bytes = 0  # this process's ledger still holds them
            if stopping:
                if bar is not None:
                    bar.close()
                self.log({"step": st.step, "tokens": st.tokens, "event": "preempt" if preempted else "stop"})
                if preempted:
                    say(acc, f"stopped on {stop.name or 'a signal to another rank'}: checkpoint written at step "
                             f"{st.step}; exiting {EXIT_PREEMPTED} (run the same command to resume)")
                    raise Preempted(str(self.run.path))
                say(acc, f"stopped at train.stop_at={st.step}; run directory: {self.run.path}")
                return self.run.path
        if bar is not None:
            bar.close()
        say(acc, f"done: {st.step} steps, {st.tokens:,} tokens. Run directory: {self.run.path}")
        return self.run.path


def train(cfg: Config) -> Path:
    """Train (or resume) the run that `cfg` describes; returns the run directory."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.accelerator.end_training()
