"""The tensor control path against a plain reference implementation kept here (pure, no MPI).

The reference is the obvious loop over experts, slots and ranks that the first wave shipped;
the property test draws random placements of every mode (1 to 64 ranks, 1 to 4 emulated nodes)
and random routings, and requires exactly the same slots, counts and send order.
"""

import random

import numpy as np
import pytest
import torch

from hpcmoe.parallel.dispatch import (
    apply_capacity,
    choose_slots,
    compile_placement,
    node_groups,
    plan_from_slots,
)
from hpcmoe.parallel.placement import Placement, one_per_rank, packed, replica_split, replicated
from hpcmoe.parallel.traffic import topology_aware

# ---------------------------------------------------------------- the reference: plain loops


def reference_candidates(placement: Placement, source: int, node_of_rank) -> list[list[int]]:
    candidates = []
    for slots in placement.expert_slots():
        ranks = replica_split([placement.slot_rank[p] for p in slots], source, list(node_of_rank))
        candidates.append([p for p in slots if placement.slot_rank[p] in ranks])
    return candidates


def reference_slots(expert_ids, placement, source, node_of_rank) -> list[list[int]]:
    """The i-th token slot of this source for expert e goes to candidate (i + source) % len(candidates)."""
    candidates = reference_candidates(placement, source, node_of_rank)
    seen = [0] * len(candidates)
    out = []
    for token in expert_ids.tolist():
        row = []
        for e in token:
            row.append(candidates[e][(seen[e] + source) % len(candidates[e])])
            seen[e] += 1
        out.append(row)
    return out


def reference_capacity(slots, factor, num_slots) -> list[list[int]]:
    capacity = -(-int(factor * sum(map(len, slots))) // num_slots)
    seen = [0] * num_slots
    out = []
    for row in slots:
        kept = []
        for slot in row:
            seen[slot] += 1
            kept.append(slot if seen[slot] <= capacity else -1)
        out.append(kept)
    return out


def reference_plan(slots, placement):
    """-> (send order of flat entries, slot counts, rank counts, per-destination counts [R][S])."""
    k = len(slots[0]) if slots else 1
    flat = [s for row in slots for s in row]
    order = sorted((i for i, s in enumerate(flat) if s >= 0), key=lambda i: (flat[i], i))
    slot_counts = [sum(1 for s in flat if s == p) for p in range(len(placement.slot_rank))]
    rank_counts = [
        sum(slot_counts[p] for p in placement.slots_of_rank(r)) for r in range(placement.num_ranks)
    ]
    width = max(max(len(placement.slots_of_rank(r)) for r in range(placement.num_ranks)), 1)
    per_destination = [[0] * width for _ in range(placement.num_ranks)]
    for r in range(placement.num_ranks):
        for i, p in enumerate(placement.slots_of_rank(r)):
            per_destination[r][i] = slot_counts[p]
    return order, [i // k for i in order], slot_counts, rank_counts, per_destination


# ---------------------------------------------------------------- random cases


def random_case(rng: random.Random):
    ranks = rng.randint(1, 64)
    nodes = rng.randint(1, min(4, ranks))
    per_node = -(-ranks // nodes)
    node_of_rank = [r // per_node for r in range(ranks)]
    nodes = max(node_of_rank) + 1
    mode = rng.choice(["packed", "packed_k", "one_per_rank", "replicated", "topology_aware"])
    if mode == "one_per_rank":
        placement = one_per_rank(ranks, ranks)
    elif mode == "packed":
        placement = packed(rng.randint(ranks, 3 * ranks), ranks)
    elif mode == "packed_k":
        k = rng.randint(1, 4)
        placement = packed(rng.randint(1, k * ranks), ranks, experts_per_rank=k)
    elif mode == "replicated":
        experts = rng.randint(1, ranks * 2)
        fewest = -(-experts // ranks)
        slots_per_rank = rng.randint(fewest, min(experts, fewest + 2))
        load = [rng.random() ** 3 * 10 for _ in range(experts)]
        placement = replicated(experts, ranks, slots_per_rank, load)
    else:
        experts = rng.randint(1, ranks)
        placement = topology_aware(
            [[rng.random() for _ in range(experts)] for _ in range(nodes)], node_of_rank
        )
    experts = placement.num_experts
    tokens, k = rng.randint(0, 40), rng.randint(1, min(4, experts))
    skew = torch.tensor([rng.random() ** 4 for _ in range(experts)])  # some experts far hotter than others
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    expert_ids = (
        torch.stack([torch.multinomial(skew + 1e-3, k, generator=generator) for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.int64)
    )
    return placement, node_of_rank, expert_ids


@pytest.mark.parametrize("seed", range(6))
def test_tensor_control_path_equals_the_reference_on_random_placements(seed):
    rng = random.Random(seed)
    modes = set()
    for _ in range(40):
        placement, node_of_rank, expert_ids = random_case(rng)
        modes.add(placement.mode)
        for source in sorted(rng.sample(range(placement.num_ranks), min(3, placement.num_ranks))):
            tables = compile_placement(placement, source, node_of_rank)
            want = reference_slots(expert_ids, placement, source, node_of_rank)
            slots = choose_slots(expert_ids, tables)
            assert slots.tolist() == want
            if rng.random() < 0.4 and len(want):
                factor = rng.choice([0.3, 0.7, 1.0, 1.5])
                want = reference_capacity(want, factor, tables.num_slots)
                slots = apply_capacity(slots, factor, tables.num_slots)
                assert slots.tolist() == want
            plan = plan_from_slots(slots.view(-1, expert_ids.shape[1]), tables)
            order, source_token, slot_counts, rank_counts, per_destination = reference_plan(want, placement)
            assert plan.order.tolist() == order
            assert plan.source_token.tolist() == source_token
            assert plan.slot_counts.tolist() == slot_counts
            assert plan.rank_counts.tolist() == rank_counts
            assert plan.send_counts.tolist() == per_destination
    assert len(modes) >= 3


def test_node_groups_hold_each_token_once_per_node_it_reaches():
    rng = random.Random(7)
    for _ in range(30):
        placement, node_of_rank, expert_ids = random_case(rng)
        tables = compile_placement(placement, 0, node_of_rank)
        slots = choose_slots(expert_ids, tables)
        weights = torch.rand(slots.shape, generator=torch.Generator().manual_seed(1))
        groups = node_groups(slots, weights, tables)
        nodes = max(node_of_rank) + 1
        expected = [
            (b, t)
            for b in range(nodes)
            for t in range(len(slots))
            if any(node_of_rank[placement.slot_rank[s]] == b for s in slots[t].tolist())
        ]
        ends = np.cumsum([0] + groups.node_counts)
        got = [(b, t) for b in range(nodes) for t in groups.tokens[ends[b] : ends[b + 1]].tolist()]
        assert got == expected
        for row, (b, t) in enumerate(got):  # the row keeps exactly its choices on that node
            on_node = [node_of_rank[placement.slot_rank[s]] == b for s in slots[t].tolist()]
            assert groups.slots[row].tolist() == [
                s if here else -1 for s, here in zip(slots[t].tolist(), on_node)
            ]
            assert torch.equal(groups.weights[row], torch.where(torch.tensor(on_node), weights[t], 0.0))


def test_bench_control_runs_and_stores_its_medians(tmp_path):
    """`hpcmoe bench control` (docs/PERFORMANCE.md's command) runs end to end; no timing is asserted."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "control.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpcmoe",
            "bench",
            "control",
            "--ranks",
            "16,64",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    medians = json.loads(out.read_text())["median"]
    assert set(medians) == {"ranks_16", "ranks_64"}
    assert all(m["flat_ms"] > 0 and m["two_stage_stage1_ms"] > 0 for m in medians.values())
