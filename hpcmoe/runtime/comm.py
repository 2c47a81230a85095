"""Messaging shared by the exchanges and the engine: the wait helper, receives, sends, counts.

Every wait in a run goes through `wait_until`: it tests, yields the core while nothing has
arrived (ranks may outnumber cores), and knows where it is (step, layer, micro-batch, phase,
peers). No blocking collective is used inside the generate loop: a blocking call can neither
time out nor say whom it waits for. Non-blocking collectives are tested like receives, and a
`CountsGroup` lets a rank stuck in one name the members that have not joined it yet.

An optional emulated inter-node link (`parallel.link`) makes one machine behave like a small
cluster: a message between ranks of different (possibly emulated) nodes is delivered no earlier
than its send time + latency + bytes / bandwidth, and a rank's inter-node messages queue one
after another on its link. The delivery time travels in an 8-byte header; waiting for it sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from mpi4py import MPI

from hpcmoe.runtime import fault
from hpcmoe.runtime.device import DONE
from hpcmoe.runtime.tags import tag_for  # noqa: F401 (the exchanges' tags, imported from here too)

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
        return (
            f"step {self.step} layer {self.layer} micro_batch {self.micro_batch} "
            f"phase {self.phase} for rank {','.join(map(str, self.peers)) or '-'}"
        )

    def waiting_for(self, phase: str, peers) -> "Where":
        return Where(self.step, self.layer, self.micro_batch, phase, tuple(sorted(peers)))


@dataclass
class Pending:
    """What a coroutine waits for: poll() is None until it can resume, then the value to send in
    (polling twice gives the same answer); where() names only the peers still missing."""

    poll: Callable[[], Any]
    where: Callable[[], Where]
    polled: Callable[[], bool] = lambda: False  # MPI moves these bytes only while polled: yield, don't sleep


SPIN = False  # parallel.wait: spin keeps testing without sleeping (only sensible with a core per rank)
POLL_BY_YIELDING = (
    True  # a core per rank: waits that MPI progresses only while polled yield instead of sleeping
)
WATCHDOG_S = None  # run.timeout_s: a wait longer than this names itself and aborts the job


def wait_until(
    done: Callable[[], bool], where, polled: Callable[[], bool] = lambda: False, timer=None
) -> None:
    """Poll `done()` until it is true, sleeping a little longer each time (at most 1 ms).

    timer: a wait that is not over at once is a row of its own, named by where's phase (a `*_wait`):
    idle time, even when it happens inside a phase timed as work (rebalance, dispatch_post).

    where: a Where, or a function returning one (so that it can name the peers still missing).
    polled(): MPI progresses what is awaited only inside a poll (MPICH moves a non-blocking
    collective's large payload a few KiB per test: 518 tests for 4 MiB), so test again at once
    (measured between 2 ranks on 2 cores: 4 MiB in 5.5 ms yielding between tests, 66 ms with 20 us
    sleeps; with 4 ranks on 2 cores, 64 KiB in 3.4 ms with 20 us sleeps, 4.2 ms yielding)."""
    if timer is not None and not finished(done, where):
        at = where() if callable(where) else where
        with timer.phase(at.phase, at.step, at.layer, at.micro_batch):
            return wait_until(done, where, polled)
    pause, start = 20e-6, time.monotonic()
    while not finished(done, where):
        if WATCHDOG_S is not None and time.monotonic() - start > WATCHDOG_S:
            watchdog(where() if callable(where) else where, time.monotonic() - start)
        if SPIN:
            continue
        if polled() and POLL_BY_YIELDING:  # test again at once, giving way to any other runnable process
            os.sched_yield()
            pause = 20e-6
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


def finished(done: Callable[[], bool], where) -> bool:
    """done(), and an MPI error raised by it says where it was met (run.fault_tolerance reports it)."""
    try:
        return done()
    except MPI.Exception as error:
        error.where = where() if callable(where) else where
        raise


def watchdog(where: Where, waited: float) -> None:
    """One line naming this rank, where it waits and for whom; then the whole job ends."""
    sys.stderr.write(f"rank {MPI.COMM_WORLD.Get_rank()}: watchdog: waited {waited:.1f} s in {where}\n")
    sys.stderr.flush()
    time.sleep(0.2)  # the launcher forwards the line before its abort kills the job (once lost under load)
    MPI.COMM_WORLD.Abort(3)


def wait_all(requests: list, where: Where, timer=None) -> None:
    if requests:
        wait_until(lambda: all_done(requests), where, timer=timer)


def all_done(requests: list) -> bool:
    """Whether every request is complete, testing each in turn: a dead peer then raises its own
    class (ERR_PROC_FAILED), where Testall says only ERR_IN_STATUS."""
    return all(request.Test() for request in requests)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's raw bytes as a flat uint8 tensor (bf16 has no MPI type; bytes need none)."""
    # reshape(-1) first: a contiguous tensor with a size-1 dim may keep a stride that view() refuses
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def as_bytes(t: torch.Tensor):
    """What MPI is handed: a numpy view of host memory, or a uint8 device tensor (which a CUDA-aware
    MPI reads through __cuda_array_interface__)."""
    flat = byte_view(t)
    return flat.numpy() if flat.device.type == "cpu" else flat


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
                        continue  # still on the emulated wire: test again later (a completed request stays complete)
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
    queued: list = field(default_factory=list)  # (peer, tag, payload, event, pinned, header)
    in_flight: list = field(default_factory=list)  # (request, payload kept alive, pinned buffer or None)
    bytes_sent: int = 0
    background: Any = None  # with progress(): other traffic moved on whenever this rank tests or waits

    def receives(self, buffers: dict, tag: int) -> Receives:
        """Receives of this rank's messages into `buffers` (staged through pinned memory where the MPI needs it)."""
        return Receives(self.comm, buffers, tag, self.link, self.staging)

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
        wait_until(self.idle, where)

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
            wait_until(lambda: all_done(reading()), where, timer=timer)
        elif self.queued:  # a device buffer: its copies to the host (or its gated sends) must be out
            wait_until(
                lambda: self.test() or all(e.query() for _, _, _, e, _, _ in self.queued), where, timer=timer
            )


def tested(requests: list, tests: int = 64) -> bool:
    """Whether every request is complete, testing up to `tests` times in a row: MPICH moves a
    non-blocking collective's payload a few KiB per test (518 tests for 4 MiB between 2 ranks), and a
    test costs about a microsecond where a turn of the scheduler costs ten."""
    for _ in range(tests):
        if all_done(requests):
            return True
    return False


class CountsGroup:
    """The collectives of one micro-batch slot's exchanges among fixed ranks, without R^2 messages:
    the counts, and with parallel.expert_schedule per_layer the rows themselves (`rows`).

    One non-blocking `Ialltoall` of counts per exchange, on a communicator this slot owns, so that every
    member issues its collectives on it in the same order (layer after layer) and the wait helper
    can test them. A collective hides who is late, so each member also counts the collectives it
    has posted in an RMA window that others read without its help (passive target): a member
    stuck in one names the members whose count is behind. Created collectively by `ranks`. (Not
    under run.fault_tolerance: Open MPI's shared-memory RMA is not made to outlive a dead rank, so
    the watchdog then names no one inside a collective.)"""

    def __init__(self, comm, ranks: tuple[int, ...], track: Callable = lambda comm: comm):
        """comm: a communicator of exactly `ranks` (world ranks, in comm rank order); duplicated here,
        and the duplicate given to track (the run's FaultState.track)."""
        self.comm, self.ranks = track(comm.Dup()), tuple(ranks)
        self.comm_rank_world = self.ranks[self.comm.Get_rank()]
        self.row_types: dict[int, object] = {}  # row width in bytes -> a committed contiguous datatype
        self.far = None
        self.step, self.finished = -1, 0  # per_layer: exchanges of this step done here (see turn)
        self.window, self.posted = None, np.zeros(1, np.int64)
        if not fault.ENABLED[0]:
            self.window = MPI.Win.Allocate(8, 8, comm=self.comm)
            self.posted = np.frombuffer(self.window.tomemory(), np.int64)
            self.posted[0] = 0
            self.window.Lock_all()
        self.comm.Barrier()  # every count is zero before anyone reads one

    def post(self, send: np.ndarray, where: Where, phase: str = "counts_wait"):
        """send: [G, S] int64, row i for member i -> (received [G, S], row i from member i; Pending)."""
        number = self.count_posted()
        received = np.empty_like(send)
        request = self.comm.Ialltoall(send, received)
        keep = (send, received)  # alive until the request completes
        return received, Pending(
            lambda: True if request.Test() and keep else None,
            lambda: where.waiting_for(phase, self.behind(number)),
        )

    def rows(
        self,
        send: torch.Tensor,
        send_counts: np.ndarray,
        send_starts: np.ndarray,
        recv: torch.Tensor,
        recv_counts: np.ndarray,
        recv_starts: np.ndarray,
        link: Link,
        where: Where,
        phase: str,
        staging=None,
        streams=None,
    ):
        """Generator: one non-blocking Ialltoallv of rows. send, recv: [*, W] contiguous tensors of one
        row width; counts and starts [G] in rows, entry i for member i (in member order; this rank's
        own share included). Whatever the number of members, the host makes one or two MPI calls.

        On an emulated link the delivery time of each inter-node share travels in an Ialltoall posted
        just before (the link queues the shares in member order), and the rows count as in once the
        latest of them is due. On a GPU the rows are sent once the kernels that wrote them are done,
        through pinned host memory when the MPI cannot read the device (one copy each way)."""
        width = send.shape[1] * send.element_size()
        row = self.row_types.get(width)
        if row is None:
            row = self.row_types[width] = MPI.BYTE.Create_contiguous(width).Commit()
        requests, stamps_in = [], None
        if link.bandwidth_gbps is not None:
            far = self.far_from(link)
            stamps_out, stamps_in = np.zeros(len(self.ranks)), np.zeros(len(self.ranks))
            going = far & (send_counts > 0)
            stamps_out[going] = link.delivery_times(send_counts[going] * width)
            self.count_posted()
            requests.append(self.comm.Ialltoall(stamps_out, stamps_in))
        send_buffer, recv_buffer = send, recv
        if send.device.type != "cpu":
            ready = streams.record()
            if staging is not None:  # one copy to pinned host memory for the whole exchange
                send_buffer = staging.pool.take(send.numel() * send.element_size())
                recv_buffer = staging.pool.take(recv.numel() * recv.element_size())
                ready = streams.copy_after(ready, send_buffer, byte_view(send))
            yield Pending(lambda: True if ready.query() else None, lambda: where.waiting_for("send_wait", ()))
        number = self.count_posted()
        requests.append(
            self.comm.Ialltoallv(
                [as_bytes(send_buffer), (send_counts, send_starts), row],  # counts in rows:
                [as_bytes(recv_buffer), (recv_counts, recv_starts), row],
            )
        )  # no int overflow
        keep = (send_buffer, recv_buffer, stamps_in)  # alive until the requests complete
        due = lambda: 0.0 if stamps_in is None else stamps_in[far & (recv_counts > 0)].max(initial=0.0)
        arrived = []  # [True] once every request is complete (then only an emulated delivery time is awaited)
        landed = lambda: bool(arrived) or (tested(requests) and keep and not arrived.append(True))
        in_and_due = lambda: landed() and time.monotonic() >= due()
        yield Pending(
            lambda: True if in_and_due() else None,
            lambda: where.waiting_for(phase, self.behind(number)),
            polled=lambda: not arrived,
        )
        if staging is not None:
            copied = streams.copy_after(DONE, byte_view(recv).view(-1), recv_buffer)
            streams.compute_waits(copied)
            staging.pool.give(recv_buffer, after=copied)
            staging.pool.give(send_buffer)

    def turn(self, at: Where, index: int) -> Optional[Pending]:
        """Collectives must be posted in the same order on every member. An exchange that posts
        several here (per_layer) must not interleave with another: the one of the step's `index`-th
        MoE layer goes once those before it are done (a MoE rank of ma starts every layer at once).
        -> None when it may go now, else what to wait for; `done_turn` when it has posted its last."""
        if at.step != self.step:
            self.step, self.finished = at.step, 0
        if self.finished == index:
            return None
        return Pending(
            lambda: True if self.finished == index else None, lambda: at.waiting_for("dispatch_wait", ())
        )

    def done_turn(self) -> None:
        self.finished += 1

    def far_from(self, link: Link) -> np.ndarray:
        """[G] bool: the members on another (possibly emulated) node than this rank (made once)."""
        if self.far is None:
            nodes = np.asarray(link.node_of_rank)
            self.far = nodes[list(self.ranks)] != nodes[self.comm_rank_world]
        return self.far

    def count_posted(self) -> int:
        """One more collective posted here (what `behind` reads); -> how many so far."""
        self.posted[0] += 1
        if self.window is not None:
            self.window.Sync()
        return int(self.posted[0])

    def behind(self, number: int, patience_s: float = 0.5) -> list[int]:
        """World ranks that have posted fewer than `number` collectives here (read without their help)."""
        if self.window is None:
            return []
        late = []
        for member, rank in enumerate(self.ranks):
            value = np.zeros(1, np.int64)
            request, start = (
                self.window.Rget([value, MPI.INT64_T], member, target=(0, 1, MPI.INT64_T)),
                time.monotonic(),
            )
            while not request.Test() and time.monotonic() - start < patience_s:
                time.sleep(1e-4)
            if value[0] < number:
                late.append(rank)
        return late

    def close(self) -> None:
        if self.window is not None:
            self.window.Unlock_all()
            self.window.Free()
        for row in self.row_types.values():
            row.Free()
        self.comm.Free()


class BufferPool:
    """Large exchange buffers reused across layers and steps instead of allocated per layer.

    get(key, rows, cols, dtype) returns a [rows, cols] view of a buffer kept for `key`, grown when
    too small. The caller picks keys so that a buffer is never handed out while still in use
    (e.g. one key per micro-batch slot, purpose and layer parity)."""

    def __init__(self, device=None):
        self.buffers: dict = {}
        self.device = device

    def get(self, key, rows: int, cols: int, dtype) -> torch.Tensor:
        need = rows * cols * torch.empty(0, dtype=dtype).element_size()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = self.buffers[key] = torch.empty(max(need, 64), dtype=torch.uint8, device=self.device)
        return buffer[:need].view(dtype).view(rows, cols)
