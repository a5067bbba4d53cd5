"""Communication accounting: what this rank puts into gradient and parameter collectives,
counted where the collectives are issued. Torch only: the engine set-up imports it. The
analytic model and the `lrpt comm` report that compare against these counts are reports/comm.py.

Definitions (used by every number this module produces):
- payload bytes of one collective = the bytes of the full logical tensor entering it:
  all-reduce/reduce/broadcast: the tensor; reduce-scatter: the full input (not the shard);
  all-gather: the full gathered output (not the shard). For a DDP bucket that is
  `bucket.buffer().numel() * element_size()`. Payload is what the metrics call `comm_bytes`.
- wire bytes = what one rank sends on the network under bandwidth-optimal ring algorithms
  over n ranks: all-reduce 2(n-1)/n x payload (a reduce-scatter then an all-gather), and
  (n-1)/n x payload for reduce-scatter, all-gather, reduce and broadcast. Projected times
  are wire bytes / link bandwidth.

Collectives are attributed to a category by what the process is doing when they are issued:
`step` (training; the only one `pop()` reports), `startup` (DDP's initial broadcast, the
DeepSpeed engine's, and again at every rewrap), `edit` (DeepSpeed's gathers behind engine
reads of fp32 masters and optimizer state), `check` (cross-rank weight checksums).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import defaultdict

import torch

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
# The per-process ledger. One process group per process, so one ledger: the DDP hook and the
# DeepSpeed wrappers write to it, any number of CommMeters read it.

class _Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        # category -> op -> [payload bytes, wire bytes, seconds, calls]
        self.data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0, 0.0, 0]))
        self.phase = ["step"]
        self.world_size = 1
        self.popped = None  # step totals at the last CommMeter.pop(), shared by all meters

    def add(self, category: str, op: str, payload: int, seconds: float = 0.0, calls: int = 1, world_size=None):
        with self.lock:
            row = self.data[category][op]
            row[0] += int(payload)
            row[1] += wire_bytes(payload, world_size or self.world_size, op)
            row[2] += seconds
            row[3] += calls

    def add_time(self, category: str, op: str, seconds: float):
        with self.lock:
            self.data[category][op][2] += seconds

    def totals(self, category: str) -> tuple[int, float, float, int]:
        with self.lock:
            rows = list(self.data[category].values())
        return (int(sum(r[0] for r in rows)), sum(r[1] for r in rows), sum(r[2] for r in rows),
                int(sum(r[3] for r in rows)))


LEDGER = _Ledger()


@contextlib.contextmanager
def phase(category: str):
    """Attribute collectives issued inside the block to `category`."""
    LEDGER.phase.append(category)
    try:
        yield
    finally:
        LEDGER.phase.pop()


def current_phase() -> str:
    return LEDGER.phase[-1]


def set_world_size(n: int) -> None:
    LEDGER.world_size = int(n)


# ---------------------------------------------------------------------------------------------
# DDP: a comm hook around the default all-reduce hook.

def ddp_comm_hook(state, bucket):
    """Count `bucket.buffer()` (the exact gradient payload of this bucket) and time the
    all-reduce from issue to completion of its future."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    nbytes = buf.numel() * buf.element_size()
    category = current_phase()
    LEDGER.add(category, "all_reduce", nbytes, calls=1)
    t0 = time.perf_counter()
    fut = default_hooks.allreduce_hook(state, bucket)

    def done(f):
        # Runs when the collective completes (gloo: on its worker thread). The time overlaps
        # backward compute: it is the collective's in-flight time, not exposed time.
        LEDGER.add_time(category, "all_reduce", time.perf_counter() - t0)
        return f.value()

    return fut.then(done)


@contextlib.contextmanager
def count_ddp_broadcasts():
    """DDP's constructor broadcasts every parameter and buffer from rank 0 through
    `dist._broadcast_coalesced`; count those as start-up bytes."""
    import torch.distributed as dist

    original = dist._broadcast_coalesced

    def counted(process_group, tensors, buffer_size, src=0):
        t0 = time.perf_counter()
        out = original(process_group, tensors, buffer_size, src)
        LEDGER.add(current_phase(), "broadcast", sum(t.numel() * t.element_size() for t in tensors),
                   time.perf_counter() - t0)
        return out

    dist._broadcast_coalesced = counted
    try:
        yield
    finally:
        dist._broadcast_coalesced = original


# ---------------------------------------------------------------------------------------------
# DeepSpeed: wrap the methods of its communication backend object (`deepspeed.comm.comm.cdb`).
# Every deepspeed.comm collective (ZeRO's gradient reduction, its all-gather of updated
# parameters, the engine's start-up broadcast, the fp32-master gathers) goes through it, and
# the DDP path never does. Cheaper than DeepSpeed's comms logger, which synchronises the
# device after every op and whose log_summary() must then be called on every rank.

def _sum_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


# op -> (argument name, position after self, "sum" for lists) of the tensor(s) whose bytes
# are the payload. By name and position because DeepSpeed's decorators hide the signatures.
_DS_PAYLOAD = {
    "all_reduce": ("tensor", 0), "inference_all_reduce": ("tensor", 0),
    "all_reduce_coalesced": ("tensors", 0), "reduce": ("tensor", 0),
    "reduce_scatter": ("input_list", 1), "reduce_scatter_tensor": ("input_tensor", 1),
    "broadcast": ("tensor", 0), "all_gather": ("tensor_list", 0),
    "all_gather_into_tensor": ("output_tensor", 0), "all_gather_base": ("output_tensor", 0),
    "all_gather_coalesced": ("output_tensors", 0), "all_to_all_single": ("input", 1),
    "send": ("tensor", 0), "isend": ("tensor", 0),
}
_local = threading.local()


def _payload(args, kwargs, name, pos) -> int:
    x = kwargs.get(name, args[pos] if len(args) > pos else None)
    if isinstance(x, (list, tuple)):
        return _sum_bytes(x)
    return _tensor_bytes(x)


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
    for op, (name, pos) in _DS_PAYLOAD.items():
        method = getattr(cdb, op, None)
        if method is None:
            continue
        setattr(cdb, op, _counted(op, method, name, pos))
    cdb._lrpt_counted = True
    return True


def _counted(op, method, name, pos):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        # Count the outermost call only: some backend methods fall back on others.
        if getattr(_local, "depth", 0):
            return method(*args, **kwargs)
        nbytes = _payload(args, kwargs, name, pos)
        category = current_phase()
        _local.depth = 1
        t0 = time.perf_counter()
        try:
            work = method(*args, **kwargs)
        finally:
            _local.depth = 0
        LEDGER.add(category, op, nbytes)
        if work is not None and hasattr(work, "get_future") and kwargs.get("async_op"):
            try:
                work.get_future().then(lambda f: LEDGER.add_time(category, op, time.perf_counter() - t0))
            except RuntimeError:  # some work objects have no future
                LEDGER.add_time(category, op, time.perf_counter() - t0)
        else:
            LEDGER.add_time(category, op, time.perf_counter() - t0)
        return work

    return wrapper


# ---------------------------------------------------------------------------------------------
# What the loop reads.

class CommMeter:
    """Per-rank counters of gradient/parameter collectives: `pop()` for the training step,
    `startup_bytes` for the one-time broadcasts (initial wrap and rewraps), `by_op()` per
    collective."""

    def __init__(self, engine_or_accelerator=None):
        acc = getattr(engine_or_accelerator, "accelerator", engine_or_accelerator)
        n = getattr(acc, "num_processes", None)
        if n:
            set_world_size(n)
        if LEDGER.popped is None:
            LEDGER.popped = LEDGER.totals("step")

    def pop(self) -> tuple[int, float, int]:
        """(payload bytes, seconds, calls) of training-step collectives since the previous pop
        in this process (a meter built after a re-wrap continues where the previous one stopped)."""
        now = LEDGER.totals("step")
        b, _, s, c = (x - y for x, y in zip(now, LEDGER.popped))
        LEDGER.popped = now
        return int(b), float(s), int(c)

    @property
    def startup_bytes(self) -> int:
        return LEDGER.totals("startup")[0]

    @staticmethod
    def by_op(category: str = "step") -> dict[str, dict]:
        """Totals per collective since process start: {op: {bytes, wire_bytes, seconds, calls}}."""
        with LEDGER.lock:
            rows = {op: list(r) for op, r in LEDGER.data[category].items()}
        return {op: dict(bytes=int(r[0]), wire_bytes=r[1], seconds=r[2], calls=int(r[3])) for op, r in rows.items()}
