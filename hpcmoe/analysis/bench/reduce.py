"""`hpcmoe bench reduce`: ma's sum of attention partials over the attention ranks, the hierarchical
reduction (runtime/ma.py) against the first wave's node-leader version kept here, both over the
emulated link with their inter-node bytes counted, and a flat MPI Allreduce.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from hpcmoe.analysis.bench.results import oversubscribed, report
from hpcmoe.analysis.bench.timing import time_interleaved


def leader_sum(ctx, x, group: list[int], tag, at):
    """The first wave's sum of attention partials, kept to measure against: node leaders gather their
    node, exchange whole node sums with every other leader, and send the total to each member."""
    from hpcmoe.runtime.comm import Receives
    from hpcmoe.runtime.tags import Kind

    node = ctx.topo.node_of_rank
    mine = [r for r in group if node[r] == node[ctx.rank]]
    leaders = sorted({min(r for r in group if node[r] == node[s]) for s in group})
    receive = lambda peers, kind: Receives(
        ctx.comm, {r: x.new_empty(x.shape) for r in peers}, tag(kind), ctx.link
    )
    if ctx.rank != mine[0]:
        back = receive([mine[0]], Kind.GATHER_BACK)
        ctx.sender.send(mine[0], x, tag(Kind.SCATTER))
        yield back.all_in(at, "reduce_wait")
        return back.received[mine[0]]
    members = receive(mine[1:], Kind.SCATTER)
    yield members.all_in(at, "reduce_wait")
    node_sum = x.clone()
    for r in mine[1:]:
        node_sum += members.received[r]
    others = receive([r for r in leaders if r != ctx.rank], Kind.ACROSS_NODES)
    for r in leaders:
        if r != ctx.rank:
            ctx.sender.send(r, node_sum, tag(Kind.ACROSS_NODES))
    yield others.all_in(at, "reduce_wait")
    total = x.new_zeros(x.shape)
    for r in leaders:
        total += node_sum if r == ctx.rank else others.received[r]
    for r in mine[1:]:
        ctx.sender.send(r, total, tag(Kind.GATHER_BACK))
    return total


class CountingSender:
    """A Sender that counts the bytes this rank sends to other nodes (what crosses the inter-node link)."""

    def __init__(self, sender, node_of_rank):
        self.sender, self.node_of_rank, self.internode_bytes = sender, node_of_rank, 0
        self.staging, self.link = sender.staging, sender.link

    def receives(self, buffers: dict, tag: int):
        return self.sender.receives(buffers, tag)

    def send(self, peer, data, tag, own=None):
        if self.node_of_rank[peer] != self.node_of_rank[self.sender.comm.Get_rank()]:
            self.internode_bytes += data.numel() * data.element_size()
        self.sender.send(peer, data, tag, own)


def through_link(world, topo, link, x, algorithm, counted: dict, name: str):
    """-> fn() that sums x [tokens, hidden] over every rank with algorithm (leader_sum or
    hierarchical_sum) through the emulated link, and leaves in counted[name] the bytes this rank sent
    to other nodes."""
    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.comm import Sender
    from hpcmoe.runtime.scheduler import run_concurrently
    from hpcmoe.runtime.tags import tag_for
    from hpcmoe.runtime.waits import Where

    tag = lambda kind: tag_for(kind, 0, 0, 1)
    sender = CountingSender(Sender(world, link), topo.node_of_rank)
    ctx = SimpleNamespace(
        comm=world, sender=sender, link=link, topo=topo, rank=topo.rank, timer=Timer(0, 0.0)
    )

    def run():
        sender.internode_bytes = 0
        run_concurrently(
            [algorithm(ctx, x, list(range(topo.size)), tag, Where(0, 0, 0))],
            Timer(0, 0.0),
            0,
            sender.sender,
        )
        sender.sender.wait(Where())
        counted[name] = sender.internode_bytes

    return run


def reduce_meta(world, topo, x, reps: int, bandwidth_gbps: float | None, latency_us: float) -> dict:
    """What the reduce benchmark summed, over what, for its table and JSON."""
    tokens, hidden = x.shape
    link_text = (
        f"emulated link {bandwidth_gbps} Gbit/s + {latency_us} us" if bandwidth_gbps else "no emulated link"
    )
    return {
        "what": f"sum of [{tokens}, {hidden}] float32 over {world.Get_size()} ranks on "
        f"{topo.num_nodes} nodes, {link_text} (flat_allreduce: real MPI, no emulation)",
        "ranks": world.Get_size(),
        "reps": reps,
        "oversubscribed": oversubscribed(world),
        "flat_allreduce_bytes_per_rank_bandwidth_optimal": 2
        * x.numel()
        * 4
        * (world.Get_size() - 1)
        / world.Get_size(),
    }


def bench_reduce(
    tokens: int,
    hidden: int,
    ranks_per_node: int,
    reps: int,
    out: str | None,
    bandwidth_gbps: float | None = None,
    latency_us: float = 0.0,
):
    """The sum of attention partials over the attention ranks: the seed's hierarchical reduction
    (reduce-scatter in the node, all-reduce across nodes, all-gather in the node) against the first
    wave's leader version, both over the (emulated) link, and a flat MPI Allreduce (which cannot go
    through the emulated link: its time is the real MPI's on this machine)."""
    import torch
    from mpi4py import MPI

    from hpcmoe.runtime.link import Link
    from hpcmoe.runtime.ma import hierarchical_sum
    from hpcmoe.runtime.topology import build_topology

    world = MPI.COMM_WORLD
    topo = build_topology(world, ranks_per_node)
    link = Link(topo.node_of_rank, bandwidth_gbps, latency_us)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(topo.rank))
    counted = {}

    def flat():
        world.Allreduce(x.numpy(), np.empty_like(x.numpy()), op=MPI.SUM)

    samples = time_interleaved(
        world,
        {
            "flat_allreduce": flat,
            "leader_sum": through_link(world, topo, link, x, leader_sum, counted, "leader_sum"),
            "hierarchical": through_link(world, topo, link, x, hierarchical_sum, counted, "hierarchical"),
        },
        reps,
    )
    for name in ("leader_sum", "hierarchical"):
        samples[name]["internode_bytes_per_rank"] = [world.allreduce(counted[name], op=MPI.MAX)]
    if world.Get_rank() == 0:
        meta = reduce_meta(world, topo, x, reps, bandwidth_gbps, latency_us)
        return report(
            "reduce",
            samples,
            "leader_sum",
            "hierarchical equals flat (tested); fewer inter-node bytes "
            "and less time than leader_sum over the link",
            meta,
            out,
        )
