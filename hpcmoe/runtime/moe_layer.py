"""One MoE layer's exchange, as generators the scheduler drives (they yield `Pending`).

- flat: every token slot travels straight to the rank of its expert slot.
- two_stage: a token crosses to another node once, to a gateway rank there, however many of its
  experts live on that node; the gateway forwards it inside the node. On the way back each
  expert answers the gateway, which sums its node's weighted outputs into one row per token.

Counts travel in one non-blocking Ialltoall per exchange (`CountsGroup`), with the payloads
posted right behind it, so decode pays no extra round trip; a receiver posts its receives once
the counts are in, and only for the peers that send. Experts start on each source's rows as
they arrive and answer at once (expert_schedule per_source; per_layer's collective exchange is in
hpcmoe.runtime.per_layer). The engine and the exchange meet through `ExchangeContext`
(hpcmoe.runtime.exchange_context).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcmoe.parallel.dispatch import (
    DispatchPlan,
    apply_capacity,
    choose_slots,
    combine_tokens,
    count,
    node_groups,
    pack_rows,
    packed_row_bytes,
    plan_from_slots,
    unpack_rows,
)
from hpcmoe.runtime.exchange_context import ExchangeContext, ExchangeGroup, StepStats
from hpcmoe.runtime.per_layer import exchange_per_layer, run_once, sum_partials
from hpcmoe.runtime.tags import Kind, tag_for
from hpcmoe.runtime.waits import Pending, Where


def route(ctx: ExchangeContext, moe, at: Where, h: torch.Tensor, stats: StepStats):
    """h: [n, H] -> (slots [n, k], weights [n, k]), and this rank's routing statistics."""
    ctx.fault.maybe_die(at.step, at.layer, "route")
    ctx.before_dispatch(at.step)
    with ctx.timer.phase("route", at.step, at.layer, at.micro_batch):
        expert_ids, weights = moe.route(h)
        stats.routing[at.layer - ctx.first_moe_layer] += count(expert_ids.reshape(-1), stats.routing.shape[1])
        slots = choose_slots(expert_ids, ctx.tables)
        if ctx.capacity_factor is not None:
            slots = apply_capacity(slots, ctx.capacity_factor, ctx.tables.num_slots)
            stats.dropped += (slots < 0).sum()
    return slots, weights


def dispatch_and_serve(
    ctx: ExchangeContext,
    moe,
    plan: DispatchPlan,
    rows: torch.Tensor,
    group: ExchangeGroup,
    at: Where,
    stats: StepStats,
    buffers: str = "",
):
    """Generator: send `rows` (gathered in plan order) to the experts' ranks in `group`, serve what
    arrives here with this rank's experts, and return the answers [m, H] in plan order.

    With expert groups each member answers a partial sum: sent to every member, the rows come back
    as tp partials summed here in member order; sent to the leader, the leader sums them."""
    if ctx.schedule.per_layer and group.ranks != (ctx.rank,) and not (ctx.tables.tp > 1 and ctx.tp_forward):
        return (yield from exchange_per_layer(ctx, moe, plan, rows, group, at, stats, buffers))
    step, layer, mb = at.step, at.layer, at.micro_batch
    phase, sender, me, tp = ctx.timer.phase, ctx.sender, ctx.rank, ctx.tables.tp
    replies = 1 if tp == 1 or ctx.tp_forward else tp  # answers per row: one, or one partial per member
    dispatch_tag, returns_tag = (
        tag_for(kind, layer, mb, ctx.micro_batches) for kind in (Kind.DISPATCH, Kind.RETURNS)
    )
    key = lambda purpose: (buffers, purpose, mb, layer % 2)  # a buffer is reused two layers later
    posted = ctx.timer.mark()
    with phase("dispatch_post", step, layer, mb, rows=len(plan.order)):
        send_counts, destinations, span, outgoing, answers = gather_by_destination(
            ctx, plan, rows, group, at, stats, key, replies
        )
        part = lambda t, r: t[span[r][0] : span[r][0] + span[r][1]]
    if group.ranks == (me,):  # alone in the group: no counts, no messages
        with phase("experts", step, layer, mb):
            return moe.run_experts(
                outgoing, send_counts[0, : ctx.tables.served_slots(me)].tolist(), answers[0]
            )
    with phase("dispatch_post", step, layer, mb):
        own = part(outgoing, me) if me in span else None
        incoming = CountedIncoming(
            ctx, group, send_counts, own, outgoing, at, dispatch_tag, key("incoming"), posted
        )
        returns = ctx.receives({r: part(answers[r % replies], r) for r in destinations}, returns_tag)
        for r in destinations:
            if r != me:
                sender.send(r, part(outgoing, r), dispatch_tag)
    ctx.fault.maybe_die(step, layer, "dispatch")
    own_answers = part(answers[me % replies], me) if me in span else None
    if tp > 1 and ctx.tp_forward:
        yield from serve_in_group(ctx, moe, incoming, own_answers, at, returns_tag, key, stats)
    else:
        yield from serve(ctx, moe, incoming, own_answers, at, returns_tag)
    if me in span:
        returns.done.add(me)
    ctx.timer.add("dispatch_comm", step, layer, mb, posted)
    ctx.fault.maybe_die(step, layer, "combine")
    yield returns.all_in(at, "combine_wait")
    ctx.timer.add("combine_comm", step, layer, mb, posted)
    if replies == 1:
        return answers[0]
    with phase("combine", step, layer, mb, partial_rows=answers.shape[0] * answers.shape[1]):
        return sum_partials(answers)


def gather_by_destination(
    ctx: ExchangeContext,
    plan: DispatchPlan,
    rows: torch.Tensor,
    group: ExchangeGroup,
    at: Where,
    stats: StepStats,
    key,
    replies: int,
):
    """dispatch_post's host work: the one host read of the counts, the traffic statistics, the rows
    gathered by destination into a reused buffer -> (counts to send [G, S], destination ranks,
    {rank: (first row, rows)}, outgoing [m, H], answers [replies, m, H]: member j's partials in
    answers[j])."""
    hidden, m = rows.shape[1], len(plan.order)
    send_counts, destinations, first, sizes = group.destinations(plan, ctx.tables.tp, replies > 1)
    sent_bytes = np.array(sizes, np.int64) * ctx.row_bytes(rows)
    stats.traffic[at.layer - ctx.first_moe_layer, destinations] += sent_bytes
    outgoing = ctx.pool.get(key("send"), m, hidden, rows.dtype)
    ctx.sender.settle(outgoing, at.waiting_for("send_wait", ()), ctx.timer)
    torch.index_select(rows, 0, plan.source_token, out=outgoing)  # the one gather, ordered by destination
    answers = ctx.pool.get(key("answers"), replies * m, hidden, rows.dtype).view(replies, m, hidden)
    return send_counts, destinations, dict(zip(destinations, zip(first, sizes))), outgoing, answers


def serve(ctx: ExchangeContext, moe, incoming: "CountedIncoming", own_answers, at: Where, returns_tag: int):
    """Generator: run this rank's experts (or its share of them) on each source's rows as they
    arrive and answer at once; its own rows' answers land in `own_answers`."""
    me = ctx.rank
    yield from incoming.start()
    # the counts are in: serving (also when nothing comes)
    ctx.fault.maybe_die(at.step, at.layer, "experts")
    while not incoming.finished():
        arrived = yield incoming.pending()
        for source in sorted(arrived):
            with ctx.timer.phase("experts", at.step, at.layer, at.micro_batch):
                out = moe.run_experts(
                    incoming.rows(source), incoming.slot_counts(source), own_answers if source == me else None
                )
                if source != me:
                    ctx.sender.send(source, out, returns_tag)
            incoming.served.add(source)


def serve_in_group(
    ctx: ExchangeContext,
    moe,
    incoming: "CountedIncoming",
    own_answers,
    at: Where,
    returns_tag: int,
    key,
    stats: StepStats,
):
    """Generator, expert groups with a forwarding leader. The leader waits for every source, forwards
    all their rows to its members in one message each, computes its share, sums the members' partials
    in member order and answers each source; a member computes its share of what the leader forwarded
    and sends it back. (Forwarding per source as it arrives would start members earlier.)"""
    me, tp, sender = ctx.rank, ctx.tables.tp, ctx.sender
    step, layer, mb = at.step, at.layer, at.micro_batch
    tag = lambda kind: tag_for(kind, layer, mb, ctx.micro_batches)
    leader = me - me % tp
    yield from incoming.start()
    yield incoming.all_in()
    rows = incoming.buffer
    shares = tp if me == leader else 1
    partials = ctx.pool.get(key("partials"), shares * len(rows), rows.shape[1], rows.dtype)
    partials = partials.view(shares, len(rows), rows.shape[1])
    sender.settle(partials, at.waiting_for("send_wait", ()), ctx.timer)
    ctx.fault.maybe_die(step, layer, "experts")
    if me == leader:
        members = range(leader + 1, leader + tp)
        for member in members:
            sender.send(member, rows, tag(Kind.TP_FORWARD))
            stats.traffic[layer - ctx.first_moe_layer, member] += len(rows) * ctx.row_bytes(rows)
        from_members = ctx.receives({m: partials[m - leader] for m in members}, tag(Kind.TP_PARTIAL))
    with ctx.timer.phase("experts", step, layer, mb):
        if ctx.schedule.per_layer:
            run_once(moe, rows, incoming.slots, partials[0])
        else:
            for source in incoming.sources:
                moe.run_experts(
                    incoming.rows(source), incoming.slot_counts(source), incoming.segment(partials[0], source)
                )
    if me != leader:
        sender.send(leader, partials[0], tag(Kind.TP_PARTIAL))
        return
    yield from_members.all_in(at, "expert_tp_wait")
    with ctx.timer.phase("combine", step, layer, mb, partial_rows=partials.shape[0] * partials.shape[1]):
        summed = sum_partials(partials)
        for source in incoming.sources:
            if source == me:
                own_answers.copy_(incoming.segment(summed, source))
            else:
                sender.send(source, incoming.segment(summed, source), returns_tag)


class CountedIncoming:
    """One Ialltoall of counts per exchange says who sends how many rows; receives are then posted
    for exactly those sources (their payloads left right behind the counts). A member of an expert
    group whose leader forwards receives all of them in one message from the leader instead.

    Measured against counts in a header sent in synchronous mode, found with matched probes and
    closed by a non-blocking barrier (Hoefler's NBX): equal at 8 ranks, slower at 16 and 32
    (docs/PERFORMANCE.md), so only this design is kept."""

    def __init__(
        self,
        ctx: ExchangeContext,
        group: ExchangeGroup,
        send_counts: np.ndarray,
        own,
        like: torch.Tensor,
        at: Where,
        tag: int,
        key,
        posted: float,
    ):
        """own: this rank's rows for itself (or None); like: a tensor of the rows' width and dtype."""
        self.ctx, self.group, self.own, self.at, self.tag, self.key, self.posted = (
            ctx,
            group,
            own,
            at,
            tag,
            key,
            posted,
        )
        self.hidden, self.dtype = like.shape[1], like.dtype
        self.counts, self.counts_in = group.counts[at.micro_batch].post(send_counts, at)
        self.served: set[int] = set()
        self.from_leader = False

    def start(self):
        """Generator: wait for the counts, then post the receives."""
        ctx, me, at = self.ctx, self.ctx.rank, self.at
        yield self.counts_in
        ctx.timer.add("counts_comm", at.step, at.layer, at.micro_batch, self.posted)
        self.slots = self.counts[:, : ctx.tables.served_slots(me)]  # [G, my slots] from each member
        rows_from = self.slots.sum(1)
        self.sources = {self.group.ranks[i]: i for i in np.flatnonzero(rows_from)}
        self.starts = np.cumsum(np.concatenate([[0], rows_from]))
        self.buffer = ctx.pool.get(self.key, int(self.starts[-1]), self.hidden, self.dtype)
        tp = ctx.tables.tp
        if tp > 1 and ctx.tp_forward:
            # the leader forwarded it last time
            ctx.sender.settle(self.buffer, at.waiting_for("send_wait", ()), ctx.timer)
            if me % tp:  # a member: everything comes from the leader
                self.from_leader = True
                self.receives = ctx.receives(
                    {me - me % tp: self.buffer},
                    tag_for(Kind.TP_FORWARD, at.layer, at.micro_batch, ctx.micro_batches),
                )
                return
        self.receives = ctx.receives({s: self.segment(self.buffer, s) for s in self.sources}, self.tag)
        if me in self.sources:
            if tp > 1 and ctx.tp_forward:  # the leader forwards one whole buffer: its own rows go in too
                ctx.sender.send(me, self.own, self.tag, self.receives)
            else:
                self.receives.keep_own(self.own)

    def segment(self, t: torch.Tensor, source: int) -> torch.Tensor:
        """The rows of `t` (laid out like the receive buffer) that belong to `source`."""
        i = self.group.ranks.index(source)
        return t[self.starts[i] : self.starts[i + 1]]

    def finished(self) -> bool:
        return len(self.served) == len(self.sources)

    def pending(self) -> Pending:
        return self.receives.any_in(set(self.sources) - self.served, self.at, "dispatch_wait")

    def all_in(self) -> Pending:
        return self.receives.all_in(self.at, "dispatch_wait")

    def rows(self, source: int) -> torch.Tensor:
        return self.segment(self.buffer, source) if self.from_leader else self.receives.received[source]

    def slot_counts(self, source: int) -> list[int]:
        return self.slots[self.sources[source]].tolist()


def flat(ctx: ExchangeContext, moe, at: Where, h: torch.Tensor, stats: StepStats):
    """Generator: h [n, H] -> [n, H] weighted expert outputs plus shared experts, in token order."""
    slots, weights = route(ctx, moe, at, h, stats)
    plan = plan_from_slots(slots, ctx.tables, sent_all=ctx.capacity_factor is None)
    # computed while the tokens travel
    with ctx.timer.phase("shared_experts", at.step, at.layer, at.micro_batch):
        shared = moe.shared(h)
    returned = yield from dispatch_and_serve(ctx, moe, plan, h, ctx.group, at, stats)
    with ctx.timer.phase("combine", at.step, at.layer, at.micro_batch, tokens=len(h)):
        routed = combine_tokens(plan, returned, weights)
        return routed if shared is None else routed + shared


def two_stage(ctx: ExchangeContext, moe, at: Where, h: torch.Tensor, stats: StepStats):
    """Generator: as `flat`, but each token crosses to another node at most once per node."""
    step, layer, mb = at.step, at.layer, at.micro_batch
    phase, sender, me, tables = ctx.timer.phase, ctx.sender, ctx.rank, ctx.tables
    tag = lambda kind: tag_for(kind, layer, mb, ctx.micro_batches)
    key = lambda purpose: ("gateway", purpose, mb, layer % 2)
    slots, weights = route(ctx, moe, at, h, stats)
    k, hidden, row_bytes = slots.shape[1], h.shape[1], packed_row_bytes(h.shape[1], h.dtype, slots.shape[1])
    # stage 1: one message per destination node, to that node's gateway for this rank
    with phase("dispatch_post", step, layer, mb) as work:
        groups = node_groups(slots, weights, tables)
        node_counts = groups.node_counts
        work["rows"] = sum(node_counts)
        node_ends = np.cumsum([0] + node_counts)
        send = np.zeros((tables.num_ranks, 1), np.int64)
        for node, count in enumerate(node_counts):
            send[tables.gateway[node], 0] = count
        counts, counts_in = ctx.group.counts[mb].post(send, at)
        packed = pack_rows(h[groups.tokens], groups.slots, groups.weights)  # [t, row_bytes] uint8
        returns_buffer = ctx.pool.get(key("returns"), len(groups.tokens), hidden, h.dtype)
        active = [node for node, count in enumerate(node_counts) if count]
        node_part = lambda t, node: t[node_ends[node] : node_ends[node + 1]]
        returns = ctx.receives(
            {tables.gateway[b]: node_part(returns_buffer, b) for b in active}, tag(Kind.GATEWAY_RETURNS)
        )
        for node in active:
            gateway = tables.gateway[node]
            stats.traffic[layer - ctx.first_moe_layer, gateway] += node_counts[node] * ctx.row_bytes(packed)
            if gateway != me:
                sender.send(gateway, node_part(packed, node), tag(Kind.GATEWAY_DISPATCH))
    with phase("shared_experts", step, layer, mb):
        shared = moe.shared(h)
    yield counts_in
    members = np.flatnonzero(counts[:, 0])
    served = [ctx.group.ranks[i] for i in members]  # the sources this rank is gateway for, in rank order
    starts = np.cumsum(np.concatenate([[0], counts[members, 0]]))
    incoming_buffer = ctx.pool.get(key("incoming"), int(starts[-1]), row_bytes, torch.uint8)
    incoming = ctx.receives(
        {s: incoming_buffer[starts[i] : starts[i + 1]] for i, s in enumerate(served)},
        tag(Kind.GATEWAY_DISPATCH),
    )
    if me in served:
        sender.send(me, node_part(packed, tables.gateway.index(me)), tag(Kind.GATEWAY_DISPATCH), incoming)
    yield incoming.all_in(at, "dispatch_wait")
    # stage 2: the gateway forwards its tokens to the experts of its own node
    with phase(
        "gateway", step, layer, mb, rows=len(incoming_buffer), row_bytes=ctx.row_bytes(incoming_buffer)
    ):
        rows, gate_slots, gate_weights = unpack_rows(incoming_buffer, hidden, h.dtype, k)
        plan = plan_from_slots(gate_slots, tables)
    answered = yield from dispatch_and_serve(ctx, moe, plan, rows, ctx.node_group, at, stats, buffers="node")
    with phase("gateway", step, layer, mb, rows=len(rows), row_bytes=ctx.row_bytes(rows)):
        partial = combine_tokens(plan, answered, gate_weights)  # this node's share of each token
        for i, source in enumerate(served):
            sender.send(source, partial[starts[i] : starts[i + 1]], tag(Kind.GATEWAY_RETURNS), returns)
    yield returns.all_in(at, "combine_wait")
    with phase("combine", step, layer, mb, tokens=len(h)):
        routed = sum_node_shares(h, groups.tokens, active, node_ends, returns_buffer)
        return routed if shared is None else routed + shared


def sum_node_shares(h: torch.Tensor, tokens, active: list, node_ends, shares: torch.Tensor) -> torch.Tensor:
    """h: [n, H]; shares [t, H]: each active node's weighted share of its tokens (tokens [t], node
    b's in node_ends[b]:node_ends[b + 1]) -> [n, H] their sum per token, in float32 and node order:
    the same sum on every run."""
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for node in active:
        span = slice(node_ends[node], node_ends[node + 1])
        out[tokens[span]] += shares[span].float()
    return out.to(h.dtype)


def exchange_for(dispatch: str):
    """parallel.dispatch -> the exchange a MoE layer runs (flat or two_stage)."""
    return two_stage if dispatch == "two_stage" else flat
