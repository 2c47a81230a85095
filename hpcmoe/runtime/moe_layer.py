"""One MoE layer's exchange, as generators the scheduler drives (they yield `Pending`).

- flat: every token slot travels straight to the rank of its expert slot.
- two_stage: a token crosses to another node once, to a gateway rank there, however many of its
  experts live on that node; the gateway forwards it inside the node. On the way back each
  expert answers the gateway, which sums its node's weighted outputs into one row per token.

Counts travel in one non-blocking Ialltoall per exchange (`CountsGroup`), with the payloads
posted right behind it, so decode pays no extra round trip; a receiver posts its receives once
the counts are in, and only for the peers that send. Experts start on each source's rows as
they arrive and answer at once. The engine and the exchange meet through `ExchangeContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from hpcmoe.parallel.dispatch import (
    DispatchPlan,
    PlacementTables,
    apply_capacity,
    choose_slots,
    combine_tokens,
    count,
    expert_major,
    node_groups,
    pack_rows,
    packed_row_bytes,
    plan_from_slots,
    unpack_rows,
)
from hpcmoe.parallel.layout import ExpertSchedule
from hpcmoe.runtime.comm import BufferPool, CountsGroup, Link, Pending, Receives, Sender, Where
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.tags import Kind, tag_for


@dataclass
class StepStats:
    """What one step's exchanges saw on this rank."""

    routing: torch.Tensor  # [moe_layers, experts] token slots this rank sent to each expert
    traffic: np.ndarray  # [moe_layers, ranks] payload bytes this rank sent to each rank
    dropped: torch.Tensor  # [] token slots over capacity (parallel.capacity_factor)

    @classmethod
    def zeros(cls, moe_layers: int, experts: int, ranks: int, device=None) -> "StepStats":
        return cls(
            torch.zeros(moe_layers, experts, dtype=torch.int64, device=device),
            np.zeros((moe_layers, ranks), np.int64),
            torch.zeros((), dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class ExchangeGroup:
    """The ranks one kind of exchange runs among, and its counts collective per micro-batch slot."""

    ranks: tuple[int, ...]  # world ranks, ascending
    counts: tuple[CountsGroup, ...]  # [micro_batches]
    member_host: np.ndarray  # [R] bool, True for the group's ranks

    @classmethod
    def build(
        cls, comm, ranks, micro_batches: int, world_size: int, track: Callable = lambda comm: comm
    ) -> "ExchangeGroup":
        """Collective over `comm`, whose members are exactly `ranks` in order; track: the run's
        FaultState.track, given each communicator made."""
        member = np.zeros(world_size, bool)
        member[list(ranks)] = True
        return cls(tuple(ranks), tuple(CountsGroup(comm, ranks, track) for _ in range(micro_batches)), member)

    def host_counts(self, plan: DispatchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The plan's counts in one device-to-host copy -> (counts per slot of each rank [R, S], rows
        to each rank [R], first row of each in plan order [R])."""
        host = torch.cat([plan.send_counts.reshape(-1), plan.rank_counts]).cpu().numpy()
        ranks = len(self.member_host)
        send, rank_counts = host[:-ranks].reshape(ranks, -1), host[-ranks:]
        return send, rank_counts, np.cumsum(rank_counts) - rank_counts

    def destinations(self, plan: DispatchPlan, tp: int = 1, fan_out: bool = True):
        """The host's part of the control path: one device-to-host copy of the counts, then Python
        work only per active peer -> (counts to send [G, S], destination ranks, first row of each
        in plan order, rows for each). With expert groups (tp > 1) every member is sent the counts
        of its group's slots (it computes a share of each); the rows go to every member (fan_out)
        or to the group's leader only, which forwards them."""
        send, rank_counts, starts = self.host_counts(plan)
        ranks = len(self.member_host)
        if tp > 1:
            leader = np.arange(ranks) // tp * tp
            send = send[leader]
            if fan_out:
                rank_counts, starts = rank_counts[leader], starts[leader]
        if len(self.ranks) < ranks:
            send = send[list(self.ranks)]
        active = [r for r in np.flatnonzero(rank_counts) if self.member_host[r]]
        return send, active, starts[active].tolist(), rank_counts[active].tolist()

    def shares(self, plan: DispatchPlan, tp: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `destinations`, for one collective, with no Python work per peer -> (counts to send
        [G, S], rows to each member [G], first row of each in plan order [G]); with expert groups
        every member gets its group's rows."""
        send, rank_counts, starts = self.host_counts(plan)
        members = np.asarray(self.ranks)
        group_of = members - members % tp
        return send[group_of], rank_counts[group_of], starts[group_of]

    def close(self) -> None:
        for group in self.counts:
            group.close()


@dataclass(frozen=True)
class ExchangeContext:
    """What a MoE layer's exchange needs from its rank, and nothing else."""

    rank: int  # world rank
    world: object  # the communicator of every point-to-point message
    sender: Sender
    link: Link
    tables: PlacementTables  # the placement compiled for this rank
    group: ExchangeGroup  # the ranks tokens travel among (stage 1 of two_stage)
    node_group: Optional[ExchangeGroup]  # two_stage: this node's ranks (stage 2)
    timer: object
    micro_batches: int
    first_moe_layer: int  # layer index of MoE layer 0 (model.dense_layers)
    capacity_factor: Optional[float]
    pool: BufferPool
    before_dispatch: Callable[[int], None] = lambda step: None  # run.stall_rank
    tp_forward: bool = False  # expert groups: rows go to the leader, which forwards (else to every member)
    schedule: ExpertSchedule = field(default_factory=ExpertSchedule)  # set per step by the engine
    # bytes of one row of a [rows, W] tensor on the wire (the simulator's rows are narrower than the model's)
    row_bytes: Callable[[torch.Tensor], int] = lambda rows: rows.shape[1] * rows.element_size()
    fault: FaultState = field(default_factory=FaultState)  # the run's kill points (run.kill)

    def receives(self, buffers: dict, tag: int) -> Receives:
        """Receives of this rank's messages (staged through pinned memory where the MPI needs it)."""
        return self.sender.receives(buffers, tag)

    def close(self) -> None:
        self.group.close()
        if self.node_group is not None:
            self.node_group.close()


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
    phase, sender, me, hidden = ctx.timer.phase, ctx.sender, ctx.rank, rows.shape[1]
    tp = ctx.tables.tp
    replies = 1 if tp == 1 or ctx.tp_forward else tp  # answers per row: one, or one partial per member
    dispatch_tag, returns_tag = (
        tag_for(kind, layer, mb, ctx.micro_batches) for kind in (Kind.DISPATCH, Kind.RETURNS)
    )
    key = lambda purpose: (buffers, purpose, mb, layer % 2)  # a buffer is reused two layers later
    posted = ctx.timer.mark()
    with phase("dispatch_post", step, layer, mb, rows=len(plan.order)):
        send_counts, destinations, first, sizes = group.destinations(
            plan, tp, replies > 1
        )  # the one host read
        stats.traffic[layer - ctx.first_moe_layer, destinations] += np.array(sizes, np.int64) * ctx.row_bytes(
            rows
        )
        span = dict(zip(destinations, zip(first, sizes)))
        part = lambda t, r: t[span[r][0] : span[r][0] + span[r][1]]
        outgoing = ctx.pool.get(key("send"), len(plan.order), hidden, rows.dtype)
        sender.settle(outgoing, at.waiting_for("send_wait", ()), ctx.timer)
        torch.index_select(rows, 0, plan.source_token, out=outgoing)  # the one gather, ordered by destination
        answers = ctx.pool.get(key("answers"), replies * len(plan.order), hidden, rows.dtype)
        answers = answers.view(replies, len(plan.order), hidden)  # member j's partials in answers[j]
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


def exchange_per_layer(
    ctx: ExchangeContext,
    moe,
    plan: DispatchPlan,
    rows: torch.Tensor,
    group: ExchangeGroup,
    at: Where,
    stats: StepStats,
    buffers: str = "",
):
    """Generator, expert_schedule per_layer: the counts, then the rows in one Ialltoallv on the
    micro-batch slot's communicator; this rank runs each local expert once on all its rows and
    answers every source in one Ialltoallv back -> the answers [m, H] in plan order. With expert
    groups every member gets the group's rows and answers its partial sums, summed here."""
    step, layer, mb = at.step, at.layer, at.micro_batch
    phase, me, hidden, tp = ctx.timer.phase, ctx.rank, rows.shape[1], ctx.tables.tp
    slot, sent = group.counts[mb], len(plan.order)
    key = lambda purpose: (buffers, purpose, mb, layer % 2)  # a buffer is reused two layers later
    wait = slot.turn(at, layer - ctx.first_moe_layer)
    if wait is not None:
        yield wait
    posted = ctx.timer.mark()
    with phase("dispatch_post", step, layer, mb, rows=sent):
        send_counts, rows_to, first = group.shares(plan, tp)  # the one host read
        stats.traffic[layer - ctx.first_moe_layer, list(group.ranks)] += rows_to * ctx.row_bytes(rows)
        outgoing = ctx.pool.get(key("send"), sent, hidden, rows.dtype)
        torch.index_select(rows, 0, plan.source_token, out=outgoing)  # the one gather, ordered by destination
        counts, counts_in = slot.post(send_counts, at)
    yield counts_in
    ctx.timer.add("counts_comm", step, layer, mb, posted)
    slots = counts[:, : ctx.tables.served_slots(me)]  # [G, my slots] from each member
    rows_from = slots.sum(1)
    from_first = np.cumsum(rows_from) - rows_from
    incoming = ctx.pool.get(key("incoming"), int(rows_from.sum()), hidden, rows.dtype)

    def exchange(*buffers_counts_and_firsts, wait: str):
        return slot.rows(
            *buffers_counts_and_firsts, ctx.link, at, wait, ctx.sender.staging, ctx.sender.streams
        )

    ctx.fault.maybe_die(step, layer, "dispatch")
    yield from exchange(outgoing, rows_to, first, incoming, rows_from, from_first, wait="dispatch_wait")
    ctx.timer.add("dispatch_comm", step, layer, mb, posted)
    served = ctx.pool.get(key("served"), len(incoming), hidden, rows.dtype)
    ctx.fault.maybe_die(step, layer, "experts")
    if len(incoming):
        with phase("experts", step, layer, mb):
            run_once(moe, incoming, slots, served)
    ctx.fault.maybe_die(step, layer, "combine")
    answers = ctx.pool.get(key("answers"), tp * sent, hidden, rows.dtype)  # member j's partials at j % tp
    back_first = np.asarray(group.ranks) % tp * sent + first
    yield from exchange(served, rows_from, from_first, answers, rows_to, back_first, wait="combine_wait")
    slot.done_turn()
    ctx.timer.add("combine_comm", step, layer, mb, posted)
    if tp == 1:
        return answers
    with phase("combine", step, layer, mb, partial_rows=tp * sent):
        return sum_partials(answers.view(tp, sent, hidden))


def run_once(moe, rows: torch.Tensor, counts: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """rows: [T, H] as received, source-major; counts: [G, S] rows from each source for each local
    slot -> out [T, H], each local expert (or this rank's share of it) run once on all its rows."""
    if counts.shape[1] <= 1 or counts.shape[0] <= 1:  # already grouped by expert
        return moe.run_experts(rows, counts.sum(0).tolist(), out)
    order = torch.from_numpy(expert_major(counts))
    if rows.device.type != "cpu":  # queued behind the compute stream, no host synchronisation
        order = order.pin_memory().to(rows.device, non_blocking=True)
    answers = moe.run_experts(rows.index_select(0, order), counts.sum(0).tolist())
    return out.index_copy_(0, order, answers)


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


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """[T, m, H] partial outputs of an expert group's members -> [m, H]: summed in member order, in
    float32, so every run and every arrival order gives the same bits. (In bfloat16 each partial was
    rounded before the sum: T + 1 roundings where a whole expert has one.)"""
    total = partials[0].to(torch.float32, copy=True)
    for partial in partials[1:]:
        total += partial
    return total.to(partials.dtype)


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
            ctx.sender.settle(
                self.buffer, at.waiting_for("send_wait", ()), ctx.timer
            )  # the leader forwarded it last time
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
    with ctx.timer.phase(
        "shared_experts", at.step, at.layer, at.micro_batch
    ):  # computed while the tokens travel
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
            stats.traffic[layer - ctx.first_moe_layer, tables.gateway[node]] += node_counts[
                node
            ] * ctx.row_bytes(packed)
            if tables.gateway[node] != me:
                sender.send(tables.gateway[node], node_part(packed, node), tag(Kind.GATEWAY_DISPATCH))
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
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for node in active:  # node order: the same sum on every run
            tokens = groups.tokens[node_ends[node] : node_ends[node + 1]]
            out[tokens] += node_part(returns_buffer, node).float()
        routed = out.to(h.dtype)
        return routed if shared is None else routed + shared


def exchange_for(dispatch: str):
    """parallel.dispatch -> the exchange a MoE layer runs (flat or two_stage)."""
    return two_stage if dispatch == "two_stage" else flat
