"""Communication accounting: every collective this process issues, counted where it is issued
and attributed to a purpose. Torch only: the engine set-up imports it. The analytic model and
the `lrpt comm` report that compare against these counts are reports/comm.py.

Definitions (used by every number this module produces):
- payload bytes of one collective = the bytes of the full logical tensor entering it:
  all-reduce/reduce/broadcast: the tensor; reduce-scatter: the full input (not the shard);
  all-gather: the full gathered output (not the shard). For a DDP bucket that is
  `bucket.buffer().numel() * element_size()`. Sync payload is what the metrics call `comm_bytes`.
- wire bytes = what one rank sends on the network under bandwidth-optimal ring algorithms
  over n ranks: all-reduce 2(n-1)/n x payload (a reduce-scatter then an all-gather), and
  (n-1)/n x payload for reduce-scatter, all-gather, reduce and broadcast. Projected times
  are wire bytes / link bandwidth.

- node-boundary bytes: the wire bytes that cross from one node to another, under the same ring
  with node-contiguous ranks (trainer/topology.py): in a collective over a group each rank
  sends to the next one in group order, so an inter-node group sends all of it across, an
  intra-node group none, and the world one rank's share per node (its boundary edge). The
  rest of the wire bytes stay inside the node. Records carry them per node: the sums over
  the node's ranks (`comm/<purpose>_inter_node_bytes`, `comm/<purpose>_intra_node_bytes`).

Purposes (CATEGORIES), by what the process is doing when a collective is issued, or by the
group it runs on (`count_as`: a dedicated group's collectives are always one purpose):
- `sync`: gradient and parameter synchronisation (DDP's bucket all-reduces, ZeRO's reductions,
  shard all-gathers and clipping-norm all-reduce, inside the DeepSpeed engine's backward/step);
- `edit`: strategy edits of weights and optimizer state (merges, switches);
- `control`: everything else the loop does to keep ranks in step: the per-step loss/stop
  all-reduce, validation sums, rank checksums, rank-0 object broadcasts and gathers, and the
  checkpoint gathers of DeepSpeed's partitioned masters. It is the default purpose;
- `startup`: process-group set-up and (re-)wrapping: DDP's and DeepSpeed's initial broadcasts.
Three counters see every collective: the DDP comm hook, wrappers on DeepSpeed's backend and
wrappers on torch.distributed's functions; a collective issued by one counted function inside
another is counted once, by the outermost.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import defaultdict

import torch

from trainer import topology

CATEGORIES = ("sync", "edit", "control", "startup")
ALLREDUCE_OPS = {"all_reduce", "all_reduce_coalesced", "inference_all_reduce"}


def wire_bytes(payload: float, world_size: int, collective: str = "all_reduce") -> float:
    """Bytes one rank sends for a collective of `payload` bytes under a ring algorithm."""
    n = max(1, int(world_size))
    if n == 1:
        return 0.0
    if collective in ALLREDUCE_OPS or collective == "allreduce":
        return payload * 2 * (n - 1) / n
    if collective in ("send", "isend"):
        return float(payload)
    return payload * (n - 1) / n


# ---------------------------------------------------------------------------------------------
# The per-process ledger. The counters write to it, any number of CommMeters read it.

class _Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        # category -> op -> [payload, wire, seconds, calls, inter-node wire, intra-node wire]
        self.data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0, 0.0, 0, 0.0, 0.0]))
        self.phase = ["control"]
        self.popped: dict[str, tuple] = {}  # totals at the last CommMeter.pop(), shared by all meters
        self.popped_links: dict[str, tuple] = {}  # the node's (inter, intra) totals at the last pop

    def add(self, category: str, op: str, payload: int, seconds: float = 0.0, calls: int = 1, group=None,
            ranks=None):
        """Count one collective of `payload` bytes over `group` (a ProcessGroup, None: the
        world), or over the global `ranks` given in group order."""
        ranks = topology.ranks_of(group) if ranks is None else tuple(ranks)
        wire = wire_bytes(payload, len(ranks), op)
        across = topology.current().crosses(ranks)
        with self.lock:
            row = self.data[category][op]
            row[0] += int(payload)
            row[1] += wire
            row[2] += seconds
            row[3] += calls
            row[4 if across else 5] += wire

    def add_time(self, category: str, op: str, seconds: float):
        with self.lock:
            self.data[category][op][2] += seconds

    def totals(self, category: str) -> tuple[int, float, float, int]:
        """(payload bytes, wire bytes, seconds, calls) since process start."""
        with self.lock:
            rows = list(self.data[category].values())
        return (int(sum(r[0] for r in rows)), sum(r[1] for r in rows), sum(r[2] for r in rows),
                int(sum(r[3] for r in rows)))

    def links(self, category: str) -> tuple[float, float]:
        """(inter-node, intra-node) wire bytes this rank sent since process start."""
        with self.lock:
            rows = list(self.data[category].values())
        return sum(r[4] for r in rows), sum(r[5] for r in rows)


LEDGER = _Ledger()
_local = threading.local()  # .depth > 0 inside a counted collective: nested ones are its own
_PURPOSE_OF_GROUP: dict[int, tuple] = {}  # id(group) -> (group, purpose)


def count_as(group, purpose: str) -> None:
    """Attribute every collective on `group` to `purpose`, whatever the process is doing (a
    dedicated group, e.g. background checkpoint writes, runs beside the loop's phases)."""
    if purpose not in CATEGORIES:
        raise ValueError(f"comm category {purpose!r}: expected one of {CATEGORIES}")
    _PURPOSE_OF_GROUP[id(group)] = (group, purpose)


def purpose_of(group) -> str:
    hit = _PURPOSE_OF_GROUP.get(id(group)) if group is not None else None
    return hit[1] if hit is not None and hit[0] is group else current_phase()


@contextlib.contextmanager
def phase(category: str):
    """Attribute collectives issued inside the block to `category`."""
    if category not in CATEGORIES:
        raise ValueError(f"comm category {category!r}: expected one of {CATEGORIES}")
    LEDGER.phase.append(category)
    try:
        yield
    finally:
        LEDGER.phase.pop()


def current_phase() -> str:
    return LEDGER.phase[-1]


@contextlib.contextmanager
def _outermost():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


# ---------------------------------------------------------------------------------------------
# DDP: a comm hook around the default all-reduce hook.

def ddp_comm_hook(process_group, bucket):
    """Count `bucket.buffer()` (the exact gradient payload of this bucket) as `sync` and time
    the all-reduce over DDP's process group (the hook's state) from issue to completion."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    nbytes = buf.numel() * buf.element_size()
    LEDGER.add("sync", "all_reduce", nbytes, calls=1, group=process_group)
    t0 = time.perf_counter()
    with _outermost():  # the hook's own dist.all_reduce is this collective
        fut = default_hooks.allreduce_hook(process_group, bucket)

    def done(f):
        # Runs when the collective completes (gloo: on its worker thread). The time overlaps
        # backward compute: it is the collective's in-flight time, not exposed time.
        LEDGER.add_time("sync", "all_reduce", time.perf_counter() - t0)
        return f.value()

    return fut.then(done)


@contextlib.contextmanager
def count_ddp_broadcasts():
    """DDP's constructor broadcasts every parameter and buffer from rank 0 through
    `dist._broadcast_coalesced`; count those in the current phase (start-up)."""
    import torch.distributed as dist

    original = dist._broadcast_coalesced

    def counted(process_group, tensors, buffer_size, src=0):
        t0 = time.perf_counter()
        out = original(process_group, tensors, buffer_size, src)
        LEDGER.add(purpose_of(process_group), "broadcast", sum(t.numel() * t.element_size() for t in tensors),
                   time.perf_counter() - t0, group=process_group)
        return out

    dist._broadcast_coalesced = counted
    try:
        yield
    finally:
        dist._broadcast_coalesced = original


# ---------------------------------------------------------------------------------------------
# Counting wrappers for DeepSpeed's communication backend object (`deepspeed.comm.comm.cdb`:
# every deepspeed.comm collective goes through it) and for torch.distributed's functions (the
# loop's own collectives, validation, checksums, object broadcasts and gathers). Cheaper than
# DeepSpeed's comms logger, which synchronises the device after every op and whose
# log_summary() must then be called on every rank.

def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


# op -> (argument name, position) of the tensor(s) whose bytes are the payload, and the position
# of the group argument. By name and position because DeepSpeed's decorators hide the signatures.
_DS_PAYLOAD = {
    "all_reduce": ("tensor", 0, 2), "inference_all_reduce": ("tensor", 0, 2),
    "all_reduce_coalesced": ("tensors", 0, 2), "reduce": ("tensor", 0, 3),
    "reduce_scatter": ("input_list", 1, 3), "reduce_scatter_tensor": ("input_tensor", 1, 3),
    "broadcast": ("tensor", 0, 2), "all_gather": ("tensor_list", 0, 2),
    "all_gather_into_tensor": ("output_tensor", 0, 2), "all_gather_base": ("output_tensor", 0, 2),
    "all_gather_coalesced": ("output_tensors", 0, 2), "all_to_all_single": ("input", 1, 4),
    "send": ("tensor", 0, 2), "isend": ("tensor", 0, 2),
}
_TORCH_PAYLOAD = {
    "all_reduce": ("tensor", 0, 2), "reduce": ("tensor", 0, 3), "broadcast": ("tensor", 0, 2),
    "all_gather": ("tensor_list", 0, 2), "all_gather_into_tensor": ("output_tensor", 0, 2),
    "all_gather_single": ("output_tensor", 0, 2), "reduce_scatter_single": ("input", 1, 3),
    "reduce_scatter": ("input_list", 1, 3), "reduce_scatter_tensor": ("input", 1, 3),
    "all_to_all_single": ("input", 1, 4), "send": ("tensor", 0, 2), "isend": ("tensor", 0, 2),
}


def _counted(op, method, name, pos, group_pos):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if getattr(_local, "depth", 0):
            return method(*args, **kwargs)
        x = kwargs.get(name, args[pos] if len(args) > pos else None)
        group = kwargs.get("group", args[group_pos] if len(args) > group_pos else None)
        nbytes, category = _nbytes(x), purpose_of(group)
        t0 = time.perf_counter()
        with _outermost():
            work = method(*args, **kwargs)
        LEDGER.add(category, op, nbytes, group=group)
        if work is not None and hasattr(work, "get_future") and kwargs.get("async_op"):
            try:
                work.get_future().then(lambda f: LEDGER.add_time(category, op, time.perf_counter() - t0))
            except RuntimeError:  # some work objects have no future
                LEDGER.add_time(category, op, time.perf_counter() - t0)
        else:
            LEDGER.add_time(category, op, time.perf_counter() - t0)
        return work

    wrapper._lrpt_counted = True
    return wrapper


def instrument_deepspeed() -> bool:
    """Install the counting wrappers on DeepSpeed's backend once per process (after
    `deepspeed.init_distributed`, which Accelerate calls when it builds its state).
    Returns False when DeepSpeed's backend is not initialised."""
    import deepspeed.comm.comm as dscomm

    cdb = getattr(dscomm, "cdb", None)
    if cdb is None:
        return False
    if getattr(cdb, "_lrpt_counted", False):
        return True
    for op, (name, pos, group_pos) in _DS_PAYLOAD.items():
        method = getattr(cdb, op, None)
        if method is not None:
            setattr(cdb, op, _counted(op, method, name, pos, group_pos))
    cdb._lrpt_counted = True
    return True


def instrument_torch() -> None:
    """Count torch.distributed's collectives, once per process. Both names are wrapped: the
    package's (what callers use) and distributed_c10d's module globals (what its object
    collectives, all_gather_object and broadcast_object_list, call inside), so an object
    collective is counted as the tensor collectives it really issues."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for op, (name, pos, group_pos) in _TORCH_PAYLOAD.items():
        for ns in (dist, c10d):
            fn = getattr(ns, op, None)
            if fn is not None and not getattr(fn, "_lrpt_counted", False):
                setattr(ns, op, _counted(op, fn, name, pos, group_pos))


# ---------------------------------------------------------------------------------------------
# What the loop reads.

class CommMeter:
    """Per-rank counters by purpose: `pop()` gives what each purpose sent since the previous
    pop in this process (any meter's: a meter built after a re-wrap continues where the
    previous one stopped), `by_op()` the totals per collective."""

    def __init__(self, engine_or_accelerator=None):
        pass  # one ledger per process, and groups know their sizes: nothing to learn from the engine

    def pop(self) -> dict[str, dict]:
        """{category: {bytes, wire_bytes, seconds, calls, inter_node_bytes, intra_node_bytes}}
        since the previous pop, for every category in CATEGORIES (the first pop covers
        everything since process start). Payload, wire, seconds and calls are this rank's;
        the node-boundary bytes are its node's (see _node_links). With several ranks per node
        every rank of the node must pop together."""
        links = _node_links()  # first: its own all-reduce then lands in this pop's control bytes
        out = {}
        for category in CATEGORIES:
            now = LEDGER.totals(category)
            before = LEDGER.popped.get(category, (0, 0.0, 0.0, 0))
            b, w, s, c = (x - y for x, y in zip(now, before))
            LEDGER.popped[category] = now
            inter, intra = (x - y for x, y in zip(links[category], LEDGER.popped_links.get(category, (0.0, 0.0))))
            LEDGER.popped_links[category] = links[category]
            out[category] = dict(bytes=int(b), wire_bytes=float(w), seconds=float(s), calls=int(c),
                                 inter_node_bytes=float(inter), intra_node_bytes=float(intra))
        return out

    @staticmethod
    def pending(category: str) -> int:
        """Bytes of `category` since the previous pop, not popped (a checkpoint keeps them)."""
        return int(LEDGER.totals(category)[0] - LEDGER.popped.get(category, (0,))[0])

    @property
    def startup_bytes(self) -> int:
        return LEDGER.totals("startup")[0]

    @staticmethod
    def by_op(category: str = "sync") -> dict[str, dict]:
        """Totals per collective since process start: {op: {bytes, wire_bytes, seconds, calls}}."""
        with LEDGER.lock:
            rows = {op: list(r) for op, r in LEDGER.data[category].items()}
        return {op: dict(bytes=int(r[0]), wire_bytes=r[1], seconds=r[2], calls=int(r[3])) for op, r in rows.items()}


def _node_links() -> dict[str, tuple[float, float]]:
    """(inter-node, intra-node) wire bytes per purpose since process start, sent by this
    rank's whole node. Each rank counts only what it sent, and the ranks of a node run
    collectives of different sizes on different groups (DiLoCo's slices), so they sum their
    counts: one all-reduce within the node, counted as control (it stays inside the node, and
    its own bytes are in the next pop's node figures)."""
    mine = [v for c in CATEGORIES for v in LEDGER.links(c)]
    with phase("control"):
        sums = topology.sum_over_node(mine)
    return {c: (sums[2 * i], sums[2 * i + 1]) for i, c in enumerate(CATEGORIES)}


def record_fields(popped: dict[str, dict]) -> dict:
    """A metrics record's communication fields from `CommMeter.pop()`: payload and wire bytes
    per purpose (`comm/<purpose>_bytes`, `comm/<purpose>_wire_bytes`), the node's wire bytes
    that crossed to other nodes and those that stayed inside it
    (`comm/<purpose>_inter_node_bytes`, `comm/<purpose>_intra_node_bytes`), and
    `procs_per_node` (what "node" means in them); start-up only when something was set up
    (the first record, and after a re-wrap)."""
    out = {"procs_per_node": topology.current().procs_per_node}
    for category, row in popped.items():
        if category == "startup" and not row["calls"]:
            continue
        out[f"comm/{category}_bytes"] = row["bytes"]
        out[f"comm/{category}_wire_bytes"] = row["wire_bytes"]
        out[f"comm/{category}_inter_node_bytes"] = row["inter_node_bytes"]
        out[f"comm/{category}_intra_node_bytes"] = row["intra_node_bytes"]
    return out


# ---------------------------------------------------------------------------------------------
# What a model sends: the analytic side's input, from the shape a run really built.

def model_bytes(cfg, args, step: int | None = None, strategy_state: dict | None = None) -> dict:
    """Parameter bytes of the model `args` (a ModelArgs: model.json of a run) with `cfg`'s
    strategy applied for optimizer step `step` (default: after any warm start), counted on
    the meta device (no memory: works up to 7B). Shapes are the config's (hybrid rank too;
    adaptive rank: its first cycle, at the budget) or a checkpoint's `strategy_state`'s
    (adaptive: a later cycle's ranks). `base_bytes` is the same model without
    adapters, every weight trainable; `full_sync_bytes_per_step` what plain full-rank DDP
    sends for it (fp32 gradients every step, no hook, no DiLoCo): the baseline a user knows,
    so that a hook's or DiLoCo's saving shows against it too."""
    from dataclasses import replace

    from trainer.model import Transformer
    from trainer.strategies import build_strategy

    with torch.device("meta"):
        model = Transformer(args)
        base_params = list(model.parameters())  # full rank: every weight trains (shapes only)
        base = sum(p.numel() * p.element_size() for p in base_params)
        build_strategy(cfg.strategy, cfg.train.seed).apply(
            model, cfg.optimizer.weight_decay, cfg.strategy.warm_start_steps if step is None else step,
            strategy_state)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return dict(trainable_params=sum(p.numel() for p in trainable),
                total_params=sum(p.numel() for p in params),
                trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
                total_bytes=sum(p.numel() * p.element_size() for p in params), base_bytes=base,
                sync_bytes_per_step=sync_payload_bytes(trainable, cfg.distributed),
                full_sync_bytes_per_step=sync_payload_bytes(
                    base_params, replace(cfg.distributed, comm_hook="none", sync="every_step")))


def sync_payload_bytes(params, d) -> float:
    """Payload bytes per optimizer step that data-parallel sync sends for these trainable
    fp32 parameters under `d` (a DistributedConfig), before any engine factor (ZeRO):
      comm_hook none       every gradient element: 4 bytes
      comm_hook bf16/fp16  2 bytes per element
      comm_hook powersgd   per tensor viewed as rows x rest (torch's powerSGD_hook): P and Q,
                           (rows + cols) r' fp32 values with r' = min(rows, cols, rank), when
                           that is under half the matrix (its min_compression_rate 2); else
                           the tensor itself (vectors always)
      sync diloco          every trainable element once per H steps, 4 bytes (2 in bf16): per
                           step, amortised, a 1/H share"""
    if d.sync == "diloco":
        return sum(p.numel() for p in params) * (2 if d.outer_dtype == "bf16" else 4) / d.diloco_inner_steps
    total = 0
    for p in params:
        n = p.numel()
        if d.comm_hook in ("bf16", "fp16"):
            total += 2 * n
            continue
        if d.comm_hook == "powersgd" and n:
            rows = p.shape[0]
            cols = n // rows
            r = min(rows, cols, d.powersgd_rank)
            if (rows + cols) * r * 2 < rows * cols:
                total += (rows + cols) * r * 4
                continue
        total += 4 * n
    return total
