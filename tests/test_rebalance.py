"""Online expert rebalancing (parallel.rebalance) under a drifting skew (run.skew_drift).

Whole jobs must give the 1-rank run's tokens (logits within LOGIT_TOLERANCE) while experts move
and switch; at least one switch must happen (else the test proves nothing); after every switch each
rank's expert weights hash to those of a fresh build of what it hosts (bit for bit); a rank that
fails or stalls while weights move ends the job with the abort's or the watchdog's message and no
complete file; bad settings fail naming the numbers.
"""

import os

import h5py
import numpy as np
import pytest

from hpcmoe.config import load_config
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement, replicated
from hpcmoe.parallel.rebalance import imbalance, plan_moves
from hpcmoe.runtime.rebalance import expert_digest
from tests.conftest import DEBUG_CONFIG, assert_same_run, read_run, run_job
from tests.test_report import report

DRIFT = ["model.router_skew=4", "run.skew_drift=6"]
EVERY_2 = "parallel.rebalance={every_steps: 2, window_steps: 2, checksums: true}"
JOBS = {  # name: (ranks, settings)
    "n4_flat": (4, ["model.num_experts=8", "parallel.placement=replicated", "parallel.experts_per_rank=3"]),
    "n4_two_stage_mb4": (
        4,
        [
            "model.num_experts=8",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=3",
            "parallel.ranks_per_node=2",
            "parallel.dispatch=two_stage",
            "run.micro_batches=4",
            "run.decode_micro_batch_min=1",
        ],
    ),
    "n6_flat_mb4": (
        6,
        ["run.micro_batches=4", "run.decode_micro_batch_min=1"],
    ),  # auto: 4 experts on 6 ranks, replicated
    "n6_two_stage": (6, ["parallel.ranks_per_node=3", "parallel.dispatch=two_stage"]),
}
_references = {}


def reference(tmp_path_factory, experts: int):
    if experts not in _references:
        path = tmp_path_factory.mktemp("rebalance_ref") / "run.h5"
        result = run_job(1, path, "output.save_logits=true", f"model.num_experts={experts}", *DRIFT)
        assert result.returncode == 0, result.stderr
        _references[experts] = read_run(path)
    return _references[experts]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_rebalancing_under_drift_equals_one_rank_and_moves_weights_bit_for_bit(tmp_path_factory, name):
    from hpcmoe.model.build import build_model

    ranks, settings = JOBS[name]
    path = tmp_path_factory.mktemp("rebalance") / f"{name}.h5"
    result = run_job(ranks, path, "output.save_logits=true", *DRIFT, EVERY_2, *settings, timeout=240)
    assert result.returncode == 0, result.stderr
    experts = 8 if "model.num_experts=8" in settings else 4
    assert_same_run(read_run(path), reference(tmp_path_factory, experts))
    with h5py.File(path) as f:
        history = f["placement_history"][:]
        assert f["metrics"].attrs["placement_switches"] == len(history) >= 1, "no switch: nothing was tested"
        initial = f["placement"][0]
    config = load_config(DEBUG_CONFIG, [f"model.num_experts={experts}"])
    previous = initial
    for row in history:
        assert row["step"] > row["decided_at_step"] + 1 and row["bytes_moved"] > 0
        assert row["predicted_rank_load_max_over_mean"] < row["predicted_rank_load_max_over_mean_before"]
        assert not np.array_equal(row["placement"][:, : previous.shape[1]], previous)
        for rank in range(ranks):  # what the rank hosts now, built afresh from the seed, hashes the same
            hosted = sorted(e for e, holders in enumerate(row["placement"]) if rank in holders)
            assert row["weights_sha256"][rank].decode() == expert_digest(build_model(config.model, hosted)), (
                rank
            )
        previous = row["placement"]
    if name == "n6_two_stage":  # the report marks the switches
        shown = report(path, "--out", path.parent)
        assert shown.returncode == 0, shown.stderr
        assert f"online rebalancing: {len(history)} switch(es), at steps " in shown.stdout
        assert (path.parent / f"{name}.rank_load.png").stat().st_size > 0


def test_moves_take_each_gained_expert_from_an_old_holder():
    old = replicated(4, 4, 2)  # every expert twice
    new = replicated(4, 4, 2, [10.0, 1.0, 1.0, 1.0])  # expert 0 hot: more replicas of it
    moves = plan_moves(old, new)
    assert moves, "a different placement moves something"
    for expert, source, target in moves:
        assert expert in old.experts_of_rank(source) and expert not in old.experts_of_rank(target)
        assert expert in new.experts_of_rank(target)
    gained = sorted(
        (t, e) for t in range(4) for e in set(new.experts_of_rank(t)) - set(old.experts_of_rank(t))
    )
    assert sorted((t, e) for e, _, t in moves) == gained


class Finished:
    """The window's sum, already complete."""

    def Test(self):
        return True


def decision(old: Placement, load: list[float], min_gain: float):
    """Rebalancer.decide on one node's summed load, without MPI: -> the Switch it starts and its
    placement and moves, or None when it keeps the placement."""
    from hpcmoe.config import RebalanceConfig
    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.rebalance import Moving, Rebalancer
    from hpcmoe.runtime.waits import WaitPolicy

    rebalancer = Rebalancer.__new__(Rebalancer)
    rebalancer.settings, rebalancer.placement, rebalancer.node_of_place, rebalancer.tp = (
        RebalanceConfig(min_gain=min_gain),
        old,
        [0] * old.num_ranks,
        1,
    )
    rebalancer.summing = (Finished(), np.array([load]), None)
    rebalancer.timer = Timer(0, 0.0)  # the boundary's waits are timed (none here: the sum is in)
    rebalancer.policy = WaitPolicy()
    started = []

    def start_moves(new, switch):
        rebalancer.moving = Moving(None, None, switch, new)
        started.append((switch, new, plan_moves(old, new)))

    rebalancer.start_moves, rebalancer.say, rebalancer.vote = (
        start_moves,
        lambda line: None,
        lambda step: None,
    )
    rebalancer.decide(step=3)
    return started[0] if started else None


# 2 ranks x 3 slots, 4 experts: rank 0 hosts 0 1 2, rank 1 hosts 0 1 3 (experts 0 and 1 twice)
OLD = Placement((0, 1, 2, 0, 1, 3), (0, 0, 0, 1, 1, 1), 2, "x")
HOT_2_AND_3 = [0.0, 0.0, 30.0, 10.0]


def test_a_proposal_gaining_a_third_is_adopted_above_min_gain_and_kept_below_it():
    """Load 30 on expert 2 (rank 0 only) and 10 on expert 3 (rank 1 only): ranks get 30 and 10, max/mean
    30 / 20 = 1.5. Replicating the hot 2 and 3 instead (each rank hosts 2 3 and one of 0 1) splits
    them: 15 + 5 on each rank, max/mean 1.0, a gain of 0.5 / 1.5 = 1/3 of the current figure. Rank 0
    gains 3 from rank 1 (its only holder) and rank 1 gains 2 from rank 0."""
    adopted = decision(OLD, HOT_2_AND_3, min_gain=0.33)
    assert adopted is not None
    switch, new, moves = adopted
    assert (switch.decided_at_step, switch.predicted_before, switch.predicted) == (
        3,
        pytest.approx(1.5),
        pytest.approx(1.0),
    )
    assert [sorted(new.experts_of_rank(r)) for r in range(2)] == [[0, 2, 3], [1, 2, 3]]
    assert moves == [(3, 1, 0), (2, 0, 1)]
    assert imbalance(OLD, np.array([HOT_2_AND_3]), [0, 0]) == pytest.approx(1.5)
    assert decision(OLD, HOT_2_AND_3, min_gain=0.34) is None  # 1/3 < 0.34: not worth the moves


def test_a_balanced_load_or_an_unchanged_placement_moves_nothing():
    """Even load, or load only on the experts both ranks hold: max/mean is already 1.0 and the proposal
    is the current placement, so it is kept even with min_gain 0."""
    assert imbalance(OLD, np.array([[10.0, 10.0, 10.0, 10.0]]), [0, 0]) == pytest.approx(1.0)
    assert decision(OLD, [10.0, 10.0, 10.0, 10.0], min_gain=0.0) is None
    assert decision(OLD, [10.0, 10.0, 0.0, 0.0], min_gain=0.0) is None  # both ranks already get 10


@pytest.mark.parametrize(
    "ranks, settings, message",
    [
        (
            4,
            [],
            r"parallel.rebalance needs spare expert slots, but placement one_per_rank has 1 slot\(s\) per "
            r"rank x 4 "
            r"= 4 for model.num_experts \(4\)",
        ),
        (2, ["parallel.placement=packed"], r"placement packed has 2 slot\(s\) per rank x 2 = 4"),
        (6, ["parallel.rebalance.window_steps=20"], r"window_steps \(20\) must be <= the run's steps \(16"),
        (
            6,
            ["parallel.rebalance.every_steps=0"],
            r"parallel.rebalance.every_steps: expected an integer >= 1, got 0",
        ),
        (
            6,
            ["parallel.rebalance.min_gain=1.5"],
            r"parallel.rebalance.min_gain: expected a number in \[0, 1\), got 1.5",
        ),
        (
            6,
            ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=3"],
            r"parallel.rebalance moves experts between ep ranks",
        ),
    ],
)
def test_bad_rebalance_settings_name_the_numbers(ranks, settings, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout.from_config(load_config(DEBUG_CONFIG, ["parallel.rebalance={}", *settings]), ranks)


SLOW_MOVES = (
    "parallel.rebalance={every_steps: 2, window_steps: 2, min_gain: 0, chunk_kib: 1, chunks_in_flight: 1}"
)
# the hot experts are 3 and 2, which the uniform placement replicates last
COLD_START = ["model.router_skew=-4"]


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            ["run.fail_rank=2", "run.fail_at_step=4", "run.fail_at_layer=1"],
            "hpcmoe: rank 2: unhandled RuntimeError",
        ),
        (["run.stall_rank=2", "run.stall_at_step=4", "run.timeout_s=5"], "watchdog: waited"),
    ],
)
def test_a_rank_lost_while_weights_move_ends_the_job_without_a_complete_file(tmp_path, failure, message):
    """1 KiB chunks one at a time: the moves decided after step 2 are still in flight in step 4."""
    output = tmp_path / "out.h5"
    result = run_job(6, output, *COLD_START, SLOW_MOVES, *failure, timeout=90)
    assert result.returncode not in (0, 124), "the job must end, not hang until the timeout"
    assert "hpcmoe: rebalancing after step 2: moving" in result.stderr and "rebalanced:" not in result.stderr
    assert message in result.stderr
    assert not os.path.exists(output)
    for leftover in tmp_path.iterdir():
        assert leftover.name == "out.h5.tmp"
        try:
            with h5py.File(leftover, "r", locking=False) as f:
                assert not f.attrs["complete"]
        except OSError:
            pass


def test_the_per_step_rank_load_reads_badly_where_the_whole_run_figure_flatters():
    """All of each step's load on one rank, a different rank each step: over the run every rank
    received the same (whole-run max/mean 1.0); every single step was as unbalanced as it gets (4.0)."""
    from hpcmoe.runfile.loads import rank_load_imbalance, step_imbalance

    loads = np.zeros((4, 1, 4))  # [steps, moe_layers, places]
    for step in range(4):
        loads[step, 0, step] = 100
    assert rank_load_imbalance(loads) == pytest.approx(1.0)
    assert step_imbalance(loads) == pytest.approx(4.0)
    loads[:] = 25  # evenly spread every step: both read 1
    assert step_imbalance(loads) == pytest.approx(1.0)
