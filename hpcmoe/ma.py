"""Attention/MoE separation (parallel.layout: ma, seeds 002/003).

World ranks 0..A-1 run attention in R groups; each group serves a contiguous slice of the
requests and splits the query heads over its ranks (unevenly when they do not divide). Every
group rank keeps the group's whole residual stream: it computes its heads' partial output
projection, the group sums the partials hierarchically (node leader, then across leaders, then
back), each rank routes only its slice of the tokens to the MoE ranks, and the group all-gathers
the slices. The M MoE ranks own the experts and serve every (layer, micro-batch) exchange as its
tokens arrive. Sums go through point-to-point messages in a fixed order, so every group rank
holds bit-identical states and picks the same greedy tokens, and interleaved micro-batches
cannot mismatch collectives.
"""
from __future__ import annotations

import time

import torch

from hpcmoe.attention import StepInputs, split_heads
from hpcmoe.comm import Receives, Where, tag_for
from hpcmoe.ep import EPEngine
from hpcmoe.layout import MALayout, request_range
from hpcmoe.moe_layer import StepStats

SUM_TO_LEADER, SUM_ACROSS_LEADERS, SUM_BACK, GATHER, TO_STANDBY = range(4, 9)  # beside moe_layer's 0..3


def hierarchical_sum(ctx, x: torch.Tensor, group: list[int], tag, at: Where):
    """Generator: x [..] float32 on every rank of `group` -> the sum over the group, bit-identical on
    all of them: node leaders sum their node in rank order, leaders sum the node sums in node
    order, and send the total back inside their node (a node of one rank skips both node stages)."""
    node = ctx.topo.node_of_rank
    mine = [r for r in group if node[r] == node[ctx.rank]]
    leaders = sorted({min(r for r in group if node[r] == node[s]) for s in group})
    leader = mine[0]
    if ctx.rank != leader:
        back = Receives(ctx.comm, {leader: torch.empty_like(x)}, tag(SUM_BACK), ctx.link, ctx.sender.staging)
        ctx.sender.send(leader, x, tag(SUM_TO_LEADER))
        yield back.all_in(at, "reduce_wait")
        return back.received[leader]
    members = Receives(ctx.comm, {r: torch.empty_like(x) for r in mine if r != leader}, tag(SUM_TO_LEADER), ctx.link,
                       ctx.sender.staging)
    yield members.all_in(at, "reduce_wait")
    node_sum = x.clone()
    for r in mine[1:]:
        node_sum += members.received[r]
    others = Receives(ctx.comm, {r: torch.empty_like(x) for r in leaders if r != leader}, tag(SUM_ACROSS_LEADERS),
                      ctx.link, ctx.sender.staging)
    for r in leaders:
        if r != leader:
            ctx.sender.send(r, node_sum, tag(SUM_ACROSS_LEADERS))
    yield others.all_in(at, "reduce_wait")
    total = torch.zeros_like(x)
    for r in leaders:
        total += node_sum if r == leader else others.received[r]
    for r in mine[1:]:
        ctx.sender.send(r, total, tag(SUM_BACK))
    return total


def all_gather_rows(ctx, rows, senders: list[int], group: list[int], counts: list[int], like: torch.Tensor,
                    tag, at: Where):
    """Generator: each sender's rows [counts[i], H] -> all of them in sender order on every group rank
    (a standby sends nothing and receives everything); like: a tensor of the rows' width, dtype, device."""
    everything = like.new_empty(sum(counts), like.shape[-1])
    receives = Receives(ctx.comm, dict(zip(senders, everything.split(counts))), tag(GATHER), ctx.link,
                        ctx.sender.staging)
    if ctx.rank in senders:
        for r in group:
            ctx.sender.send(r, rows, tag(GATHER), receives)
    yield receives.all_in(at, "gather_wait")
    return everything


def from_twin(ctx, like: torch.Tensor, twin: int, tag, at: Where):
    """Generator: a standby receives its primary's total."""
    receives = Receives(ctx.comm, {twin: torch.empty_like(like)}, tag(TO_STANDBY), ctx.link, ctx.sender.staging)
    yield receives.all_in(at, "reduce_wait")
    return receives.received[twin]


class AttentionEngine(EPEngine):
    """An attention rank: its group's requests, its share of the query heads, no experts."""

    def __init__(self, config, topo, placement, timer, layout: MALayout, load=None, device=torch.device("cpu")):
        super().__init__(config, topo, placement, timer, load, members=exchange_members(layout), device=device)
        self.comm, self.link = topo.world, self.sender.link
        self.layout, self.group = layout, layout.group_ranks(self.rank)
        self.primaries, self.twin = layout.primaries(self.rank), layout.twin(self.rank)
        self.standby = self.rank not in self.primaries
        self.shard = self.primaries.index(self.twin if self.standby else self.rank)
        self.heads = split_heads(config.model.heads, len(self.primaries))[self.shard]
        self.reports = self.rank == self.group[0]  # one rank per group reports the group's tokens

    def requests(self, batch: int) -> range:
        return self.layout.group_requests(batch, self.rank)

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len, self.heads)

    def forward_micro_batch(self, mb: int, inputs: StepInputs, cache, stats: StepStats):
        """Generator: the group's micro-batch through every layer -> [b_mb, vocab] logits (same on all group ranks)."""
        phase, model, step = self.timer.phase, self.model, self.step
        tag = lambda layer: lambda kind: tag_for(kind, layer, mb, self.micro_batches)
        where = lambda layer: Where(step, layer, mb)
        with phase("embed", step, micro_batch=mb):
            x = model.embed_tokens(inputs.tokens)
        tokens = int(inputs.valid.sum())
        slices = [request_range(tokens, len(self.primaries), i) for i in range(len(self.primaries))]
        mine = slices[self.shard]
        for layer, (block, layer_cache) in enumerate(zip(model.layers, cache)):
            self.maybe_fail(layer)
            with phase("attention", step, layer, mb):
                partial = block.self_attn(block.input_layernorm(x), layer_cache, inputs, self.heads).float()
            posted = time.perf_counter()
            if self.standby:
                total = yield from from_twin(self, partial, self.twin, tag(layer), where(layer))
            else:
                total = yield from hierarchical_sum(self, partial, self.primaries, tag(layer), where(layer))
                if self.twin is not None:
                    self.sender.send(self.twin, total, tag(layer)(TO_STANDBY))
            self.timer.add("reduce_comm", step, layer, mb, posted)
            with phase("attention", step, layer, mb):
                x = x + total.to(x.dtype)
                h = inputs.flat(block.post_attention_layernorm(x))[mine.start:mine.stop]
            out = None
            if block.is_moe and not self.standby:
                out = yield from self.exchange(self.ctx, block.mlp, where(layer), h, stats)
            elif not self.standby:
                with phase("mlp", step, layer, mb):
                    out = block.mlp(h)
            posted = time.perf_counter()
            everything = yield from all_gather_rows(self, out, self.primaries, self.group, [len(s) for s in slices],
                                                    x, tag(layer), where(layer))
            self.timer.add("gather_comm", step, layer, mb, posted)
            inputs.add_flat(x, everything)
        with phase("lm_head", step, micro_batch=mb):
            return model.logits(x, inputs)


class MoEEngine(EPEngine):
    """A MoE rank: no requests; serves every (MoE layer, micro-batch) exchange of a step as tokens arrive."""

    def __init__(self, config, topo, placement, timer, layout: MALayout, load=None, device=torch.device("cpu")):
        super().__init__(config, topo, placement, timer, load, members=exchange_members(layout), device=device)
        self.reports = False

    def requests(self, batch: int) -> range:
        return range(0)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, cache, stats: StepStats) -> torch.Tensor:
        hidden, dtype = self.config.model.hidden, self.model.embed_tokens.weight.dtype
        nothing = torch.empty(0, hidden, dtype=dtype, device=self.device)
        generators = [self.exchange(self.ctx, block.mlp, Where(self.step, layer, mb), nothing, stats)
                      for layer, block in enumerate(self.model.layers) if block.is_moe
                      for mb in range(self.micro_batches)]
        self.run_step(generators)
        return torch.empty(0, self.config.model.vocab)


def exchange_members(layout: MALayout) -> list[int]:
    """Tokens travel between primary attention ranks and MoE ranks; a standby mirrors and waits."""
    return layout.all_primaries() + list(range(layout.attention_ranks, layout.world_size))


def ma_engine(config, topo, placement, timer, layout: MALayout, load=None, device=torch.device("cpu")) -> EPEngine:
    cls = AttentionEngine if layout.is_attention(topo.rank) else MoEEngine
    return cls(config, topo, placement, timer, layout, load, device)
