"""Rotary position embedding, default and YaRN, as transformers computes it: the rotation every
attention variant applies to its queries and keys, kept apart from the attention math it serves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


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


def rope_scaling_items(cfg) -> tuple:
    return tuple(sorted(cfg.rope_scaling.items())) if cfg.rope_scaling else ()
