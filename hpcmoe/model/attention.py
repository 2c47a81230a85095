"""Attention: the RMS norm, grouped-query attention (with q/k norms, partial rotary, sliding windows
and sinks) and how query heads split over attention ranks. Pure torch. RoPE is in rope.py, DeepSeek's
latent attention in mla.py, a step's inputs and cache in step.py.

Shapes: b = requests, t = new tokens this step, s = visible cached positions, h = heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.model.rope import Rope, rope_scaling_items
from hpcmoe.model.step import PositionCache, StepInputs, host_tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # computed in float32 and cast back, as transformers does
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


# ---------------------------------------------------------------- grouped-query attention


class GQAttention(nn.Module):
    """Grouped-query attention (Mixtral, the debug model): cache [b, s, kv_heads, head_dim] x 2.
    Options by model: q/k norm, biases, partial rotary, a sliding `window` (this layer's), and
    attention sinks (gpt-oss: one learned logit per head joins the softmax, with a value of zero).

    With `heads` (attention/MoE separation) the module holds only those query heads (and their
    sinks), the key/value heads they read and their columns of the output projection; its output is
    then a partial sum that the attention ranks of a group add up, so only the first shard holds
    the output projection's bias."""

    def __init__(self, cfg, heads: range | None = None, window: int | None = None):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.head_range = heads or range(cfg.heads)
        self.kv_range = kv_heads_for(self.head_range, cfg.heads, cfg.kv_heads)
        h, g, d = len(self.head_range), len(self.kv_range), cfg.head_dim
        self.rotary_dim = int(d * cfg.partial_rotary_factor)  # GLM-4.5: only the first features rotate
        self.rope = Rope(self.rotary_dim, cfg.rope_theta, False, rope_scaling_items(cfg))
        self.q_proj = nn.Linear(cfg.hidden, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden, g * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden, g * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(
            h * d, cfg.hidden, bias=cfg.attention_output_bias and self.head_range.start == 0
        )
        self.sinks = nn.Parameter(torch.empty(h)) if cfg.attention_sinks else None
        self.window = window
        self.qk_norm_all_heads = cfg.qk_norm_all_heads
        if cfg.qk_norm_all_heads:  # over every head's features at once (MiniMax-M2; the whole model's heads)
            self.q_norm, self.k_norm = RMSNorm(h * d, cfg.norm_eps), RMSNorm(g * d, cfg.norm_eps)
        elif cfg.qk_norm:  # over each head's head_dim features, the same weights for every head
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.qkv: torch.Tensor | None = None  # [(h + 2 g) * head_dim, H] once allocated
        self.qkv_bias: torch.Tensor | None = None  # [(h + 2 g) * head_dim] with attention_bias
        group = cfg.heads // cfg.kv_heads
        # a shard that cuts a kv group: each query head's kv head, picked per step
        self.kv_of_head = (
            None
            if self.head_range.start % group == 0 and h % group == 0
            else [i // group - self.kv_range.start for i in self.head_range]
        )

    def weight_slices(self) -> dict[str, tuple[int, int, int]]:
        """Parameter -> (dim, start, stop) of the whole model's tensor that this shard holds."""
        if len(self.head_range) == self.num_heads:
            return {}
        d, heads, kv = self.head_dim, self.head_range, self.kv_range
        rows = lambda r: (0, r.start * d, r.stop * d)
        slices = {
            "q_proj.weight": rows(heads),
            "k_proj.weight": rows(kv),
            "v_proj.weight": rows(kv),
            "o_proj.weight": (1, heads.start * d, heads.stop * d),
        }
        if self.q_proj.bias is not None:
            slices.update({"q_proj.bias": rows(heads), "k_proj.bias": rows(kv), "v_proj.bias": rows(kv)})
        if self.sinks is not None:
            slices["sinks"] = (0, heads.start, heads.stop)
        return slices

    def new_cache(self, batch: int, max_len: int, dtype, device=None) -> list[PositionCache]:
        return [
            PositionCache(batch, max_len, (len(self.kv_range), self.head_dim), dtype, device)
            for _ in range(2)
        ]

    def allocate(self, device, dtype) -> None:
        """Storage before the weights are read: q, k and v projections as views of one tensor (one GEMM)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        sizes = [p.weight.shape[0] for p in projections]
        self.qkv = torch.empty(sum(sizes), self.q_proj.weight.shape[1], device=device, dtype=dtype)
        for projection, weight in zip(projections, self.qkv.split(sizes)):
            projection.weight = nn.Parameter(weight, requires_grad=False)
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.empty(sum(sizes), device=device, dtype=dtype)
            for projection, bias in zip(projections, self.qkv_bias.split(sizes)):
                projection.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, cache: list[PositionCache], inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, H] -> [b, t, H] (this module's heads' share of the output projection)."""
        b, t, _ = x.shape
        d, h, g = self.head_dim, len(self.head_range), len(self.kv_range)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = self.qkv if self.qkv is not None else torch.cat([p.weight for p in projections])
        bias = (
            None
            if self.q_proj.bias is None
            else self.qkv_bias
            if self.qkv_bias is not None
            else torch.cat([p.bias for p in projections])
        )
        qkv = F.linear(x, weight, bias)  # [b, t, (h + 2 g) d]
        if self.qk_norm_all_heads:
            qkv = torch.cat(
                [
                    self.q_norm(qkv[..., : h * d]),
                    self.k_norm(qkv[..., h * d : (h + g) * d]),
                    qkv[..., (h + g) * d :],
                ],
                dim=-1,
            )
        qkv = qkv.view(b, t, h + 2 * g, d).transpose(1, 2)
        cos, sin = inputs.cos_sin(self.rope, x.dtype)
        qk = qkv[:, : h + g]
        if hasattr(self, "q_norm") and not self.qk_norm_all_heads:
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        if self.rotary_dim < d:  # partial rotary: the other features pass as they are
            qk = torch.cat(
                [self.rope.apply(qk[..., : self.rotary_dim], cos, sin), qk[..., self.rotary_dim :]], dim=-1
            )
        else:
            qk = self.rope.apply(qk, cos, sin)  # [b, h + g, t, d]
        keys = cache[0].update(qk[:, h:].transpose(1, 2), inputs).transpose(1, 2)
        values = cache[1].update(qkv[:, h + g :].transpose(1, 2), inputs).transpose(1, 2)
        if self.kv_of_head is not None:
            uses = host_tensor(self.kv_of_head, keys.device)
            keys, values = keys.index_select(1, uses), values.index_select(1, uses)
        mask = inputs.attend if self.window is None else inputs.windowed(self.window)
        if self.sinks is None:
            out = F.scaled_dot_product_attention(qk[:, :h], keys, values, attn_mask=mask, enable_gqa=True)
        else:
            out = attention_with_sinks(qk[:, :h], keys, values, mask, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))

    @staticmethod
    def cache_bytes_per_token(cfg, itemsize: int) -> int:
        return 2 * cfg.kv_heads * cfg.head_dim * itemsize


def attention_with_sinks(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor
) -> torch.Tensor:
    """q [b, h, t, d], keys and values [b, g, s, d] (g divides h; query head i reads kv head i // (h / g)),
    mask [b, 1, t, s] bool, sinks [h] -> [b, h, t, d]: each head's softmax over its visible keys and
    its sink logit, the sink's share dropped (so a large sink shrinks the output). A row that sees
    no key gives zeros, not NaN."""
    (b, h, t, d), (g, s) = q.shape, keys.shape[1:3]
    scores = (
        torch.matmul(q.reshape(b, g, h // g * t, d), keys.transpose(-1, -2)).mul_(d**-0.5).view(b, h, t, s)
    )
    scores.masked_fill_(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.reshape(b, g, h // g * t, s), values).view(b, h, t, d)


def split_heads(heads: int, ranks: int) -> list[range]:
    """Query heads over ranks as evenly as possible, the larger shares first (32 on 12: 8 x 3 + 4 x 2)."""
    if heads < ranks:
        raise ValueError(f"model.heads ({heads}) must be >= attention ranks per replica ({ranks})")
    sizes = [heads // ranks + (r < heads % ranks) for r in range(ranks)]
    starts = [sum(sizes[:r]) for r in range(ranks)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def kv_heads_for(heads: range, num_heads: int, num_kv_heads: int) -> range:
    """The key/value heads that query heads `heads` read (GQA: head h reads kv head h // group)."""
    group = num_heads // num_kv_heads
    return range(heads.start // group, (heads.stop - 1) // group + 1)
