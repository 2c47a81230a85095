"""Building a model, or a MoE rank's experts, without waste: on the meta device in the target dtype,
storage allocated in its fused and stacked layouts, then each weight read once into place from a
checkpoint or made from a seed and its tensor name (so every rank agrees on every value).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.model import mxfp4
from hpcmoe.model.attention import GQAttention
from hpcmoe.model.mlp import MLP, as_parameter
from hpcmoe.model.moe import MoE
from hpcmoe.model.sizes import expected_tensors
from hpcmoe.model.transformer import ExpertStore, Transformer


def seeded_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Random tensor that depends only on (seed, name): any rank that builds it gets the same values."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator).mul_(std)  # in place: one float32 temporary, not two


def seeded_mxfp4(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """An MXFP4 tensor that depends only on (seed, name): random bytes for `*.weight_blocks`, and for
    `*.weight_scales` [rows, columns / 32] the exponent that gives the weights a std near columns ** -0.5
    (random 4-bit values have an rms of about 2.9)."""
    if name.endswith("weight_scales"):
        exponent = round(math.log2((shape[-1] * mxfp4.BLOCK) ** -0.5 / 2.9))
        return torch.full(shape, exponent + mxfp4.EXPONENT_BIAS, dtype=torch.uint8)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def init_seeded(model: nn.Module, cfg: ModelConfig) -> None:
    """Random weights seeded per tensor name (a shard gets its slice of the whole tensor); norms start
    at one."""
    slices, shapes = model.weight_slices(), expected_tensors(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            shape = shapes.get(name, tuple(param.shape))
            # MXFP4 experts: random 4-bit values, exponents for a std of columns ** -0.5
            if param.dtype == torch.uint8:
                whole = seeded_mxfp4(name, shape, cfg.seed)
            else:
                std = 1.0 if name == "embed_tokens.weight" else shape[-1] ** -0.5
                whole = seeded_normal(name, shape, std, cfg.seed)
            if name in slices:
                dim, start, stop = slices[name]
                whole = whole.narrow(dim, start, stop - start)
            param.copy_(whole)


def build_model(
    cfg: ModelConfig,
    hosted_experts: list[int],
    load=None,
    device="cpu",
    heads: range | None = None,
    vocab: range | None = None,
    expert_shard: tuple[int, int] = (0, 1),
) -> Transformer:
    """The model with only `hosted_experts` built on `device` (an attention rank's shard with `heads`
    and `vocab`; a slice of each expert with `expert_shard`); weights from `load(name, part) -> tensor`
    (a checkpoint) or seeded per tensor name."""
    return build(lambda: Transformer(cfg, hosted_experts, heads, vocab, expert_shard), cfg, load, device)


def build_experts(cfg: ModelConfig, hosted_experts: list[int], load=None, device="cpu") -> ExpertStore:
    """A MoE rank's experts of every MoE layer, nothing else."""
    return build(lambda: ExpertStore(cfg, hosted_experts), cfg, load, device)


def build(make, cfg: ModelConfig, load, device):
    dtype = getattr(torch, cfg.dtype_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built on the meta device in the target dtype: no float32 copy, no wasted random init
        with torch.device("meta"):
            model = make()
    finally:
        torch.set_default_dtype(previous)
    materialize(model, device, dtype)
    if load is None:
        init_seeded(model, cfg)
    else:
        slices = model.weight_slices()
        with torch.no_grad():
            for name, param in model.named_parameters():
                # as stored: FP8, MXFP4 blocks and exponents
                if param.dtype in (torch.float8_e4m3fn, torch.uint8):
                    param.copy_(load(name, slices.get(name), raw=True))
                else:
                    param.copy_(load(name, slices.get(name)))
    return model.eval()


def materialize(model: nn.Module, device, dtype) -> None:
    """Give every meta parameter uninitialized storage on `device`: fused and stacked layouts first
    (MoE experts, MLPs, q/k/v), so weights are read once into their final place (no copy, no
    doubled peak), then the rest. (Module.to_empty would also do, but its meta-tensor path imports
    sympy: seconds per rank at start-up.)"""
    for module in model.modules():
        if isinstance(module, MoE):
            module.allocate(device, dtype)
        elif (
            isinstance(module, MLP)
            and module.gate_up is None
            and not module.mxfp4
            and module.gate_proj.weight.is_meta
        ):
            inner, hidden = module.gate_proj.weight.shape
            module.allocate(
                torch.empty(2 * inner, hidden, device=device, dtype=dtype),
                torch.empty(hidden, inner, device=device, dtype=dtype),
            )
        elif isinstance(module, GQAttention):
            module.allocate(device, dtype)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[name] = as_parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device)
                )
