"""Placement maps and the validated layout (pure)."""
import pytest

from hpcmoe.config import load_config
from hpcmoe.layout import ParallelLayout, request_range
from hpcmoe.placement import one_per_rank, packed
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


def test_auto_placement_follows_the_rank_count():
    assert layout(4).placement().mode == "one_per_rank"
    assert layout(2).placement().mode == "packed"
    assert layout(4, "parallel.experts_per_rank=2").placement().experts_of_rank(2) == []


@pytest.mark.parametrize("ranks, settings, message", [
    (8, [], r"world size \(8\) > model.num_experts \(4\)"),
    (2, ["parallel.placement=one_per_rank"], r"needs model.num_experts \(4\) == world size \(2\)"),
    (2, ["parallel.experts_per_rank=1"], r"ceil\(num_experts \(4\) / 1\) = 4 ranks, have 2"),
    (2, ["run.fail_rank=2"], r"run.fail_rank: 2 must be between 0 and world size - 1 \(1\)"),
])
def test_layouts_that_do_not_fit_name_the_numbers(ranks, settings, message):
    with pytest.raises(ValueError, match=message):
        layout(ranks, *settings)


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 17])
@pytest.mark.parametrize("ranks", [1, 2, 4, 5])
def test_requests_split_in_contiguous_blocks_covering_the_batch_once(batch, ranks):
    blocks = [request_range(batch, ranks, r) for r in range(ranks)]
    assert [i for b in blocks for i in b] == list(range(batch))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
