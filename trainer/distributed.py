"""Process-group set-up and data-parallel wrapping: one Accelerator for every way a run is
started (`accelerate launch`, torchrun, a plain `python`), DDP or DeepSpeed ZeRO-1/2/3.

Hard-won facts this file encodes (REFERENCE.md, "Distributed facts and traps"):
- On CPU, Accelerate only forms a multi-process group when told it is on CPU
  (`Accelerator(cpu=True)`, what ACCELERATE_USE_CPU=1 does); otherwise each torchrun worker
  silently trains alone. We pass cpu=True and check the world size against WORLD_SIZE.
- But cpu=True (and ACCELERATE_USE_CPU) silently turns DeepSpeed off. DeepSpeed on CPU needs
  cpu=False plus an explicit gloo backend, or Accelerate believes the world is 1 process.
- DeepSpeed builds a shared-memory comm op (C++, ~95 s on 2 cores) at start-up that only
  its inference all-reduce uses; we skip the build.
- A DDP wrapper syncs only parameters trainable when it was built: a change of
  requires_grad (ReLoRA's warm start ending) needs `prepare` again, which tears down the old
  wrapper first.
- The data-parallel group need not be the world (DiLoCo with a worker per node: the node's
  ranks). Accelerate has no argument for it: DDP gets it through a stand-in for Accelerate's
  DDP kwargs handler, DeepSpeed through the `mpu` argument of deepspeed.initialize, which
  Accelerate does not pass (we do), both for the duration of one `accelerator.prepare`.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import socket
import warnings
from datetime import timedelta

import torch

from trainer import comm, topology
from trainer.hooks import CommHook
from trainer.resources import resource

DEEPSPEED_CONFIG_DIR = resource("configs", "deepspeed")


from trainer.errors import ConsistencyError, DistributedError  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# The accelerator

def resolve_device(cfg) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("train.device=cuda but no CUDA device is visible")
    return cfg.train.device


def mixed_precision(cfg, device: str) -> str:
    """bf16 autocast on GPU (auto/bf16); fp32 on CPU, where bf16 matmuls run ~30x slower
    (an explicit precision=bf16 on CPU is honoured with a warning)."""
    p = cfg.train.precision
    if p == "fp32":
        return "no"
    if device == "cpu":
        if p == "bf16":
            warnings.warn("train.precision=bf16 on CPU: bf16 matmuls are ~30x slower than fp32 here")
            return "bf16"
        return "no"
    return "bf16"


def deepspeed_config(cfg, device: str) -> dict:
    """configs/deepspeed/<stage>.json with the values this run decides filled in. Module
    weights stay fp32 under DeepSpeed too: on GPU we use DeepSpeed's torch autocast (bf16
    compute, fp32 weights, fp32 gradient reduction) rather than its bf16 mode, whose frozen
    weights would live in bf16 only and make every ReLoRA merge round to bf16."""
    name = cfg.distributed.deepspeed
    path = DEEPSPEED_CONFIG_DIR / f"{name}.json"
    ds = json.loads(path.read_text())
    ds.pop("_comment", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["gradient_clipping"] = float(cfg.optimizer.grad_clip)
    ds["train_batch_size"] = "auto"  # micro x accumulation x world size, filled by Accelerate
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    if mixed_precision(cfg, device) == "bf16":
        # No lower-precision-safe modules: gradients are reduced in fp32, as under DDP.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's torch backend builds a C++ shared-memory op in its constructor (a JIT
    compile on first use per machine) that only `inference_all_reduce` uses; training never
    does, so replace the builder before `deepspeed.init_distributed` runs."""
    import importlib

    # Not `import deepspeed.comm.torch as m`: the package's attribute `torch` is the real
    # torch module (it does `import torch`), so that form binds torch, not DeepSpeed's module.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_deepspeed() -> str | None:
    """The ZeRO stage `accelerate launch --use_deepspeed` set up for this process (from its
    environment: --zero_stage, else the stage in --deepspeed_config_file, else Accelerate's
    default 2), or None when it was launched without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage, path = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and path and os.path.isfile(path):
        stage = json.loads(open(path).read()).get("zero_optimization", {}).get("stage")
    return f"zero{2 if stage is None else stage}"


def build_accelerator(cfg):
    """The Accelerator for this process (see the module docstring for the traps). The engine is
    the config's distributed.deepspeed, or the launcher's DeepSpeed stage where the config names
    none (the resolved config then records it); a config and a launcher that disagree stop."""
    launched = launcher_deepspeed()
    if launched and launched != cfg.distributed.deepspeed:
        if "distributed.deepspeed" in cfg.set_keys:
            raise DistributedError(f"launched with DeepSpeed {launched} (accelerate launch --use_deepspeed) but the "
                                   f"config says distributed.deepspeed={cfg.distributed.deepspeed}: drop one of them")
        cfg.distributed.deepspeed = launched
        cfg.validate()  # what composes with it (hooks, DiLoCo) was checked against the old engine
    # torch deprecates broadcast_buffers=False (set below, on purpose) for a replacement that Accelerate does not pass yet.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    device = resolve_device(cfg)
    cpu = device == "cpu"
    if cpu:  # else DeepSpeed, imported by Accelerate, warns on every CPU run that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    stage = cfg.distributed.deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                       timeout=timedelta(seconds=cfg.distributed.timeout_s))]
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    comm.instrument_torch()
    with comm.phase("startup"):
        if stage != "none":
            skip_deepspeed_shm_op()
            if os.environ.pop("ACCELERATE_USE_CPU", None) is not None:
                warnings.warn("ACCELERATE_USE_CPU is set: it would disable DeepSpeed; ignoring it "
                              "(DeepSpeed on CPU runs over gloo)")
            if "LOCAL_RANK" not in os.environ:
                # A plain `python` process: DeepSpeed still wants a process group, of one.
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                                  MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
            if stage == "zero3":
                warnings.warn(
                    "distributed.deepspeed=zero3: ZeRO-3 all-gathers every parameter, frozen W "
                    "included, in every forward and backward. With a low-rank strategy it sends "
                    "MORE bytes than DDP (frozen weights cross the network each step) and saves "
                    "no communication; use zero1/zero2 to keep only adapters on the wire.",
                    stacklevel=2)
            plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, device), zero3_init_flag=False)
            acc = Accelerator(mixed_precision="no", gradient_accumulation_steps=cfg.train.grad_accum,
                              deepspeed_plugin=plugin, kwargs_handlers=handlers)
            comm.instrument_deepspeed()
        else:
            # A plain single process has no process group: a backend handler would make
            # Accelerate query one that was never initialised.
            single = "LOCAL_RANK" not in os.environ and launched_world == 1
            # No buffer broadcast before each forward: our buffers (RoPE tables, LoRA scales)
            # are constants every rank computes alike, and DDP's default re-sends them from
            # rank 0 at every synchronised step, traffic beside the gradients that the comm
            # hook does not see.
            # PowerSGD's state (error feedback, warm-start P and Q) is laid out by gradient
            # bucket, and DDP re-lays its buckets once after the first step of every process: a
            # resumed process would read its state in another layout. With
            # find_unused_parameters DDP never re-lays them (one graph walk per step).
            ddp_kwargs = DistributedDataParallelKwargs(
                broadcast_buffers=False, find_unused_parameters=cfg.distributed.comm_hook == "powersgd")
            acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision(cfg, device),
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              kwargs_handlers=[] if single else handlers + [ddp_kwargs])
    if acc.num_processes != launched_world:
        raise DistributedError(
            f"launched as {launched_world} processes but the process group has {acc.num_processes}: "
            "the workers would train independently. On CPU start DDP with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` or torchrun (lrpt launch does this).")
    topology.build(cfg.distributed.procs_per_node)  # on every rank: it creates process groups
    return acc


# ---------------------------------------------------------------------------------------------
# Wrapping (and re-wrapping)

def prepare(accelerator, model, optimizer, hook: CommHook | None = None, group: topology.Group | None = None):
    """Wrap `model` (a module, or a previously prepared wrapper) and `optimizer` for data
    parallelism over `group` (None: the world); under DDP register the communication hook
    (`hook`, default: plain all-reduce, counted). A group of one rank in a larger world
    (DiLoCo with a worker per process) places the model on the device unwrapped: its
    gradients never cross the network.

    Calling it again is a re-wrap (the trainable set changed): the previous wrapper is torn
    down first (DDP: its autograd hooks removed, or its reducer would still all-reduce the
    old parameter set; DeepSpeed: the engine destroyed and its links into the old fp32
    partitions removed). ZeRO-1/2 re-wrap by building a new engine from the module, whose
    fp32 weights equal the masters after every step; ZeRO-3 cannot. Callers must drop every
    reference to the old wrapper, optimizer and Engine, and build a new Engine.
    """
    module = accelerator.unwrap_model(model)
    _teardown(accelerator)
    if not getattr(accelerator, "_lrpt_backward_in_sync", False):
        # Gradient collectives are issued from backward (DDP buckets, compression hooks and
        # their chained collectives, which DDP waits for before backward returns).
        accelerator.backward = _in_phase("sync", accelerator.backward)
        accelerator._lrpt_backward_in_sync = True
    world = accelerator.num_processes
    if group is not None and group.size == world:
        group = None
    with comm.phase("startup"), comm.count_ddp_broadcasts():
        if group is not None and group.size == 1:
            model_p, opt_p = module.to(accelerator.device), accelerator.prepare_optimizer(optimizer)
        else:
            with _data_parallel_over(accelerator, group):
                model_p, opt_p = accelerator.prepare(module, optimizer)
    if isinstance(model_p, torch.nn.parallel.DistributedDataParallel):
        (hook or CommHook()).register(model_p)
    elif hasattr(model_p, "zero_optimization_stage"):
        # ZeRO's gradient reductions, shard all-gathers and clipping norm all happen inside
        # the engine's backward and step (Accelerate calls both from accelerator.backward).
        for name in ("backward", "step"):
            setattr(model_p, name, _in_phase("sync", getattr(model_p, name)))
    accelerator._lrpt_prepared = (model_p, opt_p)
    return model_p, opt_p


@contextlib.contextmanager
def _data_parallel_over(accelerator, group: topology.Group | None):
    """Make `accelerator.prepare` build its DDP wrapper or DeepSpeed engine over `group`
    (None: the world)."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        original = accelerator.ddp_handler
        if group is not None:
            accelerator.ddp_handler = _with_process_group(original, group.pg)
        try:
            yield
        finally:
            accelerator.ddp_handler = original
        return
    import deepspeed

    ds = accelerator.deepspeed_plugin.deepspeed_config
    # DeepSpeed asserts train_batch_size = micro-batch x accumulation x data-parallel size.
    ds["train_batch_size"] = (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] *
                              (accelerator.num_processes if group is None else group.size))
    initialize = deepspeed.initialize  # Accelerate looks it up at each call
    if group is not None:
        deepspeed.initialize = functools.partial(initialize, mpu=_DataParallelMpu(group))
    try:
        yield
    finally:
        deepspeed.initialize = initialize


def _with_process_group(handler, group):
    """Accelerate's DDP kwargs `handler` plus `process_group`, which its class lacks (and which
    its to_kwargs could not deepcopy). Accelerate accepts only its own class at construction,
    and reads `accelerator.ddp_handler` when it wraps: a stand-in for one `prepare`."""
    from dataclasses import dataclass

    @dataclass
    class WithGroup(type(handler)):
        process_group: object = None

        def to_kwargs(self):
            pg, self.process_group = self.process_group, None
            try:
                return {**super().to_kwargs(), "process_group": pg}
            finally:
                self.process_group = pg

    return WithGroup(**vars(handler), process_group=group)


class _DataParallelMpu:
    """What DeepSpeed asks of a Megatron-style `mpu` when its data-parallel group is not the
    world: the group; no model parallelism (a None group is DeepSpeed's mark of an absent
    dimension: its ZeRO optimizer then issues no model-parallel collective)."""

    def __init__(self, group: topology.Group):
        self.group = group

    def get_data_parallel_group(self):
        return self.group.pg

    def get_data_parallel_world_size(self) -> int:
        return self.group.size

    def get_data_parallel_rank(self) -> int:
        return self.group.ranks.index(topology.current().rank)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.group.ranks)

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def _in_phase(category, fn):
    def wrapper(*args, **kwargs):
        with comm.phase(category):
            return fn(*args, **kwargs)
    return wrapper


def _teardown(accelerator) -> None:
    # Our own record of the last wrap: Accelerator.free_memory() may already have emptied
    # accelerator._models (and destroyed a DeepSpeed engine) without undoing what matters here.
    prev = getattr(accelerator, "_lrpt_prepared", None)
    if prev is None:
        return
    accelerator._lrpt_prepared = None
    old_model, old_opt = prev
    if hasattr(old_model, "zero_optimization_stage"):  # a DeepSpeed engine
        if old_model.zero_optimization_stage() >= 3:
            raise NotImplementedError(
                "re-wrapping under ZeRO-3 is not supported (its parameters are partitioned in place); "
                "use zero1/zero2 for strategies that change the trainable set (ReLoRA warm start)")
        if any(p.dtype != torch.float32 for p in old_model.module.parameters()):
            raise NotImplementedError("re-wrapping a DeepSpeed engine needs fp32 module weights "
                                      "(torch autocast, not DeepSpeed's bf16/fp16 mode)")
        wrapped = accelerator.deepspeed_engine_wrapped
        if wrapped is not None and wrapped.engine is old_model:  # else free_memory() destroyed it
            old_model.destroy()
        for p in old_model.module.parameters():
            for attr in ("_hp_mapping", "_dp_group"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        accelerator.deepspeed_engine_wrapped = None
    elif isinstance(old_model, torch.nn.parallel.DistributedDataParallel):
        old_model._remove_autograd_hooks()
        for h in getattr(old_model, "_accum_grad_hooks", []):
            h.remove()
        for p in old_model.module.parameters():
            p.grad = None
    accelerator._models[:] = [m for m in accelerator._models if m is not old_model]
    accelerator._optimizers[:] = [o for o in accelerator._optimizers if o is not old_opt]
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Cross-rank weight checks

_CHUNK = 1 << 22
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def param_checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two int64 checksums of the bit pattern of `t`: a plain sum and a position-weighted
    one (catches swapped elements). Computed on t's device, in chunks to bound memory."""
    flat = t.detach().contiguous().view(-1).view(_INT[t.element_size()])
    s0 = torch.zeros((), dtype=torch.int64, device=t.device)
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), _CHUNK):
        bits = flat[start:start + _CHUNK].to(torch.int64)
        w = (torch.arange(start, start + bits.numel(), device=t.device, dtype=torch.int64) % 65521) + 1
        s0 += bits.sum()
        s1 += (bits * w).sum()
    return int(s0), int(s1)


def check_consistency(engine, step: int) -> None:
    """All ranks compare checksums of every parameter (one all-gather of 2 int64 per
    parameter); on a mismatch every rank raises ConsistencyError naming the first differing
    parameter and the ranks that disagree with rank 0. Under ZeRO-3 a partitioned parameter
    has no replica to compare (each rank holds a different shard, and its local tensor is
    empty): only the parameters it keeps whole (below the persistence threshold) count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names, sums = [], []
    with comm.phase("control"):
        for name, p in engine.module.named_parameters():
            names.append(name)
            sums.extend(param_checksum(p.data))
        device = engine.accelerator.device if dist.get_backend() == "nccl" else torch.device("cpu")
        local = torch.tensor(sums, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
    table = torch.stack([g.cpu() for g in gathered]).view(len(gathered), len(names), 2)
    differs = (table != table[0:1]).any(dim=2)  # [ranks, params]
    if differs.any():
        bad_params = differs.any(dim=0).nonzero().flatten().tolist()
        first = bad_params[0]
        ranks = differs[:, first].nonzero().flatten().tolist()
        raise ConsistencyError(
            f"step {step}: ranks hold different weights: first differing parameter {names[first]!r} "
            f"differs on rank(s) {ranks} from rank 0 ({len(bad_params)} parameter(s) differ in all)")


__all__ = ["build_accelerator", "prepare", "check_consistency", "ConsistencyError", "DistributedError",
           "deepspeed_config", "resolve_device", "mixed_precision", "param_checksum"]
