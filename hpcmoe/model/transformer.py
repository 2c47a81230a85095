"""The decoder-only MoE transformer in reading order (pure torch: no MPI in here).

Parameter names follow transformers' DeepSeek-V3 model (`layers.3.mlp.experts.7.gate_proj.weight`),
so a checkpoint maps onto them with a short rename table. The engine runs the layers itself so that
the MoE exchange stays outside the math; `forward_local` at the bottom runs every expert in this
process and is the oracle the tests use.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.model import fp8, mxfp4
from hpcmoe.model.attention import GQAttention, MLAttention, PositionCache, RMSNorm, StepInputs, host_tensor
from hpcmoe.model.router import sigmoid_group_topk, softmax_topk


def seeded_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Random tensor that depends only on (seed, name): any rank that builds it gets the same values."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator).mul_(std)  # in place: one float32 temporary, not two


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
        [rows, columns / 32, 16] and `weight_scales` [rows, columns / 32], both uint8, in place of `weight`."""
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
        from hpcmoe.model.checkpoint import dequantize

        return dequantize(projection.weight, projection.weight_scale_inv, self.fp8_block).to(dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [m, H] (or [..., H]) -> [m, H], written into `out` when given."""
        if self.gate_proj.weight is not None and self.gate_proj.weight.dtype == torch.float8_e4m3fn:
            y = fp8.mlp(
                x.reshape(-1, x.shape[-1]),
                *((p.weight, p.weight_scale_inv) for p in (self.gate_proj, self.up_proj, self.down_proj)),
                self.fp8_block,
                out,
            )  # as stored: hpcmoe/model/fp8.py, in x's dtype
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


class Router(nn.Module):
    """Softmax top-k (Mixtral) or sigmoid with correction bias and group-limited top-k (DeepSeek-V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.skew_shift = (
            0  # run.skew_drift: router_skew favours experts shift, shift + 1, ... instead of 0, 1, ...
        )
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
        self.stacked: tuple | None = (
            None  # ([E, 2I, H], [E, H, I], [E, 2I] or None, [E, H] or None) once allocated
        )

    def allocate(self, device, dtype) -> None:
        """Storage before the weights are read: the hosted experts' weights as views of two stacked
        tensors, so that small groups of rows (decode) run as two batched GEMMs for all experts."""
        experts = list(self.experts.values())
        if (
            self.fp8_block or self.mxfp4
        ):  # routed experts as stored: no fused or stacked layout, dequantized per expert
            for mlp in (
                experts if self.fp8_block else []
            ):  # (MXFP4's uint8 tensors: materialize's generic pass)
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


class Block(nn.Module):
    """Pre-norm block: attention, then a dense MLP or a MoE layer."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        experts: list[int],
        heads: range | None = None,
        expert_shard: tuple[int, int] = (0, 1),
    ):
        super().__init__()
        self.is_moe = layer >= cfg.dense_layers
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.self_attn = (
            MLAttention(cfg, heads) if cfg.attention == "mla" else GQAttention(cfg, heads, cfg.window(layer))
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = (
            MoE(cfg, experts, shard=expert_shard)
            if self.is_moe
            else MLP(cfg.hidden, cfg.dense_hidden, activation=activation_of(cfg))
        )

    def attend(self, x: torch.Tensor, cache: list[PositionCache], inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, H] -> x plus attention, the residual stream after the attention half."""
        return x + self.self_attn(self.input_layernorm(x), cache, inputs)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP, or every routed expert in this process (the one-process oracle)."""
        return moe_local(self.mlp, h) if self.is_moe else self.mlp(h)


class Transformer(nn.Module):
    """The model, or an attention rank's part of it: `heads` a shard of every layer's query heads,
    `vocab` a slice of the LM head's rows (its logits are then that slice's), `expert_shard` (j, T)
    the j-th of T slices of each hosted expert (tensor parallelism inside experts)."""

    def __init__(
        self,
        cfg: ModelConfig,
        hosted_experts: list[int],
        heads: range | None = None,
        vocab: range | None = None,
        expert_shard: tuple[int, int] = (0, 1),
    ):
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab or range(cfg.vocab)
        # _weight: no random init (on the meta device normal_ would import torch._dynamo: seconds per rank)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, _weight=torch.empty(cfg.vocab, cfg.hidden))
        self.layers = nn.ModuleList(
            Block(cfg, i, hosted_experts, heads, expert_shard) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, len(self.vocab), bias=False)

    def weight_slices(self) -> dict[str, tuple[int, int, int]]:
        slices = {
            f"layers.{i}.self_attn.{name}": part
            for i, block in enumerate(self.layers)
            for name, part in block.self_attn.weight_slices().items()
        }
        slices.update(
            {
                f"layers.{i}.mlp.{name}": part
                for i, block in enumerate(self.layers)
                if block.is_moe
                for name, part in block.mlp.weight_slices().items()
            }
        )
        if len(self.vocab) != self.cfg.vocab:
            slices["lm_head.weight"] = (0, self.vocab.start, self.vocab.stop)
        return slices

    def new_cache(self, batch: int, max_len: int) -> list[list[PositionCache]]:
        weight = self.embed_tokens.weight
        return [
            block.self_attn.new_cache(batch, max_len, weight.dtype, device=weight.device)
            for block in self.layers
        ]

    def logits(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, H] -> [b, vocab slice] float32 at each request's last new token."""
        last = inputs.valid.sum(1).clamp(min=1) - 1
        return self.lm_head(self.norm(x[torch.arange(x.shape[0], device=x.device), last])).float()


class ExpertStore(nn.Module):
    """A MoE rank of attention/MoE separation: its experts of every MoE layer and nothing else
    (named as in the whole model: `layers.3.mlp.experts.7.gate_proj.weight`)."""

    def __init__(self, cfg: ModelConfig, hosted_experts: list[int]):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleDict(
            {
                str(i): nn.ModuleDict({"mlp": MoE(cfg, hosted_experts, routes=False)})
                for i in range(cfg.dense_layers, cfg.num_layers)
            }
        )

    def weight_slices(self) -> dict:
        return {}

    def moe_layers(self) -> list[MoE]:
        return [layer["mlp"] for layer in self.layers.values()]


def init_seeded(model: nn.Module, cfg: ModelConfig) -> None:
    """Random weights seeded per tensor name (a shard gets its slice of the whole tensor); norms start at one."""
    slices, shapes = model.weight_slices(), expected_tensors(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            shape = shapes.get(name, tuple(param.shape))
            if (
                param.dtype == torch.uint8
            ):  # MXFP4 experts: random 4-bit values, exponents for a std of columns ** -0.5
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
                if param.dtype in (
                    torch.float8_e4m3fn,
                    torch.uint8,
                ):  # as stored: FP8, MXFP4 blocks and exponents
                    param.copy_(load(name, slices.get(name), raw=True))
                else:
                    param.copy_(load(name, slices.get(name)))
    return model.eval()


def as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)  # inference only: no autograd bookkeeping


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


def rotate_skew(model: nn.Module, shift: int) -> None:
    """run.skew_drift: every router favours experts shift, shift + 1, ... from now on."""
    for module in model.modules():
        if isinstance(module, Router):
            module.skew_shift = shift


# ---------------------------------------------------------------- sizes without building


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


# ---------------------------------------------------------------- the single-process oracle


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


@torch.no_grad()
def forward_local(model: Transformer, inputs: StepInputs, cache) -> torch.Tensor:
    """One step with every expert local: [b, t] tokens -> [b, vocab] float32 logits."""
    x = model.embed_tokens(inputs.tokens)
    for block, layer_cache in zip(model.layers, cache):
        x = block.attend(x, layer_cache, inputs)
        inputs.add_flat(x, block.ffn(inputs.flat(block.post_attention_layernorm(x))))
    return model.logits(x, inputs)


@torch.no_grad()
def generate_local(
    model: Transformer, prompts: list[list[int]], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation in one process: -> (tokens [b, steps] int64, logits [b, steps, vocab] float32)."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps)
    cached, device = torch.zeros(len(prompts), dtype=torch.int64), model.embed_tokens.weight.device
    new_tokens, tokens, logits = prompts, [], []
    for _ in range(steps):
        inputs = StepInputs.build(new_tokens, cached, device)
        step_logits = forward_local(model, inputs, cache)
        cached += inputs.lengths
        tokens.append(step_logits.argmax(-1))
        logits.append(step_logits)
        new_tokens = [[t] for t in tokens[-1].tolist()]
    return torch.stack(tokens, 1), torch.stack(logits, 1)
