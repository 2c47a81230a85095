"""DeepSeek's multi-head latent attention (MLA): a latent KV cache and, at decode, the key and value
up-projections absorbed into the query and the output. Apart from grouped-query attention because
its cache, weights and shards have a shape of their own.

Shapes: b = requests, t = new tokens this step, s = visible cached positions, h = heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.model.attention import RMSNorm
from hpcmoe.model.rope import Rope, rope_scaling_items, yarn_mscale
from hpcmoe.model.step import PositionCache, StepInputs


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
