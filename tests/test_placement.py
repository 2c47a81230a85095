"""Placement maps and the validated layout (pure)."""

import itertools
from collections import Counter

import numpy as np
import pytest

from hpcmoe.config import load_config
from hpcmoe.parallel.layout import ParallelLayout, request_range
from hpcmoe.parallel.placement import (
    Placement,
    _assign_replicas,
    one_per_rank,
    packed,
    replica_split,
    replicated,
    round_robin,
)
from hpcmoe.parallel.traffic import (
    expected_rank_load,
    link_loads,
    load_from_routing,
    max_link_load,
    topology_aware,
)
from tests.conftest import DEBUG_CONFIG


def test_one_per_rank_puts_expert_e_on_rank_e():
    p = one_per_rank(4, 4)
    assert [p.experts_of_rank(r) for r in range(4)] == [[0], [1], [2], [3]]
    assert p.expert_ranks() == [[0], [1], [2], [3]]


def test_packed_spreads_contiguous_blocks_evenly():
    p = packed(6, 4)
    assert [p.experts_of_rank(r) for r in range(4)] == [[0], [1, 2], [3], [4, 5]]
    p = packed(8, 2)
    assert [p.experts_of_rank(r) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_packed_with_experts_per_rank_fills_the_first_ranks():
    p = packed(8, 4, experts_per_rank=3)
    assert [p.experts_of_rank(r) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], []]
    assert list(p.slots_of_rank(3)) == []
    with pytest.raises(ValueError, match=r"ceil\(num_experts \(8\) / 2\) = 4 ranks, have 3"):
        packed(8, 3, experts_per_rank=2)


def layout(ranks, *settings):
    return ParallelLayout.from_config(load_config(DEBUG_CONFIG, list(settings)), ranks)


def test_auto_placement_replicates_when_ranks_outnumber_experts():
    placement = layout(6).placement((0, 0, 0, 1, 1, 1))
    assert placement.mode == "replicated" and len(placement.slot_expert) == 6
    assert sorted(set(placement.slot_expert)) == [0, 1, 2, 3]
    assert layout(4, "parallel.placement=topology_aware").placement((0, 0, 1, 1)).mode == "topology_aware"


def test_auto_placement_follows_the_rank_count():
    assert layout(4).placement((0,) * 4).mode == "one_per_rank"
    assert layout(2).placement((0,) * 2).mode == "packed"
    assert layout(4, "parallel.experts_per_rank=2").placement((0,) * 4).experts_of_rank(2) == []


@pytest.mark.parametrize(
    "ranks, settings, message",
    [
        (
            8,
            ["parallel.placement=packed"],
            r"placement=packed with world size \(8\) > model.num_experts \(4\)",
        ),
        (2, ["parallel.placement=topology_aware"], r"needs model.num_experts \(4\) <= world size \(2\)"),
        (
            4,
            ["parallel.placement=replicated", "parallel.experts_per_rank=5"],
            r"slots_per_rank \(5\) <= num_experts \(4\)",
        ),
        (2, ["parallel.placement=one_per_rank"], r"needs model.num_experts \(4\) == world size \(2\)"),
        (2, ["parallel.experts_per_rank=1"], r"ceil\(num_experts \(4\) / 1\) = 4 ranks, have 2"),
        (2, ["run.fail_rank=2"], r"run.fail_rank: 2 must be between 0 and world size - 1 \(1\)"),
    ],
)
def test_layouts_that_do_not_fit_name_the_numbers(ranks, settings, message):
    with pytest.raises(ValueError, match=message):
        layout(ranks, *settings)


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 17])
@pytest.mark.parametrize("ranks", [1, 2, 4, 5])
def test_requests_split_in_contiguous_blocks_covering_the_batch_once(batch, ranks):
    blocks = [request_range(batch, ranks, r) for r in range(ranks)]
    assert [i for b in blocks for i in b] == list(range(batch))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def assert_well_formed_replicated(p, num_experts, num_ranks, slots_per_rank):
    assert Counter(p.slot_rank) == {r: slots_per_rank for r in range(num_ranks)}
    assert all(len(set(p.experts_of_rank(r))) == slots_per_rank for r in range(num_ranks))
    assert set(p.slot_expert) == set(range(num_experts))


def test_replicated_with_more_ranks_than_experts_gives_every_rank_one_expert():
    p = replicated(4, 6, 1)
    assert_well_formed_replicated(p, 4, 6, 1)
    assert [len(r) for r in p.expert_ranks()] == [2, 2, 1, 1]  # 2 extra replicas, ties to lower ids
    # hottest per replica first: e2 (1), e3 (1), then e0 and e1 (1/2 each) on the emptiest ranks
    assert p.expert_ranks() == [[2, 3], [4, 5], [0], [1]] and p.mode == "replicated"


def test_replicated_gives_the_hot_expert_the_extra_ranks():
    p = replicated(4, 8, 1, load=[100, 1, 1, 1])
    assert_well_formed_replicated(p, 4, 8, 1)
    assert [len(r) for r in p.expert_ranks()] == [5, 1, 1, 1]


def test_replicated_caps_replicas_at_the_rank_count():
    p = replicated(4, 4, 2, load=[100, 10, 10, 10])
    assert_well_formed_replicated(p, 4, 4, 2)
    assert [len(r) for r in p.expert_ranks()] == [4, 2, 1, 1]  # expert 0 capped, leftover to expert 1
    assert [p.experts_of_rank(r) for r in range(4)] == [[0, 2], [0, 3], [0, 1], [0, 1]]


def test_replicated_balances_expected_rank_load_better_than_one_expert_per_slot():
    load = [100, 10, 10, 10]

    def imbalance(p):
        per_rank = expected_rank_load(p, [load], [0] * p.num_ranks)
        return max(per_rank) / (sum(per_rank) / len(per_rank))

    balanced = imbalance(replicated(4, 4, 2, load))
    assert balanced == pytest.approx(35 / 32.5)  # ranks get 25+10, 25+10, 25+5, 25+5
    assert balanced < imbalance(one_per_rank(4, 4)) == pytest.approx(100 / 32.5)
    assert balanced < imbalance(packed(4, 4, experts_per_rank=2)) == pytest.approx(110 / 32.5)


@pytest.mark.parametrize("seed", range(20))
def test_replicated_always_fills_every_slot_without_duplicates(seed):
    rng = np.random.default_rng(seed)
    experts, ranks = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    slots_per_rank = int(rng.integers(-(-experts // ranks), experts + 1))
    load = rng.choice([0, 1, 2, 50], size=experts).tolist()
    assert_well_formed_replicated(
        replicated(experts, ranks, slots_per_rank, load), experts, ranks, slots_per_rank
    )


def test_replica_assignment_repairs_when_only_ranks_holding_the_expert_have_room():
    # e0 -> r0; e2, e3, e4 fill r1; e1's second replica only fits r0, which holds e1: e2 moves to r0
    assert _assign_replicas([1, 2, 1, 1, 1], [100, 2, 20, 20, 20], 2, 3) == [[0, 1, 2], [3, 4, 1]]


@pytest.mark.parametrize(
    "args, message",
    [
        ((6, 4, 1), r"slots_per_rank \(1\) x ranks \(4\) >= num_experts \(6\)"),
        ((2, 4, 3), r"slots_per_rank \(3\) <= num_experts \(2\)"),
        ((2, 4, 1, [1, 2, 3]), r"load has 3 entries, num_experts is 2"),
    ],
)
def test_replicated_errors_name_the_numbers(args, message):
    with pytest.raises(ValueError, match=message):
        replicated(*args)


def test_replica_split_prefers_replicas_on_the_source_node():
    node_of_rank = [0, 0, 1, 1]
    assert replica_split([1, 2, 3], 0, node_of_rank) == [1]
    assert replica_split([1, 2, 3], 3, node_of_rank) == [2, 3]
    assert replica_split([2, 3], 1, node_of_rank) == [2, 3]  # none on node 0: all replicas


def test_link_loads_and_expected_rank_load_match_a_hand_count():
    # ranks 0, 1 on node 0 and 2, 3 on node 1; rank 0: e0 e1, rank 1: e1, rank 2: e0 e2, rank 3: e3
    p = Placement((0, 1, 1, 0, 2, 3), (0, 0, 1, 2, 2, 3), 4, "test")
    tokens = [[10, 20, 30, 40], [5, 6, 7, 8]]
    # node 0: e0 stays (rank 0), e1 stays (10 + 10), e2 -> rank 2 (30), e3 -> rank 3 (40): 70 cross
    # node 1: e0 stays (rank 2), e1 -> ranks 0, 1 (3 + 3): 6 cross, e2 and e3 stay
    assert link_loads(p, tokens, [0, 0, 1, 1]) == {(0, 1): 70.0, (1, 0): 6.0}
    assert max_link_load(p, tokens, [0, 0, 1, 1]) == 70.0
    assert expected_rank_load(p, tokens, [0, 0, 1, 1]) == [10 + 10 + 3, 10 + 3, 30 + 5 + 7, 40 + 8]
    # three nodes: node 0's 8 tokens for e0 split evenly over its replicas on nodes 1 and 2
    p = Placement((0, 0), (1, 2), 3, "test")
    assert link_loads(p, [[8], [0], [0]], [0, 1, 2]) == {
        (0, 1): 4.0,
        (0, 2): 4.0,
        (1, 0): 0.0,
        (1, 2): 0.0,
        (2, 0): 0.0,
        (2, 1): 0.0,
    }
    assert max_link_load(p, [[8], [0], [0]], [0, 1, 2]) == 4.0


def test_round_robin_leaves_extra_ranks_empty():
    p = round_robin(3, 5)
    assert [p.experts_of_rank(r) for r in range(5)] == [[0], [1], [2], [], []]
    with pytest.raises(ValueError, match=r"num_experts \(6\) <= ranks \(5\)"):
        round_robin(6, 5)


def test_topology_aware_beats_round_robin_on_node_local_traffic():
    node_of_rank = [r // 4 for r in range(16)]
    # node a sends 100 tokens to each expert e with e % 4 == a and 1 to every other expert
    tokens = [[100 if e % 4 == a else 1 for e in range(16)] for a in range(4)]
    # round robin puts e on node e // 4: every link carries one hot expert, 100 + 3 * 1
    assert max_link_load(round_robin(16, 16), tokens, node_of_rank) == 103.0
    p = topology_aware(tokens, node_of_rank)
    assert p.mode == "topology_aware" and Counter(p.slot_rank) == {r: 1 for r in range(16)}
    assert max_link_load(p, tokens, node_of_rank) == 4.0  # only the cold experts cross
    assert all(e % 4 == node_of_rank[r] for r, e in zip(p.slot_rank, p.slot_expert))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("experts", [4, 5, 6])
def test_topology_aware_on_two_nodes_hosts_each_expert_once_on_its_own_rank(seed, experts):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 100, size=(2, experts)).tolist()
    tokens[0] = [x * 50 for x in tokens[0]]  # node 0 would like every expert at home
    p = topology_aware(tokens, [0, 0, 0, 1, 1, 1])
    assert sorted(p.slot_expert) == list(range(experts))
    assert len(set(p.slot_rank)) == experts
    assert max_link_load(p, tokens, [0, 0, 0, 1, 1, 1]) <= max_link_load(
        round_robin(experts, 6), tokens, [0, 0, 0, 1, 1, 1]
    )


def test_topology_aware_local_search_reaches_the_brute_force_optimum():
    node_of_rank = [0, 0, 1, 1, 2, 2]
    tokens = [[5, 9, 2, 8, 6, 0], [3, 8, 5, 0, 7, 7], [8, 1, 0, 8, 0, 5]]  # the greedy pass alone gets 13

    def cost(nodes):  # expert e on the next free rank of node nodes[e]
        ranks = [2 * n + nodes[:e].count(n) for e, n in enumerate(nodes)]
        pairs = sorted(zip(ranks, range(6)))
        return max_link_load(
            Placement(tuple(e for _, e in pairs), tuple(r for r, _ in pairs), 6, "test"), tokens, node_of_rank
        )

    best = min(cost(n) for n in itertools.product(range(3), repeat=6) if max(Counter(n).values()) <= 2)
    assert best == 9.0
    assert max_link_load(topology_aware(tokens, node_of_rank), tokens, node_of_rank) == best


def test_topology_aware_needs_a_rank_per_expert():
    with pytest.raises(ValueError, match=r"num_experts \(5\) <= ranks \(4\)"):
        topology_aware([[1] * 5, [1] * 5], [0, 0, 1, 1])


def test_load_from_routing_sums_steps_and_layers_and_groups_sources_by_node():
    routing = np.zeros((2, 3, 4, 2), dtype=np.int64)  # [steps, moe_layers, source_ranks, experts]
    routing[:, :, 0, 0] = 1  # source 0: 6 tokens to e0
    routing[0, 0, 1, 1] = 5  # source 1: 5 tokens to e1
    routing[1, 2, 2, 0] = 7  # source 2: 7 tokens to e0
    routing[:, 0, 3, 1] = 2  # source 3: 4 tokens to e1
    tokens, load = load_from_routing(routing, [1, 0, 1, 0])
    assert tokens == [[0.0, 9.0], [13.0, 0.0]] and load == [13.0, 9.0]
    tokens, load = load_from_routing(routing, [0, 1])  # 4 sources on 2 nodes: r * 2 // 4
    assert tokens == [[6.0, 5.0], [7.0, 4.0]] and load == [13.0, 9.0]


def test_survivors_keep_their_slots_and_lost_experts_go_to_the_emptiest_with_room():
    from hpcmoe.parallel.placement import on_survivors

    p = replicated(3, 6, 1, [1.0, 1.0, 1.0])  # 3 experts x 2 replicas, one slot per rank
    holders = p.expert_ranks()
    dead = set(holders[1])  # expert 1 loses both replicas
    kept = [r for r in range(6) if r not in dead]
    survived, lost = on_survivors(p, kept, list(range(4)), capacity=2)
    assert lost == [1] and survived.num_ranks == 4
    for new, old in enumerate(kept):  # every survivor still serves what it held
        assert set(p.experts_of_rank(old)) <= set(survived.experts_of_rank(new))
    assert sorted(survived.slot_expert) == [0, 0, 1, 2, 2]
    assert survived.experts_of_rank(0) == [p.experts_of_rank(kept[0])[0], 1]  # the lowest of the emptiest
    with pytest.raises(
        ValueError, match=r"expert 1 lost every replica \(rank\(s\) .*\) and no survivor has room"
    ):
        on_survivors(p, kept, list(range(4)), capacity=1)


def test_a_standby_takes_its_dead_primarys_shard():
    from hpcmoe.parallel.layout import MALayout

    ma = MALayout(5, 3, 4, 1, 2, standby=True)  # groups (0 | 1) and (2 | 3), MoE rank 4
    assert ma.primaries(3) == [2] and ma.twin(2) == 3 and ma.group_ranks(1) == [0, 1]
    left = ma.survivors([0, 1, 3, 4])  # rank 2 died: its standby (now rank 2) is primary
    assert left.primaries(2) == [2] and left.twin(2) is None and left.group_ranks(0) == [0, 1]
    assert (left.attention_ranks, left.moe_ranks, left.group_requests(6, 2)) == (3, 1, range(1, 6, 2))
    with pytest.raises(ValueError, match="attention group 1 .ranks 2, 3. has no surviving rank"):
        ma.survivors([0, 1, 4])
    with pytest.raises(ValueError, match=r"every MoE rank \(4..4\) is dead: experts 0, 1, 2"):
        ma.survivors([0, 1, 2, 3])
