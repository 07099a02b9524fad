"""Expert-parallel placements: which logical expert each physical slot of each GPU holds, per MoE layer.

A placement of E logical experts onto G GPUs with S = E + R slots (R redundant) is `physical_to_logical`
[L, S]: slot s lives on GPU s // (S / G), and GPU g on node g // (G / N). Three policies, each a pure
function of a load matrix w [L, E] (tokens routed to each expert):

  static   slot s holds expert s mod E: contiguous sharding, the first R experts doubled (the layout an
           engine starts from, e.g. vLLM before rebalancing).
  greedy   the R most loaded experts get one more replica each; then every physical expert, heaviest first
           (a replica carries load / replicas), goes to the least loaded GPU that still has a free slot.
  eplb     DeepSeek's EPLB, written from its published description (github.com/deepseek-ai/EPLB, README):
           hierarchical when the node count divides the group count — pack expert groups (contiguous
           blocks of E / groups experts) onto nodes evenly by load; within each node give each redundant
           slot to the expert with the largest load per replica; pack the node's physical experts onto its
           GPUs, heaviest first, each to the least loaded GPU with room — else the same with one group and
           one node (the global policy). Same interface as `eplb.rebalance_experts`: `rebalance_experts`.

Ties are broken the same way everywhere: heavier first, then the lower index; the least loaded pack, then
the lower pack index. When a pack takes exactly one item, items keep their order (nothing to balance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.errors import MoescopeError

POLICIES = ("static", "greedy", "eplb")


@dataclass(frozen=True)
class PlacementOptions:
    """The cluster a placement is for: G GPUs on N nodes, R redundant slots per layer, expert groups."""

    n_experts: int
    n_gpus: int
    n_nodes: int = 1
    n_redundant: int = 0
    n_groups: int | None = None  # None: one group per node when that divides E, else one group

    def __post_init__(self) -> None:
        E, G, N, R = self.n_experts, self.n_gpus, self.n_nodes, self.n_redundant
        if G < 1 or N < 1:
            raise MoescopeError(f"--gpus and --nodes must be positive, got {G} and {N}")
        if G % N:
            raise MoescopeError(f"--gpus {G} is not a multiple of --nodes {N}: every node needs as many GPUs")
        if R < 0:
            raise MoescopeError(f"--redundant must be 0 or more, got {R}")
        if R > E:
            raise MoescopeError(f"--redundant {R} exceeds the {E} experts: at most one redundant slot per expert")
        if (E + R) % G:
            raise MoescopeError(f"--gpus {G} does not divide the {E + R} expert slots ({E} experts + {R} redundant); "
                                f"choose --redundant so that {E} + R is a multiple of {G}")
        if self.n_groups is not None and (self.n_groups < 1 or E % self.n_groups):
            raise MoescopeError(f"--groups {self.n_groups} does not divide the {E} experts")

    @classmethod
    def default_for(cls, n_experts: int) -> PlacementOptions:
        """What `moescope analyze` uses: the most GPUs of 8, 4, 2, 1 that divide E and get at least two experts
        each (else one GPU), one redundant slot per GPU, two nodes from four GPUs up."""
        gpus = next((g for g in (8, 4, 2) if n_experts % g == 0 and 2 * g <= n_experts), 1)
        return cls(n_experts, gpus, 2 if gpus >= 4 else 1, gpus)

    @property
    def n_slots(self) -> int:
        return self.n_experts + self.n_redundant

    @property
    def groups(self) -> int:
        if self.n_groups is not None:
            return self.n_groups
        return self.n_nodes if self.n_experts % self.n_nodes == 0 else 1

    @property
    def hierarchical(self) -> bool:
        """EPLB packs groups onto nodes only when the node count divides the group count."""
        return self.groups % self.n_nodes == 0


@dataclass(frozen=True, eq=False)
class Placement:
    policy: str
    physical_to_logical: np.ndarray  # int64 [L, S]
    n_experts: int
    n_gpus: int
    n_nodes: int

    @property
    def slots_per_gpu(self) -> int:
        return self.physical_to_logical.shape[1] // self.n_gpus

    @property
    def gpu_of_slot(self) -> np.ndarray:
        """int64 [S]."""
        return np.arange(self.physical_to_logical.shape[1]) // self.slots_per_gpu

    @property
    def node_of_gpu(self) -> np.ndarray:
        """int64 [G]."""
        return np.arange(self.n_gpus) // (self.n_gpus // self.n_nodes)

    def replica_count(self) -> np.ndarray:
        """int64 [L, E]: physical copies of each logical expert (the `expert_count` of EPLB)."""
        L, S = self.physical_to_logical.shape
        flat = self.physical_to_logical + (np.arange(L) * self.n_experts)[:, None]
        return np.bincount(flat.ravel(), minlength=L * self.n_experts).reshape(L, self.n_experts)

    def logical_to_physical(self) -> np.ndarray:
        """int64 [L, E, X]: the slots holding each expert, in slot order, padded with -1 (X = most replicas)."""
        L, S = self.physical_to_logical.shape
        count = self.replica_count()
        X = int(count.max(initial=1))
        order = np.argsort(self.physical_to_logical, axis=1, kind="stable")  # [L, S] slots grouped by expert
        expert = np.take_along_axis(self.physical_to_logical, order, axis=1)
        first = np.cumsum(count, axis=1) - count  # [L, E] where each expert's run starts
        rank = np.arange(S)[None, :] - np.take_along_axis(first, expert, axis=1)  # replica index of each slot
        out = np.full((L, self.n_experts, X), -1, np.int64)
        out[np.arange(L)[:, None], expert, rank] = order
        return out


def static_placement(load: np.ndarray, options: PlacementOptions) -> Placement:
    L = load.shape[0]
    p2l = np.tile(np.arange(options.n_slots) % options.n_experts, (L, 1))
    return Placement("static", p2l, options.n_experts, options.n_gpus, options.n_nodes)


def greedy_placement(load: np.ndarray, options: PlacementOptions) -> Placement:
    w = np.asarray(load, np.float64)  # [L, E]
    L, E = w.shape
    R = options.n_redundant
    hottest = _descending(w)[:, :R]  # [L, R]
    experts = np.concatenate([np.tile(np.arange(E), (L, 1)), hottest], axis=1)  # [L, S] physical list
    count = np.ones((L, E), np.int64)
    np.add.at(count, (np.arange(L)[:, None], hottest), 1)
    share = np.take_along_axis(w / count, experts, axis=1)  # [L, S] load each replica carries
    pack, rank = balanced_packing(share, options.n_gpus)
    slot = pack * (options.n_slots // options.n_gpus) + rank
    return Placement("greedy", _scatter(experts, slot), E, options.n_gpus, options.n_nodes)


def eplb_placement(load: np.ndarray, options: PlacementOptions) -> Placement:
    p2l, _, _ = rebalance_experts(load, options.n_slots, options.groups, options.n_nodes, options.n_gpus)
    return Placement("eplb", p2l, options.n_experts, options.n_gpus, options.n_nodes)


PLACEMENTS = {"static": static_placement, "greedy": greedy_placement, "eplb": eplb_placement}


def place(policy: str, load: np.ndarray, options: PlacementOptions) -> Placement:
    return PLACEMENTS[policy](load, options)


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """EPLB's interface: (physical_to_logical [L, R], logical_to_physical [L, E, X] -1 padded, expert_count [L, E]).

    Hierarchical when `num_groups % num_nodes == 0`, else the global policy (one group, one node).
    """
    w = np.asarray(weight, np.float64)
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    p2l = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    placement = Placement("eplb", p2l, w.shape[1], num_gpus, num_nodes)
    return p2l, placement.logical_to_physical(), placement.replica_count()


def _hierarchical(w: np.ndarray, S: int, groups: int, nodes: int, gpus: int) -> np.ndarray:
    L, E = w.shape
    size, per_node = E // groups, E // nodes  # experts per group, logical experts per node
    # 1. groups -> nodes, evenly by load
    node, rank = balanced_packing(w.reshape(L, groups, size).sum(axis=2), nodes)  # [L, groups]
    local_group = node * (groups // nodes) + rank  # group's position in node-major order
    # node-major order of the logical experts: node by node, groups in packing order, experts by id
    position = (local_group[:, :, None] * size + np.arange(size)).reshape(L, E)  # [L, E] expert -> position
    by_position = np.argsort(position, axis=1)  # [L, E] position -> expert
    w_local = np.take_along_axis(w, by_position, axis=1).reshape(L * nodes, per_node)  # [L*N, E/N]
    # 2. redundant slots within each node, each to the expert with the most load per replica
    local_experts, count = replicate(w_local, S // nodes)  # [L*N, S/N], [L*N, E/N]
    share = np.take_along_axis(w_local / count, local_experts, axis=1)
    # 3. the node's physical experts -> its GPUs
    pack, slot_rank = balanced_packing(share, gpus // nodes)
    slot = pack * (S // gpus) + slot_rank  # [L*N, S/N] slot within the node
    local = _scatter(local_experts, slot).reshape(L, nodes, S // nodes)
    experts_at = local + (np.arange(nodes) * per_node)[None, :, None]  # node-major position
    return np.take_along_axis(by_position, experts_at.reshape(L, S), axis=1)


def replicate(w: np.ndarray, n_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """(experts int64 [X, n_physical], count int64 [X, E]): every expert once, then each extra replica to the
    expert with the largest load per replica (lower id on ties), appended in the order they are made."""
    X, E = w.shape
    experts = np.empty((X, n_physical), np.int64)
    experts[:, :E] = np.arange(E)
    count = np.ones((X, E), np.int64)
    rows = np.arange(X)
    for i in range(E, n_physical):  # one step per redundant slot, all rows at once
        chosen = np.argmax(w / count, axis=1)  # first maximum: the lower id on ties
        experts[:, i] = chosen
        count[rows, chosen] += 1
    return experts, count


def balanced_packing(w: np.ndarray, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """(pack int64 [X, n], rank int64 [X, n]): n items per row into n_packs packs of n / n_packs items each;
    items heaviest first (lower index on ties), each to the least loaded pack with room (lower pack on ties);
    rank = order of arrival in its pack."""
    X, n = w.shape
    per_pack = n // n_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), np.int64)
    order = _descending(w)  # [X, n]
    pack = np.empty((X, n), np.int64)
    rank = np.empty((X, n), np.int64)
    pack_load = np.zeros((X, n_packs))
    filled = np.zeros((X, n_packs), np.int64)
    rows = np.arange(X)
    for i in range(n):  # one step per item, all rows at once
        item = order[:, i]
        chosen = np.argmin(np.where(filled < per_pack, pack_load, np.inf), axis=1)
        pack[rows, item] = chosen
        rank[rows, item] = filled[rows, chosen]
        pack_load[rows, chosen] += w[rows, item]
        filled[rows, chosen] += 1
    return pack, rank


def _descending(w: np.ndarray) -> np.ndarray:
    """int64 [X, n]: indices by value descending, the lower index first on ties."""
    return np.argsort(-w, axis=1, kind="stable")


def _scatter(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """out[x, positions[x, i]] = values[x, i] (positions a permutation per row)."""
    out = np.empty_like(values)
    np.put_along_axis(out, positions, values, axis=1)
    return out
