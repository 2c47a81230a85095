"""A progress line with an estimate of the time left, for the long offline commands (simulate,
predict collect, report): silent for work that ends within the first few seconds, then one line on
stderr at most every few seconds, so a user knows a minutes-long command is alive and when it ends."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total: int, unit: str, quiet_s: float = 5.0, every_s: float = 10.0):
        self.what, self.total, self.unit = what, total, unit
        self.started = time.perf_counter()
        self.next_at = self.started + quiet_s
        self.every_s = every_s

    def update(self, done: int) -> str | None:
        """After `done` of `total` units: print (and return) the line when it is due."""
        now = time.perf_counter()
        if now < self.next_at or not 0 < done < self.total:
            return None
        self.next_at = now + self.every_s
        elapsed = now - self.started
        line = (
            f"{self.what}: {done}/{self.total} {self.unit} in {elapsed:.0f} s, about "
            f"{elapsed * (self.total - done) / done:.0f} s left"
        )
        print(line, file=sys.stderr, flush=True)
        return line
