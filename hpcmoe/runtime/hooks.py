"""The work done after every step, as hooks the step loop calls in order (steps.StepLoop): the
records gathered to rank 0 and written, the deputy's mirror of them, rank 0's progress line (these
three timed together as the step's output), and the stop vote; the ep engine adds its rebalancer.

Each is a small object with its own communicator or pending requests, separate from the loop so that
the loop reads as the step and the work after it. A hook has after_step(done: steps.StepDone), and
may fill in what later hooks read (`done.record`, `done.written`, `done.stop`).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from hpcmoe.runfile.timer import Timer
from hpcmoe.runfile.writer import RunWriter
from hpcmoe.runtime import tags
from hpcmoe.runtime.batch import Events
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.records import Made, StepRecord, WrittenStep
from hpcmoe.runtime.steps import StepDone
from hpcmoe.runtime.topology import STOP_REQUESTED, listen_for_stop
from hpcmoe.runtime.waits import WaitPolicy, Where, wait_all, wait_until


class RootGather:
    """Per-step records from every rank to rank 0 with Isend and matched probes (no collective)."""

    def __init__(self, comm, timer: Timer, policy: WaitPolicy):
        self.comm, self.timer, self.pending, self.policy = comm, timer, [], policy

    def __call__(self, record, step: int):
        comm, where = self.comm, Where(step, -1, 0, "record_wait")
        if comm.Get_rank() != 0:
            with self.timer.phase("record_wait", step):
                # the previous record is out: one in flight at most
                wait_all(self.pending, where, self.policy)
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

                    wait_until(arrived, where.waiting_for("record_wait", (source,)), self.policy)
            records.append(found.recv())
        return records

    def close(self, step: int):
        wait_all(self.pending, Where(step, -1, 0, "record_wait"), self.policy)


class Records:
    """This rank's record of the step to rank 0 (`done.record`), which writes every rank's and keeps
    them in `made` (`done.written`); survivors (after a recovery) widen traffic and records to the
    original ranks."""

    def __init__(self, gather: RootGather, writer, made: Made, fault: FaultState, reports: bool, survivors):
        self.gather, self.writer, self.made, self.fault = gather, writer, made, fault
        self.reports, self.survivors, self.timer = reports, survivors, gather.timer

    def after_step(self, done: StepDone) -> None:
        events, logits = (done.events, done.logits) if self.reports else (Events(), None)
        if self.reports and logits is not None:
            logits = logits[done.rows]
        stats = done.stats
        traffic = stats.traffic if self.survivors is None else self.survivors.widen_traffic(stats.traffic)
        routing = stats.routing.cpu().numpy()
        done.record = StepRecord(events, logits, routing, traffic, int(stats.dropped), self.timer.take())
        self.fault.maybe_die(done.step, -1, "record")
        records = self.gather(done.record, done.step)
        if records is None:
            return
        if self.survivors is not None:
            records = self.survivors.widen(records)
        held_at = self.timer.now()  # rank 0 holds this step's tokens
        done.written = WrittenStep(done.step, records, done.started_at, held_at, written_at=held_at)
        done.written.write(self.writer)
        done.written.written_at = self.timer.now()
        self.made.add(done.written)


class Mirror:
    """run.fault_tolerance: rank 0 sends each step's records to rank 1, its deputy, which keeps the
    same Made. When rank 0 dies, the deputy is the survivors' new rank 0: it opens the run file,
    writes the steps it holds and the run goes on (the writer role moves)."""

    def __init__(self, comm, made: Made, policy: WaitPolicy):
        self.comm, self.made, self.pending, self.policy = comm, made, [], policy
        self.rank = comm.Get_rank() if comm.Get_size() > 1 else -1  # one rank: nothing to mirror
        if self.rank in (0, 1) and made.records is None:
            made.records = []

    def after_step(self, done: StepDone) -> None:
        if done.written is not None:
            self.send(done.written)
        else:
            self.receive()

    def send(self, written: WrittenStep) -> None:
        """Rank 0: the step it wrote to the deputy."""
        if self.rank == 0:
            self.pending = [request for request in self.pending if not request.Test()]
            self.pending.append(self.comm.isend(written, dest=1, tag=tags.MIRROR))

    def receive(self) -> None:
        """The deputy: every entry that has arrived (never waits)."""
        while self.rank == 1 and (found := self.comm.improbe(source=0, tag=tags.MIRROR)) is not None:
            self.made.add(found.recv())

    def close(self, done: int, step: int) -> None:
        where = Where(step, -1, 0, "record_wait")
        if self.rank == 0:
            wait_all(self.pending, where, self.policy)
        elif self.rank == 1:
            wait_until(lambda: self.receive() or self.made.done >= done, where, self.policy)

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


class Progress:
    """Rank 0's progress: requests done of all, generated tokens/s and the time left, on one line
    redrawn on a terminal, or a plain line every EVERY_S seconds in a batch log."""

    EVERY_S = 5.0

    def __init__(self, total: int, writer: RunWriter, made: Made, earlier=None):
        self.total, self.tty, self.writer, self.made = total, sys.stderr.isatty(), writer, made
        self.before = int(earlier.finished.sum()) if earlier is not None else 0  # ended in an earlier run
        self.started, self.shown = time.monotonic(), 0.0

    def after_step(self, done: StepDone) -> None:
        if done.written is not None:
            self.update(done.step)

    def update(self, step: int, last: bool = False) -> None:
        writer, made = self.writer, self.made
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


class Output:
    """Hooks timed together as the step's `output` phase."""

    def __init__(self, timer: Timer, hooks: list):
        self.timer, self.hooks = timer, hooks

    def after_step(self, done: StepDone) -> None:
        with self.timer.phase("output", done.step):
            for hook in self.hooks:
                hook.after_step(done)


class StopSignal:
    """The ranks agree to stop: a stop signal (SIGUSR1, SIGTERM) may reach them at different steps,
    and each rank knows only whether its own requests have all ended. At every step boundary each
    rank posts (stop asked, requests left) in a non-blocking reduction (on a communicator of its
    own) and reads the reduction posted one boundary earlier, which has completed in the background
    meanwhile. Every rank reads the same result at the same boundary, so all stop after the same
    step, and no step waits for a vote in the common case."""

    def __init__(self, world, timer: Timer, fault: FaultState, policy: WaitPolicy):
        self.comm, self.timer, self.request = fault.track(world.Dup()), timer, None
        self.fault, self.policy = fault, policy
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

    def after_step(self, done: StepDone) -> None:
        """The vote posted now is read at the next boundary (at once after the first step): so it says
        whether this rank still has requests after the next step."""
        batch = done.batch
        self.fault.maybe_die(done.step, -1, "stop_vote")
        requests_left = batch.busy if done.first else batch.busy_after_next
        done.stop = self.agreed(done.step, requests_left=requests_left, at_once=done.first)
        if not done.stop:
            self.fault.maybe_die(done.step, -1, "between_steps")

    def decided(self) -> bool:
        self.signalled = bool(self.anyone[0])
        return self.signalled or not self.anyone[1]

    def finish_vote(self, step: int) -> None:
        if not self.request.Test():
            with self.timer.phase("stop_wait", step):
                wait_all([self.request], Where(step, -1, 0, "stop_wait"), self.policy)
        self.request = None

    def close(self, step: int):
        if self.request is not None:  # every rank posted the same votes: the last completes everywhere
            self.finish_vote(step)
        STOP_REQUESTED[0] = False
        self.comm.Free()
