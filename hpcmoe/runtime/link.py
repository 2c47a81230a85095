"""The optional emulated inter-node link (`parallel.link`), which makes one machine behave like a
small cluster: a message between ranks of different (possibly emulated) nodes is delivered no
earlier than its send time + latency + bytes / bandwidth, and a rank's inter-node messages queue one
after another on its link. The delivery time travels in an 8-byte header; waiting for it sleeps.
Separate because both the point-to-point messages and the collectives of rows stamp by it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

HEADER = 8  # bytes: float64 delivery time, only on emulated inter-node messages


@dataclass
class Link:
    """This rank's outgoing inter-node link: emulated when bandwidth_gbps is set."""

    node_of_rank: tuple[int, ...]
    bandwidth_gbps: Optional[float] = None
    latency_us: float = 0.0
    free_at: float = 0.0  # when the last queued message leaves the wire

    def emulated(self, me: int, peer: int) -> bool:
        return self.bandwidth_gbps is not None and self.node_of_rank[me] != self.node_of_rank[peer]

    def delivery_time(self, nbytes: int) -> float:
        """Queue `nbytes` on the link now; -> when the receiver may see them."""
        return float(self.delivery_times(np.array([nbytes]))[0])

    def delivery_times(self, nbytes: np.ndarray) -> np.ndarray:
        """Queue messages of nbytes [n] one after another on the link now; -> when the receiver may
        see each [n]."""
        leave = max(time.monotonic(), self.free_at) + np.cumsum(nbytes * 8 / (self.bandwidth_gbps * 1e9))
        if len(leave):
            self.free_at = float(leave[-1])
        return leave + self.latency_us * 1e-6
