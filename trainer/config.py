"""Typed configuration: defaults live here, YAML files hold only what differs, and
`section.key=value` overrides on the command line win over both.

Every field has a one-line docstring-comment; `lrpt train --help-config` prints them.
Validation fails with one line naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from trainer.config_io import apply_dict, key_of, nest, read_yaml, to_dict, yaml_problem
from trainer.errors import ConfigError  # noqa: F401  (re-exported: `from trainer.config import ConfigError`)
from trainer.shapes import PROJECTIONS, SIZES, model_args
from trainer.strategies import STRATEGIES  # torch-free: the registry holds names only


@dataclass
class RunConfig:
    dir: str = ""  # run directory; empty -> runs/<strategy>-<model>-<timestamp>
    resume: bool = True  # resume from the latest complete checkpoint in `dir` if one exists


@dataclass
class ModelConfig:
    name: str = "micro"  # a named size (see trainer/shapes.py SIZES); fields below override it
    vocab_size: int = 0  # 0 -> the tokenizer's vocabulary size
    hidden_size: int = 0  # 0 -> from the named size
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0  # grouped-query attention; 0 -> from the named size (or num_heads)
    max_seq_len: int = 0  # RoPE table length; 0 -> data.seq_len
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    init_from: str = ""  # weights to continue pretraining from: a Hugging Face Llama directory, or a run directory or checkpoint of ours


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded" (generated corpus) or a directory from `lrpt data prepare`
    seq_len: int = 128
    batch_size: int = 16  # sequences per micro-batch per process
    embedded_sentences: int = 60000  # generated corpus size (source=embedded); minimal pairs: 1 per 300 sentences per phenomenon, 20-200
    embedded_vocab: int = 1024  # BPE vocabulary trained on the generated corpus


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to 2-D parameters only
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class ScheduleConfig:
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak LR
    decay: str = "cosine"  # cosine | constant


@dataclass
class StrategyConfig:
    name: str = "full"  # full | lora | relora | switchlora
    rank: int = 8
    alpha: float = 32.0  # LoRA scale = alpha / rank (SwitchLoRA uses 1 / rank, as the paper)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    train_embeddings: bool = True  # the papers keep embeddings, head and norms trainable
    train_head: bool = True
    train_norms: bool = True
    # ReLoRA
    reset_every: int = 1000  # merge interval in optimizer steps
    warm_start_steps: int = 0  # full-rank steps before the adapters take over
    optimizer_reset: str = "magnitude"  # zero | random | magnitude
    reset_ratio: float = 0.9  # fraction of adapter optimizer state pruned at each merge
    restart_warmup: int = 100  # linear re-warmup steps after each merge; left unset, reset_every // 2 if 100 does not fit
    prune_moments: str = "joint"  # joint (one mask for both Adam moments) | independent (a mask each, as the ReLoRA paper)
    # SwitchLoRA
    switch_interval0: float = 40.0  # initial steps between switches of one vector
    switch_ratio: float = 0.1  # switching rate decays as 0.3 ** ((t+1) / (ratio * T))
    switch_decay_base: float = 0.3
    freeze_steps: int = 5  # counterpart vector frozen this many steps after a switch
    # Storage of the frozen W of wrapped layers: fp32 | bf16 (half its memory; merges and
    # switches still add in fp32 and round once when stored back, see docs/LOG.md).
    frozen_dtype: str = "fp32"
    # Hybrid and adaptive rank (trainer/strategies/rank_plan.py). full_rank: fnmatch patterns on the
    # module paths of the targeted linears (layers.0.self_attn.q_proj; `*` crosses dots); a last
    # component that is a projection's short name stands for its module (*.self_attn.o = o_proj).
    full_rank: list[str] = field(default_factory=list)  # linears trained full rank instead of by adapters, e.g. [layers.0.*, '*.self_attn.o']
    ranks: dict[str, int] = field(default_factory=dict)  # rank per projection, e.g. {q: 16, v: 32}; others take strategy.rank
    rank_budget: int = 0  # relora: first cycle at this rank, then ranks re-chosen at each merge within its bytes; 0 = fixed ranks


@dataclass
class TrainConfig:
    max_steps: int = 300  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    stop_at: int = 0  # stop with a checkpoint after this step (time-sliced jobs); 0 = run to max_steps
    compile: bool = False  # torch.compile the model (in place, after the strategy wraps it); merges don't recompile
    # Recompute each decoder block in backward (torch.utils.checkpoint): activation memory
    # of one block instead of all, for about one more forward pass.
    activation_checkpointing: bool = False


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8
    blimp_every: int = 0  # steps between minimal-pair evaluations; 0 = only at the end
    dynamics_every: int = 0  # steps between learning-dynamics records; 0 = never
    # Trackers the records also go to, through Accelerate (tensorboard writes RUN/tensorboard;
    # wandb, mlflow, comet_ml, ... contact their service): [] for none. metrics.jsonl is always
    # written. The retired `logging.tensorboard=true|false` still means what it said.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True  # progress bar on rank 0


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and always at the end)
    keep: int = 3  # most recent complete checkpoints kept
    async_: bool = field(default=False, metadata={"key": "async"})  # write checkpoints in the background while training goes on


@dataclass
class DistributedConfig:
    deepspeed: str = "none"  # none | zero1 | zero2 | zero3
    timeout_s: int = 120  # collective timeout: a dead rank makes the others fail, not hang
    guard_every: int = 50  # steps between cross-rank weight checksums (and after merges/switches)
    comm_hook: str = "none"  # DDP gradient encoding on the wire: none | bf16 | fp16 | powersgd
    powersgd_rank: int = 4  # comm_hook=powersgd: rank of each matrix's P, Q (its bytes: (n + m) * rank)
    powersgd_start_iter: int = 10  # comm_hook=powersgd: plain all-reduce before this step (error feedback warms up)
    sync: str = "every_step"  # every_step (gradients all-reduced every step) | diloco (trainable weights every H steps)
    diloco_inner_steps: int = 50  # DiLoCo: H, local optimizer steps between outer syncs
    outer_lr: float = 0.7  # DiLoCo: outer Nesterov SGD learning rate (OpenDiLoCo's)
    outer_momentum: float = 0.9  # DiLoCo: outer Nesterov momentum
    outer_dtype: str = "fp32"  # DiLoCo: pseudo-gradient all-reduce precision: fp32 | bf16 (half the bytes)
    diloco_worker: str = "node"  # DiLoCo: one worker per node (data-parallel inside it; one node = one worker) | process
    procs_per_node: int = 0  # processes per node; 0 = the launcher's LOCAL_WORLD_SIZE (set it to simulate nodes on one host)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The dotted keys a YAML file or an override set; a default that depends on another key
    # adapts only when the user left it unset. Not a field: neither saved nor validated.
    set_keys = frozenset()

    def validate(self) -> "Config":
        """Generic checks here; the chosen strategy checks its own keys (and only it: a full
        run may carry ReLoRA keys it never reads)."""
        _validate(self)
        module, cls = STRATEGIES[self.strategy.name].split(":")
        getattr(importlib.import_module(module), cls).check_config(self)  # late: strategies import torch
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------------------------------
# Loading and overrides

def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (may `include:` other YAML files) <- `a.b=c` overrides."""
    cfg = Config()
    keys: set[str] = set()
    if path:
        try:
            keys |= apply_dict(cfg, read_yaml(Path(path)))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") if str(path) not in str(e) else e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {yaml_problem(e)}") from None
        keys |= apply_dict(cfg, nest(key.strip(), value))
    cfg.set_keys = frozenset(keys)
    return cfg.validate()


# Accelerate's tracker names (accelerate.tracking); checked here so that a typo fails before the run starts.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


# ---------------------------------------------------------------------------------------------
# Validation: impossible values stop here, with the key named.

def check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def one_of(key: str, value, options) -> None:
    check(value in options, key, value, "one of " + ", ".join(map(str, options)))


def _validate(c: Config) -> None:
    one_of("model.name", c.model.name, list(SIZES))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_seq_len"):
        check(getattr(c.model, name) >= 0, f"model.{name}", getattr(c.model, name), ">= 0 (0 = default)")
    a = model_args(c.model, c.data.seq_len, vocab_size=c.model.vocab_size or 1)
    check(a.hidden_size % a.num_heads == 0, "model.hidden_size", a.hidden_size,
           f"a multiple of model.num_heads={a.num_heads}")
    check(a.num_heads % a.num_kv_heads == 0, "model.num_kv_heads", a.num_kv_heads,
           f"a divisor of model.num_heads={a.num_heads}")
    check((a.hidden_size // a.num_heads) % 2 == 0, "model.hidden_size", a.hidden_size,
           "an even head dimension (RoPE rotates pairs)")
    check(a.max_seq_len >= c.data.seq_len, "model.max_seq_len", a.max_seq_len, f">= data.seq_len={c.data.seq_len}")
    check(c.model.rope_theta > 0, "model.rope_theta", c.model.rope_theta, "> 0")
    check(c.model.norm_eps > 0, "model.norm_eps", c.model.norm_eps, "> 0")
    check(c.data.seq_len > 0, "data.seq_len", c.data.seq_len, "> 0")
    check(c.data.batch_size > 0, "data.batch_size", c.data.batch_size, "> 0")
    check(c.data.embedded_sentences >= 1000, "data.embedded_sentences", c.data.embedded_sentences, ">= 1000")
    check(c.data.embedded_vocab >= 300, "data.embedded_vocab", c.data.embedded_vocab, ">= 300 (bytes + merges)")
    check(c.optimizer.lr > 0, "optimizer.lr", c.optimizer.lr, "> 0")
    check(0 <= c.optimizer.beta1 < 1, "optimizer.beta1", c.optimizer.beta1, "in [0, 1)")
    check(0 <= c.optimizer.beta2 < 1, "optimizer.beta2", c.optimizer.beta2, "in [0, 1)")
    check(c.optimizer.eps > 0, "optimizer.eps", c.optimizer.eps, "> 0")
    check(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", c.optimizer.weight_decay, ">= 0")
    check(c.optimizer.grad_clip >= 0, "optimizer.grad_clip", c.optimizer.grad_clip, ">= 0 (0 disables)")
    check(c.schedule.warmup_steps >= 0, "schedule.warmup_steps", c.schedule.warmup_steps, ">= 0")
    check(0 <= c.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", c.schedule.min_lr_ratio, "in [0, 1]")
    one_of("schedule.decay", c.schedule.decay, ["cosine", "constant"])
    for t in c.logging.trackers:
        one_of("logging.trackers", t, TRACKERS)
    one_of("strategy.name", c.strategy.name, sorted(STRATEGIES))
    one_of("strategy.frozen_dtype", c.strategy.frozen_dtype, ["fp32", "bf16"])
    for t in c.strategy.targets:  # names, like model.name: wrong whichever strategy is chosen
        one_of("strategy.targets", t, list(PROJECTIONS))
    for t, r in c.strategy.ranks.items():
        one_of("strategy.ranks", t, list(PROJECTIONS))
        check(r > 0, f"strategy.ranks.{t}", r, "> 0")
    check(c.strategy.rank_budget >= 0, "strategy.rank_budget", c.strategy.rank_budget, ">= 0 (0 = fixed ranks)")
    check(c.train.max_steps > 0, "train.max_steps", c.train.max_steps, "> 0")
    check(c.train.grad_accum > 0, "train.grad_accum", c.train.grad_accum, "> 0")
    check(c.train.stop_at >= 0, "train.stop_at", c.train.stop_at, ">= 0")
    check(c.train.seed >= 0, "train.seed", c.train.seed, ">= 0")
    one_of("train.device", c.train.device, ["auto", "cpu", "cuda"])
    one_of("train.precision", c.train.precision, ["auto", "fp32", "bf16"])
    for name in ("log_every", "eval_every", "eval_batches", "blimp_every", "dynamics_every"):
        v = getattr(c.logging, name)
        check(v >= 0, f"logging.{name}", v, ">= 0")
    check(c.logging.log_every > 0, "logging.log_every", c.logging.log_every, "> 0")
    check(c.checkpoint.every > 0, "checkpoint.every", c.checkpoint.every, "> 0")
    check(c.checkpoint.keep > 0, "checkpoint.keep", c.checkpoint.keep, "> 0")
    one_of("distributed.deepspeed", c.distributed.deepspeed, ["none", "zero1", "zero2", "zero3"])
    check(c.distributed.timeout_s > 0, "distributed.timeout_s", c.distributed.timeout_s, "> 0")
    check(c.distributed.guard_every >= 0, "distributed.guard_every", c.distributed.guard_every, ">= 0")
    d = c.distributed
    one_of("distributed.comm_hook", d.comm_hook, ["none", "bf16", "fp16", "powersgd"])
    check(d.powersgd_rank > 0, "distributed.powersgd_rank", d.powersgd_rank, "> 0")
    check(d.powersgd_start_iter >= 2, "distributed.powersgd_start_iter", d.powersgd_start_iter,
          ">= 2 (PowerSGD's error feedback needs plain all-reduces first)")
    if d.comm_hook != "none":
        # A DDP communication hook: DeepSpeed reduces gradients itself, DiLoCo sends none per step.
        check(d.deepspeed == "none", "distributed.comm_hook", d.comm_hook, "none under DeepSpeed (hooks are DDP's)")
        check(d.sync == "every_step", "distributed.comm_hook", d.comm_hook,
              "none with distributed.sync=diloco (no gradient all-reduce to encode)")
    one_of("distributed.sync", d.sync, ["every_step", "diloco"])
    one_of("distributed.diloco_worker", d.diloco_worker, ["node", "process"])
    check(d.procs_per_node >= 0, "distributed.procs_per_node", d.procs_per_node, ">= 0 (0 = from the launcher)")
    if d.sync == "diloco":
        check(d.diloco_inner_steps > 0, "distributed.diloco_inner_steps", d.diloco_inner_steps, "> 0")
        check(d.outer_lr > 0, "distributed.outer_lr", d.outer_lr, "> 0")
        check(0 <= d.outer_momentum < 1, "distributed.outer_momentum", d.outer_momentum, "in [0, 1)")
        one_of("distributed.outer_dtype", d.outer_dtype, ["fp32", "bf16"])
        # ZeRO shards optimizer state over its data-parallel group, which must be one worker:
        # a node's ranks, never several workers (their inner steps are independent).
        check(d.deepspeed == "none" or d.diloco_worker == "node", "distributed.deepspeed", d.deepspeed,
              "none with distributed.diloco_worker=process (ZeRO would shard optimizer state across DiLoCo "
              "workers; diloco_worker=node runs ZeRO inside each node)")
        check(d.deepspeed != "zero3", "distributed.deepspeed", d.deepspeed,
              "zero1 or zero2 with distributed.sync=diloco (ZeRO-3 partitions the weights the outer step reads)")


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per key: name, type, default and the comment beside it in this file."""
    import inspect
    import re

    src = inspect.getsource(cls)
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))
    lines = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines += describe(type(default), prefix + key_of(f) + ".")
        else:
            note = comments.get(f.name, "")
            lines.append(f"{prefix + key_of(f):32s} = {default!r:14}  {note}".rstrip())
    return lines


def save_config(cfg: Config, path: Path) -> None:
    # Through a rename: a kill mid-write must not leave the run with half a config.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
