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
from typing import TYPE_CHECKING, Any, Callable, Optional

from mpi4py import MPI

from hpcmoe.runtime.topology import available_cores

if TYPE_CHECKING:
    from hpcmoe.config import Config
    from hpcmoe.runtime.topology import Topology


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


@dataclass(frozen=True)
class WaitPolicy:
    """How a rank waits: given to whatever waits (wait_until, the sender, the collectives) rather than
    set for the process, so that two engines, or an engine and a simulation, can wait differently in
    one process. The defaults: sleep between tests, yield where polled, no watchdog."""

    spin: bool = False  # parallel.wait spin: test without sleeping (only sensible with a core per rank)
    poll_by_yielding: bool = True  # a core per rank: waits that MPI progresses only while polled yield
    watchdog_s: Optional[float] = None  # run.timeout_s: a longer wait names itself and aborts the job
    fault_tolerant: bool = False  # run.fault_tolerance: the collectives keep no RMA window (CountsGroup)

    @classmethod
    def for_run(cls, config: Config, core_per_rank: bool) -> "WaitPolicy":
        """A run's policy, from parallel.wait, run.timeout_s and run.fault_tolerance; core_per_rank:
        whether every rank sharing the host has a core of its own (else a yield may not let others run)."""
        run = config.run
        return cls(config.parallel.wait == "spin", core_per_rank, run.timeout_s, run.fault_tolerance)


def wait_policy(config: Config, topo: Topology) -> WaitPolicy:
    """This rank's policy in a run (the engine's one place that makes it)."""
    return WaitPolicy.for_run(config, topo.host_size <= available_cores())


def wait_until(
    done: Callable[[], bool],
    where,
    policy: WaitPolicy,
    polled: Callable[[], bool] = lambda: False,
    timer=None,
) -> None:
    """Poll `done()` until it is true, sleeping a little longer each time (at most 1 ms), or as
    `policy` says: spinning, yielding, aborting the job past its watchdog.

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
            return wait_until(done, where, policy, polled)
    pause, start = 20e-6, time.monotonic()
    while not finished(done, where):
        if policy.watchdog_s is not None and time.monotonic() - start > policy.watchdog_s:
            watchdog(where() if callable(where) else where, time.monotonic() - start)
        if policy.spin:
            continue
        if polled() and policy.poll_by_yielding:  # test again at once, giving way to any other process
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


def wait_all(requests: list, where: Where, policy: WaitPolicy, timer=None) -> None:
    if requests:
        wait_until(lambda: all_done(requests), where, policy, timer=timer)


def all_done(requests: list) -> bool:
    """Whether every request is complete, testing each in turn: a dead peer then raises its own
    class (ERR_PROC_FAILED), where Testall says only ERR_IN_STATUS."""
    return all(request.Test() for request in requests)
