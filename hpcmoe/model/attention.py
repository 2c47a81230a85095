"""Attention: RoPE (default and YaRN), grouped-query attention, and DeepSeek's multi-head latent
attention (MLA) with a latent KV cache. Pure torch.

Shapes: b = requests, t = new tokens this step, s = visible cached positions, h = heads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def host_tensor(values: list[int], device) -> torch.Tensor:
    """A small int64 tensor from host values on `device`, without a device synchronisation (a copy
    from pageable memory would wait for the stream; from pinned memory it is queued)."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class StepInputs:
    """One forward step of a batch of requests, right-padded to t tokens."""

    tokens: torch.Tensor  # [b, t] int64, pads are 0
    positions: torch.Tensor  # [b, t] int64, each request's own positions (start at 0)
    valid: torch.Tensor  # [b, t] bool, False on padding
    dense: bool = False  # every position valid (decode, equal prompts): no masking of rows needed
    lengths: torch.Tensor = None  # [b] new tokens per request (host), to advance the cache positions
    valid_index: torch.Tensor = (
        None  # [valid positions] flat index of each valid position (no per-layer mask)
    )
    cached: torch.Tensor = None  # [b] positions already in the cache (host)
    rotations: dict = field(default_factory=dict, compare=False)  # (Rope, dtype) -> (cos, sin), once per step

    def cos_sin(self, rope: "Rope", dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation of this step's positions in `dtype`, computed once and shared by every layer."""
        key = (rope, dtype)
        if key not in self.rotations:
            self.rotations[key] = tuple(t.to(dtype) for t in rope.cos_sin(self.positions))
        return self.rotations[key]

    @property
    def request_index(self) -> torch.Tensor:
        """[b, t] the request row of every position (for cache writes), once per step."""
        if "rows" not in self.rotations:
            rows = torch.arange(len(self.positions), device=self.positions.device)
            self.rotations["rows"] = rows[:, None].expand_as(self.positions)
        return self.rotations["rows"]

    @property
    def attend(self) -> torch.Tensor:
        """[b, 1, t, s] bool: key position visible to query (s: the longest row's cached + new), once."""
        if "attend" not in self.rotations:
            ends = self.cached + self.lengths
            keys = torch.arange(int(ends.max()) if len(ends) else 1, device=self.positions.device)
            ends = ends.to(self.positions.device, non_blocking=True)
            self.rotations["attend"] = ((keys <= self.positions[..., None]) & (keys < ends[:, None, None]))[
                :, None
            ]
        return self.rotations["attend"]

    def windowed(self, window: int) -> torch.Tensor:
        """`attend` where a query sees only the last `window` positions (itself included), once per window."""
        key = ("attend", window)
        if key not in self.rotations:
            keys = torch.arange(self.attend.shape[-1], device=self.positions.device)
            self.rotations[key] = self.attend & (keys > self.positions[..., None] - window)[:, None]
        return self.rotations[key]

    @classmethod
    def build(cls, tokens: list[list[int]], cached: torch.Tensor, device=None) -> "StepInputs":
        """tokens: b lists of new tokens; cached: [b] positions already in the cache (host)
        -> the step's inputs on `device` (built on the host, moved in one go)."""
        b, t = len(tokens), max((len(x) for x in tokens), default=1)
        lengths = torch.tensor([len(x) for x in tokens], dtype=torch.int64)
        valid = torch.arange(t) < lengths[:, None]
        padded = torch.zeros(b, t, dtype=torch.int64)
        padded[valid] = torch.tensor([token for row in tokens for token in row], dtype=torch.int64)
        positions = cached[:, None] + torch.arange(t)
        move = lambda x: x.to(device, non_blocking=True) if device is not None else x
        return cls(
            move(padded),
            move(positions),
            move(valid),
            dense=bool(lengths.eq(t).all()),
            lengths=lengths,
            valid_index=move(valid.reshape(-1).nonzero().flatten()),
            cached=cached.clone(),
        )

    def rows(self, start: int, stop: int) -> "StepInputs":
        """The requests [start, stop) of this step (views), padded only to their own longest."""
        lengths = self.lengths[start:stop]
        t = max(int(lengths.max()), 1) if len(lengths) else 1
        valid = torch.arange(t) < lengths[:, None]
        return StepInputs(
            self.tokens[start:stop, :t],
            self.positions[start:stop, :t],
            self.valid[start:stop, :t],
            bool(lengths.eq(t).all()),
            lengths,
            valid.reshape(-1).nonzero().flatten().to(self.tokens.device, non_blocking=True),
            self.cached[start:stop],
        )

    def parts(self) -> list[tuple[int, int]]:
        """Row ranges whose attention runs apart: the leading rows that decode (one token each) and
        the rest (rows that prefill a chunk, which continuous batching puts last), so that a decode
        row is never padded to a prompt chunk's length."""
        b, ones = len(self.lengths), int(self.lengths.eq(1).cumprod(0).sum())
        return [(0, ones), (ones, b)] if 0 < ones < b else [(0, b)]

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, t, H] -> [valid positions, H] (a view when every position is valid)."""
        flat = x.view(-1, x.shape[-1])
        return flat if self.dense else flat.index_select(0, self.valid_index)

    def add_flat(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """x[valid positions] += rows, in place (each position once: deterministic on any device)."""
        flat = x.view(-1, x.shape[-1])
        if self.dense:
            flat.add_(rows)
        else:
            flat.index_add_(0, self.valid_index, rows)


class PositionCache:
    """A cached tensor per position: [b, max_len, *features]; each row fills at its own positions."""

    def __init__(self, batch: int, max_len: int, features: tuple[int, ...], dtype, device=None):
        self.data = torch.zeros((batch, max_len, *features), dtype=dtype, device=device)

    def rows(self, start: int, stop: int) -> "PositionCache":
        """The cache of requests [start, stop): a view, so updates land in this cache."""
        view = PositionCache.__new__(PositionCache)
        view.data = self.data[start:stop]
        return view

    def update(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, *features] -> every visible position [b, s, *features], x included."""
        if inputs.dense:
            self.data[inputs.request_index, inputs.positions] = x
        else:  # only the valid positions: a padded one may lie past the end of its row's cache
            flat = lambda t: t.reshape(-1, *t.shape[2:]).index_select(0, inputs.valid_index)
            self.data[flat(inputs.request_index), flat(inputs.positions)] = flat(x)
        return self.data[:, : inputs.attend.shape[-1]]


# ---------------------------------------------------------------- rotary position embedding


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of `dim` channels; YaRN when scaling is given (as transformers computes it)."""

    dim: int
    theta: float
    interleaved: bool = False  # DeepSeek: rotate (x0, x1), (x2, x3), ... pairs
    scaling: tuple = ()  # sorted (key, value) pairs of a YaRN rope_scaling mapping

    @functools.lru_cache(maxsize=None)  # noqa: B019 (a handful of Rope values live for the run)
    def inverse_frequencies(self) -> tuple[torch.Tensor, float]:
        """-> (inv_freq [dim / 2], attention factor multiplying cos and sin); computed once per Rope."""
        base = self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        if not self.scaling:
            return 1.0 / base, 1.0
        p = dict(self.scaling)
        factor, original = p["factor"], p["original_max_position_embeddings"]
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                attention_factor = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations):
            return self.dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
        return inv_freq, attention_factor

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [b, t] -> (cos, cos) and (-sin, sin) over the two halves: [b, 1, t, dim] float32."""
        inv_freq, attention_factor = self.inverse_frequencies()
        angles = positions.float()[..., None] * inv_freq.to(positions.device)
        cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
        return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [b, h, t, dim] -> rotated: x1 cos - x2 sin | x2 cos + x1 sin over the halves x1 | x2.
        Interleaved pairs are first gathered into halves, so they come out half-split, as in transformers."""
        if self.interleaved:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        half = self.dim // 2
        return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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


# ---------------------------------------------------------------- multi-head latent attention


class MLAttention(nn.Module):
    """DeepSeek MLA. The cache keeps only the normalized latent [b, s, kv_lora_rank] and the
    rotated shared key [b, s, qk_rope_head_dim]; at decode the key and value up-projections are
    absorbed into the query and the output, so no per-head key or value is ever built."""

    def __init__(self, cfg, heads: range | None = None):
        super().__init__()
        self.head_range = heads or range(cfg.heads)
        self.num_heads, self.heads, self.rank = cfg.heads, len(self.head_range), cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rope = Rope(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_interleave, rope_scaling_items(cfg))
        scaling = (self.nope + self.rope_dim) ** -0.5
        if cfg.rope_scaling and cfg.rope_scaling.get("mscale_all_dim"):
            scaling *= yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
        self.scaling = scaling
        q_out = self.heads * (self.nope + self.rope_dim)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # transformers uses the default eps here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, cfg.hidden, bias=False)

    def weight_slices(self) -> dict[str, tuple[int, int, int]]:
        """A shard of the heads holds their rows of the query and key/value up-projections and their
        columns of the output projection; the latent down-projections and norms stay whole."""
        if self.heads == self.num_heads:
            return {}
        first, last = self.head_range.start, self.head_range.stop
        per_head = lambda width: (0, first * width, last * width)
        query = "q_b_proj.weight" if hasattr(self, "q_b_proj") else "q_proj.weight"
        return {
            query: per_head(self.nope + self.rope_dim),
            "kv_b_proj.weight": per_head(self.nope + self.v_dim),
            "o_proj.weight": (1, first * self.v_dim, last * self.v_dim),
        }

    def new_cache(self, batch: int, max_len: int, dtype, device=None) -> list[PositionCache]:
        return [
            PositionCache(batch, max_len, (self.rank,), dtype, device),
            PositionCache(batch, max_len, (self.rope_dim,), dtype, device),
        ]

    def forward(
        self, x: torch.Tensor, cache: list[PositionCache], inputs: StepInputs, absorb: bool | None = None
    ) -> torch.Tensor:
        """x: [b, t, H] -> [b, t, H]; absorb=None absorbs at decode (t == 1) only."""
        b, t, _ = x.shape
        q = (
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            if hasattr(self, "q_a_proj")
            else self.q_proj(x)
        )
        q = q.view(b, t, self.heads, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        cos, sin = inputs.cos_sin(self.rope, x.dtype)
        q_rope = self.rope.apply(q_rope, cos, sin)
        k_rope = self.rope.apply(k_rope[:, None], cos, sin)[:, 0]
        latent = cache[0].update(self.kv_a_layernorm(latent), inputs)[:, None]  # [b, 1, s, rank]
        k_rope = cache[1].update(k_rope, inputs)[:, None]  # [b, 1, s, rope]
        s = latent.shape[2]
        w_kv = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_k, w_v = w_kv.split([self.nope, self.v_dim], dim=1)  # [h, nope, rank], [h, v, rank]
        if absorb if absorb is not None else t == 1:
            query = torch.cat([q_nope @ w_k, q_rope], dim=-1)  # [b, h, t, rank + rope]
            keys = torch.cat([latent, k_rope], dim=-1).expand(b, self.heads, s, -1)
            out = F.scaled_dot_product_attention(
                query, keys, latent.expand(b, self.heads, s, -1), attn_mask=inputs.attend, scale=self.scaling
            )
            out = out @ w_v.transpose(1, 2)  # [b, h, t, v]
        else:
            kv = self.kv_b_proj(latent[:, 0]).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
            k_nope, values = kv.split([self.nope, self.v_dim], dim=-1)
            keys = torch.cat([k_nope, k_rope.expand(b, self.heads, s, -1)], dim=-1)
            out = F.scaled_dot_product_attention(
                torch.cat([q_nope, q_rope], dim=-1), keys, values, attn_mask=inputs.attend, scale=self.scaling
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.v_dim))

    @staticmethod
    def cache_bytes_per_token(cfg, itemsize: int) -> int:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize

    @staticmethod
    def full_cache_bytes_per_token(cfg, itemsize: int) -> int:
        """What a per-head key and value cache would hold instead."""
        return cfg.heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * itemsize


def rope_scaling_items(cfg) -> tuple:
    return tuple(sorted(cfg.rope_scaling.items())) if cfg.rope_scaling else ()


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
