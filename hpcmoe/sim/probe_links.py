"""`mpiexec -n 2 python -m hpcmoe.sim.probe_links OUT`, which `hpcmoe calibrate` launches: the links
between two ranks of this box (ping-pong latency and bandwidth, a two-rank Ialltoall) and the
engine's own cost of posting a message (comm.Sender.send, comm.Receives); rank 0 writes them as
JSON to OUT. A module of its own because it runs under MPI, where the rest of calibration runs in
one plain process (MPI starts inside `probe`, not when this module is imported).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch


def ping_pong(world, nbytes: int, reps: int) -> float:
    """Seconds one way of an `nbytes` message between ranks 0 and 1, over `reps` round trips."""
    me = world.Get_rank()
    buffer = np.zeros(nbytes, np.uint8)
    world.Barrier()
    start = time.perf_counter()
    for _ in range(reps):
        if me == 0:
            world.Send(buffer, dest=1)
            world.Recv(buffer, source=1)
        else:
            world.Recv(buffer, source=0)
            world.Send(buffer, dest=0)
    return (time.perf_counter() - start) / reps / 2  # one way


def alltoall_seconds(world, reps: int) -> float:
    """Seconds per two-rank Ialltoall of one count each, tested until done (the same number of calls
    on both ranks)."""
    counts, received = np.ones(2, np.int64), np.empty(2, np.int64)
    world.Barrier()
    start = time.perf_counter()
    for _ in range(reps):
        request = world.Ialltoall(counts, received)
        while not request.Test():
            pass
    return (time.perf_counter() - start) / reps


def posting_seconds(world) -> float:
    """The engine's own posting path, many small messages: seconds per comm.Sender.send on rank 0,
    per comm.Receives on rank 1 (then every message is waited for on both)."""
    from hpcmoe.runtime.comm import Receives, Sender
    from hpcmoe.runtime.link import Link

    me, peer = world.Get_rank(), 1 - world.Get_rank()
    link, many = Link(tuple(range(2))), 200
    sender = Sender(world, link)
    rows = [torch.zeros(4, 16) for _ in range(many)]
    world.Barrier()
    start = time.perf_counter()
    if me == 0:
        for i, row in enumerate(rows):
            sender.send(peer, row, 1000 + i)
    else:
        receives = [Receives(world, {peer: row}, 1000 + i, link) for i, row in enumerate(rows)]
    posting = (time.perf_counter() - start) / many
    world.Barrier()
    if me == 1:
        for receive in receives:
            while peer not in receive.arrived():
                pass
    sender.wait("calibrate")
    return posting


def probe(out: str) -> None:
    """Under `mpiexec -n 2`: point-to-point and collective latency, bandwidth, and the engine's own
    cost of posting a message; rank 0 writes them as JSON to `out`."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    found = {"latency_us": 1e6 * float(np.median([ping_pong(world, 8, 200) for _ in range(5)]))}
    big = 8 * 2**20
    one_way = float(np.median([ping_pong(world, big, 10) for _ in range(5)]))
    found["gb_per_s"] = big / (one_way - 1e-6 * found["latency_us"]) / 1e9
    found["collective_latency_us"] = 1e6 * float(np.median([alltoall_seconds(world, 200) for _ in range(5)]))
    posted = world.gather(posting_seconds(world), root=0)
    if world.Get_rank() == 0:
        found["message_us"] = 1e6 * float(np.mean(posted))
        with open(out, "w") as f:
            json.dump(found, f)


if __name__ == "__main__" and len(sys.argv) == 2:
    probe(sys.argv[1])
