"""The micro-batch scheduler: coroutines that compute and yield what they wait for.

A step's work is a list of generators (one per micro-batch on an ep or attention rank, one per
(MoE layer, micro-batch) on a MoE rank). Each computes until it needs a message, then yields a
`Pending`; the scheduler resumes whichever can go on, so the exchange of one overlaps the compute
of another, across layers, with no whole-batch barrier. When none can go on the rank is idle: it
sleeps in waits.wait_until (the one place a rank waits) under a `*_wait` phase, which is what
`idle_fraction` counts.

The order of that work is `passes`, written once: the engine drives it with real waits
(`run_concurrently`), the simulator with its clock (sim.schedule.concurrently), so a change to the
order here changes both.
"""

from __future__ import annotations

from typing import Callable

from hpcmoe.runtime.comm import Sender
from hpcmoe.runtime.waits import Pending, wait_until  # noqa: F401 (Pending: what the generators yield)

PASSED = "passed"  # yielded after every pass over the coroutines: the rank tests its sends (MPI progress)
RESUMING = "resuming"  # yielded before a coroutine that waited is resumed (the host work of resuming it)


def pass_order(waiting) -> list:
    """The order a pass visits the coroutines that are not done: micro-batch (and layer) order, so
    the oldest work goes on first."""
    return sorted(waiting)


def passes(generators: list, ready: Callable, computes: Callable = lambda command: False):
    """The scheduler's loop as a generator, for a driver: passes over the coroutines in order,
    resuming each that has not started or whose pending is ready (`ready(pending)`: what to send
    it, or None while it is not). Yields RESUMING before a waited coroutine goes on, PASSED after
    every pass, and, when a pass resumed nothing, the pendings in coroutine order (the driver
    waits until one is ready); a command for which `computes` is true (the simulator's charged
    compute) is yielded through as it comes. -> the generators' return values in order."""
    results, waiting = [None] * len(generators), {i: None for i in range(len(generators))}
    while waiting:
        progressed = False
        for i in pass_order(waiting):
            pending = waiting[i]
            got = None if pending is None else ready(pending)
            if pending is None or got is not None:
                try:
                    if pending is not None:
                        yield RESUMING
                    command = generators[i].send(got)
                    while computes(command):
                        yield command
                        command = generators[i].send(None)
                    waiting[i] = command
                except StopIteration as finished:
                    results[i] = finished.value
                    del waiting[i]
                progressed = True
        yield PASSED
        if waiting and not progressed:  # nothing can run: idle until something arrives
            yield [waiting[i] for i in pass_order(waiting)]
    return results


def run_concurrently(generators: list, timer, step: int, sender: Sender) -> list:
    """Drive the generators to completion with real waits; -> their return values in order."""
    loop = passes(generators, lambda pending: pending.poll())
    while True:
        try:
            command = next(loop)
        except StopIteration as finished:
            return finished.value
        if command is PASSED:
            sender.test()
        elif isinstance(command, list):  # idle: wait for the first that can go on
            where = command[0].where()
            with timer.phase(where.phase, step, where.layer, where.micro_batch):
                # sender.test() while idle too: queued sends (and background moves) go on
                wait_until(
                    lambda: sender.test() or any(p.poll() is not None for p in command),
                    command[0].where,
                    sender.policy,
                    polled=lambda: any(p.polled() for p in command),
                )
