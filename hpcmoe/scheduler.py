"""The micro-batch scheduler: coroutines that compute and yield what they wait for.

A step's work is a list of generators (one per micro-batch on an ep or attention rank, one per
(MoE layer, micro-batch) on a MoE rank). Each computes until it needs a message, then yields a
`Pending`; `run_concurrently` resumes whichever can go on, so the exchange of one overlaps the
compute of another, across layers, with no whole-batch barrier. When none can go on the rank
is idle: it sleeps in comm.wait_until (the one place a rank waits) under a `*_wait` phase, which
is what `idle_fraction` counts. The same loop drives ep, ma, the benchmarks and the simulator.
"""
from __future__ import annotations

from hpcmoe.comm import Pending, Sender, wait_until  # noqa: F401 (Pending: what the generators yield)


def run_concurrently(generators: list, timer, step: int, sender: Sender) -> list:
    """Drive the generators to completion; -> their return values in order."""
    results, waiting = [None] * len(generators), {i: None for i in range(len(generators))}
    while waiting:
        progressed = False
        for i in sorted(waiting):
            pending = waiting[i]
            got = None if pending is None else pending.poll()
            if pending is None or got is not None:
                try:
                    waiting[i] = generators[i].send(got)
                except StopIteration as finished:
                    results[i] = finished.value
                    del waiting[i]
                progressed = True
        sender.test()
        if waiting and not progressed:  # nothing can run: idle until something arrives
            first = waiting[min(waiting)]
            where = first.where()
            with timer.phase(where.phase, step, where.layer, where.micro_batch):
                # sender.test() while idle too: queued sends (and background moves) go on
                wait_until(lambda: sender.test() or any(p.poll() is not None for p in waiting.values()), first.where,
                           polled=lambda: any(p.polled() for p in waiting.values()))
    return results
