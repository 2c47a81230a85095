"""The decoder-only MoE transformer in reading order (pure torch: no MPI in here): its blocks, the
whole model or an attention rank's shard of it, a MoE rank's expert store, and the one-process
forward pass.

Parameter names follow transformers' DeepSeek-V3 model (`layers.3.mlp.experts.7.gate_proj.weight`),
so a checkpoint maps onto them with a short rename table. The engine runs the layers itself so that
the MoE exchange stays outside the math; `forward_local` at the bottom runs every expert in this
process and is the oracle the tests use. The parts: mlp.py and moe.py (the feed-forward layers),
attention.py and mla.py, build.py (storage and weights), sizes.py (sizes without building).
"""

from __future__ import annotations

import torch
from torch import nn

from hpcmoe.config import ModelConfig
from hpcmoe.model.attention import GQAttention, RMSNorm
from hpcmoe.model.mla import MLAttention
from hpcmoe.model.mlp import MLP, activation_of
from hpcmoe.model.moe import MoE, moe_local
from hpcmoe.model.step import PositionCache, StepInputs


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


# ---------------------------------------------------------------- the single-process oracle


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
