"""The model in one process: caching, padding, seeding, and the margins equality relies on."""

import pytest
import torch

from hpcmoe.config import load_config
from hpcmoe.model.attention import kv_heads_for, split_heads
from hpcmoe.model.build import build_model
from hpcmoe.model.router import score_gap
from hpcmoe.model.step import StepInputs
from hpcmoe.model.transformer import forward_local, generate_local
from tests.conftest import DEBUG_CONFIG, WORKLOADS

torch.set_num_threads(1)


def debug_model(*settings):
    config = load_config(DEBUG_CONFIG, list(settings))
    return config, build_model(config.model, list(range(config.model.num_experts)))


def recording_margins(monkeypatch) -> list:
    """Record the margin of every top-k choice the routers make (expert and group choices)."""
    from hpcmoe.model import router

    margins, choose = [], router.topk_lower_index_first

    def recording(scores, k):
        if len(scores):
            margins.append(float(score_gap(scores, k).min()))
        return choose(scores, k)

    monkeypatch.setattr(router, "topk_lower_index_first", recording)
    return margins


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_greedy_and_router_margins_are_wide_enough(workload, monkeypatch):
    """Equality of n-rank and 1-rank tokens must not rest on luck: logit gap >= 1e-3, router gap >= 1e-5."""
    config, model = debug_model(*WORKLOADS[workload])
    router_margins = recording_margins(monkeypatch)
    _, logits = generate_local(model, config.prompts, config.run.max_new_tokens)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() >= 1e-3
    assert len(router_margins) == config.run.max_new_tokens * config.model.moe_layers
    assert min(router_margins) >= 1e-5


def test_kv_cache_decode_equals_recomputing_the_whole_sequence():
    config, model = debug_model()
    prompts = config.prompts[:3]
    tokens, logits = generate_local(model, prompts, 5)
    for i, prompt in enumerate(prompts):
        sequence = prompt + tokens[i, :-1].tolist()
        for j in range(5):
            upto = sequence[: len(prompt) + j]
            inputs = StepInputs.build([upto], torch.zeros(1, dtype=torch.int64))
            full = forward_local(model, inputs, model.new_cache(1, len(upto)))
            torch.testing.assert_close(logits[i, j], full[0], atol=1e-4, rtol=0)


def test_each_request_is_computed_as_if_it_ran_alone():
    config, model = debug_model()
    prompts = config.prompts
    assert len({len(p) for p in prompts}) > 1
    tokens, logits = generate_local(model, prompts, 4)
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_logits = generate_local(model, [prompt], 4)
        assert torch.equal(alone_tokens[0], tokens[i])
        torch.testing.assert_close(alone_logits[0], logits[i], atol=1e-5, rtol=0)


def test_weights_depend_only_on_the_tensor_name():
    config, everything = debug_model()
    one = build_model(config.model, [2])
    experts = lambda model: model.layers[1].mlp.experts
    assert list(experts(one)) == ["2"]
    assert torch.equal(experts(one)["2"].gate_proj.weight, experts(everything)["2"].gate_proj.weight)
    assert torch.equal(one.embed_tokens.weight, everything.embed_tokens.weight)
    assert not torch.equal(
        experts(everything)["1"].gate_proj.weight, experts(everything)["2"].gate_proj.weight
    )
    _, other_seed = debug_model("model.seed=1")
    assert not torch.equal(other_seed.embed_tokens.weight, everything.embed_tokens.weight)


def test_bfloat16_model_generates_close_to_float32():
    config, model = debug_model()
    _, bf16 = debug_model("model.dtype=bfloat16")
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    _, logits32 = generate_local(model, config.prompts[:2], 2)
    _, logits16 = generate_local(bf16, config.prompts[:2], 2)
    assert logits16.dtype == torch.float32
    assert (logits16[:, 0] - logits32[:, 0]).abs().max() < 0.25  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize(
    "heads, kv_heads, ranks", [(32, 8, 12), (8, 4, 3), (8, 2, 5), (7, 7, 3), (16, 1, 16), (6, 3, 4)]
)
def test_uneven_head_splits_cover_every_head_once_with_the_kv_heads_they_need(heads, kv_heads, ranks):
    shards = split_heads(heads, ranks)
    assert [h for shard in shards for h in shard] == list(range(heads))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for shard in shards:
        kv = kv_heads_for(shard, heads, kv_heads)
        assert {h // (heads // kv_heads) for h in shard} == set(kv)
    if (heads, ranks) == (32, 12):
        assert [len(s) for s in shards] == [3] * 8 + [2] * 4
    if (heads, ranks) == (8, 3):
        assert [len(s) for s in shards] == [3, 3, 2]


MLA = [
    "model.attention=mla",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
]


@pytest.mark.parametrize("settings", [[], MLA], ids=["gqa", "mla"])
@pytest.mark.parametrize("t", [5, 1], ids=["prefill", "decode"])
def test_head_shards_hold_their_slices_and_their_partials_sum_to_the_whole(settings, t):
    """8 heads on 3 ranks (3+3+2; GQA: kv head 2 is read by two shards), each shard built on its own
    from the seeded weights: its partial outputs sum to the whole layer's (MLA: absorbed at decode)."""
    config, model = debug_model(*settings)
    x = torch.randn(2, t, 64, generator=torch.Generator().manual_seed(0))
    inputs = StepInputs.build([[1] * t, [1] * max(t - 2, 1)], torch.zeros(2, dtype=torch.int64))
    whole = model.layers[0].self_attn
    expected = whole(x, whole.new_cache(2, 5, torch.float32), inputs)
    partials = []
    for heads in split_heads(8, 3):
        shard = build_model(config.model, [], heads=heads).layers[0].self_attn
        for name, param in shard.named_parameters():
            full = dict(whole.named_parameters())[name]
            part = shard.weight_slices().get(name)
            assert torch.equal(param, full.narrow(part[0], part[1], part[2] - part[1]) if part else full), (
                name
            )
        partials.append(shard(x, shard.new_cache(2, 5, torch.float32), inputs))
    torch.testing.assert_close(sum(partials), expected, atol=1e-5, rtol=0)


def test_vocabulary_split_greedy_choice_equals_the_whole_head_ties_included():
    from hpcmoe.parallel.layout import request_range
    from hpcmoe.runtime.ma import greedy_over_slices

    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 50), generator=generator).float()  # many ties, across slices too
    logits[0] = 3.0  # a tie over the whole vocabulary
    for parts in (1, 3, 7):
        slices = [request_range(50, parts, i) for i in range(parts)]
        best = torch.stack([logits[:, s.start : s.stop].max(-1).values for s in slices])
        index = torch.stack([logits[:, s.start : s.stop].max(-1).indices + s.start for s in slices])
        chosen = greedy_over_slices(best, index)
        assert torch.equal(chosen, logits.argmax(-1)) and chosen[0] == 0
    assert (logits == logits.max(-1, keepdim=True).values).sum(-1).gt(1).sum() > 30  # ties were exercised
    with pytest.raises(ValueError, match=r"model.heads \(8\) must be >= attention ranks per replica \(9\)"):
        split_heads(8, 9)
