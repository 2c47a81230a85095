"""The decoder-only MoE transformer in reading order (pure torch: no MPI in here).

The engine runs the layers itself so that the MoE exchange stays outside the math; the pure
`forward_local` at the bottom runs every expert in this process and is the oracle the tests use.
Shapes: b = requests, t = new tokens per request this step, s = cached positions, H = hidden.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.router import softmax_topk


def seeded_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Random tensor that depends only on (seed, name): any rank that builds it gets the same values."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator) * std


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # computed in float32 and cast back, as Hugging Face does
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [b, t] -> cos, sin: [b, 1, t, head_dim] (half-split layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, t, head_dim] rotated by position (computed in float32)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class StepInputs:
    """One forward step of a batch of requests, right-padded to t tokens."""
    tokens: torch.Tensor      # [b, t] int64, pads are 0
    positions: torch.Tensor   # [b, t] int64, each request's own positions (start at 0)
    valid: torch.Tensor       # [b, t] bool, False on padding
    attend: torch.Tensor      # [b, 1, t, s] bool, key position visible to query

    @classmethod
    def build(cls, tokens: list[list[int]], cached: torch.Tensor) -> "StepInputs":
        """tokens: b lists of new tokens; cached: [b] positions already in the cache."""
        b, t = len(tokens), max((len(x) for x in tokens), default=1)
        padded = torch.zeros(b, t, dtype=torch.int64)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for i, row in enumerate(tokens):
            padded[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            valid[i, :len(row)] = True
        positions = cached[:, None] + torch.arange(t)
        new_lengths = valid.sum(1)
        keys = torch.arange(int((cached + new_lengths).max()) if b else 1)
        attend = (keys <= positions[..., None]) & (keys < (cached + new_lengths)[:, None, None])
        return cls(padded, positions, valid, attend[:, None])


class KVCache:
    """Per-layer keys and values: [b, kv_heads, max_len, head_dim]; rows fill at their own positions."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, inputs: StepInputs):
        """k, v: [b, kv_heads, t, d] -> the cached [b, kv_heads, s, d] including them."""
        rows = torch.arange(k.shape[0])[:, None].expand_as(inputs.positions)
        self.keys[layer][rows, :, inputs.positions] = k.transpose(1, 2)
        self.values[layer][rows, :, inputs.positions] = v.transpose(1, 2)
        s = inputs.attend.shape[-1]
        return self.keys[layer][:, :, :s], self.values[layer][:, :, :s]


class Attention(nn.Module):
    """Grouped-query attention with RoPE and a KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta
        self.wq = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, H] -> [b, t, H]."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(inputs.positions, self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(layer, k, v, inputs)
        group = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=inputs.attend)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward; a dense layer's MLP and every expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)  # gate
        self.w3 = nn.Linear(hidden, inner, bias=False)  # up
        self.w2 = nn.Linear(inner, hidden, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block: attention, then a dense MLP or a MoE layer of which this rank hosts `experts`."""

    def __init__(self, cfg: ModelConfig, layer: int, experts: list[int]):
        super().__init__()
        self.cfg, self.is_moe = cfg, layer >= cfg.dense_layers
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        if self.is_moe:
            self.gate = nn.Linear(cfg.hidden, cfg.num_experts, bias=False)
            self.experts = nn.ModuleDict({str(e): MLP(cfg.hidden, cfg.expert_hidden) for e in experts})
        else:
            self.mlp = MLP(cfg.hidden, cfg.dense_hidden)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [n, H] -> (expert_ids [n, k], weights [n, k] float32)."""
        return softmax_topk(self.gate(h), self.cfg.top_k, self.cfg.norm_topk_prob)

    def run_experts(self, rows: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """rows: [m, H] grouped by expert, counts[i] rows for experts[i] -> [m, H] outputs."""
        outputs = [self.experts[str(e)](chunk) for e, chunk in zip(experts, rows.split(counts)) if len(chunk)]
        return torch.cat(outputs) if outputs else rows.new_zeros(rows.shape)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, hosted_experts: list[int]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg, i, hosted_experts) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch, c.kv_heads, max_len, c.head_dim, self.embed.weight.dtype)

    def logits(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """x: [b, t, H] -> [b, vocab] float32 at each request's last new token."""
        last = inputs.valid.sum(1).clamp(min=1) - 1
        return self.lm_head(self.norm(x[torch.arange(x.shape[0]), last])).float()


def build_model(cfg: ModelConfig, hosted_experts: list[int]) -> Transformer:
    """Random weights seeded per tensor name (norms start at one); only `hosted_experts` are built."""
    dtype = getattr(torch, cfg.dtype)
    model = Transformer(cfg, hosted_experts)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = 1.0 if name == "embed.weight" else param.shape[-1] ** -0.5
                param.copy_(seeded_normal(name, tuple(param.shape), std, cfg.seed))
    return model.to(dtype).eval()


# ---------------------------------------------------------------- the single-process oracle

def moe_local(block: Block, h: torch.Tensor) -> torch.Tensor:
    """h: [n, H] -> [n, H], every expert in this process (needs them all hosted)."""
    expert_ids, weights = block.route(h)
    out = torch.zeros(h.shape, dtype=torch.float32)
    for e in range(block.cfg.num_experts):
        token, slot = (expert_ids == e).nonzero(as_tuple=True)
        if len(token):
            out[token] += weights[token, slot, None] * block.experts[str(e)](h[token]).float()
    return out.to(h.dtype)


@torch.no_grad()
def forward_local(model: Transformer, inputs: StepInputs, cache: KVCache) -> torch.Tensor:
    """One step with every expert local: [b, t] tokens -> [b, vocab] float32 logits."""
    x = model.embed(inputs.tokens)
    for layer, block in enumerate(model.layers):
        x = x + block.attn(block.attn_norm(x), cache, layer, inputs)
        h = block.ffn_norm(x)[inputs.valid]
        out = moe_local(block, h) if block.is_moe else block.mlp(h)
        x[inputs.valid] += out
    return model.logits(x, inputs)


@torch.no_grad()
def generate_local(model: Transformer, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation in one process: -> (tokens [b, steps] int64, logits [b, steps, vocab] float32)."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + steps)
    cached = torch.zeros(len(prompts), dtype=torch.int64)
    new_tokens, tokens, logits = prompts, [], []
    for _ in range(steps):
        inputs = StepInputs.build(new_tokens, cached)
        step_logits = forward_local(model, inputs, cache)
        cached += inputs.valid.sum(1)
        tokens.append(step_logits.argmax(-1))
        logits.append(step_logits)
        new_tokens = [[t] for t in tokens[-1].tolist()]
    return torch.stack(tokens, 1), torch.stack(logits, 1)
