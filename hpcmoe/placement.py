"""Pure expert -> rank maps (no torch, no MPI).

A placement lists *physical slots*: slot p hosts logical expert `slot_expert[p]` on rank
`slot_rank[p]`, with `slot_rank` non-decreasing so that a rank's slots are contiguous and
sorting tokens by slot also groups them by destination rank (EPLB's phy2log / log2phy).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """slot_expert: [slots], logical expert per slot; slot_rank: [slots], its rank (sorted)."""
    slot_expert: tuple[int, ...]
    slot_rank: tuple[int, ...]
    num_ranks: int
    mode: str

    def __post_init__(self):
        assert len(self.slot_expert) == len(self.slot_rank)
        assert list(self.slot_rank) == sorted(self.slot_rank), "slots must be grouped by rank"
        assert all(0 <= r < self.num_ranks for r in self.slot_rank)

    @property
    def num_experts(self) -> int:
        return max(self.slot_expert) + 1

    def slots_of_rank(self, rank: int) -> range:
        """The contiguous physical slots that `rank` hosts (possibly empty)."""
        first = next((p for p, r in enumerate(self.slot_rank) if r >= rank), len(self.slot_rank))
        last = next((p for p, r in enumerate(self.slot_rank) if r > rank), len(self.slot_rank))
        return range(first, last)

    def experts_of_rank(self, rank: int) -> list[int]:
        return [self.slot_expert[p] for p in self.slots_of_rank(rank)]

    def expert_slots(self) -> list[list[int]]:
        """log2phy: [experts][replicas] physical slots of each logical expert."""
        slots: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.slot_expert):
            slots[e].append(p)
        return slots

    def expert_ranks(self) -> list[list[int]]:
        """[experts][replicas] ranks that host each logical expert."""
        return [[self.slot_rank[p] for p in slots] for slots in self.expert_slots()]


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
        ranks = [r for r in range(num_ranks)
                 for _ in range(r * num_experts // num_ranks, (r + 1) * num_experts // num_ranks)]
    else:
        needed = -(-num_experts // experts_per_rank)
        if needed > num_ranks:
            raise ValueError(f"packed placement with experts_per_rank ({experts_per_rank}) needs "
                             f"ceil(num_experts ({num_experts}) / {experts_per_rank}) = {needed} ranks, "
                             f"have {num_ranks}")
        ranks = [e // experts_per_rank for e in range(num_experts)]
    return Placement(tuple(range(num_experts)), tuple(ranks), num_ranks, "packed")
