"""The benchmark figures of hpcmoe.analysis.bench, each where it must read badly (pure: no MPI, no engine
run).

- wire_hidden: against the fastest schedule without the link, so a schedule slower with and without
  the link cannot read well; clamped to [0, 1] with the unclamped value and its parts beside it.
- moving_tps_ratio: generated tokens over wall time over the whole moving window, the step where
  moves start and the switch step included.
"""

import h5py
import numpy as np
import pytest

from hpcmoe.analysis.bench.figures import (
    moving_cost,
    moving_tps_ratio,
    overlap_figures,
    wire_hidden,
    wire_hidden_raw,
)
from hpcmoe.analysis.bench.results import report


def test_a_schedule_slower_with_and_without_the_link_reads_badly():
    """docs/bench/overlap_n2.json's case: B is 30 ms slower than A without the link and only 5 ms
    slower with it than without. Against its own no-link run it read 0.83; against A's, it hid
    little of the 30 ms wire."""
    rows = {
        "a": {"ttft_ms": [185.0], "ttft_nolink_ms": [160.0], "wire_ms": [30.0]},
        "b": {"ttft_ms": [195.0], "ttft_nolink_ms": [190.0], "wire_ms": [30.0]},
    }
    overlap_figures(rows)
    assert rows["b"]["best_nolink_ms"] == [160.0]
    assert rows["b"]["wire_hidden"][0] <= 0.2, rows["b"]
    assert rows["b"]["wire_hidden_raw"][0] == pytest.approx(1 - 35 / 30)  # the parts stay beside it
    assert rows["a"]["wire_hidden"][0] == pytest.approx(1 - 25 / 30)


def test_wire_hidden_is_bounded_when_noise_pushes_it_out():
    assert wire_hidden_raw(200.0, 160.0, 30.0) < 0 and wire_hidden(200.0, 160.0, 30.0) == 0.0
    assert wire_hidden_raw(150.0, 160.0, 30.0) > 1 and wire_hidden(150.0, 160.0, 30.0) == 1.0
    assert np.isnan(wire_hidden(150.0, 160.0, 0.0))  # no wire: nothing to hide, no figure


def test_the_best_no_link_run_is_taken_per_rep_and_the_spread_is_stored(tmp_path):
    """Rep 2 ran slow for everyone: each rep is compared with its own fastest no-link run, not a
    fast run of another rep; report() stores [min, max] over the reps beside the median."""
    rows = {
        "one": {
            "ttft_ms": [110.0, 220.0, 112.0],
            "ttft_nolink_ms": [80.0, 160.0, 82.0],
            "wire_ms": [40.0] * 3,
        },
        "four": {
            "ttft_ms": [95.0, 190.0, 101.0],
            "ttft_nolink_ms": [90.0, 180.0, 92.0],
            "wire_ms": [40.0] * 3,
        },
    }
    overlap_figures(rows)
    assert rows["four"]["best_nolink_ms"] == [80.0, 160.0, 82.0]
    assert rows["four"]["wire_hidden"] == pytest.approx([0.625, 0.25, 0.525])
    result = report("overlap", rows, "one", "goal", {}, None, spread=("wire_hidden",))
    assert result["median"]["four"]["wire_hidden"] == pytest.approx(0.525)
    assert result["spread"]["four"]["wire_hidden"] == pytest.approx([0.25, 0.625])


def slow_window():
    """20 steps of 8 tokens, 10 ms each, but the window decided at step 5 and switched at step 10:
    its first step (moves start) takes 40 ms and the switch step 60 ms."""
    seconds = np.full(20, 0.010)
    seconds[6], seconds[10] = 0.040, 0.060
    return np.cumsum(seconds), np.full(20, 8), [(5, 10)]


def test_moving_tps_ratio_counts_the_first_and_the_switch_step():
    """A median of step times over steps 6..9 read 1.0 here; tokens over the window's wall time read
    40 tokens in 130 ms against 8 per 10 ms."""
    times, tokens, windows = slow_window()
    assert moving_tps_ratio(times, tokens, windows) == pytest.approx((40 / 0.130) / 800)
    assert np.isnan(moving_tps_ratio(times, tokens, []))  # no window: no figure


def test_moving_cost_reads_tokens_over_time_from_a_run_file(tmp_path):
    """The datasets moving_cost reads, as a run file stores them: 4 requests from step 0, two ending
    at step 7 (fewer tokens after it, not slower steps: the outside rate counts what was made)."""
    times, _, _ = slow_window()
    history = np.zeros(1, [("step", np.int64), ("decided_at_step", np.int64), ("bytes_moved", np.int64)])
    history[0] = (10, 5, 3 * 2**20)
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["placement_history"] = history
        f["metrics/token_time_s"] = times
        f["requests/finished_step"] = np.array([7, 7, 19, 19])
        made = f.create_dataset("requests/completion_ids", (4,), dtype=h5py.vlen_dtype(np.int64))
        for i, n in enumerate([8, 8, 20, 20]):
            made[i] = np.arange(n)
    found = moving_cost(str(tmp_path / "run.h5"))
    assert found["switches"] == 1 and found["moved_mib"] == 3.0
    window = (4 + 4 + 2 + 2 + 2) / 0.130  # steps 6..10
    outside = (4 * 5 + 2 * 9) / (0.010 * 14)  # steps 1..5 and 11..19
    assert found["moving_tps_ratio"] == pytest.approx(window / outside)
    assert found["moving_tps_ratio"] < 0.6
