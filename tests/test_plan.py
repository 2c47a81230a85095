"""`hpcmoe plan`: memory per rank without building, checked against what the engine builds."""

import json
import resource
import subprocess
import sys

import pytest

from hpcmoe.config import load_config
from tests.conftest import DEBUG_CONFIG, ROOT


def held_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize(
    "ranks, settings",
    [
        (4, []),
        (3, []),
        (2, ["model.num_experts=8", "run.seed=2"]),
        (8, ["parallel.expert_tp=2"]),
        (4, ["parallel.expert_tp=2", "parallel.placement=packed"]),
        (4, ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]),
        (5, ["parallel.layout=ma", "parallel.attention_ranks=2", "parallel.moe_ranks=3"]),
    ],
)
def test_plan_weights_equal_the_built_model(ranks, settings):
    from hpcmoe.model.attention import split_heads
    from hpcmoe.model.build import build_experts, build_model
    from hpcmoe.parallel.layout import ParallelLayout, request_range
    from hpcmoe.parallel.plan import rank_memory

    config = load_config(DEBUG_CONFIG, settings)
    m = config.model
    memory = rank_memory(config, ranks)
    assert memory["total_weight_bytes"] == held_bytes(build_model(m, list(range(m.num_experts))))
    layout = ParallelLayout.from_config(config, ranks)
    placement = layout.placement((0,) * ranks)
    if config.parallel.layout == "ma":
        shards = len(layout.primaries(0))
        attention = build_model(
            m, [], heads=split_heads(m.heads, shards)[0], vocab=request_range(m.vocab, shards, 0)
        )
        assert memory["roles"]["attention"]["weights"] == held_bytes(attention)
        fullest = max(range(layout.attention_ranks, ranks), key=lambda r: len(placement.experts_of_rank(r)))
        assert memory["roles"]["moe"]["weights"] == held_bytes(
            build_experts(m, placement.experts_of_rank(fullest))
        )
        # what the engine makes
        cache = attention.new_cache(
            len(layout.group_requests(len(config.prompts), 0)),
            max(map(len, config.prompts)) + config.run.max_new_tokens,
        )
        assert memory["roles"]["attention"]["kv_cache"] == sum(
            c.data.numel() * 4 for layer in cache for c in layer
        )
    else:
        fullest = max(range(ranks), key=lambda r: len(placement.experts_of_rank(r)))
        tp = config.parallel.expert_tp
        assert memory["roles"]["ep"]["weights"] == held_bytes(
            build_model(m, placement.experts_of_rank(fullest), expert_shard=(fullest % tp, tp))
        )


def test_the_deepseek_v3_preset_plans_in_seconds_without_memory(tmp_path):
    """The seeds' setting: DeepSeek-V3 (1.2 TiB in bf16) on 256 ranks of 64 GiB devices."""
    out = tmp_path / "plan.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpcmoe",
            "plan",
            f"{ROOT}/inputs/debug.yaml",
            "--set",
            "model.preset=deepseek-v3",
            "--set",
            "run.batch=64",
            "--set",
            "run.prompt_len=1024",
            "--ranks",
            "256",
            "--device-memory",
            "64",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    # under 1 GiB (KiB units)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < max(before, 2**20)
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["total_weight_bytes"] > 1.3e12 and plan["max_rank_bytes"] < 64 * 2**30
    assert plan["roles"]["ep"]["experts_per_rank"] == 1 and 1 < plan["smallest_ranks_that_fit"] < 256
    assert "fits in 64.0 GiB per rank" in result.stdout


def test_plan_suggests_expert_groups_when_one_expert_is_too_large():
    """Experts of 16384 (about 24 MiB of weights a rank at one expert per rank, 47 MiB with the prefill's
    expert activations) on 30 MiB devices: only halves fit (25 MiB: half the weights and activations)."""
    from hpcmoe.parallel.plan import plan

    config = load_config(DEBUG_CONFIG, ["model.expert_hidden=16384"])
    result = plan(config, 4, 30 * 2**20)
    assert not result["fits"]
    assert (result["smallest_ranks_that_fit"], result["smallest_fit_expert_tp"]) == (8, 2)
    halves = load_config(DEBUG_CONFIG, ["model.expert_hidden=16384", "parallel.expert_tp=2"])
    assert plan(halves, 8, 30 * 2**20)["fits"]


@pytest.mark.parametrize(
    "preset, published",
    [
        ("qwen3-235b-a22b", 235e9),
        ("qwen3-30b-a3b", 30.5e9),
        ("deepseek-v3", 671e9),
        ("glm-4.6", 355e9),
        ("minimax-m2", 230e9),
        ("gpt-oss-120b", 116.83e9),
        ("gpt-oss-20b", 20.91e9),
        ("kimi-k2", 1.04e12),
    ],
)
def test_a_published_preset_counts_its_published_parameters(preset, published):
    """`hpcmoe plan`'s whole-model bytes for a preset, in bfloat16, within 2% of the published count
    (DeepSeek-V3's 671B excludes its 14B multi-token prediction module, which hpcmoe does not run; GLM-4.6's
    355B includes its one, so hpcmoe counts 0.6% fewer; gpt-oss's experts are MXFP4, 4.25 bits a weight,
    so its 116.83B weigh 60.8 GiB; Kimi-K2's technical report gives 1.04T)."""
    from hpcmoe.parallel.plan import plan

    result = plan(load_config(None, [f"model.preset={preset}", "run.batch=1", "run.prompt_len=8"]), 64, 80e9)
    assert abs(result["total_parameters"] / published - 1) < 0.02, result["total_parameters"]
    bits = 8 * result["total_weight_bytes"] / result["total_parameters"]
    # (attention, embeddings: 16)
    assert 4.25 < bits < 5.5 if preset.startswith("gpt-oss") else bits == 16, bits
