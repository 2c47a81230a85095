"""The generate loop's parts without MPI jobs: every rank engine provides what the step loop needs
(steps.RankEngine), a dead rank's records have the live ones' shapes, and a run's fault state is its
own (two in one process do not share kill points or communicators)."""

import inspect

import numpy as np

from hpcmoe.config import load_config
from hpcmoe.runtime.batch import Events
from hpcmoe.runtime.ep import EPEngine
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.ma import AttentionEngine, MoEEngine
from hpcmoe.runtime.records import FinalRecord, StepRecord
from hpcmoe.runtime.recovery import Survivors
from hpcmoe.runtime.steps import RankEngine
from tests.conftest import DEBUG_CONFIG


def test_every_rank_engine_has_what_the_loop_calls():
    needed = [
        name for name, _ in inspect.getmembers(RankEngine, inspect.isfunction) if not name.startswith("_")
    ]
    assert {"forward", "step_hooks", "placement_history", "close"} <= set(needed)
    for engine in (EPEngine, AttentionEngine, MoEEngine):
        missing = [name for name in needed if not callable(getattr(engine, name, None))]
        assert not missing, (engine.__name__, missing)


def test_survivors_widen_records_to_the_original_ranks_with_empty_ones_for_the_dead():
    timings = np.zeros(3, [("rank", np.int64)])
    live = StepRecord(Events(), None, np.ones((2, 4), np.int64), np.ones((2, 3), np.int64), 1, timings)
    wide = Survivors((0, 2), 3).widen([live, live])
    assert wide[0] is live and wide[2] is live
    dead = wide[1]
    assert dead.routing.shape == (2, 4) and not dead.routing.any() and not dead.traffic.any()
    assert (dead.dropped, len(dead.events.token), len(dead.timings), dead.logits) == (0, 0, 0, None)
    final = Survivors((1,), 2).widen([FinalRecord(7, "abc", ["d"], timings)])
    assert (final[0].peak_rss_bytes, final[0].cache_digest, final[0].weight_digests) == (0, "", [])
    assert Survivors((1,), 2).widen_traffic(np.array([[5]])).tolist() == [[0, 5]]


def test_a_runs_fault_state_is_its_own():
    config = load_config(
        DEBUG_CONFIG,
        [
            "run.fault_tolerance=true",
            "run.kill=[{rank: 1, step: 2, layer: 1, phase: dispatch}, "
            "{rank: 1, step: 3, layer: 1, phase: record}]",
        ],
    )
    one, other = FaultState.of(config, 1), FaultState.of(config, 0)
    assert one.kills == {(2, 1, "dispatch"), (3, -1, "record")}  # a layer counts only in a layer's phases
    assert other.kills == frozenset() and not other.recovered
    one.maybe_die(2, 2, "dispatch")  # not a kill point: goes on
    one.maybe_die(3, 1, "dispatch")
    comm = object()
    assert one.track(comm) is comm and one.communicators == [comm] and other.communicators == []
    one.release()
    assert one.communicators == []


def test_two_wait_policies_in_one_process_wait_each_their_own_way(monkeypatch):
    """The policy is given to each wait, not set for the process: a spinning wait and a sleeping one
    alternate in one process, each as its own policy says (the sleeping one would read spin if the
    policy were a process global set by the last engine built)."""
    import time

    from hpcmoe.runtime.waits import WaitPolicy, Where, wait_until

    sleeps = []
    monkeypatch.setattr(time, "sleep", lambda seconds: sleeps.append(seconds))

    def after(tests: int):
        left = iter(range(tests, -1, -1))
        return lambda: next(left) == 0

    spinning, sleeping = WaitPolicy(spin=True), WaitPolicy()
    for _ in range(2):
        wait_until(after(5), Where(phase="spin"), spinning)
        assert sleeps == []
        wait_until(after(5), Where(phase="sleep"), sleeping)
        assert len(sleeps) == 5 and sleeps[0] == 20e-6 and sleeps[-1] == 320e-6
        sleeps.clear()
