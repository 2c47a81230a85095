"""Config loading, overrides and validation (pure: no MPI, no torch)."""

import pytest

from hpcmoe.config import PRESETS, load_config
from tests.conftest import DEBUG_CONFIG


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_debug_preset_resolves_every_field():
    config = load_config(DEBUG_CONFIG)
    m = config.model
    assert (m.vocab, m.hidden, m.num_layers, m.dense_layers, m.heads, m.head_dim, m.kv_heads) == (
        512,
        64,
        3,
        1,
        8,
        8,
        4,
    )
    assert (m.num_experts, m.top_k, m.expert_hidden, m.dtype, m.seed) == (4, 2, 128, "float32", 0)
    assert m.norm_topk_prob and m.moe_layers == 2


def test_overrides_parse_values_as_yaml():
    config = load_config(
        DEBUG_CONFIG,
        [
            "model.num_experts=8",
            "model.norm_eps=1e-5",
            "run.prompt_ids=[[1, 2, 3], [4]]",
            "output.save_logits=false",
        ],
    )
    assert config.model.num_experts == 8 and config.model.norm_eps == 1e-5
    assert config.prompts == [[1, 2, 3], [4]] and config.output.save_logits is False


def test_link_mapping_sets_the_nested_section():
    config = load_config(DEBUG_CONFIG, ["parallel.link={bandwidth_gbps: 1, latency_us: 100}"])
    assert (config.parallel.link.bandwidth_gbps, config.parallel.link.latency_us) == (1.0, 100.0)


def test_mapping_override_sets_a_whole_section():
    config = load_config(None, ["model={preset: debug, num_experts: 6, top_k: 3}"])
    assert (config.model.num_experts, config.model.top_k, config.model.hidden) == (6, 3, 64)


def test_yaml_11_exponent_string_becomes_a_float(tmp_path):
    config = load_config(write(tmp_path, "model: {preset: debug, norm_eps: 1e-3}\n"))
    assert config.model.norm_eps == 1e-3


def test_synthetic_prompts_are_seeded_and_within_bounds():
    config = load_config(DEBUG_CONFIG)
    prompts = config.prompts
    assert prompts == load_config(DEBUG_CONFIG).prompts
    assert len(prompts) == config.run.batch
    assert all(config.run.prompt_len_min <= len(p) <= config.run.prompt_len for p in prompts)
    assert len({len(p) for p in prompts}) > 1, "the default workload should mix prompt lengths"
    assert prompts != load_config(DEBUG_CONFIG, ["run.seed=1"]).prompts


@pytest.mark.parametrize(
    "settings, message",
    [
        (["model.hiddn=3"], "unknown config key model.hiddn: did you mean hidden"),
        (["modle.hidden=3"], "unknown config section 'modle'"),
        (["model.hidden=wide"], "model.hidden: expected an integer, got 'wide'"),
        (["model.hidden=2.5"], "model.hidden: expected an integer, got 2.5"),
        (["model.norm_topk_prob=1"], "model.norm_topk_prob: expected true or false, got 1"),
        (["model.num_experts=true"], "model.num_experts: expected an integer, got True"),
        (["model.top_k=5"], "model.top_k: 5 must be <= model.num_experts (4)"),
        (["model.heads=6"], "model.heads: 6 must be a multiple of model.kv_heads (4)"),
        (["model.preset=huge"], "model.preset: 'huge' is not a preset"),
        (["model.dtype=float16"], "model.dtype: 'float16' is not supported"),
        (["parallel.placement=random"], "parallel.placement: 'random' is not supported"),
        (["parallel.ranks_per_node=0"], "parallel.ranks_per_node: expected an integer >= 1, got 0"),
        (["run.prompt_ids=[[1, 999]]"], "run.prompt_ids[0]: token [999] outside the vocabulary [0, 512)"),
        (["run.prompt_ids=[[1], 'x']"], "run.prompt_ids[1]: expected a list, got 'x'"),
        (["run.max_new_tokens=0"], "run.max_new_tokens: expected an integer >= 1, got 0"),
        (["run.fail_at_layer=3"], "run.fail_at_layer: 3 must be between 0 and 2"),
        (["run.prompt_len_min=100"], "run.prompt_len_min: 100 must be between 1 and run.prompt_len (24)"),
        (["model=3"], "model: expected a mapping, got 3"),
        (
            [
                "parallel.layout=ma",
                "parallel.attention_ranks=3",
                "parallel.moe_ranks=1",
                "parallel.attention_standby=true",
            ],
            "parallel.attention_standby pairs ranks: attention ranks per replica (3) must be even",
        ),
        (
            ["parallel.layout=ma", "parallel.attention_ranks=2", "parallel.moe_ranks=5"],
            "model.num_experts (4) must be >= parallel.moe_ranks (5)",
        ),
        (
            [
                "parallel.layout=ma",
                "parallel.attention_ranks=9",
                "parallel.moe_ranks=1",
                "model.attention=mla",
                "model.kv_lora_rank=16",
                "model.qk_nope_head_dim=8",
                "model.qk_rope_head_dim=4",
                "model.v_head_dim=8",
            ],
            "model.heads (8) must be >= attention ranks per replica (9)",
        ),
        (
            ["parallel.link={bandwidth: 1}"],
            "unknown config key parallel.link.bandwidth: did you mean bandwidth_gbps?",
        ),
        (["run.xyz=1"], "unknown config key run.xyz: expected one of batch, prompt_len"),
        (
            ["parallel.link={bandwidth_gbps: fast}"],
            "parallel.link.bandwidth_gbps: expected a number, got 'fast'",
        ),
        (
            ["parallel.link={bandwidth_gbps: 0}"],
            "parallel.link.bandwidth_gbps: expected a number > 0, got 0.0",
        ),
        (
            ["parallel.dispatch=alltoall"],
            "parallel.dispatch: 'alltoall' is not supported; expected flat or two_stage",
        ),
        (["parallel.capacity_factor=-1"], "parallel.capacity_factor: expected a number > 0, got -1.0"),
        (["run.micro_batches=0"], "run.micro_batches: expected an integer >= 1, got 0"),
        (["run.decode_micro_batch_min=0"], "run.decode_micro_batch_min: expected an integer >= 1, got 0"),
        (
            ["parallel.expert_schedule=per_token"],
            "parallel.expert_schedule: 'per_token' is not supported; expected per_layer, per_source or auto",
        ),
        (["model.checkpoint=/x", "model.hidden=3"], "model.preset and model.checkpoint: set one, not both"),
        (["model.hidden"], "--set 'model.hidden': expected KEY=VALUE"),
    ],
)
def test_bad_settings_name_the_key_value_and_expectation(settings, message):
    with pytest.raises(ValueError) as error:
        load_config(DEBUG_CONFIG, settings)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="model.preset: not set"):
        load_config(write(tmp_path, "run: {batch: 2}\n"))


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(DEBUG_CONFIG, ["model.num_experts=8"])
    again = load_config(write(tmp_path, config.to_yaml()))
    assert again == config
    assert set(PRESETS["debug"]) <= set(again.model.__dataclass_fields__)
