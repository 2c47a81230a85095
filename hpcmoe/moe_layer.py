"""One MoE layer's exchange, as generators the engine's scheduler drives (they yield `Pending`).

- flat: every token slot travels straight to the rank of its expert slot.
- two_stage: a token crosses to another node once, to a gateway rank there, however many of its
  experts live on that node; the gateway forwards it inside the node. On the way back each
  expert answers the gateway, which sums its node's weighted outputs into one row per token.

Sources send counts and payloads back to back; a receiver posts its receives once it knows
the counts. Experts start on each source's rows as they arrive and answer at once.
`ctx` is the engine: comm, sender, link, placement, topo, timer, step, micro_batches, my_experts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hpcmoe.comm import Receives, Where, tag_for
from hpcmoe.dispatch import (DispatchPlan, apply_capacity, choose_slots, combine_tokens, node_groups, pack_rows, plan_from_slots,
                             split_rows, unpack_rows)
from hpcmoe.router import tokens_per_expert

COUNTS, DISPATCH, RETURNS, GATEWAY_COUNTS, GATEWAY_DISPATCH, GATEWAY_RETURNS = range(6)


@dataclass
class Pending:
    """What a micro-batch waits for: every receive, or (any_of) at least one of these peers."""
    receives: Receives
    where: Where
    any_of: Optional[set] = None

    def missing(self) -> Where:
        """The same place, naming only the peers whose messages have not arrived."""
        late = set(self.any_of if self.any_of is not None else self.receives.received) - self.receives.arrived()
        return Where(self.where.step, self.where.layer, self.where.micro_batch, self.where.phase,
                     tuple(sorted(late - {self.receives.me})))

    def poll(self):
        """None while nothing to resume for; else True (all) or the set of newly arrived peers."""
        arrived = self.receives.arrived()
        if self.any_of is None:
            return True if len(arrived) == len(self.receives.received) else None
        return (arrived & self.any_of) or None


def exchange_counts(ctx, plan: DispatchPlan, peers: list[int], tag: int) -> Receives:
    """Send each peer its slots' counts and receive theirs for this rank's slots."""
    placement, me = ctx.placement, ctx.rank
    receives = Receives(ctx.comm, {r: torch.zeros(len(placement.slots_of_rank(me)), dtype=torch.int64)
                                   for r in peers}, tag, ctx.link)
    for r in peers:
        ctx.sender.send(r, plan.slot_counts[list(placement.slots_of_rank(r))].clone(), tag, receives)
    return receives


def dispatch_and_serve(ctx, moe, plan: DispatchPlan, rows: torch.Tensor, peers: list[int], kinds: tuple,
                       where, layer: int, mb: int):
    """Generator: send `rows` (one per plan entry) to the experts' ranks among `peers`, serve what
    arrives here with this rank's experts, and return the answers in plan order."""
    phase, step, sender = ctx.timer.phase, ctx.step, ctx.sender
    counts_tag, dispatch_tag, returns_tag = (tag_for(k, layer, mb, ctx.micro_batches) for k in kinds)
    posted = time.perf_counter()
    counts = exchange_counts(ctx, plan, peers, counts_tag)
    with phase("dispatch_post", step, layer, mb):
        answers = rows.new_empty(sum(plan.rank_counts[r] for r in peers), rows.shape[1])  # in plan order
        returns = Receives(ctx.comm, dict(zip(peers, answers.split([plan.rank_counts[r] for r in peers]))),
                           returns_tag, ctx.link)
        outgoing = split_rows(rows[plan.source_token], plan.rank_counts)
        for r in peers:
            if r != ctx.rank:
                sender.send(r, outgoing[r], dispatch_tag)
    yield Pending(counts, where("counts_wait", peers))
    ctx.timer.add("counts_comm", step, layer, mb, posted)
    incoming = Receives(ctx.comm, {r: rows.new_empty(int(c.sum()), rows.shape[1]) for r, c in counts.received.items()},
                        dispatch_tag, ctx.link)
    if ctx.rank in peers:
        incoming.keep_own(outgoing[ctx.rank])
    sources = set(peers)
    while sources:
        arrived = yield Pending(incoming, where("dispatch_wait", sources), any_of=sources)
        for source in sorted(arrived):
            with phase("experts", step, layer, mb):
                out = moe.run_experts(incoming.received[source], ctx.my_experts, counts.received[source].tolist())
                sender.send(source, out, returns_tag, returns)
        sources -= arrived
    ctx.timer.add("dispatch_comm", step, layer, mb, posted)
    yield Pending(returns, where("combine_wait", peers))
    ctx.timer.add("combine_comm", step, layer, mb, posted)
    return answers


def route(ctx, moe, layer: int, mb: int, h: torch.Tensor, stats):
    """-> (slots [n, k], weights [n, k]) and this rank's routing statistics."""
    ctx.maybe_stall()
    with ctx.timer.phase("route", ctx.step, layer, mb):
        expert_ids, weights = moe.gate(h)
        slots = choose_slots(expert_ids, ctx.placement, ctx.rank, ctx.topo.node_of_rank)
        stats.routing[layer - ctx.config.model.dense_layers] += tokens_per_expert(
            expert_ids, ctx.config.model.num_experts).numpy()
        factor = ctx.config.parallel.capacity_factor
        if factor is not None:
            slots = apply_capacity(slots, factor, len(ctx.placement.slot_rank))
            stats.dropped += int((slots < 0).sum())
    return slots, weights


def flat(ctx, moe, layer: int, mb: int, h: torch.Tensor, stats):
    """Generator: h [n, H] -> [n, H] weighted expert outputs plus shared experts, in token order."""
    where = lambda name, waiting: Where(ctx.step, layer, mb, name, tuple(sorted(set(waiting) - {ctx.rank})))
    slots, weights = route(ctx, moe, layer, mb, h, stats)
    plan = plan_from_slots(slots, ctx.placement)
    stats.traffic[layer - ctx.config.model.dense_layers] += np.array(plan.rank_counts) * h.shape[1] * h.element_size()
    with ctx.timer.phase("shared_experts", ctx.step, layer, mb):  # computed while the tokens travel
        shared = moe.shared(h)
    returned = yield from dispatch_and_serve(ctx, moe, plan, h, ctx.peers, (COUNTS, DISPATCH, RETURNS), where, layer, mb)
    with ctx.timer.phase("combine", ctx.step, layer, mb):
        routed = combine_tokens(plan, returned, weights)
        return routed if shared is None else routed + shared


def two_stage(ctx, moe, layer: int, mb: int, h: torch.Tensor, stats):
    """Generator: as `flat`, but each token crosses to another node at most once per node."""
    phase, step, sender, topo = ctx.timer.phase, ctx.step, ctx.sender, ctx.topo
    where = lambda name, waiting: Where(step, layer, mb, name, tuple(sorted(set(waiting) - {ctx.rank})))
    tag = lambda kind: tag_for(kind, layer, mb, ctx.micro_batches)
    slots, weights = route(ctx, moe, layer, mb, h, stats)
    groups = node_groups(slots, weights, ctx.placement, topo.node_of_rank)   # per node: (tokens, slots, weights)
    gateways = [gateway(ctx.rank, node, topo.node_of_rank) for node in range(topo.num_nodes)]
    served = [s for s in range(ctx.comm.Get_size()) if gateway(s, topo.node_index, topo.node_of_rank) == ctx.rank]
    posted = time.perf_counter()
    # stage 1: one message per destination node, to that node's gateway for this rank
    counts = Receives(ctx.comm, {s: torch.zeros(1, dtype=torch.int64) for s in served}, tag(GATEWAY_COUNTS), ctx.link)
    with phase("dispatch_post", step, layer, mb):
        packed = {}
        for node, (tokens, node_slots, node_weights) in enumerate(groups):
            sender.send(gateways[node], torch.tensor([len(tokens)]), tag(GATEWAY_COUNTS), counts)
            packed[node] = pack_rows(h[tokens], node_slots, node_weights)
            stats.traffic[layer - ctx.config.model.dense_layers][gateways[node]] += packed[node].numel()
            if gateways[node] != ctx.rank:
                sender.send(gateways[node], packed[node], tag(GATEWAY_DISPATCH))
        returns = Receives(ctx.comm, {gateways[n]: h.new_empty(len(groups[n][0]), h.shape[1])
                                      for n in range(topo.num_nodes)}, tag(GATEWAY_RETURNS), ctx.link)
    with phase("shared_experts", step, layer, mb):
        shared = moe.shared(h)
    yield Pending(counts, where("counts_wait", served))
    row_bytes = packed_row_bytes(h, slots)
    incoming = Receives(ctx.comm, {s: torch.empty(int(counts.received[s]) * row_bytes, dtype=torch.uint8)
                                   for s in served}, tag(GATEWAY_DISPATCH), ctx.link)
    sender.send(ctx.rank, packed[topo.node_index], tag(GATEWAY_DISPATCH), incoming)
    yield Pending(incoming, where("dispatch_wait", served))
    # stage 2: the gateway forwards its tokens to the experts of its own node
    with phase("gateway", step, layer, mb):
        rows, gate_slots, gate_weights = unpack_rows([incoming.received[s] for s in served], h.shape[1], h.dtype,
                                                     slots.shape[1])
        plan = plan_from_slots(gate_slots, ctx.placement)
        stats.traffic[layer - ctx.config.model.dense_layers] += np.array(plan.rank_counts) * h.shape[1] * h.element_size()
    node_ranks = [r for r, n in enumerate(topo.node_of_rank) if n == topo.node_index]
    answered = yield from dispatch_and_serve(ctx, moe, plan, rows, node_ranks,
                                             (COUNTS, DISPATCH, RETURNS), where, layer, mb)
    with phase("gateway", step, layer, mb):
        partial = combine_tokens(plan, answered, gate_weights)  # this node's share of each token
        for source, part in zip(served, partial.split([int(counts.received[s]) for s in served])):
            sender.send(source, part, tag(GATEWAY_RETURNS), returns)
    yield Pending(returns, where("combine_wait", gateways))
    with phase("combine", step, layer, mb):
        out = torch.zeros(h.shape, dtype=torch.float32)
        for node, (tokens, _, _) in enumerate(groups):
            out[tokens] += returns.received[gateways[node]].float()
        routed = out.to(h.dtype)
        return routed if shared is None else routed + shared


def gateway(source: int, node: int, node_of_rank: tuple[int, ...]) -> int:
    """The rank of `node` that receives `source`'s tokens: the source itself on its own node, else
    the rank with the same position in its node (wrapping), which spreads sources over gateways."""
    if node_of_rank[source] == node:
        return source
    mine = [r for r, n in enumerate(node_of_rank) if n == node_of_rank[source]]
    theirs = [r for r, n in enumerate(node_of_rank) if n == node]
    return theirs[mine.index(source) % len(theirs)]


def packed_row_bytes(h: torch.Tensor, slots: torch.Tensor) -> int:
    """Bytes of one packed row: the hidden state, then k slots (int64) and k weights (float32)."""
    return h.shape[1] * h.element_size() + slots.shape[1] * 12
