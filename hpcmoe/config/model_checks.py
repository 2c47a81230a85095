"""The model section's checks: sizes, attention and router choices, rotary and YaRN scaling,
gpt-oss's features (sinks, sliding windows, biases, clamped SwiGLU, MXFP4) and quantized experts.
They need neither the parallel layout nor the run.
"""

from __future__ import annotations

import math

from hpcmoe.config.schema import DTYPES, MXFP4_BLOCK, ROPE_SCALING_KEYS, ModelConfig, require


def validate_model(m: ModelConfig) -> None:
    """The model section: its shape, routing, numbers, gpt-oss's features, positions, quantized experts
    and YaRN."""
    validate_shape(m)
    validate_routing(m)
    require(
        m.dtype is None or m.dtype in DTYPES,
        f"model.dtype: {m.dtype!r} is not supported; expected one of {', '.join(DTYPES)}",
    )
    require(m.norm_eps > 0, f"model.norm_eps: expected a number > 0, got {m.norm_eps}")
    for name in ("rope_theta", "routed_scaling_factor", "swiglu_alpha"):
        require(getattr(m, name) > 0, f"model.{name}: expected a number > 0, got {getattr(m, name)}")
    require(
        0 < m.partial_rotary_factor <= 1,
        f"model.partial_rotary_factor: expected a number in (0, 1], got {m.partial_rotary_factor}",
    )
    validate_gpt_oss_fields(m)
    require(
        m.max_positions is None or m.max_positions >= 1,
        f"model.max_positions: expected an integer >= 1, got {m.max_positions}",
    )
    require(
        m.fp8_block is None or (len(m.fp8_block) == 2 and min(m.fp8_block) >= 1),
        f"model.fp8_block: expected two integers >= 1 (the scale block's rows and columns), "
        f"got {m.fp8_block}",
    )
    if m.rope_scaling is not None:
        validate_rope_scaling(m.rope_scaling)


def validate_shape(m: ModelConfig) -> None:
    """The transformer's sizes, its attention and router kinds, query heads over key/value heads and
    rotary pairs."""
    positive = [
        "vocab",
        "hidden",
        "num_layers",
        "heads",
        "num_experts",
        "top_k",
        "expert_hidden",
        "dense_hidden",
    ]
    positive += (
        ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if m.attention == "mla"
        else ["kv_heads", "head_dim"]
    )
    for name in positive:
        require(getattr(m, name) >= 1, f"model.{name}: expected an integer >= 1, got {getattr(m, name)}")
    for name in ("q_lora_rank", "shared_experts"):
        require(getattr(m, name) >= 0, f"model.{name}: expected an integer >= 0, got {getattr(m, name)}")
    require(
        m.attention in ("gqa", "mla"),
        f"model.attention: {m.attention!r} is not supported; expected gqa or mla",
    )
    require(
        m.router in ("softmax", "sigmoid"),
        f"model.router: {m.router!r} is not supported; expected softmax or sigmoid",
    )
    require(
        0 <= m.dense_layers <= m.num_layers,
        f"model.dense_layers: {m.dense_layers} must be between 0 and model.num_layers ({m.num_layers})",
    )
    require(
        m.top_k <= m.num_experts, f"model.top_k: {m.top_k} must be <= model.num_experts ({m.num_experts})"
    )
    if m.attention == "gqa":
        require(
            m.heads % m.kv_heads == 0,
            f"model.heads: {m.heads} must be a multiple of model.kv_heads ({m.kv_heads})",
        )
    rotary = m.qk_rope_head_dim if m.attention == "mla" else m.head_dim
    require(
        rotary % 2 == 0,
        f"model.{'qk_rope_head_dim' if m.attention == 'mla' else 'head_dim'}: {rotary} "
        f"must be even (RoPE rotates pairs)",
    )


def validate_routing(m: ModelConfig) -> None:
    """Group-limited routing (DeepSeek's sigmoid router): groups that divide the experts, and enough
    experts in the groups a token may use for its top-k."""
    require(
        m.n_group >= 1 and m.num_experts % m.n_group == 0,
        f"model.n_group: {m.n_group} must divide model.num_experts ({m.num_experts})",
    )
    require(
        1 <= m.topk_group <= m.n_group,
        f"model.topk_group: {m.topk_group} must be between 1 and model.n_group ({m.n_group})",
    )
    require(
        m.top_k <= m.topk_group * (m.num_experts // m.n_group),
        f"model.top_k: {m.top_k} must be <= topk_group ({m.topk_group}) x experts per group "
        f"({m.num_experts // m.n_group})",
    )
    require(
        m.router == "sigmoid" or m.n_group == 1,
        "model.n_group: group-limited routing needs model.router: sigmoid",
    )


# against 0
ROPE_SCALING_NUMBERS = {
    "factor": ">",
    "original_max_position_embeddings": ">",
    "attention_factor": ">",
    "beta_fast": ">=",
    "beta_slow": ">=",
    "mscale": ">=",
    "mscale_all_dim": ">=",
}


def validate_rope_scaling(scaling: dict) -> None:
    """YaRN's keys: known, rope_type yarn, factor and original_max_position_embeddings given, every
    number a finite number (> 0, or >= 0 where 0 means the default), truncate true or false."""
    unknown = sorted(set(scaling) - set(ROPE_SCALING_KEYS))
    require(
        not unknown,
        f"model.rope_scaling.{unknown[0] if unknown else ''}: unknown key; expected "
        f"{', '.join(ROPE_SCALING_KEYS)}",
    )
    kind = scaling.get("rope_type")
    require(
        kind == "yarn",
        f"model.rope_scaling.rope_type: {kind!r} is not supported; expected yarn "
        f"(or no rope_scaling for plain RoPE)",
    )
    for key, bound in ROPE_SCALING_NUMBERS.items():
        value = scaling.get(key)
        if value is None and key not in ("factor", "original_max_position_embeddings"):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        require(
            number and (value > 0 if bound == ">" else value >= 0),
            f"model.rope_scaling.{key}: expected a number {bound} 0, got {value!r}",
        )
    truncate = scaling.get("truncate")
    require(
        truncate is None or isinstance(truncate, bool),
        f"model.rope_scaling.truncate: expected true or false, got {truncate!r}",
    )


def validate_gpt_oss_fields(m: ModelConfig) -> None:
    """Sinks, sliding windows, biases, the clamped SwiGLU and MXFP4 experts (gpt-oss's features)."""
    for name in ("attention_output_bias", "attention_sinks", "sliding_window"):
        require(
            m.attention == "gqa" or not getattr(m, name),
            f"model.{name}: only with model.attention: gqa (MLA has no such option here)",
        )
    if m.layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        require(
            len(m.layer_types) == m.num_layers,
            f"model.layer_types: {len(m.layer_types)} entries for model.num_layers ({m.num_layers}) layers",
        )
        bad = [kind for kind in m.layer_types if kind not in kinds]
        require(not bad, f"model.layer_types: {bad[:1]} is not one of {', '.join(kinds)}")
        require(
            "sliding_attention" not in m.layer_types or (m.sliding_window or 0) >= 1,
            f"model.sliding_window: sliding_attention layers need a window >= 1, got {m.sliding_window}",
        )
    require(
        m.sliding_window is None or m.sliding_window >= 1,
        f"model.sliding_window: expected an integer >= 1, got {m.sliding_window}",
    )
    require(
        m.swiglu_limit is None or m.swiglu_limit > 0,
        f"model.swiglu_limit: expected a number > 0, got {m.swiglu_limit}",
    )
    require(not m.router_bias or m.router == "softmax", "model.router_bias: only with model.router: softmax")
    require(
        not m.fp8_block or not (m.expert_bias or m.swiglu_limit),
        "model.fp8_block: FP8 experts run plain SwiGLU without biases; model.expert_bias and "
        "model.swiglu_limit need unquantized or MXFP4 experts",
    )
    if m.mxfp4:
        require(not m.fp8_block, "model.mxfp4 and model.fp8_block: an expert is stored one way, not both")
        for name in ("hidden", "expert_hidden"):
            require(
                getattr(m, name) % MXFP4_BLOCK == 0,
                f"model.{name}: {getattr(m, name)} must be a multiple of {MXFP4_BLOCK} with model.mxfp4 "
                f"(one exponent per {MXFP4_BLOCK} weights)",
            )
