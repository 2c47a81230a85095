"""The work done at every step boundary besides the step itself: the records gathered to rank 0,
the stop vote, rank 0's progress line and the deputy's mirror of rank 0's records.

Each is a small object with its own communicator or pending requests, separate from the loop that
calls it so that the loop reads as the step and the work after it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from hpcmoe.runfile.output import RunWriter, Timer
from hpcmoe.runtime import tags
from hpcmoe.runtime.comm import Where, wait_all, wait_until
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.records import Made
from hpcmoe.runtime.topology import STOP_REQUESTED, listen_for_stop


class RootGather:
    """Per-step records from every rank to rank 0 with Isend and matched probes (no collective)."""

    def __init__(self, comm, timer: Timer):
        self.comm, self.timer, self.pending = comm, timer, []

    def __call__(self, record, step: int):
        comm, where = self.comm, Where(step, -1, 0, "record_wait")
        if comm.Get_rank() != 0:
            with self.timer.phase("record_wait", step):
                wait_all(self.pending, where)  # the previous record is out: one in flight at most
            self.pending = [comm.isend(record, dest=0, tag=tags.RECORD)]
            return None
        records = [record]
        for source in range(1, comm.Get_size()):
            found = comm.improbe(source=source, tag=tags.RECORD)
            if found is None:
                with self.timer.phase("record_wait", step):

                    def arrived() -> bool:
                        nonlocal found
                        found = comm.improbe(source=source, tag=tags.RECORD)
                        return found is not None

                    wait_until(arrived, where.waiting_for("record_wait", (source,)))
            records.append(found.recv())
        return records

    def close(self, step: int):
        wait_all(self.pending, Where(step, -1, 0, "record_wait"))


class StopSignal:
    """The ranks agree to stop: a stop signal (SIGUSR1, SIGTERM) may reach them at different steps,
    and each rank knows only whether its own requests have all ended. At every step boundary each
    rank posts (stop asked, requests left) in a non-blocking reduction (on a communicator of its
    own) and reads the reduction posted one boundary earlier, which has completed in the background
    meanwhile. Every rank reads the same result at the same boundary, so all stop after the same
    step, and no step waits for a vote in the common case."""

    def __init__(self, world, timer: Timer, fault: FaultState):
        self.comm, self.timer, self.request = fault.track(world.Dup()), timer, None
        self.flags, self.anyone = np.zeros(2, dtype=int), np.zeros(2, dtype=int)
        self.signalled = False
        listen_for_stop()  # in-process callers did not go through init_mpi

    def agreed(self, step: int, requests_left: bool = True, at_once: bool = False) -> bool:
        """True when the ranks stop after this step: asked to by a signal (then `signalled`), or
        every request on every rank has ended. at_once: wait for this boundary's own vote (after
        the prefill, whose length dwarfs it, so that a signal during the prefill stops right there)."""
        from mpi4py import MPI

        if self.request is not None:
            self.finish_vote(step)
            if self.decided():
                return True
        self.flags[:] = int(STOP_REQUESTED[0]), int(requests_left)
        self.request = self.comm.Iallreduce(self.flags, self.anyone, op=MPI.MAX)
        if at_once:
            self.finish_vote(step)
            return self.decided()
        return False

    def decided(self) -> bool:
        self.signalled = bool(self.anyone[0])
        return self.signalled or not self.anyone[1]

    def finish_vote(self, step: int) -> None:
        if not self.request.Test():
            with self.timer.phase("stop_wait", step):
                wait_all([self.request], Where(step, -1, 0, "stop_wait"))
        self.request = None

    def close(self, step: int):
        if self.request is not None:  # every rank posted the same votes: the last completes everywhere
            self.finish_vote(step)
        STOP_REQUESTED[0] = False
        self.comm.Free()


class Progress:
    """Rank 0's progress: requests done of all, generated tokens/s and the time left, on one line
    redrawn on a terminal, or a plain line every EVERY_S seconds in a batch log."""

    EVERY_S = 5.0

    def __init__(self, total: int, earlier=None):
        self.total, self.tty = total, sys.stderr.isatty()
        self.before = int(earlier.finished.sum()) if earlier is not None else 0  # ended in an earlier run
        self.started, self.shown = time.monotonic(), 0.0

    def update(self, step: int, writer: RunWriter, made: Made, last: bool = False) -> None:
        now = time.monotonic()
        if not last and now - self.shown < (0.5 if self.tty else self.EVERY_S):
            return
        self.shown, elapsed = now, max(now - self.started, 1e-9)
        done = int(writer.finished.sum())
        rate = (done - self.before) / elapsed
        left = f"{(self.total - done) / rate:.0f} s left" if rate > 0 and done < self.total else "-"
        line = (
            f"requests {done}/{self.total} | {sum(made.generated) / elapsed:.1f} generated tok/s | "
            f"step {step + 1} | {elapsed:.0f} s | {left}"
        )
        sys.stderr.write(f"\r{line:<90}" + ("\n" if last else "") if self.tty else f"hpcmoe: {line}\n")
        sys.stderr.flush()


class Mirror:
    """run.fault_tolerance: rank 0 sends each step's records to rank 1, its deputy, which keeps the
    same Made. When rank 0 dies, the deputy is the survivors' new rank 0: it opens the run file,
    writes the steps it holds and the run goes on (the writer role moves)."""

    def __init__(self, comm, made: Made):
        self.comm, self.made, self.pending = comm, made, []
        self.rank = comm.Get_rank() if comm.Get_size() > 1 else -1  # one rank: nothing to mirror
        if self.rank in (0, 1) and made.records is None:
            made.records = []

    def send(self, entry: tuple) -> None:
        """Rank 0: (step, records, (started_at, held_at), written_at) to the deputy."""
        if self.rank == 0:
            self.pending = [request for request in self.pending if not request.Test()]
            self.pending.append(self.comm.isend(entry, dest=1, tag=tags.MIRROR))

    def receive(self) -> None:
        """The deputy: every entry that has arrived (never waits)."""
        while self.rank == 1 and (found := self.comm.improbe(source=0, tag=tags.MIRROR)) is not None:
            self.made.add(*found.recv())

    def close(self, done: int, step: int) -> None:
        where = Where(step, -1, 0, "record_wait")
        if self.rank == 0:
            wait_all(self.pending, where)
        elif self.rank == 1:
            wait_until(lambda: self.receive() or self.made.done >= done, where)

    def hand_over(self, comm) -> None:
        """After a recovery: rank 0's Made to the (maybe new) deputy, rank 1."""
        if comm.Get_size() > 1 and comm.Get_rank() in (0, 1):
            made = comm.sendrecv(
                self.made if comm.Get_rank() == 0 else None,
                dest=1 - comm.Get_rank(),
                source=1 - comm.Get_rank(),
            )
            if comm.Get_rank() == 1:
                vars(self.made).update(vars(made))
