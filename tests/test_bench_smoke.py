"""Every `hpcmoe bench` benchmark runs end to end at the smallest size that still exercises its code,
and stores the JSON keys that docs/PERFORMANCE.md's scripts read (tools/bench_table.py renders each
result, as it does docs/bench/*.json). No timing is asserted: these only keep every documented
command from breaking silently (as `bench dispatch` once did, on a renamed MoE method).

Each case is the documented command line (tools/bench_all.sh, tools/gpu_check.sh) on the same input
file, shrunk with --set and --reps 1; MPI benchmarks run under `timeout mpiexec -n 2` (4 where a
variant needs 4 ranks). test_every_benchmark_is_covered fails when `hpcmoe bench` gains one that
is not here.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, mpiexec

TIMEOUT = 240
INPUTS = os.path.join(ROOT, "inputs")
TINY_RUN = [
    "run.batch=2",
    "run.prompt_len=8",
    "run.max_new_tokens=2",
    "model.expert_hidden=64",
    "model.dense_hidden=64",
]
TWO_NODES = ["parallel.ranks_per_node=1", "parallel.link={bandwidth_gbps: 1, latency_us: 100}"]


def sets(*settings):
    return [a for s in settings for a in ("--set", s)]


# name -> (ranks or None for one process without mpiexec, arguments after `hpcmoe bench NAME`, JSON file name
# as tools/bench_all.sh names it: bench_table.py reads the dispatch shape from it)
CASES = {
    "control": (
        None,
        ["--ranks", "4,8", "--experts", "8", "--top-k", "2", "--tokens", "8", "--ranks-per-node", "2"],
        "control.json",
    ),
    "experts": (
        None,
        [
            "--device",
            "cpu",
            "--hidden",
            "32",
            "--inner",
            "64",
            "--experts",
            "2",
            "--tokens",
            "8",
            "--decode-tokens",
            "2",
            "--dtype",
            "float32",
        ],
        "experts.json",
    ),
    "dispatch": (
        2,
        ["--tokens", "16", "--hidden", "32", "--dtype", "float32"],
        "dispatch_n2_h32_float32.json",
    ),
    "dispatch_bf16_spin": (
        2,
        ["--tokens", "16", "--hidden", "32", "--dtype", "bfloat16", "--wait", "spin"],
        "dispatch_n2_h32_bfloat16.json",
    ),
    "reduce": (
        2,
        [
            "--tokens",
            "8",
            "--hidden",
            "32",
            "--ranks-per-node",
            "1",
            "--link-gbps",
            "10",
            "--latency-us",
            "20",
        ],
        "reduce_n2.json",
    ),
    "overlap": (2, [os.path.join(INPUTS, "bench_overlap.yaml"), *sets(*TINY_RUN)], "overlap_n2.json"),
    # one_per_rank needs as many experts as ranks
    "placement": (
        2,
        [os.path.join(INPUTS, "bench_ep.yaml"), *sets(*TINY_RUN, "model.num_experts=2")],
        "placement_n2.json",
    ),
    "skew": (
        2,
        [os.path.join(INPUTS, "bench_ep.yaml"), *sets(*TINY_RUN, "model.router_skew=4")],
        "skew_n2.json",
    ),
    "wait": (2, [os.path.join(INPUTS, "bench_ep.yaml"), *sets(*TINY_RUN)], "wait_n2.json"),
    "dispatch_mode": (
        2,
        [os.path.join(INPUTS, "bench_ep.yaml"), *sets(*TINY_RUN, *TWO_NODES)],
        "dispatch_mode_n2.json",
    ),
    # groups of 2 ranks must share a node: 2 emulated nodes of 2
    "expert_tp": (
        4,
        [
            os.path.join(INPUTS, "bench_ep.yaml"),
            *sets(
                *TINY_RUN, "parallel.ranks_per_node=2", "parallel.link={bandwidth_gbps: 1, latency_us: 100}"
            ),
        ],
        "expert_tp_link_n4.json",
    ),
    # 4 experts in 6 slots (spare slots to rebalance into), the hot pair rotating every 2 steps
    "rebalance": (
        2,
        [
            os.path.join(INPUTS, "bench_rebalance.yaml"),
            *sets(
                "run.batch=4",
                "run.prompt_len=8",
                "run.max_new_tokens=8",
                "run.skew_drift=2",
                "model.expert_hidden=64",
                "model.dense_hidden=64",
                "model.num_experts=4",
            ),
        ],
        "rebalance_n2.json",
    ),
    "schedule": (
        2,
        [
            os.path.join(INPUTS, "bench_schedule.yaml"),
            *sets(
                *TINY_RUN,
                "model.hidden=64",
                "model.heads=4",
                "model.kv_heads=4",
                "model.head_dim=16",
                "model.vocab=256",
            ),
        ],
        "schedule_n2.json",
    ),
    # ma_3_1 is 3 attention ranks + 1 MoE rank; the ma-paper shape cut to a tiny model
    "ma": (
        4,
        [
            os.path.join(INPUTS, "bench_ma.yaml"),
            *sets(
                *TINY_RUN,
                "model.hidden=64",
                "model.heads=4",
                "model.kv_heads=4",
                "model.head_dim=16",
                "model.vocab=256",
            ),
        ],
        "ma_n4.json",
    ),
}
TRANSFORMERS_FAMILIES = ("mixtral", "deepseek_v3")  # tools/bench_all.sh runs both

# What every engine scenario stores for each variant (hpcmoe.analysis.bench.figures.run_sample), and the
# variants whose names docs/PERFORMANCE.md's tables show: baseline first.
SAMPLE_KEYS = {
    "ttft_ms",
    "tpot_ms",
    "tps",
    "idle_fraction",
    "busy_fraction",
    "rank_load_max_over_mean",
    "rank_load_max_over_mean_per_step",
    "internode_bytes",
    "attention_compute_ms",
    "expert_compute_ms",
}
VARIANTS = {
    "overlap": ["micro_batches_1", "micro_batches_4"],
    "placement": ["packed", "one_per_rank"],
    "skew": ["packed", "replicated"],
    "wait": ["spin", "yield"],
    "dispatch_mode": ["flat", "two_stage"],
    "expert_tp": ["members", "leader", "whole_experts"],
    "rebalance": ["static", "placement_from", "online", "online_unchunked"],
    "ma": ["ep", "ma_3_1"],
    "schedule": ["per_source", "per_layer", "auto"],
}
EXTRA_KEYS = {  # (scenario, variant) -> keys beyond SAMPLE_KEYS
    **{
        ("overlap", v): {"wire_hidden", "wire_hidden_raw", "ttft_nolink_ms", "best_nolink_ms", "wire_ms"}
        for v in ("micro_batches_1", "micro_batches_4")
    },
    ("rebalance", "online"): {"switches", "moved_mib", "moving_tps_ratio"},
    ("rebalance", "online_unchunked"): {"switches", "moved_mib", "moving_tps_ratio"},
    ("ma", "ma_3_1"): {"busy_fraction_attention", "busy_fraction_moe"},
    **{
        ("schedule", v): {"experts_ms_per_layer", "weight_read_ms_per_layer"}
        for v in ("per_source", "per_layer", "auto")
    },
}
SCENARIO_TOP_KEYS = {
    "benchmark",
    "what",
    "goal",
    "ranks",
    "reps",
    "oversubscribed",
    "config",
    "settings",
    "median",
}


def bench(ranks, name, *args, timeout=TIMEOUT):
    """`timeout T [mpiexec -n ranks] python -m hpcmoe bench NAME args...` (no mpiexec when ranks is None)."""
    launcher = [mpiexec(), "-n", str(ranks)] if ranks else []
    command = ["timeout", str(timeout), *launcher, sys.executable, "-m", "hpcmoe", "bench", name, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 30, cwd=ROOT)


def run_to_json(ranks, name, args, out):
    result = bench(ranks, name, *args, "--reps", "1", "--out", str(out))
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    assert out.is_file(), result.stdout
    return json.loads(out.read_text())


def assert_table_renders(directory, benchmark):
    """tools/bench_table.py (the tables of docs/PERFORMANCE.md) reads the stored result."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_table.py"), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert benchmark in result.stdout


def check_scenario(name, result):
    variants = VARIANTS[name]
    assert SCENARIO_TOP_KEYS <= set(result), set(result)
    assert result["benchmark"] == name and result["reps"] == 1
    assert list(result["median"]) == variants
    assert list(result[f"ratio_to_{variants[0]}"]) == variants
    for variant in variants:
        expected = SAMPLE_KEYS | EXTRA_KEYS.get((name, variant), set())
        assert expected <= set(result["median"][variant]), (
            variant,
            expected - set(result["median"][variant]),
        )
        assert result["median"][variant]["ttft_ms"] > 0 and result["median"][variant]["tps"] > 0
    if name == "overlap":  # clamped, with its [min, max] over the reps
        for variant in variants:
            low, high = result["spread"][variant]["wire_hidden"]
            assert 0 <= low <= result["median"][variant]["wire_hidden"] <= high <= 1


def check(name, result):
    if name == "control":
        assert set(result["median"]) == {"ranks_4", "ranks_8"}
        assert all(
            m["flat_ms"] > 0
            and m["two_stage_stage1_ms"] > 0
            and m["per_layer_exchange_ms"] > 0
            and m["per_source_exchange_ms"] > 0
            for m in result["median"].values()
        )
        assert "what" in result and "ratio_to_ranks_4" in result
    elif name == "experts":
        assert result["device"] == "cpu" and "bf16_peak_tflops" in result
        assert {
            "prefill_tflops",
            "prefill_vs_matmul",
            "prefill_fraction_of_bf16_peak",
            "decode_weight_gbps",
            "copy_gbps",
            "decode_vs_copy",
        } <= set(result["derived"])
        assert {"prefill_seconds", "decode_seconds", "copy_seconds"} <= set(result["median"]["ours"])
        assert "prefill_seconds" in result["median"]["torch_matmul"]
    elif name.startswith("dispatch") and name != "dispatch_mode":
        assert result["benchmark"] == "dispatch"
        assert result["ratio_to_raw_alltoallv"]["ours"]["seconds"] > 0  # the key scripts read
        assert result["median"]["ours"]["seconds"] > 0 and result["median"]["raw_alltoallv"]["seconds"] > 0
        assert result["bytes_per_rank_each_way"] > 0 and "oversubscribed" in result
    elif name == "reduce":
        assert list(result["median"]) == ["flat_allreduce", "leader_sum", "hierarchical"]
        assert all(result["median"][v]["seconds"] > 0 for v in result["median"])
        assert all(
            result["median"][v]["internode_bytes_per_rank"] > 0 for v in ("leader_sum", "hierarchical")
        )
        assert set(result["ratio_to_leader_sum"]) == set(result["median"])
        assert "flat_allreduce_bytes_per_rank_bandwidth_optimal" in result
    else:
        check_scenario(name, result)


def test_every_benchmark_is_covered():
    """`hpcmoe bench --help` lists no benchmark this module does not run."""
    result = subprocess.run(
        [sys.executable, "-m", "hpcmoe", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.search(r"\{([a-z_,]+)\}", result.stdout).group(1).split(","))
    assert listed == {n for n in CASES if n != "dispatch_bf16_spin"} | {"transformers"}


@pytest.mark.parametrize("name", list(CASES))
def test_bench_runs_and_stores_the_documented_keys(name, tmp_path):
    ranks, args, filename = CASES[name]
    benchmark = "dispatch" if name == "dispatch_bf16_spin" else name
    result = run_to_json(ranks, benchmark, args, tmp_path / filename)
    check(name, result)
    assert_table_renders(tmp_path, benchmark)


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_bench_transformers_on_a_tiny_checkpoint(family, tmp_path):
    """`hpcmoe bench transformers --checkpoint DIR` (one process) on tools/make_tiny_checkpoint.py's model."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_checkpoint import make

    checkpoint = tmp_path / family
    make(family, str(checkpoint))
    out = tmp_path / "results" / f"transformers_{family}.json"
    result = run_to_json(
        None,
        "transformers",
        [
            "--checkpoint",
            str(checkpoint),
            "--batch",
            "2",
            "--prompt-len",
            "4",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
        out,
    )
    assert list(result["median"]) == ["transformers", "hpcmoe"] and result["device"] == "cpu"
    assert result["tokens_equal"] is True  # hpcmoe ran the checkpoint's weights, not seeded random ones
    for variant in ("transformers", "hpcmoe"):
        assert result["median"][variant]["prefill_tokens_per_s"] > 0
        assert result["median"][variant]["decode_tokens_per_s"] > 0
    assert {"prefill_tokens_per_s", "decode_tokens_per_s"} <= set(result["ratio_to_transformers"]["hpcmoe"])
    assert_table_renders(out.parent, "transformers")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Bad inputs: one line `hpcmoe: error: ...` per process, exit 2, no traceback, no JSON.
BAD = {
    "experts_cuda_without_gpu": (
        None,
        "experts",
        ["--device", "cuda", "--hidden", "32", "--inner", "64"],
        "bench experts --device cuda: torch sees no GPU",
    ),
    "transformers_cuda_without_gpu": (
        None,
        "transformers",
        ["--checkpoint", "unused", "--device", "cuda"],
        "bench transformers --device cuda: torch sees no GPU",
    ),
    "scenario_cuda_without_gpu": (
        2,
        "wait",
        [os.path.join(INPUTS, "bench_ep.yaml"), "--set", "run.device=cuda"],
        "run.device: cuda, but torch sees no GPU",
    ),
    "overlap_without_link": (2, "overlap", [os.path.join(INPUTS, "debug.yaml")], "sets no parallel.link"),
    "ma_on_too_few_ranks": (
        2,
        "ma",
        [os.path.join(INPUTS, "bench_ma.yaml")],
        "variant ma_3_1 (parallel.layout=ma parallel.attention_ranks=3 parallel.moe_ranks=1) on "
        "2 ranks: world size (2) must equal",
    ),
    "expert_tp_groups_across_nodes": (
        2,
        "expert_tp",
        [os.path.join(INPUTS, "bench_ep.yaml"), "--set", "parallel.ranks_per_node=1"],
        "must be a multiple of parallel.expert_tp",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bench_input_fails_with_one_clear_line(case, tmp_path):
    ranks, name, args, message = BAD[case]
    if "cuda_without_gpu" in case and cuda_available():
        pytest.skip("a GPU is present: the CUDA paths run in tools/gpu_check.sh")
    out = tmp_path / "never.json"
    result = bench(ranks, name, *args, "--reps", "1", "--out", str(out), timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "unhandled" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error: ")]
    assert len(lines) == 1 and all(message in line for line in lines), result.stderr
    assert not out.exists()


def test_the_shipped_tables_render():
    """tools/bench_table.py on docs/bench as shipped (results of every kind, projections included)."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_table.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "### schedule (schedule_n4.json)" in result.stdout and "### dispatch + combine" in result.stdout


def test_bench_batching_tool_at_tiny_size(tmp_path):
    """tools/bench_batching.py (docs/PERFORMANCE.md) end to end on 24 prompts at -n 2: continuous
    and static, the kill -9 case and resume after SIGTERM; its JSON renders with bench_table.py."""
    out = tmp_path / "batching.json"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "bench_batching.py"),
            "--prompts",
            "24",
            "--ranks",
            "2",
            "--max-batch",
            "4",
            "--resume-prompts",
            "16",
            "--dir",
            str(tmp_path),
            "--timeout",
            "120",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    for kind in ("continuous", "static"):
        assert found["runs"][kind]["generated_tokens"] == found["runs"]["continuous"]["generated_tokens"] > 0
    assert found["kill"]["kept_equal_to_uninterrupted"] == found["kill"]["requests_kept"]
    table = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "bench_table.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0 and "### batching (batching.json)" in table.stdout, table.stderr
