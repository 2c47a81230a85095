"""The dispatch plan and combine math, with R ranks simulated in one process (pure)."""
import torch

from hpcmoe.dispatch import combine_tokens, group_by_slot, make_plan, split_rows
from hpcmoe.placement import one_per_rank, packed


def test_plan_counts_match_a_hand_count():
    placement = packed(4, 2)  # rank 0: experts 0, 1; rank 1: experts 2, 3
    expert_ids = torch.tensor([[3, 0], [1, 0], [2, 3]])
    plan = make_plan(expert_ids, placement)
    assert plan.slot_counts.tolist() == [2, 1, 1, 2]
    assert plan.rank_counts == [3, 3]
    # sorted by slot, ties in token order: (0,1) (1,1) -> e0; (1,0) -> e1; (2,0) -> e2; (0,0) (2,1) -> e3
    assert plan.order.tolist() == [1, 3, 2, 4, 0, 5]
    assert plan.source_token.tolist() == [0, 1, 1, 2, 0, 2]


def test_group_by_slot_regroups_source_major_rows_by_slot():
    counts = torch.tensor([[1, 2], [0, 1], [2, 0]])  # [sources, slots]
    # rows arrive as s0:(e0 e1 e1) s1:(e1) s2:(e0 e0) -> by slot: e0: 0, 4, 5; e1: 1, 2, 3
    assert group_by_slot(counts).tolist() == [0, 4, 5, 1, 2, 3]


def simulate(placement, tokens, expert_ids, weights):
    """Every rank's plan, the exchange as plain tensor moves, experts that scale by (e + 1)."""
    ranks = range(placement.num_ranks)
    plans = [make_plan(expert_ids[r], placement) for r in ranks]
    sent = [split_rows(tokens[r][plans[r].source_token], plans[r].rank_counts) for r in ranks]
    returned = [dict() for _ in ranks]
    for dest in ranks:
        slots = list(placement.slots_of_rank(dest))
        counts = torch.stack([plans[src].slot_counts[slots] for src in ranks])  # what counts exchange delivers
        rows = torch.cat([sent[src][dest] for src in ranks])
        order = group_by_slot(counts)
        scale = torch.cat([torch.full((int(c),), placement.slot_expert[s] + 1.0)
                           for s, c in zip(slots, counts.sum(0))]) if slots else torch.zeros(0)
        outputs = torch.empty_like(rows)
        outputs[order] = rows[order] * scale[:, None]
        for src, chunk in split_rows(outputs, counts.sum(1).tolist()).items():
            returned[src][dest] = chunk
    return [combine_tokens(plans[r], torch.cat([returned[r][d] for d in ranks]), weights[r]) for r in ranks]


def test_dispatch_and_combine_round_trip_equals_direct_computation():
    generator = torch.Generator().manual_seed(0)
    for placement in (one_per_rank(4, 4), packed(4, 2), packed(6, 4), packed(8, 4, experts_per_rank=3)):
        ranks, experts = placement.num_ranks, placement.num_experts
        sizes = [5, 0, 3, 7][:ranks]  # one rank has no tokens at all
        tokens = [torch.randn(n, 8, generator=generator) for n in sizes]
        expert_ids = [torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(n)])
                      if n else torch.zeros(0, 2, dtype=torch.int64) for n in sizes]
        weights = [torch.rand(n, 2, generator=generator) for n in sizes]
        results = simulate(placement, tokens, expert_ids, weights)
        for r in range(ranks):
            scale = (expert_ids[r] + 1.0) * weights[r]
            expected = tokens[r] * scale.sum(1, keepdim=True)
            torch.testing.assert_close(results[r], expected, rtol=1e-6, atol=1e-6)
