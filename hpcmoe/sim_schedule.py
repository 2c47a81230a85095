"""The engine's step, rank by rank, as generators that the simulation drives (hpcmoe.simulate).

Each function follows the engine function named in its docstring, phase for phase and message
for message: it yields Work (compute on the rank, with the phase the engine's timer records) and
Wait (what the engine's coroutine yields a Pending for), and posts messages and collectives where
the engine posts them. The requests of a rank and micro-batch, the plans, gateways, head split,
reduction plan and the scheduler's loop (scheduler.passes) come from the engine's own code; only
time is modelled.
"""
from __future__ import annotations

import numpy as np
import torch

from hpcmoe import sim_routing
from hpcmoe.attention import kv_heads_for, split_heads
from hpcmoe.dispatch import packed_row_bytes
from hpcmoe.layout import ExpertSchedule, request_range, requests_per_rank, step_micro_batches
from hpcmoe.scheduler import PASSED, RESUMING, passes
from hpcmoe.simulate import PROGRESS, AllFrom, AnyFrom, Wait, Work

RECORD_BYTES = 4096  # a step's record to rank 0 (tokens, routing, timing rows), pickled


def concurrently(sim, generators: list):
    """scheduler.passes, the engine's own loop, on the simulation's clock: a coroutine can go on once
    what it waits for has happened by now; resuming one costs fixed.resume; each pass ends in a test
    of the sends (PROGRESS); when none can go on the rank waits for the first of them."""
    loop = passes(generators, lambda wait: True if wait.on.time is not None and wait.on.time <= sim.now else None,
                  lambda command: isinstance(command, Work))
    while True:
        try:
            command = next(loop)
        except StopIteration as finished:
            return finished.value
        yield Work(sim.costs.fixed["resume"]) if command is RESUMING else PROGRESS if command is PASSED else command


def rank_main(sim, rank: int):
    """engine.run_steps for one rank: every step's micro-batches (or, on an ma MoE rank, every MoE
    layer's exchange), then the record to rank 0 and the stop vote."""
    config, costs, layout = sim.config, sim.costs, sim.layout
    requests, m = config.requests, config.model
    if not sim.is_ma:
        mine = range(rank, len(requests), sim.ranks)
    else:
        mine = layout.group_requests(len(requests), rank) if layout.is_attention(rank) else range(0)
    vote = None
    for step in range(config.steps):
        sim.step_of[rank] = step
        if rank == 0:
            sim.forget(step)
        started = sim.now
        alive = [i for i in mine if requests[i].max_new_tokens > step]
        if sim.context is None:   # the engine's run: a prefill, then one token per step
            new = [len(requests[i].prompt_ids) if step == 0 else 1 for i in alive]
            cached = [0 if step == 0 else len(requests[i].prompt_ids) + step - 1 for i in alive]
        else:                     # steady decode: every request already holds `context` positions
            new, cached = [1] * len(alive), [sim.context + step] * len(alive)
        yield Work(costs.fixed["step"] + (costs.fixed["first_step"] if step == 0 else 0.0))
        data_parallel = layout.replicas if sim.is_ma else sim.ranks
        micro_batches = step_micro_batches(config.run.micro_batches, config.run.decode_micro_batch_min,
                                           requests_per_rank(len(requests), data_parallel), prefill_step(sim, step))
        if sim.is_ma and not layout.is_attention(rank):
            from hpcmoe.ma import exchange_members
            members = tuple(exchange_members(layout))
            generators = [flat(sim, rank, (step, layer, mb), 0, members)
                          for layer in range(m.dense_layers, m.num_layers) for mb in range(micro_batches)]
        else:
            blocks = [request_range(len(alive), micro_batches, i) for i in range(micro_batches)]
            part = lambda values, block: values[block.start:block.stop]
            body = ma_micro_batch if sim.is_ma else ep_micro_batch
            generators = [body(sim, rank, step, mb, part(new, block), part(cached, block))
                          for mb, block in enumerate(blocks)]
        yield from concurrently(sim, generators)
        sim.row(rank, "step", -1, 0, started, sim.now)
        vote = yield from finish_step(sim, rank, step, sum(r.max_new_tokens > step for r in requests) > 0, vote)


def finish_step(sim, rank: int, step: int, made_tokens: bool, vote):
    """engine.run_steps after the forward: the record to rank 0 (RootGather), which appends the step;
    then StopSignal: the first boundary waits for its vote, later ones read the previous vote.
    -> this boundary's vote (a collective's completion here), or None after the last step."""
    fixed, started, ranks = sim.costs.fixed, sim.now, sim.ranks
    if rank == 0:
        yield Wait(AllFrom(sim.mail(("record", step)), 0, ranks - 1), "record_wait")
        yield Work(fixed["record"] * (ranks - 1))
        if made_tokens:
            sim.token_times.append(sim.now)   # rank 0 holds this step's tokens
        yield Work(fixed["output"])
    else:
        yield Work(fixed["output"], then=lambda ends: sim.send(("record", step), rank, [0], RECORD_BYTES, ends[-1]))
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


def ep_micro_batch(sim, rank: int, step: int, mb: int, new: list, cached: list):
    """ep.EPEngine.forward_micro_batch: embed, every layer's attention then MLP or MoE exchange, LM head."""
    costs, m = sim.costs, sim.config.model
    b, t, s, n = padded(new, cached)
    yield Work(costs.embed(b, t), "embed", -1, mb)
    for layer in range(m.num_layers):
        yield Work(costs.attention(b, t, s, m.heads, m.kv_heads), "attention", layer, mb)
        if layer >= m.dense_layers:
            exchange = two_stage if sim.config.parallel.dispatch == "two_stage" else flat
            yield from exchange(sim, rank, (step, layer, mb), n, tuple(range(sim.ranks)))
        else:
            yield Work(costs.mlp(n), "mlp", layer, mb)
    yield Work(costs.lm_head(b, m.vocab), "lm_head", -1, mb)


def route(sim, rank: int, at: tuple, n: int):
    """moe_layer.route: the router and slot choice; the step's /routing row."""
    step, layer, mb = at
    info = sim_routing.plan(sim, rank, step, layer, n)
    sim.routing_counts[step, layer - sim.config.model.dense_layers, rank] += info.expert_counts
    sim.dropped += info.dropped
    yield Work(sim.costs.route(n), "route", layer, mb)
    return info


def flat(sim, rank: int, at: tuple, n: int, members: tuple):
    """moe_layer.flat: route, shared experts while the tokens travel, dispatch and serve, combine."""
    info = yield from route(sim, rank, at, n)
    yield Work(sim.costs.shared_experts(n), "shared_experts", at[1], at[2])
    yield from dispatch_and_serve(sim, rank, at, info, members, "flat")
    yield Work(sim.costs.combine(n), "combine", at[1], at[2])


def row_bytes(sim) -> int:
    return sim.config.model.hidden * sim.costs.item


def dispatch_and_serve(sim, rank: int, at: tuple, info, members: tuple, kind: str):
    """moe_layer.dispatch_and_serve: counts (one collective) and rows to the experts' ranks, serve
    what arrives, wait for the answers; alone in the group, the experts run at once."""
    step, layer, mb = at
    costs, ranks, width = sim.costs, sim.ranks, row_bytes(sim)
    member = np.zeros(ranks, bool)
    member[list(members)] = True
    destinations = np.flatnonzero((info.rank_counts > 0) & member)
    sim.traffic[step, layer - sim.config.model.dense_layers, rank, destinations] += info.rank_counts[destinations] * width
    rows, posted = int(info.rank_counts.sum()), sim.now
    if members == (rank,):
        yield Work(costs.dispatch_post(rows), "dispatch_post", layer, mb)
        yield Work(costs.experts(info.send_counts[rank:rank + 1, :sim.tables[rank].served_slots(rank)]), "experts",
                   layer, mb)
        return
    if per_layer(sim, step):
        yield from exchange_per_layer(sim, rank, at, info, members, kind, destinations)
        return
    dispatch, answers = sim.mail((kind, step, layer, mb, "rows")), sim.mail((kind, step, layer, mb, "answers"))
    others = destinations[destinations != rank]
    counts = []

    def post_counts(ends):
        dispatch.announce(rank, info.send_counts)
        counts.append(sim.collective(("counts", step, layer, mb, kind, members[0]), members, rank))

    yield Work(costs.dispatch_post(rows), "dispatch_post", layer, mb, then=post_counts)
    parts = np.concatenate([[costs.fixed["counts"] + costs.messages(len(others))], np.full(len(others), costs.fixed["message"])])
    yield Work(parts, "dispatch_post", layer, mb,   # the counts and the answers' receives, then one send per destination
               then=lambda ends: sim.send(dispatch_key(at, kind), rank, others, info.rank_counts[others] * width, ends[1:]))
    yield from serve(sim, rank, at, dispatch, answers, counts[0], members, kind, posted)
    sim.row(rank, "dispatch_comm", layer, mb, posted, sim.now)
    yield Wait(AllFrom(answers, rank, len(others)), "combine_wait", layer, mb)
    sim.row(rank, "combine_comm", layer, mb, posted, sim.now)


def prefill_step(sim, step: int) -> bool:
    """The run's first step is its prefill; a steady-decode simulation (sim.context) has none."""
    return step == 0 and sim.context is None


def per_layer(sim, step: int) -> bool:
    """The engine's ExpertSchedule for the simulated step."""
    return ExpertSchedule(sim.config.parallel.expert_schedule, prefill_step(sim, step)).per_layer


def exchange_per_layer(sim, rank: int, at: tuple, info, members: tuple, kind: str, destinations: np.ndarray):
    """moe_layer.exchange_per_layer: the counts collective, then all rows in one Ialltoallv (one host
    call; the rows still travel as one message per destination, all posted at once), wait for every
    source's rows, each local expert once on all of them, all answers back in one Ialltoallv, wait
    for every answer. Each Ialltoallv completes when its data is in and, as a collective, once every
    member has posted it and made progress."""
    step, layer, mb = at
    costs, width, fixed = sim.costs, row_bytes(sim), sim.costs.fixed
    dispatch, answers = sim.mail((kind, step, layer, mb, "rows")), sim.mail((kind, step, layer, mb, "answers"))
    collective = lambda what: (what, step, layer, mb, kind, members[0])
    others = destinations[destinations != rank]
    rows, posted, counts, done = int(info.rank_counts.sum()), sim.now, [], {}

    def post_counts(ends):
        dispatch.announce(rank, info.send_counts)
        counts.append(sim.collective(collective("counts"), members, rank))

    yield Work(costs.dispatch_post(rows) + fixed["counts"], "dispatch_post", layer, mb, then=post_counts)
    yield Wait(counts[0], "counts_wait", layer, mb)
    sim.row(rank, "counts_comm", layer, mb, posted, sim.now)
    group = np.array(members)
    incoming = dispatch.counts[group, rank, :sim.tables[rank].served_slots(rank)]    # [members, my slots]
    rows_from = incoming.sum(1)
    senders = np.flatnonzero((rows_from > 0) & (group != rank))
    sources = group[senders]

    def post_rows(ends):
        sim.send(dispatch_key(at, kind), rank, others, info.rank_counts[others] * width, ends[-1])
        done["rows"] = sim.collective(collective("rows_alltoallv"), members, rank, polled=True)

    yield Work(fixed["counts"], then=post_rows)       # one Ialltoallv: one host call, whatever the peers
    yield Wait(AllFrom(dispatch, rank, len(sources)), "dispatch_wait", layer, mb)
    yield Wait(done["rows"], "dispatch_wait", layer, mb)
    sim.row(rank, "dispatch_comm", layer, mb, posted, sim.now)
    if rows_from.sum():
        yield Work(float(costs.experts(incoming.sum(0, keepdims=True))[0]), "experts", layer, mb)

    def post_answers(ends):
        sim.send((kind, step, layer, mb, "answers"), rank, sources, rows_from[senders] * width, ends[-1])
        done["answers"] = sim.collective(collective("answers_alltoallv"), members, rank, polled=True)

    yield Work(fixed["counts"], then=post_answers)
    yield Wait(AllFrom(answers, rank, len(others)), "combine_wait", layer, mb)
    yield Wait(done["answers"], "combine_wait", layer, mb)
    sim.row(rank, "combine_comm", layer, mb, posted, sim.now)


def dispatch_key(at: tuple, kind: str) -> tuple:
    return (kind, at[0], at[1], at[2], "rows")


def serve(sim, rank: int, at: tuple, dispatch, answers, counts, members: tuple, kind: str, posted: float):
    """moe_layer.serve (CountedIncoming): once the counts are in, receives for the sources that send;
    each source's rows are run through this rank's experts as they arrive and answered at once."""
    step, layer, mb = at
    yield Wait(counts, "counts_wait", layer, mb)
    sim.row(rank, "counts_comm", layer, mb, posted, sim.now)
    members = np.array(members)
    incoming = dispatch.counts[members, rank, :sim.tables[rank].served_slots(rank)]    # [members, my slots]
    sources = members[incoming.sum(1) > 0]
    incoming = incoming[incoming.sum(1) > 0]
    yield Work(sim.costs.messages(int((sources != rank).sum())))
    waiting = np.ones(len(sources), bool)
    while waiting.any():
        arrived = waiting & ((sources == rank) | (dispatch.times[sources, rank] <= sim.now))
        if not arrived.any():
            yield Wait(AnyFrom(dispatch, rank, sources[waiting].tolist()), "dispatch_wait", layer, mb)
            continue
        remote = sources[arrived] != rank
        seconds = sim.costs.experts(incoming[arrived]) + remote * sim.costs.fixed["message"]

        def answer(ends, to=sources[arrived][remote], rows=incoming[arrived][remote].sum(1), remote=remote):
            sim.send((kind, step, layer, mb, "answers"), rank, to, rows * row_bytes(sim), ends[remote])

        yield Work(seconds, "experts", layer, mb, then=answer)
        waiting &= ~arrived


def two_stage(sim, rank: int, at: tuple, n: int, members: tuple):
    """moe_layer.two_stage: one message per destination node to that node's gateway for this rank;
    the gateway plans its rows over its node (stage 2), then answers each source with the node's sum."""
    step, layer, mb = at
    costs, m, tables = sim.costs, sim.config.model, sim.tables[rank]
    info = yield from route(sim, rank, at, n)
    packed = packed_row_bytes(m.hidden, getattr(torch, m.dtype_name), m.top_k)
    active = [node for node, rows in enumerate(info.node_counts) if rows]
    gateways = [tables.gateway[node] for node in active]
    out = np.array([g for g in gateways if g != rank], np.int64)
    for node, gateway in zip(active, gateways):
        sim.traffic[step, layer - m.dense_layers, rank, gateway] += info.node_counts[node] * packed
    stage1, back = sim.mail(("gateway", step, layer, mb, "rows")), sim.mail(("gateway", step, layer, mb, "answers"))
    posted, counts = sim.now, []

    def post(ends):
        stage1.sent[rank] = {g: (info.node_counts[node], info.node_slots[node], n) for node, g in zip(active, gateways)}
        counts.append(sim.collective(("counts", step, layer, mb, "gateway"), members, rank))
        sim.send(("gateway", step, layer, mb, "rows"), rank, out,
                 [info.node_counts[node] * packed for node, g in zip(active, gateways) if g != rank], ends[-1])

    yield Work(costs.dispatch_post(sum(info.node_counts)) + costs.fixed["counts"] + costs.messages(len(active) + len(out)),
               "dispatch_post",
               layer, mb, then=post)
    yield Work(costs.shared_experts(n), "shared_experts", layer, mb)
    yield Wait(counts[0], "counts_wait", layer, mb)
    served = [s for s in members if rank in stage1.sent[s]]
    yield Work(costs.messages(len([s for s in served if s != rank])))
    yield Wait(AllFrom(stage1, rank, len([s for s in served if s != rank])), "dispatch_wait", layer, mb)
    rows = {s: stage1.sent[s][rank][0] for s in served}
    yield Work(costs.gateway(sum(rows.values()), packed), "gateway", layer, mb)
    same = ("law", tuple((s, stage1.sent[s][rank][2]) for s in served)) if sim.same_law else at
    plan = sim_routing.gateway_plan(sim, rank, torch.cat([stage1.sent[s][rank][1] for s in served]) if served else
                            torch.zeros(0, m.top_k, dtype=torch.int64), same)
    node = tuple(r for r in members if sim.node_of_rank[r] == sim.node_of_rank[rank])
    yield from dispatch_and_serve(sim, rank, at, plan, node, "node")
    back_to = np.array([s for s in served if s != rank], np.int64)
    yield Work(costs.gateway(sum(rows.values()), row_bytes(sim)) + costs.messages(len(back_to)), "gateway", layer, mb,
               then=lambda ends: sim.send(("gateway", step, layer, mb, "answers"), rank, back_to,
                                          [rows[s] * row_bytes(sim) for s in back_to], ends[-1]))
    yield Wait(AllFrom(back, rank, len(out)), "combine_wait", layer, mb)
    yield Work(costs.combine(n), "combine", layer, mb)


# ---------------------------------------------------------------- attention/MoE separation

def ma_micro_batch(sim, rank: int, step: int, mb: int, new: list, cached: list):
    """ma.AttentionEngine.forward_micro_batch: this rank's heads, the group's hierarchical sum, its
    slice of the tokens through the MoE ranks, the group's all-gather; its vocabulary slice and the
    (max, index) all-gather that picks the token."""
    from hpcmoe.ma import exchange_members
    costs, m, layout = sim.costs, sim.config.model, sim.layout
    primaries = layout.primaries(rank)
    shard, shards = primaries.index(rank), len(primaries)
    heads = split_heads(m.heads, shards)[shard]
    kv = len(kv_heads_for(heads, m.heads, m.kv_heads)) if m.attention == "gqa" else 0
    b, t, s, n = padded(new, cached)
    slices = [request_range(n, shards, i) for i in range(shards)]
    members, group = tuple(exchange_members(layout)), layout.group_ranks(rank)
    yield Work(costs.embed(b, t), "embed", -1, mb)
    for layer in range(m.num_layers):
        at = (step, layer, mb)
        yield Work(costs.attention(b, t, s, len(heads), kv), "attention", layer, mb)
        posted = sim.now
        yield from hierarchical_sum(sim, rank, at, b * t * m.hidden * 4, primaries)
        sim.row(rank, "reduce_comm", layer, mb, posted, sim.now)
        yield Work(costs.residual(b, t), "attention", layer, mb)
        if layer >= m.dense_layers:
            yield from flat(sim, rank, at, len(slices[shard]), members)
        else:
            yield Work(costs.mlp(len(slices[shard])), "mlp", layer, mb)
        posted = sim.now
        yield from all_gather(sim, rank, at, "gather", [len(x) * row_bytes(sim) for x in slices], primaries, group)
        sim.row(rank, "gather_comm", layer, mb, posted, sim.now)
    vocab = request_range(m.vocab, shards, shard)
    yield Work(costs.lm_head(b, len(vocab)), "lm_head", -1, mb)
    done = (step, m.num_layers, mb)
    yield from all_gather(sim, rank, done, "choice", [16 * b] * shards, primaries, group)
    if sim.config.output.save_logits:
        yield from all_gather(sim, rank, done, "logits",
                              [4 * b * len(request_range(m.vocab, shards, i)) for i in range(shards)], primaries, group)


def all_gather(sim, rank: int, at: tuple, kind: str, nbytes: list, senders: list, group: list):
    """ma.all_gather_rows: each sender's rows to every group rank; wait for the other senders'."""
    step, layer, mb = at
    key = (kind, step, layer, mb)
    others = np.array([r for r in group if r != rank], np.int64)
    if rank in senders:
        mine = nbytes[senders.index(rank)]
        yield Work(sim.costs.messages(len(others) + len(senders)),
                   then=lambda ends: sim.send(key, rank, others, mine, ends[-1]))
    yield Wait(AllFrom(sim.mail(key), rank, len([r for r in senders if r != rank])), "gather_wait", layer, mb)
    yield Work(sim.costs.gather(sum(nbytes)))


def hierarchical_sum(sim, rank: int, at: tuple, nbytes: int, group: list):
    """ma.hierarchical_sum over ma.reduction_plan: reduce-scatter inside the node, all-reduce of each
    owned chunk across nodes with its owner there (chunk j of a node of m ranks: its (j mod m)-th
    rank), all-gather inside the node. nbytes: the float32 partial."""
    from hpcmoe.ma import reduction_plan
    step, layer, mb = at
    nodes, chunks = reduction_plan(group, sim.node_of_rank)
    mine = next(members for members in nodes if rank in members)
    others = [r for r in mine if r != rank]
    bounds = [request_range(nbytes // 4, chunks, j) for j in range(chunks)]
    owned_by = lambda members, r: [j for j in range(chunks) if members[j % len(members)] == r]
    size = lambda js: 4 * sum(len(bounds[j]) for j in js)
    owned = owned_by(mine, rank)
    shared_with: dict = {}
    for members in nodes:
        if members is not mine:
            for j in owned:
                shared_with.setdefault(members[j % len(members)], []).append(j)
    rounds = (("reduce_scatter", others, [size(owned_by(mine, r)) for r in others], len(mine)),
              ("across_nodes", list(shared_with), [size(js) for js in shared_with.values()], len(nodes)),
              ("gather_back", others, [size(owned)] * len(others), 0))
    for kind, peers, sizes, summed in rounds:
        key = (kind, step, layer, mb)
        yield Work(sim.costs.messages(2 * len(peers)),
                   then=lambda ends, key=key, peers=peers, sizes=sizes: sim.send(key, rank, peers, sizes, ends[-1]))
        yield Wait(AllFrom(sim.mail(key), rank, len(peers)), "reduce_wait", layer, mb)
        if summed:
            yield Work(sim.costs.reduce(size(owned) * summed))
