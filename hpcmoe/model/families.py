"""The model families hpcmoe reads: a Hugging Face config.json -> hpcmoe's model fields, one
function per family (what each family's attention, router and experts are), with the checks that
refuse what hpcmoe does not run. Pure: no torch. Apart from the checkpoint's tensors because a
family is settled by its config.json alone, before any file of weights is opened.
"""

from __future__ import annotations

import os

from hpcmoe.model.checkpoint import read_config


class Fields(dict):
    """config.json's mapping; a field that is needed but absent is one clear error naming it and the file."""

    def __init__(self, values: dict, where: str):
        super().__init__(values)
        self.where = where

    def __missing__(self, key):
        raise ValueError(f"model.checkpoint: {self.where}: field {key!r} is missing")


def model_fields(directory: str) -> dict:
    """config.json -> hpcmoe model fields (pure: no torch)."""
    where = os.path.join(directory, "config.json")
    c = Fields(read_config(directory), where)
    kind = c.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(
            f"model.checkpoint: {where}: model_type {kind!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED)}"
        )
    if quant_method(c) == "mxfp4" and kind != "gpt_oss":
        raise ValueError(
            f"model.checkpoint: {where}: quantization_config mxfp4 is read for gpt_oss only, not {kind}"
        )
    block = None if quant_method(c) == "mxfp4" else fp8_block(c, where)
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"model.checkpoint: {where}: hidden_act {c['hidden_act']!r} is not supported; expected silu"
        )
    common = dict(
        vocab=c["vocab_size"],
        hidden=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        top_k=c["num_experts_per_tok"],
        norm_eps=float(c["rms_norm_eps"]),
        max_positions=c.get("max_position_embeddings"),
        fp8_block=block,
        **rope_fields(c, where),
    )
    return FAMILIES[kind](c, where, common)


def quant_method(c: dict) -> str | None:
    return (c.get("quantization_config") or {}).get("quant_method")


def gqa_heads(c: dict) -> dict:
    """Key/value heads and head width of grouped-query attention (absent: as many as the query heads,
    hidden / heads wide)."""
    return dict(
        kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
    )


def local_experts(c: dict) -> dict:
    """Mixtral's expert fields, which gpt-oss and MiniMax-M2 share: num_local_experts experts of
    intermediate_size (and no dense layers of another width)."""
    return dict(
        num_experts=c["num_local_experts"],
        expert_hidden=c["intermediate_size"],
        dense_hidden=c["intermediate_size"],
    )


def partial_rotary(c: dict) -> float:
    """The share of each head's features that rotate (GLM-4.5, MiniMax-M2), where transformers keeps it."""
    return (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))


def mixtral(c: Fields, where: str, common: dict) -> dict:
    if c.get("sliding_window") is not None:
        raise ValueError(f"model.checkpoint: {where}: sliding_window {c['sliding_window']} is not supported")
    return dict(
        common,
        attention="gqa",
        router="softmax",
        dense_layers=0,
        **gqa_heads(c),
        **local_experts(c),
        norm_topk_prob=True,
    )


def gpt_oss(c: Fields, where: str, common: dict) -> dict:
    """Sinks, sliding windows, biases, the clamped SwiGLU, MXFP4 experts."""
    bias = bool(c.get("attention_bias", True))
    types = c.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c["num_hidden_layers"])
    ]
    return dict(
        common,
        attention="gqa",
        router="softmax",
        router_bias=True,
        norm_topk_prob=True,
        dense_layers=0,
        attention_bias=bias,
        attention_output_bias=bias,
        attention_sinks=True,
        sliding_window=c.get("sliding_window"),
        layer_types=list(types),
        expert_bias=True,
        swiglu_limit=float(c["swiglu_limit"]),
        swiglu_alpha=float(c.get("swiglu_alpha", 1.702)),
        **gqa_heads(c),
        **local_experts(c),
        mxfp4=quant_method(c) == "mxfp4",
    )


def deepseek_router(c: Fields) -> dict:
    """DeepSeek-V3's router, shared experts and leading dense layers (GLM-4.5 and Kimi K2 have them too)."""
    return dict(
        router="sigmoid",
        num_experts=c["n_routed_experts"],
        shared_experts=c.get("n_shared_experts") or 0,
        n_group=c.get("n_group") or 1,
        topk_group=c.get("topk_group") or 1,
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=c.get("norm_topk_prob", True),
        dense_layers=c["first_k_dense_replace"],
        expert_hidden=c["moe_intermediate_size"],
        dense_hidden=c["intermediate_size"],
    )


def glm4_moe(c: Fields, where: str, common: dict) -> dict:
    """DeepSeek-V3's router with grouped-query attention."""
    router = deepseek_router(c)
    return dict(
        common,
        **router,
        attention="gqa",
        qk_norm=bool(c.get("use_qk_norm")),
        attention_bias=bool(c.get("attention_bias")),
        partial_rotary_factor=float(partial_rotary(c)),
        **gqa_heads(c),
    )


def minimax_m2(c: Fields, where: str, common: dict) -> dict:
    """Sigmoid top-k with the correction bias, no groups; q/k norm over all heads."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    partial = (c.get("rotary_dim") or head_dim) / head_dim if "rotary_dim" in c else partial_rotary(c)
    return dict(
        common,
        attention="gqa",
        router="sigmoid",
        dense_layers=0,
        qk_norm=True,
        qk_norm_all_heads=True,
        partial_rotary_factor=float(partial),
        **gqa_heads(c),
        **local_experts(c),
        norm_topk_prob=True,
    )


def no_attention_bias(c: Fields, where: str) -> None:
    if c.get("attention_bias"):
        raise ValueError(f"model.checkpoint: {where}: attention_bias true is not supported")


def qwen3_moe(c: Fields, where: str, common: dict) -> dict:
    no_attention_bias(c, where)
    if c.get("use_sliding_window"):
        raise ValueError(f"model.checkpoint: {where}: use_sliding_window true is not supported")
    return dict(
        common,
        attention="gqa",
        router="softmax",
        qk_norm=True,
        dense_layers=leading_dense_layers(c, where),
        **gqa_heads(c),
        num_experts=c.get("num_experts") or c["num_local_experts"],  # (transformers 5 saves the latter)
        expert_hidden=c["moe_intermediate_size"],
        dense_hidden=c["intermediate_size"],
        norm_topk_prob=bool(c.get("norm_topk_prob", True)),
    )


def deepseek_v3(c: Fields, where: str, common: dict) -> dict:
    """Multi-head latent attention, the sigmoid router with groups and a correction bias (Kimi K2 too)."""
    router = deepseek_router(c)
    no_attention_bias(c, where)
    for key, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if c.get(key, wanted) != wanted:
            raise ValueError(
                f"model.checkpoint: {where}: {key} {c[key]!r} is not supported; expected {wanted}"
            )
    return dict(
        common,
        **router,
        attention="mla",
        kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        q_lora_rank=c.get("q_lora_rank") or 0,
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        rope_interleave=c.get("rope_interleave", True),
    )


def rope_fields(c: dict, where: str) -> dict:
    """Rope theta and scaling from `rope_parameters` (current transformers) or the older top-level keys."""
    params = c.get("rope_parameters") or {
        **(c.get("rope_scaling") or {}),
        "rope_theta": c.get("rope_theta", 10000.0),
    }
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": float(params.get("rope_theta") or 10000.0), "rope_scaling": None}
    if kind != "yarn":
        raise ValueError(
            f"model.checkpoint: {where}: rope type {kind!r} is not supported; expected default or yarn"
        )
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    return {
        "rope_theta": float(params.get("rope_theta") or 10000.0),
        "rope_scaling": {**scaling, "rope_type": "yarn"},
    }


def leading_dense_layers(c: dict, where: str) -> int:
    """Qwen3-MoE: layer i is MoE unless it is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0.
    hpcmoe runs dense layers only before the MoE layers: -> how many lead."""
    layers, step = c["num_hidden_layers"], c.get("decoder_sparse_step") or 1
    dense = sorted(set(c.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ValueError(
            f"model.checkpoint: {where}: mlp_only_layers {c.get('mlp_only_layers')} with "
            f"decoder_sparse_step {step} make layers {dense} dense; hpcmoe runs dense layers only "
            f"before the MoE layers (0, 1, ...)"
        )
    return len(dense)


def fp8_block(c: dict, where: str) -> list[int] | None:
    """DeepSeek-V3's FP8 format: quant_method fp8, e4m3 weights, one float scale per block of
    weight_block_size (rows x columns); None for an unquantized checkpoint."""
    q = c.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"model.checkpoint: {where}: quantization {q.get('quant_method')!r} "
            f"(fmt {q.get('fmt')!r}) is not supported; expected fp8 with e4m3 weights and block scales"
        )
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"model.checkpoint: {where}: quantization_config.weight_block_size {block!r}: "
            f"expected two positive integers (rows, columns), e.g. [128, 128]"
        )
    return block


FAMILIES = {  # model_type -> its fields
    "deepseek_v3": deepseek_v3,
    "glm4_moe": glm4_moe,
    "gpt_oss": gpt_oss,
    "kimi_k2": deepseek_v3,  # DeepSeek-V3's
    "minimax_m2": minimax_m2,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
}


SUPPORTED = tuple(FAMILIES)
