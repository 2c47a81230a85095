"""Whole jobs under `timeout 120 mpiexec -n K python -m hpcmoe run ...`: equality with the 1-rank
run, the run file's schema, clear errors (one line per job, exit 2 on every rank), and a failing rank ending
the job."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, assert_same_run, finished_run, mpiexec, read_run, run_job


@pytest.mark.parametrize("ranks, workload", [(2, "debug"), (4, "debug"), (4, "small_batch")])
def test_n_ranks_equal_one_rank(tmp_path_factory, ranks, workload):
    reference = read_run(finished_run(tmp_path_factory, 1, workload))
    assert_same_run(read_run(finished_run(tmp_path_factory, ranks, workload)), reference)


@pytest.mark.parametrize("ranks, extra", [(2, ()), (3, ()), (4, ("parallel.experts_per_rank=3",)), (8, ())])
def test_packed_placement_equals_one_expert_per_rank(tmp_path_factory, ranks, extra):
    """8 experts: 4+4, 3+3+2 and 3+3+2+0 experts per rank against 8 ranks with one each."""
    one_each = finished_run(tmp_path_factory, 8, "eight_experts")
    with h5py.File(one_each) as f:
        assert (f["placement"][0, :, 0] == np.arange(8)).all()
    packed = finished_run(tmp_path_factory, ranks, "eight_experts", *extra)
    assert_same_run(read_run(packed), read_run(one_each))
    assert_same_run(read_run(packed), read_run(finished_run(tmp_path_factory, 1, "eight_experts")))


LARGE_EP = [  # (ranks, settings): every placement mode, replicas, micro-batches, flat and two-stage
    (
        4,
        [
            "parallel.ranks_per_node=2",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
            "parallel.dispatch=two_stage",
        ],
    ),
    (
        4,
        [
            "parallel.ranks_per_node=2",
            "parallel.placement=topology_aware",
            "run.micro_batches=3",
            "run.decode_micro_batch_min=1",
        ],
    ),
    (
        4,
        [
            "parallel.ranks_per_node=2",
            "parallel.placement=packed",
            "parallel.experts_per_rank=2",
            "parallel.dispatch=two_stage",
        ],
    ),
    # more micro-batches than any rank has requests, over an emulated inter-node link
    (
        4,
        [
            "parallel.ranks_per_node=2",
            "parallel.dispatch=two_stage",
            "run.micro_batches=4",
            "run.decode_micro_batch_min=1",
            "parallel.link={bandwidth_gbps: 5, latency_us: 50}",
        ],
    ),
    (6, ["parallel.ranks_per_node=2"]),  # auto: 6 ranks, 4 experts -> replicated
    (
        6,
        [
            "parallel.ranks_per_node=2",
            "parallel.dispatch=two_stage",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
        ],
    ),
    (
        6,
        [
            "parallel.ranks_per_node=2",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
            "parallel.dispatch=two_stage",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
        ],
    ),
]


@pytest.mark.parametrize("ranks, settings", LARGE_EP, ids=[f"n{r}-" + "-".join(s[1:]) for r, s in LARGE_EP])
def test_large_ep_schedules_equal_one_rank(tmp_path_factory, ranks, settings):
    path = finished_run(tmp_path_factory, ranks, "debug", *settings)
    assert_same_run(read_run(path), read_run(finished_run(tmp_path_factory, 1, "debug")))
    with h5py.File(path) as f:
        metrics = f["metrics"].attrs
        assert 0 <= metrics["idle_fraction"] < 1 and 0 < metrics["busy_fraction"] <= 1
        assert "overlap_fraction" not in metrics  # removed on purpose: it could not read low
        assert f["metrics/busy_fraction_per_rank"].shape == (ranks,)
        assert f["placement"].attrs["source"] == "uniform"


MA = [  # attention/MoE separation: 3 + 1, the same on 2 emulated nodes (3+1 across them), 2 x 2 + 1
    (4, ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]),
    (
        4,
        [
            "parallel.layout=ma",
            "parallel.attention_ranks=3",
            "parallel.moe_ranks=1",
            "parallel.ranks_per_node=2",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
        ],
    ),
    (
        5,
        [
            "parallel.layout=ma",
            "parallel.attention_ranks=4",
            "parallel.moe_ranks=1",
            "parallel.attention_replicas=2",
        ],
    ),
    (4, ["parallel.layout=ma", "parallel.attention_ranks=2", "parallel.moe_ranks=2"]),
]


@pytest.mark.parametrize("ranks, settings", MA, ids=[f"n{r}-" + "-".join(s[1:]) for r, s in MA])
def test_attention_moe_separation_equals_one_rank(tmp_path_factory, ranks, settings):
    path = finished_run(tmp_path_factory, ranks, "debug", *settings)
    assert_same_run(read_run(path), read_run(finished_run(tmp_path_factory, 1, "debug")))
    with h5py.File(path) as f:
        metrics = f["metrics"].attrs
        assert f.attrs["layout"] == "ma" and metrics["tpot_ms"] > 0 and metrics["tps"] > 0
        assert 0 < metrics["busy_fraction_attention"] <= 1 and 0 < metrics["busy_fraction_moe"] <= 1
        attention = int(next(s for s in settings if s.startswith("parallel.attention_ranks=")).split("=")[1])
        assert set(f["placement"][0, :, 0]) == set(range(attention, ranks))  # experts live on the MoE ranks
        assert f["routing"][:, :, attention:].sum() == 0  # MoE ranks route nothing themselves
        assert 0 < metrics["peak_rss_bytes_moe"] and 0 < metrics["peak_rss_bytes_attention"]


def test_zero_traffic_peers_and_empty_ranks_equal_one_rank(tmp_path_factory):
    """Skewed routing sends nothing to the ranks of experts 2 and 3; packing leaves rank 3 without experts."""
    skewed = finished_run(tmp_path_factory, 4, "skewed")
    assert_same_run(read_run(skewed), read_run(finished_run(tmp_path_factory, 1, "skewed")))
    with h5py.File(skewed) as f:
        received = f["traffic"][:].sum(axis=(0, 1, 2))
        assert received[2] == received[3] == 0 and received[0] > 0 and received[1] > 0
    empty = finished_run(
        tmp_path_factory,
        4,
        "debug",
        "parallel.placement=packed",
        "parallel.experts_per_rank=2",
        "run.micro_batches=2",
        "run.decode_micro_batch_min=1",
    )
    with h5py.File(empty) as f:
        assert set(f["placement"][0, :, 0]) == {0, 1}  # ranks 2 and 3 host nothing
    assert_same_run(read_run(empty), read_run(finished_run(tmp_path_factory, 1, "debug")))


def test_attention_standby_pairs_agree_bit_for_bit(tmp_path_factory):
    """2 primaries + their 2 standbys + 1 MoE rank: same tokens, each standby's KV cache equals its
    primary's."""
    path = finished_run(
        tmp_path_factory,
        5,
        "debug",
        "parallel.layout=ma",
        "parallel.attention_ranks=4",
        "parallel.moe_ranks=1",
        "parallel.attention_standby=true",
    )
    assert_same_run(read_run(path), read_run(finished_run(tmp_path_factory, 1, "debug")))
    with h5py.File(path) as f:
        digest = f["metrics/kv_cache_digest"][:]
    assert digest[0] == digest[2] and digest[1] == digest[3] and digest[0] != digest[1]


def test_sixteen_ranks_on_four_nodes_equal_one_rank(tmp_path_factory):
    """EP 16, the seeds' large-EP threshold: one expert per rank, 4 (emulated) nodes of 4."""
    reference = read_run(finished_run(tmp_path_factory, 1, "sixteen_experts"))
    for dispatch in ("flat", "two_stage"):
        path = finished_run(
            tmp_path_factory,
            16,
            "sixteen_experts",
            "parallel.ranks_per_node=4",
            f"parallel.dispatch={dispatch}",
        )
        with h5py.File(path) as f:
            assert f.attrs["num_nodes"] == 4 and f["placement"].attrs["mode"] == "one_per_rank"
        assert_same_run(read_run(path), reference)


def test_placement_from_an_earlier_run_uses_its_routing(tmp_path_factory):
    earlier = finished_run(tmp_path_factory, 1, "debug")
    path = finished_run(
        tmp_path_factory,
        4,
        "debug",
        "parallel.placement=replicated",
        "parallel.experts_per_rank=2",
        f"parallel.placement_from={earlier}",
    )
    with h5py.File(path) as f:
        assert f["placement"].attrs["source"] == f"routing of {earlier}"
        assert f["metrics"].attrs["placement_from_rank_load_max_over_mean"] >= 1
    assert_same_run(read_run(path), read_run(earlier))


def test_capacity_limit_drops_overflow_and_says_how_much(tmp_path_factory):
    """Lossy, so outside the equality contract: only the bookkeeping is checked."""
    path = finished_run(tmp_path_factory, 2, "debug", "parallel.capacity_factor=0.5")
    with h5py.File(path) as f:
        dropped = f["metrics"].attrs["dropped_token_slots"]
        routed = f["routing"][:].sum()
        sent = f["traffic"][:].sum() // (64 * 4)
        assert dropped > 0 and sent == routed - dropped


def test_run_file_has_the_whole_schema(tmp_path_factory):
    path = finished_run(tmp_path_factory, 4, "debug")
    with h5py.File(path) as f:
        for name in (
            "config",
            "hpcmoe_version",
            "world_size",
            "ranks_per_node",
            "layout",
            "device",
            "started",
            "finished",
            "complete",
        ):
            assert name in f.attrs, name
        assert f.attrs["complete"] and f.attrs["world_size"] == 4 and f.attrs["layout"] == "ep"
        config = f.attrs["config"]
        assert "num_experts: 4" in config and "preset: debug" in config
        lengths, prompts = f["prompt_lengths"][:], f["prompt_ids"][:]
        batch, steps = 6, 16
        assert prompts.shape == (batch, lengths.max()) and prompts.dtype == np.int64
        assert all(
            (prompts[i, n:] == -1).all() and (prompts[i, :n] >= 0).all() for i, n in enumerate(lengths)
        )
        assert f["generated"].shape == (batch, steps) and (f["generated"][:] >= 0).all()
        logits = f["logits"][:]
        assert logits.shape == (batch, steps, 512) and logits.dtype == np.float32
        assert (logits.argmax(-1) == f["generated"][:]).all()  # logits[:, j] chose generated[:, j]
        routing = f["routing"][:]
        assert routing.shape == (steps, 2, 4, 4)
        tokens_per_step = np.array([lengths.sum()] + [batch] * (steps - 1))
        assert (routing.sum(axis=(2, 3)) == tokens_per_step[:, None] * 2).all()  # tokens x top_k
        traffic = f["traffic"][:]
        assert traffic.shape == (steps, 2, 4, 4)
        # one expert per rank: bytes to rank d = slots sent to expert d x hidden x 4 bytes
        assert (traffic == routing * 64 * 4).all()
        assert (f["placement"][:] == np.arange(4).reshape(1, 4, 1)).all()
        for name in (
            "prompt_ids",
            "prompt_lengths",
            "generated",
            "logits",
            "routing",
            "traffic",
            "placement",
            "timings",
        ):
            assert len(f[name].attrs["axes"]) == f[name].ndim, name
        timings = f["timings"][:]
        assert set(timings.dtype.names) == {"rank", "layer", "micro_batch", "step", "phase", "start", "end"}
        assert set(timings["rank"]) == {0, 1, 2, 3} and set(timings["step"]) == set(range(steps))
        assert {b"attention", b"route", b"dispatch_post", b"experts", b"combine", b"step"} <= set(
            timings["phase"]
        )
        assert (timings["end"] >= timings["start"]).all() and (timings["start"] >= 0).all()
        metrics = dict(f["metrics"].attrs)
        for name in (
            "ttft_ms",
            "tpot_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "tps",
            "busy_fraction",
            "idle_fraction",
            "rank_load_max_over_mean",
        ):
            assert metrics[name] > 0, name
        assert f["metrics/peak_rss_bytes"].shape == (4,) and (f["metrics/peak_rss_bytes"][:] > 2**20).all()
        # the start-up estimate beside the peak, each rank's own ([5/7]: within 15% above it, or below)
        peak, estimate = f["metrics/peak_rss_bytes"][:], f["metrics/memory_estimate_bytes"][:]
        assert 0.7 < (peak / estimate).min() and (peak / estimate).max() <= 1.15
        assert np.isclose(metrics["peak_over_estimate"], (peak / estimate).max())
        steps_s = f["metrics/step_seconds"][:]
        assert np.isclose(metrics["ttft_ms"], 1e3 * steps_s[0])
        assert np.isclose(metrics["tpot_ms"], 1e3 * steps_s[1:].mean())
        assert np.isclose(metrics["prefill_tokens_per_s"], lengths.sum() / steps_s[0])


def test_bfloat16_run_sends_half_the_bytes_and_stays_close_to_float32(tmp_path_factory):
    """bfloat16 is outside the equality contract: payloads travel as raw 2-byte values."""
    bf16 = finished_run(tmp_path_factory, 2, "debug", "model.dtype=bfloat16")
    fp32 = finished_run(tmp_path_factory, 2, "debug")
    with h5py.File(bf16) as f, h5py.File(fp32) as g:
        assert f["traffic"][:].sum() == f["routing"][:].sum() * 64 * 2  # token slots x hidden x 2 bytes
        assert g["traffic"][:].sum() == g["routing"][:].sum() * 64 * 4
        assert np.abs(f["logits"][:, 0] - g["logits"][:, 0]).max() < 0.25


@pytest.mark.parametrize(
    "settings, message",
    [
        (["model.hiddn=3"], "hpcmoe: error: unknown config key model.hiddn"),
        (["model.hidden=wide"], "hpcmoe: error: model.hidden: expected an integer, got 'wide'"),
        (
            ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=2"],
            "hpcmoe: error: world size (4) must equal parallel.attention_ranks (3) + parallel.moe_ranks (2)",
        ),
        (
            [
                "parallel.layout=ma",
                "parallel.attention_ranks=2",
                "parallel.moe_ranks=2",
                "model.heads=1",
                "model.kv_heads=1",
            ],
            "hpcmoe: error: model.heads (1) must be >= attention ranks per replica (2)",
        ),
        (
            ["parallel.layout=ma", "parallel.attention_ranks=auto", "parallel.moe_ranks=auto"],
            "hpcmoe: error: parallel.attention_ranks: auto needs parallel.predictor: PATH, a machine file "
            "(every split "
            "simulated on it",
        ),
        (
            ["model.num_experts=2", "model.top_k=1", "parallel.placement=one_per_rank"],
            "hpcmoe: error: parallel.placement=one_per_rank needs model.num_experts (2) == world size (4)",
        ),
        (
            ["parallel.expert_tp=3"],
            "hpcmoe: error: parallel.expert_tp (3) must divide model.expert_hidden (128)",
        ),
        (["parallel.rebalance={}"], "hpcmoe: error: parallel.rebalance needs spare expert slots"),
    ],
)
def test_bad_input_fails_on_every_rank_with_one_line_and_no_file(tmp_path, settings, message):
    output = tmp_path / "out.h5"
    result = run_job(4, output, *settings)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)
    assert os.listdir(tmp_path) == []


def test_exception_on_one_rank_ends_the_whole_job(tmp_path):
    output = tmp_path / "out.h5"
    result = run_job(4, output, "run.fail_rank=2", "run.fail_at_layer=1", "run.fail_at_step=1", timeout=60)
    assert result.returncode not in (0, 124), "the job must abort, not hang until the timeout"
    assert "hpcmoe: rank 2: unhandled RuntimeError" in result.stderr
    assert "injected failure (run.fail_rank=2) at step 1 layer 1" in result.stderr
    assert not os.path.exists(output)
    for leftover in tmp_path.iterdir():  # at most the temporary file, never one that claims completeness
        assert leftover.name == "out.h5.tmp"
        try:
            with h5py.File(leftover, "r", locking=False) as f:
                assert not f.attrs["complete"]
        except OSError:
            pass  # killed in the middle of a write: unreadable, which claims nothing either


def test_hierarchical_sum_on_sixteen_ranks_of_four_nodes():
    """The in-process reduction test at -n 16: nodes of 4+4+4+4, 3+3+3+3+3+1 and 2 x 8."""
    command = [
        "timeout",
        "300",
        mpiexec(),
        "-n",
        "16",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--with-mpi",
        "-m",
        "mpi",
        "-p",
        "no:cacheprovider",
        "tests/test_mpi.py",
        "-k",
        "hierarchical",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=330)
    assert result.returncode == 0 and "6 passed" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
