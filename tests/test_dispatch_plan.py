"""The dispatch plan and combine math, with R ranks simulated in one process (pure)."""
import torch

from hpcmoe.dispatch import choose_slots, combine_tokens, make_plan, split_rows
from hpcmoe.placement import Placement
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


def test_replica_choice_is_round_robin_from_the_source_rank_and_prefers_its_node():
    # expert 0 on ranks 0 and 2, expert 1 on rank 1, expert 2 on rank 3; nodes {0, 1} and {2, 3}
    placement = Placement((0, 1, 0, 2), (0, 1, 2, 3), 4, "replicated")
    ids = torch.tensor([[0], [0], [0], [1]])
    # one node: source 1 alternates between both replicas of expert 0, starting at (0 + 1) % 2
    assert choose_slots(ids, placement, 1, (0, 0, 0, 0)).flatten().tolist() == [2, 0, 2, 1]
    # two nodes: source 3 (node 1) only uses the replica on its node (slot 2, rank 2)
    assert choose_slots(ids, placement, 3, (0, 0, 1, 1)).flatten().tolist() == [2, 2, 2, 1]
    assert choose_slots(ids, placement, 0, (0, 0, 1, 1)).flatten().tolist() == [0, 0, 0, 1]


def simulate(placement, tokens, expert_ids, weights, node_of_rank):
    """Every rank's plan, the exchange as plain tensor moves, experts that scale by (e + 1);
    each destination handles each source's rows on their own, as the engine does."""
    ranks = range(placement.num_ranks)
    plans = [make_plan(expert_ids[r], placement, r, node_of_rank) for r in ranks]
    sent = [split_rows(tokens[r][plans[r].source_token], plans[r].rank_counts) for r in ranks]
    returned = [dict() for _ in ranks]
    for dest in ranks:
        slots = list(placement.slots_of_rank(dest))
        for src in ranks:
            counts = plans[src].slot_counts[slots].tolist()   # what the counts exchange delivers
            scale = torch.cat([torch.full((c,), placement.slot_expert[s] + 1.0) for s, c in zip(slots, counts)]
                              + [torch.zeros(0)])
            returned[src][dest] = sent[src][dest] * scale[:, None]
    return [combine_tokens(plans[r], torch.cat([returned[r][d] for d in ranks]), weights[r]) for r in ranks]


def test_dispatch_and_combine_round_trip_equals_direct_computation():
    generator = torch.Generator().manual_seed(0)
    replicated = Placement((0, 1, 0, 2, 3, 1), (0, 1, 2, 2, 3, 3), 4, "replicated")
    for placement, nodes in ((one_per_rank(4, 4), (0, 0, 0, 0)), (packed(4, 2), (0, 1)),
                             (packed(6, 4), (0, 0, 1, 1)), (packed(8, 4, experts_per_rank=3), (0, 0, 0, 0)),
                             (replicated, (0, 0, 1, 1)), (replicated, (0, 0, 0, 0))):
        ranks, experts = placement.num_ranks, placement.num_experts
        sizes = [5, 0, 3, 7][:ranks]  # one rank has no tokens at all
        tokens = [torch.randn(n, 8, generator=generator) for n in sizes]
        expert_ids = [torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(n)])
                      if n else torch.zeros(0, 2, dtype=torch.int64) for n in sizes]
        weights = [torch.rand(n, 2, generator=generator) for n in sizes]
        results = simulate(placement, tokens, expert_ids, weights, nodes)
        for r in range(ranks):
            scale = (expert_ids[r] + 1.0) * weights[r]
            expected = tokens[r] * scale.sum(1, keepdim=True)
            torch.testing.assert_close(results[r], expected, rtol=1e-6, atol=1e-6)
