"""Pure expert -> rank maps (no torch, no MPI).

A placement lists *physical slots*: slot p hosts logical expert `slot_expert[p]` on rank
`slot_rank[p]`, with `slot_rank` non-decreasing so that a rank's slots are contiguous and
sorting tokens by slot also groups them by destination rank (EPLB's phy2log / log2phy).
With tensor parallelism inside experts (`tp` > 1) a slot lives on a group of `tp` consecutive
ranks, each holding 1/tp of the expert; `slot_rank` then names the group's first rank (its leader).

How tokens then cross nodes, and the topology-aware placement that reads it, are in traffic.py.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass


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


def placement_of(table, places: int, tp: int = 1) -> Placement:
    """A /placement (or /placement_history) table [expert, replica] of ranks (-1 pads) -> the
    Placement over expert groups (ranks without expert_tp)."""
    pairs = sorted(
        (int(rank) // tp, expert) for expert, ranks in enumerate(table) for rank in ranks if rank >= 0
    )
    return Placement(tuple(e for _, e in pairs), tuple(p for p, _ in pairs), places, "table")


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
