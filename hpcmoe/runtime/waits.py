"""The one wait helper: every wait of a run goes through `wait_until`, which tests, yields the core
while nothing has arrived (ranks may outnumber cores), and knows where it is (step, layer,
micro-batch, phase, peers), so that a watchdog can name it. `Pending` is what a coroutine yields to
the scheduler instead of waiting itself. Separate from the messages so that every waiter (the
exchanges, the generate loop's records and votes, weight moves) shares one wait.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from mpi4py import MPI


@dataclass(frozen=True)
class Where:
    """Where a rank is waiting: printed by diagnostics."""

    step: int = -1
    layer: int = -1
    micro_batch: int = 0
    phase: str = ""
    peers: tuple[int, ...] = ()

    def __str__(self):
        return (
            f"step {self.step} layer {self.layer} micro_batch {self.micro_batch} "
            f"phase {self.phase} for rank {','.join(map(str, self.peers)) or '-'}"
        )

    def waiting_for(self, phase: str, peers) -> "Where":
        return Where(self.step, self.layer, self.micro_batch, phase, tuple(sorted(peers)))


@dataclass
class Pending:
    """What a coroutine waits for: poll() is None until it can resume, then the value to send in
    (polling twice gives the same answer); where() names only the peers still missing."""

    poll: Callable[[], Any]
    where: Callable[[], Where]
    polled: Callable[[], bool] = lambda: False  # MPI moves these bytes only while polled: yield, don't sleep


SPIN = False  # parallel.wait: spin keeps testing without sleeping (only sensible with a core per rank)
POLL_BY_YIELDING = (
    True  # a core per rank: waits that MPI progresses only while polled yield instead of sleeping
)
WATCHDOG_S = None  # run.timeout_s: a wait longer than this names itself and aborts the job


def wait_until(
    done: Callable[[], bool], where, polled: Callable[[], bool] = lambda: False, timer=None
) -> None:
    """Poll `done()` until it is true, sleeping a little longer each time (at most 1 ms).

    timer: a wait that is not over at once is a row of its own, named by where's phase (a `*_wait`):
    idle time, even when it happens inside a phase timed as work (rebalance, dispatch_post).

    where: a Where, or a function returning one (so that it can name the peers still missing).
    polled(): MPI progresses what is awaited only inside a poll (MPICH moves a non-blocking
    collective's large payload a few KiB per test: 518 tests for 4 MiB), so test again at once
    (measured between 2 ranks on 2 cores: 4 MiB in 5.5 ms yielding between tests, 66 ms with 20 us
    sleeps; with 4 ranks on 2 cores, 64 KiB in 3.4 ms with 20 us sleeps, 4.2 ms yielding)."""
    if timer is not None and not finished(done, where):
        at = where() if callable(where) else where
        with timer.phase(at.phase, at.step, at.layer, at.micro_batch):
            return wait_until(done, where, polled)
    pause, start = 20e-6, time.monotonic()
    while not finished(done, where):
        if WATCHDOG_S is not None and time.monotonic() - start > WATCHDOG_S:
            watchdog(where() if callable(where) else where, time.monotonic() - start)
        if SPIN:
            continue
        if polled() and POLL_BY_YIELDING:  # test again at once, giving way to any other runnable process
            os.sched_yield()
            pause = 20e-6
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def finished(done: Callable[[], bool], where) -> bool:
    """done(), and an MPI error raised by it says where it was met (run.fault_tolerance reports it)."""
    try:
        return done()
    except MPI.Exception as error:
        error.where = where() if callable(where) else where
        raise


def watchdog(where: Where, waited: float) -> None:
    """One line naming this rank, where it waits and for whom; then the whole job ends."""
    sys.stderr.write(f"rank {MPI.COMM_WORLD.Get_rank()}: watchdog: waited {waited:.1f} s in {where}\n")
    sys.stderr.flush()
    time.sleep(0.2)  # the launcher forwards the line before its abort kills the job (once lost under load)
    MPI.COMM_WORLD.Abort(3)


def wait_all(requests: list, where: Where, timer=None) -> None:
    if requests:
        wait_until(lambda: all_done(requests), where, timer=timer)


def all_done(requests: list) -> bool:
    """Whether every request is complete, testing each in turn: a dead peer then raises its own
    class (ERR_PROC_FAILED), where Testall says only ERR_IN_STATUS."""
    return all(request.Test() for request in requests)
