"""`hpcmoe bench control`: the control path at scale, in one process: the host work of a MoE layer
before any byte moves (slots, plan, counts, peers) and of each exchange's MPI calls, at rank counts
far beyond this machine's.
"""

from __future__ import annotations

import time

import numpy as np

from hpcmoe.analysis.bench.results import report


def per_source_host(group, plan) -> None:
    """A per_source exchange's host work on one rank: the plan's peers, then for each active peer the
    four point-to-point calls it makes (rows out and answers in; rows in and answers out), posted
    here to this rank itself and completed."""
    from mpi4py import MPI

    _, active, _, _ = group.destinations(plan)
    sent, received = np.zeros(1, np.uint8), np.zeros(2, np.uint8)
    for _ in active:
        requests = [
            MPI.COMM_SELF.Irecv(received[:1], source=0, tag=1),
            MPI.COMM_SELF.Isend(sent, dest=0, tag=1),
            MPI.COMM_SELF.Irecv(received[1:], source=0, tag=2),
            MPI.COMM_SELF.Isend(sent, dest=0, tag=2),
        ]
        MPI.Request.Waitall(requests)


def per_layer_host(group, plan, tables) -> None:
    """A per_layer exchange's host work on one rank: the shares of every member, the receiver's
    counts, displacements and expert-major order (its own counts stand for the received ones), and
    the exchange's three collectives (posted here on a one-rank communicator)."""
    from mpi4py import MPI

    from hpcmoe.parallel.dispatch import expert_major

    send_counts, rows_to, first = group.shares(plan, tables.tp)
    slots = send_counts[:, : tables.served_slots(tables.source_rank)]
    rows_from = slots.sum(1)
    from_first = np.cumsum(rows_from) - rows_from
    expert_major(slots)
    back_first = np.asarray(group.ranks) % tables.tp * len(plan.order) + first
    assert len(from_first) == len(back_first)
    one, got = np.zeros(1, np.int64), np.zeros(1, np.int64)
    requests = [
        MPI.COMM_SELF.Ialltoall(one, got),
        MPI.COMM_SELF.Ialltoallv([one, ([1], [0]), MPI.INT64_T], [got, ([1], [0]), MPI.INT64_T]),
        MPI.COMM_SELF.Ialltoallv([one, ([1], [0]), MPI.INT64_T], [got, ([1], [0]), MPI.INT64_T]),
    ]
    MPI.Request.Waitall(requests)


def control_placement(experts: int, count: int):
    """The placement of experts on count ranks: packed when experts > ranks, one per rank when equal,
    replicated when fewer."""
    from hpcmoe.parallel.placement import one_per_rank, packed, replicated

    return (
        packed(experts, count)
        if experts > count
        else one_per_rank(experts, count)
        if experts == count
        else replicated(experts, count, 1)
    )


def timed_control(expert_ids, weights, tables, group, reps: int) -> dict[str, list[float]]:
    """Milliseconds per call of one source rank's control paths, reps rounds after a warm-up: the flat
    dispatch's host work, two-stage's first stage, and the per_source and per_layer exchanges' host
    work. expert_ids, weights: [tokens, top_k]."""
    from hpcmoe.parallel.dispatch import choose_slots, node_groups, plan_from_slots

    flat_ms, two_stage_ms, per_source_ms, per_layer_ms = [], [], [], []
    for rep in range(reps + 1):
        start = time.perf_counter()
        for _ in range(20):  # what a rank's host does before any byte moves: slots, plan, counts, peers
            group.destinations(plan_from_slots(choose_slots(expert_ids, tables), tables))
        middle = time.perf_counter()
        for _ in range(20):
            node_groups(choose_slots(expert_ids, tables), weights, tables)  # reads its counts to the host
        end = time.perf_counter()
        for _ in range(20):
            per_source_host(group, plan_from_slots(choose_slots(expert_ids, tables), tables))
        after_per_source = time.perf_counter()
        for _ in range(20):
            per_layer_host(group, plan_from_slots(choose_slots(expert_ids, tables), tables), tables)
        after_per_layer = time.perf_counter()
        if rep:
            flat_ms.append((middle - start) / 20 * 1e3)
            two_stage_ms.append((end - middle) / 20 * 1e3)
            per_source_ms.append((after_per_source - end) / 20 * 1e3)
            per_layer_ms.append((after_per_layer - after_per_source) / 20 * 1e3)
    return {
        "flat_ms": flat_ms,
        "two_stage_stage1_ms": two_stage_ms,
        "per_source_exchange_ms": per_source_ms,
        "per_layer_exchange_ms": per_layer_ms,
    }


def bench_control(
    ranks: list[int], experts: int, top_k: int, tokens: int, ranks_per_node: int, reps: int, out: str | None
):
    """Control-path milliseconds per MoE layer and micro-batch of one source rank, at each rank count
    (placement: packed when experts > ranks, one per rank when equal, replicated when fewer)."""
    import torch

    from hpcmoe.parallel.dispatch import compile_placement
    from hpcmoe.runtime.exchange_context import ExchangeGroup

    generator = torch.Generator().manual_seed(0)
    expert_ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.full(expert_ids.shape, 1.0 / top_k)
    rows, modes = {}, {}
    for count in ranks:
        placement = control_placement(experts, count)
        node_of_rank = [r // ranks_per_node for r in range(count)]
        source = count // 2 + 1  # not rank 0: the replica choice offsets by the source rank
        tables = compile_placement(placement, source, node_of_rank)
        group = ExchangeGroup(tuple(range(count)), (), np.ones(count, bool))
        rows[f"ranks_{count}"] = timed_control(expert_ids, weights, tables, group, reps)
        modes[count] = placement.mode
    meta = {
        "what": f"control path per MoE layer and micro-batch: {experts} experts, top-{top_k}, "
        f"{tokens} tokens, nodes of {ranks_per_node}; placements {modes}",
        "ranks": ranks,
        "reps": reps,
        "oversubscribed": False,
        "threads": torch.get_num_threads(),
    }
    return report(
        "control",
        rows,
        f"ranks_{ranks[0]}",
        "<= 0.5 ms at 256 ranks, at most linear in ranks beyond",
        meta,
        out,
    )
