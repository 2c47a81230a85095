"""Pure expert -> rank maps (no torch, no MPI).

A placement lists *physical slots*: slot p hosts logical expert `slot_expert[p]` on rank
`slot_rank[p]`, with `slot_rank` non-decreasing so that a rank's slots are contiguous and
sorting tokens by slot also groups them by destination rank (EPLB's phy2log / log2phy).
With tensor parallelism inside experts (`tp` > 1) a slot lives on a group of `tp` consecutive
ranks, each holding 1/tp of the expert; `slot_rank` then names the group's first rank (its leader).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """slot_expert: [slots], logical expert per slot; slot_rank: [slots], its rank (sorted)."""

    slot_expert: tuple[int, ...]
    slot_rank: tuple[int, ...]
    num_ranks: int
    mode: str
    tp: int = 1  # ranks per expert group; slot_rank holds each group's leader

    def __post_init__(self):
        assert len(self.slot_expert) == len(self.slot_rank)
        assert list(self.slot_rank) == sorted(self.slot_rank), "slots must be grouped by rank"
        assert all(0 <= r < self.num_ranks and r % self.tp == 0 for r in self.slot_rank)

    def leader(self, rank: int) -> int:
        """The first rank of `rank`'s expert group (the rank itself without tensor parallelism)."""
        return rank - rank % self.tp

    def grouped(self) -> "Placement":
        """This placement over its expert groups: one place per group (the inverse of on_groups)."""
        return Placement(
            self.slot_expert,
            tuple(r // self.tp for r in self.slot_rank),
            self.num_ranks // self.tp,
            self.mode,
        )

    def on_groups(self, tp: int) -> "Placement":
        """This placement over num_ranks expert groups, spread over num_ranks x tp ranks."""
        return Placement(
            self.slot_expert, tuple(r * tp for r in self.slot_rank), self.num_ranks * tp, self.mode, tp
        )

    @property
    def num_experts(self) -> int:
        return max(self.slot_expert) + 1

    def slots_of_rank(self, rank: int) -> range:
        """The contiguous physical slots that `rank` hosts (possibly empty)."""
        return range(bisect.bisect_left(self.slot_rank, rank), bisect.bisect_right(self.slot_rank, rank))

    def experts_of_rank(self, rank: int) -> list[int]:
        """The experts `rank` computes (with tensor parallelism: its share of its group's experts)."""
        return [self.slot_expert[p] for p in self.slots_of_rank(self.leader(rank))]

    def expert_slots(self) -> list[list[int]]:
        """log2phy: [experts][replicas] physical slots of each logical expert."""
        slots: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.slot_expert):
            slots[e].append(p)
        return slots

    def expert_ranks(self) -> list[list[int]]:
        """[experts][replicas] ranks that host each logical expert."""
        return [[self.slot_rank[p] for p in slots] for slots in self.expert_slots()]


def on_survivors(
    placement: Placement, kept: list[int], hosts: list[int], capacity: int
) -> tuple[Placement, list[int]]:
    """The placement after ranks died. kept: [survivors] their ranks in `placement`, ascending, the
    new rank i being kept[i]; hosts: the new ranks that may hold experts. Each survivor keeps its
    slots (an expert with a surviving replica is served by it); an expert that lost every replica
    goes to the host with the fewest slots that has fewer than `capacity`.
    -> (placement over len(kept) ranks, the experts placed anew). Raises naming an expert without room."""
    assert placement.tp == 1, "expert groups are placed afresh"
    new = {r: i for i, r in enumerate(kept)}
    pairs = [(new[r], e) for e, r in zip(placement.slot_expert, placement.slot_rank) if r in new]
    lost = sorted(set(placement.slot_expert) - {e for _, e in pairs})
    slots = [sum(r == h for r, _ in pairs) for h in range(len(kept))]
    for e in lost:
        room = [h for h in hosts if slots[h] < capacity]
        if not room:
            dead = sorted(
                r for r in set(placement.slot_rank) if r not in new and e in placement.experts_of_rank(r)
            )
            raise ValueError(
                f"expert {e} lost every replica (rank(s) {', '.join(map(str, dead))}) and no survivor has "
                f"room for it ({capacity} expert slots each, run.rebuild_slots more than the placement's)"
            )
        host = min(room, key=lambda h: (slots[h], h))
        pairs.append((host, e))
        slots[host] += 1
    pairs.sort(key=lambda pair: pair[0])  # stable: a rank's kept slots first, in their order
    return Placement(tuple(e for _, e in pairs), tuple(r for r, _ in pairs), len(kept), placement.mode), lost


def one_per_rank(num_experts: int, num_ranks: int) -> Placement:
    """Expert e on rank e; needs num_experts == num_ranks."""
    if num_experts != num_ranks:
        raise ValueError(f"one_per_rank placement needs num_experts ({num_experts}) == ranks ({num_ranks})")
    return Placement(tuple(range(num_experts)), tuple(range(num_ranks)), num_ranks, "one_per_rank")


def packed(num_experts: int, num_ranks: int, experts_per_rank: int | None = None) -> Placement:
    """Contiguous blocks of experts per rank: the papers' several-experts-per-GPU baseline.

    experts_per_rank=None spreads experts as evenly as possible (block sizes differ by at most
    one); experts_per_rank=k puts k experts on each of the first ceil(E/k) ranks.
    """
    if experts_per_rank is None:
        if num_experts < num_ranks:
            raise ValueError(f"packed placement needs num_experts ({num_experts}) >= ranks ({num_ranks})")
        ranks = [
            r
            for r in range(num_ranks)
            for _ in range(r * num_experts // num_ranks, (r + 1) * num_experts // num_ranks)
        ]
    else:
        needed = -(-num_experts // experts_per_rank)
        if needed > num_ranks:
            raise ValueError(
                f"packed placement with experts_per_rank ({experts_per_rank}) needs "
                f"ceil(num_experts ({num_experts}) / {experts_per_rank}) = {needed} ranks, "
                f"have {num_ranks}"
            )
        ranks = [e // experts_per_rank for e in range(num_experts)]
    return Placement(tuple(range(num_experts)), tuple(ranks), num_ranks, "packed")


def _num_nodes(tokens_from_node: list[list[float]], node_of_rank: list[int]) -> int:
    """Nodes in node_of_rank, checked against tokens_from_node: [nodes][experts]."""
    nodes = max(node_of_rank) + 1
    missing = sorted(set(range(nodes)) - set(node_of_rank))
    if missing:
        raise ValueError(f"node_of_rank names {nodes} nodes but nodes {missing} have no rank")
    if len(tokens_from_node) != nodes:
        raise ValueError(
            f"tokens_from_node has {len(tokens_from_node)} rows, node_of_rank names {nodes} nodes"
        )
    return nodes


def placement_of(table, places: int, tp: int = 1) -> Placement:
    """A /placement (or /placement_history) table [expert, replica] of ranks (-1 pads) -> the
    Placement over expert groups (ranks without expert_tp)."""
    pairs = sorted(
        (int(rank) // tp, expert) for expert, ranks in enumerate(table) for rank in ranks if rank >= 0
    )
    return Placement(tuple(e for _, e in pairs), tuple(p for p, _ in pairs), places, "table")


def _split_tokens(placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]):
    """Yield (src_node, expert, dst_rank, tokens): a node's tokens for e split evenly over its candidates."""
    if len(node_of_rank) != placement.num_ranks:
        raise ValueError(
            f"node_of_rank has {len(node_of_rank)} entries, placement has {placement.num_ranks} ranks"
        )
    expert_ranks = placement.expert_ranks()
    for a in range(_num_nodes(tokens_from_node, node_of_rank)):
        for e, tokens in enumerate(tokens_from_node[a]):
            ranks = expert_ranks[e] if e < len(expert_ranks) else []
            if tokens and not ranks:
                raise ValueError(f"node {a} sends {tokens} tokens to expert {e}, which has no replica")
            candidates = replica_split(ranks, node_of_rank.index(a), node_of_rank) if ranks else []
            for rank in candidates:
                yield a, e, rank, tokens / len(candidates)


def _replica_counts(num_experts: int, num_ranks: int, slots: int, load: list[float]) -> list[int]:
    """[experts] replicas: one each, then extra slots to the highest load per replica (<= ranks each)."""
    counts = [1] * num_experts
    open_ = [(-load[e], e) for e in range(num_experts) if num_ranks > 1]  # (-load per replica, e): a heap
    heapq.heapify(open_)
    for _ in range(slots - num_experts):
        assert open_, "slots_per_rank <= num_experts leaves room for every slot"
        _, e = heapq.heappop(open_)
        counts[e] += 1
        if counts[e] < num_ranks:
            heapq.heappush(open_, (-load[e] / counts[e], e))
    return counts


def _assign_replicas(counts: list[int], load: list[float], num_ranks: int, slots_per_rank: int):
    """[ranks][experts] hosted: replicas by decreasing load per replica to the least loaded rank
    (a heap of the ranks with room: O(slots log ranks))."""
    hosted: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    room = [(0.0, r) for r in range(num_ranks)]  # (load, rank) of every rank with room: a heap
    order = sorted(range(len(counts)), key=lambda e: (-load[e] / counts[e], e))
    for e in order:
        share = load[e] / counts[e]
        for _ in range(counts[e]):
            r = _least_loaded_without(room, hosted, e)
            if r is None:  # every rank with room holds e: move some f off a full rank onto one
                r = _make_room(hosted, rank_load, counts, load, e, min(room))
                room = [
                    (rank_load[q], q) for q in range(num_ranks) if len(hosted[q]) < slots_per_rank and q != r
                ]
                heapq.heapify(room)
            hosted[r].append(e)
            rank_load[r] += share
            if len(hosted[r]) < slots_per_rank:
                heapq.heappush(room, (rank_load[r], r))
    return hosted


def _least_loaded_without(room: list, hosted: list[list[int]], e: int):
    """Pop the least loaded rank of the heap `room` that does not hold e (None when each holds it);
    the ranks passed over go back."""
    passed, found = [], None
    while room and found is None:
        entry = heapq.heappop(room)
        if e in hosted[entry[1]]:
            passed.append(entry)
        else:
            found = entry[1]
    for entry in passed:
        heapq.heappush(room, entry)
    return found


def _make_room(hosted, rank_load, counts, load, e: int, least: tuple) -> int:
    """Every rank with room holds e: move an expert f from the first rank q without e onto the least
    loaded rank with room -> q, which now has room for e."""
    r = least[1]
    q = next(q for q in range(len(hosted)) if e not in hosted[q])
    f = next(f for f in sorted(hosted[q]) if f not in hosted[r])
    hosted[q].remove(f)
    hosted[r].append(f)
    rank_load[q] -= load[f] / counts[f]
    rank_load[r] += load[f] / counts[f]
    return q


def _column_max(column: np.ndarray, b: int) -> float:
    """Largest link into node b: max of column over source rows other than b."""
    return float(max((v for a, v in enumerate(column) if a != b), default=0.0))


def _improve(traffic: np.ndarray, node_of_expert: list[int], free: list[int], passes: int = 20) -> None:
    """Local search on node_of_expert: [experts] and free: [nodes], given traffic: [nodes][experts]."""
    nodes, experts = len(free), len(node_of_expert)
    links = np.zeros((nodes, nodes))
    for e, b in enumerate(node_of_expert):
        links[:, b] += traffic[:, e]
    col_max = [_column_max(links[:, b], b) for b in range(nodes)]

    def try_change(changes: dict[int, int]) -> bool:  # changes: {expert: new node}
        new = links.copy()
        for e, b in changes.items():
            new[:, node_of_expert[e]] -= traffic[:, e]
            new[:, b] += traffic[:, e]
        touched = {node_of_expert[e] for e in changes} | set(changes.values())
        new_max = {b: _column_max(new[:, b], b) for b in touched}
        best = max(new_max.values())
        rest = max((col_max[b] for b in range(nodes) if b not in touched), default=0.0)
        if max(best, rest) >= max(col_max):
            return False
        links[:] = new
        for b, v in new_max.items():
            col_max[b] = v
        for e, b in changes.items():
            free[node_of_expert[e]] += 1
            free[b] -= 1
            node_of_expert[e] = b
        return True

    for _ in range(passes):
        improved = False
        for e in range(experts):
            for f in range(e + 1, experts):
                if node_of_expert[e] != node_of_expert[f]:
                    improved |= try_change({e: node_of_expert[f], f: node_of_expert[e]})
            for b in range(nodes):
                if b != node_of_expert[e] and free[b] > 0:
                    improved |= try_change({e: b})
        if not improved:
            return


def replica_split(expert_ranks_of_e: list[int], source_rank: int, node_of_rank: list[int]) -> list[int]:
    """Candidate ranks for a source's tokens to expert e: its replicas on the source's node, else all."""
    here = node_of_rank[source_rank]
    local = [r for r in expert_ranks_of_e if node_of_rank[r] == here]
    return local or list(expert_ranks_of_e)


def replicated(
    num_experts: int, num_ranks: int, slots_per_rank: int, load: list[float] | None = None
) -> Placement:
    """EPLB-style: extra slots replicate the hottest experts, replicas balanced over ranks.

    load: [experts] expected tokens per expert (None = uniform). Every rank gets exactly
    slots_per_rank slots, and no rank holds two replicas of one expert.
    """
    slots = slots_per_rank * num_ranks
    if slots < num_experts:
        raise ValueError(
            f"replicated placement needs slots_per_rank ({slots_per_rank}) x ranks ({num_ranks}) "
            f">= num_experts ({num_experts})"
        )
    if slots_per_rank > num_experts:
        raise ValueError(
            f"replicated placement needs slots_per_rank ({slots_per_rank}) <= num_experts "
            f"({num_experts}): a rank holds each expert at most once"
        )
    load = [1.0] * num_experts if load is None else [float(x) for x in load]
    if len(load) != num_experts:
        raise ValueError(f"load has {len(load)} entries, num_experts is {num_experts}")
    if any(x < 0 for x in load):
        raise ValueError(f"load must be >= 0, got {min(load)}")
    counts = _replica_counts(num_experts, num_ranks, slots, load)
    hosted = _assign_replicas(counts, load, num_ranks, slots_per_rank)
    pairs = [(r, e) for r in range(num_ranks) for e in sorted(hosted[r])]
    return Placement(tuple(e for _, e in pairs), tuple(r for r, _ in pairs), num_ranks, "replicated")


def round_robin(num_experts: int, num_ranks: int) -> Placement:
    """Expert e on rank e; ranks beyond num_experts host nothing; needs num_experts <= ranks."""
    if num_experts > num_ranks:
        raise ValueError(f"round_robin placement needs num_experts ({num_experts}) <= ranks ({num_ranks})")
    return Placement(tuple(range(num_experts)), tuple(range(num_experts)), num_ranks, "round_robin")


def link_loads(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> dict[tuple[int, int], float]:
    """{(src_node, dst_node): tokens crossing}, for every pair of distinct nodes.

    tokens_from_node: [nodes][experts], tokens each node sends to each expert; node_of_rank:
    [ranks]. A node's tokens for e split evenly over replica_split's candidates for e.
    """
    nodes = _num_nodes(tokens_from_node, node_of_rank)
    loads = {(a, b): 0.0 for a in range(nodes) for b in range(nodes) if a != b}
    for a, _, rank, tokens in _split_tokens(placement, tokens_from_node, node_of_rank):
        if node_of_rank[rank] != a:
            loads[(a, node_of_rank[rank])] += tokens
    return loads


def max_link_load(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> float:
    """Largest link_loads value (0.0 with a single node): the cost topology_aware minimises."""
    return max(link_loads(placement, tokens_from_node, node_of_rank).values(), default=0.0)


def expected_rank_load(
    placement: Placement, tokens_from_node: list[list[float]], node_of_rank: list[int]
) -> list[float]:
    """[ranks] expected tokens each rank's experts receive.

    tokens_from_node: [nodes][experts]. The dispatcher gives the i-th token of source rank s
    for expert e to candidate (i + s) % len(candidates), candidates = replica_split(...); in
    expectation that splits a source's tokens for e evenly over its candidates, as here.
    """
    out = [0.0] * placement.num_ranks
    for _, _, rank, tokens in _split_tokens(placement, tokens_from_node, node_of_rank):
        out[rank] += tokens
    return out


def rank_load_shares(placement: Placement, node_of_rank: list[int]) -> np.ndarray:
    """[nodes, experts, ranks] the share of a node's token slots for an expert that each rank
    receives: expected_rank_load is tokens_from_node contracted with it, for many steps at once.
    An expert without a replica has no share (it may receive no tokens)."""
    nodes, expert_ranks = max(node_of_rank) + 1, placement.expert_ranks()
    ones = [[1.0 if ranks else 0.0 for ranks in expert_ranks] for _ in range(nodes)]
    shares = np.zeros((nodes, len(expert_ranks), placement.num_ranks))
    for a, e, rank, share in _split_tokens(placement, ones, node_of_rank):
        shares[a, e, rank] += share
    return shares


def topology_aware(tokens_from_node: list[list[float]], node_of_rank: list[int]) -> Placement:
    """At most one expert per rank, experts on nodes chosen to minimise max_link_load.

    tokens_from_node: [nodes][experts]; node_of_rank: [ranks]. Greedy (hottest expert first,
    to the node with the lowest resulting max link load; ties: most free ranks, lowest node),
    then swaps and moves across nodes while max_link_load strictly drops (at most 20 passes).
    """
    nodes = _num_nodes(tokens_from_node, node_of_rank)
    traffic = np.asarray(tokens_from_node, dtype=float)
    experts, ranks = traffic.shape[1], len(node_of_rank)
    if experts > ranks:
        raise ValueError(f"topology_aware placement needs num_experts ({experts}) <= ranks ({ranks})")
    free = [node_of_rank.count(b) for b in range(nodes)]
    node_of_expert = [-1] * experts
    links = np.zeros((nodes, nodes))
    for e in sorted(range(experts), key=lambda e: (-traffic[:, e].sum(), e)):
        col_max = [_column_max(links[:, c], c) for c in range(nodes)]
        options = [
            (max([_column_max(links[:, b] + traffic[:, e], b)] + col_max[:b] + col_max[b + 1 :]), -free[b], b)
            for b in range(nodes)
            if free[b] > 0
        ]
        b = min(options)[2]
        node_of_expert[e], free[b] = b, free[b] - 1
        links[:, b] += traffic[:, e]
    _improve(traffic, node_of_expert, free)
    pairs = []
    for b in range(nodes):
        on_node = [r for r in range(ranks) if node_of_rank[r] == b]
        pairs += zip(on_node, [e for e in range(experts) if node_of_expert[e] == b])
    pairs.sort()
    return Placement(tuple(e for _, e in pairs), tuple(r for r, _ in pairs), ranks, "topology_aware")


def load_from_routing(routing: np.ndarray, node_of_rank: list[int]) -> tuple[list[list[float]], list[float]]:
    """(tokens_from_node [nodes][experts], load [experts]) from /routing [steps][layers][sources][experts].

    Sums over steps and MoE layers. Source rank r is on node node_of_rank[r]; if the run had a
    different number of source ranks S than len(node_of_rank), r goes to node r * nodes // S.
    """
    routing = np.asarray(routing)
    if routing.ndim != 4:
        raise ValueError(
            f"routing needs 4 axes [steps, moe_layers, source_ranks, experts], got {routing.ndim}"
        )
    per_source = routing.sum(axis=(0, 1)).astype(float)
    sources, nodes = per_source.shape[0], max(node_of_rank) + 1
    if sources == len(node_of_rank):
        node_of_source = list(node_of_rank)
    else:
        node_of_source = [r * nodes // sources for r in range(sources)]
    tokens = np.zeros((nodes, per_source.shape[1]))
    for r, node in enumerate(node_of_source):
        tokens[node] += per_source[r]
    return tokens.tolist(), per_source.sum(axis=0).tolist()
