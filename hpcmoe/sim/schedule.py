"""The engine's step, rank by rank, as generators that the simulation drives (hpcmoe.sim.simulate).

Every MoE layer's exchange is the engine's own (moe_layer.flat / two_stage and all they call, run
on the simulated clock by sim.net), and so is the scheduler's loop (scheduler.passes). Around them,
the functions here follow the engine function named in their docstring, phase for phase and
message for message: they yield Work (compute on the rank, with the phase the engine's timer
records) and Wait (what the engine's coroutine yields a Pending for), and post messages and
collectives where the engine posts them. The requests of a rank and micro-batch, head split and
reduction plan come from the engine's own code; only time is modelled.
"""

from __future__ import annotations

import torch

from hpcmoe.model.attention import kv_heads_for, split_heads
from hpcmoe.parallel.layout import request_range, requests_per_rank, step_micro_batches
from hpcmoe.runtime import moe_layer
from hpcmoe.runtime.exchange_context import StepStats
from hpcmoe.runtime.scheduler import PASSED, RESUMING, passes
from hpcmoe.runtime.tags import Kind, tag_for
from hpcmoe.runtime.waits import Where
from hpcmoe.sim.events import PROGRESS, AllFrom, Wait, Work
from hpcmoe.sim.net import charged

RECORD_BYTES = 4096  # a step's record to rank 0 (tokens, routing, timing rows), pickled


def concurrently(sim, generators: list):
    """scheduler.passes, the engine's own loop, on the simulation's clock: a coroutine can go on once
    what it waits for has happened by now; resuming one costs fixed.resume; each pass ends in a test
    of the sends (PROGRESS); when none can go on the rank waits for the first of them."""
    loop = passes(
        generators,
        lambda wait: True if sim.passed(wait.on) else None,
        lambda command: isinstance(command, Work),
    )
    while True:
        try:
            command = next(loop)
        except StopIteration as finished:
            return finished.value
        yield (
            Work(sim.costs.fixed["resume"])
            if command is RESUMING
            else PROGRESS
            if command is PASSED
            else command
        )


def rank_main(sim, rank: int):
    """steps.StepLoop for one rank: every step's micro-batches (or, on an ma MoE rank, every MoE
    layer's exchange), then the record to rank 0 and the stop vote."""
    config, costs, layout = sim.config, sim.costs, sim.layout
    requests, m = config.requests, config.model
    if not sim.is_ma:
        mine = range(rank, len(requests), sim.ranks)
    else:
        mine = layout.group_requests(len(requests), rank) if layout.is_attention(rank) else range(0)
    if sim.is_ma:
        from hpcmoe.runtime.ma import exchange_members

        members = tuple(exchange_members(layout))
    else:
        members = tuple(range(sim.ranks))
    vote = None
    for step in range(config.steps):
        sim.step_of[rank] = step
        if rank == 0:
            sim.forget(step)
        stats = StepStats.zeros(m.moe_layers, m.num_experts, sim.ranks)
        if rank in members:  # as Messaging.run_step sets it
            sim.net.context(rank, members).schedule.prefill = prefill_step(sim, step)
        started = sim.now
        alive = [i for i in mine if requests[i].max_new_tokens > step]
        if sim.context is None:  # the engine's run: a prefill, then one token per step
            new = [len(requests[i].prompt_ids) if step == 0 else 1 for i in alive]
            cached = [0 if step == 0 else len(requests[i].prompt_ids) + step - 1 for i in alive]
        else:  # steady decode: every request already holds `context` positions
            new, cached = [1] * len(alive), [sim.context + step] * len(alive)
        yield Work(costs.fixed["step"] + (costs.fixed["first_step"] if step == 0 else 0.0))
        data_parallel = layout.replicas if sim.is_ma else sim.ranks
        micro_batches = step_micro_batches(
            config.run.micro_batches,
            config.run.decode_micro_batch_min,
            requests_per_rank(len(requests), data_parallel),
            prefill_step(sim, step),
        )
        if sim.is_ma and not layout.is_attention(rank):
            generators = [
                exchange(sim, rank, Where(step, layer, mb), 0, members, stats)
                for layer in range(m.dense_layers, m.num_layers)
                for mb in range(micro_batches)
            ]
        else:
            blocks = [request_range(len(alive), micro_batches, i) for i in range(micro_batches)]
            part = lambda values, block: values[block.start : block.stop]
            body = ma_micro_batch if sim.is_ma else ep_micro_batch
            generators = [
                body(sim, rank, step, mb, part(new, block), part(cached, block), members, stats)
                for mb, block in enumerate(blocks)
            ]
        yield from concurrently(sim, generators)
        sim.routing_counts[step, :, rank] = stats.routing.numpy()
        sim.traffic[step, :, rank] = stats.traffic
        sim.dropped += int(stats.dropped)
        sim.row(rank, "step", -1, 0, started, sim.now)
        vote = yield from finish_step(
            sim, rank, step, sum(r.max_new_tokens > step for r in requests) > 0, vote
        )


def finish_step(sim, rank: int, step: int, made_tokens: bool, vote):
    """steps.StepLoop after the forward: the record to rank 0 (hooks.Records), which appends the step;
    then hooks.StopSignal: the first boundary waits for its vote, later ones read the previous vote.
    -> this boundary's vote (a collective's completion here), or None after the last step."""
    fixed, started, ranks = sim.costs.fixed, sim.now, sim.ranks
    if rank == 0:
        yield Wait(AllFrom(sim.mail(("record", step)), 0, ranks - 1), "record_wait")
        yield Work(fixed["record"] * (ranks - 1))
        if made_tokens:
            sim.token_times.append(sim.now)  # rank 0 holds this step's tokens
        yield Work(fixed["output"])
    else:
        yield Work(
            fixed["output"], then=lambda ends: sim.send(("record", step), rank, [0], RECORD_BYTES, ends[-1])
        )
    sim.row(rank, "output", -1, 0, started, sim.now)
    if step + 1 >= sim.config.steps:
        return None
    if vote is not None:
        yield Wait(vote, "stop_wait")
    vote = sim.collective(("stop", step), range(ranks), rank)
    if step == 0:
        yield Wait(vote, "stop_wait")
    return vote


def padded(new: list, cached: list) -> tuple[int, int, int, int]:
    """StepInputs.build's shapes: (requests b, padded new positions t, visible keys s, valid tokens n)."""
    ends = [c + t for c, t in zip(cached, new)]
    return len(new), max(new, default=1), max(ends, default=1), sum(new)


def ep_micro_batch(
    sim, rank: int, step: int, mb: int, new: list, cached: list, members: tuple, stats: StepStats
):
    """ep.EPEngine.forward_micro_batch: embed, every layer's attention then MLP or MoE exchange, LM head."""
    costs, m = sim.costs, sim.config.model
    b, t, s, n = padded(new, cached)
    yield Work(costs.embed(b, t), "embed", -1, mb)
    for layer in range(m.num_layers):
        yield Work(costs.attention(b, t, s, m.heads, m.kv_heads), "attention", layer, mb)
        if layer >= m.dense_layers:
            yield from exchange(sim, rank, Where(step, layer, mb), n, members, stats)
        else:
            yield Work(costs.mlp(n), "mlp", layer, mb)
    yield Work(costs.lm_head(b, m.vocab), "lm_head", -1, mb)


def exchange(sim, rank: int, at: Where, n: int, members: tuple, stats: StepStats):
    """ep.Messaging.exchange: the engine's own moe_layer.flat or two_stage for n tokens among
    `members`, on the simulated clock (sim.net)."""
    net = sim.net
    run = moe_layer.exchange_for(sim.config.parallel.dispatch)
    return (
        yield from charged(
            net, rank, run(net.context(rank, members), net.moe(rank, at.layer), at, net.tokens(n), stats)
        )
    )


def prefill_step(sim, step: int) -> bool:
    """The run's first step is its prefill; a steady-decode simulation (sim.context) has none."""
    return step == 0 and sim.context is None


# ---------------------------------------------------------------- attention/MoE separation


def ma_micro_batch(
    sim, rank: int, step: int, mb: int, new: list, cached: list, members: tuple, stats: StepStats
):
    """ma.AttentionEngine.forward_micro_batch: this rank's heads, the group's hierarchical sum, its
    slice of the tokens through the MoE ranks, the group's all-gather; then the token's choice
    (ma_lm_head). The sums and gathers are ma's own functions, on tensors of the engine's shapes
    that hold no data (device meta)."""
    from hpcmoe.runtime import ma

    costs, m, layout, net = sim.costs, sim.config.model, sim.layout, sim.net
    role = net.role(rank)
    primaries = layout.primaries(rank)
    shard, shards = primaries.index(rank), len(primaries)
    heads = split_heads(m.heads, shards)[shard]
    kv = len(kv_heads_for(heads, m.heads, m.kv_heads)) if m.attention == "gqa" else 0
    b, t, s, n = padded(new, cached)
    slices = [request_range(n, shards, i) for i in range(shards)]
    group = layout.group_ranks(rank)
    tag = lambda layer: lambda kind: tag_for(kind, layer, mb, sim.config.run.micro_batches)
    yield Work(costs.embed(b, t), "embed", -1, mb)
    for layer in range(m.num_layers):
        at = Where(step, layer, mb)
        yield Work(costs.attention(b, t, s, len(heads), kv), "attention", layer, mb)
        posted = sim.now
        partial = meta(b, t, m.hidden, dtype=torch.float32)
        yield from charged(net, rank, ma.hierarchical_sum(role, partial, primaries, tag(layer), at))
        sim.row(rank, "reduce_comm", layer, mb, posted, sim.now)
        yield Work(costs.residual(b, t), "attention", layer, mb)
        if layer >= m.dense_layers:
            yield from exchange(sim, rank, at, len(slices[shard]), members, stats)
        else:
            yield Work(costs.mlp(len(slices[shard])), "mlp", layer, mb)
        posted = sim.now
        everything = yield from charged(
            net,
            rank,
            ma.all_gather_rows(
                role,
                meta(len(slices[shard]), m.hidden, dtype=net.dtype),
                primaries,
                group,
                [len(x) for x in slices],
                meta(0, m.hidden, dtype=net.dtype),
                tag(layer),
                at,
            ),
        )
        sim.row(rank, "gather_comm", layer, mb, posted, sim.now)
        yield Work(costs.gather(everything.numel() * everything.element_size()), "gather", layer, mb)
    yield from ma_lm_head(sim, rank, Where(step, m.num_layers, mb), b, tag(m.num_layers))


def ma_lm_head(sim, rank: int, done: Where, b: int, tag):
    """The end of ma.AttentionEngine.forward_micro_batch: the LM head on this rank's vocabulary
    slice, the group's (max, index) all-gather that picks the token, and the logits' all-gather
    when output.save_logits keeps them."""
    from hpcmoe.runtime import ma

    net, m = sim.net, sim.config.model
    role, primaries, group = net.role(rank), sim.layout.primaries(rank), sim.layout.group_ranks(rank)
    shard, shards = primaries.index(rank), len(primaries)
    vocab = [request_range(m.vocab, shards, i) for i in range(shards)]
    yield Work(sim.costs.lm_head(b, len(vocab[shard])), "lm_head", -1, done.micro_batch)
    pairs = meta(1, 2 * b, dtype=torch.float64)
    yield from charged(
        net,
        rank,
        ma.all_gather_rows(role, pairs, primaries, group, [1] * shards, pairs, tag, done, Kind.CHOICE),
    )
    if sim.config.output.save_logits:
        columns = meta(len(vocab[shard]), b, dtype=torch.float32)
        yield from charged(
            net,
            rank,
            ma.all_gather_rows(
                role,
                columns,
                primaries,
                group,
                [len(v) for v in vocab],
                meta(0, b, dtype=torch.float32),
                tag,
                done,
                Kind.LOGITS,
            ),
        )


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the engine's shape and dtype that holds no data (ma's sums and gathers read only
    shapes here)."""
    return torch.empty(*shape, dtype=dtype, device="meta")
