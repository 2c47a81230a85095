"""Point-to-point messaging shared by dispatch and the engine.

Every wait in a run goes through `wait_until`: it tests, yields the core while nothing has
arrived (ranks may outnumber cores), and knows where it is (step, layer, micro-batch, phase,
peers). No blocking collective is used inside the generate loop: a blocking call can neither
time out nor say whom it waits for.

An optional emulated inter-node link (`parallel.link`) makes one machine behave like a small
cluster: a message between ranks of different (possibly emulated) nodes is delivered no earlier
than its send time + latency + bytes / bandwidth, and a rank's inter-node messages queue one
after another on its link. The delivery time travels in an 8-byte header; waiting for it sleeps.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

HEADER = 8  # bytes: float64 delivery time, only on emulated inter-node messages


@dataclass(frozen=True)
class Where:
    """Where a rank is waiting: printed by diagnostics."""
    step: int = -1
    layer: int = -1
    micro_batch: int = 0
    phase: str = ""
    peers: tuple[int, ...] = ()

    def __str__(self):
        return (f"step {self.step} layer {self.layer} micro_batch {self.micro_batch} "
                f"phase {self.phase} for rank {','.join(map(str, self.peers)) or '-'}")


SPIN = False        # parallel.wait: spin keeps testing without sleeping (only sensible with a core per rank)
WATCHDOG_S = None   # run.timeout_s: a wait longer than this names itself and aborts the job


def wait_until(done: Callable[[], bool], where) -> None:
    """Poll `done()` until it is true, sleeping a little longer each time (at most 1 ms).

    where: a Where, or a function returning one (so that it can name the peers still missing)."""
    pause, start = 20e-6, time.monotonic()
    while not done():
        if WATCHDOG_S is not None and time.monotonic() - start > WATCHDOG_S:
            watchdog(where() if callable(where) else where, time.monotonic() - start)
        if not SPIN:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def watchdog(where: Where, waited: float) -> None:
    """One line naming this rank, where it waits and for whom; then the whole job ends."""
    sys.stderr.write(f"rank {MPI.COMM_WORLD.Get_rank()}: watchdog: waited {waited:.1f} s in {where}\n")
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(3)


def wait_all(requests: list, where: Where) -> None:
    if requests:
        wait_until(lambda: MPI.Request.Testall(requests), where)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's raw bytes (bf16 has no MPI type; bytes need none)."""
    return t.contiguous().view(torch.uint8).numpy().reshape(-1) if t.numel() else np.empty(0, np.uint8)


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
        start = max(time.monotonic(), self.free_at)
        self.free_at = start + nbytes * 8 / (self.bandwidth_gbps * 1e9)
        return self.free_at + self.latency_us * 1e-6


class Receives:
    """Receives posted into preallocated tensors, one per peer; `arrived()` tells which are in."""

    def __init__(self, comm, buffers: dict[int, torch.Tensor], tag: int, link: Link):
        me = self.me = comm.Get_rank()
        self.received, self.requests, self.raw, self.done = buffers, {}, {}, set()
        for peer, buffer in buffers.items():
            if buffer.numel() == 0:
                self.done.add(peer)
            elif peer != me:  # this rank's own share is copied in by Sender.send
                header = HEADER if link.emulated(me, peer) else 0  # else receive straight into the tensor
                raw = np.empty(buffer.numel() * buffer.element_size() + header, np.uint8) if header else as_bytes(buffer)
                self.raw[peer] = (raw, header)
                self.requests[peer] = comm.Irecv([raw, MPI.BYTE], source=peer, tag=tag)

    def arrived(self) -> set[int]:
        """Peers whose message is complete (and, on an emulated link, delivered)."""
        now = None
        for peer in list(self.requests):
            if self.requests[peer].Test():
                raw, header = self.raw[peer]
                if header:
                    now = now or time.monotonic()
                    if now < raw[:HEADER].view(np.float64)[0]:
                        continue  # still on the emulated wire: test again later (a completed request stays complete)
                    self.received[peer].view(-1).view(torch.uint8).copy_(torch.from_numpy(raw[header:]))
                del self.requests[peer], self.raw[peer]
                self.done.add(peer)
        return self.done

    def keep_own(self, data: torch.Tensor) -> None:
        """This rank's own share by reference, not copied (its sender never touches it again)."""
        assert data.shape == self.received[self.me].shape
        self.received[self.me] = data
        self.done.add(self.me)


@dataclass
class Sender:
    """Posts this rank's sends and keeps them (and their buffers) until MPI completes them."""
    comm: object
    link: Link
    in_flight: list = field(default_factory=list)
    bytes_sent: int = 0

    def send(self, peer: int, data: torch.Tensor, tag: int, own: Optional[Receives] = None) -> None:
        """Isend `data` to `peer`; to this rank itself it is copied into `own` instead."""
        me = self.comm.Get_rank()
        if peer == me:
            if data.numel():
                own.received[me].copy_(data)
            own.done.add(me)
            return
        if data.numel() == 0:
            return  # the receiver knows the size is zero from an earlier counts exchange
        payload = as_bytes(data)
        if self.link.emulated(me, peer):
            header = np.array([self.link.delivery_time(len(payload))], np.float64).view(np.uint8)
            payload = np.concatenate([header, payload])
        self.in_flight.append((self.comm.Isend([payload, MPI.BYTE], dest=peer, tag=tag), payload))
        self.bytes_sent += len(payload)

    def test(self) -> None:
        self.in_flight = [(r, b) for r, b in self.in_flight if not r.Test()]

    def wait(self, where: Where) -> None:
        wait_all([r for r, _ in self.in_flight], where)
        self.in_flight = []


def tag_for(kind: int, layer: int, micro_batch: int, micro_batches: int) -> int:
    """Distinct tags per (layer, micro-batch, message kind) so exchanges in flight never cross."""
    return (kind + 8 * (micro_batch + micro_batches * max(layer, 0))) % 32000 + 100
