"""The dispatch plan and combine math, with R ranks simulated in one process (pure)."""

import torch

from hpcmoe.parallel.dispatch import (
    apply_capacity,
    choose_slots,
    combine_tokens,
    compile_placement,
    internode_bytes,
    make_plan,
    node_groups,
    pack_rows,
    unpack_rows,
)
from hpcmoe.parallel.placement import Placement, one_per_rank, packed


def tables_of(placement, source=0, nodes=None):
    return compile_placement(placement, source, nodes or (0,) * placement.num_ranks)


def test_plan_counts_match_a_hand_count():
    placement = packed(4, 2)  # rank 0: experts 0, 1; rank 1: experts 2, 3
    expert_ids = torch.tensor([[3, 0], [1, 0], [2, 3]])
    plan = make_plan(expert_ids, tables_of(placement))
    assert plan.slot_counts.tolist() == [2, 1, 1, 2]
    assert plan.rank_counts.tolist() == [3, 3]
    assert plan.send_counts.tolist() == [[2, 1], [1, 2]]  # per destination rank, its slots' counts
    # sorted by slot, ties in token order: (0,1) (1,1) -> e0; (1,0) -> e1; (2,0) -> e2; (0,0) (2,1) -> e3
    assert plan.order.tolist() == [1, 3, 2, 4, 0, 5]
    assert plan.source_token.tolist() == [0, 1, 1, 2, 0, 2]


def test_replica_choice_is_round_robin_from_the_source_rank_and_prefers_its_node():
    # expert 0 on ranks 0 and 2, expert 1 on rank 1, expert 2 on rank 3; nodes {0, 1} and {2, 3}
    placement = Placement((0, 1, 0, 2), (0, 1, 2, 3), 4, "replicated")
    ids = torch.tensor([[0], [0], [0], [1]])
    # one node: source 1 alternates between both replicas of expert 0, starting at (0 + 1) % 2
    assert choose_slots(ids, tables_of(placement, 1)).flatten().tolist() == [2, 0, 2, 1]
    # two nodes: source 3 (node 1) only uses the replica on its node (slot 2, rank 2)
    assert choose_slots(ids, tables_of(placement, 3, (0, 0, 1, 1))).flatten().tolist() == [2, 2, 2, 1]
    assert choose_slots(ids, tables_of(placement, 0, (0, 0, 1, 1))).flatten().tolist() == [0, 0, 0, 1]


def simulate(placement, tokens, expert_ids, weights, node_of_rank):
    """Every rank's plan, the exchange as plain tensor moves, experts that scale by (e + 1);
    each destination handles each source's rows on their own, as the engine does."""
    ranks = range(placement.num_ranks)
    plans = [make_plan(expert_ids[r], tables_of(placement, r, node_of_rank)) for r in ranks]
    sent = [
        dict(enumerate(tokens[r][plans[r].source_token].split(plans[r].rank_counts.tolist()))) for r in ranks
    ]
    returned = [dict() for _ in ranks]
    for dest in ranks:
        slots = list(placement.slots_of_rank(dest))
        for src in ranks:
            counts = plans[src].slot_counts[slots].tolist()  # what the counts exchange delivers
            scale = torch.cat(
                [torch.full((c,), placement.slot_expert[s] + 1.0) for s, c in zip(slots, counts)]
                + [torch.zeros(0)]
            )
            returned[src][dest] = sent[src][dest] * scale[:, None]
    return [combine_tokens(plans[r], torch.cat([returned[r][d] for d in ranks]), weights[r]) for r in ranks]


def test_dispatch_and_combine_round_trip_equals_direct_computation():
    generator = torch.Generator().manual_seed(0)
    replicated = Placement((0, 1, 0, 2, 3, 1), (0, 1, 2, 2, 3, 3), 4, "replicated")
    for placement, nodes in (
        (one_per_rank(4, 4), (0, 0, 0, 0)),
        (packed(4, 2), (0, 1)),
        (packed(6, 4), (0, 0, 1, 1)),
        (packed(8, 4, experts_per_rank=3), (0, 0, 0, 0)),
        (replicated, (0, 0, 1, 1)),
        (replicated, (0, 0, 0, 0)),
    ):
        ranks, experts = placement.num_ranks, placement.num_experts
        sizes = [5, 0, 3, 7][:ranks]  # one rank has no tokens at all
        tokens = [torch.randn(n, 8, generator=generator) for n in sizes]
        expert_ids = [
            torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(n)])
            if n
            else torch.zeros(0, 2, dtype=torch.int64)
            for n in sizes
        ]
        weights = [torch.rand(n, 2, generator=generator) for n in sizes]
        results = simulate(placement, tokens, expert_ids, weights, nodes)
        for r in range(ranks):
            scale = (expert_ids[r] + 1.0) * weights[r]
            expected = tokens[r] * scale.sum(1, keepdim=True)
            torch.testing.assert_close(results[r], expected, rtol=1e-6, atol=1e-6)


def test_bytes_crossing_nodes_match_a_hand_count_and_deduplication_lowers_them():
    # 2 nodes x 2 ranks, one expert per rank: experts 0, 1 on node 0; experts 2, 3 on node 1
    placement, nodes = one_per_rank(4, 4), (0, 0, 1, 1)
    # all on node 0: nothing crosses
    slots = torch.tensor(
        [
            [2, 3],  # both choices on node 1: flat sends 2 rows, two-stage 1
            [0, 2],  # one on each node: 1 row either way
            [0, 1],
        ]
    )
    row = 64 * 4
    assert internode_bytes(slots, tables_of(placement, 0, nodes), nodes, row, two_stage=False) == 3 * row
    assert internode_bytes(slots, tables_of(placement, 0, nodes), nodes, row, two_stage=True) == 2 * (
        row + 2 * 12
    )
    # seen from a source on node 1, expert 0 and 1 choices cross instead
    assert internode_bytes(slots, tables_of(placement, 2, nodes), nodes, row, two_stage=False) == 3 * row


def test_node_groups_split_each_token_by_node_and_pack_round_trips():
    placement, nodes = one_per_rank(4, 4), (0, 0, 1, 1)
    slots, weights = (
        torch.tensor([[2, 3], [0, 2], [0, 1]]),
        torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]]),
    )
    groups = node_groups(slots, weights, tables_of(placement, 0, nodes))
    assert groups.node_counts == [2, 2] and groups.tokens.tolist() == [1, 2, 0, 1]
    s0, s1, w0, w1 = groups.slots[:2], groups.slots[2:], groups.weights[:2], groups.weights[2:]
    assert s0.tolist() == [[0, -1], [0, 1]]
    assert torch.equal(w0, torch.tensor([[0.7, 0], [0.5, 0.5]]))
    assert s1.tolist() == [[2, 3], [-1, 2]]
    rows = torch.randn(2, 8).to(torch.bfloat16)
    messages = torch.cat([pack_rows(rows[:1], s1[:1], w1[:1]), pack_rows(rows[1:], s1[1:], w1[1:])])
    back = unpack_rows(messages, 8, torch.bfloat16, 2)
    assert torch.equal(back[0], rows) and torch.equal(back[1], s1) and torch.equal(back[2], w1)


def test_capacity_keeps_the_earliest_tokens_of_each_slot():
    slots = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    # 8 choices over 4 slots at factor 1.0: capacity 2 each; slot 0's third and fourth choices drop
    assert apply_capacity(slots, 1.0, 4).tolist() == [[0, 1], [0, 2], [-1, 1], [3, -1]]
    assert apply_capacity(slots, 2.0, 4).tolist() == slots.tolist()
