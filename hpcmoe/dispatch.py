"""Token dispatch and combine for one MoE layer (Megatron's pre / comm / post split).

Pure math first (plan, replica choice, combine weighting, bytes on the wire: testable without
MPI), then the exchanges: counts (one small message per peer, so each side knows every size)
and payloads (one message per (source, destination) pair, tokens grouped by destination slot).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcmoe.comm import Link, Receives, Sender
from hpcmoe.placement import Placement, replica_split


@dataclass(frozen=True)
class DispatchPlan:
    """How this rank's token slots (token, k-th choice) travel to physical expert slots."""
    order: torch.Tensor         # [n*k] slot permutation: sorted by physical slot, so by destination rank
    source_token: torch.Tensor  # [n*k] token row of each sorted slot
    slot_counts: torch.Tensor   # [slots] int64, token slots sent to each physical slot
    rank_counts: list[int]      # [ranks] token slots sent to each rank (rows of its message)
    slots: torch.Tensor         # [n, k] physical slot chosen for each (token, choice)


def candidate_slots(placement: Placement, source_rank: int, node_of_rank: tuple[int, ...]) -> list[list[int]]:
    """[experts][candidates]: the replicas a source may use, those on its own node if any."""
    candidates = []
    for slots in placement.expert_slots():
        ranks = replica_split([placement.slot_rank[p] for p in slots], source_rank, list(node_of_rank))
        candidates.append([p for p in slots if placement.slot_rank[p] in ranks])
    return candidates


def choose_slots(expert_ids: torch.Tensor, placement: Placement, source_rank: int,
                 node_of_rank: tuple[int, ...]) -> torch.Tensor:
    """expert_ids: [n, k] -> [n, k] physical slots. The i-th token slot of this source for expert e
    goes to candidate (i + source_rank) % candidates: deterministic, the same on every rank."""
    flat = expert_ids.flatten()
    slots = torch.empty_like(flat)
    for e, candidates in enumerate(candidate_slots(placement, source_rank, node_of_rank)):
        where = (flat == e).nonzero(as_tuple=True)[0]
        if len(where):
            pick = (torch.arange(len(where)) + source_rank) % len(candidates)
            slots[where] = torch.tensor(candidates, dtype=torch.int64)[pick]
    return slots.view(expert_ids.shape)


def make_plan(expert_ids: torch.Tensor, placement: Placement, source_rank: int = 0,
              node_of_rank: tuple[int, ...] | None = None) -> DispatchPlan:
    """expert_ids: [n, k] logical experts per token -> the plan for this source rank."""
    node_of_rank = node_of_rank or (0,) * placement.num_ranks
    slots = choose_slots(expert_ids, placement, source_rank, node_of_rank)
    order = torch.argsort(slots.flatten(), stable=True)
    slot_counts = torch.bincount(slots.flatten(), minlength=len(placement.slot_rank))
    rank_counts = [int(slot_counts[list(placement.slots_of_rank(r))].sum()) for r in range(placement.num_ranks)]
    return DispatchPlan(order, order // expert_ids.shape[1], slot_counts, rank_counts, slots)


def combine_tokens(plan: DispatchPlan, returned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """returned: [n*k, H] expert outputs in plan order; weights: [n, k] -> [n, H] in token order."""
    n, k = weights.shape
    by_slot = torch.empty_like(returned)
    by_slot[plan.order] = returned
    mixed = (by_slot.view(n, k, returned.shape[1]).float() * weights[..., None]).sum(dim=1)
    return mixed.to(returned.dtype)


def split_rows(rows: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]:
    """rows: [sum(counts), H] -> {peer: [counts[peer], H]}."""
    return dict(enumerate(rows.split(counts)))


def internode_bytes(plan: DispatchPlan, placement: Placement, source_rank: int, node_of_rank, row_bytes: int) -> int:
    """Payload bytes this source's flat dispatch puts on inter-node links (each token slot travels)."""
    me = node_of_rank[source_rank]
    return sum(c * row_bytes for r, c in enumerate(plan.rank_counts) if node_of_rank[r] != me)


# ---------------------------------------------------------------- the flat exchanges

def post_counts(comm, sender: Sender, link: Link, plan: DispatchPlan, placement: Placement, tag: int) -> Receives:
    """Send each peer how many token slots go to each of its slots; receive the same from every peer."""
    ranks, me = range(comm.Get_size()), comm.Get_rank()
    mine = len(placement.slots_of_rank(me))
    receives = Receives(comm, {r: torch.zeros(mine, dtype=torch.int64) for r in ranks}, tag, link)
    for r in ranks:
        sender.send(r, plan.slot_counts[list(placement.slots_of_rank(r))].clone(), tag, receives)
    return receives


def post_dispatch(comm, sender: Sender, link: Link, tokens_sorted: torch.Tensor, plan: DispatchPlan,
                  recv_counts: dict[int, torch.Tensor], tag: int) -> Receives:
    """tokens_sorted: [n*k, H] rows in plan order -> their experts' ranks; receives every source's rows."""
    hidden = tokens_sorted.shape[1]
    receives = Receives(comm, {r: tokens_sorted.new_empty(int(c.sum()), hidden) for r, c in recv_counts.items()},
                        tag, link)
    for r, rows in split_rows(tokens_sorted, plan.rank_counts).items():
        sender.send(r, rows, tag, receives)
    return receives


def post_returns(comm, link: Link, plan: DispatchPlan, hidden: int, dtype, tag: int) -> Receives:
    """Receives for this rank's token slots coming back from every expert rank, in plan order."""
    return Receives(comm, {r: torch.empty(c, hidden, dtype=dtype) for r, c in enumerate(plan.rank_counts)}, tag, link)
