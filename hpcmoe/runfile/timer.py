"""The timer: every rank's (rank, layer, micro_batch, step, phase, start, end) rows, the run file's
/timings. Apart from the writer because every rank times its phases, and only rank 0 writes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from hpcmoe.runfile.schema import TIMING_DTYPE


class Timer:
    """Collects (rank, layer, micro_batch, step, phase, start, end) rows, seconds since `t0`.

    On a GPU (`streams`), compute phases are timed by events on the compute stream (kernels run
    asynchronously, so host clocks would time their launch), resolved when the step's rows are
    taken; waits and communication in flight stay on the host clock. Both count from the common
    start: the reference event is recorded on an idle stream right after it."""

    def __init__(self, rank: int, t0: float, streams=None):
        self.rank, self.t0, self.rows = rank, t0, []
        self.streams = streams if streams is not None and streams.gpu else None
        self.timed: list = []  # (row index, start event, end event) to resolve
        self.reference = None

    def restart(self, t0: float) -> None:
        """Count from `t0` (the common start barrier) from now on."""
        self.t0 = t0
        if self.streams is not None:
            self.reference = self.event()

    def now(self) -> float:
        """Seconds since t0."""
        return time.perf_counter() - self.t0

    def event(self):
        import torch

        event = torch.Event(device=self.streams.device, enable_timing=True)
        event.record(self.streams.compute())
        return event

    def mark(self) -> float:
        """A point in time for `add` (a perf_counter value)."""
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str, step: int, layer: int = -1, micro_batch: int = 0, **work):
        """A row for the work inside. work: what the phase computes, in the shapes hpcmoe.sim.costs prices
        (rows=, tokens=, row_bytes=), for the simulator's clock (sim.ledger.SimTimer); unused here. The
        body may add to it (`as work`) what it learns inside."""
        on_device = (
            self.streams is not None and self.reference is not None and not name.endswith(("_wait", "_comm"))
        )
        start = time.perf_counter()
        begin = self.event() if on_device else None
        try:
            yield work
        finally:
            if on_device:
                self.timed.append((len(self.rows), begin, self.event()))
            self.add(name, step, layer, micro_batch, start)

    def add(self, name: str, step: int, layer: int, micro_batch: int, start: float) -> None:
        """A row from `start` (a perf_counter value) until now: for spans that no `with` encloses."""
        self.rows.append(
            (
                self.rank,
                layer,
                micro_batch,
                step,
                name.encode(),
                start - self.t0,
                time.perf_counter() - self.t0,
            )
        )

    def take(self) -> np.ndarray:
        """The rows collected since the last call (device-timed rows resolved: this waits for them)."""
        for index, begin, end in self.timed:
            end.synchronize()
            row = self.rows[index]
            self.rows[index] = row[:5] + (
                self.reference.elapsed_time(begin) / 1e3,
                self.reference.elapsed_time(end) / 1e3,
            )
        self.timed = []
        rows, self.rows = self.rows, []
        return np.array(rows, dtype=TIMING_DTYPE)
