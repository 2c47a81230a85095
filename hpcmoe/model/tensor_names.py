"""hpcmoe's parameter names -> the tensor names of a family's checkpoint: short rename tables
(Mixtral, MiniMax-M2, gpt-oss's router), the tied LM head, and gpt-oss's stacked experts, of which
one hpcmoe expert tensor is a view. Pure: no torch at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIXTRAL_RENAMES = [
    (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
    (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
    (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
]


# MiniMax-M2: Mixtral's names, and the correction bias on the MoE block rather than on its gate
MINIMAX_RENAMES = [
    (r"\.mlp\.gate\.e_score_correction_bias$", ".block_sparse_moe.e_score_correction_bias")
] + MIXTRAL_RENAMES


# gpt-oss: the router is `router`; the experts are stacked (below)
GPT_OSS_RENAMES = [(r"\.mlp\.gate\.(weight|bias)$", r".mlp.router.\1")]


GPT_OSS_EXPERT = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(weight|bias|weight_blocks|weight_scales)$"
)


GPT_OSS_SUFFIX = {"weight": "", "bias": "_bias", "weight_blocks": "_blocks", "weight_scales": "_scales"}


@dataclass(frozen=True)
class ExpertView:
    """gpt-oss stores each layer's experts stacked: `experts.gate_up_proj` [E, H, 2I] (gate and up
    interleaved along the last axis: gate the even entries), `experts.down_proj` [E, I, H], biases
    [E, 2I] and [E, H]; as MXFP4, `_blocks` [E, 2I, H / 32, 16] and `_scales` [E, 2I, H / 32] (rows
    are output features there). One hpcmoe expert tensor is a view of one of these."""

    expert: int
    interleaved: int | None  # 0: gate (even entries of the output axis), 1: up (odd), None: down
    transposed: bool  # stored [in, out] (the unquantized weights)


def checkpoint_name(name: str, config: dict) -> str:
    """hpcmoe parameter name -> the tensor name in the checkpoint."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if config.get("tie_word_embeddings") else name
    expert = GPT_OSS_EXPERT.match(name) if config["model_type"] == "gpt_oss" else None
    if expert:
        layer, _, kind, part = expert.groups()
        return (
            f"model.layers.{layer}.mlp.experts.{'down_proj' if kind == 'down' else 'gate_up_proj'}"
            f"{GPT_OSS_SUFFIX[part]}"
        )
    name = "model." + name
    renames = {"mixtral": MIXTRAL_RENAMES, "minimax_m2": MINIMAX_RENAMES, "gpt_oss": GPT_OSS_RENAMES}
    for pattern, replacement in renames.get(config["model_type"], []):
        name = re.sub(pattern, replacement, name)
    return name


def expert_view(name: str, config: dict) -> ExpertView | None:
    """The view of a stacked gpt-oss tensor that hpcmoe tensor `name` is, None for any other tensor."""
    expert = GPT_OSS_EXPERT.match(name) if config["model_type"] == "gpt_oss" else None
    if not expert:
        return None
    _, e, kind, part = expert.groups()
    return ExpertView(int(e), None if kind == "down" else ("gate", "up").index(kind), part == "weight")


def stored_shape(shape: tuple[int, ...], view: ExpertView, experts: int) -> tuple[int, ...]:
    """hpcmoe's shape of one expert's tensor -> the stacked tensor's shape in the checkpoint."""
    one = list(reversed(shape)) if view.transposed else list(shape)
    axis = len(one) - 1 if view.transposed else 0  # the output features
    if view.interleaved is not None:
        one[axis] *= 2
    return (experts, *one)


def select_expert(stacked, view: ExpertView):
    """The stacked tensor's slab of one expert ([1, ...], as read) -> hpcmoe's tensor of that expert."""
    one = stacked[0]
    if view.transposed:
        one = one.transpose(0, 1)
    if view.interleaved is not None:
        one = one[view.interleaved :: 2]
    return one.contiguous()
