"""A MoE layer's local part: the router, the routed experts this rank hosts (stacked so that small
groups of rows run as batched GEMMs, or sliced for tensor parallelism inside experts) and the shared
experts; and `moe_local`, every expert in one process, which the tests use as the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.model import mxfp4
from hpcmoe.model.mlp import MLP, activation_of, as_parameter
from hpcmoe.model.router import sigmoid_group_topk, softmax_topk
from hpcmoe.model.step import host_tensor


class Router(nn.Module):
    """Softmax top-k (Mixtral) or sigmoid with correction bias and group-limited top-k (DeepSeek-V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # run.skew_drift: router_skew favours experts shift, shift + 1, ... instead of 0, 1, ...
        self.skew_shift = 0
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        if cfg.router == "sigmoid":
            # float32 whatever the model dtype, as transformers keeps it
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [n, H] -> (expert_ids [n, k] int64, weights [n, k] float32)."""
        c = self.cfg
        logits = (
            F.linear(h, self.weight, self.bias)
            if c.router == "softmax"
            else F.linear(h.float(), self.weight.float())
        )
        if c.router_skew:
            rank = (torch.arange(c.num_experts, device=h.device) - self.skew_shift) % c.num_experts
            logits = logits + c.router_skew * (1 - rank / max(c.num_experts - 1, 1))
        if c.router == "softmax":
            return softmax_topk(logits, c.top_k, c.norm_topk_prob)
        return sigmoid_group_topk(
            logits,
            self.e_score_correction_bias,
            c.top_k,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )


class MoE(nn.Module):
    """A MoE layer's local part: the router, the routed experts this rank hosts, the shared experts."""

    GROUPED_ROWS = 16  # at most this many rows per expert: one batched GEMM over the hosted experts

    def __init__(
        self, cfg: ModelConfig, experts: list[int], routes: bool = True, shard: tuple[int, int] = (0, 1)
    ):
        """routes: this rank routes tokens (holds the router and the shared experts, which run
        where the tokens are); a MoE rank of attention/MoE separation only serves its experts.
        shard (j, T): tensor parallelism inside experts, this rank holds the j-th of T column slices
        of gate and up and the matching row slice of down, so its output is a partial sum."""
        super().__init__()
        self.gate = Router(cfg) if routes else None
        self.top_k, self.shard = cfg.top_k, shard
        activation = activation_of(cfg)
        self.experts = nn.ModuleDict(
            {
                str(e): MLP(
                    cfg.hidden,
                    cfg.expert_hidden // shard[1],
                    cfg.expert_bias,
                    cfg.expert_bias and shard[0] == 0,
                    activation,
                )
                for e in experts
            }
        )
        self.fp8_block, self.mxfp4 = cfg.fp8_block, cfg.mxfp4
        for mlp in self.experts.values():
            if cfg.fp8_block:
                mlp.keep_fp8(cfg.fp8_block)
            elif cfg.mxfp4:
                mlp.keep_mxfp4()
        if cfg.shared_experts and routes:
            self.shared_experts = MLP(
                cfg.hidden, cfg.expert_hidden * cfg.shared_experts, activation=activation
            )
        self.activation = activation
        # ([E, 2I, H], [E, H, I], [E, 2I] or None, [E, H] or None) once allocated
        self.stacked: tuple | None = None

    def allocate(self, device, dtype) -> None:
        """Storage before the weights are read: the hosted experts' weights as views of two stacked
        tensors, so that small groups of rows (decode) run as two batched GEMMs for all experts."""
        experts = list(self.experts.values())
        # routed experts as stored: no fused or stacked layout, dequantized per expert
        if self.fp8_block or self.mxfp4:
            # (MXFP4's uint8 tensors: materialize's generic pass)
            for mlp in experts if self.fp8_block else []:
                mlp.allocate_fp8(device)
            experts = []
        for mlp in experts + ([self.shared_experts] if hasattr(self, "shared_experts") else []):
            inner, hidden = mlp.gate_proj.weight.shape
            mlp.allocate(
                torch.empty(2 * inner, hidden, device=device, dtype=dtype),
                torch.empty(hidden, inner, device=device, dtype=dtype),
            )
        if len(experts) < 2:
            return
        inner, hidden = experts[0].gate_up.shape[0] // 2, experts[0].gate_up.shape[1]
        gate_up = torch.empty(len(experts), 2 * inner, hidden, device=device, dtype=dtype)
        down = torch.empty(len(experts), hidden, inner, device=device, dtype=dtype)
        biased, down_biased = experts[0].gate_proj.bias is not None, experts[0].down_proj.bias is not None
        gate_up_bias = torch.empty(len(experts), 2 * inner, device=device, dtype=dtype) if biased else None
        down_bias = torch.empty(len(experts), hidden, device=device, dtype=dtype) if down_biased else None
        for i, mlp in enumerate(experts):
            mlp.allocate(gate_up[i], down[i], gate_up_bias[i] if biased else None)
            if down_biased:
                mlp.down_proj.bias = as_parameter(down_bias[i])
        self.stacked = gate_up, down, gate_up_bias, down_bias

    def weight_slices(self) -> dict[str, tuple[int, int, int]]:
        """Expert tensors that are a slice of the checkpoint's (dim, start, stop): the shard's columns
        of the inner dimension (and the FP8 block scales that cover them)."""
        j, count = self.shard
        if count == 1:
            return {}
        slices = {}
        for e, mlp in self.experts.items():
            inner = mlp.gate_proj.out_features
            start, stop = j * inner, (j + 1) * inner
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                if self.mxfp4:  # the exponents' blocks lie along the columns
                    b = mxfp4.BLOCK if dim else 1
                    slices[f"experts.{e}.{name}.weight_blocks"] = (dim, start // b, stop // b)
                    slices[f"experts.{e}.{name}.weight_scales"] = (dim, start // b, stop // b)
                else:
                    slices[f"experts.{e}.{name}.weight"] = (dim, start, stop)
                if self.fp8_block:
                    b = self.fp8_block[dim]
                    slices[f"experts.{e}.{name}.weight_scale_inv"] = (dim, start // b, stop // b)
            if mlp.gate_proj.bias is not None:
                slices.update(
                    {f"experts.{e}.{name}.bias": (0, start, stop) for name in ("gate_proj", "up_proj")}
                )
        return slices

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [n, H] -> (expert_ids [n, k], weights [n, k]); a rank that only serves experts has no
        router and no tokens of its own (n = 0)."""
        if self.gate is not None:
            return self.gate(h)
        assert len(h) == 0, "a MoE layer without a router cannot route tokens"
        return (
            torch.empty(0, self.top_k, dtype=torch.int64, device=h.device),
            torch.empty(0, self.top_k, device=h.device),
        )

    def run_experts(
        self, rows: torch.Tensor, counts: list[int], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """rows: [m, H] grouped by this rank's experts in slot order, counts[i] rows for the i-th
        -> [m, H] outputs (into `out` when given). Experts with many rows run one GEMM chain each;
        small groups (decode), when at least half the experts are hit, two batched GEMMs for all."""
        out = torch.empty_like(rows) if out is None else out
        hit = sum(1 for c in counts if c)
        if self.stacked is not None and hit and max(counts) <= self.GROUPED_ROWS and 2 * hit >= len(counts):
            return self.run_grouped(rows, counts, out)
        start = 0
        for expert, count in zip(self.experts.values(), counts):
            if count:
                expert(rows[start : start + count], out=out[start : start + count])
            start += count
        return out

    def run_grouped(self, rows: torch.Tensor, counts: list[int], out: torch.Tensor) -> torch.Tensor:
        """Rows padded to [E, max count, H], one bmm for gate/up and one for down, then back."""
        gate_up, down, gate_up_bias, down_bias = self.stacked
        count = host_tensor(counts, rows.device)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), count)
        position = torch.arange(len(rows), device=rows.device) - (torch.cumsum(count, 0) - count)[expert]
        padded = rows.new_zeros(len(counts), max(counts), rows.shape[1])
        padded[expert, position] = rows
        both = (
            torch.bmm(padded, gate_up.transpose(1, 2))
            if gate_up_bias is None
            else torch.baddbmm(gate_up_bias[:, None], padded, gate_up.transpose(1, 2))
        )
        act = self.activation(*both.chunk(2, dim=-1))
        answers = (
            torch.bmm(act, down.transpose(1, 2))
            if down_bias is None
            else torch.baddbmm(down_bias[:, None], act, down.transpose(1, 2))
        )
        return torch.index_select(
            answers.view(-1, rows.shape[1]), 0, expert * max(counts) + position, out=out
        )

    def shared(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.shared_experts(h) if hasattr(self, "shared_experts") else None

    def expert_tensors(self, expert: int) -> list[torch.Tensor]:
        """The hosted expert's weights (and FP8 scales) in a fixed order: what moves when it moves."""
        return [p for _, p in sorted(self.experts[str(expert)].named_parameters())]

    def adopt(self, other: "MoE") -> None:
        """Serve other's experts from now on (online rebalancing: the new placement's weights)."""
        self.experts, self.stacked = other.experts, other.stacked


def moe_local(moe: MoE, h: torch.Tensor) -> torch.Tensor:
    """h: [n, H] -> [n, H], every routed expert in this process (needs them all hosted)."""
    expert_ids, weights = moe.gate(h)
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for e in range(moe.gate.cfg.num_experts):
        token, slot = (expert_ids == e).nonzero(as_tuple=True)
        if len(token):
            out[token] += weights[token, slot, None] * moe.experts[str(e)](h[token]).float()
    out = out.to(h.dtype)
    shared = moe.shared(h)
    return out if shared is None else out + shared


def rotate_skew(model: nn.Module, shift: int) -> None:
    """run.skew_drift: every router favours experts shift, shift + 1, ... from now on."""
    for module in model.modules():
        if isinstance(module, Router):
            module.skew_shift = shift
