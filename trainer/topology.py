"""Which ranks share a node, and the process groups that follow from it: the one place that
the sync modes, the engine set-up and the byte counter ask.

A node is the set of ranks on one machine. Launchers (torchrun, `accelerate launch`, our SLURM
script) number ranks node by node: rank = node * G + local rank, with G processes per node
(LOCAL_WORLD_SIZE). `distributed.procs_per_node` overrides G to simulate nodes on one host.

Groups, created by every rank in the same order (intra-node groups node by node, then
inter-node groups local rank by local rank), and only when there are several nodes of
several ranks; otherwise one of them is the world and the other a single rank:
  intra-node  the G ranks of one node:                  {nG, ..., nG + G - 1}
  inter-node  the ranks with the same local rank:       {l, G + l, 2G + l, ...}

Bytes by link (the ring model of trainer/comm.py): in a collective over a group, each rank
sends its wire bytes to the next rank in group order; they cross a node boundary when that
rank is on another node. Hence an inter-node group sends everything across, an intra-node
group nothing, and the world ring one rank's share per node (its boundary edge).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.errors import DistributedError


@dataclass(frozen=True)
class Group:
    """Some ranks and their torch ProcessGroup. `pg` None is the default (world) group; a
    group of one rank has none either, and nothing communicates over it."""
    ranks: tuple[int, ...]
    pg: object = None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class Topology:
    rank: int = 0
    world: int = 1
    procs_per_node: int = 1
    intra: Group = field(default_factory=lambda: Group((0,)))  # this rank's node
    inter: Group = field(default_factory=lambda: Group((0,)))  # this local rank on every node

    @property
    def nodes(self) -> int:
        return self.world // self.procs_per_node

    @property
    def node(self) -> int:
        return self.node_of(self.rank)

    @property
    def local_rank(self) -> int:
        return self.rank % self.procs_per_node

    @property
    def world_group(self) -> Group:
        return Group(tuple(range(self.world)))

    def node_of(self, rank: int) -> int:
        return rank // self.procs_per_node

    def crosses(self, ranks) -> bool:
        """Whether this rank's ring successor in a group of `ranks` (global ranks in group
        order) is on another node: then what this rank sends in a collective over the group
        crosses a node boundary."""
        ranks = tuple(ranks)
        if self.nodes == 1 or len(ranks) < 2 or self.rank not in ranks:
            return False
        successor = ranks[(ranks.index(self.rank) + 1) % len(ranks)]
        return self.node_of(successor) != self.node

    def describe(self) -> str:
        g = self.procs_per_node
        if self.nodes == 1:
            return f"world size {self.world} (1 node)"
        return (f"world size {self.world}: {self.nodes} nodes x {g} processes; intra-node groups "
                f"{_ranges([range(n * g, n * g + g) for n in range(self.nodes)])}, inter-node groups "
                f"{_ranges([range(lr, self.world, g) for lr in range(g)])}")


def _ranges(groups) -> str:
    shown = [list(r) for r in groups[:4]]
    return " ".join(str(r).replace(" ", "") for r in shown) + (" ..." if len(groups) > 4 else "")


_CURRENT = Topology()
_RANKS: dict[int, tuple] = {}  # id(group) -> (group, its global ranks in group order)


def current() -> Topology:
    """This process's topology (one node of one rank until `build` ran)."""
    return _CURRENT


def ranks_of(group) -> tuple[int, ...]:
    """The global ranks of a ProcessGroup in group order (None: the world)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return (0,)
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    hit = _RANKS.get(id(group))
    if hit is None or hit[0] is not group:  # holding the group keeps its id from being reused
        hit = _RANKS[id(group)] = (group, tuple(dist.get_process_group_ranks(group)))
    return hit[1]


def sum_over_node(values: list[float]) -> list[float]:
    """Each value summed over this node's ranks (an all-reduce within the node; every rank of
    the node must call it)."""
    top = current()
    if top.procs_per_node == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend(top.intra.pg) == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=top.intra.pg)
    return t.tolist()


def procs_per_node(override: int, world: int, env=os.environ) -> int:
    """G: `distributed.procs_per_node` if set, else the launcher's LOCAL_WORLD_SIZE, else the
    world (a single process, or a launcher that says nothing: one node)."""
    g = int(override or env.get("LOCAL_WORLD_SIZE") or world)
    if g < 1 or world % g:
        source = "distributed.procs_per_node" if override else "LOCAL_WORLD_SIZE"
        raise DistributedError(f"{source}={g} does not divide the world size {world}: nodes must have equal numbers "
                               f"of processes")
    return g


def build(override: int = 0) -> Topology:
    """The topology of the initialised default process group, with its groups; every rank
    must call it (group creation is collective). Becomes `current()`."""
    global _CURRENT
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        _CURRENT = Topology()
        return _CURRENT
    rank, world = dist.get_rank(), dist.get_world_size()
    g = procs_per_node(override, world)
    if not override and "GROUP_RANK" in os.environ and "LOCAL_RANK" in os.environ:
        # torchrun's node rank: a launcher numbering ranks otherwise would mix nodes in our groups.
        node, local = int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
        if rank != node * g + local:
            raise DistributedError(f"rank {rank} is local rank {local} on node {node} with {g} per node: ranks are "
                                   f"not numbered node by node (expected rank {node * g + local})")
    top = Topology(rank=rank, world=world, procs_per_node=g)
    every = tuple(range(world))
    if top.nodes == 1:
        top.intra, top.inter = Group(every), Group((rank,))
    elif g == 1:
        top.intra, top.inter = Group((rank,)), Group(every)
    else:
        for n in range(top.nodes):
            ranks = tuple(range(n * g, n * g + g))
            pg = dist.new_group(list(ranks))
            if n == top.node:
                top.intra = Group(ranks, pg)
        for lr in range(g):
            ranks = tuple(range(lr, world, g))
            pg = dist.new_group(list(ranks))
            if lr == top.local_rank:
                top.inter = Group(ranks, pg)
    _CURRENT = top
    return top
