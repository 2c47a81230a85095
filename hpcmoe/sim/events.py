"""What the simulation's ranks yield and wait on, and the arithmetic of links and waits
(hpcmoe.sim.simulate runs them; sim.schedule and sim.net make them).

- Work: compute on a rank (seconds, or parts back to back, with what happens at their ends);
  Wait: a rank waits on a condition whose time becomes known: a collective's completion (Cond),
  every message of a kind in (AllFrom), the first of some (AnyFrom), the later of two (Latest).
- Mail: the messages of one kind in one exchange (delivery time per source and destination).
- Driver: one rank in the simulation: its top generator, its work and what it waits for.
- queue: messages leaving one after another on one link; poll_time: when waits.wait_until's sleeps
  see something that is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

FIRST_PAUSE_S, LONGEST_PAUSE_S = 20e-6, 1e-3  # waits.wait_until's sleeps (tests/test_simulate.py checks them)


# ---------------------------------------------------------------- what a rank's coroutines yield


@dataclass
class Work:
    """Compute on the rank: `seconds`, or an array of parts run back to back; `then(ends)` is called
    at the end with each part's end time (sends posted as they were made)."""

    seconds: object
    phase: Optional[str] = None  # a /timings row when set
    layer: int = -1
    mb: int = 0
    then: Optional[Callable] = None


PROGRESS = "progress"  # yielded after each scheduler pass: the rank tests its requests (MPI progress)


@dataclass
class Wait:
    on: object  # a Cond, AllFrom or AnyFrom: its .time is None until known
    phase: str
    layer: int = -1
    mb: int = 0


class Cond:
    """Something with a time known at some point (a collective's completion)."""

    def __init__(self):
        self.time, self.watchers = None, set()


@dataclass
class Collective:
    """A non-blocking collective: who has posted, when each member made progress after the last post."""

    members: tuple
    conds: dict  # member -> Cond: when it completes there
    posted: set = field(default_factory=set)
    progress: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # what its members contributed (sim.net.SimCounts)


class Mail:
    """Messages of one kind in one exchange: delivery time per (source, destination), NaN until sent;
    what each source announced for its receivers to read: `counts` (flat dispatch), `sent` (two_stage)."""

    def __init__(self, ranks: int):
        self.times = np.full((ranks, ranks), np.nan)
        self.got = np.zeros(ranks, np.int64)
        self.sent: dict = {}
        self.counts = None  # [sources, destinations, S] the counts each source announced
        self.watchers: dict[int, set] = {}

    def announce(self, source: int, send_counts: np.ndarray) -> None:
        """send_counts: [R, S] rows from `source` to each rank's slots (what its counts collective
        carries)."""
        if self.counts is None:
            self.counts = np.zeros((len(self.got), *send_counts.shape), np.int32)
        self.counts[source] = send_counts


@dataclass
class AllFrom:
    """Every one of `count` messages to `dst` is in: the latest delivery, once all are sent."""

    mail: Mail
    dst: int
    count: int

    @property
    def time(self):
        if self.count == 0:
            return -np.inf
        return (
            float(np.nanmax(self.mail.times[:, self.dst])) if self.mail.got[self.dst] >= self.count else None
        )


@dataclass
class AnyFrom:
    """The first of the messages from `sources` to `dst` to be in (among those sent so far)."""

    mail: Mail
    dst: int
    sources: list

    @property
    def time(self):
        times = self.mail.times[self.sources, self.dst]
        return float(np.nanmin(times)) if not np.isnan(times).all() else None


@dataclass
class Latest:
    """The later of two conditions: known once both are."""

    first: object
    second: object

    @property
    def time(self):
        times = (self.first.time, self.second.time)
        return None if None in times else max(times)


# ---------------------------------------------------------------- a rank, as the simulation drives it


@dataclass
class Driver:
    """One rank: its top generator, whether it computes (and what), what it waits for."""

    rank: int
    host: int
    gen: object = None
    busy: bool = False
    waiting: Optional[list] = None
    idle_since: float = 0.0
    version: int = 0
    work: Optional[Work] = None
    work_start: float = 0.0
    remaining: float = 0.0
    slice_start: float = 0.0
    spinning: bool = False  # waits while holding its core (parallel.wait=spin, more ranks than cores)
    ready: Optional[float] = None  # a spinning wait: when what it waits for is there (None: not known yet)


def queue(free_at: float, sent: np.ndarray, durations: np.ndarray):
    """Messages leaving one after another on one link: -> (when each has left, when the link is free).
    end_i = max(sent_i, end_{i-1}) + duration_i, as a running maximum (no loop)."""
    ends_if_back_to_back = np.cumsum(durations)
    ends = ends_if_back_to_back + np.maximum.accumulate(
        np.maximum(sent - (ends_if_back_to_back - durations), free_at)
    )
    return ends, (float(ends[-1]) if len(ends) else free_at)


def poll_time(since: float, ready: float, overshoot: float) -> float:
    """When waits.wait_until, waiting since `since`, sees something ready at `ready`: it tests, then
    sleeps 20 us, 40 us, ... at most 1 ms between tests, each sleep `overshoot` longer than asked."""
    t, pause = since, FIRST_PAUSE_S
    while t < ready:
        t += pause + overshoot
        pause = min(2 * pause, LONGEST_PAUSE_S)
    return t
