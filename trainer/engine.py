"""The engine adapter: the one place that knows whether DDP or DeepSpeed holds the weights.

Strategies and checkpoints read and write parameters and optimizer state through it. Under
DDP the module's fp32 tensors are the masters and are edited in place. Under DeepSpeed ZeRO
the optimizer keeps flat fp32 master partitions that overwrite in-place edits at the next
step, so edits go through `deepspeed.utils.safe_set_full_*` and the module's working copy is
refreshed by hand.

Under DeepSpeed every rank must make the same calls in the same order: full reads of
optimizer state are collectives (each rank holds only a fragment), and so are reads of
parameters under ZeRO-3. Under ZeRO-1/2 the fp32 module tensor equals the master, so
parameter reads are local; element-wise edits of optimizer state (`edit_state`) touch only
the fragment a rank owns, so strategy edits need no gather. Writes are local but must carry
the same value on every rank (draw it from a seeded generator). Frozen parameters are never
partitioned by ZeRO-1/2: they are plain module tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Engine:
    def __init__(self, accelerator, model: nn.Module, optimizer):
        self.accelerator = accelerator
        self.model = model  # as prepared (DDP wrapper or DeepSpeed engine)
        self.optimizer = optimizer  # as prepared (AcceleratedOptimizer)
        self.deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
        self.zero_stage = 0
        self._zero = None  # DeepSpeed's ZeRO optimizer (holds the fp32 partitions)
        self._managed: set[int] = set()
        if self.deepspeed:
            self.zero_stage = model.zero_optimization_stage()
            self._zero = model.optimizer
            if self.zero_stage in (1, 2):
                # Exactly the parameters this optimizer partitions. Not `_hp_mapping is not
                # None`: that is None on ranks owning no fragment of p, and a rank that skipped
                # the gather would leave the others waiting in it.
                self._managed = {id(p) for group in self._zero.bit16_groups for p in group}
            elif self.zero_stage == 3:
                self._managed = {id(p) for p in self.module.parameters() if p.requires_grad}
        self._linked = False

    @property
    def module(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The innermost torch optimizer (under DeepSpeed it holds flat partitions)."""
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def is_managed(self, p: nn.Parameter) -> bool:
        """True when DeepSpeed keeps an fp32 master of `p` apart from the module tensor."""
        return id(p) in self._managed

    # -- parameters ------------------------------------------------------------------------
    @torch.no_grad()
    def read_param(self, p: nn.Parameter) -> torch.Tensor:
        """The full fp32 master value of `p` (a copy). No communication under ZeRO-1/2 with
        fp32 module weights (see _module_is_master)."""
        if self.zero_stage == 3:
            return self._z3_read(p)
        if self.is_managed(p) and not self._module_is_master(p):
            from deepspeed.utils import safe_get_full_fp32_param
            return safe_get_full_fp32_param(p).detach().clone()
        return p.detach().float().clone()

    def _module_is_master(self, p) -> bool:
        """ZeRO-1/2 all-gather every updated shard into the module tensor after each step, and
        write_param writes both, so with fp32 module weights the module tensor IS the master,
        whole on every rank: reading it needs no gather. Checked on the fragment this rank
        owns (local, exact), so a stale module copy (an in-place edit) fails loudly."""
        if self.zero_stage not in (1, 2) or p.dtype != torch.float32:
            return False
        frag = getattr(p, "_hp_mapping", None)
        if frag is not None:
            a = frag.lp_fragment_address
            if not torch.equal(p.detach().reshape(-1).narrow(0, a.start, a.numel), frag.hp_fragment):
                raise RuntimeError("the module copy of a ZeRO parameter differs from its fp32 master: "
                                   "edit parameters through Engine.write_param, not in place")
        return True

    @torch.no_grad()
    def add_low_rank(self, p: nn.Parameter, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
        """p += alpha left @ right in fp32: in place where the module tensor is the fp32
        master (DDP, a frozen W under ZeRO-1/2), else read, add, write. SwitchLoRA edits
        every wrapped W most steps: a copy in and out would move W through memory 3x more."""
        if self.zero_stage != 3 and not self.is_managed(p) and p.dtype == torch.float32:
            p.addmm_(left.to(p.device), right.to(p.device), alpha=alpha)
            return
        W = self.read_param(p)
        W.addmm_(left.to(W.device, W.dtype), right.to(W.device, W.dtype), alpha=alpha)
        self.write_param(p, W)

    @torch.no_grad()
    def write_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Set the master value of `p` and the module's working copy."""
        value = value.to(device=p.device)
        if self.zero_stage == 3:
            return self._z3_write(p, value)
        if self.is_managed(p):
            from deepspeed.utils import safe_set_full_fp32_param
            safe_set_full_fp32_param(p, value.to(torch.float32))
        p.copy_(value.to(p.dtype))

    def _z3_read(self, p):
        import deepspeed
        if p.requires_grad:
            from deepspeed.utils import safe_get_full_fp32_param
            return safe_get_full_fp32_param(p).detach().clone().view(p.ds_shape)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().float().clone()

    def _z3_write(self, p, value):
        import deepspeed
        if p.requires_grad:
            from deepspeed.utils import safe_set_full_fp32_param
            safe_set_full_fp32_param(p, value.to(torch.float32))
        # Rank 0's edited copy is re-partitioned into every rank's shard on exit.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.dtype).view_as(p.data))

    # -- optimizer state -------------------------------------------------------------------
    @torch.no_grad()
    def read_state(self, p: nn.Parameter, key: str) -> torch.Tensor | None:
        if self.is_managed(p):
            self._ensure_ds_state()
            shared = self._shared_scalar(p, key)
            if shared is not None:
                return shared.detach().clone()
            self._check_key(key)
            from deepspeed.utils import safe_get_full_optimizer_state
            value = safe_get_full_optimizer_state(p, key)
            return value.view(p.ds_shape) if self.zero_stage == 3 else value
        state = self.torch_optimizer.state.get(p, {})
        value = state.get(key)
        return None if value is None else value.detach().clone()

    @torch.no_grad()
    def write_state(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.is_managed(p):
            self._ensure_ds_state()
            shared = self._shared_scalar(p, key)
            if shared is not None:
                # One scalar for the whole flat group (torch AdamW's `step`): writing it for one
                # parameter sets it for all of its group. Per-parameter counters need an
                # optimizer whose step is per element (trainer/optim.py VectorAdamW).
                shared.copy_(torch.as_tensor(value, dtype=shared.dtype))
                return
            self._check_key(key)
            from deepspeed.utils import safe_set_full_optimizer_state
            safe_set_full_optimizer_state(p, value.to(device=p.device, dtype=torch.float32), key)
            return
        _init_state(self.torch_optimizer, [p])
        state = self.torch_optimizer.state[p]
        if key in state and torch.is_tensor(state[key]):
            state[key].copy_(value)
        else:
            state[key] = value.clone()

    @torch.no_grad()
    def edit_state(self, p: nn.Parameter, fn) -> None:
        """Edit `p`'s per-element optimizer state in place, element-wise, where it lives: under
        ZeRO-1/2 on the fragment of the flat fp32 partition this rank owns, with no gather.
        `fn(part, state)`: `state` maps each per-element key (exp_avg, exp_avg_sq, a
        per-element step) to a 1-D tensor of the elements `part` covers (see Part). Every
        rank calls it, with the same fn: fn may call part.kth_smallest, a collective."""
        if self.zero_stage in (1, 2) and self.is_managed(p):
            self._ensure_ds_state()
            keys = [k for k in self.state_keys(p) if self._shared_scalar(p, k) is None]
            frag = getattr(p, "_hp_mapping", None)  # None: this rank owns no element of p
            if frag is None:
                empty = torch.empty(0, dtype=torch.float32, device=p.device)
                fn(Part(p.shape, 0, 0, partitioned=True, group=self._zero.dp_process_group),
                   {k: empty.clone() for k in keys})
            else:
                a = frag.lp_fragment_address
                fn(Part(p.shape, a.start, a.numel, partitioned=True, group=self._zero.dp_process_group),
                   {k: frag.get_optim_state_fragment(k) for k in keys})
            return
        if self.is_managed(p):  # ZeRO-3: gathered, edited, written back
            shape = p.ds_shape
            state = {k: self.read_state(p, k).reshape(-1) for k in self.state_keys(p)
                     if self._shared_scalar(p, k) is None}
            fn(Part(shape, 0, shape.numel()), state)
            for k, v in state.items():
                self.write_state(p, k, v.view(shape))
            return
        _init_state(self.torch_optimizer, [p])
        st = self.torch_optimizer.state[p]
        fn(Part(p.shape, 0, p.numel()),
           {k: v.view(-1) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape})

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions (none under DDP: the module is the master)."""
        return self._flats() if self.deepspeed else []

    def _flats(self) -> list[torch.Tensor]:
        """DeepSpeed's flat fp32 partitions, the keys of the torch optimizer's state."""
        if self.zero_stage == 3:
            return list(self._zero.fp32_partitioned_groups_flat)
        return list(self._zero.single_partition_of_fp32_groups)

    def _flat_states(self) -> list[dict]:
        opt = self.torch_optimizer
        return [opt.state.get(q, {}) for q in self._flats()]

    def _ensure_ds_state(self) -> None:
        """Make every parameter's fragment see its optimizer state.

        DeepSpeed creates the state at the first step and links fragments to it right after
        the FIRST parameter group's step (stage_1_and_2.py `_optimizer_step`), when the
        other groups have no state yet: their fragments never get linked, and
        safe_get/set_full_optimizer_state fail for them (here: the no-weight-decay group of
        norms). So we create missing state (see _init_state) and link every group ourselves,
        once per engine; the state tensors are then only updated in place."""
        if self._linked:
            return
        opt = self.torch_optimizer
        if self.zero_stage == 3:
            # Stage 3 empties the torch groups and puts one flat sub-group in at each step.
            for sg, flat in enumerate(self._zero.fp32_partitioned_groups_flat):
                group = opt.param_groups[self._zero.sub_group_to_group_id[sg]]
                saved, group["params"] = group["params"], [flat]
                try:
                    _init_state(opt, [flat])
                finally:
                    group["params"] = saved
        else:
            _init_state(opt, self._flats())
        if self.zero_stage in (1, 2):
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
            for i, group in enumerate(self._zero.bit16_groups):
                flat = self._zero.single_partition_of_fp32_groups[i]
                lazy_init_hp_params_optimizer_state(group, flat, opt.state)
            self._zero._hp_optimizer_states_linked = True
        self._linked = True

    def _group_flat(self, p):
        """The flat fp32 partition of p's group (same object kind on every rank)."""
        if self.zero_stage in (1, 2):
            for i, group in enumerate(self._zero.bit16_groups):
                if any(q is p for q in group):
                    return self._zero.single_partition_of_fp32_groups[i]
        else:
            i = self._zero.grad_position[self._zero.get_param_id(p)][0]
            return self._zero.fp32_partitioned_groups_flat[i]
        raise KeyError("parameter is not managed by this DeepSpeed optimizer")

    def _shared_scalar(self, p, key):
        """A state entry that is one value per flat group (torch AdamW's `step`), else None."""
        st = self.torch_optimizer.state.get(self._group_flat(p), {})
        v = st.get(key)
        if torch.is_tensor(v) and v.dim() == 0:
            return v
        return None

    def _check_key(self, key):
        # Checked on group-level state, identical on every rank: a rank raising while the
        # others enter the gather would hang them.
        flat_keys = {k for st in self._flat_states() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
        if key not in flat_keys:
            raise KeyError(f"optimizer state {key!r} is not held per element under DeepSpeed "
                           f"(partitioned keys: {sorted(flat_keys)}); only tensors shaped like the parameter are")

    def state_keys(self, p) -> list[str]:
        """Optimizer state keys of `p` that are tensors (the same on every rank)."""
        if self.is_managed(p):
            self._ensure_ds_state()
            st = self.torch_optimizer.state.get(self._group_flat(p), {})
            return [k for k, v in st.items() if torch.is_tensor(v)]
        return [k for k, v in self.torch_optimizer.state.get(p, {}).items() if torch.is_tensor(v)]

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    # -- what this rank holds, in place (sharded checkpoints) ------------------------------
    def fragment(self, p: nn.Parameter) -> int | None:
        """Where this rank's share of `p` starts in its flattened value when ZeRO-1/2
        partitions p's fp32 master and optimizer state (the share may be empty); None when
        this rank holds all of p (DDP, frozen parameters). Not for ZeRO-3."""
        self._no_zero3()
        if not self.is_managed(p):
            return None
        frag = getattr(p, "_hp_mapping", None)  # None: this rank owns no element of p
        return 0 if frag is None else frag.lp_fragment_address.start

    @torch.no_grad()
    def master_part(self, p: nn.Parameter) -> torch.Tensor:
        """A 1-D view of the fp32 master elements of `p` this rank holds (see `fragment`):
        written to in place, it changes the master."""
        self._no_zero3()
        if not self.is_managed(p):
            return p.detach().view(-1)
        frag = getattr(p, "_hp_mapping", None)
        return torch.empty(0, dtype=torch.float32, device=p.device) if frag is None else frag.hp_fragment.view(-1)

    @torch.no_grad()
    def state_parts(self, p: nn.Parameter, create: bool = False) -> dict[str, torch.Tensor]:
        """p's optimizer state as this rank holds it, in place: each per-element key as a 1-D
        view of the elements `master_part` covers; a scalar key (torch AdamW's `step`, one per
        flat group under DeepSpeed) as a 0-dim tensor to read, never to write (write_state
        does). `create` makes state that does not exist yet, as the first step would."""
        self._no_zero3()
        if self.is_managed(p):
            self._ensure_ds_state()
            frag = getattr(p, "_hp_mapping", None)
            out = {}
            for key in self.state_keys(p):
                shared = self._shared_scalar(p, key)
                if shared is not None:
                    out[key] = shared
                else:
                    out[key] = (frag.get_optim_state_fragment(key).view(-1) if frag is not None else
                                torch.empty(0, dtype=torch.float32, device=p.device))
            return out
        if create:
            _init_state(self.torch_optimizer, [p])
        state = self.torch_optimizer.state.get(p, {})
        return {k: v if v.dim() == 0 else v.view(-1) for k, v in state.items() if torch.is_tensor(v)}

    def _no_zero3(self) -> None:
        if self.zero_stage == 3:
            raise NotImplementedError("ZeRO-3 partitions parameters in place: read them through read_param")

    # -- whole-optimizer state, world-size independent -------------------------------------
    def optimizer_state_dict(self) -> dict:
        """{param_name: {key: full tensor}}: the same on every rank and for any world size.
        Under DeepSpeed every rank must call this (the gathers are collectives)."""
        out = {}
        for name, p in self.trainable():
            out[name] = {k: self.read_state(p, k) for k in self.state_keys(p)}
        return out

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Write `state` ({name: {key: tensor}}, as optimizer_state_dict gives) into the
        optimizer; trainable parameters it does not name keep fresh state."""
        if self.deepspeed:
            self._check_shared_steps(state)
        for name, p in self.trainable():
            for key, value in state.get(name, {}).items():
                if value is not None:
                    self.write_state(p, key, value)

    def _check_shared_steps(self, state: dict) -> None:
        """Under DeepSpeed a scalar `step` is one per parameter group. A group that mixes
        parameters with different step counts (typically: new adapters, fresh, beside
        embeddings whose state carries over a re-wrap) cannot be represented; say so, since
        the fresh ones would get the others' bias correction and the run would diverge from
        DDP. The fix: separate optimizer groups for them, or a per-element step (VectorAdamW)."""
        import warnings

        names = {id(p): n for n, p in self.trainable()}
        for i, flat in enumerate(self._flats()):
            params = self._zero.bit16_groups[i] if self.zero_stage in (1, 2) else [
                p for p in self.module.parameters() if p.requires_grad and self._group_flat(p) is flat]
            steps = {}
            for p in params:
                v = state.get(names.get(id(p), ""), {}).get("step")
                steps[names.get(id(p), "?")] = None if v is None else (float(v) if v.dim() == 0 else None)
            scalars = {n: v for n, v in steps.items() if v is not None}
            if scalars and (len(set(scalars.values())) > 1 or len(scalars) < len(steps)):
                fresh = sorted(n for n, v in steps.items() if v is None)[:3]
                warnings.warn(f"DeepSpeed keeps one optimizer `step` per parameter group; group {i} mixes "
                              f"step counts {sorted(set(scalars.values()))}{' and fresh parameters ' if fresh else ''}"
                              f"{', '.join(fresh)}: they will share step {max(scalars.values()):g} and their "
                              f"bias correction (DDP would differ). Put them in separate optimizer groups.")


class Part:
    """The elements of a parameter that this rank holds: `numel` elements from `start` of its
    flattened value (all of them unless `partitioned` over the ranks of `group`, ZeRO's
    data-parallel group: the world, or a node's ranks under DiLoCo with a worker per node)."""

    def __init__(self, shape, start: int, numel: int, partitioned: bool = False, group=None):
        self.shape, self.start, self.numel, self.partitioned = torch.Size(shape), start, numel, partitioned
        self.group = group

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a full-shaped tensor (every rank computes the same full one)."""
        return full.reshape(-1).narrow(0, self.start, self.numel)

    def mask(self, dim: int, index) -> torch.Tensor:
        """This rank's elements of a boolean mask selecting rows (dim 0) or columns (dim 1)."""
        full = torch.zeros(self.shape, dtype=torch.bool)
        full.index_fill_(dim, torch.as_tensor(list(index), dtype=torch.long), True)
        return self.take(full)

    @torch.no_grad()
    def kth_smallest(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th smallest (1-based) of the non-negative `values` of all ranks' parts
        together, identical on every rank (a collective when partitioned). Not a gather: a
        bisection on the fp32 bit pattern, which orders non-negative floats as integers: 31
        all-reduces of one int64 count (248 bytes of payload) and exactly torch.kthvalue."""
        values = values.float()
        if not self.partitioned:
            return values.reshape(-1).kthvalue(k).values
        import torch.distributed as dist

        bits = values.contiguous().view(torch.int32)
        count = torch.zeros(1, dtype=torch.int64, device=values.device)
        lo, hi = 0, 0x7F800000  # +0.0 .. +inf
        while lo < hi:
            mid = (lo + hi) // 2
            count.fill_((bits <= mid).sum())
            dist.all_reduce(count, group=self.group)
            if int(count.item()) >= k:
                hi = mid
            else:
                lo = mid + 1
        return torch.tensor([lo], dtype=torch.int32).view(torch.float32)[0].to(values.device)


@torch.no_grad()
def _init_state(opt: torch.optim.Optimizer, params) -> None:
    """Create the optimizer state of `params` that have none, as their first step would, by
    stepping them at lr 0 on zero gradients, which moves no weight (AdamW: decay factor
    1 - 0*wd = 1, update 0 * m / denom = 0), then resetting step counters to 0. Optimizers
    create state lazily; a resume or an edit before the first step needs it to exist (torch's
    Adam fails on a partial state, and DeepSpeed only maps state that exists)."""
    todo = [q for q in params if not opt.state.get(q)]
    if not todo:
        return
    todo_ids = {id(q) for q in todo}
    saved_grads, saved_lrs = {}, [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        for q in g["params"]:
            saved_grads[id(q)] = q.grad
            q.grad = torch.zeros_like(q) if id(q) in todo_ids else None  # step only `todo`
        g["lr"] = 0.0
    try:
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, saved_lrs):
            g["lr"] = lr
            for q in g["params"]:
                q.grad = saved_grads[id(q)]
    for q in todo:
        st = opt.state.get(q, {})
        for k, v in st.items():
            if k == "step":
                if torch.is_tensor(v):
                    v.zero_()
                else:
                    st[k] = 0
