"""The collective exchange of parallel.expert_schedule per_layer (`exchange_per_layer`: the counts,
then the rows in one Ialltoallv each way) and the expert-side math both schedules share: each local
expert run once on all its rows (`run_once`), and an expert group's partial sums (`sum_partials`).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcmoe.parallel.dispatch import DispatchPlan, expert_major
from hpcmoe.runtime.exchange_context import ExchangeContext, ExchangeGroup, StepStats
from hpcmoe.runtime.waits import Where


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


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """[T, m, H] partial outputs of an expert group's members -> [m, H]: summed in member order, in
    float32, so every run and every arrival order gives the same bits. (In bfloat16 each partial was
    rounded before the sum: T + 1 roundings where a whole expert has one.)"""
    total = partials[0].to(torch.float32, copy=True)
    for partial in partials[1:]:
        total += partial
    return total.to(partials.dtype)
