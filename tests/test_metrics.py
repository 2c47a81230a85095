"""Metrics that can read badly: each figure gets the case where it must be poor.

- wire_hidden (hpcmoe bench overlap): one micro-batch over a slow emulated link hides almost none
  of the wire time.
- idle_fraction: high when ranks wait on a slow link, and every wait counted (inside work phases too).
- rank load: over the ranks that host experts, per MoE layer and step.
- TPOT: wall time between decode steps at rank 0, so a slow run-file writer shows in it.
"""

import json
import os
import subprocess
import sys
import time

import h5py
import pytest

from tests.conftest import DEBUG_CONFIG, ROOT, mpiexec, run_job

SLOW_LINK = "parallel.link={bandwidth_gbps: 0.02, latency_us: 200}"


def test_one_micro_batch_over_a_slow_link_hides_little_of_the_wire(tmp_path):
    out = tmp_path / "overlap.json"
    command = [
        "timeout",
        "300",
        mpiexec(),
        "-n",
        "2",
        sys.executable,
        "-m",
        "hpcmoe",
        "bench",
        "overlap",
        DEBUG_CONFIG,
        "--set",
        "parallel.ranks_per_node=1",
        "--set",
        SLOW_LINK,
        "--set",
        "run.max_new_tokens=2",
        "--set",
        "run.batch=8",
        "--reps",
        "1",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=330,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    median = json.loads(out.read_text())["median"]
    one, four = median["micro_batches_1"], median["micro_batches_4"]
    # the same bytes either way
    assert one["wire_ms"] > 20 and one["wire_ms"] == pytest.approx(four["wire_ms"])
    assert one["wire_hidden"] < 0.3, one
    assert 0 <= four["wire_hidden"] <= 1 and 0 <= one["wire_hidden"] <= 1  # clamped; the raw parts beside it
    assert four["wire_hidden"] == pytest.approx(min(1, max(0, four["wire_hidden_raw"])))


def test_idle_fraction_is_high_behind_a_slow_link(tmp_path):
    waiting = run_job(
        2,
        tmp_path / "slow.h5",
        "run.max_new_tokens=4",
        "parallel.ranks_per_node=1",
        "parallel.link={bandwidth_gbps: 0.005, latency_us: 500}",
    )
    assert waiting.returncode == 0, waiting.stderr
    with h5py.File(tmp_path / "slow.h5") as g:
        assert g["metrics"].attrs["idle_fraction"] > 0.5
        assert (g["metrics/idle_fraction_per_rank"][:] > 0.5).all()


def run_in_process(path, *settings):
    from mpi4py import MPI

    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.runtime.engine import run
    from hpcmoe.runtime.topology import build_topology

    config = load_config(DEBUG_CONFIG, [f"output.path={path}", "run.max_new_tokens=6", *settings])
    return run(config, build_topology(MPI.COMM_SELF, None), ParallelLayout.from_config(config, 1))


def test_a_slow_writer_shows_in_tpot(tmp_path, monkeypatch):
    from hpcmoe.runfile.writer import RunWriter

    normal = run_in_process(tmp_path / "normal.h5")
    append = RunWriter.append_step

    def slow_append(self, *args):
        time.sleep(0.2)  # large against this box's run-to-run noise
        return append(self, *args)

    monkeypatch.setattr(RunWriter, "append_step", slow_append)
    slow = run_in_process(tmp_path / "slow.h5")
    assert slow["tpot_ms"] >= normal["tpot_ms"] + 180  # each decode interval holds one slow append


# ---------------------------------------------------------------- rank load: expert-hosting ranks, per layer
# and step


def one_expert_per_rank(experts: int):
    import numpy as np

    return np.arange(experts).reshape(experts, 1)  # [experts, replicas] of ranks


def test_rank_load_counts_only_the_ranks_that_host_experts():
    """ma 3+1: ranks 0-2 hold attention, rank 3 every expert. Its load is the whole load and it is
    the only expert host: balanced (1.0), where a mean over all four ranks read 4.0."""
    import numpy as np

    from hpcmoe.runfile.loads import rank_load_imbalance, rank_loads, step_imbalance

    routing = np.full((2, 2, 4, 4), 5)  # [steps, moe_layers, sources, experts]
    table = np.array([[3], [3], [3], [3]])
    loads = rank_loads(routing, [(0, table)], [0, 0, 0, 0])
    assert np.isnan(loads[..., :3]).all() and (loads[..., 3] == 80).all()
    assert step_imbalance(loads) == rank_load_imbalance(loads) == 1.0


def test_rank_load_per_layer_sees_layers_that_load_different_ranks():
    """Layer 0 sends everything to expert 0 (rank 0), layer 1 to expert 1 (rank 1): each layer is
    as unbalanced as 2 ranks can be (2.0). Summing the layers first read 1.0, perfect balance."""
    import numpy as np

    from hpcmoe.runfile.loads import rank_load_imbalance, rank_loads, step_imbalance

    routing = np.zeros((1, 2, 2, 2), np.int64)
    routing[0, 0, :, 0] = 10
    routing[0, 1, :, 1] = 10
    loads = rank_loads(routing, [(0, one_expert_per_rank(2))], [0, 0])
    assert step_imbalance(loads) == rank_load_imbalance(loads) == 2.0
    summed_first = loads.sum(axis=1)[0]  # the old per-step figure
    assert summed_first.max() / summed_first.mean() == 1.0


def test_rank_load_splits_replicas_and_follows_a_placement_switch():
    """Expert 0 on ranks 0 and 1 (replicas share its tokens), expert 1 on rank 2; from step 1 the
    placement in force puts expert 1 on rank 0 only and leaves ranks 1 and 2 without experts."""
    import numpy as np

    from hpcmoe.runfile.loads import rank_loads

    routing = np.zeros((2, 1, 3, 2), np.int64)
    routing[:, 0, :, 0] = 4
    routing[:, 0, :, 1] = 2
    first = np.array([[0, 1], [2, -1]])
    second = np.array([[0, -1], [0, -1]])
    loads = rank_loads(routing, [(0, first), (1, second)], [0, 0, 0])
    np.testing.assert_allclose(loads[0, 0], [6, 6, 6])
    assert loads[1, 0, 0] == 18 and np.isnan(loads[1, 0, 1:]).all()


def test_two_stage_gateways_forwarding_is_not_load(tmp_path):
    """The same run over flat and two_stage dispatch (2 emulated nodes of 2): /traffic differs (two_stage
    sends to each node's gateway), the rank load, from what each rank's experts computed, does not."""
    import numpy as np

    runs = {}
    for mode in ("flat", "two_stage"):
        path = tmp_path / f"{mode}.h5"
        result = run_job(
            4,
            path,
            f"parallel.dispatch={mode}",
            "parallel.ranks_per_node=2",
            "model.router_skew=3",
            "run.max_new_tokens=3",
        )
        assert result.returncode == 0, result.stderr
        with h5py.File(path) as f:
            runs[mode] = (f["traffic"][:], dict(f["metrics"].attrs))
    assert not np.array_equal(runs["flat"][0], runs["two_stage"][0])
    for key in ("rank_load_max_over_mean", "rank_load_max_over_mean_per_step"):
        assert (
            runs["flat"][1][key] == pytest.approx(runs["two_stage"][1][key]) and runs["flat"][1][key] > 1.05
        )


# ---------------------------------------------------------------- idle counts every wait


def timing_rows(*rows):
    import numpy as np

    from hpcmoe.runfile.schema import TIMING_DTYPE

    return np.array(
        [(0, -1, 0, 0, phase.encode(), start, end) for phase, start, end in rows], dtype=TIMING_DTYPE
    )


def test_a_wait_inside_a_phase_timed_as_work_is_idle():
    """A rank 80% of whose loop is a rebalance boundary spent waiting on the others' vote (and a send
    buffer's settle inside dispatch_post): idle, not busy. Timed as work, it read busy 1.0, idle 0."""
    from hpcmoe.runfile.metrics import busy_and_idle

    rows = timing_rows(
        ("attention", 0.0, 0.1),
        ("rebalance", 0.1, 0.9),
        ("rebalance_wait", 0.15, 0.85),
        ("dispatch_post", 0.9, 1.0),
        ("send_wait", 0.92, 0.97),
    )
    shares = busy_and_idle(rows, 1)
    assert shares["idle_fraction_per_rank"][0] == pytest.approx(0.75)
    assert shares["busy_fraction_per_rank"][0] == pytest.approx(0.25)


def test_a_blocking_wait_is_a_row_of_its_own_and_an_instant_one_is_none():
    """wait_until with the run's timer (the rebalance boundary's votes, a send buffer's settle): a
    wait that is not over at once is a `*_wait` row inside the enclosing phase; one that is, none."""
    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.waits import WaitPolicy, Where, wait_until

    timer, polls = Timer(0, 0.0), iter([False, False, False, True])
    with timer.phase("rebalance", 3):
        wait_until(lambda: True, Where(3, -1, 0, "rebalance_wait"), WaitPolicy(), timer=timer)
        wait_until(lambda: next(polls), Where(3, -1, 0, "rebalance_wait"), WaitPolicy(), timer=timer)
    names = [row[4] for row in timer.rows]
    assert names == [b"rebalance_wait", b"rebalance"]
    wait, outer = timer.rows
    assert outer[5] <= wait[5] <= wait[6] <= outer[6] and wait[3] == 3
