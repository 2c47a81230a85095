"""Token dispatch and combine math for one MoE layer (Megatron's pre / comm / post split).

Pure functions on tensors, testable without MPI: the plan (which physical slot each (token,
choice) goes to, grouped by destination), deterministic replica choice, per-node groups and
packing for two-stage dispatch, combine weighting, bytes on inter-node links. The exchanges
that move these tensors are in moe_layer.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def apply_capacity(slots: torch.Tensor, capacity_factor: float, num_slots: int) -> torch.Tensor:
    """slots: [n, k] -> the same with choices beyond a slot's capacity set to -1 (dropped).

    Capacity per physical slot is ceil(capacity_factor * n * k / num_slots) for this source; earlier
    tokens keep their place (token order, then choice order). Dropped choices contribute nothing
    and the remaining weights are not renormalized: a lossy option, outside the equality contract."""
    capacity = -(-int(capacity_factor * slots.numel()) // num_slots)
    flat = slots.flatten().clone()
    seen = torch.zeros(num_slots, dtype=torch.int64)
    for i, slot in enumerate(flat.tolist()):
        if slot >= 0:
            seen[slot] += 1
            if seen[slot] > capacity:
                flat[i] = -1
    return flat.view(slots.shape)


def plan_from_slots(slots: torch.Tensor, placement: Placement) -> DispatchPlan:
    """slots: [n, k] physical slot per (token, choice), -1 where that choice is not sent -> the plan."""
    flat, total = slots.flatten(), len(placement.slot_rank)
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, total), stable=True)[: int(valid.sum())]
    slot_counts = torch.bincount(flat[valid], minlength=total)
    rank_counts = [int(slot_counts[list(placement.slots_of_rank(r))].sum()) for r in range(placement.num_ranks)]
    return DispatchPlan(order, order // max(slots.shape[1], 1), slot_counts, rank_counts, slots)


def make_plan(expert_ids: torch.Tensor, placement: Placement, source_rank: int = 0,
              node_of_rank: tuple[int, ...] | None = None) -> DispatchPlan:
    """expert_ids: [n, k] logical experts per token -> the flat plan for this source rank."""
    node_of_rank = node_of_rank or (0,) * placement.num_ranks
    return plan_from_slots(choose_slots(expert_ids, placement, source_rank, node_of_rank), placement)


def node_groups(slots: torch.Tensor, weights: torch.Tensor, placement: Placement, node_of_rank) -> list:
    """Per node: (tokens [t] with a choice there, their slots [t, k] (-1 elsewhere), weights [t, k] (0 elsewhere))."""
    slot_node = torch.tensor([node_of_rank[r] for r in placement.slot_rank], dtype=torch.int64)[slots]
    groups = []
    for node in range(max(node_of_rank) + 1):
        here = slot_node == node
        tokens = here.any(dim=1).nonzero(as_tuple=True)[0]
        groups.append((tokens, torch.where(here[tokens], slots[tokens], -1),
                       torch.where(here[tokens], weights[tokens], 0.0)))
    return groups


def pack_rows(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [t, H], slots [t, k] int64, weights [t, k] -> one uint8 message, row by row."""
    parts = [rows.contiguous(), slots.contiguous(), weights.float().contiguous()]
    return torch.cat([p.view(torch.uint8).view(len(rows), p.shape[1] * p.element_size()) for p in parts],
                     dim=1).flatten()


def unpack_rows(messages: list[torch.Tensor], hidden: int, dtype, k: int):
    """The inverse of pack_rows over several messages -> (rows [m, H], slots [m, k], weights [m, k])."""
    item = torch.empty(0, dtype=dtype).element_size()
    data = torch.cat(messages).view(-1, hidden * item + 12 * k)
    rows, slots, weights = data.split([hidden * item, 8 * k, 4 * k], dim=1)
    return (rows.contiguous().view(dtype), slots.contiguous().view(torch.int64),
            weights.contiguous().view(torch.float32))


def combine_tokens(plan: DispatchPlan, returned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """returned: [n*k, H] expert outputs in plan order; weights: [n, k] -> [n, H] in token order."""
    n, k = weights.shape
    if len(plan.order) == n * k:  # every choice was sent: a gather through the inverse permutation
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(n * k)
        by_slot = returned[inverse]
    else:  # choices not sent (-1) contribute zero
        by_slot = returned.new_zeros(n * k, returned.shape[1])
        by_slot[plan.order] = returned
    by_slot = by_slot.view(n, k, returned.shape[1])
    if by_slot.dtype != torch.float32:
        by_slot = by_slot.float()
    return torch.bmm(weights.float().unsqueeze(1), by_slot).squeeze(1).to(returned.dtype)


def split_rows(rows: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]:
    """rows: [sum(counts), H] -> {peer: [counts[peer], H]}."""
    return dict(enumerate(rows.split(counts)))


def internode_bytes(slots: torch.Tensor, placement: Placement, source_rank: int, node_of_rank,
                    row_bytes: int, two_stage: bool) -> int:
    """Bytes a source puts on inter-node links for one layer: flat sends every (token, choice) on
    another node; two-stage sends each token once per other node, with k slots and weights."""
    me, k = node_of_rank[source_rank], slots.shape[1]
    if not two_stage:
        return sum(row_bytes for s in slots.flatten().tolist() if s >= 0 and node_of_rank[placement.slot_rank[s]] != me)
    groups = node_groups(slots, torch.zeros(slots.shape), placement, node_of_rank)
    return sum(len(tokens) * (row_bytes + 12 * k) for node, (tokens, _, _) in enumerate(groups) if node != me)
