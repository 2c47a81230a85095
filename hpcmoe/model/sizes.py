"""Sizes without building: every tensor's name and shape, weight bytes of the whole model and of a
rank, an attention shard's weights, KV cache bytes per token. Measured on meta-device builds of the
same classes the engine runs, so memory plans cannot drift from the model.
"""

from __future__ import annotations

import math

import torch

from hpcmoe.config import ModelConfig
from hpcmoe.model.attention import GQAttention
from hpcmoe.model.mla import MLAttention
from hpcmoe.model.transformer import Block, Transformer


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the whole model (all experts) and its shape, from one-layer meta models."""
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for layer in sorted({0, cfg.dense_layers} & set(range(cfg.num_layers))):
            block = Block(cfg, layer, [0])
            kind = [(n, tuple(p.shape)) for n, p in block.named_parameters()]
            for i in (
                range(cfg.dense_layers)
                if layer < cfg.dense_layers
                else range(cfg.dense_layers, cfg.num_layers)
            ):
                for name, shape in kind:
                    if ".experts.0." in name:
                        for e in range(cfg.num_experts):
                            shapes[f"layers.{i}.{name.replace('.experts.0.', f'.experts.{e}.')}"] = shape
                    else:
                        shapes[f"layers.{i}.{name}"] = shape
    shapes["embed_tokens.weight"] = (cfg.vocab, cfg.hidden)
    shapes["norm.weight"] = (cfg.hidden,)
    shapes["lm_head.weight"] = (cfg.vocab, cfg.hidden)
    return shapes


def parameter_bytes(cfg: ModelConfig, experts_per_rank: int) -> tuple[int, int]:
    """-> (bytes of the whole model, bytes on a rank hosting `experts_per_rank` experts per MoE layer).
    With an FP8 checkpoint the routed experts count 1 byte a weight plus their float32 block scales;
    MXFP4 ones half a byte a weight plus a byte per 32."""
    itemsize = torch.finfo(getattr(torch, cfg.dtype_name)).bits // 8
    total = routed = 0
    for name, shape in expected_tensors(cfg).items():
        count = 1
        for n in shape:
            count *= n
        expert = ".experts." in name
        if name.endswith(("weight_blocks", "weight_scales")):  # MXFP4: uint8
            size = count
        else:
            size = count * (
                itemsize if not (expert and cfg.fp8_block) else 1 if name.endswith(".weight") else 4
            )
        total += size
        routed += size if expert else 0
    per_expert_layer = routed // max(cfg.num_experts, 1)
    return total, total - routed + per_expert_layer * experts_per_rank


def parameter_count(cfg: ModelConfig) -> int:
    """Weights of the whole model (an MXFP4 byte holds two; its exponents are not weights)."""
    count = 0
    for name, shape in expected_tensors(cfg).items():
        if not name.endswith("weight_scales"):
            count += math.prod(shape) * (2 if name.endswith("weight_blocks") else 1)
    return count


def attention_shard_bytes(cfg: ModelConfig, heads: range, vocab: range) -> tuple[int, int]:
    """An attention rank of attention/MoE separation: -> (weight bytes, KV cache bytes per token),
    measured on a meta-device build of exactly what it holds."""
    with torch.device("meta"):
        shard = Transformer(cfg, [], heads, vocab)
        cache = shard.new_cache(1, 1)
    itemsize = torch.finfo(getattr(torch, cfg.dtype_name)).bits // 8
    weights = sum(p.numel() for p in shard.parameters()) * itemsize
    return weights, sum(part.data.numel() * itemsize for layer in cache for part in layer)


def cache_bytes_per_token(cfg: ModelConfig) -> int:
    """KV cache bytes per token over all layers."""
    itemsize = torch.finfo(getattr(torch, cfg.dtype_name)).bits // 8
    attention = MLAttention if cfg.attention == "mla" else GQAttention
    return cfg.num_layers * attention.cache_bytes_per_token(cfg, itemsize)
