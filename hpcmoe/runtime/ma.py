"""Attention/MoE separation (parallel.layout: ma, seeds 002/003).

World ranks 0..A-1 run attention in R groups; each group serves a contiguous slice of the
requests. A group rank holds only its shard: its query heads' slices of every attention layer
(GQA or MLA), the KV cache of those heads, the embedding, the dense layers, routers and shared
experts, and a slice of the LM head's vocabulary. Every group rank keeps the group's whole
residual stream: it computes its heads' partial output projection, the group sums the partials
(reduce-scatter inside each node, all-reduce of each chunk across nodes, all-gather inside the
node), each rank routes only its slice of the tokens to the MoE ranks, and the group all-gathers
the slices. At the end each rank scores its vocabulary slice and the group agrees on the greedy
token by a (max, lowest index) reduction. The M MoE ranks hold only their experts and serve
every (layer, micro-batch) exchange as its tokens arrive. Sums go through point-to-point messages
in a fixed order, so every group rank holds bit-identical states and picks the same tokens, and
interleaved micro-batches cannot mismatch collectives.
"""

from __future__ import annotations

import torch

from hpcmoe.model.attention import split_heads
from hpcmoe.model.build import build_experts, build_model
from hpcmoe.model.step import StepInputs
from hpcmoe.parallel.layout import MALayout, request_range
from hpcmoe.runtime.ep import Messaging, maybe_fail, new_stats
from hpcmoe.runtime.exchange_context import StepStats
from hpcmoe.runtime.tags import Kind, tag_for
from hpcmoe.runtime.waits import Where

# ---------------------------------------------------------------- the seed's hierarchical reduction


def reduction_plan(group: list[int], node_of_rank) -> tuple[list[list[int]], int]:
    """-> (the group's ranks per node, in node order, each in rank order; the number of chunks C).

    The summed tensor is cut into C = the largest node's rank count chunks; chunk j belongs, in a
    node of m ranks, to its (j mod m)-th rank, so nodes of unequal size still line up: every chunk
    has exactly one owner per node."""
    nodes = [[r for r in group if node_of_rank[r] == n] for n in sorted({node_of_rank[r] for r in group})]
    return nodes, max(map(len, nodes))


class Chunks:
    """The summed tensor's C chunks (reduction_plan): chunk j is flat[bounds[j]], and belongs, in a node
    of m ranks, to its (j mod m)-th rank."""

    def __init__(self, numel: int, chunks: int):
        self.bounds = [request_range(numel, chunks, j) for j in range(chunks)]

    def piece(self, t: torch.Tensor, j: int) -> torch.Tensor:
        return t[self.bounds[j].start : self.bounds[j].stop]

    def size(self, js: list[int]) -> int:
        return sum(len(self.bounds[j]) for j in js)

    def owned_by(self, members: list[int], r: int) -> list[int]:
        return [j for j in range(len(self.bounds)) if members[j % len(members)] == r]

    def joined(self, t: torch.Tensor, js: list[int]) -> torch.Tensor:
        """Chunks js of t as one tensor: a view for one chunk."""
        if len(js) == 1:
            return self.piece(t, js[0])
        return torch.cat([self.piece(t, j) for j in js]) if js else t[:0]

    def split(self, t: torch.Tensor, js: list[int]) -> dict[int, torch.Tensor]:
        """The inverse of joined: chunk j -> its part of t."""
        starts = [self.size(js[:k]) for k in range(len(js))]
        return {j: t[start : start + len(self.bounds[j])] for j, start in zip(js, starts)}


def hierarchical_sum(ctx, x: torch.Tensor, group: list[int], tag, at: Where):
    """Generator: x [...] on every rank of `group` -> the sum over the group, bit-identical on all.

    1. reduce-scatter inside the node: each rank sends chunk j to the chunk's owner in its node,
       which adds its node's parts in rank order;
    2. all-reduce across nodes: the owners of chunk j (one per node) exchange their node sums and
       each adds them in node order (the same operands in the same order on every owner);
    3. all-gather inside the node: each owner sends its chunks' totals to the other ranks of its node.
    Inter-node bytes per rank: (nodes - 1) x its chunks, not the whole tensor. A rank that owns one
    chunk (nodes of equal size) sends views and receives straight into the result: no extra copies."""
    nodes, count = reduction_plan(group, ctx.topo.node_of_rank)
    mine = next(members for members in nodes if ctx.rank in members)
    others = [r for r in mine if r != ctx.rank]
    flat, result = x.reshape(-1), torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    chunks = Chunks(flat.numel(), count)
    owned = chunks.owned_by(mine, ctx.rank)
    receive = lambda buffers, kind: ctx.sender.receives(buffers, tag(kind))

    def summing(operands: int):  # the phase of adding `operands` partials of this rank's chunks
        nbytes = operands * chunks.size(owned) * x.element_size()
        return ctx.timer.phase("reduce", at.step, at.layer, at.micro_batch, nbytes=nbytes)

    # 1. reduce-scatter inside the node
    parts = receive({r: flat.new_empty(chunks.size(owned)) for r in others}, Kind.SCATTER)
    for r in others:
        ctx.sender.send(r, chunks.joined(flat, chunks.owned_by(mine, r)), tag(Kind.SCATTER))
    yield parts.all_in(at, "reduce_wait")
    node_sum = None
    with summing(len(mine)):
        for r in mine:
            part = chunks.joined(flat, owned) if r == ctx.rank else parts.received[r]
            node_sum = part.clone() if node_sum is None else node_sum.add_(part)
    node_sum = chunks.split(node_sum, owned)
    # 2. all-reduce of each owned chunk across nodes, with its owner in every other node
    shared_with: dict[int, list[int]] = {}  # owner in another node -> my chunks it owns there
    for members in nodes:
        if members is not mine:
            for j in owned:
                shared_with.setdefault(members[j % len(members)], []).append(j)
    across = receive(
        {peer: flat.new_empty(chunks.size(js)) for peer, js in shared_with.items()}, Kind.ACROSS_NODES
    )
    for peer, js in shared_with.items():
        ctx.sender.send(
            peer,
            node_sum[js[0]] if len(js) == 1 else torch.cat([node_sum[j] for j in js]),
            tag(Kind.ACROSS_NODES),
        )
    yield across.all_in(at, "reduce_wait")
    from_peer = {peer: chunks.split(across.received[peer], js) for peer, js in shared_with.items()}
    with summing(len(nodes)):
        for j in owned:
            total = chunks.piece(result, j)
            for n, members in enumerate(nodes):
                value = node_sum[j] if members is mine else from_peer[members[j % len(members)]][j]
                total.copy_(value) if n == 0 else total.add_(value)
    # 3. all-gather inside the node: one chunk lands straight in the result
    yield from gather_in_node(ctx, chunks, result, mine, owned, tag, at)
    return result.view(x.shape)


def gather_in_node(
    ctx, chunks: Chunks, result: torch.Tensor, mine: list[int], owned: list[int], tag, at: Where
):
    """Generator, hierarchical_sum's step 3: this rank's chunks of `result` (owned) to the other ranks
    of its node (mine), theirs from them into `result`; one chunk lands straight in it."""
    theirs = {r: chunks.owned_by(mine, r) for r in mine if r != ctx.rank}
    back = ctx.sender.receives(
        {
            r: chunks.piece(result, js[0]) if len(js) == 1 else result.new_empty(chunks.size(js))
            for r, js in theirs.items()
        },
        tag(Kind.GATHER_BACK),
    )
    for r in theirs:
        ctx.sender.send(r, chunks.joined(result, owned), tag(Kind.GATHER_BACK))
    yield back.all_in(at, "reduce_wait")
    for r, js in theirs.items():
        if len(js) > 1:
            for j, values in chunks.split(back.received[r], js).items():
                chunks.piece(result, j).copy_(values)


# ---------------------------------------------------------------- gathers inside a group


def all_gather_rows(
    ctx,
    rows,
    senders: list[int],
    group: list[int],
    counts: list[int],
    like: torch.Tensor,
    tag,
    at: Where,
    kind: int = Kind.GATHER,
):
    """Generator: each sender's rows [counts[i], W] -> all of them in sender order on every group rank
    (a standby sends nothing and receives everything); like: a tensor of the rows' width, dtype, device."""
    everything = like.new_empty(sum(counts), like.shape[-1])
    receives = ctx.sender.receives(dict(zip(senders, everything.split(counts))), tag(kind))
    if ctx.rank in senders:
        for r in group:
            ctx.sender.send(r, rows, tag(kind), receives)
    yield receives.all_in(at, "gather_wait")
    return everything


def from_twin(ctx, like: torch.Tensor, twin: int, tag, at: Where):
    """Generator: a standby receives its primary's total."""
    receives = ctx.sender.receives({twin: torch.empty_like(like)}, tag(Kind.TO_STANDBY))
    yield receives.all_in(at, "reduce_wait")
    return receives.received[twin]


def greedy_over_slices(best: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """best, index: [slices, b] each slice's largest logit and its (global) vocabulary index, slices in
    vocabulary order -> [b] the whole head's greedy token: the largest logit, ties to the lower index."""
    chosen, top = index[0].clone(), best[0].clone()
    for value, at in zip(best[1:], index[1:]):
        better = value > top  # strictly: an equal value in a later slice has a higher index
        chosen = torch.where(better, at, chosen)
        top = torch.where(better, value, top)
    return chosen


# ---------------------------------------------------------------- the two roles


class AttentionEngine:
    """An attention rank: its group's requests, its share of the query heads and of the vocabulary."""

    def __init__(
        self, config, topo, placement, timer, layout, load=None, device=torch.device("cpu"), fault=None
    ):
        self.config, self.topo, self.timer, self.device = config, topo, timer, device
        self.rank, self.step, self.prefill = topo.rank, 0, True
        self.layout, self.group = layout, layout.group_ranks(self.rank)
        self.primaries, self.twin = layout.primaries(self.rank), layout.twin(self.rank)
        self.standby = self.rank not in self.primaries
        self.shard = self.primaries.index(self.twin if self.standby else self.rank)
        m = config.model
        self.heads = split_heads(m.heads, len(self.primaries))[self.shard]
        self.vocab_slices = [
            request_range(m.vocab, len(self.primaries), i) for i in range(len(self.primaries))
        ]
        self.model = build_model(m, [], load, device, heads=self.heads, vocab=self.vocab_slices[self.shard])
        self.net = Messaging(
            config, topo, placement, timer, exchange_members(layout), device, layout.replicas, fault
        )
        self.comm, self.sender, self.link, self.ctx = (
            topo.world,
            self.net.sender,
            self.net.sender.link,
            self.net.ctx,
        )
        self.reports = self.rank == self.group[0]  # one rank per group reports the group's tokens
        sampling = config.run.sampling
        # every logit is gathered only to be saved or sampled from
        self.whole_logits = config.output.save_logits or (sampling is not None and sampling.temperature > 0)

    def requests(self, batch: int) -> range:
        return self.layout.group_requests(batch, self.rank)

    def step_hooks(self) -> list:
        return []

    def placement_history(self) -> list:
        return []

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    def new_stats(self) -> StepStats:
        return new_stats(self.config, self.topo.size, self.device)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, cache, stats: StepStats):
        """The group's step: -> (greedy tokens [b], logits [b, vocab] when output.save_logits, else None)."""
        generators = self.net.step_coroutines(inputs, cache, self.prefill, self.forward_micro_batch, stats)
        results = self.net.run_step(generators, self.step, self.prefill)
        chosen = torch.cat([c for c, _ in results])
        return chosen, torch.cat([x for _, x in results]) if self.whole_logits else None

    def forward_micro_batch(self, mb: int, inputs: StepInputs, cache, stats: StepStats):
        """Generator: the group's micro-batch through every layer -> (tokens [b_mb], logits [b_mb, vocab]
        or None), the same on all group ranks."""
        phase, model, step = self.timer.phase, self.model, self.step
        tag = lambda layer: lambda kind: tag_for(kind, layer, mb, self.net.micro_batches)
        where = lambda layer: Where(step, layer, mb)
        with phase("embed", step, micro_batch=mb):
            x = model.embed_tokens(inputs.tokens)
        slices = [
            request_range(int(inputs.lengths.sum()), len(self.primaries), i)
            for i in range(len(self.primaries))
        ]
        mine = slices[self.shard]
        for layer, (block, layer_cache) in enumerate(zip(model.layers, cache)):
            maybe_fail(self.config, self.rank, step, layer)
            with phase("attention", step, layer, mb):
                partial = block.self_attn(block.input_layernorm(x), layer_cache, inputs).float()
            posted = self.timer.mark()
            if self.standby:
                total = yield from from_twin(self, partial, self.twin, tag(layer), where(layer))
            else:
                total = yield from hierarchical_sum(self, partial, self.primaries, tag(layer), where(layer))
                if self.twin is not None:
                    self.sender.send(self.twin, total, tag(layer)(Kind.TO_STANDBY))
            self.timer.add("reduce_comm", step, layer, mb, posted)
            with phase("attention", step, layer, mb):
                x = x + total.to(x.dtype)
                h = inputs.flat(block.post_attention_layernorm(x))[mine.start : mine.stop]
            out = None
            if block.is_moe and not self.standby:
                out = yield from self.net.exchange(self.ctx, block.mlp, where(layer), h, stats)
            elif not self.standby:
                with phase("mlp", step, layer, mb):
                    out = block.mlp(h)
            posted = self.timer.mark()
            everything = yield from all_gather_rows(
                self, out, self.primaries, self.group, [len(s) for s in slices], x, tag(layer), where(layer)
            )
            self.timer.add("gather_comm", step, layer, mb, posted)
            with phase("gather", step, layer, mb, nbytes=everything.numel() * everything.element_size()):
                inputs.add_flat(x, everything)
        done = len(model.layers)
        return (yield from self.choose_tokens(mb, x, inputs, tag(done), where(done)))

    def choose_tokens(self, mb: int, x: torch.Tensor, inputs: StepInputs, tag, at: Where):
        """Generator: the last hidden states -> (the group's greedy tokens [b_mb], the whole logits
        [b_mb, vocab] when they are saved or sampled from, else None): each rank scores its vocabulary
        slice and the group agrees on the largest logit, ties to the lowest index."""
        model = self.model
        with self.timer.phase("lm_head", self.step, micro_batch=mb):
            local = model.logits(x, inputs)  # [b_mb, this rank's vocabulary slice]
            best, index = local.max(dim=-1)  # the lowest index among equal maxima
            # exact in float64
            pair = torch.stack([best.double(), (index + model.vocab.start).double()], dim=-1)
        b, ranks = len(local), len(self.primaries)
        gather = lambda rows, counts, like, kind: all_gather_rows(
            self, rows, self.primaries, self.group, counts, like, tag, at, kind
        )
        pairs = yield from gather(pair.reshape(1, -1), [1] * ranks, pair.reshape(1, -1), Kind.CHOICE)
        pairs = pairs.view(ranks, b, 2)
        chosen = greedy_over_slices(pairs[..., 0], pairs[..., 1].long())
        if not self.whole_logits:
            return chosen, None
        vocab = [len(v) for v in self.vocab_slices]
        columns = yield from gather(local.t().contiguous(), vocab, local.new_empty(0, b), Kind.LOGITS)
        return chosen, columns.t()

    def close(self) -> None:
        self.net.close()


class MoEEngine:
    """A MoE rank: only its experts; no requests; serves every (MoE layer, micro-batch) exchange of a
    step as tokens arrive."""

    def __init__(
        self, config, topo, placement, timer, layout, load=None, device=torch.device("cpu"), fault=None
    ):
        self.config, self.topo, self.timer, self.device = config, topo, timer, device
        self.rank, self.step, self.prefill, self.reports = topo.rank, 0, True, False
        self.model = build_experts(config.model, placement.experts_of_rank(self.rank), load, device)
        self.net = Messaging(
            config, topo, placement, timer, exchange_members(layout), device, layout.replicas, fault
        )

    def requests(self, batch: int) -> range:
        return range(0)

    def step_hooks(self) -> list:
        return []

    def placement_history(self) -> list:
        return []

    def new_cache(self, batch: int, max_len: int):
        return []

    def new_stats(self) -> StepStats:
        return new_stats(self.config, self.topo.size, self.device)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, cache, stats: StepStats):
        m = self.config.model
        nothing = torch.empty(0, m.hidden, dtype=getattr(torch, m.dtype_name), device=self.device)
        generators = [
            self.net.exchange(self.net.ctx, moe, Where(self.step, m.dense_layers + i, mb), nothing, stats)
            for i, moe in enumerate(self.model.moe_layers())
            for mb in range(self.net.step_micro_batches(self.prefill))
        ]
        self.net.run_step(generators, self.step, self.prefill)
        return torch.empty(0, dtype=torch.int64), torch.empty(0, m.vocab)

    def close(self) -> None:
        self.net.close()


def exchange_members(layout: MALayout) -> list[int]:
    """Tokens travel between primary attention ranks and MoE ranks; a standby mirrors and waits."""
    return layout.all_primaries() + list(range(layout.attention_ranks, layout.world_size))


def ma_engine(
    config, topo, placement, timer, layout: MALayout, load=None, device=torch.device("cpu"), fault=None
):
    cls = AttentionEngine if layout.is_attention(topo.rank) else MoEEngine
    return cls(config, topo, placement, timer, layout, load, device, fault)
