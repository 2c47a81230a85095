"""The SwiGLU feed-forward that a dense layer, every routed expert and the shared experts run: its
activation (gpt-oss's clamped form too), its fused gate/up storage, and its FP8 and MXFP4 forms kept
as a checkpoint stores them. Apart from the MoE layer because a dense layer is one too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.model import fp8, mxfp4


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float | None = None, alpha: float = 1.702
) -> torch.Tensor:
    """silu(gate) x up; with a limit gpt-oss's clamped form: gate <= limit, |up| <= limit,
    (up + 1) x gate x sigmoid(alpha x gate). gate is overwritten."""
    if limit is None:
        return F.silu(gate, inplace=True).mul_(up)
    gate = gate.clamp_(max=limit)
    return (gate * torch.sigmoid(gate * alpha)).mul_(up.clamp(-limit, limit).add_(1))


def activation_of(cfg: ModelConfig):
    return (
        swiglu
        if cfg.swiglu_limit is None
        else functools.partial(swiglu, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha)
    )


def as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)  # inference only: no autograd bookkeeping


class MLP(nn.Module):
    """SwiGLU feed-forward: a dense layer's MLP, every routed expert and the shared experts.
    bias: biases in gate and up; down_bias: in down (a tensor-parallel slice other than the first
    leaves it out, since the slices' outputs are summed)."""

    def __init__(
        self, hidden: int, inner: int, bias: bool = False, down_bias: bool = False, activation=swiglu
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=down_bias)
        self.activation = activation
        self.gate_up: torch.Tensor | None = None  # [2 * inner, H] once fused: one GEMM for both
        self.gate_up_bias: torch.Tensor | None = None  # [2 * inner] with biases
        self.mxfp4 = False

    def allocate(
        self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None
    ) -> None:
        """Storage before the weights are read: gate and up projections as views of one
        [2 * inner, H] tensor (one GEMM for both; their biases of one [2 * inner]), down [H, inner]."""
        inner = self.gate_proj.weight.shape[0]
        self.gate_proj.weight, self.up_proj.weight = (
            as_parameter(gate_up[:inner]),
            as_parameter(gate_up[inner:]),
        )
        self.down_proj.weight = as_parameter(down)
        self.gate_up = gate_up
        if self.gate_proj.bias is not None:
            gate_up_bias = (
                torch.empty(2 * inner, dtype=gate_up.dtype, device=gate_up.device)
                if gate_up_bias is None
                else gate_up_bias
            )
            self.gate_proj.bias, self.up_proj.bias = (
                as_parameter(gate_up_bias[:inner]),
                as_parameter(gate_up_bias[inner:]),
            )
            self.gate_up_bias = gate_up_bias

    def keep_fp8(self, block: list[int]) -> None:
        """Weights stay as an FP8 checkpoint stores them (1 byte each, with a float scale per block,
        `weight_scale_inv` beside each weight); forward runs them with hpcmoe/model/fp8.py."""
        self.fp8_block = block
        for projection in (self.gate_proj, self.up_proj, self.down_proj):
            rows, columns = projection.weight.shape
            projection.weight_scale_inv = nn.Parameter(
                torch.empty(-(-rows // block[0]), -(-columns // block[1]), dtype=torch.float32)
            )

    def allocate_fp8(self, device) -> None:
        for projection in (self.gate_proj, self.up_proj, self.down_proj):
            projection.weight = as_parameter(
                torch.empty(projection.weight.shape, dtype=torch.float8_e4m3fn, device=device)
            )
            projection.weight_scale_inv = as_parameter(
                torch.empty(projection.weight_scale_inv.shape, dtype=torch.float32, device=device)
            )

    def keep_mxfp4(self) -> None:
        """Weights stay as an MXFP4 checkpoint stores them (hpcmoe/model/mxfp4.py): `weight_blocks`
        [rows, columns / 32, 16] and `weight_scales` [rows, columns / 32], both uint8, in place of
        `weight`."""
        self.mxfp4 = True
        for projection in (self.gate_proj, self.up_proj, self.down_proj):
            rows, columns = projection.weight.shape
            projection.weight = None
            projection.weight_blocks = as_parameter(
                torch.empty(rows, columns // mxfp4.BLOCK, mxfp4.BLOCK // 2, dtype=torch.uint8)
            )
            projection.weight_scales = as_parameter(
                torch.empty(rows, columns // mxfp4.BLOCK, dtype=torch.uint8)
            )

    def dequantized(self, projection: nn.Linear, dtype) -> torch.Tensor:
        """The projection's weight dequantized whole, a fresh tensor in `dtype` (the FP8 path computes
        with these values chunk by chunk: hpcmoe/model/fp8.py)."""
        if self.mxfp4:
            return mxfp4.dequantize(projection.weight_blocks, projection.weight_scales, dtype)
        return fp8.dequantize(projection.weight, projection.weight_scale_inv, self.fp8_block).to(dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [m, H] (or [..., H]) -> [m, H], written into `out` when given."""
        if self.gate_proj.weight is not None and self.gate_proj.weight.dtype == torch.float8_e4m3fn:
            # as stored: hpcmoe/model/fp8.py, in x's dtype
            y = fp8.mlp(
                x.reshape(-1, x.shape[-1]),
                *((p.weight, p.weight_scale_inv) for p in (self.gate_proj, self.up_proj, self.down_proj)),
                self.fp8_block,
                out,
            )
            return y if out is not None else y.view(*x.shape[:-1], y.shape[-1])
        if self.mxfp4:  # as stored, turned into x's dtype for this call
            gate_up = torch.cat([self.dequantized(p, x.dtype) for p in (self.gate_proj, self.up_proj)])
            down = self.dequantized(self.down_proj, x.dtype)
        else:
            gate_up = (
                self.gate_up
                if self.gate_up is not None
                else torch.cat([self.gate_proj.weight, self.up_proj.weight])
            )
            down = self.down_proj.weight
        bias = (
            self.gate_up_bias
            if self.gate_up_bias is not None or self.gate_proj.bias is None
            else torch.cat([self.gate_proj.bias, self.up_proj.bias])
        )
        act = self.activation(*F.linear(x, gate_up, bias).chunk(2, dim=-1))
        if out is None:
            return F.linear(act, down, self.down_proj.bias)
        if self.down_proj.bias is not None:
            return torch.addmm(self.down_proj.bias, act, down.t(), out=out)
        return torch.mm(act, down.t(), out=out)
