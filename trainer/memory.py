"""Memory accounting: the bytes one rank holds, by category. `lrpt plan` computes them for a
model built on the meta device (no memory, so llama-7b plans anywhere) with its strategy
applied; a run measures the model-state categories from its live tensors and writes them
into its first training record (`mem/<category>_bytes`). Both count with the same rules, and
tests/test_dist_strategies.py checks that they agree exactly.

Categories (bytes per rank; * = measured in runs):
  frozen_weights*     parameters that do not train (a low-rank strategy's W, in its storage
                      dtype: strategy.frozen_dtype=bf16 halves it)
  trainable_weights*  parameters that train: fp32 (the module copy; under ZeRO-1/2 DeepSpeed's
                      flat buffer, whose module tensors are views into it)
  fused_copies*       rows of a fused [W; A] buffer (strategies/lora.py) that no parameter
                      views: A's rows where ZeRO flattened A or W is bf16; during ReLoRA's warm
                      start on a CPU, the rows of parameters ZeRO flattened or prepare moved
  master_weights*     ZeRO's fp32 partitions (DDP: none, the fp32 module is the master)
  gradients*          the gradients the optimizer steps on: every trainable gradient (DDP), the
                      flat fp32 partition (ZeRO-1/2)
  optimizer_states*   the optimizer's state tensors (AdamW 8 bytes per element and a step per
                      tensor; VectorAdamW 12 per element), on the partitions under ZeRO
  comm_buffers        DDP's gradient buckets (a copy of every trainable gradient); ZeRO's
                      reduce bucket (reduce_bucket_size elements) plus the gradients it holds
                      before partitioning (ZeRO-1: all, ZeRO-2: those overlapping the partition)
  diloco_state        DiLoCo's anchor and outer momentum (fp32; 1/G each with diloco_worker=node)
  weight_casts        copies of weights kept for backward: autocast's bf16 casts of trainable
                      weights (cached for the whole step), fp32 copies of bf16 W on a CPU
  activations         tensors saved for backward at data.batch_size x data.seq_len tokens
                      (Korthikanti et al. per-layer terms for SDPA, SwiGLU and our fused layer)
  logits_and_loss     the head's peak: log-softmax output, its gradient and the loss's (fp32)
  candidate_store     host memory, not the GPU's: SwitchLoRA's switched-out vectors, at their bound
  host_fused_copies   host memory: the [W; A] buffers that stay behind when the module moves to
                      the GPU and the plain path never rebuilds them (warm start, ZeRO-3)

Total: the persistent states plus the larger of two moments of a step, the start of
backward (activations, the head's peak) and the end of backward to the optimizer step
(gradients and what the engine holds of them); see `_total`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

MEASURED = ("frozen_weights", "trainable_weights", "fused_copies", "master_weights", "gradients",
            "optimizer_states")
CATEGORIES = MEASURED + ("comm_buffers", "diloco_state", "weight_casts", "activations", "logits_and_loss")
HOST = ("candidate_store", "host_fused_copies")
ZERO = ("zero1", "zero2", "zero3")
CUDA_RESERVE = 1 << 30  # the CUDA context and library workspaces, outside max_memory_allocated


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# The engine one rank runs under

@dataclass
class Layout:
    """How one rank holds the model: `kind` none (one process, or DiLoCo per process: no
    data-parallel wrapper) | ddp | zero1 | zero2 | zero3 over `dp` ranks; `diloco` None |
    process | node (its state sharded over `gpus_per_node`)."""
    kind: str
    dp: int
    device: str  # cuda | cpu
    autocast: bool  # bf16 autocast (GPU default) or fp32 compute
    ds: dict | None = None  # the DeepSpeed config the run would use
    diloco: str | None = None
    gpus_per_node: int = 1
    world: int = 1  # processes in the job


def layout_of(cfg, nodes: int = 1, gpus_per_node: int = 1) -> Layout:
    """The layout a run of `cfg` on nodes x gpus_per_node processes gets. The device is the
    GPU unless train.device=cpu (a plan is for the machines the run will use)."""
    from trainer.distributed import deepspeed_config, mixed_precision

    d = cfg.distributed
    device = "cpu" if cfg.train.device == "cpu" else "cuda"
    diloco = d.diloco_worker if d.sync == "diloco" else None
    # DiLoCo per process has no data-parallel wrapper; per node, DDP/ZeRO run inside the node.
    group = 1 if diloco == "process" else gpus_per_node if diloco == "node" else nodes * gpus_per_node
    kind = d.deepspeed if d.deepspeed != "none" else ("ddp" if group > 1 else "none")
    ds = deepspeed_config(cfg, device) if kind in ZERO else None
    return Layout(kind, group, device, mixed_precision(cfg, device) == "bf16", ds, diloco, gpus_per_node,
                  nodes * gpus_per_node)


# ---------------------------------------------------------------------------------------------
# The model as a run would build it, on the meta device

def planned_model(cfg, args, step: int):
    """(model, optimizer groups, strategy): `args`' model on the meta device with `cfg`'s
    strategy applied for optimizer step `step`."""
    from trainer.model import Transformer
    from trainer.strategies import build_strategy
    from trainer.strategies.lora import LoRALinear

    strategy = build_strategy(cfg.strategy, cfg.train.seed)
    with torch.device("meta"):
        model = Transformer(args)
        groups = strategy.apply(model, cfg.optimizer.weight_decay, step)
        if cfg.strategy.frozen_dtype == "bf16":
            # set_trainable stores a frozen W in bf16, except on the meta device (nothing to
            # convert there): the same rule, for the byte count.
            for m in model.modules():
                if isinstance(m, LoRALinear) and not m.weight.requires_grad:
                    m.weight.data = m.weight.data.to(torch.bfloat16)
    return model, groups, strategy


def optimizer_layout(strategy, opt_cfg) -> tuple[int, int]:
    """(bytes per element, bytes per tensor) of the state the strategy's optimizer keeps,
    read from a real step of it on a small fp32 tensor: AdamW (8, 4: two moments and a step
    scalar), VectorAdamW (12, 0)."""
    p = nn.Parameter(torch.zeros(4, 3))
    opt = strategy.make_optimizer([{"params": [p], "weight_decay": 0.0}], opt_cfg)
    p.grad = torch.zeros_like(p)
    opt.step()
    per_elem = fixed = 0
    for v in opt.state[p].values():
        if torch.is_tensor(v) and v.shape == p.shape:
            per_elem += v.element_size()
        elif torch.is_tensor(v):
            fixed += nbytes(v)
    return per_elem, fixed


def zero_partition(numel: int, dp: int) -> int:
    """Elements of one rank's partition of a flat group (DeepSpeed pads the group to a
    multiple of 2 x dp elements, stage_1_and_2.py nccl_start_alignment_factor)."""
    return math.ceil(numel / (2 * dp)) * 2


def _in_partition(groups, dp: int) -> int:
    """The most elements one rank's contiguous gradient buffer holds under ZeRO-1/2 (DeepSpeed's
    grads_in_partition): every parameter overlapping its partition, whole."""
    held = [0] * dp
    for g in groups:
        part = zero_partition(sum(p.numel() for p in g["params"]), dp)
        offset = 0
        for p in g["params"]:
            first, last = offset // part, (offset + p.numel() - 1) // part
            for r in range(first, min(last, dp - 1) + 1):
                held[r] += p.numel()
            offset += p.numel()
    return max(held)


def _fused_copies(model, layout: Layout) -> tuple[int, int]:
    """(device bytes, host bytes) of [W; A] rows that no parameter views."""
    from trainer.strategies.lora import LoRALinear

    # On a CPU, Accelerate's prepare of a multi-process job without DeepSpeed moves the module
    # to "cpu:0", another device to torch: every parameter is copied.
    moved = layout.world > 1 and layout.kind not in ZERO
    device = host = 0
    for m in model.modules():
        if not isinstance(m, LoRALinear):
            continue
        W, A = m.weight, m.lora_A
        row = m.in_features * W.element_size()
        if W.requires_grad or layout.kind == "zero3":
            # The plain path (a trainable W, ReLoRA's warm start; W partitioned by ZeRO-3):
            # the [W; A] buffer from construction is never rebuilt. On a GPU it stays behind in
            # host memory, whole; on a CPU it keeps the rows of what ZeRO flattened or prepare moved.
            if layout.device == "cuda":
                host += (m.out_features + m.rank) * row
            else:
                device += (m.out_features if moved or layout.kind in ZERO else 0) * row + (m.rank * row if moved else 0)
        elif (A.requires_grad and layout.kind in ZERO) or A.dtype != W.dtype:
            device += m.rank * row  # A lives elsewhere (ZeRO's flat buffer, or fp32 beside a bf16 W)
    return device, host


def model_state(model, groups, strategy, cfg, layout: Layout) -> dict:
    """Bytes of the persistent state of one rank, by category (MEASURED, comm_buffers,
    diloco_state, candidate_store), and under ZeRO the parts of comm_buffers that `_total`
    places in time: `_ipg` (the reduce bucket), `_held` (gradients kept until the step) and
    `_in_part` (the contiguous gradients of the partition's parameters)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    t_numel = sum(p.numel() for p in trainable)
    per_elem, fixed = optimizer_layout(strategy, cfg.optimizer)
    out = dict(frozen_weights=sum(nbytes(p) for p in params if not p.requires_grad),
               trainable_weights=sum(nbytes(p) for p in trainable),
               master_weights=0, comm_buffers=0, diloco_state=0, _ipg=0, _held=0, _in_part=0)
    out["fused_copies"], out["host_fused_copies"] = _fused_copies(model, layout)
    n = layout.dp
    if layout.kind in ("zero1", "zero2"):
        parts = [zero_partition(sum(p.numel() for p in g["params"]), n) for g in groups]
        out.update(master_weights=4 * sum(parts), gradients=4 * sum(parts),
                   optimizer_states=sum(per_elem * k + fixed for k in parts))
    elif layout.kind == "zero3":  # approximate (not measured): parameters partitioned, small ones whole
        keep = int(layout.ds["zero_optimization"].get("stage3_param_persistence_threshold", 1e5))

        def share(p):
            return nbytes(p) if p.numel() <= keep else math.ceil(p.numel() / n) * p.element_size()
        out.update(frozen_weights=sum(share(p) for p in params if not p.requires_grad),
                   trainable_weights=sum(share(p) for p in trainable),
                   master_weights=4 * math.ceil(t_numel / n), gradients=4 * math.ceil(t_numel / n),
                   optimizer_states=per_elem * math.ceil(t_numel / n) + fixed * len(groups))
    else:
        out.update(gradients=sum(nbytes(p) for p in trainable),
                   optimizer_states=sum(per_elem * p.numel() + fixed for p in trainable))
    if layout.kind == "ddp":
        out["comm_buffers"] = out["gradients"]  # the reducer's buckets: every gradient again
        if cfg.distributed.comm_hook == "powersgd":  # error feedback per bucket, P and Q per matrix
            r = cfg.distributed.powersgd_rank
            out["comm_buffers"] += out["gradients"] + sum(
                4 * r * (p.shape[0] + p.numel() // p.shape[0]) for p in trainable if p.dim() > 1)
    elif layout.kind in ZERO:
        z = layout.ds["zero_optimization"]
        bucket = int(z.get("reduce_bucket_size", 5e8)) * (2 if z.get("overlap_comm") else 1)
        if layout.device == "cpu":  # pages of the bucket that are never written cost no RAM
            bucket = min(bucket, t_numel)
        out["_ipg"] = 4 * bucket if z.get("contiguous_gradients", True) else 0
        if layout.kind == "zero3":  # the prefetch bucket and the block gathered whole
            block = max(sum(nbytes(p) for p in b.parameters()) for b in model.layers)
            out["_held"] = 4 * int(z.get("stage3_prefetch_bucket_size", 5e7)) + block
        else:  # ZeRO-1 holds every gradient until its step, ZeRO-2 those of its partition
            out["_in_part"] = 4 * _in_partition(groups, n)
            out["_held"] = 4 * t_numel if layout.kind == "zero1" else out["_in_part"]
        out["comm_buffers"] = out["_ipg"] + out["_held"]
    if layout.diloco:
        shards = layout.gpus_per_node if layout.diloco == "node" else 1
        out["diloco_state"] = 2 * 4 * math.ceil(t_numel / shards)  # anchor + momentum, fp32
    out["candidate_store"] = 0
    if hasattr(strategy, "candidate_memory"):
        from trainer.strategies.switchlora import pool_memory
        out["candidate_store"] = sum(pool_memory([(m.in_features, m.out_features, m.rank)])["bound_bytes"]
                                     for _, m in strategy.adapters)
    return out


# ---------------------------------------------------------------------------------------------
# Activations: what autograd keeps from forward to backward

def _linear(m, layout: Layout, in_bytes: int) -> tuple[bool, int, int, int]:
    """What one projection (input elements of `in_bytes`) keeps for backward: (the input
    tensor itself, how many bf16 casts of the input, other bytes per token, bytes of weight
    copies)."""
    from trainer.strategies.lora import LoRALinear

    ac, W = layout.autocast, m.weight
    half = 2 if ac else 4  # a matmul's output under autocast, else fp32
    if not isinstance(m, LoRALinear):  # autocast casts the input and caches W's cast
        if W.requires_grad:
            return not ac, int(ac), 0, 2 * W.numel() if ac else 0
        return False, 0, 0, 2 * W.numel() if ac else 0
    p = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
    if not W.requires_grad and p == 0 and layout.kind != "zero3" and (ac or W.dtype == torch.float32):
        # _FusedLowRank keeps x (shared), h = x A^T and the buffer (weights, not counted here).
        return True, 0, half * m.rank, 0
    # The plain path: x W^T + s (dropout(x) A^T) B^T, as autograd records it.
    shared, copies, per_token, casts = False, 0, 0, 0
    if W.requires_grad:
        shared, copies, casts = not ac, int(ac), 2 * W.numel() if ac else 0
    elif ac:
        casts = 2 * W.numel() if W.dtype == torch.float32 else 0
    elif W.dtype != torch.float32:
        casts = 4 * W.numel()  # a bf16 W cast to fp32 for an fp32 input, kept for dx
    A, B = m.lora_A, m.lora_B
    if p > 0:  # the mask (bool on a GPU, the input's dtype on a CPU) and the dropped input
        mask = 1 if layout.device == "cuda" else in_bytes
        per_token += m.in_features * (mask + (half if A.requires_grad else 0))
    elif A.requires_grad:
        shared, copies = shared or not ac, copies + int(ac)
    per_token += half * m.rank if B.requires_grad else 0  # x A^T, kept for dB
    casts += 2 * (A.numel() + B.numel()) if ac else 0
    return shared, copies, per_token, casts


def activation_bytes(model, layout: Layout, batch: int, seq: int, checkpointing: bool = False) -> dict:
    """Saved tensors of one forward at batch x seq tokens, per Korthikanti et al. (arXiv
    2205.05198) adapted to this model: SDPA keeps q, k, v, its output and the log-sum-exp (no
    s^2 scores), the SwiGLU Function keeps gate and up only, no dropout, the fused low-rank
    layer keeps x and h = x A^T, RMSNorm computes in fp32 and the residual stream is fp32.
    With checkpointing each block keeps its input, and one block is recomputed at a time."""
    a, t = model.args, batch * seq
    half = 2 if layout.autocast else 4
    h, f, heads = a.hidden_size, a.intermediate_size, a.num_heads
    q, kv = heads * a.head_dim, a.num_kv_heads * a.head_dim
    casts = 0

    def after_norm(mods, width):
        """Projections reading an RMSNorm's fp32 output: one fp32 tensor if any keeps it,
        plus each bf16 cast that autocast makes for a plain linear."""
        nonlocal casts
        shared, copies, per = False, 0, 0
        for m in mods:
            s, c, pt, w = _linear(m, layout, 4)
            shared, copies, per, casts = shared or s, copies + c, per + pt, casts + w
        return (4 * width if shared else 0) + 2 * width * copies + per

    def after(m, kept: bool):
        """A projection reading a tensor in the compute dtype (a cast of it is the tensor
        itself), counted here unless something else keeps it (`kept`)."""
        nonlocal casts
        s, c, per, w = _linear(m, layout, half)
        casts += w
        return per + (half * m.in_features if (s or c) and not kept else 0)

    norm = 4 * h + 4 * h + 4  # its input (the residual), x / rms, 1 / rms
    layers = []
    for block in model.layers:
        at, mlp = block.self_attn, block.mlp
        per = norm + after_norm([at.q_proj, at.k_proj, at.v_proj], h)
        per += half * (q + 2 * kv + q) + 4 * heads + after(at.o_proj, kept=True)  # SDPA: q, k, v, out; lse
        per += norm + after_norm([mlp.gate_proj, mlp.up_proj], h)
        per += 2 * half * f + after(mlp.down_proj, kept=False)  # gate, up; their product for down
        layers.append(per)
    final = norm + after_norm([model.lm_head], h)
    recompute = max(layers) if checkpointing else 0  # the block being recomputed in backward
    kept = len(layers) * 4 * h + recompute if checkpointing else sum(layers)
    head = model.lm_head.weight
    return dict(activations=t * (kept + final), weight_casts=casts,
                logits_and_loss=t * a.vocab_size * LOGITS_BYTES, _recompute=t * recompute,
                _head_grads=(4 + (2 if layout.autocast else 0)) * head.numel() if head.requires_grad else 0)


# The head's peak per token and vocabulary entry: the log-softmax output (fp32, kept for
# backward), the loss's gradient with respect to it and its own gradient (fp32 each).
LOGITS_BYTES = 12


def _total(b: dict, kind: str) -> int:
    """The peak: persistent state plus the larger moment of a step. At the start of backward
    the activations, the head's peak, then the head's weight gradient (with checkpointing:
    beside the first recomputed block), and ZeRO's reduce bucket; at the end of backward the
    gradients and what the engine holds of them (ZeRO-2 frees the bucket before its step,
    ZeRO-1 keeps it)."""
    persistent = sum(b[k] for k in ("frozen_weights", "trainable_weights", "fused_copies", "master_weights",
                                    "optimizer_states", "diloco_state", "weight_casts"))
    rec = b["_recompute"]
    start = b["activations"] - rec + max(b["logits_and_loss"], rec + b["_head_grads"])
    if kind in ZERO:
        ipg, held, part = b["_ipg"], b["_held"], b["_in_part"]
        step = part + b["gradients"] + (ipg if kind == "zero1" else 0)
        return persistent + max(start + ipg, ipg + held, step)
    return persistent + b["comm_buffers"] + max(start, b["gradients"])


def plan(cfg, args, nodes: int = 1, gpus_per_node: int = 1, cache: dict | None = None) -> dict:
    """The memory plan of one rank of `cfg` on nodes x gpus_per_node processes, for the model
    `args`. One entry in `phases` per trainable set (ReLoRA's warm start is full rank); the
    top level is the phase that needs the most. `cache` keeps built models between calls
    that differ only in engine, batch or checkpointing (a search for a change that fits)."""
    layout = layout_of(cfg, nodes, gpus_per_node)
    cache = {} if cache is None else cache
    phases = []
    for step in sorted({0, cfg.strategy.warm_start_steps}):
        key = (repr(args), repr(cfg.strategy), repr(cfg.optimizer), cfg.train.seed, step)
        if key not in cache:
            cache[key] = planned_model(cfg, args, step)
        model, groups, strategy = cache[key]
        b = model_state(model, groups, strategy, cfg, layout)
        b.update(activation_bytes(model, layout, cfg.data.batch_size, cfg.data.seq_len,
                                  cfg.train.activation_checkpointing))
        phase = dict(from_step=step, bytes={k: int(b[k]) for k in CATEGORIES},
                     host_bytes={k: int(b[k]) for k in HOST}, total_bytes=int(_total(b, layout.kind)))
        if not phases or phase["bytes"] != phases[-1]["bytes"]:
            phases.append(phase)
    top = max(phases, key=lambda p: p["total_bytes"])
    return dict(params=sum(p.numel() for p in model.parameters()),
                engine=layout.kind, world_size=nodes * gpus_per_node, data_parallel=layout.dp,
                device=layout.device, precision="bf16 autocast" if layout.autocast else "fp32",
                micro_batch=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                activation_checkpointing=cfg.train.activation_checkpointing,
                **top, phases=phases)


# ---------------------------------------------------------------------------------------------
# Measured in a run, from live tensors

def measure(engine, gradient_bytes: int) -> dict:
    """MEASURED categories of this rank from its live tensors, through the engine adapter:
    module parameters, fused buffers, DeepSpeed's fp32 partitions, the optimizer's state.
    `gradient_bytes` is what the optimizer saw at a step (see MemoryProbe)."""
    from trainer.strategies.lora import LoRALinear

    out = dict.fromkeys(MEASURED, 0)
    module = engine.module
    for p in module.parameters():
        out["trainable_weights" if p.requires_grad else "frozen_weights"] += nbytes(getattr(p, "ds_tensor", p))
    for m in module.modules():
        wa = getattr(m, "_wa", None) if isinstance(m, LoRALinear) else None
        if wa is not None and wa.device == m.weight.device:
            rows = wa.shape[1] * wa.element_size()
            out["fused_copies"] += rows * ((m.weight.data_ptr() != wa.data_ptr()) * m.out_features
                                           + (m.lora_A.data_ptr() != wa[m.out_features:].data_ptr()) * m.rank)
    out["master_weights"] = sum(nbytes(t) for t in engine.master_partitions())
    out["gradients"] = int(gradient_bytes)
    out["optimizer_states"] = sum(nbytes(v) for st in engine.torch_optimizer.state.values()
                                  for v in st.values() if torch.is_tensor(v))
    return out


class MemoryProbe:
    """The `mem/` fields of the first training record after an engine is built: the
    gradients as the optimizer sees them at its first step (a step pre-hook, which under ZeRO
    runs once per flat group), everything else when `record()` is called."""

    def __init__(self, engine):
        self.engine, self.grads, self.done = engine, {}, False
        self.handle = engine.torch_optimizer.register_step_pre_hook(self._at_step)

    def _at_step(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # by tensor: later steps overwrite, never add
                    self.grads[id(p)] = nbytes(p.grad)

    def record(self) -> dict:
        if self.done or not self.grads:
            return {}
        self.done = True
        self.handle.remove()
        return {f"mem/{k}_bytes": v for k, v in measure(self.engine, sum(self.grads.values())).items()}
