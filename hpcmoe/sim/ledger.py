"""A simulated rank's compute between two yields, and its timer. A rank's code runs inline between
two yields, so what it computes is charged to a `Ledger` of parts; at each yield the ledger
becomes Works run on the rank's core. A send leaves, a collective is joined and a timing row ends
at the end of the part it followed (Ledger.works says how, with a unit per rank and with ranks
time-sliced on shared units). `SimTimer` is the engine's timer on that clock: a phase prices the
shapes the engine names in it (`timer.phase(name, ..., rows=...)`) with hpcmoe.sim.costs' method
of that name. Apart from the stand-ins (sim.net), which charge to it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np

from hpcmoe.sim.events import Work


class Marker:
    """A point in a rank's code: its time is known once the part it follows has run."""

    time: Optional[float] = None


class Ledger:
    """A rank's compute since it last yielded, as parts run back to back, and what happens at their
    ends: messages leave, collectives are joined, timing rows end (callbacks)."""

    def __init__(self, sim, rank: int):
        self.sim, self.rank = sim, rank
        self.parts: list[float] = []
        self.after: list = []  # (part index, callback(time), whether others see it at once: a collective)
        self.outbox: list = []  # (part index, mail key, destinations, bytes of each)

    def charge(self, seconds: float) -> None:
        self.parts.append(float(seconds))

    def then(self, callback, joins: bool = False) -> None:
        """callback(time) at the end of the part charged last (now, when none is); joins: it posts to
        a collective, which others see the moment it happens."""
        if self.parts:
            self.after.append((len(self.parts) - 1, callback, joins))
        else:
            callback(self.sim.now)

    def send(self, key, destinations, nbytes) -> None:
        """Messages posted at the end of the part charged last (sends always follow a charge)."""
        self.outbox.append((len(self.parts) - 1, key, destinations, nbytes))

    def works(self) -> list[Work]:
        """-> everything charged since the last call, as Works.

        With a unit of its own a rank runs its work the moment it starts, so every part's end is known
        now: messages are posted and rows closed at once, at those times, and a Work ends only where a
        collective is joined (the simulation sees it at its own time). A rank that shares its unit is
        time-sliced: a Work ends wherever something happens, which happens when that Work ends."""
        if not self.parts:
            return []
        parts, after, outbox = np.array(self.parts), self.after, self.outbox
        self.parts, self.after, self.outbox = [], [], []
        sim, own_unit = self.sim, self.sim.has_unit(self.rank)
        if own_unit:
            ends = sim.now + np.cumsum(parts * sim.slower(self.rank))
            self.post(ends, outbox)
            for index, callback, joins in after:
                if not joins:
                    callback(float(ends[index]))
            after = [entry for entry in after if entry[2]]
            outbox = []
        by_end: dict = {}
        for index, callback, _ in after:
            by_end.setdefault(index, ([], []))[0].append(callback)
        for entry in outbox:
            by_end.setdefault(entry[0], ([], []))[1].append(entry)
        works, first = [], 0
        for last in sorted(set(by_end) | {len(parts) - 1}):
            callbacks, sends = by_end.get(last, ([], []))
            sends = [(index - first, key, to, nbytes) for index, key, to, nbytes in sends]
            works.append(
                Work(parts[first : last + 1], then=lambda ends, c=callbacks, m=sends: self.happen(ends, c, m))
            )
            first = last + 1
        return works

    def happen(self, ends: np.ndarray, callbacks: list, sends: list) -> None:
        """At the end of a Work: its messages leave, then what happens at its end."""
        self.post(ends, sends)
        for callback in callbacks:
            callback(float(ends[-1]))

    def post(self, ends: np.ndarray, sends: list) -> None:
        """The messages, each at the end of its part: one call per kind, in posting order."""
        by_key: dict = {}
        for index, key, destinations, nbytes in sends:
            by_key.setdefault(key, []).append(
                (np.atleast_1d(destinations), np.atleast_1d(nbytes), ends[index])
            )
        for key, messages in by_key.items():
            self.sim.send(
                key,
                self.rank,
                np.concatenate([d for d, _, _ in messages]),
                np.concatenate([b for _, b, _ in messages]),
                np.concatenate([np.full(len(d), sent) for d, _, sent in messages]),
            )


class SimTimer:
    """output.Timer's interface on the simulated clock: rows go to the simulation's /timings."""

    def __init__(self, net, rank: int):
        """net: the simulation's sim.net.SimNet (the ranks' ledgers)."""
        self.sim, self.rank, self.ledger, self.costs = net.sim, rank, net.ledgers[rank], net.sim.costs

    def mark(self) -> Marker:
        marker = Marker()
        self.ledger.then(lambda time: setattr(marker, "time", time))
        return marker

    @contextmanager
    def phase(self, name: str, step: int, layer: int = -1, micro_batch: int = 0, **work):
        """Shapes named on entry are charged first (the phase's work, then what its body posts);
        shapes the body adds are charged when it ends."""
        start, named = self.mark(), bool(work)
        if named:
            self.ledger.charge(getattr(self.costs, name)(**work))
        yield work
        if len(work) and not named:
            self.ledger.charge(getattr(self.costs, name)(**work))
        self.add(name, step, layer, micro_batch, start)

    def add(self, name: str, step: int, layer: int, micro_batch: int, start: Marker) -> None:
        self.ledger.then(lambda end: self.sim.row(self.rank, name, layer, micro_batch, start.time, end, step))
