"""parallel.expert_schedule: per_layer (the rows in one collective each way, each local expert run
once per layer and micro-batch) against per_source (point-to-point, experts per arriving source)
and the 1-rank run; the permutation that groups received rows by expert; the watchdog inside the
collective exchange."""

import h5py
import numpy as np
import pytest
import torch

from hpcmoe.parallel.dispatch import expert_major
from hpcmoe.parallel.layout import step_micro_batches
from tests.conftest import DEBUG_CONFIG, assert_same_run, read_run, run_job
from tests.conftest import finished_run as finished


def test_expert_major_reads_each_slot_from_every_source_in_order():
    counts = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2]])
    received = [
        (source, slot) for source in range(3) for slot in range(3) for _ in range(counts[source, slot])
    ]
    order = expert_major(counts)
    assert sorted(order) == list(range(len(received)))
    grouped = [received[i] for i in order]
    assert grouped == sorted(grouped, key=lambda pair: (pair[1], pair[0]))  # slot-major, sources in order
    assert list(expert_major(np.zeros((4, 2), np.int64))) == []


def test_experts_once_equal_experts_per_source():
    """run_once on a source-major buffer gives, row for row, what one call per source gives."""
    from hpcmoe.config import load_config
    from hpcmoe.model.build import build_model
    from hpcmoe.runtime.per_layer import run_once

    config = load_config(DEBUG_CONFIG, ["model.num_experts=8", "model.dtype=float32"])
    moe = next(b.mlp for b in build_model(config.model, [1, 4, 6]).layers if b.is_moe)
    counts = np.array([[3, 0, 2], [1, 4, 0], [0, 0, 5]])  # [sources, hosted experts]
    rows = torch.randn(int(counts.sum()), config.model.hidden)
    once = run_once(moe, rows, counts, torch.empty_like(rows))
    start, per_source = 0, []
    for source_counts in counts:
        n = int(source_counts.sum())
        per_source.append(moe.run_experts(rows[start : start + n], source_counts.tolist()))
        start += n
    torch.testing.assert_close(once, torch.cat(per_source), atol=1e-5, rtol=1e-5)


# (ranks, workload, settings): packed, replicas, two_stage, micro-batches, a link, expert groups, ma
SCHEDULES = [
    (
        4,
        "eight_experts",
        ["parallel.experts_per_rank=3", "run.micro_batches=3", "run.decode_micro_batch_min=1"],
    ),
    (
        4,
        "debug",
        [
            "parallel.ranks_per_node=2",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
            "parallel.dispatch=two_stage",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
            "parallel.link={bandwidth_gbps: 5, latency_us: 50}",
        ],
    ),
    (6, "debug", ["parallel.ranks_per_node=3", "parallel.dispatch=two_stage"]),
    (
        8,
        "debug",
        [
            "parallel.expert_tp=2",
            "parallel.expert_tp_dispatch=members",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
        ],
    ),
    (4, "debug", ["parallel.expert_tp=2", "parallel.expert_tp_dispatch=leader"]),
    (4, "debug", ["parallel.layout=ma", "parallel.attention_ranks=2", "parallel.moe_ranks=2"]),
]


@pytest.mark.parametrize("schedule", ["per_layer", "per_source"])
@pytest.mark.parametrize(
    "ranks, workload, settings", SCHEDULES, ids=[f"n{r}-{w}-" + "-".join(s) for r, w, s in SCHEDULES]
)
def test_both_schedules_equal_one_rank(tmp_path_factory, schedule, ranks, workload, settings):
    path = finished(tmp_path_factory, ranks, workload, f"parallel.expert_schedule={schedule}", *settings)
    assert_same_run(read_run(path), read_run(finished(tmp_path_factory, 1, workload)))


def experts_rows_per_call(path) -> np.ndarray:
    """How many `experts` rows each (rank, step, layer, micro-batch) of the decode steps holds."""
    with h5py.File(path) as f:
        rows = f["timings"][:]
    rows = rows[(rows["phase"] == b"experts") & (rows["step"] > 0)]
    _, per_call = np.unique(rows[["rank", "step", "layer", "micro_batch"]], return_counts=True)
    return per_call


def test_per_layer_decode_runs_experts_once_per_layer(tmp_path_factory):
    """Packed experts (3 per rank) on 4 ranks: per_source runs them once per arriving source in
    decode (the check can fail), per_layer (and auto in decode) once per layer and micro-batch."""
    settings = ("parallel.experts_per_rank=3", "run.micro_batches=2", "run.decode_micro_batch_min=1")
    per_source = finished(
        tmp_path_factory, 4, "eight_experts", "parallel.expert_schedule=per_source", *settings
    )
    assert experts_rows_per_call(per_source).max() > 1
    for schedule in ("per_layer", "auto"):
        path = finished(
            tmp_path_factory, 4, "eight_experts", f"parallel.expert_schedule={schedule}", *settings
        )
        assert experts_rows_per_call(path).max() == 1


def test_watchdog_names_the_stalled_rank_inside_the_collective_exchange(tmp_path):
    """Rank 2 sleeps before its first dispatch of a decode step (per_layer): the others wait in the
    counts collective and name it."""
    result = run_job(
        4,
        tmp_path / "out.h5",
        "parallel.expert_schedule=per_layer",
        "run.stall_rank=2",
        "run.stall_at_step=2",
        "run.timeout_s=8",
        timeout=90,
    )
    assert result.returncode != 0
    assert "watchdog: waited" in result.stderr and "for rank 2" in result.stderr, result.stderr
    assert not (tmp_path / "out.h5").exists()


def test_decode_splits_only_micro_batches_that_keep_enough_requests():
    assert step_micro_batches(4, 32, requests_per_rank=8, prefill=True) == 4
    assert step_micro_batches(4, 32, requests_per_rank=8, prefill=False) == 1
    assert step_micro_batches(4, 32, requests_per_rank=64, prefill=False) == 2
    assert step_micro_batches(2, 32, requests_per_rank=1000, prefill=False) == 2
    assert step_micro_batches(4, 1, requests_per_rank=3, prefill=False) == 3


def test_decode_runs_fewer_micro_batches_than_the_prefill_and_equals_one_rank(tmp_path_factory):
    """run.micro_batches=3 with 6 requests on 2 ranks: the prefill in 3 micro-batches, decode in 1 (3
    requests per rank, fewer than decode_micro_batch_min); with the minimum at 1, decode in 3 too."""
    reference = read_run(finished(tmp_path_factory, 1, "debug"))
    for minimum, decode_slots in ((32, {0}), (1, {0, 1, 2})):
        path = finished(
            tmp_path_factory, 2, "debug", "run.micro_batches=3", f"run.decode_micro_batch_min={minimum}"
        )
        assert_same_run(read_run(path), reference)
        with h5py.File(path) as f:
            rows = f["timings"][:]
        attention = rows[rows["phase"] == b"attention"]
        assert set(attention[attention["step"] == 0]["micro_batch"]) == {0, 1, 2}
        assert set(attention[attention["step"] > 0]["micro_batch"]) == decode_slots
