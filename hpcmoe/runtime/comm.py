"""Point-to-point messages of the exchanges and the engine: receives posted into preallocated
tensors (`Receives`) and the send queue that keeps each send and its buffer until MPI completes it
(`Sender`), staged through pinned host memory where the MPI cannot read the device, and stamped
with a delivery time on an emulated inter-node link (hpcmoe.runtime.link).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from mpi4py import MPI

from hpcmoe.runtime.buffers import as_bytes, byte_view
from hpcmoe.runtime.device import DONE
from hpcmoe.runtime.link import HEADER, Link
from hpcmoe.runtime.waits import Pending, WaitPolicy, Where, all_done, wait_until


class Receives:
    """Receives posted into preallocated tensors, one per peer; `arrived()` tells which are in.

    On the CPU (or with a CUDA-aware MPI) a message lands straight in its tensor. With `staging` it
    lands in a pinned host buffer and goes to the device on the copy stream; the compute stream waits
    for that copy before it reads the tensor. An emulated link's header also needs a host buffer."""

    def __init__(self, comm, buffers: dict[int, torch.Tensor], tag: int, link: Link, staging=None):
        me = self.me = comm.Get_rank()
        self.received, self.requests, self.raw, self.done, self.staging = buffers, {}, {}, set(), staging
        for peer, buffer in buffers.items():
            if buffer.numel() == 0:
                self.done.add(peer)
            elif peer != me:  # this rank's own share is copied in by Sender.send
                header = HEADER if link.emulated(me, peer) else 0
                nbytes = buffer.numel() * buffer.element_size() + header
                if staging is not None:
                    raw = staging.pool.take(nbytes)
                elif header:
                    raw = torch.empty(nbytes, dtype=torch.uint8)
                else:
                    raw = buffer  # straight into the tensor (host memory, or a CUDA-aware MPI)
                self.raw[peer] = (raw, header)
                self.requests[peer] = comm.Irecv([as_bytes(raw), MPI.BYTE], source=peer, tag=tag)

    def arrived(self) -> set[int]:
        """Peers whose message is complete (and, on an emulated link, delivered)."""
        now = None
        for peer in list(self.requests):
            if self.requests[peer].Test():
                raw, header = self.raw[peer]
                if header:
                    now = now or time.monotonic()
                    if now < raw[:HEADER].cpu().view(torch.float64).item():
                        # still on the emulated wire: test again later (a completed request stays complete)
                        continue
                if raw is not self.received[peer]:
                    self.land(peer, raw[header:])
                del self.requests[peer], self.raw[peer]
                self.done.add(peer)
        return self.done

    def land(self, peer: int, payload: torch.Tensor) -> None:
        """Copy a message from its receive buffer into the peer's tensor."""
        target = self.received[peer].view(-1).view(torch.uint8)
        if self.staging is None:
            target.copy_(payload)
            return
        streams = self.staging.streams
        copied = streams.copy_after(DONE, target, payload)
        streams.compute_waits(copied)
        self.staging.pool.give(payload, after=copied)

    def keep_own(self, data: torch.Tensor) -> None:
        """This rank's own share by reference, not copied (its sender never touches it again)."""
        assert data.shape == self.received[self.me].shape
        self.received[self.me] = data
        self.done.add(self.me)

    def all_in(self, where: Where, phase: str) -> Pending:
        """Pending until every message is in."""
        everyone = set(self.received)
        return Pending(
            lambda: True if len(self.arrived()) == len(everyone) else None,
            lambda: where.waiting_for(phase, everyone - self.arrived() - {self.me}),
        )

    def any_in(self, peers: set, where: Where, phase: str) -> Pending:
        """Pending until one of `peers` is in; resumes with the set of those that are."""
        return Pending(
            lambda: (self.arrived() & peers) or None,
            lambda: where.waiting_for(phase, peers - self.arrived() - {self.me}),
        )


@dataclass
class Sender:
    """Posts this rank's sends and keeps them (and their buffers) until MPI completes them.

    On the CPU a send is posted at once. On a GPU it waits for an event on the compute stream (the
    kernels that produced the data): with a CUDA-aware MPI the device buffer is sent then; with
    `staging` the data is first copied to pinned host memory on the copy stream, and the send is
    posted once that copy's event has completed, checked in test() (never a blocking synchronize)."""

    comm: object
    link: Link
    staging: object = None  # device.Staging, or None
    streams: object = None  # device.Streams of a GPU (gates sends on compute events), or None
    policy: WaitPolicy = WaitPolicy()  # how its waits wait (and every wait of the engine that owns it)
    queued: list = field(default_factory=list)  # (peer, tag, payload, event, pinned, header)
    in_flight: list = field(default_factory=list)  # (request, payload kept alive, pinned buffer or None)
    bytes_sent: int = 0
    background: Any = None  # with progress(): other traffic moved on whenever this rank tests or waits

    def receives(self, buffers: dict, tag: int) -> Receives:
        """Receives of this rank's messages into `buffers` (staged through pinned memory where the MPI
        needs it)."""
        return Receives(self.comm, buffers, tag, self.link, self.staging)

    def send(self, peer: int, data: torch.Tensor, tag: int, own: Optional[Receives] = None) -> None:
        """Isend `data` to `peer`; to this rank itself it is copied into `own` instead."""
        me = self.comm.Get_rank()
        if peer == me:
            send_to_self(own, me, data)
            return
        if data.numel() == 0:
            return  # the receiver knows the size is zero from an earlier counts exchange
        header = HEADER if self.link.emulated(me, peer) else 0
        if self.streams is None and self.staging is None:  # host memory: post at once
            payload = as_bytes(data)
            if header:
                payload = np.concatenate([np.zeros(HEADER, np.uint8), payload])
            self.post(peer, tag, payload, None, header)
            return
        if self.staging is not None or header:  # through pinned host memory (an emulated header needs it too)
            streams = self.staging.streams if self.staging is not None else self.streams
            host = self.pinned(data.numel() * data.element_size() + header)
            event = streams.copy_after(streams.record(), host[header:], byte_view(data))
            self.queued.append((peer, tag, host, event, host, header))
        else:  # a CUDA-aware MPI reads the device buffer once the kernels that wrote it are done
            self.queued.append((peer, tag, byte_view(data), self.streams.record(), None, 0))
        self.post_ready()  # at once if its event has already completed

    def pinned(self, nbytes: int) -> torch.Tensor:
        return (
            self.staging.pool.take(nbytes)
            if self.staging is not None
            else torch.empty(nbytes, dtype=torch.uint8)
        )

    def post(self, peer: int, tag: int, payload, pinned, header: int) -> None:
        if header:  # the delivery time is stamped when the message leaves, as the link queues it
            stamp = np.array([self.link.delivery_time(len(payload) - header)], np.float64).view(np.uint8)
            target = payload[:HEADER]
            target[:] = stamp if isinstance(target, np.ndarray) else torch.from_numpy(stamp)
        buffer = payload if isinstance(payload, np.ndarray) else as_bytes(payload)
        self.in_flight.append((self.comm.Isend([buffer, MPI.BYTE], dest=peer, tag=tag), payload, pinned))
        self.bytes_sent += len(buffer)

    def post_ready(self) -> None:
        """Post the queued sends whose data is ready (their event has completed)."""
        waiting = []
        for entry in self.queued:
            peer, tag, payload, event, pinned, header = entry
            if event.query():
                self.post(peer, tag, payload, pinned, header)
            else:
                waiting.append(entry)
        self.queued = waiting

    def test(self) -> None:
        """Post the sends whose data is ready; take back the buffers of completed sends."""
        if self.background is not None:
            self.background.progress()
        if self.queued:
            self.post_ready()
        still = []
        for request, payload, pinned in self.in_flight:
            if request.Test():
                if pinned is not None and self.staging is not None:
                    self.staging.pool.give(pinned)
            else:
                still.append((request, payload, pinned))
        self.in_flight = still

    def idle(self) -> bool:
        self.test()
        return not self.queued and not self.in_flight

    def wait(self, where: Where) -> None:
        wait_until(self.idle, where, self.policy)

    def settle(self, buffer: torch.Tensor, where: Where, timer=None) -> None:
        """Before `buffer` is written again: wait for the sends still reading it (done in practice:
        a peer that answered has received); timer: a wait is a row of where's phase."""
        if buffer.numel() and (self.in_flight or self.queued) and buffer.device.type == "cpu":
            memory = as_bytes(buffer)
            reading = lambda: [
                r
                for r, b, _ in self.in_flight
                if isinstance(b, np.ndarray) and np.may_share_memory(b, memory)
            ]
            wait_until(lambda: all_done(reading()), where, self.policy, timer=timer)
        elif self.queued:  # a device buffer: its copies to the host (or its gated sends) must be out
            copied = lambda: self.test() or all(e.query() for _, _, _, e, _, _ in self.queued)
            wait_until(copied, where, self.policy, timer=timer)


def send_to_self(own, me: int, data: torch.Tensor) -> None:
    """A send to this rank itself: `data` copied into `own`'s tensor for it, which is then in. own:
    Receives, or the simulator's stand-in (any object with `received` and `done`)."""
    if data.numel():
        own.received[me].copy_(data)
    own.done.add(me)
