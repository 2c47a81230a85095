"""Token dispatch and combine for one MoE layer (Megatron's pre / comm / post split).

Pure math first (plan, grouping, combine weighting: testable without MPI), then the two
exchanges: counts (one small message per peer, so each side knows every size) and payloads
(one message per (source, destination) pair with tokens, grouped by destination expert).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from mpi4py import MPI

from hpcmoe.comm import Exchange, post_exchange
from hpcmoe.placement import Placement


@dataclass(frozen=True)
class DispatchPlan:
    """How this rank's token slots (token, k-th choice) travel to physical expert slots."""
    order: torch.Tensor         # [n*k] slot permutation: sorted by physical slot, so by destination rank
    source_token: torch.Tensor  # [n*k] token row of each sorted slot
    slot_counts: torch.Tensor   # [slots] int64, token slots sent to each physical slot
    rank_counts: list[int]      # [ranks] token slots sent to each rank (rows of its message)


def make_plan(expert_ids: torch.Tensor, placement: Placement) -> DispatchPlan:
    """expert_ids: [n, k] logical experts per token -> the plan (one slot per expert for now)."""
    expert_slots = placement.expert_slots()
    assert all(len(s) == 1 for s in expert_slots), "replicas need a replica choice rule"
    expert_to_slot = torch.tensor([s[0] for s in expert_slots], dtype=torch.int64)
    slots = expert_to_slot[expert_ids.flatten()]
    order = torch.argsort(slots, stable=True)
    slot_counts = torch.bincount(slots, minlength=len(placement.slot_rank))
    rank_counts = [int(slot_counts[list(placement.slots_of_rank(r))].sum()) for r in range(placement.num_ranks)]
    return DispatchPlan(order, order // expert_ids.shape[1], slot_counts, rank_counts)


def group_by_slot(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts: [sources, my_slots] -> [m] permutation of the received rows (concatenated in
    source order, each source's rows grouped by slot) that groups them by slot instead."""
    starts = torch.cumsum(recv_counts.flatten(), 0).view(recv_counts.shape) - recv_counts
    pieces = [torch.arange(int(starts[s, j]), int(starts[s, j] + recv_counts[s, j]))
              for j in range(recv_counts.shape[1]) for s in range(recv_counts.shape[0])]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


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


# ---------------------------------------------------------------- the exchanges

def post_counts(comm: MPI.Comm, plan: DispatchPlan, placement: Placement, tag: int) -> Exchange:
    """Send each peer how many token slots go to each of its expert slots; receive the same."""
    ranks, me = range(comm.Get_size()), comm.Get_rank()
    mine = placement.slots_of_rank(me)
    send = {r: plan.slot_counts[list(placement.slots_of_rank(r))].clone() for r in ranks}
    recv = {r: torch.zeros(len(mine), dtype=torch.int64) for r in ranks}
    return post_exchange(comm, send, recv, tag)


def received_counts(exchange_result: dict[int, torch.Tensor]) -> torch.Tensor:
    """{source: [my_slots]} -> [sources, my_slots] (a rank hosting no slot gets [sources, 0])."""
    return torch.stack([exchange_result[r] for r in sorted(exchange_result)])


def post_dispatch(comm: MPI.Comm, tokens_sorted: torch.Tensor, plan: DispatchPlan,
                  recv_counts: torch.Tensor, tag: int) -> Exchange:
    """tokens_sorted: [n*k, H] rows in plan order -> received rows per source."""
    hidden = tokens_sorted.shape[1]
    recv = {r: tokens_sorted.new_empty(int(c), hidden) for r, c in enumerate(recv_counts.sum(1))}
    return post_exchange(comm, split_rows(tokens_sorted, plan.rank_counts), recv, tag)


def post_combine(comm: MPI.Comm, outputs: dict[int, torch.Tensor], plan: DispatchPlan, tag: int) -> Exchange:
    """outputs: {source: expert outputs for its rows} -> this rank's rows back, in plan order."""
    hidden = next(iter(outputs.values())).shape[1]
    dtype = next(iter(outputs.values())).dtype
    recv = {r: torch.empty(c, hidden, dtype=dtype) for r, c in enumerate(plan.rank_counts)}
    return post_exchange(comm, outputs, recv, tag)
