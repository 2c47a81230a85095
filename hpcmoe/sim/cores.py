"""Ranks as compute resources: the Simulation's work on its hosts' cores (or GPUs).

A rank with a unit of its own runs its work the moment it starts it; where a host has more ranks
than units, they are time-sliced as an OS scheduler does (a quantum each, the ranks waiting for a
core in a line, a rank back from a wait first in it), and a rank that spins while it waits keeps
its core. Separate from the event loop (hpcmoe.sim.simulate), which says when a rank computes, and
from its links (hpcmoe.sim.links), which carry what it sends.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.sim.events import Driver, Work


class Cores:
    """The compute half of a Simulation (a mixin): it keeps `holders` (host -> {rank: end of its
    slice}: the ranks on its cores) and `lines` (host -> ranks waiting for a core, first in line
    first), and uses the Simulation's clock (now, at), its rows and its resume."""

    def set_up_cores(self) -> None:
        self.holders: dict = {}  # host -> {rank: end of its slice}: the ranks on its cores
        self.lines: dict = {}  # host -> ranks waiting for a core, first in line first

    def slower(self, rank: int) -> float:
        """The factor on the rank's costed work now (1: as costed): longer in the first step (first
        calls, fresh memory) and on a node shared with other ranks (shared caches)."""
        return (
            1.0
            + (self.machine.first_step_slowdown if self.step_of[rank] == 0 else 0.0)
            + (self.machine.shared_node_slowdown if self.ranks_on_host[self.host_of_rank[rank]] > 1 else 0.0)
        )

    def has_unit(self, rank: int) -> bool:
        """Whether the rank has a core (or GPU) of its own: its work runs the moment it is started."""
        return self.ranks_on_host[self.host_of_rank[rank]] <= self.machine.units_per_node

    def start_work(self, driver: Driver, work: Work) -> None:
        """Run `work` on the rank: at once when its host has a unit per rank; otherwise the host's
        units are time-sliced as an OS scheduler does: a rank keeps its core for a quantum, then goes
        behind the ranks waiting for one; a rank coming back from a wait goes first in that line."""
        parts = np.atleast_1d(np.asarray(work.seconds, float))
        slower = self.slower(driver.rank)
        if slower != 1.0:
            parts = parts * slower
            work.seconds = parts
        driver.busy, driver.work, driver.work_start, driver.remaining = (
            True,
            work,
            self.now,
            float(parts.sum()),
        )
        host = driver.host
        if self.has_unit(driver.rank):
            self.at(self.now + driver.remaining, self.finish_work, driver)
            return
        holders = self.holders.setdefault(host, {})
        if driver.rank not in holders:
            if len(holders) >= self.machine.units_per_node:
                self.lines.setdefault(host, []).insert(0, driver)  # just woke: first in line
                return
            holders[driver.rank] = self.now + self.machine.quantum_s
        self.run_slice(driver)

    def run_slice(self, driver: Driver) -> None:
        """The rank holds a core until its slice ends: run its work until then."""
        driver.version += 1
        driver.slice_start = self.now
        if driver.spinning:  # spins until what it waits for is there
            driver.remaining = float("inf") if driver.ready is None else max(0.0, driver.ready - self.now)
        slice_end = self.holders[driver.host][driver.rank]
        if self.now + driver.remaining <= slice_end:
            self.at(self.now + driver.remaining, self.slice_done, driver, driver.version, True)
        else:
            self.at(slice_end, self.slice_done, driver, driver.version, False)

    def slice_done(self, driver: Driver, version: int, finished: bool) -> None:
        if version != driver.version:
            return
        driver.remaining -= self.now - driver.slice_start
        host, line = driver.host, self.lines.get(driver.host, [])
        if finished:
            return self.finish_work(driver)
        if line:  # the quantum is over and others wait: to the back of the line
            del self.holders[host][driver.rank]
            line.append(driver)
            self.hand_over(host)
        else:
            self.holders[host][driver.rank] = self.now + self.machine.quantum_s
            self.run_slice(driver)

    def release(self, driver: Driver) -> None:
        """The rank waits or is done: its core goes to the first in line."""
        holders = self.holders.get(driver.host, {})
        if holders.pop(driver.rank, None) is not None:
            self.hand_over(driver.host)

    def hand_over(self, host: int) -> None:
        line = self.lines.get(host, [])
        while line and len(self.holders[host]) < self.machine.units_per_node:
            driver = line.pop(0)
            self.holders[host][driver.rank] = self.now + self.machine.quantum_s
            self.run_slice(driver)

    def finish_work(self, driver: Driver) -> None:
        if driver.spinning:  # what it spun for is there: the wait's row, then on
            driver.busy, driver.spinning = False, False
            first = driver.waiting[0]
            self.row(driver.rank, first.phase, first.layer, first.mb, driver.idle_since, self.now)
            driver.waiting = None
            return self.resume(driver)
        work, start = driver.work, driver.work_start
        parts = np.atleast_1d(np.asarray(work.seconds, float))
        total = parts.sum()
        ends = start + (self.now - start) * (np.cumsum(parts) / total if total > 0 else np.ones(len(parts)))
        if work.phase is not None:
            self.row(driver.rank, work.phase, work.layer, work.mb, start, self.now)
        driver.busy = False
        if work.then is not None:
            work.then(ends)
        self.resume(driver)
